"""Checkpoints: round trip, atomic writes, and one clear sentence for every bad file."""

from __future__ import annotations

import io
import json
import math
import os
import zipfile

import numpy as np
import pytest

from unrolled.atomic import atomic_write_text, atomic_writer
from unrolled.train import checkpoint
from unrolled.train.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint


def _arrays(rng):
    return {
        "params/W_h": rng.normal(size=(4, 4)),
        "params/b": rng.normal(size=4).astype(np.float32),
        "optim/exp_avg/params/W_h": rng.normal(size=(4, 4)),
        "data/position": np.array(17, dtype=np.int64),
        "empty": np.zeros((0, 3)),
        "file": np.arange(3),  # would collide with np.savez's own argument name
    }


META = {"step": 12, "config": {"hidden": 4, "cell": "lstm", "lrs": [0.1, 0.01]}, "best_bpc": 1.5, "text": "héllo"}


def test_round_trip(tmp_path, rng):
    arrays = _arrays(rng)
    path = tmp_path / "latest.npz"
    save_checkpoint(path, arrays, META)
    back, meta = load_checkpoint(path)
    assert meta == META
    assert set(back) == set(arrays)
    for name, a in arrays.items():
        assert back[name].dtype == a.dtype and back[name].shape == a.shape, name
        np.testing.assert_array_equal(back[name], a)


def test_is_a_plain_npz_without_pickles(tmp_path, rng):
    path = tmp_path / "c.npz"
    save_checkpoint(path, _arrays(rng), {"step": np.int64(3), "loss": np.float32(0.5)})  # NumPy scalars are stored as numbers
    with np.load(path, allow_pickle=False) as npz:
        assert "params/W_h" in npz.files and checkpoint.META_KEY in npz.files
        assert b'"format": "unrolled-checkpoint", "version": 1' in npz[checkpoint.META_KEY].tobytes()
    assert load_checkpoint(path)[1] == {"step": 3, "loss": 0.5}


def test_save_then_overwrite(tmp_path, rng):
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"a": np.ones(2)}, {"n": 1})
    save_checkpoint(path, {"a": np.zeros(3)}, {"n": 2})
    arrays, meta = load_checkpoint(path)
    assert meta == {"n": 2} and arrays["a"].shape == (3,)
    assert os.listdir(tmp_path) == ["c.npz"]


def test_interrupted_save_keeps_the_previous_file(tmp_path, rng, monkeypatch):
    path = tmp_path / "latest.npz"
    save_checkpoint(path, {"a": np.ones(5)}, {"step": 1})
    real_write = checkpoint.npformat.write_array
    calls = []

    def write_then_die(fp, array, **kw):
        calls.append(1)
        if len(calls) == 2:  # the first array: write part of it, then "crash"
            fp.write(b"\x93NUMPY partial")
            raise KeyboardInterrupt
        return real_write(fp, array, **kw)

    monkeypatch.setattr(checkpoint.npformat, "write_array", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"a": np.zeros(1000)}, {"step": 2})
    monkeypatch.undo()
    arrays, meta = load_checkpoint(path)
    assert meta == {"step": 1}
    np.testing.assert_array_equal(arrays["a"], np.ones(5))
    assert os.listdir(tmp_path) == ["latest.npz"]  # the temporary file is gone


def test_failed_rename_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "latest.npz"
    save_checkpoint(path, {"a": np.ones(5)}, {"step": 1})

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"a": np.zeros(5)}, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)[1] == {"step": 1}
    assert os.listdir(tmp_path) == ["latest.npz"]


def test_atomic_writer_helpers(tmp_path):
    target = tmp_path / "log.txt"
    atomic_write_text(target, "one\n")
    with pytest.raises(RuntimeError):
        with atomic_writer(target) as f:
            f.write(b"two")
            raise RuntimeError("boom")
    assert target.read_text() == "one\n"
    reference = tmp_path / "plain.txt"
    reference.write_text("")  # the permissions an ordinary open() gives, not mkstemp's 0600
    assert target.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777
    with pytest.raises(ValueError, match="the folder .* does not exist"):
        atomic_write_text(tmp_path / "nope" / "x.txt", "")


def _rewrite(path, change):
    """Rebuild the archive with ``change(entries)`` applied to its raw arrays."""
    with np.load(path, allow_pickle=False) as npz:
        entries = {k: npz[k] for k in npz.files}
    change(entries)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, a in entries.items():
            with zf.open(name + ".npy", "w") as fh:
                np.lib.format.write_array(fh, a, allow_pickle=True)
    path.write_bytes(buf.getvalue())


def _saved(tmp_path, rng):
    path = tmp_path / "c.npz"
    save_checkpoint(path, _arrays(rng), META)
    return path


def test_missing_and_folder(tmp_path):
    with pytest.raises(ValueError, match=r"checkpoint .*nope.npz does not exist; check the path"):
        load_checkpoint(tmp_path / "nope.npz")
    with pytest.raises(ValueError, match="is a folder; pass a file such as .*latest.npz"):
        load_checkpoint(tmp_path)


def test_foreign_and_truncated_files(tmp_path, rng):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(ValueError, match=r"notes.txt is not an unrolled checkpoint: not a valid .npz archive"):
        load_checkpoint(text)
    path = _saved(tmp_path, rng)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"c.npz is not an unrolled checkpoint: not a valid .npz archive \(it may be truncated"):
        load_checkpoint(path)
    plain = tmp_path / "plain.npz"
    np.savez(plain, a=np.ones(2))
    with pytest.raises(ValueError, match="plain.npz is a .npz archive but not an unrolled checkpoint: it has no '__meta__.json'"):
        load_checkpoint(plain)


def test_wrong_format_tag(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    monkeypatch.setattr(checkpoint, "FORMAT", "someone-else")
    save_checkpoint(path, {"a": np.ones(2)}, {})
    monkeypatch.undo()
    with pytest.raises(ValueError, match="c.npz is not an unrolled checkpoint: its format tag is 'someone-else'"):
        load_checkpoint(path)


def test_newer_version(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    monkeypatch.setattr(checkpoint, "VERSION", 7)
    save_checkpoint(path, {"a": np.ones(2)}, {})
    monkeypatch.undo()
    with pytest.raises(ValueError, match="c.npz was written by unrolled format version 7; this unrolled reads version 1; upgrade unrolled"):
        load_checkpoint(path)


@pytest.mark.parametrize("change", [
    lambda e: e["params/W_h"].__setitem__((0, 0), 1.0),  # a weight edited
    lambda e: e.__setitem__("params/b", e["params/b"].astype(np.float64)),  # same values, other dtype
    lambda e: e.__setitem__("extra", np.ones(1)),  # an array slipped in
    lambda e: e.pop("empty"),  # an array removed
    lambda e: e.__setitem__("__meta__.json", np.frombuffer(e["__meta__.json"].tobytes().replace(b'"step": 12', b'"step": 13'), np.uint8)),
    lambda e: e.pop("__sha256__"),
])
def test_tampering_is_detected(tmp_path, rng, change):
    path = _saved(tmp_path, rng)
    _rewrite(path, change)
    with pytest.raises(ValueError, match="c.npz: checksum mismatch: the file was modified or damaged"):
        load_checkpoint(path)


def test_flipped_byte_is_detected(tmp_path, rng):
    path = _saved(tmp_path, rng)
    data = bytearray(path.read_bytes())
    at = data.index(np.asarray(_arrays(np.random.default_rng(1234))["params/W_h"]).tobytes()[:8])
    data[at + 3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="c.npz: checksum mismatch: the file was modified or damaged"):
        load_checkpoint(path)


def test_pickled_object_array_is_refused(tmp_path, rng):
    path = _saved(tmp_path, rng)
    _rewrite(path, lambda e: e.__setitem__("evil", np.array([print], dtype=object)))
    with pytest.raises(ValueError, match="array 'evil' holds pickled Python objects; refusing to load it"):
        load_checkpoint(path)


@pytest.mark.parametrize("arrays, meta, match", [
    ({"__meta__.json": np.ones(1)}, {}, "name '__meta__.json' is not allowed"),
    ({"": np.ones(1)}, {}, "name '' is not allowed"),
    ({"a": np.array(["x", None], dtype=object)}, {}, "'a' has dtype object"),
    ({"a": np.ones(1)}, {"version": 2}, "meta key 'version' is reserved"),
    ({"a": np.ones(1)}, {"w": np.ones(2)}, "meta is not JSON-able .*put arrays in `arrays`"),
    ({"a": np.ones(1)}, [1], "meta must be a dict"),
])
def test_bad_saves(tmp_path, arrays, meta, match):
    with pytest.raises(ValueError, match=match):
        save_checkpoint(tmp_path / "c.npz", arrays, meta)
    assert not os.listdir(tmp_path)


def test_resolve_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(ValueError, match="run folder .*run holds neither latest.npz nor best.npz"):
        resolve_checkpoint(run)
    save_checkpoint(run / "best.npz", {"a": np.ones(1)}, {})
    assert resolve_checkpoint(run) == run / "best.npz"
    save_checkpoint(run / "latest.npz", {"a": np.ones(1)}, {})
    assert resolve_checkpoint(run) == run / "latest.npz"
    assert resolve_checkpoint(run / "best.npz") == run / "best.npz"
    with pytest.raises(ValueError, match="does not exist"):
        resolve_checkpoint(tmp_path / "gone.npz")


# -- hostile archives: nothing is unpacked before its declared size is checked


def _npy_header(shape, dtype="<f8") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _crafted(path, entries, compression=zipfile.ZIP_STORED):
    """A zip of raw ``{entry name: bytes}``, each written with ``compression``."""
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def _meta_entry(meta=None) -> bytes:
    raw = json.dumps({"format": "unrolled-checkpoint", "version": 1, **(meta or {})}).encode()
    return _npy_header((len(raw),), "|u1") + raw


def _zeros_member(shape, chunk=1 << 22):
    """The .npy bytes of float64 zeros of ``shape``, as a generator of pieces (never all in memory)."""
    yield _npy_header(shape)
    left = math.prod(shape) * 8
    while left:
        n = min(chunk, left)
        yield bytes(n)
        left -= n


def _bomb(path, shape, compression):
    """A checkpoint whose one array is ``shape`` zeros, compressed: a small file that unpacks to a lot."""
    with zipfile.ZipFile(path, "w", compression=compression, compresslevel=9 if compression == zipfile.ZIP_DEFLATED else None) as zf:
        zf.writestr("__meta__.json.npy", _meta_entry())
        with zf.open("big.npy", "w", force_zip64=True) as f:
            for piece in _zeros_member(shape):
                f.write(piece)
        zf.writestr("__sha256__.npy", _npy_header((64,), "|u1") + b"0" * 64)
    return path


def _peak_bytes(fn):
    import tracemalloc
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def _refused_in_little_memory(path, match: str, limit: int = 5_000_000) -> None:
    """Loading ``path`` fails with ``match`` without ever holding more than ``limit`` bytes."""
    def load():
        with pytest.raises(ValueError, match=match):
            load_checkpoint(path)
    assert _peak_bytes(load) < limit


def test_bzip2_members_are_refused_unread(tmp_path):
    path = _bomb(tmp_path / "b.npz", (1_000_000,), zipfile.ZIP_BZIP2)  # 8 MB of zeros in a few hundred bytes; any size is refused
    assert path.stat().st_size < 100_000

    _refused_in_little_memory(path, r"b.npz: entry '__meta__.json.npy' is encrypted or compressed with zip "
                                    r"method 12; unrolled writes stored entries")


def test_deflate_bomb_is_refused_before_unpacking(tmp_path):
    path = _bomb(tmp_path / "d.npz", (12_500_000,), zipfile.ZIP_DEFLATED)  # 100 MB of zeros in ~100 kB
    assert path.stat().st_size < 1_000_000

    _refused_in_little_memory(path, r"d.npz: its arrays declare 100.0 MB, more than the 6\d.\d MB allowed "
                                    r"for a file of 0.\d MB; refusing to unpack it")
    with pytest.raises(ValueError, match="its arrays declare 100.0 MB, more than the 1.0 MB"):
        load_checkpoint(path, max_bytes=1_000_000)


def test_a_recompressed_checkpoint_still_loads(tmp_path, rng):
    path = _saved(tmp_path, rng)
    with zipfile.ZipFile(path) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    _crafted(tmp_path / "z.npz", entries, zipfile.ZIP_DEFLATED)
    arrays, meta = load_checkpoint(tmp_path / "z.npz")
    assert meta == META and np.array_equal(arrays["params/W_h"], load_checkpoint(path)[0]["params/W_h"])


@pytest.mark.parametrize("member, match", [
    (_npy_header((1_000_000_000,)) + bytes(16), r"array 'a' declares 8,000,000,000 bytes of data but its entry holds 16"),
    (_npy_header((2,)) + bytes(24), r"array 'a' declares 16 bytes of data but its entry holds 24"),
    (_npy_header((2, 2), "<f8").replace(b"False", b"True ") + bytes(32), r"array 'a' is float64 in Fortran order"),
    (_npy_header((2,), "<U3") + bytes(24), r"array 'a' is <U3, not a plain numeric array"),
    (b"\x93NUMPY\x01\x00" + (60_000).to_bytes(2, "little") + b" " * 16, r"array 'a': a .npy header of 60,000 bytes"),
    (b"PK-not-npy", r"array 'a': not a .npy array"),
])
def test_lying_array_headers_are_refused_before_reading(tmp_path, member, match):
    path = _crafted(tmp_path / "c.npz", {"__meta__.json.npy": _meta_entry(), "a.npy": member,
                                         "__sha256__.npy": _npy_header((64,), "|u1") + b"0" * 64})
    with pytest.raises(ValueError, match="c.npz: checksum mismatch: the file was modified or damaged \\(" + match):
        load_checkpoint(path)


def test_too_many_entries_and_duplicates(tmp_path, monkeypatch):
    entries = {"__meta__.json.npy": _meta_entry(), **{f"a{i}.npy": _npy_header((0,)) for i in range(12)}}
    monkeypatch.setattr(checkpoint, "MAX_MEMBERS", 10)
    with pytest.raises(ValueError, match="13 entries, more than the 10 a checkpoint may hold"):
        load_checkpoint(_crafted(tmp_path / "c.npz", entries))
    monkeypatch.undo()
    with zipfile.ZipFile(tmp_path / "d.npz", "w") as zf:
        zf.writestr("__meta__.json.npy", _meta_entry())
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr("__meta__.json.npy", _meta_entry({"x": 1}))
    with pytest.raises(ValueError, match=r"unexpected entry '__meta__.json.npy'"):
        load_checkpoint(tmp_path / "d.npz")


def test_check_sees_declared_shapes_before_any_array_is_read(tmp_path, rng, monkeypatch):
    path = _saved(tmp_path, rng)
    reads = []
    real = checkpoint._read_bytes
    monkeypatch.setattr(checkpoint, "_read_bytes", lambda zf, m, p, h=None: reads.append(m.name) or real(zf, m, p, h))
    seen = {}

    def check(meta, declared):
        seen.update(declared)
        assert reads == ["__meta__.json"]  # only the metadata so far
        raise ValueError("refused by the caller")
    with pytest.raises(ValueError, match="refused by the caller"):
        load_checkpoint(path, check=check)
    assert seen["params/W_h"] == (np.dtype("float64"), (4, 4)) and seen["empty"] == (np.dtype("float64"), (0, 3))
    assert reads == ["__meta__.json"]

