"""Reading text files for a character model: bytes, encodings, folders of texts.

Every way a corpus can fail to be text (a missing file, a folder, a FIFO that
would hang, a file too big to hold whole, a binary file, bytes invalid in the
encoding) ends here in one sentence that names the file and the fix, before
anything is built from it. Newlines are normalized the way Python's text mode
does, so a Windows file does not add ``\\r`` to a vocabulary.
"""

from __future__ import annotations

import codecs
import os
import stat
from pathlib import Path


def normalize_newlines(text: str) -> str:
    """``\\r\\n`` and ``\\r`` as ``\\n``: what Python's text mode does."""
    # A Windows file must not add '\r' to the vocabulary.
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
        raise ValueError(f"unknown text encoding {encoding!r} (--encoding); try utf-8 or latin-1") from None
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
    text = normalize_newlines(text.removeprefix("\ufeff"))
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
