"""A kernel whose callee in another kernel module changed is compiled again, not loaded stale.

Numba keys a cached function by its own file alone. The row kernels
inline scalars.py's functions (``cross_entropy_row`` its ``exp1``): after
such a callee changed, the cached caller kept the old code until the cache
was cleared (a user upgrading unrolled, or anyone editing a kernel, ran old
machine code). The kernel
modules' caches now live in a folder named by the fingerprint of every kernel
module (``jitcache.prepare_numba_cache``). Each case runs fresh processes on a
copy of the package, edits the copy's float64 ``exp1`` to add 1, and reads
``cross_entropy_row`` of one logit, 0 (a loss of log 1 = 0; log 2 after the edit), again.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")

SCRIPT = """
import sys
if sys.argv[1] == "numba-own":  # the reproducer: Numba's own locators, which key each file alone
    import unrolled.engines.compiled.kernels.jitcache
    unrolled.engines.compiled.kernels.jitcache._key_kernel_caches = lambda: None
import numpy as np
from unrolled.engines.compiled.kernels.rows import cross_entropy_row
y = np.empty(1)
cross_entropy_row(y, np.array([0.0]), 0, np.empty(1))
print(repr(float(y[0])), sum(cross_entropy_row.stats.cache_hits.values()))
"""

OLD = 0.0  # -log softmax([0])[0]: e^0 / e^0
NEW = math.log(2.0)  # with e^x + 1: log(e^0 + 1) - 0


def _package_copy(tmp_path: Path, read_only: bool) -> Path:
    root = tmp_path / "pkg"
    shutil.copytree(Path(__file__).resolve().parents[1] / "src" / "unrolled", root / "unrolled",
                    ignore=shutil.ignore_patterns("__pycache__"))
    if read_only:  # as installed system-wide: a file named __pycache__, where no folder can be made, even by root
        for folder in [p for p in root.rglob("*") if p.is_dir()]:
            (folder / "__pycache__").write_text("")
    return root


def _change_exp(root: Path) -> None:
    kernels = root / "unrolled" / "engines" / "compiled" / "kernels" / "scalars.py"
    text = kernels.read_text()
    assert text.count("    return lambda x: math.exp(x)\n") == 1, "the float64 exp1 moved: update this test"
    kernels.write_text(text.replace("    return lambda x: math.exp(x)\n", "    return lambda x: math.exp(x) + 1.0\n"))


def _kernel_row(root: Path, env: dict, mode: str = "unrolled") -> tuple[float, int]:
    """cross_entropy_row of one logit in a fresh process, and how many of its signatures came from the cache."""
    env = {**env, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    value, hits = out.stdout.split()
    return float(value), int(hits)


def _env(tmp_path: Path, numba_cache_dir: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["UNROLLED_CACHE"] = str(tmp_path / "unrolled-cache")
    if numba_cache_dir:
        env["NUMBA_CACHE_DIR"] = str(tmp_path / "numba-cache")
    return env


def test_numba_alone_runs_a_changed_callee_stale(tmp_path):
    """The cause, reproduced: without the fingerprint, the edit is not seen (if this fails, Numba
    itself now keys callees, and this test may go)."""
    root, env = _package_copy(tmp_path, read_only=False), _env(tmp_path, numba_cache_dir=True)
    assert _kernel_row(root, env, "numba-own") == (OLD, 0)
    _change_exp(root)
    assert _kernel_row(root, env, "numba-own") == (OLD, 1)  # stale machine code from the cache


@pytest.mark.parametrize("numba_cache_dir", [False, True], ids=["default", "NUMBA_CACHE_DIR"])
def test_a_changed_callee_is_compiled_again(tmp_path, numba_cache_dir):
    root, env = _package_copy(tmp_path, read_only=True), _env(tmp_path, numba_cache_dir)
    assert _kernel_row(root, env) == (OLD, 0)
    assert _kernel_row(root, env) == (OLD, 1)  # the cache is in use
    _change_exp(root)
    assert _kernel_row(root, env) == (NEW, 0)  # compiled again
    where = tmp_path / ("numba-cache/unrolled" if numba_cache_dir else "unrolled-cache")
    assert len(list(where.glob("kernels-*/rows.cross_entropy_row-*.nbi"))) == 2  # one folder for each fingerprint
