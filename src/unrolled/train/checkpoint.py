"""Checkpoints: named arrays plus JSON metadata in one ``.npz`` file, no pickles.

The file is an ordinary NumPy ``.npz`` archive (``np.load(path,
allow_pickle=False)`` opens it) with two reserved entries beside the arrays:

- ``__meta__.json``: the metadata as UTF-8 JSON bytes (a ``uint8`` array),
  carrying the format tag ``{"format": "unrolled-checkpoint", "version": 1}``;
- ``__sha256__``: the hex SHA-256 over the metadata and every array's name,
  dtype, shape and bytes, so that a damaged file (a truncated copy, a flipped
  bit, an edit by hand) is refused instead of quietly loading wrong weights.
  It guards against accidents only: anyone can recompute it, so it says
  nothing about who wrote the file.

Why this shape: loading an untrusted checkpoint must never run code (so no
pickle anywhere: numbers go in arrays, everything else in JSON), one file is
one thing to copy, and the atomic write (:mod:`unrolled.atomic`) means an
interrupted save leaves the previous checkpoint intact.

A checkpoint may come from anyone, so loading trusts nothing it declares:
the sizes in the zip entries and .npy headers are checked (against a bound,
and by the caller against the model they describe) before any array's bytes
are read, the bytes are read a piece at a time, and the checksum is verified
before any array is built (:func:`load_checkpoint`).

Array names are free-form strings (``"params/W_h"``, ``"optim/exp_avg/W_h"``)
except that names starting with ``__`` are reserved. Metadata keys
``format`` and ``version`` are reserved too; :func:`load_checkpoint` returns
the metadata exactly as it was given to :func:`save_checkpoint`.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import math
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib import format as npformat

from unrolled.atomic import atomic_writer

FORMAT = "unrolled-checkpoint"
VERSION = 1  # bump when a reader of the old version could misread the new files
META_KEY = "__meta__.json"
CHECKSUM_KEY = "__sha256__"
_RESERVED_META = ("format", "version")


def _check_arrays(arrays: dict) -> dict[str, np.ndarray]:
    out = {}
    for name, a in arrays.items():
        if not isinstance(name, str) or not name or name.startswith(("__", "/")) or "\0" in name or "\\" in name:
            raise ValueError(f"checkpoint array name {name!r} is not allowed: use a non-empty string without "
                             "'\\' or NUL that does not start with '/' or '__' (those are reserved)")
        a = np.asarray(a)
        if a.dtype.hasobject:
            raise ValueError(f"checkpoint array '{name}' has dtype object; checkpoints hold numeric arrays only "
                             "(put strings and other values in meta)")
        out[name] = _contiguous(a)
    return out


def _contiguous(a: np.ndarray) -> np.ndarray:
    # not np.ascontiguousarray: it turns a 0-d array into shape (1,)
    return a if a.flags.c_contiguous else a.copy(order="C")


def _json_default(o):
    if isinstance(o, np.generic):  # a NumPy scalar such as a float32 loss: store the number
        return o.item()
    raise TypeError(f"object of type {type(o).__name__} is not JSON serializable")


def _meta_bytes(meta: dict) -> bytes:
    if not isinstance(meta, dict):
        raise ValueError(f"checkpoint meta must be a dict, got {type(meta).__name__}")
    clash = [k for k in _RESERVED_META if k in meta]
    if clash:
        raise ValueError(f"checkpoint meta key '{clash[0]}' is reserved for the file format; rename it")
    header = {"format": FORMAT, "version": VERSION, **meta}
    try:
        return json.dumps(header, default=_json_default, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint meta is not JSON-able ({e}); put arrays in `arrays` and only numbers, "
                         "strings, booleans, lists and dicts in meta") from None


def _digest(meta_bytes: bytes, arrays: dict[str, np.ndarray]) -> str:
    h = _start_digest(meta_bytes)
    for name in sorted(arrays):
        a = _contiguous(arrays[name])
        _digest_header(h, name, a.dtype, a.shape)
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def _start_digest(meta_bytes: bytes):
    h = hashlib.sha256()
    h.update(len(meta_bytes).to_bytes(8, "little"))
    h.update(meta_bytes)
    return h


def _digest_header(h, name: str, dtype: np.dtype, shape: tuple) -> None:
    header = json.dumps([name, dtype.str, list(shape)]).encode("utf-8")
    h.update(len(header).to_bytes(8, "little"))  # length-prefixed: no two layouts hash alike
    h.update(header)


def save_checkpoint(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write ``arrays`` and the JSON-able ``meta`` to ``path`` atomically."""
    arrays = _check_arrays(arrays)
    meta_bytes = _meta_bytes(meta)
    digest = _digest(meta_bytes, arrays)
    entries = {
        META_KEY: np.frombuffer(meta_bytes, dtype=np.uint8),
        **arrays,
        CHECKSUM_KEY: np.frombuffer(digest.encode("ascii"), dtype=np.uint8),
    }
    with atomic_writer(path) as f:
        # What np.savez does, minus its keyword arguments (an array named
        # 'file' would collide with them) and with pickling refused.
        with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, a in entries.items():
                with zf.open(name + ".npy", mode="w", force_zip64=True) as member:
                    npformat.write_array(member, a, allow_pickle=False)


MAX_MEMBERS = 10_000  # arrays in one file: far more than a model has, far fewer than a zip can declare
MAX_META_BYTES = 16_000_000  # the JSON metadata
MAX_NPY_HEADER = 10_000  # an array's .npy header (NumPy's own bound)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Member:
    """One array of a checkpoint as its headers declare it, before any of its bytes are read."""

    name: str  # the array's name (the entry's, without .npy)
    dtype: np.dtype
    shape: tuple[int, ...]
    info: zipfile.ZipInfo  # its zip entry
    data_offset: int  # bytes of .npy header in front of the data

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def load_checkpoint(path: str | os.PathLike, *, check=None,
                    max_bytes: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Read a file written by :func:`save_checkpoint`: ``(arrays, meta)``.

    Refuses, with one sentence naming the file, anything that is not an
    intact checkpoint of a format version this code can read. A checkpoint
    may come from anyone, so nothing is unpacked on trust: every array's
    size, as its zip entry and .npy header declare it, is checked first
    (together at most ``max_bytes``, by default 64 MB plus 8 times the file's
    size, so a compressed entry cannot unpack to far more than the file
    holds); then ``check(meta, {name: (dtype, shape)})``, when given, may
    refuse the metadata and the declared shapes (``charmodel.load_model``
    checks them against the model they describe); only then are the bytes
    read, through bounded reads, and the SHA-256 verified before any array is
    built from them.

    The SHA-256 guards against accidents (a truncated copy, a flipped bit,
    an edit by hand), not against an attacker: anyone can recompute it. What
    keeps a hostile file harmless is that nothing in it is executed (no
    pickles) and every size and field is checked before it is used.
    """
    path = Path(path)
    zf = _open_archive(path)
    with zf:
        members = _members(zf, path)
        meta_member = members.pop(META_KEY, None)
        if meta_member is None:
            raise ValueError(f"{path} is a .npz archive but not an unrolled checkpoint: it has no '{META_KEY}' metadata")
        meta_bytes = _read_meta(zf, meta_member, path)
        header = _parse_meta(meta_bytes, path)
        digest_member = members.pop(CHECKSUM_KEY, None)
        if digest_member is None or digest_member.nbytes != 64 or digest_member.dtype != np.uint8:
            raise _damaged(path, f"no valid '{CHECKSUM_KEY}' entry")
        _check_total(members, path, max_bytes)
        meta = {k: v for k, v in header.items() if k not in _RESERVED_META}
        if check is not None:
            check(meta, {m.name: (m.dtype, m.shape) for m in members.values()})
        stored_digest = _read_bytes(zf, digest_member, path).tobytes()
        h = _start_digest(meta_bytes)
        buffers = {}
        for name in sorted(members):
            m = members[name]
            _digest_header(h, name, m.dtype, m.shape)
            buffers[name] = _read_bytes(zf, m, path, h)
    if not hmac.compare_digest(stored_digest, h.hexdigest().encode("ascii")):
        raise _damaged(path)
    arrays = {name: buf.view(members[name].dtype).reshape(members[name].shape) for name, buf in buffers.items()}
    return arrays, meta


def _damaged(path: Path, why: str = "") -> ValueError:
    return ValueError(f"{path}: checksum mismatch: the file was modified or damaged" + (f" ({why})" if why else ""))


def _open_archive(path: Path) -> zipfile.ZipFile:
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist; check the path")
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder; pass a file such as {path / 'latest.npz'}")
    if not path.is_file():  # a device reads without end (/dev/zero), a FIFO blocks: neither holds an archive
        raise ValueError(f"checkpoint {path} is not a regular file (a device, a pipe or a socket); pass a .npz file")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
        raise ValueError(f"{path} is not an unrolled checkpoint: not a valid .npz archive "
                         f"(it may be truncated, or a different kind of file: {e})") from None
    except OSError as e:
        raise ValueError(f"cannot read checkpoint {path}: {e.strerror or e}") from None


def _members(zf: zipfile.ZipFile, path: Path) -> dict[str, Member]:
    """Every entry's declared array, from its zip entry and .npy header alone."""
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise _damaged(path, f"{len(infos):,} entries, more than the {MAX_MEMBERS:,} a checkpoint may hold")
    members: dict[str, Member] = {}
    for info in infos:
        if not info.filename.endswith(".npy") or info.filename[:-4] in members:
            raise _damaged(path, f"unexpected entry {info.filename!r}")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.flag_bits & 0x1:
            raise ValueError(f"{path}: entry {info.filename!r} is encrypted or compressed with zip method "
                             f"{info.compress_type}; unrolled writes stored entries and reads stored or deflated "
                             f"ones only, so the file is not from unrolled")
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise _damaged(path, f"entry {info.filename!r} declares {info.file_size} bytes but stores {info.compress_size}")
        members[info.filename[:-4]] = _declared(zf, info, path)
    return members


def _declared(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> Member:
    name = info.filename[:-4]
    try:
        with zf.open(info) as f:
            magic = f.read(8)
            if len(magic) != 8 or magic[:6] != npformat.MAGIC_PREFIX or magic[6] not in (1, 2):
                raise ValueError("not a .npy array of format version 1 or 2")
            size_bytes = f.read(2 if magic[6] == 1 else 4)
            hlen = int.from_bytes(size_bytes, "little")
            if len(size_bytes) not in (2, 4) or hlen > MAX_NPY_HEADER:
                raise ValueError(f"a .npy header of {hlen:,} bytes")
            header = io.BytesIO(size_bytes + f.read(hlen))
            read = npformat.read_array_header_1_0 if magic[6] == 1 else npformat.read_array_header_2_0
            shape, fortran, dtype = read(header)
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error, ValueError, SyntaxError, TypeError) as e:
        raise _damaged(path, f"array '{name}': {e}") from None
    if dtype.hasobject:
        raise ValueError(f"{path}: array '{name}' holds pickled Python objects; refusing to load it "
                         "(checkpoints never contain pickles, so the file is not from unrolled)")
    if dtype.kind not in "biufc" or dtype.fields is not None or dtype.subdtype is not None or fortran:
        raise _damaged(path, f"array '{name}' is {dtype}{' in Fortran order' if fortran else ''}, not a plain numeric array")
    if not all(isinstance(n, int) and n >= 0 for n in shape):
        raise _damaged(path, f"array '{name}' has shape {shape}")
    member = Member(name, dtype, tuple(shape), info, 8 + len(size_bytes) + hlen)
    if member.data_offset + member.nbytes != info.file_size:
        raise _damaged(path, f"array '{name}' declares {member.nbytes:,} bytes of data but its entry holds "
                             f"{info.file_size - member.data_offset:,}")
    return member


def _check_total(members: dict[str, Member], path: Path, max_bytes: int | None) -> None:
    size = path.stat().st_size
    limit = max_bytes if max_bytes is not None else 64_000_000 + 8 * size
    total = sum(m.nbytes for m in members.values())
    if total > limit:
        raise ValueError(f"{path}: its arrays declare {total / 1e6:,.1f} MB, more than the {limit / 1e6:,.1f} MB "
                         f"allowed for a file of {size / 1e6:,.1f} MB; refusing to unpack it (the file is damaged, "
                         f"or built to exhaust memory)")


def _read_meta(zf: zipfile.ZipFile, m: Member, path: Path) -> bytes:
    if m.dtype != np.uint8 or len(m.shape) != 1:
        raise _damaged(path, "its metadata is not JSON")
    if m.nbytes > MAX_META_BYTES:
        raise _damaged(path, f"{m.nbytes:,} bytes of metadata, more than {MAX_META_BYTES:,}")
    return _read_bytes(zf, m, path).tobytes()


def _parse_meta(meta_bytes: bytes, path: Path) -> dict:
    try:
        header = json.loads(meta_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise _damaged(path, "its metadata is not JSON")
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} is not an unrolled checkpoint: its format tag is {header.get('format')!r:.80}, "
                         f"expected '{FORMAT}'")
    version = header.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _damaged(path, f"format version {version!r:.80}")
    if version > VERSION:
        raise ValueError(f"{path} was written by unrolled format version {version}; this unrolled reads "
                         f"version {VERSION}; upgrade unrolled")
    return header


def _read_bytes(zf: zipfile.ZipFile, m: Member, path: Path, h=None) -> np.ndarray:
    """The declared bytes of ``m``'s data, read a piece at a time (a lying entry cannot make one huge read)."""
    out = np.empty(m.nbytes, dtype=np.uint8)
    view = memoryview(out)
    try:
        with zf.open(m.info) as f:
            f.read(m.data_offset)
            got = 0
            while got < m.nbytes:
                piece = f.read(min(_CHUNK, m.nbytes - got))
                if not piece:
                    raise EOFError(f"array '{m.name}' ends after {got:,} of its {m.nbytes:,} bytes")
                view[got:got + len(piece)] = piece
                got += len(piece)
            f.read(1)  # to the entry's end, where zipfile checks its CRC-32
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
        raise _damaged(path, str(e)) from None
    if h is not None:
        h.update(view)
    return out


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint file meant by ``path``: the file itself, or for a run
    folder its ``latest.npz``, else its ``best.npz``."""
    path = Path(path)
    if path.is_dir():
        for name in ("latest.npz", "best.npz"):
            if (path / name).is_file():
                return path / name
        raise ValueError(f"run folder {path} holds neither latest.npz nor best.npz; pass a checkpoint file instead")
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist; check the path")
    return path
