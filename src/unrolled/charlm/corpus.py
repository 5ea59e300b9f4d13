"""The training text of a run: which files, read how, and a checkpoint's record of it.

A run trains on the files named on the command line (a folder: its text
files, sorted), on standard input, or on the built-in corpus, the running
Python's own standard-library sources, so that ``unrolled train`` needs no
download. A checkpoint records the files (relative to the run folder), their
sizes and CRC-32, so that ``--resume`` finds the same text again, and refuses
a file that has changed, without trusting the paths a foreign checkpoint names.
"""

from __future__ import annotations

import functools
import os
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .text_files import (
    MAX_TEXT_BYTES,
    STDIN,
    corpus_files,
    decode_text,
    normalize_newlines,
    read_bytes,
    text_codec,
)


@dataclass
class Corpus:
    """A training text and what a checkpoint records of it to find and recognize it again."""

    text: str
    name: str  # for messages: a file, "N files (first, …)", standard input, or the built-in corpus
    files: list[str] = field(default_factory=list)  # the files read, in order, folders expanded ("-": stdin)
    sizes: list[int] = field(default_factory=list)  # bytes of each file
    crc32: int = 0  # CRC-32 of the files' bytes, one after another
    encoding: str = "utf-8"
    notes: list[str] = field(default_factory=list)  # what to tell the user (a folder's file count)


def read_corpus(files: list[str], encoding: str, max_bytes: int = MAX_TEXT_BYTES) -> Corpus:
    """The files concatenated (a folder: its text files, sorted; ``-``: standard input), or the built-in
    corpus when there are none; at most ``max_bytes`` bytes in all."""
    if not files:
        return Corpus(builtin_corpus(), BUILTIN_NAME, encoding=encoding)
    codec = text_codec(encoding)
    paths, notes = _expand_folders(files, encoding)
    texts, sizes, crc = [], [], 0
    for p in paths:
        name = "standard input" if p == STDIN else p
        raw = read_bytes(p, max_bytes)
        sizes.append(len(raw))
        if sum(sizes) > max_bytes:
            raise ValueError(f"the {len(paths)} files of the corpus hold more than {max_bytes / 1e6:g} MB, the limit on "
                             f"a text read whole; raise it with --max-text-mb if the machine has the memory")
        crc = zlib.crc32(raw, crc)
        texts.append(decode_text(raw, codec, name))
    first = "standard input" if paths[0] == STDIN else paths[0]
    name = first if len(paths) == 1 else f"{len(paths)} files ({first}, …)"
    return Corpus("".join(texts), name, paths, sizes, crc, encoding, notes)


def _expand_folders(files: list[str], encoding: str) -> tuple[list[str], list[str]]:
    paths, notes = [], []
    for f in map(str, files):
        if f == STDIN or not Path(f).is_dir():
            paths.append(f)
            continue
        texts, skipped = corpus_files(f, encoding)
        if not texts:
            raise ValueError(f"{f} is a folder without text files; pass a folder of text files, or the files themselves")
        skip = (f"; {len(skipped)} binary {_plural(len(skipped), 'file')} left out ({', '.join(p.name for p in skipped[:3])}"
                f"{', …' if len(skipped) > 3 else ''})") if skipped else ""
        notes.append(f"{f}: {len(texts)} text {_plural(len(texts), 'file')}, read in sorted order{skip}")
        paths += [str(p) for p in texts]
    return paths, notes


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


def text_record(corpus: Corpus, out: Path) -> dict:
    """The checkpoint's record of its text: paths relative to the run folder where there is one,
    so that a project moved as a whole still finds its text; sizes and CRC to recognize it."""
    def rel(f: str) -> str:
        if f == STDIN:
            return f
        try:
            return os.path.relpath(Path(f).resolve(), out.resolve())
        except ValueError:  # another drive (Windows): no relative path
            return str(Path(f).resolve())
    return {"source": corpus.name, "files": [rel(f) for f in corpus.files], "bytes": corpus.sizes,
            "crc32": corpus.crc32, "encoding": corpus.encoding, "chars": len(corpus.text)}


def _check_text_record(record: dict, checkpoint: Path) -> None:
    def bad(field: str, want: str):
        raise ValueError(f"{checkpoint}: its field 'text.{field}' is {record[field]!r:.60}, not {want}; "
                         f"the file is damaged or foreign (name the text on the command line to resume)")

    if not (isinstance(record.get("files", []), list) and all(isinstance(f, str) and f for f in record.get("files", []))):
        bad("files", "a list of paths")
    if "bytes" in record and not (isinstance(record["bytes"], list) and len(record["bytes"]) == len(record["files"])
                                  and all(type(b) is int and b >= 0 for b in record["bytes"])):
        bad("bytes", "a list of one file size per file")
    if "crc32" in record and not (type(record["crc32"]) is int and 0 <= record["crc32"] < 2 ** 32):
        bad("crc32", "a CRC-32")
    if not isinstance(record.get("encoding", "utf-8"), str):
        bad("encoding", "an encoding's name")


def read_recorded_corpus(record: dict, checkpoint: Path, max_bytes: int = MAX_TEXT_BYTES) -> Corpus:
    """The text a checkpoint records, found relative to its folder, read only if it is the same text.

    A checkpoint may come from anyone, so the paths it names are not trusted: a
    file is read only if it is a regular file of the recorded size, and used only
    if its bytes have the recorded CRC; otherwise the error says so without
    quoting the file, and tells the user to name the text on the command line.
    """
    _check_text_record(record, checkpoint)
    files = record.get("files") or []
    resume = f"unrolled train FILE --resume {checkpoint.parent}"
    if not files:
        return read_corpus([], record.get("encoding", "utf-8"))
    if STDIN in files:
        raise ValueError(f"{checkpoint} was trained on standard input; pipe the same text again: "
                         f"... | unrolled train - --resume {checkpoint.parent}")
    if "bytes" not in record or "crc32" not in record:
        raise ValueError(f"{checkpoint} does not record its text's size and checksum (an older checkpoint), "
                         f"so the files it names are not opened; name the text: {resume}")
    paths, raws, crc = [], [], 0
    for f, size in zip(files, record["bytes"]):
        p = Path(f) if Path(f).is_absolute() else checkpoint.parent / f
        if not p.exists():
            raise ValueError(f"the training text {p} (recorded in {checkpoint}) is not there; if it moved, "
                             f"name it: unrolled train NEWPATH --resume {checkpoint.parent}")
        if not p.is_file():
            raise ValueError(f"{p} (named by {checkpoint}) is not a regular file, so it is not read; name the "
                             f"training text: {resume}")
        if p.stat().st_size != size or size > max_bytes:
            raise ValueError(f"{p} (named by {checkpoint}) is not the text the run was trained on "
                             f"(its size differs); name the training text: {resume}")
        raw = read_bytes(p, max_bytes)
        crc = zlib.crc32(raw, crc)
        paths.append(str(p))
        raws.append(raw)
    if crc != record["crc32"]:
        raise ValueError(f"the files {checkpoint} names ({paths[0]}{', …' if len(paths) > 1 else ''}) are not "
                         f"the text the run was trained on (their checksum differs); name the training text: {resume}")
    encoding = record.get("encoding", "utf-8")
    codec = text_codec(encoding)
    text = "".join(decode_text(raw, codec, p) for raw, p in zip(raws, paths))
    name = paths[0] if len(paths) == 1 else f"{len(paths)} files ({paths[0]}, …)"
    return Corpus(text, name, paths, [len(r) for r in raws], crc, encoding)


BUILTIN_NAME = "<builtin: Python standard library sources>"


@functools.lru_cache(maxsize=4)
def builtin_corpus(max_chars: int = 1_000_000, stdlib_dir: str | None = None) -> str:
    """A corpus that needs no download: the running interpreter's own
    standard-library sources.

    The top-level ``*.py`` files of ``sysconfig.get_paths()["stdlib"]`` (or
    ``stdlib_dir``), sorted by name, pure-ASCII ones only (keeping the
    vocabulary to printable ASCII, tab and newline), concatenated and cut at
    ``max_chars`` characters. The same interpreter always gives the same text;
    another Python version gives a similar one. Where the sources are absent
    (some minimal installs ship only bytecode) a small text built into this
    module stands in.
    """
    folder = Path(stdlib_dir if stdlib_dir is not None else sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    total = 0
    try:
        files = sorted(folder.glob("*.py"), key=lambda p: p.name)
    except OSError:
        files = []
    for f in files:
        try:
            text = normalize_newlines(f.read_bytes().decode("ascii"))
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    corpus = "".join(parts)[:max_chars]
    return corpus if len(corpus) >= len(FALLBACK_CORPUS) else FALLBACK_CORPUS


FALLBACK_CORPUS = """\
A recurrent network is a graph of vectors with some edges that point back in time.
Each vertex holds a row of neurons; each edge carries a vector through a weight
matrix, a sum, or a squashing function. An edge that points backwards delivers
the value its source had one step earlier. Those delayed edges are the only
thing allowed to close a cycle, and they are what gives the network a memory.

To compute with such a graph we unroll it. We copy every vertex once for each
time step and turn each delayed edge into an edge from the copy at step t minus
one to the copy at step t. What was a cycle becomes a long chain, and the whole
picture becomes a directed graph without cycles: one input per step, one output
per step, and the same weight matrices shared by every copy.

Because the unrolled graph has no cycles, ordinary back-propagation trains it.
The error at the last step flows back through every earlier step; each copy of
a weight receives its own share of the gradient, and the shares are added into
one update of the single shared matrix. This is back-propagation through time.

In practice the sequence is long and the gradient is cut. We run forward for a
chunk of steps, carry the state into the next chunk, and let the gradient flow
back only within the chunk. The cut is called truncation. It trades a little
accuracy for a great deal of speed, and it lets a small machine read a book.

Gradients that pass through many steps are multiplied by the same matrix again
and again. When its largest gain is below one they fade away, and the network
forgets what it saw long ago; when it is above one they grow without bound.
Gates that decide what to keep and what to forget, as in the long short-term
memory and the gated recurrent unit, are the usual cure for the first problem.
Clipping the length of the gradient is the usual cure for the second.

A character model reads text one letter at a time and guesses the next letter.
Its loss is measured in bits per character: a model that knows nothing pays
about as many bits as the logarithm of the size of its alphabet, and a good one
pays far fewer. Trained on a small book, it soon learns the spaces and the
common words, then the punctuation, and at last something like the style.

The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor
jugs. How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.
0123456789 (parentheses), [brackets], {braces}; colons: and semicolons; "quotes"
and 'apostrophes'; a-hyphen, an_underscore, 50% + 25% = 75%, a/b, x*y, #1 & @home.
"""
