"""Evaluation files of the built-in evaluators: text or JSON Lines at local paths or fsspec URLs.

- ``*.jsonl``: one JSON object per line (blank lines skipped); each object's field ``column`` is one
  document (a string). A line that is not a JSON object, or lacks the field, or holds a non-string
  there, is an :class:`InputError` naming the file and the line number (1-based).
- any other name: UTF-8 text, the whole file one document.

An empty file (no document, or only empty documents) is an :class:`InputError`. The task of a file
is its name without the last suffix (``s3://b/eval/wiki.jsonl`` -> ``wiki``); two files with the
same task name are a :class:`ConfigError`.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

from swudi.errors import ConfigError, InputError
from swudi.storage.filesystem import resolve, url_name

__all__ = ["read_documents", "read_records", "task_names", "check_files"]


def task_names(files: Sequence[str]) -> list[str]:
    """One task name per file: the file name without its last suffix; refused when two coincide."""
    names = [posixpath.splitext(url_name(url))[0] or url_name(url) for url in files]
    seen: dict[str, str] = {}
    for url, name in zip(files, names, strict=True):
        if name in seen:
            raise ConfigError(f"evaluation files {seen[name]} and {url} give the same task name {name!r}; rename one")
        seen[name] = url
    return names


def check_files(files: Any) -> list[str]:
    """The ``files`` option as a list of URLs: a non-empty list of non-empty strings."""
    if isinstance(files, str):
        files = [files]
    if not isinstance(files, (list, tuple)) or not files or not all(isinstance(f, str) and f.strip() for f in files):
        raise ConfigError(f"evaluator option files must be a non-empty list of file paths or URLs, got {files!r}")
    return [f.strip() for f in files]


def _read_text(url: str, storage_options: Mapping[str, Any] | None) -> str:
    fs, path = resolve(url, storage_options)
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        raise InputError(f"evaluation file {url} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"evaluation file {url} is a folder, expected a text or .jsonl file") from None
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"evaluation file {url} is not UTF-8 text ({error})") from None


def _is_jsonl(url: str) -> bool:
    return url_name(url).lower().endswith(".jsonl")


def read_records(
    url: str, columns: Sequence[str], storage_options: Mapping[str, Any] | None = None
) -> list[tuple[int, dict[str, Any]]]:
    """``[(line number, object)]`` of a ``.jsonl`` file, each object holding every one of ``columns``."""
    if not _is_jsonl(url):
        raise InputError(f"evaluation file {url} must be JSON Lines (a name ending in .jsonl)")
    records = []
    for number, line in enumerate(_read_text(url, storage_options).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise InputError(f"{url} line {number}: not JSON ({error})") from None
        if not isinstance(record, dict):
            raise InputError(f"{url} line {number}: expected a JSON object, got {type(record).__name__}")
        missing = [c for c in columns if c not in record]
        if missing:
            raise InputError(f"{url} line {number}: no field {missing[0]!r} (fields: {', '.join(sorted(record))})")
        records.append((number, record))
    if not records:
        raise InputError(f"evaluation file {url} is empty (no JSON line)")
    return records


def read_documents(url: str, column: str = "text", storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The documents of one evaluation file, in file order (module docstring)."""
    if _is_jsonl(url):
        documents = []
        for number, record in read_records(url, [column], storage_options):
            value = record[column]
            if not isinstance(value, str):
                raise InputError(f"{url} line {number}: field {column!r} is {type(value).__name__}, expected a string")
            documents.append(value)
    else:
        documents = [_read_text(url, storage_options)]
    if not any(documents):
        raise InputError(f"evaluation file {url} is empty (no text)")
    return documents
