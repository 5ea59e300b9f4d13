"""The recipe `train` picks from the text and the budget, the cosine over a time budget, and its resume."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from test_cli_train import corpus

from unrolled.charlm import recipe, run_budget, run_report
from unrolled.charlm.training_run import TrainingRun
from unrolled.cli import main
from unrolled.train.checkpoint import load_checkpoint
from unrolled.train.lr_schedules import Cosine

TINY = ["--engine", "reference", "--seq", "8", "--batch", "4", "--sample-every", "0"]


def chosen(train_chars, **kw):
    kw = {"steps": 0, "minutes": 0.0, "k1": 50, "batch": 50, "lr": 2e-3, **kw}
    return {c.field: c.value for c in recipe.choose(train_chars, **kw)}


def test_rule_numbers_in_settings_out():
    long = {"lr_schedule": "cosine", "decay": recipe.DECAY, "dropout": recipe.DROPOUT, "hidden": recipe.HIDDEN,
            "layers": 2}
    # 10,000 updates of 50 × 50 over a million characters (25 passes): a long budget
    assert chosen(1_000_000, steps=10_000) == long
    # a time budget counts as a long one
    assert chosen(1_000_000, minutes=10) == long
    # fewer updates than LONG_STEPS: char-rnn's constant rate, no dropout
    assert chosen(1_000_000, steps=recipe.LONG_STEPS - 1) == {"lr_schedule": "constant", "dropout": 0.0,
                                                              "hidden": recipe.HIDDEN, "layers": 2}
    # long in updates, but reading the text fewer than FEW_PASSES times: no dropout
    assert chosen(10_000_000, steps=5_000)["dropout"] == 0.0 and chosen(10_000_000, steps=5_000)["decay"] == 0.3
    # a small text: more dropout when the budget is long
    assert chosen(50_000, minutes=1) == {**long, "dropout": recipe.SMALL_DROPOUT}
    # no budget: nothing to decay over; a warm-up as long as the run: nothing left to decay
    assert chosen(1_000_000) == {"lr_schedule": "constant", "dropout": 0.0, "hidden": recipe.HIDDEN, "layers": 2}
    assert chosen(1_000_000, steps=10_000, warmup=10_000)["lr_schedule"] == "constant"
    assert "decay" not in chosen(1_000_000, steps=10_000, warmup=10_000)
    # what the user gave is not chosen; a cosine the user asked for still gets the decay rule
    assert chosen(1_000_000, steps=10_000, given=frozenset({"dropout", "hidden", "decay"})) == {
        "lr_schedule": "cosine", "layers": 2}
    assert chosen(1_000, steps=10, given=frozenset({"lr_schedule"}), lr_schedule="cosine")["decay"] == recipe.DECAY
    assert "decay" not in chosen(1_000_000, steps=10_000, given=frozenset({"lr_schedule"}), lr_schedule="constant")


def test_every_choice_names_its_flag():
    for c in recipe.choose(200_000, steps=5000, minutes=0.0, k1=50, batch=50, lr=2e-3):
        assert c.flag.startswith("--" + c.field.replace("_", "-"))
        assert f"(override: {c.flag})" in c.line()


def test_progress_is_the_larger_fraction():
    assert recipe.progress(50, 100, 0.0, 0.0) == 0.5
    assert recipe.progress(10, 100, 30.0, 60.0) == 0.5
    assert recipe.progress(90, 100, 30.0, 60.0) == 0.9
    assert recipe.progress(0, 0, 90.0, 60.0) == 1.0
    assert recipe.progress(7, 0, 0.0, 0.0) == 0.0


def test_the_decay_holds_then_takes_the_last_part():
    assert [recipe.decayed(p, 0.3) for p in (0.0, 0.5, 0.7)] == [0.0, 0.0, 0.0]
    assert [recipe.decayed(p, 0.3) for p in (0.85, 1.0)] == pytest.approx([0.5, 1.0])
    assert [recipe.decayed(p, 1.0) for p in (0.0, 0.5, 1.0)] == [0.0, 0.5, 1.0]


def test_cosine_over_a_fraction():
    c = Cosine(2e-3, 1)
    assert [c.at_fraction(f) for f in (0.0, 0.5, 1.0, 1.5)] == pytest.approx([2e-3, 1e-3, 0.0, 0.0], abs=1e-15)
    steps = Cosine(0.5, total_steps=40)
    assert all(steps.lr_at(s) == steps.at_fraction(s / 40) for s in range(45))


# --------------------------------------------------------------- runs on a fake clock

SECONDS_PER_UPDATE = 0.5  # the fake clock moves this much per read: an update's two reads are this far apart
MINUTES = "0.1"  # 6 s: 12 updates


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "tiny.txt"
    p.write_text(corpus())
    return p


@pytest.fixture
def fake_clock(monkeypatch):
    """The run's clock moves a fixed amount on every read, so a time budget makes a known number of updates."""
    now = [0.0]

    def clock():
        now[0] += SECONDS_PER_UPDATE
        return now[0]

    monkeypatch.setattr(run_budget, "clock", clock)
    monkeypatch.setattr(run_report, "PROGRESS_SECONDS", math.inf)  # no progress lines: their reads are outside updates
    return now


def lrs(folder):
    with open(folder / "metrics.csv") as f:
        return [float(r["lr"]) for r in csv.DictReader(f)]


def test_time_budget_drives_the_cosine_and_validation_is_not_counted(tmp_path, text_file, fake_clock, monkeypatch):
    validate = TrainingRun.validate

    def slow_validate(self, stop=None):
        fake_clock[0] += 1000.0  # far longer than the whole budget
        return validate(self, stop)

    monkeypatch.setattr(TrainingRun, "validate", slow_validate)
    out = tmp_path / "run"
    assert main(["train", str(text_file), *TINY, "--minutes", MINUTES, "--eval-every", "1", "--out", str(out)]) == 0
    rates = lrs(out)
    assert len(rates) == 12  # 6 s of updates; the 12 validations' 12,000 s do not count
    # update k starts at k × 0.5 s of the 6 s: held at lr to 70%, then the cosine over the last 30%
    expected = [Cosine(2e-3, 1).at_fraction(recipe.decayed(k / 12, recipe.DECAY)) for k in range(12)]
    assert rates == pytest.approx(expected, rel=1e-5)
    assert rates[:9] == [2e-3] * 9 and rates[11] < rates[10] < rates[9] < 2e-3
    meta = load_checkpoint(out / "latest.npz")[1]
    assert meta["budget_seconds"] == 6.0 and meta["train_seconds"] == pytest.approx(6.0)
    assert meta["train"]["lr_schedule"] == "cosine"


def test_an_interrupted_time_budget_resumes_where_it_stopped(tmp_path, text_file, fake_clock, monkeypatch):
    whole, split = tmp_path / "whole", tmp_path / "split"
    flags = [*TINY, "--minutes", MINUTES, "--eval-every", "4"]
    assert main(["train", str(text_file), *flags, "--out", str(whole)]) == 0
    spent = run_budget.Budget.spent
    monkeypatch.setattr(run_budget.Budget, "spent", lambda self, step: step >= 5 or spent(self, step))
    assert main(["train", str(text_file), *flags, "--out", str(split)]) == 0  # stops after 5 updates
    assert load_checkpoint(split / "latest.npz")[1]["step"] == 5
    monkeypatch.setattr(run_budget.Budget, "spent", spent)
    assert main(["train", "--resume", str(split)]) == 0  # the rest of the 6 s
    a, meta_a = load_checkpoint(whole / "latest.npz")
    b, meta_b = load_checkpoint(split / "latest.npz")
    assert meta_a["step"] == meta_b["step"] == 12
    assert lrs(split) == lrs(whole)
    np.testing.assert_array_equal(a["history/train_loss"], b["history/train_loss"])
    # --minutes on resume: that many more, and the decay stretches to the new end
    assert main(["train", "--resume", str(split), "--minutes", "0.05"]) == 0
    more = lrs(split)
    assert len(more) == 18
    assert more[16] == pytest.approx(Cosine(2e-3, 1).at_fraction(recipe.decayed(16 / 18, recipe.DECAY)), rel=1e-5)
    assert more[12] == 2e-3 > more[11]  # back to the held rate: the decay is in the new budget's last 30%
    assert main(["train", "--resume", str(split)]) == 1  # its budget is spent: say so


def test_flags_override_the_recipe(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    assert main(["train", str(text_file), *TINY, "--steps", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    meta = load_checkpoint(out / "latest.npz")[1]
    assert (meta["model"]["hidden"], meta["train"]["lr_schedule"]) == (recipe.HIDDEN, "constant")
    for flag in ("--lr-schedule cosine", "--dropout P", "--hidden N", "--layers N"):
        assert f"(override: {flag})" in printed

    out = tmp_path / "given"
    assert main(["train", str(text_file), *TINY, "--steps", "3", "--hidden", "16", "--layers", "1", "--dropout", "0.1",
                 "--lr-schedule", "constant", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    meta = load_checkpoint(out / "latest.npz")[1]
    assert (meta["model"]["hidden"], meta["model"]["layers"], meta["model"]["dropout"]) == (16, 1, 0.1)
    assert meta["train"]["lr_schedule"] == "constant" and "(override:" not in printed
    assert lrs(out) == [2e-3] * 3

    out = tmp_path / "cosine"  # a short run asked for a cosine over all of its updates
    assert main(["train", str(text_file), *TINY, "--steps", "4", "--lr-schedule", "cosine", "--decay", "1",
                 "--out", str(out)]) == 0
    assert lrs(out) == pytest.approx([Cosine(2e-3, 4).lr_at(k) for k in range(4)], rel=1e-5)
