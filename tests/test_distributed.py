"""Data-parallel training over MPI: two ranks compute the update one process computes on the whole batch.

The runs under ``mpiexec -n 2`` are subprocesses (``dist_worker.py``, and the
CLI) with a timeout, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dist_worker
from unrolled import distributed

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
TIMEOUT = 120


def _mpi_ready() -> str | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return f'mpi4py is not installed ({distributed.INSTALL_HINT})'
    if shutil.which("mpiexec") is None:
        return "no mpiexec on PATH (the mpich wheel brings one)"
    return None


needs_mpi = pytest.mark.skipif(_mpi_ready() is not None, reason=_mpi_ready() or "")


def mpiexec(n: int, *args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``mpiexec -n n python ARGS`` with this checkout's sources first on the path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
               UNROLLED_JIT="0", OPENBLAS_NUM_THREADS="1")
    cmd = ["mpiexec", "-n", str(n), sys.executable, *args]
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
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
    _same(_latest(tmp_path / "cut"), _latest(tmp_path / "whole"), 1e-12)


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
