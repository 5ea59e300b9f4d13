"""Layers depend downward only: the graph, the op table, the unroller and the
reference engine need nothing but NumPy.

The reference engine is the specification; a native library loaded beneath
it (a BLAS binding, oneDNN and its fork hook, Numba) would make every check
against it depend on the fast path it is meant to check. Each test runs a
fresh interpreter, since this one has long since imported everything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
NATIVE = ("unrolled.engines.compiled.kernels.blas", "unrolled.engines.compiled.kernels.onednn", "unrolled.engines.compiled.engine", "numba", "llvmlite", "scipy", "torch")

PROBE = """
import ctypes, json, sys
opened = []
class Recording(ctypes.CDLL):
    def __init__(self, name, *args, **kw):
        opened.append(str(name))
        super().__init__(name, *args, **kw)
ctypes.CDLL = Recording
import numpy as np
import unrolled, unrolled.graph.folded, unrolled.graph.ops, unrolled.graph.unroll, unrolled.engines.reference, unrolled.models.cells
from unrolled.models.small_networks import small_network
g = small_network("elman")
rng = np.random.default_rng(0)
T, B = 4, 3
r = unrolled.make_engine(g, "reference").run(
    g.init_params(0), {"x": rng.normal(size=(T, B, 3)), "target": rng.integers(0, 3, (T, B))})
assert np.isfinite(r.loss)
try:
    with open("/proc/self/maps") as maps:
        mapped = sorted({line.split()[-1] for line in maps if any(k in line for k in ("dnnl", "gomp", "llvm"))})
except OSError:
    mapped = []
print(json.dumps({"modules": sorted(sys.modules), "opened": opened, "mapped": mapped}))
"""


def _probe() -> dict:
    import json

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_graph_and_the_reference_engine_load_no_native_library():
    found = _probe()
    native = [m for m in found["modules"] if m in NATIVE or m.startswith(tuple(n + "." for n in NATIVE))]
    assert native == []
    assert found["opened"] == []  # no ctypes.CDLL: neither a BLAS binding nor oneDNN
    assert found["mapped"] == []  # oneDNN, its OpenMP runtime, LLVM: not in the process at all


def test_the_compiled_engine_loads_its_bindings_when_imported():
    """The other side of the rule: the bindings still load, only later."""
    code = "import sys, unrolled.engines.compiled.engine; print('unrolled.engines.compiled.kernels.blas' in sys.modules, 'unrolled.engines.compiled.kernels.onednn' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_compiled_engine_products_agree_with_the_specification(dtype):
    """The compiled engine's op table differs from the specification's in its products alone."""
    import numpy as np

    from unrolled.engines.compiled import forward as compiled
    from unrolled.graph import ops

    rng = np.random.default_rng(1)
    W, x, b = (rng.normal(size=s).astype(dtype) for s in ((600, 500), (700, 500), (600,)))
    g = rng.normal(size=(700, 600)).astype(dtype)
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == "float32" else dict(rtol=1e-12, atol=1e-10)
    for name, args in (("matmul", [W, x]), ("linear", [W, x, b])):
        spec, fast = ops.OPS[name], compiled.OPS[name]
        np.testing.assert_allclose(fast.forward(args, {}), spec.forward(args, {}), **tol)
        out = spec.forward(args, {})
        for got, want in zip(fast.vjp(g, args, out, {}), spec.vjp(g, args, out, {})):
            np.testing.assert_allclose(got, want, **tol)
    assert set(compiled.OPS) == set(ops.OPS)
    assert all(compiled.OPS[k] is ops.OPS[k] for k in ops.OPS if k not in ("matmul", "linear"))


LAYERS = ("words", "atomic", "graph", "engines", "train", "models", "charlm", "viz", "export", "cli")  # low to high


def _imports(path) -> set[str]:
    """Every ``unrolled.*`` module a source file imports, wherever the import stands (functions too)."""
    import ast

    package = ".".join(path.relative_to(SRC).with_suffix("").parts)
    here = package if path.name == "__init__.py" else package.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = here
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            found |= {module} | {f"{module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m.removesuffix(".__init__") for m in found if m == "unrolled" or m.startswith("unrolled.")}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_imports_only_its_own_layer_or_lower_ones():
    """The package's sub-packages are the pipeline in its order of dependence: a module that reached
    up (the trainer into the cells, a kernel cache into the trainer's file writes) would tie a lower
    layer to a higher one, and a change above could break what lies beneath it."""
    climbs = []
    for path in sorted((SRC / "unrolled").rglob("*.py")):
        mine = _layer(".".join(path.relative_to(SRC).with_suffix("").parts))
        for module in _imports(path):
            theirs = _layer(module)
            if mine and theirs and LAYERS.index(theirs) > LAYERS.index(mine):
                climbs.append(f"{path.relative_to(SRC)} imports {module}")
    assert not climbs, "a lower layer imports a higher one:\n" + "\n".join(climbs)


def test_the_kernels_import_nothing_of_the_engine_above_them():
    """kernels/ is the compiled engine's bottom: plan, code generation and the strategies call it."""
    kernels = SRC / "unrolled" / "engines" / "compiled" / "kernels"
    above = [f"{p.name} imports {m}" for p in sorted(kernels.glob("*.py")) for m in _imports(p)
             if m.startswith("unrolled.engines") and not m.startswith("unrolled.engines.compiled.kernels")]
    assert not above, above
