"""Ready-made cells: one time step each, built from primitive ops.

A cell adds one step's vertices to a graph and returns the vertex that
carries the cell's output; the time axis belongs to the unroller. Each
declares its state(s) with ``g.state`` and reads them through ``.prev``,
so ``print(g)`` shows the textbook equations. Parameter layouts follow
PyTorch's (gate order i, f, g, o for the LSTM; r, z, n for the GRU) so that
weights can be moved between the two; see ``tests/test_torch_parity.py``.

Dropout between stacked layers is data, not randomness inside an op: a
mask input per layer that a trainer fills (:func:`dropout_stack`). A
bidirectional encoder is two chains in one graph, the backward one fed the
time-reversed sequence (:func:`bidirectional`).
"""

from __future__ import annotations

from unrolled.graph.dropout import DROPOUT_ATTR, dropout, dropout_masks, dropout_rates  # noqa: F401 (the cells' API)
from unrolled.graph.folded import Graph, Vertex

CELLS = ("elman", "jordan", "lstm", "gru")


def elman(g: Graph, x: Vertex, hidden: int, *, prefix: str = "", activation: str = "tanh",
          init: str = "zeros") -> Vertex:
    """Elman (simple recurrent) cell::

        h_t = act(W · [x_t ; h_{t-1}] + b)      act = tanh or relu
    """
    if activation not in ("tanh", "relu"):
        raise ValueError(f"Elman activation '{activation}'; use 'tanh' or 'relu'")
    p = prefix
    h = g.state(f"{p}h", hidden, init=init)
    W = g.param(f"{p}W", (hidden, x.size + hidden), init="xavier")
    b = g.param(f"{p}b", (hidden,), init="zeros")
    a = g.linear(W, g.concat(x, h.prev, name=f"{p}xh"), b, name=f"{p}a")
    return g.apply(activation, a, name=f"{p}h")


def jordan(g: Graph, x: Vertex, hidden: int, output_size: int, *, prefix: str = "",
           activation: str = "tanh") -> tuple[Vertex, Vertex]:
    """Jordan cell: the previous *output* (not the hidden layer) is fed back::

        h_t = act(W · [x_t ; y_{t-1}] + b)
        y_t = V · h_t + c
    Returns ``(h, y)``.
    """
    p = prefix
    y = g.state(f"{p}y", output_size)
    W = g.param(f"{p}W", (hidden, x.size + output_size), init="xavier")
    b = g.param(f"{p}b", (hidden,), init="zeros")
    V = g.param(f"{p}V", (output_size, hidden), init="xavier")
    c = g.param(f"{p}c", (output_size,), init="zeros")
    h = g.apply(activation, g.linear(W, g.concat(x, y.prev, name=f"{p}xy"), b, name=f"{p}a"), name=f"{p}h")
    g.linear(V, h, c, name=f"{p}y")
    return h, y


def lstm(g: Graph, x: Vertex, hidden: int, *, prefix: str = "", forget_bias: float = 0.0) -> Vertex:
    """Long short-term memory cell (Hochreiter & Schmidhuber; forget gate of Gers et al.)::

        [i; f; g; o] = W · [x_t ; h_{t-1}] + b
        i = σ(i)   f = σ(f + forget_bias)   g = tanh(g)   o = σ(o)
        c_t = f ⊙ c_{t-1} + i ⊙ g
        h_t = o ⊙ tanh(c_t)
    ``forget_bias`` initialises the forget gate's bias (1.0 is the usual
    advice for long memory; PyTorch starts it near 0, and so does the
    character model, which learned slower with 1.0: benchmarks/QUALITY.md);
    it is a starting value, learned like the rest of ``b``.
    """
    p, H = prefix, hidden
    h = g.state(f"{p}h", H)
    c = g.state(f"{p}c", H)
    W = g.param(f"{p}W", (4 * H, x.size + H), init="xavier")
    b = g.param(f"{p}b", (4 * H,), init=f"forget_bias:{float(forget_bias)}" if forget_bias else "zeros")
    z = g.linear(W, g.concat(x, h.prev, name=f"{p}xh"), b, name=f"{p}z")
    zi, zf, zg, zo = g.split(z, 4, names=[f"{p}zi", f"{p}zf", f"{p}zg", f"{p}zo"])
    i = g.sigmoid(zi, name=f"{p}i")
    f = g.sigmoid(zf, name=f"{p}f")
    gg = g.tanh(zg, name=f"{p}g")
    o = g.sigmoid(zo, name=f"{p}o")
    g.add(g.mul(f, c.prev, name=f"{p}fc"), g.mul(i, gg, name=f"{p}ig"), name=f"{p}c")
    return g.mul(o, g.tanh(c, name=f"{p}tanh_c"), name=f"{p}h")


def gru(g: Graph, x: Vertex, hidden: int, *, prefix: str = "") -> Vertex:
    """Gated recurrent unit (Cho et al. 2014), in PyTorch's formulation::

        [r; z] = σ(W · [x_t ; h_{t-1}] + b)
        n = tanh(W_n · x_t + b_n + r ⊙ (U_n · h_{t-1} + c_n))
        h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}
    """
    p, H = prefix, hidden
    h = g.state(f"{p}h", H)
    W = g.param(f"{p}W", (2 * H, x.size + H), init="xavier")
    b = g.param(f"{p}b", (2 * H,), init="zeros")
    Wn = g.param(f"{p}Wn", (H, x.size), init="xavier")
    bn = g.param(f"{p}bn", (H,), init="zeros")
    Un = g.param(f"{p}Un", (H, H), init="xavier")
    cn = g.param(f"{p}cn", (H,), init="zeros")
    rz = g.sigmoid(g.linear(W, g.concat(x, h.prev, name=f"{p}xh"), b, name=f"{p}zrz"), name=f"{p}rz")
    r, z = g.split(rz, 2, names=[f"{p}r", f"{p}z"])
    hn = g.linear(Un, h.prev, cn, name=f"{p}hn")
    n = g.tanh(g.add(g.linear(Wn, x, bn, name=f"{p}xn"), g.mul(r, hn, name=f"{p}rhn"), name=f"{p}zn"), name=f"{p}n")
    return g.add(g.mul(g.one_minus(z, name=f"{p}1mz"), n, name=f"{p}zn_"), g.mul(z, h.prev, name=f"{p}zh"), name=f"{p}h")


def layer(g: Graph, cell: str, x: Vertex, hidden: int, *, prefix: str = "", **kw) -> Vertex:
    """One layer of the named cell; returns the vertex the next layer reads."""
    if cell == "elman":
        return elman(g, x, hidden, prefix=prefix, **kw)
    if cell == "lstm":
        return lstm(g, x, hidden, prefix=prefix, **kw)
    if cell == "gru":
        return gru(g, x, hidden, prefix=prefix, **kw)
    if cell == "jordan":
        h, _ = jordan(g, x, hidden, kw.pop("output_size", hidden), prefix=prefix, **kw)
        return h
    raise ValueError(f"unknown cell '{cell}'; known cells: {', '.join(CELLS)}")


def stack(g: Graph, cell: str, x: Vertex, hidden: int, layers: int, **kw) -> Vertex:
    """``layers`` cells of one kind, each reading the one below; prefixes ``l0.``, ``l1.``, …"""
    if layers < 1:
        raise ValueError(f"a stack needs at least one layer, got {layers}")
    for k in range(layers):
        x = layer(g, cell, x, hidden, prefix=f"l{k}.", **kw)
    return x


# ------------------------------------------------------------------ dropout

def dropout_stack(g: Graph, cell: str, x: Vertex, hidden: int, layers: int, *, dropout_rate: float = 0.0,
                  **kw) -> Vertex:
    """A stack like :func:`stack` (same prefixes ``l0.``, ``l1.``, … and the
    same parameters) with dropout on the connections *between* layers, as
    PyTorch's ``nn.RNN(dropout=p)`` places it::

        h⁰_t = cell₀(x_t, h⁰_{t-1})
        hᵏ_t = cellₖ(mᵏ_t ⊙ hᵏ⁻¹_t, hᵏ_{t-1})      k = 1 … layers-1
        mᵏ_t ~ Bernoulli(1 - p) / (1 - p)          (ones at evaluation)

    The masks are dense inputs ``l<k>.dropout`` (see :func:`dropout`); the
    recurrent connections and the top layer's output are never dropped.
    """
    if layers < 1:
        raise ValueError(f"a stack needs at least one layer, got {layers}")
    for k in range(layers):
        if k > 0 and dropout_rate > 0:
            x = dropout(g, x, dropout_rate, name=f"l{k}.dropout")
        x = layer(g, cell, x, hidden, prefix=f"l{k}.", **kw)
    return x


# ------------------------------------------------------------ bidirectional

def bidirectional(g: Graph, cell: str, x: Vertex, x_reversed: Vertex, hidden: int, *, layers: int = 1,
                  dropout_rate: float = 0.0, **kw) -> tuple[Vertex, Vertex]:
    """A bidirectional encoder as two independent chains in one graph::

        →h_t = cell_fwd(x_t,       →h_{t-1})        reads the sequence forwards
        ←h_t = cell_bwd(x_{L-1-t}, ←h_{t-1})        reads it backwards (x_reversed)
        h_t  = [→h_t ; ←h_{L-1-t}]                  concatenated outside the graph

    A step sees only the past, so the backward pass is the same kind of
    chain fed the time-reversed sequence (``x_reversed``, reversed within
    each row's length: see ``seq2seq.reverse_time``). Prefixes are ``fwd.``
    and ``bwd.`` (then ``l<k>.`` for each layer). Returns ``(→h, ←h)``;
    ``seq2seq.BidirectionalEncoder`` runs the graph and does the
    re-alignment and concatenation, forwards and backwards.

    With ``layers > 1`` each direction is its own stack; PyTorch's deep
    bidirectional RNN instead feeds layer k both directions of layer k-1,
    which needs the whole sequence between layers (build it from one
    bidirectional graph per layer).
    """
    if x_reversed.size != x.size:
        raise ValueError(f"bidirectional: '{x.name}' has {x.size} features but '{x_reversed.name}' has "
                         f"{x_reversed.size}; feed the same sequence reversed in time")
    out = []
    for direction, inp in (("fwd.", x), ("bwd.", x_reversed)):
        h = inp
        for k in range(layers):
            if k > 0 and dropout_rate > 0:
                h = dropout(g, h, dropout_rate, name=f"{direction}l{k}.dropout")
            h = layer(g, cell, h, hidden, prefix=f"{direction}l{k}." if layers > 1 else direction, **kw)
        out.append(h)
    return out[0], out[1]
