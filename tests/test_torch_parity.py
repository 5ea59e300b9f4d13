"""PyTorch as an outside oracle: our Elman, LSTM and GRU against torch.nn.RNN / LSTM / GRU.

Both sides get the same random float64 weights, inputs and initial states;
on top sits the same readout, either ``y = V·h + c`` with a mean
cross-entropy per step or a plain sum of the top layer's outputs (our side
seeds that one through ``output_grads``). Outputs, final states, parameter
gradients and initial-state gradients must agree to 1e-9 relative.

Weight layouts (cells.py follows PyTorch's gate order; the converter is
``unrolled.export.torch_weights.cell_from_torch``):

* Elman and LSTM: ``W = [W_ih | W_hh]``, ``b = b_ih + b_hh``.
* GRU: ``W = [W_ih[:2H] | W_hh[:2H]]``, ``b = b_ih[:2H] + b_hh[:2H]`` for r
  and z; ``Wn = W_ih[2H:]``, ``bn = b_ih[2H:]``, ``Un = W_hh[2H:]``,
  ``cn = b_hh[2H:]`` for n.

A bias that is a sum on our side gets the same gradient as each of its two
PyTorch halves. torch is imported unconditionally: these tests must run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import relative_error

from unrolled.engines.registry import available_engines, make_engine
from unrolled.export.torch_weights import cell_from_torch
from unrolled.graph.folded import Graph
from unrolled.models import cells

T, B, N_IN, H, C = 5, 3, 4, 3, 4
TOL = 1e-9
TORCH = {"elman": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}


def build(cell: str, layers: int, readout: str) -> Graph:
    g = Graph(f"{cell}{layers}")
    top = cells.stack(g, cell, g.input("x", N_IN), H, layers)
    g.output(top)
    if readout == "xent":
        y = g.output(g.linear(g.param("V", (C, H)), top, g.param("c", (C,)), name="y"))
        g.loss("cross_entropy", y, g.index_input("target", C), name="xent")
    return g


def to_ours(cell: str, net: torch.nn.Module, layers: int) -> dict[str, np.ndarray]:
    """Our parameters from the torch module's, by the library's converter (export/torch_weights.py)."""
    tensors = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    return cell_from_torch(cell, tensors, layers, prefix="")


def torch_grads(cell: str, net: torch.nn.Module, layers: int) -> dict[str, np.ndarray]:
    """The torch gradients in our layout; a summed bias must get the same gradient from both halves."""
    out = {}
    for k in range(layers):
        g_ih, g_hh = (getattr(net, f"weight_{n}_l{k}").grad.numpy() for n in ("ih", "hh"))
        gb_ih, gb_hh = (getattr(net, f"bias_{n}_l{k}").grad.numpy() for n in ("ih", "hh"))
        p = f"l{k}."
        if cell == "gru":
            out[p + "W"] = np.hstack([g_ih[: 2 * H], g_hh[: 2 * H]])
            np.testing.assert_allclose(gb_ih[: 2 * H], gb_hh[: 2 * H], rtol=1e-12)
            out[p + "b"] = gb_ih[: 2 * H]
            out[p + "Wn"], out[p + "bn"] = g_ih[2 * H:], gb_ih[2 * H:]
            out[p + "Un"], out[p + "cn"] = g_hh[2 * H:], gb_hh[2 * H:]
        else:
            out[p + "W"] = np.hstack([g_ih, g_hh])
            np.testing.assert_allclose(gb_ih, gb_hh, rtol=1e-12)
            out[p + "b"] = gb_ih
    return out


@pytest.mark.parametrize("engine", available_engines())
@pytest.mark.parametrize("readout", ["xent", "sum"])
@pytest.mark.parametrize("given_init", [False, True], ids=["zero-init", "given-init"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("cell", ["elman", "lstm", "gru"])
def test_matches_torch(cell, layers, given_init, readout, engine):
    seed = 100 * layers + 10 * ["elman", "lstm", "gru"].index(cell) + given_init
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = TORCH[cell](N_IN, H, num_layers=layers, dtype=torch.float64)
    with torch.no_grad():  # wider than PyTorch's default U(-1/√H, 1/√H), so that nothing is nearly linear
        for p in net.parameters():
            p.uniform_(-0.8, 0.8)
    x = rng.normal(size=(T, B, N_IN))
    target = rng.integers(0, C, (T, B))
    V, c = rng.normal(size=(C, H)), rng.normal(size=C)
    h0 = rng.normal(0, 0.5, (layers, B, H)) if given_init else np.zeros((layers, B, H))
    c0 = rng.normal(0, 0.5, (layers, B, H)) if given_init else np.zeros((layers, B, H))

    # ---- torch
    xt = torch.tensor(x)
    h0t, c0t = torch.tensor(h0, requires_grad=True), torch.tensor(c0, requires_grad=True)
    Vt, ct = torch.tensor(V, requires_grad=True), torch.tensor(c, requires_grad=True)
    if cell == "lstm":
        out_t, (hn_t, cn_t) = net(xt, (h0t, c0t))
    else:
        out_t, hn_t = net(xt, h0t)
    if readout == "xent":
        logits = out_t @ Vt.T + ct  # [T, B, C]
        loss_t = torch.nn.functional.cross_entropy(logits.reshape(T * B, C), torch.tensor(target).reshape(-1))
    else:
        loss_t = out_t.sum()
    loss_t.backward()

    # ---- unrolled
    g = build(cell, layers, readout)
    params = to_ours(cell, net, layers)
    inputs = {"x": x}
    if readout == "xent":
        params.update({"V": V, "c": c})
        inputs["target"] = target
    states = [f"l{k}.{s}" for k in range(layers) for s in (("h", "c") if cell == "lstm" else ("h",))]
    init = {f"l{k}.h": h0[k] for k in range(layers)} | {f"l{k}.c": c0[k] for k in range(layers) if cell == "lstm"}
    kw = {"init_states": init} if given_init else {}
    top = f"l{layers - 1}.h"
    if readout == "sum":
        kw["output_grads"] = {top: np.ones((T, B, H))}
    r = make_engine(g, engine).run(params, inputs, **kw)

    # ---- compare
    def close(ours, theirs, what):
        err = relative_error(ours, theirs)
        assert err <= TOL, f"{what}: relative error {err:.2e}"

    if readout == "xent":
        close(r.loss, loss_t.item(), "loss")
        close(r.grads["V"], Vt.grad.numpy(), "grad V")
        close(r.grads["c"], ct.grad.numpy(), "grad c")
    else:
        close(out_t.sum().item(), r.outputs[top].sum(), "sum of outputs")
    close(r.outputs[top], out_t.detach().numpy(), "outputs")
    for k in range(layers):
        close(r.final_states[f"l{k}.h"], hn_t[k].detach().numpy(), f"final h of layer {k}")
        if cell == "lstm":
            close(r.final_states[f"l{k}.c"], cn_t[k].detach().numpy(), f"final c of layer {k}")
    theirs = torch_grads(cell, net, layers)
    assert set(theirs) | ({"V", "c"} if readout == "xent" else set()) == set(r.grads)
    for name, grad in theirs.items():
        close(r.grads[name], grad, f"grad {name}")
    assert set(r.init_grads) == set(states)
    for k in range(layers):
        close(r.init_grads[f"l{k}.h"], h0t.grad[k].numpy(), f"grad h0 of layer {k}")
        if cell == "lstm":
            close(r.init_grads[f"l{k}.c"], c0t.grad[k].numpy(), f"grad c0 of layer {k}")
