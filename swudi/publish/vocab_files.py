"""The non-weight files of a merged model whose experts extend the vocabulary: the output tokenizer
(every tokenizer file of the chosen expert, :class:`swudi.io.vocab.VocabPlan`) and the base's
``config.json`` with ``vocab_size`` set to the merged model's rows."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from swudi.config.merge_config import MergeConfig
from swudi.io.checkpoint import Checkpoint
from swudi.io.vocab import TOKENIZER_FILES, VocabPlan
from swudi.io.writer import copy_extra_files
from swudi.storage.filesystem import join_url, resolve, write_bytes_atomic

__all__ = ["write_vocab_files"]

log = logging.getLogger(__name__)


def write_vocab_files(
    vocab: VocabPlan,
    expert_urls: Sequence[str],
    base: Checkpoint,
    names: Sequence[str],
    version_url: str,
    config: MergeConfig,
) -> list[str]:
    """Write the output tokenizer and ``config.json`` into ``version_url``; return the base's other
    file names (of ``names``), which the caller copies as they are."""
    rest = [n for n in names if n != "config.json"]
    if vocab.tokenizer_expert is not None:
        expert = Checkpoint.open(expert_urls[vocab.tokenizer_expert], config.storage_options)
        files = [n for n in expert.extra_files if n in TOKENIZER_FILES]
        copy_extra_files(expert, version_url, config.storage_options, names=files)
        rest = [n for n in rest if n not in TOKENIZER_FILES]
        log.info("tokenizer files %s from %s", files, expert.url)
    if "config.json" in names:
        fs, path = resolve(base.file_url("config.json"), base.storage_options)
        model_config = json.loads(fs.cat_file(path))
        holder = model_config if "vocab_size" in model_config else model_config.get("text_config", model_config)
        holder["vocab_size"] = vocab.rows
        write_bytes_atomic(
            join_url(version_url, "config.json"),
            (json.dumps(model_config, indent=2, sort_keys=True) + "\n").encode(),
            config.storage_options,
        )
    return rest
