"""Where a checkpoint or output really is, and which locations of a merge must not overlap.

Two spellings of one place (``./a``, ``a/``, ``/x/a``, a symbolic link to it, ``s3://b//a/``,
``file:///x/a``, ``simplecache::s3://b/a``) have one :func:`canonical_location`: local paths are
resolved with every symbolic link followed; remote URLs keep the protocol of their storage layer
and a normalised path (no empty or ``.`` components, no trailing slash). A checkpoint named by its
``model.safetensors`` or index file is the folder holding it.

The rules of :func:`check_locations` (a merge writes ``OUTPUT/versions/<id>/``, ``OUTPUT/latest.json``,
the lock, and its artefacts under the work folder; retention and ``swudi gc`` delete there):

- the same checkpoint is never listed twice, and the base is never an expert;
- the output and the work folder are never a checkpoint folder or inside one (a publish would write
  into the inputs);
- an input inside what a merge writes under the output (``versions/``, ``sweeps/``, ``latest.json``
  and dot-files such as the lock and the default work folder) is allowed only as a published
  version (``OUTPUT/versions/<id>/...``, also under ``OUTPUT/sweeps/``; locally its manifest must
  exist): versions are never rewritten, and retention keeps a version that a running merge reads
  (:mod:`swudi.publish.readers`). Elsewhere under the output (``s3://bucket/models/base`` with
  ``output: s3://bucket``) nothing is ever written or deleted, so it is allowed. Any input inside
  the work folder is refused.

Different storage protocols never overlap; two remote URLs are compared by bucket and key alone
(the endpoint is not part of the location), which errs on the side of refusing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from swudi.errors import ConfigError

__all__ = ["canonical_location", "check_locations", "is_inside", "published_version_of"]

_CHECKPOINT_FILES = ("model.safetensors", "model.safetensors.index.json")
_REMOTE_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs"}
#: ``.../versions/<id>`` (optionally ``.../sweeps/<sweep>/<point>/versions/<id>``) and below
_VERSION_PATH = re.compile(r"^(?P<root>.*?)/versions/(?P<version>[A-Za-z0-9][A-Za-z0-9._-]*)(?:/.*)?$")


def canonical_location(url: str) -> str:
    """One spelling per place: ``/abs/path`` for local files (links followed), ``proto://path`` else."""
    last = url.rsplit("::", 1)[-1]
    protocol, sep, rest = last.partition("://")
    if not sep or protocol in ("file", "local"):
        path = os.path.realpath(os.path.expanduser(rest if sep else last))
        if os.path.basename(path) in _CHECKPOINT_FILES and os.path.isfile(path):
            path = os.path.dirname(path)
        return path
    protocol = _REMOTE_ALIASES.get(protocol.lower(), protocol.lower())
    parts = [p for p in rest.split("/") if p not in ("", ".")]
    normal: list[str] = []
    for part in parts:
        if part == "..":
            if normal[1:]:  # never above the bucket
                normal.pop()
            continue
        normal.append(part)
    if normal and normal[-1] in _CHECKPOINT_FILES:
        normal.pop()
    return f"{protocol}://{'/'.join(normal)}"


def is_inside(location: str, folder: str) -> bool:
    """True when canonical ``location`` is ``folder`` or below it."""
    return location == folder or location.startswith(folder.rstrip("/") + "/")


def published_version_of(location: str, output: str) -> str | None:
    """The version id when canonical ``location`` lies in a published version folder of ``output``
    (``OUTPUT/versions/<id>/``, or one of its sweeps' outputs), else None."""
    if not is_inside(location, output) or location == output:
        return None
    relative = location[len(output.rstrip("/")) :]
    match = _VERSION_PATH.match(relative)
    if match is None:
        return None
    root = match.group("root")
    if root and not re.fullmatch(r"/sweeps/[^/]+/[^/]+", root):
        return None
    return match.group("version")


def check_locations(base: str, experts: Sequence[str], output: str, work_dir: str) -> None:
    """Refuse a merge whose inputs repeat or overlap its output or work folder (module doc).

    Raises :class:`ConfigError` naming the keys at fault and the location they share.
    """
    inputs = [("base", base), *((f"experts[{i}]", url) for i, url in enumerate(experts))]
    canon = [(key, url, canonical_location(url)) for key, url in inputs]
    seen: dict[str, tuple[str, str]] = {}
    for key, url, where in canon:
        if where in seen:
            first_key, first_url = seen[where]
            what = "the base is also listed as an expert" if first_key == "base" else "the same expert is listed twice"
            raise ConfigError(
                f"{what}: {first_key} {first_url!r} and {key} {url!r} are one checkpoint ({where}); "
                "list each checkpoint once"
            )
        seen[where] = (key, url)
    out = canonical_location(output)
    work = canonical_location(work_dir)
    for key, url, where in canon:
        for target_key, target in (("output", out), ("work_dir", work)):
            if is_inside(target, where):
                raise ConfigError(
                    f"{target_key} {target} is the checkpoint folder of {key} ({url!r}) or inside it: "
                    f"publishing would write into an input; choose another {target_key}, outside every checkpoint"
                )
        if is_inside(where, work):
            raise ConfigError(
                f"{key} {url!r} lies inside the work folder {work}, whose files `swudi gc` deletes; "
                "move the checkpoint out of it"
            )
        if _written_by_merges(where, out) and not _is_published_version(where, out):
            raise ConfigError(
                f"{key} {url!r} lies inside the output {out} where merges write, but is not a published "
                "version (OUTPUT/versions/<id>/ with its manifest): a publish could overwrite it; move it"
            )


#: First components under an output that merges write (versions, sweeps, the pointer, dot-files).
_WRITTEN = ("versions", "sweeps", "latest.json")


def _written_by_merges(location: str, output: str) -> bool:
    if location == output or not is_inside(location, output):
        return False
    first = location[len(output.rstrip("/")) + 1 :].split("/", 1)[0]
    return first in _WRITTEN or first.startswith(".")


def _is_published_version(location: str, output: str) -> bool:
    version = published_version_of(location, output)
    if version is None:
        return False
    if "://" in location:  # remote: the path form is checked here, the manifest when the merge runs
        return True
    head = location[: location.index(f"/versions/{version}") + len(f"/versions/{version}")]
    return os.path.isfile(os.path.join(head, "swudi_version.json"))
