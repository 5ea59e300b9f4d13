"""Checkpoints from anyone: every metadata field is checked by type and range, and every array's declared
size against the model it describes, before anything is unpacked; the command line says one line."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from unrolled.charlm.model import ModelConfig, TrainConfig, checkpoint_contents, init_params, load_model
from unrolled.cli import main
from unrolled.train.checkpoint import load_checkpoint, save_checkpoint

VOCAB = list("\n abcdefgh")
CONFIG = ModelConfig(cell="lstm", hidden=8, layers=1, vocab_size=len(VOCAB))


def model_file(tmp_path, name="m.npz", edit=None, train=None):
    """A model-only checkpoint (valid checksum) with ``edit(arrays, meta)`` applied before saving."""
    arrays, meta = checkpoint_contents(CONFIG, train or TrainConfig(seq=6, batch=3), VOCAB, init_params(CONFIG, 0))
    if edit:
        edit(arrays, meta)
    save_checkpoint(tmp_path / name, arrays, meta)
    return tmp_path / name


def one_line(capsys, rc, *needles):
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


def setter(section, key, value):
    return lambda arrays, meta: meta[section].__setitem__(key, value)


@pytest.mark.parametrize("edit, needle", [
    (setter("train", "seq", 1e8), "field 'train.seq' is 100000000.0, not a whole number"),
    (setter("train", "seq", 10 ** 8), "field 'train.seq' is 100,000,000, more than the 100,000 a checkpoint may ask for"),
    (lambda a, m: m["train"].update(seq=1000, batch=20_000),
     "a chunk of train.seq 1,000 × train.batch 20,000 characters is more than the 10,000,000"),
    (setter("train", "lr", "fast"), "field 'train.lr' is 'fast', not a finite number"),
    (setter("model", "hidden", True), "field 'model.hidden' is True, not a whole number"),
    (setter("model", "cell", 3), "field 'model.cell' is 3, not a string"),
    (setter("model", "layers", 10 ** 6), "field 'model.layers' is 1,000,000, more than the 1,000"),
    (setter("train", "seq", -5), "sequence length (--seq) is -5"),
    (lambda a, m: m.__setitem__("model", [1]), "field 'model' is [1], not a JSON object"),
    (lambda a, m: m.__setitem__("vocabulary", "abc"), "its vocabulary is missing"),
    (lambda a, m: m.__setitem__("kind", {"x": 1}), "is not a language-model checkpoint"),
])
def test_bad_metadata_fields_are_named(tmp_path, capsys, edit, needle):
    path = model_file(tmp_path, edit=edit)
    with pytest.raises(ValueError, match="m.npz holds an unusable model|m.npz is not a language-model"):
        load_model(path)
    text = tmp_path / "t.txt"
    text.write_text("abc abc\n" * 4)
    one_line(capsys, main(["evaluate", str(path), str(text)]), "m.npz", needle)


def test_parameters_declared_with_another_shape_are_refused_unread(tmp_path):
    def grow(arrays, meta):
        arrays["param.out.W"] = np.zeros((len(VOCAB), 9), np.float32)
    with pytest.raises(ValueError, match=r"parameter 'out.W' is float32\[10, 9\] but the model needs float32\[10, 8\]"):
        load_model(model_file(tmp_path, edit=grow))

    def history(arrays, meta):  # far more than a model of this size can need
        arrays["history/train_loss"] = np.zeros(40_000_000, np.float64)
    path = model_file(tmp_path, edit=history)
    with pytest.raises(ValueError, match=r"its arrays besides the parameters declare 320.0 MB, more than the 256.\d MB"):
        load_model(path)


def _npy(a_or_shape, dtype=None) -> bytes:
    buf = io.BytesIO()
    if dtype is None:
        np.lib.format.write_array(buf, a_or_shape)
    else:
        np.lib.format.write_array_header_1_0(buf, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                   "shape": a_or_shape})
    return buf.getvalue()


def test_a_deflated_bomb_posing_as_parameters_is_refused_unread(tmp_path):
    """A model that needs 100 MB of parameters, written as compressed zeros: the file is small, the sizes
    it declares are the model's, and nothing is unpacked."""
    import json
    import math
    import tracemalloc

    from unrolled.charlm.model import build_graph

    big = ModelConfig(cell="elman", hidden=5000, layers=1, vocab_size=len(VOCAB))
    _, meta = checkpoint_contents(big, TrainConfig(seq=6, batch=3), VOCAB, {})
    raw = json.dumps({"format": "unrolled-checkpoint", "version": 1, **meta}).encode()
    path = tmp_path / "z.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("__meta__.json.npy", _npy(np.frombuffer(raw, np.uint8)))
        for name, p in build_graph(big, train=False).params.items():
            with zf.open(f"param.{name}.npy", "w", force_zip64=True) as f:
                f.write(_npy(p.shape, np.float32))
                for _ in range(p.shape[0]):
                    f.write(bytes(4 * math.prod(p.shape[1:])))
        zf.writestr("__sha256__.npy", _npy(np.frombuffer(b"0" * 64, np.uint8)))
    assert path.stat().st_size < 500_000
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"z.npz: its arrays declare 100.\d MB, more than the 6\d.\d MB allowed"):
            load_model(path)
        assert tracemalloc.get_traced_memory()[1] < 20_000_000
    finally:
        tracemalloc.stop()


@pytest.fixture
def run(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat\n" * 40)
    out = tmp_path / "run"
    assert main(["train", str(text), "--engine", "reference", "--hidden", "8", "--layers", "1", "--seq", "6",
                 "--batch", "3", "--steps", "2", "--sample-every", "0", "--out", str(out)]) == 0
    return out


def _edited_run(run, tmp_path, edit):
    arrays, meta = load_checkpoint(run / "latest.npz")
    edit(meta)
    (tmp_path / "bad").mkdir()
    save_checkpoint(tmp_path / "bad" / "latest.npz", arrays, meta)
    return tmp_path / "bad"


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.__setitem__("trainer", [1, 2]), "field 'trainer' is [1, 2], not a JSON object"),
    (lambda m: m["trainer"].__setitem__("rng", "seven"), "its training state is damaged or foreign"),
    (lambda m: m["trainer"].__setitem__("optimizer", 3), "cannot resume from"),
    (lambda m: m["trainer"].__setitem__("tbptt", {"kind": "truncated_bptt", "k1": "x"}), "cannot resume from"),
    (lambda m: m["data"].__setitem__("position", 1.5), "field 'data.position' is 1.5, not a whole number"),
    (lambda m: m["best"].__setitem__("val_bpc", "low"), "field 'best.val_bpc' is 'low', not a number"),
    (lambda m: m.__setitem__("train_seconds", -1), "field 'train_seconds' is -1, not a number of at least 0"),
    (lambda m: m.__setitem__("engine", 7), "field 'engine' is 7, not an engine's name"),
    (lambda m: m["trainer"].__setitem__("step", "2"), "field 'trainer.step' is '2', not a whole number"),
    (lambda m: m.pop("data"), "holds a model but not the training state to resume it (no 'data')"),
])
def test_bad_run_fields_on_resume_are_named(run, tmp_path, capsys, edit, needle):
    bad = _edited_run(run, tmp_path, edit)
    capsys.readouterr()
    one_line(capsys, main(["train", "--resume", str(bad), "--steps", "4"]), needle)


def test_a_device_posing_as_a_checkpoint_is_refused_unread(tmp_path, capsys):
    """Found by tests/cli_battery.py: a link to /dev/zero read without end (9 GB, then killed)."""
    link = tmp_path / "zero.npz"
    link.symlink_to("/dev/zero")
    with pytest.raises(ValueError, match="zero.npz is not a regular file"):
        load_checkpoint(link)
    text = tmp_path / "t.txt"
    text.write_text("abc abc\n" * 4)
    one_line(capsys, main(["evaluate", str(link), str(text)]), "zero.npz", "not a regular file")
