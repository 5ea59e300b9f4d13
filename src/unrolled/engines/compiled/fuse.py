"""Fusing a step's elementwise vertices into one Numba kernel.

In an LSTM step the products are few and large and BLAS does them well;
what costs is the dozen elementwise vertices around them (four gates, the
cell update, its tanh), each a NumPy call of its own, and the float32 tanh
and exp of NumPy, which run one number at a time on this CPU. A run of
consecutive elementwise vertices of one size is a *region*; the loop calls
one generated kernel for it, which walks the ``[B, F]`` entries once and
computes every vertex of the region there, keeping intermediate values in
registers and writing each vertex to the buffer the rest of the engine
expects. The backward kernel does the same for the region's
vector-Jacobian products, in reverse order, summing gradients inside the
region in registers and adding or assigning those that leave it exactly as
the unfused loop would. The whole-run function's per-row kernels of
elementwise ops (wholestep.py) are rendered here too, from the same formulas.

Reading operands through ``base[b, offset + j]`` rather than through NumPy
views keeps every array C-contiguous, so Numba vectorizes the loops; float32
tanh and sigmoid use the vectorizable approximation of ``kernels.scalars``.
"""

from __future__ import annotations

import re

from unrolled.graph.folded import Param, Vertex
from unrolled.graph.ops import ELEMENTWISE, OPS, render

from .kernels.jitcache import numba_installed

# The compiled paths' implementation of each call a formula makes (ops.FUNCTIONS): in float32,
# the vectorizable tanh and sigmoid of kernels/scalars.py.
SCALAR_FUNCTIONS = {"tanh": "tanh1", "sigmoid": "sigmoid1", "exp": "np.exp", "log1p": "np.log1p"}


def scalar_code(v: Vertex, formula: str, names: dict[str, str], const) -> str:
    """One entry of ``formula`` (one of ``v``'s op's formulas) as Numba code: ``names`` gives the
    expressions of ``x0``, ``x1``, ``y``, ``g``; ``const(v)`` a constant in the run's precision."""
    return render(formula, {**SCALAR_FUNCTIONS, "c": repr(v.attrs.get("c")), **names}, const)


def operand_names(args: list[str]) -> dict[str, str]:
    return {f"x{i}": a for i, a in enumerate(args)}


def available() -> bool:
    """Whether Numba is installed (found, not imported: see jitcache.numba_installed)."""
    return numba_installed()


class Region:
    """Consecutive elementwise core vertices of one size, fused into one kernel each way."""

    def __init__(self, index: int, vertices: list[Vertex]):
        self.index = index
        self.vertices = vertices
        self.size = vertices[0].size
        self.names = {v.name for v in vertices}


def regions(writer) -> list:
    """The loop body in order: single vertices, and Regions of two or more elementwise vertices (or
    of one, for an op the loop has no call of its own for: ``writer.NATIVE``)."""
    out, run = [], []

    def flush():
        if len(run) >= 2 or any(v.op not in writer.NATIVE for v in run):
            out.append(Region(len([r for r in out if isinstance(r, Region)]), list(run)))
        else:
            out.extend(run)
        run.clear()

    for v in writer.core:
        if v.kind != "op" or writer.p.is_view(v) or v.name in writer.skip:
            continue
        if v.op in ELEMENTWISE and all(_ok_operand(a, v.size) for a in v.args) and (not run or run[0].size == v.size):
            run.append(v)
        else:
            flush()
            if v.op in ELEMENTWISE and all(_ok_operand(a, v.size) for a in v.args):
                run.append(v)
            else:
                out.append(v)
    flush()
    return out


def _ok_operand(a, size: int) -> bool:
    if isinstance(a, Param):
        return a.shape == (size,)
    return a.size == size and a.kind != "index"


class KernelText:
    """Collects the text of the generated kernels and the arguments of each call."""

    def __init__(self):
        self.functions: list[str] = []

    def add(self, name: str, params: list[str], loops: list[list[str]], rows: str, width: int) -> None:
        """A kernel of one or more loops over the rows of array ``rows`` and ``width`` columns.

        Several short loops, each touching few arrays, vectorize where one long
        loop touching many would not (LLVM gives up proving that a dozen arrays
        do not overlap)."""
        text = [f"def {name}({', '.join(params)}):"]
        for body in loops:
            text += [f"    for b in range({rows}.shape[0]):", f"        for j in range({width}):"]
            text += ["            " + line for line in body]
        self.functions.append("\n".join(text))

    def module(self) -> str:
        """Each kernel twice, for float32 and float64 (``name_f32``, ``name_f64``): constants are
        written in the run's precision, so float32 arithmetic stays float32 and vectorizes."""
        head = ("import numba\nimport numpy as np\nfrom unrolled.engines.compiled.kernels.scalars import sigmoid1, tanh1\n\n"
                "_jit = numba.njit(cache=True, nogil=True, error_model=\"numpy\", fastmath={\"contract\"})\n\n")
        out = []
        for f in self.functions:
            name = f.split("(")[0][4:]
            for suffix, kind in (("f32", "np.float32"), ("f64", "np.float64")):
                out.append("@_jit\n" + f.replace(f"def {name}(", f"def {name}_{suffix}(").replace("KIND(", kind + "("))
        return head + "\n\n".join(out) + "\n"

    def generic(self) -> str:
        """The kernels for a Numba loop, which passes the precision as their first argument, ``KIND``."""
        head = "from unrolled.engines.compiled.kernels.arrays import jit as _kernel\nfrom unrolled.engines.compiled.kernels.scalars import sigmoid1, tanh1\n\n"
        return head + "\n\n".join("@_kernel\n" + f.replace("(", "(KIND, ", 1) for f in self.functions) + "\n"

    def names(self) -> list[str]:
        return [f.split("(")[0][4:] for f in self.functions]


class _Operands:
    """Maps loop expressions (``V_v9[t]``, ``S_v4``) to kernel parameters (A0, A1, ...)."""

    def __init__(self):
        self.exprs: list[str] = []

    def name(self, expr: str) -> str:
        if expr not in self.exprs:
            self.exprs.append(expr)
        return f"A{self.exprs.index(expr)}"


def access(writer, a, t: str = "t") -> tuple[str, int, int]:
    """(loop expression of a C-contiguous base array, column offset, rank) for operand ``a``'s value at step t."""
    if isinstance(a, Param):
        return f"P_{writer.pnames[a.name]}", 0, 1
    a, rng = writer.p.viewed(a)
    return writer.val(a, t), (rng[0] if rng else 0), 2


def emit_forward(writer, region: Region, kernels: KernelText, c) -> None:
    ops = _Operands()
    loops = []
    for v in region.vertices:  # one short loop per vertex, through memory (L1-sized): see KernelText.add
        args = []
        for a in v.args:
            expr, off, rank = access(writer, a)
            p = ops.name(expr)
            args.append(f"{p}[b, {off} + j]" if rank == 2 else f"{p}[{off} + j]")
        dst, off, _ = access(writer, v)
        loops.append([f"{ops.name(dst)}[b, {off} + j] = {_forward_formula(v, args, 'KIND')}"])
    rows = ops.name(access(writer, region.vertices[0])[0])
    fn = f"fwd_r{region.index}"
    kernels.add(fn, ops_params(ops), loops, rows, region.size)
    for v in region.vertices:
        c(f"# {v.name} = {v.op}({', '.join(a.name for a in v.args)})")
    c(f"# ... fused into one kernel, fwd_r{region.index} (engine.kernel_code):")
    c(f"{fn}({', '.join(_kind(writer) + ops.exprs)})")


def _forward_formula(v: Vertex, a: list[str], K: str) -> str:
    return scalar_code(v, OPS[v.op].formula.forward, operand_names(a), lambda c: f"{K}({c})")


def _kind(writer) -> list[str]:
    """A Numba loop passes its precision (``np.float32`` or ``np.float64``) to the kernels it calls;
    the NumPy loop calls the kernel compiled for it, named by precision."""
    return ["KIND"] if writer.jit else []


def ops_params(ops: _Operands) -> list[str]:
    return [f"A{i}" for i in range(len(ops.exprs))]


def emit_backward(writer, region: Region, kernels: KernelText, c) -> None:
    """The region's VJPs in reverse, in one pass over [B, F]."""
    ops = _Operands()
    body: list[str] = []
    K = "KIND"
    inside = region.names
    acc: dict[str, str] = {}  # region vertex -> its register gradient so far
    value = {}
    rows = None

    def val(a) -> str:
        expr, off, rank = access(writer, a)
        p = ops.name(expr)
        return f"{p}[b, {off} + j]" if rank == 2 else f"{p}[{off} + j]"

    for v in reversed(region.vertices):
        if v.name not in writer.p.wants_grad:
            continue
        base, key, add_only = writer.grad(v)
        readable = add_only or key in writer.zero_fill or any(
            s[0] < v.size and 0 < s[1] for s in writer.assigned.get(key, []))
        g = f"g{len(value)}"
        value[v.name] = g
        rows = rows or ops.name(base)
        parts = []
        if readable:
            parts.append(f"{ops.name(base)}[b, j]")
        if v.name in acc:
            parts.append(acc[v.name])
        body.append(f"{g} = {' + '.join(parts) if parts else K + '(0.0)'}")
        if writer.has_full_grad(v) and not add_only:
            # a weight reads this gradient after the loop: store it whole
            writer.assigned.setdefault(key, []).append((0, v.size))
            body.append(f"{ops.name(base)}[b, j] = {g}")
        elif writer.has_full_grad(v):
            body.append(f"{ops.name(base)}[b, j] = {g}")
        for i, a in enumerate(v.args):
            if isinstance(a, Param) or a.name not in writer.p.wants_grad:
                continue
            contribution = _vjp_formula(v, i, g, [val(x) for x in v.args], val(v), K)
            if a.name in inside:
                acc[a.name] = f"({acc[a.name]} + {contribution})" if a.name in acc else f"({contribution})"
                continue
            target, rng = writer.p.viewed(a)
            tbase, tkey, t_add = writer.grad(target)
            lo, hi = rng or (0, target.size)
            fresh = not t_add and tkey not in writer.zero_fill and not any(
                s[0] < hi and lo < s[1] for s in writer.assigned.get(tkey, []))
            where = f"{ops.name(tbase)}[b, {lo} + j]"
            if fresh:
                writer.assigned.setdefault(tkey, []).append((lo, hi))
                body.append(f"{where} = {contribution}")
            else:
                body.append(f"{where} += {contribution}")
    if not body:
        return
    fn = f"bwd_r{region.index}"
    kernels.add(fn, ops_params(ops), [body], rows, region.size)
    c(f"# d {', '.join(v.name for v in reversed(region.vertices))}: fused into one kernel, bwd_r{region.index}")
    c(f"{fn}({', '.join(_kind(writer) + ops.exprs)})")


def _vjp_formula(v: Vertex, i: int, g: str, args: list[str], out: str, K: str) -> str:
    return scalar_code(v, OPS[v.op].formula.vjp[i], {**operand_names(args), "y": out, "g": g},
                       lambda c: f"{K}({c})")


# ------------------------------------------- row kernels (the whole-run function's)


def reads(formula: str) -> list[str]:
    """What a formula reads besides ``g``, in kernel-argument order: operands, output, ``c``."""
    names = set(re.findall(r"\b[a-z]\w*", formula))
    return [n for n in ("x0", "x1", "y", "c") if n in names]


def takes_c(op: str) -> bool:
    f = OPS[op].formula
    return "c" in reads(" ".join((f.forward, *f.vjp)))


def back_kernel(op: str, i: int) -> str:
    return f"{op}_back_row" if OPS[op].arity == 1 else f"{op}_back{i}_row"


def row_kernels(ops: set[str]) -> str:
    """The row kernels of elementwise ``ops``, rendered from their formulas: ``{op}_row(y, x0, ...)``
    writes the output row; ``{op}_back_row(d, g, ...)`` (``_back{i}_`` for operand i of two) adds
    an operand's share of the gradient into ``d``, reading what its formula reads (:func:`reads`)."""
    out = ["import numpy as np\nfrom unrolled.engines.compiled.kernels.scalars import cast, sigmoid1, tanh1  # noqa: F401\n",
           "_jit = numba.njit(cache=True, nogil=True, error_model=\"numpy\", fastmath={\"contract\"})\n"]
    names = {**SCALAR_FUNCTIONS, "x0": "x0[j]", "x1": "x1[j]", "y": "y[j]", "g": "g[j]"}
    for op in sorted(ops):
        f = OPS[op].formula
        xs = [f"x{i}" for i in range(OPS[op].arity)] + (["c"] if takes_c(op) else [])
        body = render(f.forward, names, lambda c: f"cast({c}, y[0])")
        out.append(f"@_jit\ndef {op}_row(y, {', '.join(xs)}):\n    for j in range(y.shape[0]):\n"
                   f"        y[j] = {body}\n")
        for i, formula in enumerate(f.vjp):
            body = render(formula, names, lambda c: f"cast({c}, g[0])")
            out.append(f"@_jit\ndef {back_kernel(op, i)}({', '.join(['d', 'g'] + reads(formula))}):\n"
                       f"    for j in range(d.shape[0]):\n        d[j] += {body}\n")
    return "\n\n".join(out) + "\n\n"
