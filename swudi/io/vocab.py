"""Vocab-extended experts: experts whose embeddings / lm_head have more rows than the base's.

Decided from headers and tokenizer files alone (no tensor is read, no network):

- Vocab tensors: the base tensors whose name has a vocab module component (:data:`VOCAB_MODULES`:
  ``embed_tokens``, ``lm_head``, ``wte``, ``word_embeddings``, ``shared``...) and whose first
  dimension is the base config's ``vocab_size`` (any first dimension when the base has no
  ``config.json``). Only these may have more rows in an expert; every vocab tensor of one expert
  has the same number of rows V_i.
- Tokenizers (``tokenizer.json``: the model's vocab and ``added_tokens``; ``tokenizer_config.json``'s
  ``added_tokens_decoder``; ``added_tokens.json``) map id -> token. When an expert has more rows
  than the base, the base and every expert with a tokenizer must have one that extends the base's:
  the base's ids name the base's tokens, and the others come after the base's last id. Two experts
  that append the same token at the same id agree; another token at that id, or that token at
  another id, is refused (one line naming the expert, the id and both tokens).
- Rows of the output (V = max_i V_i rows): rows < V0 (the base's) are merged as every other tensor
  is; an appended row r >= V0 that a tokenizer names is the mean of that row over the experts whose
  tokenizer names it (their row values: the base has no row to take a task vector from); a padding
  row no tokenizer names is the row of the first expert that has it.
- The output tokenizer is that of the expert whose tokenizer has the most tokens; it must name every
  appended token, else the merge is refused.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from swudi.errors import InputError
from swudi.io.adapter import LoraAdapter
from swudi.io.checkpoint import Checkpoint, TensorLocation
from swudi.storage.filesystem import resolve

__all__ = [
    "VOCAB_MODULES",
    "TOKENIZER_FILES",
    "ExpertVocab",
    "VocabPlan",
    "base_vocab_size",
    "vocab_tensor_names",
    "read_token_ids",
    "plan_vocab",
]

log = logging.getLogger(__name__)

#: Module names whose weights have one row per token.
VOCAB_MODULES = (
    "embed_tokens",
    "lm_head",
    "wte",
    "word_embeddings",
    "shared",
    "embed_out",
    "embed_in",
    "tok_embeddings",
)
_VOCAB_NAME = re.compile(rf"(^|\.)({'|'.join(VOCAB_MODULES)})(\.|$)")

#: Files that make up a tokenizer: the output takes them all from one checkpoint.
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "tokenizer.model",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "spiece.model",
        "sentencepiece.bpe.model",
        "chat_template.jinja",
        "chat_template.json",
    }
)


@dataclass(frozen=True)
class ExpertVocab:
    """One expert's part in the output vocabulary."""

    rows: int  # V_i: rows of its vocab tensors
    appended: int  # tokens its tokenizer appends past the base's rows
    padding: int  # padding rows taken from it (rows no tokenizer names, it being the first to have them)


@dataclass(frozen=True)
class VocabPlan:
    """How the rows of the vocab tensors are made, when an expert has more rows than the base.

    ``sources[k]``: the experts whose rows ``V0 + k`` are averaged (one expert for a padding row);
    ``named[k]``: whether a tokenizer names row ``V0 + k``; ``locations``: per vocab tensor, each
    expert's whole tensor (None: an expert without rows past the base's).
    """

    base_rows: int
    rows: int
    tensors: tuple[str, ...]
    sources: tuple[tuple[int, ...], ...]
    named: tuple[bool, ...]
    tokenizer_expert: int | None  # whose tokenizer files the output gets (None: the base's)
    experts: tuple[ExpertVocab, ...]
    locations: tuple[tuple[str, tuple[TensorLocation | None, ...]], ...]

    def location(self, name: str, expert: int) -> TensorLocation | None:
        return dict(self.locations)[name][expert]

    def describe(self, expert_urls: Sequence[str]) -> dict[str, Any]:
        """A JSON-able summary for ``swudi plan``: rows merged, appended and padding, per expert."""
        return {
            "base_rows": self.base_rows,
            "rows": self.rows,
            "tensors": list(self.tensors),
            "rows_merged": self.base_rows,
            "rows_appended": sum(self.named),
            "rows_padding": len(self.named) - sum(self.named),
            "tokenizer_from": "base" if self.tokenizer_expert is None else expert_urls[self.tokenizer_expert],
            "experts": [
                {"url": url, "rows": e.rows, "appended_tokens": e.appended, "padding_rows_taken": e.padding}
                for url, e in zip(expert_urls, self.experts, strict=True)
            ],
        }


def _read_json(checkpoint: Checkpoint, name: str) -> Any:
    url = checkpoint.file_url(name)
    fs, path = resolve(url, checkpoint.storage_options)
    try:
        return json.loads(fs.cat_file(path))
    except ValueError as error:
        raise InputError(f"{url}: not valid JSON ({error})") from None


def base_vocab_size(base: Checkpoint) -> int | None:
    """``vocab_size`` of the base's ``config.json`` (or of its ``text_config``), None without one."""
    if "config.json" not in base.extra_files:
        return None
    config = _read_json(base, "config.json")
    if not isinstance(config, dict):
        return None
    size = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def vocab_tensor_names(base: Checkpoint, vocab_size: int | None) -> frozenset[str]:
    """The base tensors with one row per token (see the module docstring)."""
    return frozenset(
        name
        for name, loc in base.tensors.items()
        if _VOCAB_NAME.search(name) and loc.shape and (vocab_size is None or loc.shape[0] == vocab_size)
    )


def read_token_ids(checkpoint: Checkpoint) -> dict[int, str] | None:
    """id -> token of the checkpoint's tokenizer (None when it has no ``tokenizer.json``)."""
    if "tokenizer.json" not in checkpoint.extra_files:
        return None
    source = checkpoint.file_url("tokenizer.json")
    data = _read_json(checkpoint, "tokenizer.json")
    vocab = (data.get("model") or {}).get("vocab") if isinstance(data, dict) else None
    ids: dict[int, str] = {}
    if isinstance(vocab, dict):
        ids.update({int(i): str(token) for token, i in vocab.items()})
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], the id is the position
        ids.update({i: str(entry[0]) for i, entry in enumerate(vocab)})
    else:
        raise InputError(f"{source}: no model.vocab (a tokenizers-library tokenizer.json is needed)")
    for entry in data.get("added_tokens") or []:
        ids[int(entry["id"])] = str(entry["content"])
    if "tokenizer_config.json" in checkpoint.extra_files:
        config = _read_json(checkpoint, "tokenizer_config.json")
        decoder = config.get("added_tokens_decoder") if isinstance(config, dict) else None
        for i, entry in (decoder or {}).items():
            ids[int(i)] = str(entry["content"])
    if "added_tokens.json" in checkpoint.extra_files:
        for token, i in _read_json(checkpoint, "added_tokens.json").items():
            ids[int(i)] = str(token)
    return ids


def _expert_rows(expert: Checkpoint, names: frozenset[str], base_rows: int) -> int:
    """V_i: the rows of the expert's vocab tensors (refused when they differ between tensors)."""
    rows = {name: expert.tensors[name].shape[0] for name in sorted(names) if name in expert.tensors}
    if len(set(rows.values())) > 1:
        shown = ", ".join(f"{name} {n}" for name, n in rows.items())
        raise InputError(f"{expert.url}: vocab tensors have different numbers of rows ({shown})")
    return next(iter(rows.values()), base_rows)


def plan_vocab(
    base: Checkpoint, experts: Sequence[Checkpoint | LoraAdapter], names: frozenset[str]
) -> VocabPlan | None:
    """The vocab plan (see the module docstring), None when no expert has more rows than the base.

    Raises :class:`InputError` (one line) for a tokenizer that does not extend the base's, two
    experts that disagree on an appended token, a row count no tokenizer explains, or no expert
    tokenizer that names every appended token.
    """
    if not names:
        return None
    base_rows = base.tensors[min(names)].shape[0]
    rows = [_expert_rows(e, names, base_rows) if isinstance(e, Checkpoint) else base_rows for e in experts]
    if max(rows) <= base_rows:
        return None
    base_ids = read_token_ids(base)
    if base_ids is None:
        raise InputError(
            f"{base.url}: has no tokenizer.json; experts with more vocab rows than the base need the base's "
            "tokenizer to tell appended tokens from padding"
        )
    last_base_id = max(base_ids, default=-1)
    appended: dict[int, tuple[str, int]] = {}  # id -> (token, first expert naming it)
    by_token: dict[str, tuple[int, int]] = {}  # token -> (id, first expert)
    tokenizers: dict[int, dict[int, str]] = {}
    for i, expert in enumerate(experts):
        ids = read_token_ids(expert) if isinstance(expert, Checkpoint) else None
        if ids is None:
            if rows[i] > base_rows:
                raise InputError(
                    f"{expert.url}: has {rows[i]} vocab rows (the base {base_rows}) but no tokenizer.json naming them"
                )
            continue
        tokenizers[i] = ids
        for token_id, token in base_ids.items():
            if ids.get(token_id) != token:
                raise InputError(
                    f"{expert.url}: token id {token_id} is {ids.get(token_id)!r}, the base's is {token!r}: "
                    "its tokenizer does not extend the base's"
                )
        for token_id in sorted(set(ids) - set(base_ids)):
            token = ids[token_id]
            if token_id <= last_base_id:
                raise InputError(
                    f"{expert.url}: token {token!r} at id {token_id} is not after the base's tokens (last id "
                    f"{last_base_id}): its tokenizer does not extend the base's"
                )
            if token_id >= rows[i]:
                raise InputError(f"{expert.url}: token {token!r} has id {token_id} but the expert has {rows[i]} rows")
            if token_id in appended and appended[token_id][0] != token:
                other, j = appended[token_id]
                raise InputError(
                    f"{expert.url}: appended token id {token_id} is {token!r}, but {experts[j].url} has {other!r} there"
                )
            if token in by_token and by_token[token][0] != token_id:
                other_id, j = by_token[token]
                raise InputError(
                    f"{expert.url}: appended token {token!r} has id {token_id}, but {experts[j].url} has it at "
                    f"id {other_id}"
                )
            appended.setdefault(token_id, (token, i))
            by_token.setdefault(token, (token_id, i))
    tokenizer_expert = _output_tokenizer(experts, tokenizers, appended)
    total = max(rows)
    sources: list[tuple[int, ...]] = []
    named: list[bool] = []
    padding = [0] * len(experts)
    for row in range(base_rows, total):
        if row in appended:
            token = appended[row][0]
            sources.append(tuple(i for i, ids in sorted(tokenizers.items()) if ids.get(row) == token))
            named.append(True)
        else:
            first = next(i for i, n in enumerate(rows) if n > row)
            sources.append((first,))
            named.append(False)
            padding[first] += 1
    counts = [sum(1 for t in tokenizers.get(i, {}) if t >= base_rows) for i in range(len(experts))]
    locations = tuple(
        (
            name,
            tuple(
                e.tensors[name] if isinstance(e, Checkpoint) and rows[i] > base_rows else None
                for i, e in enumerate(experts)
            ),
        )
        for name in sorted(names)
    )
    plan = VocabPlan(
        base_rows,
        total,
        tuple(sorted(names)),
        tuple(sources),
        tuple(named),
        tokenizer_expert,
        tuple(ExpertVocab(r, c, p) for r, c, p in zip(rows, counts, padding, strict=True)),
        locations,
    )
    log.info(
        "vocab: %d base rows merged, %d appended token rows, %d padding rows (output %d rows, tokenizer of %s)",
        base_rows,
        sum(named),
        len(named) - sum(named),
        total,
        "the base" if tokenizer_expert is None else experts[tokenizer_expert].url,
    )
    return plan


def _output_tokenizer(
    experts: Sequence[Checkpoint | LoraAdapter],
    tokenizers: Mapping[int, dict[int, str]],
    appended: Mapping[int, tuple[str, int]],
) -> int | None:
    """The expert whose tokenizer has the most tokens (the first of equals); it must name every
    appended token. None when no tokenizer appends any (the base's tokenizer is kept)."""
    if not appended:
        return None
    best = max(tokenizers, key=lambda i: (len(tokenizers[i]), -i))
    ids = tokenizers[best]
    for token_id, (token, j) in sorted(appended.items()):
        if ids.get(token_id) != token:
            raise InputError(
                f"no single expert tokenizer holds every appended token: {experts[best].url} (the largest, "
                f"{len(ids)} tokens) lacks {token!r} at id {token_id} (appended by {experts[j].url})"
            )
    return best
