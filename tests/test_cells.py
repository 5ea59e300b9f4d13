"""The cell zoo: each cell's equations by hand, PyTorch where it has the cell, dropout stacks, bidirectional encoders.

(Single- and two-layer Elman-tanh, LSTM and GRU against torch.nn.RNN/LSTM/GRU
live in test_torch_parity.py; here: ReLU Elman, Jordan, the forget-gate bias,
dropout between layers, and the bidirectional encoder.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import numeric_grad, relative_error

from unrolled.engines.registry import available_engines, make_engine
from unrolled.graph.folded import Graph
from unrolled.graph.ops import sigmoid
from unrolled.models import cells
from unrolled.models.seq2seq import BidirectionalEncoder, reverse_time
from unrolled.train.variable_length import freeze_after_end, keep_feed

ENGINES = available_engines()
T, B, X, H = 4, 3, 3, 5


def one_cell(cell: str, **kw) -> Graph:
    g = Graph(cell)
    x = g.input("x", X)
    if cell == "jordan":
        _, y = cells.jordan(g, x, H, 2, **kw)
        g.output(y)
    else:
        g.output(cells.layer(g, cell, x, H, **kw))
    return g


def noisy_params(g: Graph, rng) -> dict[str, np.ndarray]:
    return {k: v + rng.normal(0, 0.3, v.shape) for k, v in g.init_params(rng).items()}


def by_hand(cell: str, p, x, activation="tanh"):
    """The docstring's equations as a plain loop: every step's output, [T, B, F]."""
    act = np.tanh if activation == "tanh" else (lambda a: np.maximum(a, 0))
    out = []
    if cell == "elman":
        h = np.zeros((x.shape[1], H))
        for xt in x:
            h = act(np.concatenate([xt, h], 1) @ p["W"].T + p["b"])
            out.append(h)
    elif cell == "jordan":
        y = np.zeros((x.shape[1], 2))
        for xt in x:
            h = act(np.concatenate([xt, y], 1) @ p["W"].T + p["b"])
            y = h @ p["V"].T + p["c"]
            out.append(y)
    elif cell == "lstm":
        h = c = np.zeros((x.shape[1], H))
        for xt in x:
            z = np.concatenate([xt, h], 1) @ p["W"].T + p["b"]
            i, f, gg, o = sigmoid(z[:, :H]), sigmoid(z[:, H:2 * H]), np.tanh(z[:, 2 * H:3 * H]), sigmoid(z[:, 3 * H:])
            c = f * c + i * gg
            h = o * np.tanh(c)
            out.append(h)
    else:  # gru
        h = np.zeros((x.shape[1], H))
        for xt in x:
            rz = sigmoid(np.concatenate([xt, h], 1) @ p["W"].T + p["b"])
            r, z = rz[:, :H], rz[:, H:]
            n = np.tanh(xt @ p["Wn"].T + p["bn"] + r * (h @ p["Un"].T + p["cn"]))
            h = (1 - z) * n + z * h
            out.append(h)
    return np.stack(out)


@pytest.mark.parametrize("cell, kw", [("elman", {}), ("elman", {"activation": "relu"}), ("jordan", {}),
                                      ("jordan", {"activation": "relu"}), ("lstm", {}),
                                      ("lstm", {"forget_bias": 1.0}), ("gru", {})],
                         ids=["elman-tanh", "elman-relu", "jordan", "jordan-relu", "lstm", "lstm-fb", "gru"])
def test_cell_follows_its_equations(cell, kw, rng):
    g = one_cell(cell, **kw)
    p = noisy_params(g, rng)
    x = rng.normal(size=(T, B, X))
    r = make_engine(g, "reference").run(p, {"x": x}, backward=False)
    want = by_hand(cell, p, x, kw.get("activation", "tanh"))
    np.testing.assert_allclose(r.outputs[g.outputs[0].name], want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cell, kw", [("elman", {"activation": "relu"}), ("jordan", {}), ("lstm", {"forget_bias": 1.0})])
def test_cell_gradients_by_finite_differences(cell, kw, rng):
    g = one_cell(cell, **kw)
    p = noisy_params(g, rng)
    x = rng.normal(size=(T, B, X))
    out = g.outputs[0].name
    seed = rng.normal(size=(T, B, g.outputs[0].size))
    eng = make_engine(g, "reference")
    r = eng.run(p, {"x": x}, output_grads={out: seed})

    def objective():
        return float((eng.run(p, {"x": x}, backward=False).outputs[out] * seed).sum())

    for k in p:
        assert relative_error(numeric_grad(objective, p[k]), r.grads[k]) < 1e-7, k
    assert relative_error(numeric_grad(objective, x), r.input_grads["x"]) < 1e-7


@pytest.mark.parametrize("engine", ENGINES)
def test_relu_elman_matches_torch(engine, rng):
    g = one_cell("elman", activation="relu")
    net = torch.nn.RNN(X, H, nonlinearity="relu").double()
    p = {"W": np.hstack([net.weight_ih_l0.detach().numpy(), net.weight_hh_l0.detach().numpy()]),
         "b": (net.bias_ih_l0 + net.bias_hh_l0).detach().numpy()}
    x = rng.normal(size=(T, B, X))
    seed = rng.normal(size=(T, B, H))
    r = make_engine(g, engine).run(p, {"x": x}, output_grads={"h": seed})
    out, _ = net(torch.tensor(x))
    (out * torch.tensor(seed)).sum().backward()
    np.testing.assert_allclose(r.outputs["h"], out.detach().numpy(), rtol=1e-10, atol=1e-12)
    gW = np.hstack([net.weight_ih_l0.grad.numpy(), net.weight_hh_l0.grad.numpy()])
    assert relative_error(r.grads["W"], gW) < 1e-10
    assert relative_error(r.grads["b"], net.bias_ih_l0.grad.numpy()) < 1e-10


def test_forget_bias_starts_the_forget_gate_open(rng):
    g = one_cell("lstm", forget_bias=1.0)
    b = g.init_params(rng)["b"]
    np.testing.assert_array_equal(b[H:2 * H], 1.0)
    np.testing.assert_array_equal(np.delete(b, np.s_[H:2 * H]), 0.0)
    assert not one_cell("lstm").init_params(rng)["b"].any()


def test_unknown_cell_and_activation_are_named():
    g = Graph("g")
    x = g.input("x", 2)
    with pytest.raises(ValueError, match="unknown cell 'rnn'"):
        cells.layer(g, "rnn", x, 3)
    with pytest.raises(ValueError, match="use 'tanh' or 'relu'"):
        cells.elman(g, x, 3, activation="sigmoid")


# ------------------------------------------------------------------------------------------- stacks


@pytest.mark.parametrize("cell", ["elman", "jordan", "lstm", "gru"])
def test_stack_of_three_of_any_cell(cell, rng):
    """Layer k reads layer k-1; the top is what the first layer's hand-written loop feeds on up."""
    g = Graph("stack")
    g.output(cells.stack(g, cell, g.input("x", X), H, 3))
    p = noisy_params(g, rng)
    x = rng.normal(size=(T, B, X))
    r = make_engine(g, "reference").run(p, {"x": x}, backward=False)
    v = x
    for k in range(3):
        layer = {n[len(f"l{k}."):]: a for n, a in p.items() if n.startswith(f"l{k}.")}
        if cell == "jordan":  # the next layer reads the hidden layer h; replay it by hand
            outs, y = [], np.zeros((B, H))
            for xt in v:
                h = np.tanh(np.concatenate([xt, y], 1) @ layer["W"].T + layer["b"])
                y = h @ layer["V"].T + layer["c"]
                outs.append(h)
            v = np.stack(outs)
        else:
            v = by_hand(cell, layer, v)
    np.testing.assert_allclose(r.outputs[g.outputs[0].name], v, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("cell", ["elman", "lstm", "gru"])
def test_dropout_stack_at_evaluation_is_the_plain_stack(cell, rng):
    plain, dropped = Graph("plain"), Graph("dropped")
    plain.output(cells.stack(plain, cell, plain.input("x", X), H, 3))
    dropped.output(cells.dropout_stack(dropped, cell, dropped.input("x", X), H, 3, dropout_rate=0.5))
    assert set(plain.params) == set(dropped.params)  # same layout: one set of weights runs both
    assert cells.dropout_rates(dropped) == {"l1.dropout": 0.5, "l2.dropout": 0.5}
    p = noisy_params(plain, rng)
    x = rng.normal(size=(T, B, X))
    masks = cells.dropout_masks(dropped, T, B, train=False)
    a = make_engine(plain, "reference").run(p, {"x": x}, backward=False)
    b = make_engine(dropped, "reference").run(p, {"x": x, **masks}, backward=False)
    np.testing.assert_array_equal(a.outputs[plain.outputs[0].name], b.outputs[dropped.outputs[0].name])


def test_dropout_stack_training_matches_torch_with_the_same_masks(rng):
    """Dropout between layers, as torch.nn.LSTM(dropout=p) places it, with the masks made equal."""
    g = Graph("lstm2")
    g.output(cells.dropout_stack(g, "lstm", g.input("x", X), H, 2, dropout_rate=0.4))
    masks = cells.dropout_masks(g, T, B, rng=7, train=True)
    m = masks["l1.dropout"]
    assert set(np.unique(m)) <= {0.0, 1 / 0.6}
    net = torch.nn.LSTM(X, H, num_layers=2).double()
    p = {}
    for k in range(2):
        wi, wh = getattr(net, f"weight_ih_l{k}"), getattr(net, f"weight_hh_l{k}")
        bi, bh = getattr(net, f"bias_ih_l{k}"), getattr(net, f"bias_hh_l{k}")
        p[f"l{k}.W"] = np.hstack([wi.detach().numpy(), wh.detach().numpy()])
        p[f"l{k}.b"] = (bi + bh).detach().numpy()
    x = rng.normal(size=(T, B, X))
    r = make_engine(g, "reference").run(p, {"x": x, **masks}, backward=False)
    # torch: run the two layers separately, multiplying our mask in between
    l0 = torch.nn.LSTM(X, H).double()
    l1 = torch.nn.LSTM(H, H).double()
    with torch.no_grad():
        for src, dst in ((0, l0), (1, l1)):
            for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(dst, f"{n}_l0").copy_(getattr(net, f"{n}_l{src}"))
        mid, _ = l0(torch.tensor(x))
        top, _ = l1(mid * torch.tensor(m))
    np.testing.assert_allclose(r.outputs["l1.h"], top.numpy(), rtol=1e-10, atol=1e-12)


def test_dropout_masks_are_seeded_and_unbiased():
    g = Graph("d")
    cells.dropout(g, g.input("x", 50), 0.3, name="drop")
    a = cells.dropout_masks(g, 20, 40, rng=3)["drop"]
    b = cells.dropout_masks(g, 20, 40, rng=3)["drop"]
    np.testing.assert_array_equal(a, b)
    assert abs((a == 0).mean() - 0.3) < 0.02
    assert abs(a.mean() - 1.0) < 0.03
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        cells.dropout(g, g.vertices["x"], 1.0, name="drop2")


# ------------------------------------------------------------------------------------ bidirectional


def bidirectional_graph(cell: str) -> Graph:
    g = Graph(f"bi{cell}")
    cells.bidirectional(g, cell, g.input("x", X), g.input("x_rev", X), H)
    return freeze_after_end(g)


def torch_params(cell: str, net) -> dict[str, np.ndarray]:
    p = {}
    for suffix, pre in (("", "fwd."), ("_reverse", "bwd.")):
        wi, wh = (getattr(net, f"weight_{n}_l0{suffix}").detach().numpy() for n in ("ih", "hh"))
        bi, bh = (getattr(net, f"bias_{n}_l0{suffix}").detach().numpy() for n in ("ih", "hh"))
        if cell == "gru":
            p[pre + "W"], p[pre + "b"] = np.hstack([wi[:2 * H], wh[:2 * H]]), bi[:2 * H] + bh[:2 * H]
            p[pre + "Wn"], p[pre + "bn"], p[pre + "Un"], p[pre + "cn"] = wi[2 * H:], bi[2 * H:], wh[2 * H:], bh[2 * H:]
        else:
            p[pre + "W"], p[pre + "b"] = np.hstack([wi, wh]), bi + bh
    return p


def torch_weight_grads(cell: str, net) -> dict[str, np.ndarray]:
    out = {}
    for suffix, pre in (("", "fwd."), ("_reverse", "bwd.")):
        gi, gh = (getattr(net, f"weight_{n}_l0{suffix}").grad.numpy() for n in ("ih", "hh"))
        out[pre + "W"] = np.hstack([gi[:2 * H], gh[:2 * H]]) if cell == "gru" else np.hstack([gi, gh])
        if cell == "gru":
            out[pre + "Wn"], out[pre + "Un"] = gi[2 * H:], gh[2 * H:]
    return out


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("cell", ["elman", "gru"])
def test_bidirectional_encoder_matches_torch_row_by_row(cell, engine, rng):
    """Padded rows of different lengths against torch's bidirectional RNN run on each row alone."""
    g = bidirectional_graph(cell)
    enc = BidirectionalEncoder(g, x="x", x_reversed="x_rev", fwd="fwd.h", bwd="bwd.h", engine=engine)
    net = (torch.nn.GRU if cell == "gru" else torch.nn.RNN)(X, H, bidirectional=True).double()
    p = torch_params(cell, net)
    lengths = np.array([4, 2, 3])
    x = rng.normal(size=(T, B, X))
    out_seed = rng.normal(size=(T, B, 2 * H)) * (np.arange(T)[:, None] < lengths)[:, :, None]
    fin_seed = rng.normal(size=(B, 2 * H))
    r = enc.run(p, {"x": x, "keep": keep_feed(g, lengths, T)}, output_grads={"enc": out_seed},
                final_state_grads={"enc": fin_seed})
    total = 0
    for b, L in enumerate(lengths):
        out, h_n = net(torch.tensor(x[:L, b : b + 1]))
        np.testing.assert_allclose(r.outputs["enc"][:L, b], out[:, 0].detach().numpy(), rtol=1e-10, atol=1e-12)
        final = torch.cat([h_n[0, 0], h_n[1, 0]])
        np.testing.assert_allclose(r.final_states["enc"][b], final.detach().numpy(), rtol=1e-10, atol=1e-12)
        total = total + (out[:, 0] * torch.tensor(out_seed[:L, b])).sum() + (final * torch.tensor(fin_seed[b])).sum()
    total.backward()
    for k, want in torch_weight_grads(cell, net).items():
        assert relative_error(r.grads[k], want) < 1e-9, k
    assert relative_error(r.grads["fwd.b"][:H], net.bias_hh_l0.grad.numpy()[:H]) < 1e-9


def test_reverse_time_within_lengths():
    a = np.arange(8).reshape(4, 2)
    np.testing.assert_array_equal(reverse_time(a, [3, 4]), [[4, 7], [2, 5], [0, 3], [6, 1]])
    np.testing.assert_array_equal(reverse_time(reverse_time(a, [3, 4]), [3, 4]), a)
    np.testing.assert_array_equal(reverse_time(a), a[::-1])


def test_bidirectional_refuses_mismatched_inputs():
    g = Graph("bi")
    with pytest.raises(ValueError, match="reversed in time"):
        cells.bidirectional(g, "gru", g.input("x", 3), g.input("x_rev", 4), 5)
