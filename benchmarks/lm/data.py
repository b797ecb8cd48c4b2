"""Text domains for the language-model benchmark, read from files that Debian and the virtual
environment install (no download at run time).

Every domain is a list of *documents* (one man page, one source file, one package description, one
WordNet synset gloss, one fortune), read in a sorted, fixed order. The split is by document and
depends only on the document's text and the split seed::

    bucket(doc) = sha256(f"{seed}:{text}") mod 1000
    test: bucket < 100,  val: 100 <= bucket < 150,  train: the rest

so a document never appears in two splits, and adding a document elsewhere never moves another.
Each split is then capped at a character budget (train ``max_train_chars``, val/test
``max_eval_chars``), taking documents in ``sha256`` order (a seeded shuffle that does not depend on
the reading order). ``DomainData.fingerprint`` is a digest of every split.

Domains (>= 5 are needed; all six are used by default):

| name | documents |
|---|---|
| ``man`` | English man pages ``/usr/share/man/man[1-8]/*.gz``, roff macros stripped to text |
| ``python`` | ``.py`` files of the interpreter's site-packages (``sysconfig`` purelib), ``crc32(path) % 8 == 0`` |
| ``c`` | C headers ``/usr/include/**/*.h`` |
| ``debian`` | package descriptions of the apt lists ``/var/lib/apt/lists/*Packages.lz4`` (``lz4`` binary) |
| ``wordnet`` | WordNet glosses ``lemma: definition`` (``benchmarks.retention.data.wordnet_synsets``) |
| ``fortunes`` | every fortune of ``/usr/share/games/fortunes`` (``benchmarks.retention.data.clean_fortune``) |
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import re
import subprocess
import sysconfig
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.retention.data import FORTUNES_DIR, MissingDataError, clean_fortune, wordnet_synsets

MAN_DIR = Path(os.environ.get("SWUDI_MAN_DIR", "/usr/share/man"))
INCLUDE_DIR = Path(os.environ.get("SWUDI_INCLUDE_DIR", "/usr/include"))
APT_LISTS_DIR = Path(os.environ.get("SWUDI_APT_LISTS_DIR", "/var/lib/apt/lists"))

SPLITS = ("train", "val", "test")
MAX_TRAIN_CHARS = 1_500_000
MAX_EVAL_CHARS = 60_000
MAX_DOC_CHARS = 12_000  # longer documents are cut (one huge header must not fill a split)
MIN_DOC_CHARS = 20
DATA_VERSION = 1  # bump when a reader changes what it produces


@dataclass(frozen=True)
class DomainData:
    """The documents of one domain, split by document."""

    name: str
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def split(self, name: str) -> tuple[str, ...]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return tuple(getattr(self, name))

    @functools.cached_property
    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps([self.name, DATA_VERSION]).encode())
        for s in SPLITS:
            h.update(json.dumps([s, list(self.split(s))]).encode())
        return h.hexdigest()[:16]

    def summary(self) -> dict:
        return {
            "domain": self.name,
            **{f"docs_{s}": len(self.split(s)) for s in SPLITS},
            **{f"chars_{s}": sum(map(len, self.split(s))) for s in SPLITS},
            "fingerprint": self.fingerprint,
        }


# ---------------------------------------------------------------------------------------------
# Readers: each returns the domain's documents in a fixed order
# ---------------------------------------------------------------------------------------------

_ROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes \fB \fI \fR \fP \f(CW \f[B]
    (re.compile(r"\\s[+-]?\d"), ""),  # size changes
    (re.compile(r"\\[/,&|^%:]"), ""),  # italic corrections, zero-width, hyphenation points
    (re.compile(r"\\\((em|en)"), "--"),
    (re.compile(r"\\\(aq"), "'"),
    (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\((bu|ci)"), "*"),
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),  # other special characters
    (re.compile(r"\\[*n]\(..|\\[*n].|\\[*n]\[[^\]]*\]"), ""),  # strings and registers
    (re.compile(r"\\-"), "-"),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\ "), " "),
    (re.compile(r'\\".*$', re.M), ""),  # comments
]
_KEEP_ARGS = {
    "SH",
    "SS",
    "B",
    "I",
    "BR",
    "IR",
    "RB",
    "RI",
    "BI",
    "IB",
    "SM",
    "SB",
    "IP",
    "TP",
    "UR",
    "MT",
    "Nm",
    "Nd",
    "Fl",
    "Ar",
    "Op",
    "Sh",
    "Ss",
    "It",
    "Pa",
    "Xr",
    "Dv",
    "Ev",
    "Fn",
    "Ft",
    "Va",
    "Cm",
    "Em",
}


def strip_roff(source: str) -> str:
    """Man-page roff to plain text: request lines keep their arguments when the request only sets
    a font or a heading (``.SH NAME`` -> ``NAME``), other requests are dropped, escapes are removed
    or replaced by their character, blank runs are collapsed."""
    out = []
    for line in source.splitlines():
        if line.startswith((".", "'")):
            parts = line[1:].strip().split(None, 1)
            if not parts or parts[0] not in _KEEP_ARGS or len(parts) < 2:
                continue
            line = parts[1].replace('"', "")
        for pattern, repl in _ROFF_ESCAPES:
            line = pattern.sub(repl, line)
        line = line.replace("\\", "")
        out.append(line.rstrip())
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _need(path: Path, package: str) -> Path:
    if not path.exists():
        raise MissingDataError(
            f"{path} not found: it is shipped by the Debian package '{package}' (apt-get install -y {package})."
        )
    return path


def read_man() -> list[str]:
    files = sorted(p for p in _need(MAN_DIR, "man-db").glob("man[1-8]/*.gz") if p.is_file())
    docs = []
    for path in files:
        try:
            raw = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        except (OSError, EOFError):
            continue
        if raw.lstrip().startswith(".so "):  # a link to another page
            continue
        docs.append(strip_roff(raw))
    return docs


def python_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["purelib"])
    files = sorted(p for p in root.rglob("*.py") if p.is_file())
    return [p for p in files if zlib.crc32(str(p.relative_to(root)).encode()) % 8 == 0]


def read_python() -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in python_files()]


def read_c() -> list[str]:
    files = sorted(p for p in _need(INCLUDE_DIR, "libc6-dev").rglob("*.h") if p.is_file())
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def read_debian() -> list[str]:
    """``Package: name`` + ``Description:`` (synopsis and long description, continuation lines
    unindented, ``.`` paragraph marks as blank lines) of every stanza, de-duplicated by package."""
    lists = sorted(APT_LISTS_DIR.glob("*Packages.lz4"))
    if not lists:
        raise MissingDataError(f"no *Packages.lz4 under {APT_LISTS_DIR}: run `apt-get update`")
    seen: dict[str, str] = {}
    for path in lists:
        try:
            raw = subprocess.run(["lz4", "-dc", str(path)], capture_output=True, check=True).stdout
        except FileNotFoundError:
            raise MissingDataError("the `lz4` program is needed to read the apt lists (apt-get install lz4)") from None
        for stanza in raw.decode("utf-8", errors="replace").split("\n\n"):
            name = re.search(r"^Package: (.+)$", stanza, re.M)
            desc = re.search(r"^Description: (.*(?:\n .*)*)", stanza, re.M)
            if not name or not desc or name.group(1) in seen:
                continue
            lines = desc.group(1).split("\n")
            body = [line[1:] if line.strip() != "." else "" for line in lines[1:]]
            seen[name.group(1)] = "\n".join([f"{name.group(1)}: {lines[0]}", *body]).strip()
    return [seen[k] for k in sorted(seen)]


def read_wordnet() -> list[str]:
    return [s.text for pos in ("noun", "verb", "adj", "adv") for s in wordnet_synsets(pos)]


def read_fortunes() -> list[str]:
    files = sorted(p for p in _need(FORTUNES_DIR, "fortunes").iterdir() if p.is_file() and "." not in p.name)
    docs = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        docs += [clean_fortune(e) for e in re.split(r"^%\s*$", text, flags=re.M)]
    return docs


READERS: dict[str, Callable[[], list[str]]] = {
    "man": read_man,
    "python": read_python,
    "c": read_c,
    "debian": read_debian,
    "wordnet": read_wordnet,
    "fortunes": read_fortunes,
}
DEFAULT_DOMAINS = tuple(READERS)


def _bucket(seed: int, text: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{text}".encode()).digest()[:8], "big") % 1000


def split_documents(
    name: str,
    docs: Sequence[str],
    *,
    seed: int = 0,
    max_train_chars: int = MAX_TRAIN_CHARS,
    max_eval_chars: int = MAX_EVAL_CHARS,
) -> DomainData:
    """Split ``docs`` by document (see the module docstring); identical texts count once."""
    unique = sorted({d[:MAX_DOC_CHARS] for d in docs if len(d.strip()) >= MIN_DOC_CHARS})
    order = sorted(unique, key=lambda d: hashlib.sha256(f"order:{seed}:{d}".encode()).digest())
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    used = dict.fromkeys(SPLITS, 0)
    for doc in order:
        b = _bucket(seed, doc)
        split = "test" if b < 100 else "val" if b < 150 else "train"
        cap = max_train_chars if split == "train" else max_eval_chars
        if used[split] >= cap:
            continue
        parts[split].append(doc)
        used[split] += len(doc)
    return DomainData(name, tuple(parts["train"]), tuple(parts["val"]), tuple(parts["test"]))


@functools.lru_cache(maxsize=16)
def load_domain(
    name: str, *, seed: int = 0, max_train_chars: int = MAX_TRAIN_CHARS, max_eval_chars: int = MAX_EVAL_CHARS
) -> DomainData:
    """Read and split the domain ``name`` (deterministic for a given machine and seed)."""
    try:
        reader = READERS[name]
    except KeyError:
        raise ValueError(f"unknown domain {name!r}; known: {', '.join(READERS)}") from None
    return split_documents(name, reader(), seed=seed, max_train_chars=max_train_chars, max_eval_chars=max_eval_chars)


def main() -> None:  # python -m benchmarks.lm.data: print the domain table
    for name in DEFAULT_DOMAINS:
        print(json.dumps(load_domain(name).summary()))


if __name__ == "__main__":
    main()
