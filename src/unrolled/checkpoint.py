"""Checkpoints: named arrays plus JSON metadata in one ``.npz`` file, no pickles.

The file is an ordinary NumPy ``.npz`` archive (``np.load(path,
allow_pickle=False)`` opens it) with two reserved entries beside the arrays:

- ``__meta__.json``: the metadata as UTF-8 JSON bytes (a ``uint8`` array),
  carrying the format tag ``{"format": "unrolled-checkpoint", "version": 1}``;
- ``__sha256__``: the hex SHA-256 over the metadata and every array's name,
  dtype, shape and bytes, so that a modified or damaged file is refused
  instead of quietly loading wrong weights.

Why this shape: loading an untrusted checkpoint must never run code (so no
pickle anywhere: numbers go in arrays, everything else in JSON), one file is
one thing to copy, and the atomic write (:mod:`unrolled.atomic`) means an
interrupted save leaves the previous checkpoint intact.

Array names are free-form strings (``"params/W_h"``, ``"optim/exp_avg/W_h"``)
except that names starting with ``__`` are reserved. Metadata keys
``format`` and ``version`` are reserved too; :func:`load_checkpoint` returns
the metadata exactly as it was given to :func:`save_checkpoint`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
from numpy.lib import format as npformat

from .atomic import atomic_writer

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
    h = hashlib.sha256()
    h.update(len(meta_bytes).to_bytes(8, "little"))
    h.update(meta_bytes)
    for name in sorted(arrays):
        a = _contiguous(arrays[name])
        header = json.dumps([name, a.dtype.str, list(a.shape)]).encode("utf-8")
        h.update(len(header).to_bytes(8, "little"))  # length-prefixed: no two layouts hash alike
        h.update(header)
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


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


def _read_member(zf: zipfile.ZipFile, entry: str, path: Path) -> np.ndarray:
    try:
        with zf.open(entry) as member:
            return npformat.read_array(member, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise ValueError(f"{path}: array '{entry[:-4]}' holds pickled Python objects; refusing to load it "
                             "(checkpoints never contain pickles, so the file is not from unrolled)") from None
        raise ValueError(f"{path}: checksum mismatch: the file was modified or damaged ({e})") from None
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error, MemoryError) as e:
        raise ValueError(f"{path}: checksum mismatch: the file was modified or damaged ({e})") from None


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read a file written by :func:`save_checkpoint`: ``(arrays, meta)``.

    Refuses, with one sentence naming the file, anything that is not an
    intact checkpoint of a format version this code can read.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist; check the path")
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder; pass a file such as {path / 'latest.npz'}")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path} is not an unrolled checkpoint: not a valid .npz archive "
                         f"(it may be truncated, or a different kind of file: {e})") from None
    except OSError as e:
        raise ValueError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    with zf:
        names = zf.namelist()
        if META_KEY + ".npy" not in names:
            raise ValueError(f"{path} is a .npz archive but not an unrolled checkpoint: it has no '{META_KEY}' metadata")
        meta_array = _read_member(zf, META_KEY + ".npy", path)
        meta_bytes = meta_array.tobytes()
        try:
            header = json.loads(meta_bytes.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
        if not isinstance(header, dict) or meta_array.dtype != np.uint8:
            raise ValueError(f"{path}: checksum mismatch: the file was modified or damaged (its metadata is not JSON)")
        if header.get("format") != FORMAT:
            raise ValueError(f"{path} is not an unrolled checkpoint: its format tag is {header.get('format')!r}, "
                             f"expected '{FORMAT}'")
        version = header.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"{path}: checksum mismatch: the file was modified or damaged (format version {version!r})")
        if version > VERSION:
            raise ValueError(f"{path} was written by unrolled format version {version}; this unrolled reads "
                             f"version {VERSION}; upgrade unrolled")
        arrays: dict[str, np.ndarray] = {}
        stored_digest = None
        for entry in names:
            if entry == META_KEY + ".npy":
                continue
            if not entry.endswith(".npy"):
                raise ValueError(f"{path}: checksum mismatch: the file was modified or damaged (unexpected entry {entry!r})")
            if entry == CHECKSUM_KEY + ".npy":
                stored_digest = _read_member(zf, entry, path).tobytes()
            else:
                arrays[entry[:-4]] = _read_member(zf, entry, path)
    if stored_digest is None:
        raise ValueError(f"{path}: checksum mismatch: the file was modified or damaged (no '{CHECKSUM_KEY}' entry)")
    if not hmac.compare_digest(stored_digest, _digest(meta_bytes, arrays).encode("ascii")):
        raise ValueError(f"{path}: checksum mismatch: the file was modified or damaged")
    meta = {k: v for k, v in header.items() if k not in _RESERVED_META}
    return arrays, meta


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
