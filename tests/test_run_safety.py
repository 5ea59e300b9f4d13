"""Nothing a training run made is lost: SIGTERM saves, one run per folder, resumes that keep newer work,
schedules that follow a longer run, no leftovers of cut saves, and a start without a writable home.

The in-process runs are tiny models on the reference engine; the cases that need a process of their own
(a signal, a read-only install) start one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from unrolled.charlm.model import load_model
from unrolled.cli import main
from unrolled.train.checkpoint import load_checkpoint
from unrolled.train.runfolder import FolderLock

SRC = Path(__file__).resolve().parents[1] / "src"
WORDS = "the cat sat on a mat and the dog ran to the red barn while small birds sang".split()
TINY = ["--engine", "reference", "--hidden", "16", "--layers", "1", "--seq", "8", "--batch", "4",
        "--sample-every", "0"]


@pytest.fixture
def text_file(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "tiny.txt"
    p.write_text("\n".join(" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), 8)) for _ in range(200)) + "\n")
    return p


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_sigterm_stops_saves_and_exits_143(tmp_path, text_file):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "unrolled", "train", str(text_file), *TINY, "--steps", "1000000",
                             "--out", str(out)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # the announcement comes once the loop listens for signals
        if "writing to" in line:
            break
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    said = [line for line in rest.splitlines() if line.startswith("stopped by SIGTERM at step")]
    assert said, rest
    step = int(said[0].split("at step ")[1].split(";")[0])
    assert step >= 1 and load_model(out).meta["step"] == step


def test_a_second_run_in_the_same_folder_is_refused(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    out.mkdir()
    other = FolderLock(out).acquire()  # as another process's run would hold it
    try:
        rc = main(["train", str(text_file), *TINY, "--steps", "3", "--out", str(out)])
        line = _one_line(capsys.readouterr().err)
        assert rc == 1 and f"{out} is in use by another training run" in line
        assert "--out" in line and not (out / "latest.npz").exists()
    finally:
        other.release()
    assert main(["train", str(text_file), *TINY, "--steps", "3", "--out", str(out)]) == 0
    saved = (out / "latest.npz").read_bytes()
    with FolderLock(out).acquire():  # nor may a resume write there while another run does
        rc = main(["train", "--resume", str(out), "--steps", "6"])
        assert rc == 1 and "in use by another training run" in _one_line(capsys.readouterr().err)
    assert (out / "latest.npz").read_bytes() == saved


def test_two_processes_at_once_one_is_refused(tmp_path, text_file):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "unrolled", "train", str(text_file), *TINY, "--steps", "1000000",
                              "--out", str(out)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in first.stdout:
        if "writing to" in line:
            break
    second = subprocess.run([sys.executable, "-m", "unrolled", "train", str(text_file), *TINY, "--steps", "2",
                             "--out", str(out)], env=_env(), capture_output=True, text=True, timeout=300)
    first.send_signal(signal.SIGINT)
    rest, _ = first.communicate(timeout=300)
    assert second.returncode == 1 and "in use by another training run" in _one_line(second.stderr)
    assert first.returncode == 130
    step = int(rest.split("stopped by Ctrl-C at step ")[1].split(";")[0])
    assert load_model(out).meta["step"] == step  # the first run's work is what the folder holds


def test_resume_from_best_does_not_overwrite_a_newer_latest(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    assert main(["train", str(text_file), *TINY, "--steps", "4", "--eval-every", "4", "--out", str(out)]) == 0
    early = tmp_path / "early.npz"
    shutil.copy(out / "latest.npz", early)
    assert main(["train", "--resume", str(out), "--steps", "8"]) == 0
    shutil.copy(early, out / "best.npz")  # the best validation was at step 4, the latest state is at step 8
    newer = (out / "latest.npz").read_bytes()
    capsys.readouterr()

    rc = main(["train", "--resume", str(out / "best.npz"), "--steps", "12"])
    line = _one_line(capsys.readouterr().err)
    assert rc == 1 and "latest.npz (step 8) is newer than" in line and "(step 4)" in line
    assert f"--resume {out}" in line and "--out" in line
    assert (out / "latest.npz").read_bytes() == newer

    branch = tmp_path / "branch"
    assert main(["train", "--resume", str(out / "best.npz"), "--steps", "6", "--out", str(branch)]) == 0
    assert load_model(branch).meta["step"] == 6 and (out / "latest.npz").read_bytes() == newer


def test_a_longer_resume_extends_the_cosine_schedule(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    assert main(["train", str(text_file), *TINY, "--lr-schedule", "cosine", "--decay", "1", "--steps", "6",
                 "--out", str(out)]) == 0  # --decay 1: a cosine over all the steps, a schedule of steps
    before = load_model(out).params
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--steps", "12"]) == 0
    printed = capsys.readouterr().out
    assert "the cosine schedule now ends at step 12" in printed
    arrays, meta = load_checkpoint(out / "latest.npz")
    assert meta["trainer"]["schedule"]["total_steps"] == 12 and meta["step"] == 12
    after = load_model(out).params
    assert all(not np.array_equal(before[k], after[k]) for k in before)  # it learned: the rate was not 0


def test_leftovers_of_a_cut_save_are_removed_at_the_next_start(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    assert main(["train", str(text_file), *TINY, "--steps", "2", "--out", str(out)]) == 0
    left = [out / ".latest.npz.k2j4_x9q.tmp", out / ".best.npz.0a1b2c3d.tmp"]
    for p in left:
        p.write_bytes(b"\0" * 1000)
    kept = [out / ".notes.tmp", out / "mine.tmp"]  # not ours: another program's, or the user's
    for p in kept:
        p.write_bytes(b"x")
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--steps", "3"]) == 0
    assert "removed 2 unfinished temporary files" in capsys.readouterr().out
    assert not any(p.exists() for p in left) and all(p.exists() for p in kept)


def _read_only_install(tmp_path) -> tuple[Path, dict]:
    """A copy of the package where nothing can be cached beside the source, and a home that is no folder."""
    root = tmp_path / "install"
    shutil.copytree(SRC / "unrolled", root / "unrolled", ignore=shutil.ignore_patterns("__pycache__"))
    for folder in [root / "unrolled", *[p for p in (root / "unrolled").rglob("*") if p.is_dir()]]:
        (folder / "__pycache__").write_text("")  # a file: no folder can be made there, even by root
    home = tmp_path / "home"
    home.write_text("")
    (tmp_path / "tmp").mkdir()
    env = _env(PYTHONPATH=str(root), HOME=str(home), TMPDIR=str(tmp_path / "tmp"), PYTHONDONTWRITEBYTECODE="1")
    for name in ("NUMBA_CACHE_DIR", "UNROLLED_CACHE", "XDG_CACHE_HOME"):
        env.pop(name, None)
    return root, env


def test_no_writable_home_falls_back_to_a_temporary_cache(tmp_path, text_file):
    _, env = _read_only_install(tmp_path)
    helped = subprocess.run([sys.executable, "-m", "unrolled", "train", "--help"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert helped.returncode == 0 and "usage: unrolled train" in helped.stdout and helped.stderr == ""
    trained = subprocess.run([sys.executable, "-m", "unrolled", "train", str(text_file), *TINY, "--steps", "2",
                              "--out", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr
    warning = _one_line(trained.stderr)
    assert warning.startswith("unrolled: warning:") and str(tmp_path / "tmp") in warning
    assert "NUMBA_CACHE_DIR" in warning
