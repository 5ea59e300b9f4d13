"""What a training run reports while it goes: divergence, compiling, progress lines, metrics.csv."""

from __future__ import annotations

import csv
import importlib.machinery
import io
import math
import sys
import types

import numpy as np
import pytest
from test_cli_train import TINY, corpus, one_line_error

from unrolled.charlm import run as lm_train
from unrolled.charlm import run_budget, run_report
from unrolled.cli import main
from unrolled.engines.compiled.kernels import compiling
from unrolled.train.checkpoint import load_checkpoint
from unrolled.train.divergence import PATIENCE, DivergenceWatch
from unrolled.train.runlog import COLUMNS
from unrolled.train.trainer import Trainer


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "tiny.txt"
    p.write_text(corpus())
    return p


def read_metrics(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == list(COLUMNS)
    return rows


# ------------------------------------------------------------------ divergence


def test_a_finite_but_exploding_loss_stops_the_run_before_saving(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    rc = main(["train", str(text_file), *TINY, "--optimizer", "sgd", "--lr", "1000", "--clip", "0",
               "--steps", "400", "--eval-every", "400", "--out", str(out)])
    line = one_line_error(capsys, rc, "training diverged by step", "smoothed training loss", "--lr")
    assert rc == 1 and "no checkpoint had been saved yet" in line
    assert not (out / "best.npz").exists() and not (out / "latest.npz").exists()
    rows = read_metrics(out / "metrics.csv")  # the log shows what happened
    assert float(rows[-1]["train_bpc"]) > 2 * math.log2(18)


def test_a_diverged_validation_is_not_saved_as_best(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    rc = main(["train", str(text_file), *TINY, "--optimizer", "sgd", "--lr", "1000", "--clip", "0",
               "--steps", "12", "--eval-every", "6", "--out", str(out)])
    line = one_line_error(capsys, rc, "training diverged by step 6", "validation scored")
    assert "no checkpoint had been saved yet" in line
    assert not (out / "best.npz").exists() and not (out / "latest.npz").exists()


def test_divergence_names_the_last_good_checkpoints(tmp_path, text_file, capsys, monkeypatch):
    original = Trainer.train_step

    def blown(self, inputs, *a, **kw):
        stats = original(self, inputs, *a, **kw)
        if self.step_count > 4:  # after step 4 (saved), the loss is huge but finite
            stats.loss = 1e4
        return stats

    monkeypatch.setattr(Trainer, "train_step", blown)
    out = tmp_path / "run"
    rc = main(["train", str(text_file), *TINY, "--steps", "200", "--eval-every", "0", "--checkpoint-every", "4",
               "--out", str(out)])
    line = one_line_error(capsys, rc, f"training diverged by step {4 + PATIENCE}", str(out / "latest.npz"), "(step 4)")
    assert rc == 1 and "--lr" in line
    _, meta = load_checkpoint(out / "latest.npz")  # not overwritten while the loss climbed
    assert meta["step"] == 4


def test_noise_and_a_single_spike_do_not_count_as_divergence():
    watch = DivergenceWatch(vocab_size=30)
    rng = np.random.default_rng(0)
    losses = 3.4 - np.linspace(0, 2, 500) + rng.normal(0, 0.3, 500)
    losses[250] = 200.0  # one terrible batch
    assert all(watch.update(float(l)) is None for l in losses)
    assert watch.validation(4.0, best_val_bpc=2.0) is None  # worse than the best, but not by a uniform guess
    assert "validation scored" in watch.validation(2.0 + math.log2(30) + 0.1, best_val_bpc=2.0)


def test_a_loss_far_above_its_best_for_long_enough_is_divergence():
    watch = DivergenceWatch(vocab_size=30)
    for _ in range(100):
        watch.update(1.0)
    reasons = [watch.update(1.0 + 2 * math.log(30)) for _ in range(200)]
    first = next(i for i, r in enumerate(reasons) if r)
    assert 0 < first < 200 and "bits/char" in reasons[first]


# ------------------------------------------------------------ compiling, budgets


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake_compile(clock, seconds):
    """What Numba's compile event does, on a fake clock: the notice, then the seconds counted."""
    compiling.started()
    clock.now += seconds
    compiling.ended()


def test_compiling_is_announced_once_and_kept_out_of_the_minutes(tmp_path, text_file, capsys, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(compiling, "clock", clock)
    monkeypatch.setattr(run_budget, "clock", clock)
    original = Trainer.train_step

    def step(self, inputs, *a, **kw):
        if self.step_count == 0:
            fake_compile(clock, 1000.0)  # the first update compiles for longer than the whole budget
        clock.now += 1.0  # every update takes one second
        return original(self, inputs, *a, **kw)

    monkeypatch.setattr(Trainer, "train_step", step)
    out = tmp_path / "run"
    rc = main(["train", str(text_file), *TINY, "--minutes", "0.5", "--eval-every", "0", "--out", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    assert captured.err.count("compiling (first run only)…") == 1
    _, meta = load_checkpoint(out / "latest.npz")
    assert meta["step"] == 30  # 30 one-second updates fill half a minute; the compiling is not counted
    assert meta["train_seconds"] == pytest.approx(30.0)
    compiling.started()  # a later compilation in the same process says nothing more
    compiling.ended()
    assert "compiling" not in capsys.readouterr().err


def test_demo_seconds_leave_compiling_out(monkeypatch, capsys):
    from unrolled.cli import demo_cmd

    clock = FakeClock()
    monkeypatch.setattr(compiling, "clock", clock)
    monkeypatch.setattr(demo_cmd, "_clock", clock)
    real = demo_cmd.make_engine

    def engine_that_compiles(graph):
        eng = real(graph, "reference")
        run = eng.run

        def timed(*a, **kw):
            if clock.now == 0.0:
                fake_compile(clock, 50.0)
            clock.now += 0.25
            return run(*a, **kw)

        eng.run = timed
        return eng

    monkeypatch.setattr(demo_cmd, "make_engine", engine_that_compiles)
    assert main(["demo", "--seconds", "2", "--hidden", "8"]) == 0
    last = [l for l in capsys.readouterr().out.splitlines() if l.strip().startswith("step")][-1]
    assert last.split()[1] == "8"  # 8 updates of a quarter second; the 50 s of compiling not counted


# ------------------------------------------------------- progress without a terminal


def test_without_a_terminal_plain_progress_lines_in_bits_per_char(tmp_path, text_file, monkeypatch):
    monkeypatch.setattr(run_report, "PROGRESS_SECONDS", 0.0)  # a line after every update
    stream = io.StringIO()  # not a terminal; nor is pytest's stderr, so the bar is off
    assert not sys.stderr.isatty()
    options = lm_train.RunOptions(files=[str(text_file)], out=str(tmp_path / "run"), engine="reference", stream=stream)
    lm_train.train(options, {"hidden": 16, "layers": 1},
                   {"seq": 8, "batch": 4, "steps": 5, "sample_every": 0, "eval_every": 0})
    lines = [l for l in stream.getvalue().splitlines() if l.startswith("step ") and "/5:" in l]
    assert [l.split(":")[0] for l in lines] == [f"step {i}/5" for i in range(1, 6)]
    assert all("bits/char (smoothed)" in l and "loss" not in l and "nats" not in l for l in lines)


# ------------------------------------------------------------------- metrics.csv


def test_metrics_csv_has_a_row_per_update_and_agrees_with_the_checkpoint(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    assert main(["train", str(text_file), *TINY, "--steps", "6", "--eval-every", "3", "--lr", "0.01",
                 "--out", str(out)]) == 0
    rows = read_metrics(out / "metrics.csv")
    arrays, meta = load_checkpoint(out / "latest.npz")
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    np.testing.assert_allclose([float(r["train_bpc"]) for r in rows], arrays["history/train_loss"] / math.log(2),
                               rtol=1e-5)
    vals = {int(r["step"]): float(r["val_bpc"]) for r in rows if r["val_bpc"]}
    assert vals == pytest.approx({int(s): v for s, v in arrays["history/val"]}, rel=1e-5)
    assert all(float(r["lr"]) == pytest.approx(0.01) for r in rows)
    assert all(float(r["grad_norm"]) > 0 for r in rows)
    elapsed = [float(r["elapsed_s"]) for r in rows]
    assert elapsed == sorted(elapsed) and elapsed[-1] == pytest.approx(meta["train_seconds"], rel=1e-5)
    assert rows[0]["chars_per_s"] == "" and float(rows[-1]["chars_per_s"]) > 0
    assert "metrics.csv" in capsys.readouterr().out


def test_a_resumed_run_continues_the_log(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    assert main(["train", str(text_file), *TINY, "--steps", "4", "--eval-every", "2", "--out", str(out)]) == 0
    with open(out / "metrics.csv", "a") as f:  # rows written after the last save, then a kill mid-row
        f.write("5,1.0,3.0,,0.002,1.0,100\n6,1.1,3.0,,0.0")
    assert main(["train", "--resume", str(out), "--steps", "7"]) == 0
    rows = read_metrics(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 8))
    arrays, _ = load_checkpoint(out / "latest.npz")
    np.testing.assert_allclose([float(r["train_bpc"]) for r in rows], arrays["history/train_loss"] / math.log(2),
                               rtol=1e-5)


def test_tensorboard_events_when_a_writer_is_installed(tmp_path, text_file, monkeypatch):
    scalars, made = [], []

    class SummaryWriter:
        def __init__(self, logdir, **kw):
            made.append((logdir, kw))

        def add_scalar(self, tag, value, step):
            scalars.append((tag, step, value))

        def flush(self):
            pass

        def close(self):
            made.append("closed")

    fake = types.ModuleType("tensorboardX")
    fake.SummaryWriter = SummaryWriter
    fake.__spec__ = importlib.machinery.ModuleSpec("tensorboardX", None)
    monkeypatch.setitem(sys.modules, "tensorboardX", fake)
    out = tmp_path / "run"
    assert main(["train", str(text_file), *TINY, "--steps", "3", "--eval-every", "3", "--out", str(out)]) == 0
    assert made[0] == (str(out / "tensorboard"), {}) and made[-1] == "closed"
    assert [s for t, s, _ in scalars if t == "train_bpc"] == [1, 2, 3]
    assert [s for t, s, _ in scalars if t == "val_bpc"] == [3]
    monkeypatch.setenv("UNROLLED_TENSORBOARD", "0")
    made.clear()
    assert main(["train", str(text_file), *TINY, "--steps", "1", "--out", str(tmp_path / "r2")]) == 0
    assert made == []


# ------------------------------------------------------------- draw, diagnose


def test_draw_refuses_a_picture_too_large_to_read(tmp_path, capsys):
    rc = main(["draw", "elman", "--unroll", "100000", "-o", str(tmp_path / "e.svg")])
    line = one_line_error(capsys, rc, "--unroll 100000", "700,005 nodes", "at most --unroll 285")
    assert rc == 2 and line
    assert not (tmp_path / "e.svg").exists()


def test_diagnose_shows_progress(tmp_path, capsys, monkeypatch):
    from unrolled.cli import diagnose_cmd

    monkeypatch.setattr(diagnose_cmd, "PROGRESS_SECONDS", 0.0)
    argv = ["diagnose", "elman", "--steps", "6", "--delay", "2", "--hidden", "4", "-o", str(tmp_path / "d.png")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "measuring elman: per-copy gradients, then gradients through time" in err
    assert [l.strip() for l in err.splitlines() if ": step " in l][-1] == "elman: step 6 of 6"
