"""Upload a published version to a Hugging Face Hub model repository (``push_to_hub`` in the config).

The version folder (weights, index, config and tokenizer files, ``README.md`` model card,
``merge_report.json``) is committed as it is, in one commit, with ``huggingface_hub``'s
``upload_folder``; a version on remote storage is first copied to a local temporary folder. The
repository and the branch are created when missing. The token is huggingface_hub's own
(``HF_TOKEN`` or ``huggingface-cli login``): it never appears in the merge config.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from swudi.config.merge_config import PushToHubConfig
from swudi.errors import PublishError
from swudi.publish.versions import MANIFEST_NAME
from swudi.storage.filesystem import is_local_url, list_folder, resolve

log = logging.getLogger(__name__)


@contextlib.contextmanager
def local_folder(url: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[Path]:
    """A local folder with the files of the folder at ``url`` (itself when local, else a copy that
    is removed afterwards)."""
    if is_local_url(url):
        yield Path(resolve(url, storage_options)[1])
        return
    fs, path = resolve(url, storage_options)
    with tempfile.TemporaryDirectory(prefix="swudi-hub-") as tmp:
        names = [p for p in list_folder(fs, path, detail=False) if fs.isfile(p)]
        if not names:
            raise PublishError(f"{url}: no files to upload")
        for remote in names:
            fs.get_file(remote, str(Path(tmp) / Path(remote).name))
        yield Path(tmp)


def push_version(
    version_url: str,
    version: str,
    target: PushToHubConfig,
    storage_options: Mapping[str, Any] | None = None,
    api: Any = None,
) -> str:
    """Commit the version folder at ``version_url`` to ``target.repo_id`` on ``target.revision``;
    return the commit's URL. Raises :class:`PublishError` naming the repository on any failure
    (the published version itself is not touched)."""
    from huggingface_hub import HfApi

    hub = api or HfApi()
    where = f"{target.repo_id}@{target.revision}"
    try:
        with local_folder(version_url, storage_options) as folder:
            hub.create_repo(target.repo_id, repo_type="model", private=target.private, exist_ok=True)
            if target.revision != "main":
                hub.create_branch(target.repo_id, branch=target.revision, repo_type="model", exist_ok=True)
            commit = hub.upload_folder(
                repo_id=target.repo_id,
                folder_path=str(folder),
                repo_type="model",
                revision=target.revision,
                commit_message=f"swudi version {version}",
                ignore_patterns=[MANIFEST_NAME],  # swudi's own bookkeeping of the version folder
            )
    except PublishError:
        raise
    except Exception as error:  # any Hub, network or auth failure, named for the operator
        raise PublishError(f"push of version {version} to the Hub repository {where} failed: {error}") from error
    url = str(getattr(commit, "commit_url", commit))
    log.info("pushed version %s to %s: %s", version, where, url)
    return url
