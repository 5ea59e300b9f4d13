"""The closed table of operations: for each, its shape rule, forward rule and
vector-Jacobian product (VJP), side by side.

Every engine (reference, compiled) evaluates vertices through this table, so
an op defined here is correct everywhere or nowhere; the op tests check each
VJP against central finite differences. Each entry also carries the op's ONNX
rule (``Op.onnx``), so that exporting a graph (export/onnx.py) needs no second
table; the rules build ONNX nodes through a small builder and import nothing.

Conventions. A vertex value at one step is ``[B, F]`` (``[B]`` integers for an
index input). A parameter value has its own shape and no batch axis; when an
elementwise op mixes a parameter ``[F]`` with a vertex ``[B, F]`` the VJP
returns the broadcast gradient ``[B, F]`` and the engine sums it over the
batch (see :func:`unbroadcast`). A VJP returns one gradient per argument, or
``None`` for an argument that has none (indices, targets of a loss).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class ArgSpec:
    """What a shape rule may know about an argument: its name and shape."""

    name: str
    shape: tuple[int, ...]  # a vertex: (F,); a parameter: its own shape
    is_param: bool = False
    is_index: bool = False  # integer indices in [0, shape[0])


@dataclass(frozen=True)
class Formula:
    """An elementwise op's rule as scalar formulas, the one text every path's code comes from.

    A formula is a Python expression over one entry of each operand (``x0``, ``x1``), the
    op's attribute ``c``, and, in a VJP, the output ``y`` and its gradient ``g``; ``K(1.0)``
    marks a constant (each renderer casts it to the run's precision) and the calls are
    those of :data:`FUNCTIONS`. The NumPy forward and VJP over ``[rows, F]`` are these
    formulas evaluated on arrays (:func:`_numpy_rule`); the compiled paths render them
    with :func:`render` into their own loops (fuse.py, wholestep.py, feedback.py) or spell
    them as NumPy calls with ``out=`` (engines/compiled/ufunc_calls.py).
    """

    forward: str
    vjp: tuple[str, ...]  # one formula per operand: its share of the gradient

    @property
    def needs(self) -> str:
        """What the VJP reads besides ``g``: the operands ("args") and/or the output ("out")."""
        names = set(re.findall(r"\b[a-z]\w*", " ".join(self.vjp)))
        return " ".join(w for w, hit in (("args", any(re.fullmatch(r"x\d", n) for n in names)),
                                          ("out", "y" in names)) if hit)


@dataclass(frozen=True)
class Op:
    name: str
    arity: int | None  # None: any number >= 1
    shape: Callable[[list[ArgSpec], dict], int]
    forward: Callable[[list[np.ndarray], dict], np.ndarray]
    vjp: Callable[[np.ndarray, list[np.ndarray], np.ndarray, dict], list]
    is_loss: bool = False
    params_allowed: tuple[int, ...] = field(default=())  # argument positions that may be parameters
    index_allowed: tuple[int, ...] = field(default=())  # positions that may be index inputs
    # onnx(b, args, attrs) -> the name of the tensor holding one step's value [B, F]; ``args`` are the
    # operands' tensor names, ``b`` a builder with node(op_type, inputs, **attributes) -> name,
    # const(value, integer=False) -> name and float_type, the ONNX type of the run's floats (see
    # export/onnx.py). None: the op cannot be exported.
    onnx: Callable | None = None
    formula: Formula | None = None  # an elementwise op's scalar rule; None: a structural op


def unbroadcast(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum a gradient over the batch axis a parameter was broadcast along."""
    while grad.ndim > len(shape):
        grad = grad.sum(axis=0)
    return grad


# ---------------------------------------------------------------- shape rules


def _need_vector(a: ArgSpec, what: str) -> None:
    if a.is_param and len(a.shape) != 1:
        raise ValueError(f"{what} '{a.name}' is a parameter of shape {list(a.shape)}; it must be a vector")
    if a.is_index:
        raise ValueError(f"'{a.name}' holds integer indices; convert it first with one_hot or embedding")


def _same_size(args: list[ArgSpec], attrs: dict) -> int:
    for a in args:
        _need_vector(a, "argument")
    sizes = [a.shape[0] for a in args]
    if len(set(sizes)) != 1:
        listed = " and ".join(f"'{a.name}' has {a.shape[0]}" for a in args)
        raise ValueError(f"{listed} features; elementwise operands must have equal sizes")
    if all(a.is_param for a in args):
        raise ValueError("every operand is a parameter; at least one must be a vertex")
    return sizes[0]


def _unary(args: list[ArgSpec], attrs: dict) -> int:
    _need_vector(args[0], "argument")
    if args[0].is_param:
        raise ValueError(f"'{args[0].name}' is a parameter; this op takes a vertex")
    return args[0].shape[0]


def _matmul_shape(args: list[ArgSpec], attrs: dict) -> int:
    W, x = args[0], args[1]
    if not W.is_param or len(W.shape) != 2:
        raise ValueError(f"'{W.name}' must be a parameter matrix [out, in]")
    _need_vector(x, "input")
    if x.is_param:
        raise ValueError(f"'{x.name}' is a parameter; the second operand must be a vertex")
    if W.shape[1] != x.shape[0]:
        raise ValueError(
            f"{W.name} is {list(W.shape)} but {x.name} has {x.shape[0]} features; "
            f"{W.name}'s second size must equal {x.name}'s size"
        )
    return W.shape[0]


def _linear_shape(args: list[ArgSpec], attrs: dict) -> int:
    out = _matmul_shape(args[:2], attrs)
    b = args[2]
    if not b.is_param or b.shape != (out,):
        raise ValueError(f"bias '{b.name}' is {list(b.shape)} but must be a parameter [{out}]")
    return out


def _concat_shape(args: list[ArgSpec], attrs: dict) -> int:
    for a in args:
        _need_vector(a, "operand")
        if a.is_param:
            raise ValueError(f"'{a.name}' is a parameter; concat joins vertices")
    return sum(a.shape[0] for a in args)


def _slice_shape(args: list[ArgSpec], attrs: dict) -> int:
    size = _unary(args, attrs)
    start, stop = attrs["start"], attrs["stop"]
    if not 0 <= start < stop <= size:
        raise ValueError(f"slice [{start}:{stop}] does not fit in '{args[0].name}' of size {size}")
    return stop - start


def _embedding_shape(args: list[ArgSpec], attrs: dict) -> int:
    E, idx = args
    if not E.is_param or len(E.shape) != 2:
        raise ValueError(f"'{E.name}' must be a parameter matrix [vocabulary, dim]")
    if not idx.is_index:
        raise ValueError(f"'{idx.name}' must be an index input (g.index_input)")
    if E.shape[0] != idx.shape[0]:
        raise ValueError(
            f"{E.name} has {E.shape[0]} rows but {idx.name} indexes {idx.shape[0]} tokens; they must be equal"
        )
    return E.shape[1]


def _one_hot_shape(args: list[ArgSpec], attrs: dict) -> int:
    if not args[0].is_index:
        raise ValueError(f"'{args[0].name}' must be an index input (g.index_input)")
    return args[0].shape[0]


def _xent_shape(args: list[ArgSpec], attrs: dict) -> int:
    logits, target = args
    _unary([logits], attrs)
    if not target.is_index:
        raise ValueError(f"target '{target.name}' must be an index input of class numbers")
    if target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"'{logits.name}' has {logits.shape[0]} classes but target '{target.name}' has {target.shape[0]}"
        )
    return 1


def _mse_shape(args: list[ArgSpec], attrs: dict) -> int:
    _same_size(args, attrs)
    return 1


# ------------------------------------------------------------ scalar formulas

# The calls a formula may make. Each renderer names its implementation of each: NumPy's below
# (evaluating a formula on whole arrays), the compiled paths' in fuse.SCALAR_FUNCTIONS.
FUNCTIONS = ("tanh", "sigmoid", "exp", "log1p", "abs", "max")

_TOKEN = re.compile(r"\bK\(([^()]*)\)|\b[A-Za-z_]\w*")


def render(formula: str, names: dict[str, str], const: Callable[[str], str]) -> str:
    """``formula`` with each name replaced by ``names[name]`` (others kept) and each constant
    ``K(v)`` by ``const(v)``: the text of one path's code for one entry of an op."""
    def one(m: re.Match) -> str:
        if m.group(1) is not None:
            return const(render(m.group(1), names, const))
        return names.get(m.group(0), m.group(0))

    return _TOKEN.sub(one, formula)


def _exp(x):
    with np.errstate(under="ignore"):  # e^x underflows to 0 for very negative x: the right answer
        return np.exp(x)


_NUMPY = {"tanh": np.tanh, "exp": _exp, "log1p": np.log1p, "abs": np.abs, "max": np.maximum,
          "where": np.where, "K": lambda v: v}


class _IfToWhere(ast.NodeTransformer):
    """``a if cond else b`` (an entry's choice) becomes ``where(cond, a, b)`` (the arrays' choice)."""

    def visit_IfExp(self, node):
        self.generic_visit(node)
        return ast.Call(ast.Name("where", ast.Load()), [node.test, node.body, node.orelse], [])


def _numpy_rule(formula: str, params: str) -> Callable:
    """A formula as a NumPy function of whole arrays, ``lambda params: formula``."""
    tree = ast.fix_missing_locations(_IfToWhere().visit(ast.parse(f"lambda {params}: {formula}", mode="eval")))
    return eval(compile(tree, f"<op formula {formula}>", "eval"), {**_NUMPY, "sigmoid": sigmoid})


def _elementwise(name: str, arity: int, forward: str, vjp: tuple[str, ...], onnx: Callable) -> Op:
    """An elementwise op from its scalar formulas; its NumPy rules are derived from them."""
    calls = set(re.findall(r"\b([A-Za-z_]\w*)\(", " ".join((forward, *vjp)))) - {"K"}
    assert calls <= set(FUNCTIONS), f"op {name} calls {sorted(calls - set(FUNCTIONS))}, which no renderer has"
    xs = ", ".join(f"x{i}" for i in range(arity))
    fwd = _numpy_rule(forward, f"{xs}, c=None")
    grads = [_numpy_rule(f, f"g, y, {xs}, c=None") for f in vjp]

    def numpy_forward(v, a):
        out = fwd(*v, c=a.get("c"))
        return out.copy() if any(out is x for x in v) else out  # a vertex's value is its own array

    def numpy_vjp(g, v, out, a):
        return [rule(g, out, *v, c=a.get("c")) for rule in grads]

    shape, params = (_same_size, (0, 1)) if arity == 2 else (_unary, ())
    return Op(name, arity, shape, numpy_forward, numpy_vjp, params_allowed=params, onnx=onnx,
              formula=Formula(forward, vjp))


# ------------------------------------------------------------ numerics helpers


# exp of a very negative number underflows to 0, which is the right answer
# here; the helpers below say so, so that np.seterr(under="raise") (the test
# suite's setting) does not turn a correct 0 into an error.


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function without overflow at large |x|."""
    with np.errstate(under="ignore"):
        e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


def softmax(x: np.ndarray) -> np.ndarray:
    with np.errstate(under="ignore"):
        z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    with np.errstate(under="ignore"):
        z = np.exp(shifted)
    return shifted - np.log(z.sum(axis=-1, keepdims=True))


def _add_bias(y: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``y + b`` into ``y``, a product's own new array, where the types allow: no second array."""
    if y.dtype == np.result_type(y, b) and y.shape == np.broadcast_shapes(y.shape, b.shape):
        y += b
        return y
    return y + b


def _scatter_rows(shape, idx, g):
    out = np.zeros(shape, dtype=g.dtype)
    np.add.at(out, idx, g)
    return out


def _one_hot(idx: np.ndarray, n: int, dtype) -> np.ndarray:
    out = np.zeros((idx.shape[0], n), dtype=dtype)
    out[np.arange(idx.shape[0]), idx] = 1
    return out


def _xent_forward(v, a):
    logits, target = v
    logp = log_softmax(logits)
    return -logp[np.arange(target.shape[0]), target][:, None]


def _xent_vjp(g, v, out, a):
    logits, target = v
    d = softmax(logits)
    d[np.arange(target.shape[0]), target] -= 1
    return [g * d, None]


def _mse_forward(v, a):
    p, y = v
    return np.mean((p - y) ** 2, axis=-1, keepdims=True)


def _mse_vjp(g, v, out, a):
    p, y = v
    d = g * (2.0 / p.shape[-1]) * (p - y)
    return [d, -d]


def _concat_vjp(g, v, out, a):
    grads, start = [], 0
    for x in v:
        grads.append(g[:, start : start + x.shape[-1]])
        start += x.shape[-1]
    return grads


def _slice_vjp(g, v, out, a):
    full = np.zeros_like(v[0], dtype=g.dtype)
    full[:, a["start"] : a["stop"]] = g
    return [full]


def _softmax_vjp(g, v, s, a):
    return [s * (g - (g * s).sum(axis=-1, keepdims=True))]


def _log_softmax_vjp(g, v, out, a):
    with np.errstate(under="ignore"):
        p = np.exp(out)
    return [g - p * g.sum(axis=-1, keepdims=True)]


# ----------------------------------------------------------------- ONNX rules
# Values are [B, F] (an index input [B] int64); parameters keep their own shapes.


def _onnx_product(b, args, a):
    """``x · W^T (+ bias)`` as one Gemm: the vertex is the first Gemm operand."""
    return b.node("Gemm", [args[1], args[0], *args[2:]], transB=1)


def _onnx_slice(b, args, a):
    return b.node("Slice", [args[0], b.const([a["start"]], integer=True), b.const([a["stop"]], integer=True),
                            b.const([1], integer=True)])


def _onnx_one_hot(b, args, a):
    """``index == range(n)``, cast: ONNX Runtime's OneHot has no float64 kernel."""
    column = b.node("Unsqueeze", [args[0], b.const([1], integer=True)])  # [B, 1]
    return b.node("Cast", [b.node("Equal", [column, b.const(np.arange(a["n"]), integer=True)])], to=b.float_type)


def _onnx_xent(b, args, a):
    """``-log_softmax(logits)[target]`` as a [B, 1] column."""
    logp = b.node("LogSoftmax", [args[0]], axis=-1)
    picked = b.node("GatherElements", [logp, b.node("Unsqueeze", [args[1], b.const([1], integer=True)])], axis=1)
    return b.node("Neg", [picked])


def _onnx_mse(b, args, a):
    d = b.node("Sub", [args[0], args[1]])
    return b.node("ReduceMean", [b.node("Mul", [d, d])], axes=[-1], keepdims=1)


def _onnx_elementwise(op_type: str):
    return lambda b, args, a: b.node(op_type, list(args))


# --------------------------------------------------------------------- table

def _product_ops(product: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> list[Op]:
    """matmul and linear, their matrix products made by ``product(a, b)`` (``a @ b``)."""
    return [
        Op("matmul", 2, _matmul_shape,
           lambda v, a: product(v[1], v[0].T),
           lambda g, v, out, a: [product(g.T, v[1]), product(g, v[0])],
           params_allowed=(0,), onnx=_onnx_product),
        Op("linear", 3, _linear_shape,
           lambda v, a: _add_bias(product(v[1], v[0].T), v[2]),
           lambda g, v, out, a: [product(g.T, v[1]), product(g, v[0]), g.sum(axis=0)],
           params_allowed=(0, 2), onnx=_onnx_product),
    ]


# Each elementwise op: its forward formula, then one VJP formula per operand (see Formula).
ELEMENTWISE_OPS = [
    _elementwise("add", 2, "x0 + x1", ("g", "g"), _onnx_elementwise("Add")),
    _elementwise("sub", 2, "x0 - x1", ("g", "-g"), _onnx_elementwise("Sub")),
    _elementwise("mul", 2, "x0 * x1", ("g * x1", "g * x0"), _onnx_elementwise("Mul")),
    _elementwise("scale", 1, "x0 * K(c)", ("g * K(c)",),
                 lambda b, args, a: b.node("Mul", [args[0], b.const(a["c"])])),
    _elementwise("one_minus", 1, "K(1.0) - x0", ("-g",),
                 lambda b, args, a: b.node("Sub", [b.const(1.0), args[0]])),
    _elementwise("tanh", 1, "tanh(x0)", ("g * (K(1.0) - y * y)",), _onnx_elementwise("Tanh")),
    _elementwise("sigmoid", 1, "sigmoid(x0)", ("g * y * (K(1.0) - y)",), _onnx_elementwise("Sigmoid")),
    _elementwise("relu", 1, "max(x0, K(0.0))", ("(g if x0 > K(0.0) else K(0.0))",), _onnx_elementwise("Relu")),
    _elementwise("identity", 1, "x0", ("g",), _onnx_elementwise("Identity")),
    _elementwise("softplus", 1, "max(x0, K(0.0)) + log1p(exp(-abs(x0)))", ("g * sigmoid(x0)",),
                 _onnx_elementwise("Softplus")),
    _elementwise("exp", 1, "exp(x0)", ("g * y",), _onnx_elementwise("Exp")),
]

OPS: dict[str, Op] = {
    op.name: op
    for op in [
        *_product_ops(np.matmul),
        *ELEMENTWISE_OPS,
        Op("concat", None, _concat_shape,
           lambda v, a: np.concatenate(v, axis=-1),
           _concat_vjp,
           onnx=lambda b, args, a: b.node("Concat", list(args), axis=-1)),
        Op("slice", 1, _slice_shape,
           lambda v, a: v[0][:, a["start"] : a["stop"]],
           _slice_vjp,
           onnx=_onnx_slice),
        Op("softmax", 1, _unary,
           lambda v, a: softmax(v[0]),
           _softmax_vjp,
           onnx=lambda b, args, a: b.node("Softmax", [args[0]], axis=-1)),
        Op("log_softmax", 1, _unary,
           lambda v, a: log_softmax(v[0]),
           _log_softmax_vjp,
           onnx=lambda b, args, a: b.node("LogSoftmax", [args[0]], axis=-1)),
        Op("embedding", 2, _embedding_shape,
           lambda v, a: v[0][v[1]],
           lambda g, v, out, a: [_scatter_rows(v[0].shape, v[1], g), None],
           params_allowed=(0,), index_allowed=(1,),
           onnx=lambda b, args, a: b.node("Gather", [args[0], args[1]], axis=0)),
        Op("one_hot", 1, _one_hot_shape,
           lambda v, a: _one_hot(v[0], a["n"], a["dtype"]),
           lambda g, v, out, a: [None],
           index_allowed=(0,), onnx=_onnx_one_hot),
        Op("cross_entropy", 2, _xent_shape, _xent_forward, _xent_vjp,
           is_loss=True, index_allowed=(1,), onnx=_onnx_xent),
        Op("mse", 2, _mse_shape, _mse_forward, _mse_vjp, is_loss=True, onnx=_onnx_mse),
    ]
}

LOSS_KINDS = tuple(name for name, op in OPS.items() if op.is_loss)


def with_product(product: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> dict[str, Op]:
    """The op table with matmul's and linear's products made by ``product(a, b)``.

    This table is the specification and needs nothing but NumPy; the compiled
    engine builds its own copy with the products on its BLAS bindings (blas.py),
    every other rule shared, so that binding them is the engine's affair."""
    return {**OPS, **{op.name: op for op in _product_ops(product)}}


# ------------------------------------------------------- what each path runs

# Every compiled path renders each elementwise op from its formula. The structural ops (products,
# concatenation, slices, lookups, softmax, losses) have no formula: each path keeps its rules for
# them in one dict by op name beside its code (codegen.FORWARD / BACKWARD, wholestep.FORWARD /
# BACKWARD, feedback.NUMPY_RULES / LOOP_RULES), and what it runs is those keys and these.
ELEMENTWISE = frozenset(op.name for op in OPS.values() if op.formula is not None)
