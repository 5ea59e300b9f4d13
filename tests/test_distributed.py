"""Data-parallel training over MPI: two ranks compute the update one process computes on the whole batch.

The runs under ``mpiexec -n 2`` are subprocesses (``dist_worker.py``, and the
CLI) with a timeout, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

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
