"""Text for character-level language models: reading, vocabularies, batching.

The pipeline is ``read_text`` (or ``builtin_corpus``) -> ``Vocabulary`` ->
``encode`` -> ``split_train_val`` -> ``StreamBatcher`` for training and
``iter_eval_chunks`` for validation. Everything past reading is plain int64
NumPy arrays; batches are time-major ``[T, B]`` like every array in unrolled.

Training batches follow the classic stateful scheme (Zaremba et al.): the
corpus is cut into ``B`` equal streams and each batch holds the next ``T``
characters of every stream, so the state an RNN ends one batch with is the
right state to start the next one with (truncated BPTT with carried state).
"""

from __future__ import annotations

import codecs
import functools
import math
import os
import stat
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from unrolled.words import count

# -- reading -----------------------------------------------------------------


def _normalize_newlines(text: str) -> str:
    # What Python's text mode does: a Windows file must not add '\r' to the vocabulary.
    return text.replace("\r\n", "\n").replace("\r", "\n")


STDIN = "-"  # the file name that means standard input
MAX_TEXT_BYTES = 256_000_000  # the default bound on the bytes of one corpus (--max-text-mb raises it)
_CHUNK = 1 << 20


def read_text(path: str | os.PathLike, encoding: str = "utf-8", *, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The text of ``path`` (``"-"``: standard input, read to its end), with
    newlines normalized to ``\\n`` and a leading byte-order mark dropped.

    Raises ``ValueError`` with one sentence for a missing file, a folder, a
    device, FIFO or socket (reading one could hang or never end), more than
    ``max_bytes`` bytes (the text is read whole, and its ids take several
    times its size), an empty file, a binary file, or bytes that are not
    valid in ``encoding``.
    """
    codec = text_codec(encoding)
    name = "standard input" if str(path) == STDIN else str(path)
    return decode_text(read_bytes(path, max_bytes), codec, name)


def text_codec(encoding: str) -> str:
    """The codec's canonical name; a codec that does not decode bytes to text (rot13, base64) is refused."""
    try:
        info = codecs.lookup(encoding)
    except (LookupError, TypeError):
        raise ValueError(f"unknown text encoding {encoding!r}; try utf-8 or latin-1") from None
    if not getattr(info, "_is_text_encoding", True):
        raise ValueError(f"{encoding!r} is not a text encoding; try utf-8 or latin-1")
    return info.name


def read_bytes(path: str | os.PathLike, max_bytes: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of a regular file, or of standard input for ``"-"``, at most ``max_bytes`` of them."""
    if str(path) == STDIN:
        import sys

        return _read_bounded(sys.stdin.buffer, "standard input", max_bytes)
    path = Path(path)
    try:  # non-blocking: opening a FIFO must not wait for a writer
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; check the path") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not a text file; pass a file inside it") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ValueError(f"{path} is a folder, not a text file; pass a file inside it")
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is {_file_kind(st.st_mode)}, not a regular file; pass a text file, "
                             f"or - to read standard input")
        if st.st_size > max_bytes:
            raise ValueError(_too_big(str(path), max_bytes))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        return _read_bounded(f, str(path), max_bytes)


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a plain file"


def _too_big(name: str, max_bytes: int) -> str:
    return (f"{name} holds more than {max_bytes / 1e6:g} MB, the limit on a text read whole; "
            f"raise it with --max-text-mb if the machine has the memory (its ids take 8 bytes a character)")


def _read_bounded(f, name: str, max_bytes: int) -> bytes:
    parts, total = [], 0
    while True:
        try:
            chunk = f.read(min(_CHUNK, max_bytes + 1 - total))
        except OSError as e:
            raise ValueError(f"cannot read {name}: {e.strerror or e}") from None
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise ValueError(_too_big(name, max_bytes))


def decode_text(data: bytes, codec: str, name: str) -> str:
    """``data`` decoded, newlines normalized; one sentence naming ``name`` and the byte for anything not text."""
    if not data:
        raise ValueError(f"{name} is empty; a corpus needs some text")
    wide = codec.startswith(("utf-16", "utf-32"))  # NUL bytes are normal there
    nul = -1 if wide else data.find(b"\0")
    if nul >= 0:
        raise ValueError(f"{name} looks binary (it contains a NUL byte at offset {nul}, {_line_column(data, nul)}); "
                         f"pass a text file")
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as e:
        hint = "if it is Latin-1 text, pass --encoding latin-1" if codec == "utf-8" else "pass the file's real --encoding"
        raise ValueError(f"{name} is not valid {codec} text: byte 0x{data[e.start]:02X} at offset {e.start} "
                         f"({_line_column(data, e.start)}); {hint}") from None
    if wide and "\0" in text:
        raise ValueError(f"{name} looks binary (it contains a NUL character at offset {text.index(chr(0))}); pass a text file")
    text = _normalize_newlines(text.removeprefix("\ufeff"))
    if not text:
        raise ValueError(f"{name} is empty; a corpus needs some text")
    return text


def _line_column(data: bytes, offset: int) -> str:
    line = data.count(b"\n", 0, offset) + 1
    column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    return f"line {line}, column {column}"


def corpus_files(folder: str | os.PathLike, encoding: str = "utf-8") -> tuple[list[Path], list[Path]]:
    """``(texts, skipped)``: the files of a corpus folder, recursively, sorted by path.

    Hidden files and folders (a leading dot) are left out, as are files that
    are not regular; a file whose first bytes hold a NUL is binary and goes
    to ``skipped`` (unless the encoding is UTF-16/32, where NULs are normal),
    so that a folder of texts with a picture or two in it still reads.
    """
    folder = Path(folder)
    wide = text_codec(encoding).startswith(("utf-16", "utf-32"))
    texts, skipped = [], []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            p = Path(root) / name
            if name.startswith(".") or not p.is_file():
                continue
            try:
                with open(p, "rb") as f:
                    head = f.read(8192)
            except OSError as e:
                raise ValueError(f"cannot read {p}: {e.strerror or e}") from None
            (skipped if (b"\0" in head and not wide) else texts).append(p)
    key = lambda p: p.relative_to(folder).parts
    return sorted(texts, key=key), sorted(skipped, key=key)


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
            text = _normalize_newlines(f.read_bytes().decode("ascii"))
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    corpus = "".join(parts)[:max_chars]
    return corpus if len(corpus) >= len(FALLBACK_CORPUS) else FALLBACK_CORPUS


# -- vocabulary --------------------------------------------------------------


def _describe(ch: str) -> str:
    return f"character {ch!r} (U+{ord(ch):04X})"


def describe_at(text: str, offset: int) -> str:
    """The character at ``offset`` of ``text`` and where it is, for messages."""
    return f"{_describe(text[offset])} {_where(text, offset)}"


def _where(text: str, offset: int) -> str:
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return f"at offset {offset} (line {line}, column {column})"


class Vocabulary:
    """The characters a model reads and writes, each with an integer id.

    Ids are positions in ``chars``; :meth:`from_text` sorts the distinct
    characters, so the same text always gives the same ids.

    Unknown characters (not in the vocabulary): ``encode(text)`` refuses
    them, naming the first one and where it is; ``encode(text,
    unknown="skip")`` drops them and also returns how many it dropped, so an
    evaluation can report them (they are not scored: the model has no
    probability for them).
    """

    def __init__(self, chars: Iterable[str]):
        chars = list(chars)
        if not chars:
            raise ValueError("a vocabulary needs at least one character")
        seen: set[str] = set()
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"a vocabulary holds single characters; got {c!r}")
            if c in seen:
                raise ValueError(f"{_describe(c)} appears twice in the vocabulary; each character needs one id")
            seen.add(c)
        self._chars = tuple(chars)
        self._index = {c: i for i, c in enumerate(chars)}
        codes = np.array([ord(c) for c in chars], dtype=np.int64)
        self._order = np.argsort(codes)  # for a vectorized encode: code point -> id
        self._sorted_codes = codes[self._order]
        self._char_array = np.array(chars, dtype="<U1")  # for a vectorized decode

    @classmethod
    def from_text(cls, text: str) -> Vocabulary:
        if not text:
            raise ValueError("cannot build a vocabulary from an empty text")
        return cls(sorted(set(text)))

    @classmethod
    def from_list(cls, chars: list[str]) -> Vocabulary:
        """Inverse of :meth:`to_list` (e.g. from a checkpoint's JSON)."""
        if not isinstance(chars, (list, tuple)):
            raise ValueError(f"a saved vocabulary is a list of characters, got {type(chars).__name__}")
        return cls(chars)

    def to_list(self) -> list[str]:
        return list(self._chars)

    @property
    def chars(self) -> tuple[str, ...]:
        return self._chars

    @property
    def size(self) -> int:
        return len(self._chars)

    def __len__(self) -> int:
        return len(self._chars)

    def __contains__(self, ch: object) -> bool:
        return ch in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self._chars == other._chars

    def __hash__(self) -> int:
        return hash(self._chars)

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} characters: {''.join(self._chars)[:40]!r})"

    def index_of(self, ch: str) -> int:
        """The id of one character."""
        i = self._index.get(ch)
        if i is None:
            raise ValueError(f"{_describe(ch)} is not in the model's vocabulary of {count(len(self), 'character')}")
        return i

    def encode(self, text: str, unknown: str = "error"):
        """``text`` as ids, an int64 array ``[len(text)]``.

        ``unknown="error"`` (default) raises on a character outside the
        vocabulary; ``unknown="skip"`` drops such characters and returns
        ``(ids, n_unknown)`` instead.
        """
        if unknown not in ("error", "skip"):
            raise ValueError(f"unknown={unknown!r}; use 'error' or 'skip'")
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.int64)
        pos = np.minimum(np.searchsorted(self._sorted_codes, codes), len(self) - 1)
        known = self._sorted_codes[pos] == codes
        if unknown == "skip":
            return self._order[pos[known]], int(codes.size - np.count_nonzero(known))
        if not known.all():
            first = int(np.argmin(known))
            raise ValueError(f"{_describe(text[first])} {_where(text, first)} is not in the model's vocabulary "
                             f"of {count(len(self), 'character')}; remove it from the text or skip unknown characters")
        return self._order[pos]

    def decode(self, ids) -> str:
        """The text of a 1-D sequence of ids."""
        ids = np.asarray(ids)
        if ids.size == 0:
            return ""
        if ids.dtype.kind not in "iu":
            raise ValueError(f"ids to decode must be integers, got {ids.dtype}")
        if ids.ndim != 1:
            raise ValueError(f"decode takes a 1-D sequence of ids, got shape {list(ids.shape)}; decode one stream at a time")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= len(self):
            bad = lo if lo < 0 else hi
            raise ValueError(f"id {bad} is outside the vocabulary of {count(len(self), 'character')} (ids 0..{len(self) - 1})")
        return self._char_array[ids].tobytes().decode("utf-32-le", "surrogatepass")


# -- splitting and batching --------------------------------------------------


def _ids(ids, what: str = "ids") -> np.ndarray:
    a = np.asarray(ids)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise ValueError(f"{what} must be a 1-D array of integer character ids, got {a.dtype} {list(a.shape)}")
    return a.astype(np.int64, copy=False)


def _whole(owner: str, what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{owner}: {what} must be a whole number of at least 1, got {value!r}")
    return int(value)


def split_train_val(ids, val_fraction: float, *, min_train: int = 2, min_val: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)``: the last ``val_fraction`` of ``ids`` held out (views,
    not copies). ``val_fraction=0`` gives an empty validation part. Each
    part must hold at least ``min_train`` / ``min_val`` ids (2 = one to
    read, one to predict; a trainer passes ``seq_len * batch_size + 1``)."""
    ids = _ids(ids)
    try:
        f = float(val_fraction)
    except (TypeError, ValueError):
        f = math.nan
    if not 0 <= f < 1:
        raise ValueError(f"validation fraction must be in [0, 1), got {val_fraction!r}")
    n = len(ids)
    n_val = int(round(n * f))
    train, val = ids[: n - n_val], ids[n - n_val :]
    if f > 0 and len(val) < min_val:
        raise ValueError(f"the validation part would be {count(len(val), 'character')} ({f:g} of {n}), fewer than the {min_val} "
                         "it needs; raise the validation fraction or use a longer text")
    if len(train) < min_train:
        raise ValueError(f"the training part would be {count(len(train), 'character')} ({1 - f:g} of {n}), fewer than the "
                         f"{min_train} it needs; lower the validation fraction, lower seq_len or batch_size, or use a longer text")
    return train, val


class StreamBatcher:
    """Training batches ``(x, y)``, each ``[T, B]`` int64, ``y`` = ``x`` one
    character later.

    The corpus (minus its last character, which is only ever a target) is cut
    into ``B`` equal streams starting at ``b · L``, ``L = (n - 1) // B``;
    batch ``k`` holds characters ``[b·L + k·T, b·L + (k+1)·T)`` of each
    stream. After ``chunks_per_epoch = L // T`` batches the streams wrap to
    their starts and ``epoch`` counts up (a remainder of fewer than ``T``
    characters per stream is not used). Because the streams jump back at that
    point, a trainer carrying RNN state between batches should reset it
    whenever ``at_epoch_start`` is true.

    ``state()`` / ``load_state()`` save and restore the position (JSON), so a
    resumed run gets exactly the batches it would have had.
    """

    def __init__(self, ids, seq_len: int, batch_size: int):
        self.ids = _ids(ids, "the training text")
        self.seq_len = _whole("batcher", "seq_len", seq_len)
        self.batch_size = _whole("batcher", "batch_size", batch_size)
        T, B, n = self.seq_len, self.batch_size, len(self.ids)
        if n < T * B + 1:
            raise ValueError(f"the text has {count(n, 'character')}, too few for {count(B, 'stream')} of {count(T, 'character')} "
                             f"(needs seq_len × batch_size + 1 = {T * B + 1}); lower batch_size or seq_len, or use a longer text")
        self.stream_len = (n - 1) // B
        self.chunks_per_epoch = self.stream_len // T
        self.position = 0  # the next batch's index within the epoch
        self.epoch = 0  # completed passes over the corpus
        self._offsets = np.arange(T)[:, None] + (np.arange(B) * self.stream_len)[None, :]  # [T, B]
        self._crc: int | None = None

    @property
    def at_epoch_start(self) -> bool:
        """True when the next batch starts the streams over (reset carried state)."""
        return self.position == 0

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        idx = self._offsets + self.position * self.seq_len  # [T, B]
        x, y = self.ids[idx], self.ids[idx + 1]
        self.position += 1
        if self.position == self.chunks_per_epoch:
            self.position = 0
            self.epoch += 1
        return x, y

    def _text_crc(self) -> int:
        if self._crc is None:  # tells "same length, other text" apart on resume
            self._crc = zlib.crc32(np.ascontiguousarray(self.ids, dtype="<i8").view(np.uint8))
        return self._crc

    def state(self) -> dict:
        return {"position": self.position, "epoch": self.epoch, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "text_length": len(self.ids), "text_crc32": self._text_crc()}

    def load_state(self, state: dict) -> None:
        want = self.state()
        if not isinstance(state, dict) or any(k not in state for k in want):
            raise ValueError(f"a saved batcher position needs the keys {', '.join(want)}; got {state!r}")
        if (state["seq_len"], state["batch_size"]) != (self.seq_len, self.batch_size):
            raise ValueError(f"the saved batcher position is for seq_len {state['seq_len']}, batch_size {state['batch_size']}, "
                             f"but this run uses seq_len {self.seq_len}, batch_size {self.batch_size}; resume with the same settings")
        if (state["text_length"], state["text_crc32"]) != (len(self.ids), self._text_crc()):
            raise ValueError(f"the saved batcher position is for another training text ({state['text_length']} characters, "
                             f"this one has {len(self.ids)}, or same length but other content); resume on the same text and split")
        position, epoch = state["position"], state["epoch"]
        if not (isinstance(position, int) and 0 <= position < self.chunks_per_epoch and isinstance(epoch, int) and epoch >= 0):
            raise ValueError(f"the saved batcher position {position} / epoch {epoch} is out of range "
                             f"(0..{self.chunks_per_epoch - 1} batches per epoch); the saved state is damaged")
        self.position, self.epoch = position, epoch


def eval_chunk_count(n_chars: int, seq_len: int, batch_size: int) -> int:
    """How many chunks :func:`iter_eval_chunks` yields for a text of ``n_chars``."""
    stream_len = -(-(n_chars - 1) // batch_size)
    return -(-stream_len // seq_len)


def iter_eval_chunks(ids, seq_len: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(x, y, mask)`` chunks, each ``[T, B]``, in which every character of
    ``ids`` but the first is a target exactly once (the first has nothing
    before it to be predicted from), for bits-per-character evaluation.

    The ``n - 1`` predictions are cut into ``B`` consecutive streams of
    ``ceil((n - 1) / B)`` and walked ``T`` at a time, so state may be carried
    from one chunk to the next as in training. Positions past a stream's end
    are padding: ``x = y = 0`` and ``mask = 0.0`` (float64, 1.0 elsewhere).
    Start each evaluation from the initial state: streams begin cold.
    A ``seq_len`` beyond a stream's length is cut to it: the chunks then
    hold the same predictions, and their size follows the text, not the flag.
    """
    ids = _ids(ids, "the evaluation text")
    T = _whole("evaluation", "seq_len", seq_len)
    B = _whole("evaluation", "batch_size", batch_size)
    n = len(ids)
    if n < 2:
        raise ValueError(f"the evaluation text has {n} character{'s' if n != 1 else ''}; it needs at least 2 "
                         "(one to read, one to predict)")
    targets = n - 1
    stream_len = -(-targets // B)
    T = min(T, stream_len)
    starts = np.arange(B) * stream_len  # [B]
    ends = np.minimum(starts + stream_len, targets)  # [B]
    for k in range(eval_chunk_count(n, T, B)):
        pos = starts[None, :] + k * T + np.arange(T)[:, None]  # [T, B] positions read
        valid = pos < ends[None, :]
        safe = np.where(valid, pos, 0)
        x = np.where(valid, ids[safe], 0)
        y = np.where(valid, ids[safe + 1], 0)
        yield x, y, valid.astype(np.float64)


# -- the stand-in corpus ------------------------------------------------------

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
