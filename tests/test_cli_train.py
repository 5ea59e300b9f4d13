"""`unrolled train` end to end, in-process, on a tiny corpus in a temporary folder.

Each run is a tiny model (one LSTM layer of 16-24, chunks of 8-12 × 4-6) on
the reference engine, so the whole file runs in seconds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from unrolled.charlm import corpus as lm_corpus
from unrolled.charlm.loss_plot import plot_losses
from unrolled.charlm.model import load_model
from unrolled.cli import main
from unrolled.train.checkpoint import load_checkpoint
from unrolled.train.trainer import Trainer

WORDS = "the cat sat on a mat and the dog ran to the red barn while small birds sang".split()


def corpus(n_lines: int = 200, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), 8)) for _ in range(n_lines)) + "\n"


TINY = ["--engine", "reference", "--hidden", "16", "--layers", "1", "--seq", "8", "--batch", "4",
        "--sample-every", "0"]


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "tiny.txt"
    p.write_text(corpus())
    return p


def one_line_error(capsys, rc, *needles):
    """The command failed with one line on stderr (no traceback) that says all of ``needles``."""
    err = capsys.readouterr().err
    assert rc != 0
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_train_end_to_end(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    rc = main(["train", str(text_file), "--engine", "reference", "--hidden", "24", "--layers", "1", "--seq", "12",
               "--batch", "6", "--lr", "0.01", "--steps", "40", "--eval-every", "20", "--sample-every", "20",
               "--sample-length", "30", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert f"writing to {out}" in printed
    assert "--- sample at step 20 ---" in printed and "--- sample at step 40 ---" in printed
    assert "validation" in printed and "bits/char" in printed

    # The loss went down, and validation was measured at the intervals.
    arrays, meta = load_checkpoint(out / "latest.npz")
    losses = arrays["history/train_loss"]
    assert len(losses) == 40 and meta["step"] == 40
    assert losses[-5:].mean() < losses[:5].mean() - 0.3
    val = arrays["history/val"]
    assert val[:, 0].tolist() == [20, 40]
    assert val[-1, 1] < math.log2(len(set(text_file.read_text())))  # better than a uniform guess

    # best.npz holds the lowest validation loss; both round-trip to a usable model.
    best_val = meta["best"]["val_bpc"]
    assert best_val == val[:, 1].min()
    for name in ("latest.npz", "best.npz"):
        m = load_model(out / name)
        assert m.model.hidden == 24 and m.model.vocab_size == len(set(text_file.read_text()))
        assert set(m.params) == set(m.graph.params)
    latest = load_model(out)  # a run folder means its latest.npz
    assert latest.path.name == "latest.npz"

    # The picture exists and is not blank.
    import matplotlib.image

    img = matplotlib.image.imread(out / "loss.png")
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.05


def test_loss_curve_png_is_drawn_with_few_points():
    png = plot_losses([3.0, 2.9], [(2, 4.0)], "t")
    assert png.startswith(b"\x89PNG")
    assert plot_losses([], [], "empty").startswith(b"\x89PNG")


def test_minutes_limit_stops_the_run(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    rc = main(["train", str(text_file), *TINY, "--minutes", "0.0005", "--out", str(out)])
    assert rc == 0
    _, meta = load_checkpoint(out / "latest.npz")
    assert meta["train"]["steps"] == 0  # a time limit alone sets no step limit
    assert 1 <= meta["step"] < 1000
    assert "done: step" in capsys.readouterr().out


def test_builtin_corpus_without_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lm_corpus, "builtin_corpus", lambda: corpus(60, seed=1))
    out = tmp_path / "run"
    rc = main(["train", *TINY, "--steps", "2", "--out", str(out)])
    assert rc == 0
    _, meta = load_checkpoint(out / "latest.npz")
    assert meta["text"]["files"] == [] and meta["text"]["source"] == lm_corpus.BUILTIN_NAME
    assert "Python standard library" in capsys.readouterr().out


def test_default_out_dir_is_under_runs(tmp_path, text_file, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["train", str(text_file), *TINY, "--steps", "1"])
    assert rc == 0
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "latest.npz").is_file()
    assert f"writing to {runs[0].relative_to(tmp_path)}" in capsys.readouterr().out


def test_dropout_gru_embedding_and_truncation_options(tmp_path, text_file):
    out = tmp_path / "run"
    rc = main(["train", str(text_file), *TINY, "--cell", "gru", "--layers", "2", "--dropout", "0.3",
               "--embedding", "8", "--k1", "4", "--k2", "8", "--optimizer", "rmsprop", "--steps", "4",
               "--out", str(out)])
    assert rc == 0
    m = load_model(out)
    assert (m.model.cell, m.model.layers, m.model.dropout, m.model.embedding) == ("gru", 2, 0.3, 8)
    assert (m.train.bptt_k1, m.train.bptt_k2) == (4, 8)
    assert not any("dropout" in v for v in m.graph.vertices)  # sampling graphs have no dropout inputs


# ------------------------------------------------------------------ bad input


def test_missing_file(tmp_path, capsys):
    rc = main(["train", str(tmp_path / "nope.txt"), *TINY, "--out", str(tmp_path / "r")])
    one_line_error(capsys, rc, "nope.txt", "no such file")


def test_empty_file(tmp_path, capsys):
    p = tmp_path / "empty.txt"
    p.write_text("")
    rc = main(["train", str(p), *TINY, "--out", str(tmp_path / "r")])
    one_line_error(capsys, rc, "empty.txt", "empty")


def test_binary_file(tmp_path, capsys):
    p = tmp_path / "data.bin"
    p.write_bytes(bytes(range(256)) * 4)
    rc = main(["train", str(p), *TINY, "--out", str(tmp_path / "r")])
    one_line_error(capsys, rc, "data.bin", "binary")


def test_non_utf8_file_offers_encoding(tmp_path, capsys):
    p = tmp_path / "latin.txt"
    p.write_bytes(corpus().replace("cat", "café").encode("latin-1"))
    rc = main(["train", str(p), *TINY, "--out", str(tmp_path / "r")])
    one_line_error(capsys, rc, "latin.txt", "utf-8", "--encoding")
    rc = main(["train", str(p), *TINY, "--encoding", "latin-1", "--steps", "1", "--out", str(tmp_path / "r")])
    assert rc == 0
    assert "é" in load_model(tmp_path / "r").vocabulary


def test_text_shorter_than_one_sequence(tmp_path, capsys):
    p = tmp_path / "short.txt"
    p.write_text("the cat sat")
    rc = main(["train", str(p), *TINY, "--out", str(tmp_path / "r")])
    line = one_line_error(capsys, rc, "short.txt", "too short", "--seq", "--batch")
    assert "11 characters" in line


def test_unwritable_output_folder(tmp_path, text_file, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    rc = main(["train", str(text_file), *TINY, "--out", str(blocker / "run")])
    one_line_error(capsys, rc, "cannot write to the output folder", "--out")


def test_output_folder_holding_a_run_is_not_overwritten(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    assert main(["train", str(text_file), *TINY, "--steps", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    rc = main(["train", str(text_file), *TINY, "--steps", "1", "--out", str(out)])
    one_line_error(capsys, rc, "already holds a run", "--resume")


def test_bad_settings_are_one_line(tmp_path, text_file, capsys):
    rc = main(["train", str(text_file), *TINY, "--k1", "9", "--k2", "4", "--out", str(tmp_path / "r")])
    one_line_error(capsys, rc, "k1")
    rc = main(["train", str(text_file), *TINY, "--dropout", "1.5", "--out", str(tmp_path / "r")])
    one_line_error(capsys, rc, "dropout")
    rc = main(["train", str(text_file), *TINY, "--lr-schedule", "cosine", "--steps", "0", "--out", str(tmp_path / "r")])
    one_line_error(capsys, rc, "cosine", "--steps", "--minutes")


def test_huge_learning_rate_stops_with_the_step(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    rc = main(["train", str(text_file), *TINY, "--lr", "1e38", "--clip", "0", "--steps", "20", "--out", str(out)])
    line = one_line_error(capsys, rc, "became nan at step", "--lr")
    assert "no checkpoint had been saved yet" in line
    assert not (out / "latest.npz").exists()


def test_nan_loss_keeps_the_last_good_checkpoint(tmp_path, text_file, capsys, monkeypatch):
    original = Trainer.train_step

    def poisoned(self, inputs, *a, **kw):
        if self.step_count == 6:  # the 7th update meets a NaN weight
            self.params["out.W"][0, 0] = np.nan
        return original(self, inputs, *a, **kw)

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    out = tmp_path / "run"
    rc = main(["train", str(text_file), *TINY, "--steps", "20", "--eval-every", "4", "--out", str(out)])
    line = one_line_error(capsys, rc, "at step 7", str(out / "latest.npz"), "(step 4)")
    assert "nan" in line
    m = load_model(out / "latest.npz")  # still loads: NaN weights would be refused
    assert m.meta["step"] == 4
    assert (out / "loss.png").is_file()


def test_folder_as_the_corpus(tmp_path, capsys):
    folder = tmp_path / "texts"
    (folder / "more").mkdir(parents=True)
    (folder / "b.txt").write_text(corpus(100, seed=2))
    (folder / "a.txt").write_text(corpus(100, seed=1))
    (folder / "more" / "c.txt").write_text(corpus(50, seed=3))
    (folder / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    out = tmp_path / "run"
    assert main(["train", str(folder), *TINY, "--steps", "2", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"{folder}: 3 text files, read in sorted order; 1 binary file left out (logo.png)" in said
    text = load_checkpoint(out / "latest.npz")[1]["text"]
    assert text["files"] == ["../texts/a.txt", "../texts/b.txt", "../texts/more/c.txt"]
    assert text["chars"] == len(corpus(100, seed=1) + corpus(100, seed=2) + corpus(50, seed=3))
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, main(["train", str(tmp_path / "empty"), *TINY]), "is a folder without text files")


def test_standard_input_as_the_corpus(tmp_path, monkeypatch, capsys):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(corpus().encode())))
    out = tmp_path / "run"
    assert main(["train", "-", *TINY, "--steps", "2", "--out", str(out)]) == 0
    meta = load_checkpoint(out / "latest.npz")[1]
    assert meta["text"]["files"] == ["-"] and meta["text"]["chars"] == len(corpus())
    capsys.readouterr()
    one_line_error(capsys, main(["train", "--resume", str(out), "--steps", "3"]),
                   "was trained on standard input; pipe the same text again")


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_devices_are_refused(tmp_path, capsys, device):
    one_line_error(capsys, main(["train", device, *TINY, "--out", str(tmp_path / "r")]),
                   f"{device} is a character device, not a regular file; pass a text file, or - to read standard input")


def test_fifo_is_refused_without_hanging(tmp_path, capsys):
    import os
    import subprocess
    import sys

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    try:  # a subprocess, so that a hang is a timeout, not a stuck test run
        r = subprocess.run([sys.executable, "-m", "unrolled", "train", str(fifo), "--out", str(tmp_path / "r")],
                           capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("unrolled train waited on a FIFO")
    assert r.returncode == 1 and "pipe is a FIFO (named pipe), not a regular file" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_text_over_the_limit_is_refused(tmp_path, text_file, capsys):
    one_line_error(capsys, main(["train", str(text_file), *TINY, "--max-text-mb", "0.001", "--out", str(tmp_path / "r")]),
                   "tiny.txt holds more than 0.001 MB, the limit on a text read whole; raise it with --max-text-mb")
    one_line_error(capsys, main(["train", str(text_file), *TINY, "--max-text-mb", "nan"]), "--max-text-mb nan")
