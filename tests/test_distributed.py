"""Data-parallel training over MPI: two ranks compute the update one process computes on the whole batch.

The runs under ``mpiexec -n 2`` are subprocesses (``dist_worker.py``, and the
CLI) with a timeout, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import dist_worker
import helpers
import numpy as np
import pytest

from unrolled.train import distributed
from unrolled.train.checkpoint import load_checkpoint

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
TIMEOUT = 120


def _find_mpiexec() -> str | None:
    """The mpiexec installed beside this Python (the mpich wheel's), else the one on PATH: a venv
    that is not activated, or a pyenv whose shims were not rehashed, must not skip these tests."""
    beside = Path(sysconfig.get_path("scripts")) / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


MPIEXEC = _find_mpiexec()


def _mpi_ready() -> str | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return f'mpi4py is not installed ({distributed.INSTALL_HINT})'
    return None


def test_mpiexec_comes_with_mpi4py():
    """The test extra installs mpi4py and the mpich wheel together: mpi4py without mpiexec would
    silently skip every run below, so it fails here instead."""
    if _mpi_ready() is None:
        assert MPIEXEC is not None, "mpi4py is installed but no mpiexec was found: pip install mpich"


needs_mpi = pytest.mark.skipif(_mpi_ready() is not None, reason=_mpi_ready() or "")


def _env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
                UNROLLED_JIT="0", OPENBLAS_NUM_THREADS="1", **extra)


def mpiexec(n: int, *args: str, check: bool = True, **env) -> subprocess.CompletedProcess:
    """``mpiexec -n n python ARGS`` with this checkout's sources first on the path (``env``: more variables)."""
    cmd = [MPIEXEC, "-n", str(n), sys.executable, *args]
    p = subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=TIMEOUT)
    if check and p.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


@needs_mpi
def test_two_ranks_equal_one_process_on_the_same_global_batch(tmp_path):
    mpiexec(2, str(HERE / "dist_worker.py"), str(tmp_path))
    for name, case in dist_worker.CASES.items():
        alone = case(None)
        two = np.load(tmp_path / f"{name}.npz")
        tol = 1e-12 if name.endswith("64") else 1e-5
        assert set(two.files) == set(alone)
        for k, v in alone.items():
            assert two[k].dtype == v.dtype
            np.testing.assert_allclose(two[k], v, rtol=tol, atol=tol, err_msg=f"{name}: {k}")
        start = dist_worker.START[name]
        assert max(float(np.abs(v - start[k]).max()) for k, v in alone.items()) > 1e-3  # the updates did move them


@needs_mpi
def test_parameters_that_drift_apart_stop_every_rank_at_the_next_checksum():
    p = mpiexec(2, str(HERE / "dist_worker.py"), "drift", check=False)
    assert p.returncode != 0
    assert "after update 2 the parameters of rank 1 differ from rank 0's" in p.stderr


def _corpus(tmp_path) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text("the cat sat on the mat; the dog sat on the log. " * 40, encoding="utf-8")
    return str(path)


def _latest(folder: Path) -> dict[str, np.ndarray]:
    """The arrays of ``latest.npz``, and the meta's generator, trainer counters and data position as arrays."""
    with np.load(folder / "latest.npz") as z:
        out = {k: z[k] for k in z.files if not k.startswith("__")}
        meta = json.loads(z["__meta__.json"].tobytes())
    trainer = meta["trainer"]
    out["meta/rng"] = np.array(json.dumps(trainer["rng"], sort_keys=True))
    out["meta/tbptt"] = np.array(json.dumps(trainer["tbptt"], sort_keys=True))
    out["meta/data"] = np.array(json.dumps(meta["data"], sort_keys=True))
    out["meta/step"] = np.array(trainer["step"])
    out["meta/best_val_bpc"] = np.array(meta["best"]["val_bpc"])  # validation: split over ranks, reduced
    out["meta/best_step"] = np.array(meta["best"]["step"])
    return out


def _same(a: dict, b: dict, tol: float) -> None:
    assert set(a) == set(b)
    for k, v in b.items():
        if v.dtype.kind in "f" and tol:
            np.testing.assert_allclose(a[k], v, rtol=tol, atol=tol, err_msg=k)
        else:
            np.testing.assert_array_equal(a[k], v, err_msg=k)


@needs_mpi
def test_resume_on_two_ranks_is_bit_for_bit_and_one_process_continues_it(tmp_path):
    corpus, worker = _corpus(tmp_path), str(HERE / "dist_worker.py")
    mpiexec(2, worker, "lm", corpus, str(tmp_path / "whole"), "4")
    mpiexec(2, worker, "lm", corpus, str(tmp_path / "cut"), "2")
    (tmp_path / "cut1").mkdir()
    shutil.copy(tmp_path / "cut" / "latest.npz", tmp_path / "cut1" / "latest.npz")
    mpiexec(2, worker, "lm", corpus, str(tmp_path / "cut"), "4", str(tmp_path / "cut"))
    whole, resumed = _latest(tmp_path / "whole"), _latest(tmp_path / "cut")
    assert any(k.startswith("tbptt/history/") for k in whole)  # k1 < k2: a replay buffer is carried too
    _same(resumed, whole, 0.0)  # parameters, optimizer moments, carried state, generator, losses: the same bits

    # The 2-rank checkpoint at step 2, continued by one process: the same run to rounding.
    summary = dist_worker.lm_run(corpus, str(tmp_path / "cut1"), 4, str(tmp_path / "cut1"))
    assert summary.step == 4
    _same(_latest(tmp_path / "cut1"), whole, 1e-12)


@needs_mpi
def test_a_one_process_checkpoint_resumes_on_two_ranks(tmp_path):
    corpus, worker = _corpus(tmp_path), str(HERE / "dist_worker.py")
    dist_worker.lm_run(corpus, str(tmp_path / "whole"), 4)
    dist_worker.lm_run(corpus, str(tmp_path / "cut"), 2)
    mpiexec(2, worker, "lm", corpus, str(tmp_path / "cut"), "4", str(tmp_path / "cut"))
    whole = _latest(tmp_path / "whole")
    assert whole["meta/best_step"] == 4  # the best validation is step 4's, which the 2 ranks computed
    _same(_latest(tmp_path / "cut"), whole, 1e-12)


def _saved_step(folder: Path) -> int:
    with np.load(folder / "latest.npz") as z:
        return int(json.loads(z["__meta__.json"].tobytes())["trainer"]["step"])


@needs_mpi
@pytest.mark.parametrize("how", ["raise", "kill", "hang"])
def test_a_failing_rank_stops_every_rank_and_the_last_checkpoint_stays(tmp_path, how):
    corpus, out = _corpus(tmp_path), tmp_path / "run"
    p = mpiexec(2, str(HERE / "dist_worker.py"), "lm", corpus, str(out), "8", check=False,
                FAULT=f"1,3,{how}", UNROLLED_MPI_TIMEOUT="2" if how == "hang" else "60")
    assert p.returncode != 0
    assert "done at step" not in p.stdout and "Traceback" not in p.stderr
    if how == "raise":  # the failing rank names itself, its error and where to go back to
        assert "rank 1 of 2" in p.stderr and "injected failure at update 3" in p.stderr
    if how == "hang":  # rank 0 gives up waiting
        assert "rank 0 of 2" in p.stderr and "waited 2 s" in p.stderr
    if how != "kill":
        assert f"the last good checkpoint is {out / 'latest.npz'} (step 2)" in p.stderr
    assert _saved_step(out) == 2  # intact, and resumable
    assert sorted(f.name for f in out.iterdir()) == ["best.npz", "latest.npz", "loss.png", "metrics.csv"]


@needs_mpi
def test_ctrl_c_on_mpiexec_stops_every_rank_at_one_update_and_saves_once(tmp_path):
    corpus, out = _corpus(tmp_path), tmp_path / "run"
    cmd = [MPIEXEC, "-n", "2", sys.executable, str(HERE / "dist_worker.py"), "lm", corpus, str(out), "100000"]
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "latest.npz").exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=TIMEOUT)
    finally:
        p.kill()
    assert p.returncode == 0, stderr
    found = re.search(r"^interrupted at step (\d+)$", stdout, re.M)  # mpiexec says its own lines too
    assert found, stdout
    step = int(found.group(1))
    assert 2 <= step < 100000 and _saved_step(out) == step


@needs_mpi
def test_the_command_line_trains_on_two_ranks_and_refuses_a_batch_that_does_not_split(tmp_path):
    corpus, out = _corpus(tmp_path), tmp_path / "run"
    flags = ["-m", "unrolled", "train", corpus, "--hidden", "8", "--layers", "1", "--seq", "8", "--steps", "2",
             "--sample-every", "0", "--out", str(out)]
    p = mpiexec(2, *flags, "--batch", "4")
    assert p.stdout.count("done: step 2") == 1 and "2 ranks × 2 streams" in p.stdout  # rank 0 alone prints
    assert _saved_step(out) == 2
    bad = mpiexec(2, *flags, "--batch", "3", "--out", str(tmp_path / "bad"), check=False)
    assert bad.returncode != 0 and "a batch of 3 rows does not split over 2 ranks" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()
    assert bad.stderr.count("does not split") == 1  # every rank refuses it; rank 0 alone says so
    stdin = mpiexec(2, *flags[:3], "-", *flags[4:], "--batch", "4", "--out", str(tmp_path / "stdin"), check=False)
    assert stdin.returncode != 0 and "under mpiexec only rank 0 gets standard input" in stdin.stderr


@needs_mpi
def test_a_batch_splits_into_equal_shares_of_rows_or_is_refused():
    from mpi4py import MPI

    dp = distributed.DataParallel(MPI.COMM_SELF)
    dp.rank, dp.size = 1, 2  # rank 1 of 2, as far as the rows are concerned
    assert dp.rows(6) == slice(3, 6)
    np.testing.assert_array_equal(dp.shard(np.arange(12).reshape(2, 6)), [[3, 4, 5], [9, 10, 11]])
    with pytest.raises(ValueError, match=r"a batch of 5 rows does not split over 2 ranks; .*--batch 4"):
        dp.rows(5)


@needs_mpi
@pytest.mark.parametrize("mix", ["sum_and_mean", "two_masks"])
def test_losses_whose_counts_cannot_be_made_global_are_refused(mix, rng):
    from mpi4py import MPI

    from unrolled.engines.registry import make_engine
    from unrolled.train.optim import make_optimizer
    from unrolled.train.trainer import Trainer

    g = helpers.GRAPHS["two_losses"]()
    names = [loss.name for loss in g.losses]
    masks = None
    if mix == "sum_and_mean":
        g.losses[0].reduce, g.losses[1].reduce = "sum", "mean"
    else:
        g.losses[1].reduce = "mean"  # both mean, but over different steps: no one global count
        masks = {names[0]: np.ones((4, 2)), names[1]: np.array([[1, 1], [1, 0], [0, 0], [0, 0]])}
    trainer = Trainer(make_engine(g), helpers.make_params(g, rng), make_optimizer("sgd", 0.1), comm=MPI.COMM_SELF)
    with pytest.raises(ValueError, match="all reduce='sum' or all reduce='mean'" if mix == "sum_and_mean"
                       else "count the same terms"):
        trainer.train_step(helpers.make_inputs(g, 4, 2, rng), masks)


def test_without_mpi4py_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(RuntimeError, match=r'pip install "unrolled\[dist\]"'):
        distributed.DataParallel()


def test_launched_size_reads_the_launchers_environment(monkeypatch):
    for name in distributed._SIZE_VARS:
        monkeypatch.delenv(name, raising=False)
    assert distributed.launched_size() == 1
    assert distributed.from_environment() is None  # a plain process never touches MPI
    monkeypatch.setenv("PMI_SIZE", "3")
    assert distributed.launched_size() == 3


@needs_mpi
def test_a_time_budget_stops_every_rank_at_one_update_with_one_rate(tmp_path):
    """Under --minutes the ranks agree on the seconds spent (rank 0's): one stop, one decaying rate."""
    corpus, out = _corpus(tmp_path), tmp_path / "run"
    p = mpiexec(2, "-m", "unrolled", "train", corpus, "--hidden", "8", "--layers", "1", "--seq", "8", "--batch", "4",
                "--minutes", "0.02", "--eval-every", "0", "--sample-every", "0", "--out", str(out))
    assert p.stdout.count("done: step") == 1  # ranks that stopped apart would wait on each other until the timeout
    meta = load_checkpoint(out / "latest.npz")[1]
    assert meta["train"]["lr_schedule"] == "cosine" and meta["budget_seconds"] == pytest.approx(1.2)
    assert meta["train_seconds"] >= 1.2
