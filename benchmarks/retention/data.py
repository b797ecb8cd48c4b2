"""Text-classification tasks built from data that Debian packages install (no download at run time).

Every task is a pure function of files under ``/usr/share`` plus a seed: the pool of labelled
texts is read, de-duplicated (a text seen with two labels is dropped), sorted, shuffled with
``random.Random(seed)`` and cut into disjoint test / val / train splits:

    n_test = min(max_test, n // 5),  n_val = min(max_val, n // 10),  n_train = min(max_train, rest)

Tasks marked ``balanced`` first cap every class at ``ceil(cap / n_classes)`` examples (cap =
max_train + max_val + max_test) so that no class dominates. ``TaskData.fingerprint`` is a digest of
the labels and of every split; heads record it so that an evaluation on different data (say, another
Debian release of WordNet) is caught instead of silently compared.

The Debian packages to install are listed in ``requirements-apt.txt`` beside this file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

WORDNET_DIR = Path(os.environ.get("SWUDI_WORDNET_DIR", "/usr/share/wordnet"))
FORTUNES_DIR = Path(os.environ.get("SWUDI_FORTUNES_DIR", "/usr/share/games/fortunes"))
DICT_DIR = Path(os.environ.get("SWUDI_DICT_DIR", "/usr/share/dict"))
MAN_DIR = Path(os.environ.get("SWUDI_MAN_DIR", "/usr/share/man"))
APT_LISTS_DIR = Path(os.environ.get("SWUDI_APT_LISTS_DIR", "/var/lib/apt/lists"))
SOURCE_DIRS = {  # label -> (folder, glob, Debian package)
    "c": (Path(os.environ.get("SWUDI_C_INCLUDE_DIR", "/usr/include")), "*.h", "libc6-dev"),
    "c++": (Path(os.environ.get("SWUDI_CXX_INCLUDE_DIR", "/usr/include/c++/12")), "**/*", "libstdc++-12-dev"),
    "python": (Path(os.environ.get("SWUDI_PYTHON_LIB_DIR", "/usr/lib/python3.11")), "*.py",
               "libpython3.11-stdlib"),
    "perl": (Path(os.environ.get("SWUDI_PERL_LIB_DIR", "/usr/share/perl/5.36")), "**/*.pm", "perl-modules-5.36"),
}

MAX_TRAIN = 4000
MAX_VAL = 500
MAX_TEST = 1000
SPLITS = ("train", "val", "test")

# Bump when a loader changes what it produces, so cached experts are rebuilt.
DATA_VERSION = 3  # 3: man_section, package_section, source_line added


class MissingDataError(FileNotFoundError):
    """A task's source file is absent: the message names the Debian package that ships it."""


@dataclass(frozen=True)
class Split:
    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class TaskData:
    name: str
    label_names: tuple[str, ...]
    train: Split
    val: Split
    test: Split

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    def majority_baseline(self, split: str = "test") -> float:
        """Accuracy of always answering the most frequent *training* label on ``split``."""
        top = Counter(self.train.labels).most_common(1)[0][0]
        labels = self.split(split).labels
        return sum(y == top for y in labels) / len(labels)

    @functools.cached_property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([self.name, DATA_VERSION, list(self.label_names)]).encode())
        for split in SPLITS:
            s = self.split(split)
            h.update(json.dumps([split, list(s.texts), list(s.labels)]).encode())
        return h.hexdigest()[:16]

    def summary(self) -> dict:
        return {
            "task": self.name,
            "classes": self.num_classes,
            **{f"n_{s}": len(self.split(s)) for s in SPLITS},
            "majority_test": round(self.majority_baseline("test"), 4),
            "fingerprint": self.fingerprint,
        }


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    packages: tuple[str, ...]
    load_pool: Callable[[], list[tuple[str, str]]]
    balanced: bool = False


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------


def _need(path: Path, package: str) -> Path:
    if not path.exists():
        raise MissingDataError(
            f"{path} not found: it is shipped by the Debian package '{package}'. "
            f"Install it with `apt-get install -y {package}` "
            "(all packages: benchmarks/retention/requirements-apt.txt)."
        )
    return path


_LEXNAMES = (  # noqa: SIM905 - one string reads as lexnames(5WN) lists them
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()  # index = lex_filenum, see lexnames(5WN)


@dataclass(frozen=True)
class Synset:
    offset: str
    pos: str  # n v a r ("s" satellites folded into "a")
    lexname: str
    lemmas: tuple[str, ...]
    definition: str
    pointers: tuple[tuple[str, str, str], ...]  # (symbol, offset, pos)

    @property
    def text(self) -> str:
        """``"lemma: definition"`` -- the input every WordNet task classifies."""
        return f"{self.lemmas[0]}: {self.definition}"


@functools.cache
def wordnet_synsets(pos: str) -> tuple[Synset, ...]:
    """Parse ``data.<pos>`` (wndb(5WN) format) for pos in noun, verb, adj, adv."""
    path = _need(WORDNET_DIR / f"data.{pos}", "wordnet-base")
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):  # licence header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            n_words = int(fields[3], 16)
            lemmas = tuple(
                re.sub(r"\(\w+\)$", "", w).replace("_", " ") for w in fields[4 : 4 + 2 * n_words : 2]
            )
            i = 4 + 2 * n_words
            n_ptr = int(fields[i])
            ptrs = tuple(
                (fields[i + 1 + 4 * k], fields[i + 2 + 4 * k], fields[i + 3 + 4 * k].replace("s", "a"))
                for k in range(n_ptr)
            )
            # The gloss is a definition followed by optional quoted examples; keep the definition.
            definition = gloss.strip().split('; "')[0].strip().rstrip(";").strip()
            # Drop a leading usage label such as "(chemistry)": it would give away wn_domain.
            definition = re.sub(r"^(\([^)]*\)\s*)+", "", definition)
            ss_pos = fields[2].replace("s", "a")
            out.append(Synset(fields[0], ss_pos, _LEXNAMES[int(fields[1])], lemmas, definition, ptrs))
    return tuple(out)


def _wn_category(pos: str) -> list[tuple[str, str]]:
    return [(s.text, s.lexname.split(".", 1)[1]) for s in wordnet_synsets(pos)]


def _wn_pos() -> list[tuple[str, str]]:
    names = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
    return [(s.text, label) for pos, label in names.items() for s in wordnet_synsets(pos)]


WN_DOMAINS = (
    "law", "military", "chemistry", "computer science", "music", "Greek mythology", "biology",
    "physics", "botany", "mathematics", "baseball", "medicine",
)  # the 12 most frequent WordNet 3.0 topic domains (";c" pointers), with >= 115 members each


def _wn_domain() -> list[tuple[str, str]]:
    synsets = [s for pos in ("noun", "verb", "adj", "adv") for s in wordnet_synsets(pos)]
    by_key = {(s.offset, s.pos): s for s in synsets}
    wanted = set(WN_DOMAINS)
    pool = []
    for s in synsets:
        domains = {by_key[(off, p)].lemmas[0] for sym, off, p in s.pointers if sym == ";c"} & wanted
        if len(domains) == 1:  # several topic domains = ambiguous label
            pool.append((s.text, domains.pop()))
    return pool


FORTUNE_CATEGORIES = (
    "art", "computers", "definitions", "drugs", "education", "law", "linux", "literature",
    "men-women", "people", "politics", "science", "songs-poems", "startrek", "work", "zippy",
)  # topical files of Debian `fortunes` with >= 200 entries (catch-alls like `fortunes` left out)


def clean_fortune(raw: str) -> str:
    """Undo terminal overstriking (``_\\bX`` underlines), collapse whitespace."""
    while "\x08" in raw:  # X BS Y prints Y over X: keep Y
        new = re.sub("[^\x08]\x08", "", raw)
        raw = new if new != raw else raw.replace("\x08", "")
    return " ".join(raw.split())


def read_fortunes(category: str) -> list[str]:
    path = _need(FORTUNES_DIR / category, "fortunes")
    text = path.read_text(encoding="utf-8", errors="replace")
    entries = (clean_fortune(e) for e in re.split(r"^%\s*$", text, flags=re.M))
    return [e for e in entries if 20 <= len(e) <= 600]


def _fortune_category() -> list[tuple[str, str]]:
    return [(t, c) for c in FORTUNE_CATEGORIES for t in read_fortunes(c)]


WORD_LANGUAGES = {  # label -> (file under /usr/share/dict, Debian package)
    "english": ("american-english", "wamerican"),
    "german": ("ngerman", "wngerman"),
    "french": ("french", "wfrench"),
    "italian": ("italian", "witalian"),
    "spanish": ("spanish", "wspanish"),
    "portuguese": ("portuguese", "wportuguese"),
    "dutch": ("dutch", "wdutch"),
}


def _word_language() -> list[tuple[str, str]]:
    """A single dictionary word (>= 4 letters, lowercased) -> its language.

    Words found in two lists are dropped. The lists hold 2.4 M words, far more than needed: only
    words with ``crc32(word) % 16 == 0`` are considered (a content-based, seed-free thinning that
    keeps the uniqueness test exact, since a word is kept or thinned in every list alike).
    """
    vocab = {}
    for lang, (fname, pkg) in WORD_LANGUAGES.items():
        text = _need(DICT_DIR / fname, pkg).read_text(encoding="utf-8", errors="replace")
        words = {w.lower() for w in text.split() if len(w) >= 4 and w.isalpha()}
        vocab[lang] = [w for w in words if zlib.crc32(w.encode()) % 16 == 0]
    counts = Counter(w for words in vocab.values() for w in words)
    return [(w, lang) for lang, words in vocab.items() for w in words if counts[w] == 1]


MAN_SECTIONS = ("1", "2", "3", "5", "7", "8")  # sections 4 and 6 have too few pages here
MAN_PACKAGES = "man-db manpages manpages-dev"  # the pages of sections 2, 3, 5, 7 and most of 1 and 8


def troff_to_text(line: str) -> str:
    """Plain text of one troff/man(7)/mdoc(7) source line: macro names, font changes and escapes removed."""
    if line.startswith((".", "'")):
        line = line[1:].split(None, 1)[1] if len(line[1:].split(None, 1)) == 2 else ""
        if line.startswith(("Nd ", "Nm ")):  # nested mdoc macros
            line = line[3:]
    line = line.replace("\\-", "-").replace("\\(em", "-").replace("\\(en", "-").replace("\\e", "\\")
    line = re.sub(r"\\f(\(..|\[[^]]*\]|.)", "", line)  # font changes
    line = re.sub(r"\\\((..)", "", line)  # special characters
    line = re.sub(r"\\[&/,|^ ]", lambda m: " " if m.group(0) == "\\ " else "", line)
    line = re.sub(r"\\.", "", line)
    return line.replace('"', "").strip()


def man_name_line(source: str) -> str | None:
    """``"name - description"`` from the NAME section of a man page source (man or mdoc macros)."""
    lines = source.splitlines()
    for i, line in enumerate(lines):
        if re.match(r'^\.S[Hh]\s+"?(NAME|Name)"?\s*$', line):
            body = []
            for nxt in lines[i + 1 : i + 12]:
                if re.match(r"^\.S[Hh]\b", nxt):
                    break
                if nxt.startswith('.\\"') or nxt.startswith(("'\\\"", ".PP", ".LP", ".P ")):
                    continue
                if nxt.startswith(".Nd"):
                    body.append("-")
                text = troff_to_text(nxt)
                if text:
                    body.append(text)
            text = " ".join(" ".join(body).split())
            return text if " - " in text and 10 <= len(text) <= 300 else None
    return None


def _man_section() -> list[tuple[str, str]]:
    """A man page's NAME line (``"ls - list directory contents"``) -> its section (1, 2, 3, 5, 7, 8).

    Section 1 holds 18 k pages here: only pages with ``crc32(file name) % 4 == 0`` are read (a
    content-free thinning; the task is balanced afterwards anyway). ``.so`` redirections have no NAME.
    """
    import gzip

    pool = []
    for section in MAN_SECTIONS:
        folder = _need(MAN_DIR / f"man{section}", MAN_PACKAGES)
        for path in sorted(folder.glob("*.gz")):
            if section == "1" and zlib.crc32(path.name.encode()) % 4:
                continue
            try:
                source = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
            except (OSError, EOFError):
                continue
            line = man_name_line(source)
            if line:
                pool.append((line, section))
    return pool


PACKAGE_SECTIONS = (
    "admin", "devel", "doc", "games", "graphics", "libs", "net", "science", "sound", "text",
    "utils", "x11",
)  # topical Debian archive sections with >= 600 packages in bookworm main (language sections such as
#    python, perl, rust, golang left out: their descriptions name the language)


def read_apt_packages() -> list[dict[str, str]]:
    """The stanzas of the ``*_main_binary-*_Packages.lz4`` apt lists (``apt-get update``), via ``lz4 -dc``."""
    import subprocess

    files = sorted(APT_LISTS_DIR.glob("*_main_binary-*_Packages.lz4"))
    if not files:
        _need(APT_LISTS_DIR / "<release>_main_binary-amd64_Packages.lz4", "apt (then run apt-get update)")
    stanzas = []
    for path in files:
        try:
            text = subprocess.run(["lz4", "-dc", str(path)], check=True, capture_output=True).stdout.decode(
                "utf-8", errors="replace")
        except FileNotFoundError:
            raise MissingDataError("the 'lz4' command is missing: apt-get install -y lz4") from None
        for block in text.split("\n\n"):
            fields = {}
            for line in block.splitlines():
                if line and not line[0].isspace() and ":" in line:
                    k, _, v = line.partition(":")
                    fields[k] = v.strip()
            if fields:
                stanzas.append(fields)
    return stanzas


def _package_section() -> list[tuple[str, str]]:
    """A Debian package's one-line description -> its archive section (12 topical sections, balanced).

    The package name is not part of the text (``python3-foo``, ``libfoo-dev`` would give it away).
    """
    wanted = set(PACKAGE_SECTIONS)
    pool = []
    for st in read_apt_packages():
        section = st.get("Section", "").rsplit("/", 1)[-1]
        desc = st.get("Description", "")
        if section in wanted and 10 <= len(desc) <= 200:
            pool.append((desc, section))
    return pool


def _source_line() -> list[tuple[str, str]]:
    """One line of source code (>= 25 characters after stripping, comment-only lines dropped) -> its
    language: C headers, C++ standard library headers, the Python standard library, Perl modules.

    At most 40 lines per file, taken in file order, so that no single big file dominates a class.
    """
    comment = re.compile(r"^(#|//|/\*|\*|\"\"\"|=)")
    pool = []
    for label, (folder, pattern, pkg) in SOURCE_DIRS.items():
        files = sorted(p for p in _need(folder, pkg).glob(pattern) if p.is_file())
        for path in files:
            if label == "c" and path.suffix != ".h":
                continue
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            kept = 0
            for line in text.splitlines():
                line = " ".join(line.split())
                if len(line) >= 25 and not comment.match(line):
                    pool.append((line[:200], label))
                    kept += 1
                    if kept >= 40:
                        break
    return pool


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("wn_noun_category", "WordNet noun 'lemma: definition' -> lexicographer file (26)",
                 ("wordnet-base",), functools.partial(_wn_category, "noun")),
        TaskSpec("wn_verb_category", "WordNet verb 'lemma: definition' -> lexicographer file (15)",
                 ("wordnet-base",), functools.partial(_wn_category, "verb")),
        TaskSpec("wn_pos", "WordNet 'lemma: definition' -> part of speech (4, balanced)",
                 ("wordnet-base",), _wn_pos, balanced=True),
        TaskSpec("wn_domain", "WordNet 'lemma: definition' -> topic domain (12 most frequent)",
                 ("wordnet-base",), _wn_domain),
        TaskSpec("fortune_category", "fortune cookie -> its Debian fortunes file (16 topics)",
                 ("fortunes",), _fortune_category),
        TaskSpec("word_language", "dictionary word -> language (7, balanced, unique to one list)",
                 tuple(p for _, p in WORD_LANGUAGES.values()), _word_language, balanced=True),
        TaskSpec("man_section", "man page NAME line -> manual section (6, balanced)",
                 tuple(MAN_PACKAGES.split()), _man_section, balanced=True),
        TaskSpec("package_section", "Debian package one-line description -> archive section (12, balanced)",
                 ("apt", "lz4"), _package_section, balanced=True),
        TaskSpec("source_line", "one line of source code -> C, C++, Python or Perl (balanced)",
                 tuple(p for _, _, p in SOURCE_DIRS.values()), _source_line, balanced=True),
    )
}
# wn_domain stays available but is not a default task: the frozen base already solves it (probe
# 0.920 vs expert 0.929 in the frozen-probe protocol), so it cannot tell merges apart.
DEFAULT_TASKS = tuple(t for t in TASKS if t != "wn_domain")


def required_packages(tasks: Iterable[str] = DEFAULT_TASKS) -> list[str]:
    return sorted({p for t in tasks for p in get_spec(t).packages})


def get_spec(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


@functools.lru_cache(maxsize=32)
def load_task(
    name: str, *, seed: int = 0, max_train: int = MAX_TRAIN, max_val: int = MAX_VAL,
    max_test: int = MAX_TEST,
) -> TaskData:
    """Build the task ``name`` deterministically (see the module docstring for the split rule)."""
    spec = get_spec(name)
    by_text: dict[str, str | None] = {}
    for text, label in spec.load_pool():
        by_text[text] = label if by_text.get(text, label) == label else None  # None: ambiguous
    pool = sorted((t, label) for t, label in by_text.items() if label is not None)
    label_names = tuple(sorted({label for _, label in pool}))
    rng = random.Random(f"{name}:{seed}")
    rng.shuffle(pool)
    if spec.balanced:
        per_class = math.ceil((max_train + max_val + max_test) / len(label_names))
        kept: Counter[str] = Counter()
        balanced = []
        for t, label in pool:
            if kept[label] < per_class:
                kept[label] += 1
                balanced.append((t, label))
        pool = balanced
        rng.shuffle(pool)  # rare classes were kept from further down the pool: mix them back in
    n = len(pool)
    n_test = min(max_test, n // 5)
    n_val = min(max_val, n // 10)
    n_train = min(max_train, n - n_test - n_val)
    index = {label: i for i, label in enumerate(label_names)}

    def make(rows: list[tuple[str, str]]) -> Split:
        return Split(tuple(t for t, _ in rows), tuple(index[label] for _, label in rows))

    return TaskData(
        name=name,
        label_names=label_names,
        test=make(pool[:n_test]),
        val=make(pool[n_test : n_test + n_val]),
        train=make(pool[n_test + n_val : n_test + n_val + n_train]),
    )


def main() -> None:  # python -m benchmarks.retention.data: print the task table
    import argparse

    parser = argparse.ArgumentParser(description="Print the retention tasks (or their Debian packages).")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--packages", action="store_true", help="print the Debian packages needed")
    args = parser.parse_args()
    if args.packages:
        print(" ".join(required_packages(args.tasks)))
        return
    print("| task | classes | train | val | test | majority (test) |\n|---|---|---|---|---|---|")
    for name in args.tasks:
        s = load_task(name, seed=args.seed).summary()
        print(f"| {name} | {s['classes']} | {s['n_train']} | {s['n_val']} | {s['n_test']} "
              f"| {s['majority_test']:.3f} |")


if __name__ == "__main__":
    main()
