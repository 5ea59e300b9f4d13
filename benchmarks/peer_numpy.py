"""Plain NumPy peer: a straightforward per-step loop in the style of min-char-rnn.

W1 is Karpathy's min-char-rnn (one-hot column vectors, forward loop, backward
loop, elementwise clipping, Adagrad) in float32. W4 is the same style of loop
sampling from a 2-layer LSTM with random weights. Nothing else: BENCHMARKS.md
gives the NumPy loop only these two workloads.
"""

from __future__ import annotations

import numpy as np

from .corpus import Chunks, Corpus
from .protocol import Protocol, time_steps
from .workloads import Workload

f32 = np.float32


def run(workload: Workload, corpus: Corpus, protocol: Protocol) -> dict:
    rng = np.random.default_rng(protocol.seed)
    if workload.id == "W1":
        return _minchar(workload, corpus, protocol, rng)
    if workload.id == "W4":
        return _sample_lstm(workload, corpus, protocol, rng)
    raise ValueError(f"the NumPy peer covers W1 and W4, not {workload.id}")


# ---------------------------------------------------------------------------
# W1: min-char-rnn


def _minchar(workload: Workload, corpus: Corpus, protocol: Protocol, rng) -> dict:
    V, H, T = corpus.V, workload.hidden, workload.T
    assert workload.B == 1 and workload.cell == "elman" and workload.layers == 1
    Wxh = (rng.standard_normal((H, V)) * 0.01).astype(f32)
    Whh = (rng.standard_normal((H, H)) * 0.01).astype(f32)
    Why = (rng.standard_normal((V, H)) * 0.01).astype(f32)
    bh = np.zeros((H, 1), f32)
    by = np.zeros((V, 1), f32)
    params = [Wxh, Whh, Why, bh, by]
    mems = [np.zeros_like(p) for p in params]
    chunks = Chunks(corpus, T, 1)
    hprev = np.zeros((H, 1), f32)
    lr, clip = f32(workload.lr), workload.clip_at

    def loss_fun(inputs, targets, hprev):
        xs, hs, ps = {}, {}, {}
        hs[-1] = np.copy(hprev)
        loss = 0.0
        for t in range(len(inputs)):
            xs[t] = np.zeros((V, 1), f32)
            xs[t][inputs[t]] = 1
            hs[t] = np.tanh(Wxh @ xs[t] + Whh @ hs[t - 1] + bh)
            y = Why @ hs[t] + by
            e = np.exp(y - y.max())
            ps[t] = e / e.sum()
            loss -= np.log(ps[t][targets[t], 0])
        dWxh, dWhh, dWhy = np.zeros_like(Wxh), np.zeros_like(Whh), np.zeros_like(Why)
        dbh, dby = np.zeros_like(bh), np.zeros_like(by)
        dhnext = np.zeros_like(hs[0])
        for t in reversed(range(len(inputs))):
            dy = np.copy(ps[t])
            dy[targets[t]] -= 1
            dWhy += dy @ hs[t].T
            dby += dy
            dh = Why.T @ dy + dhnext
            dhraw = (1 - hs[t] * hs[t]) * dh
            dbh += dhraw
            dWxh += dhraw @ xs[t].T
            dWhh += dhraw @ hs[t - 1].T
            dhnext = Whh.T @ dhraw
        grads = [dWxh, dWhh, dWhy, dbh, dby]
        for g in grads:
            np.clip(g, -clip, clip, out=g)
        return loss, grads, hs[len(inputs) - 1]

    def step():
        nonlocal hprev
        x, y = chunks.next()
        loss, grads, hprev = loss_fun(x[:, 0], y[:, 0], hprev)
        for p, g, m in zip(params, grads, mems):
            m += g * g
            p += -lr * g / np.sqrt(m + f32(1e-8))
        return loss

    return time_steps(step, protocol, T, loss_scale=1.0 / T)


# ---------------------------------------------------------------------------
# W4: sampling from a 2-layer LSTM


def _sample_lstm(workload: Workload, corpus: Corpus, protocol: Protocol, rng) -> dict:
    V, H = corpus.V, workload.hidden
    k = 1 / np.sqrt(H)
    layers = []   # (W_x [4H, in], W_h [4H, H], b [4H]); gate rows i, f, o, g
    for l in range(workload.layers):
        n_in = V if l == 0 else H
        layers.append((rng.uniform(-k, k, (4 * H, n_in)).astype(f32),
                       rng.uniform(-k, k, (4 * H, H)).astype(f32),
                       rng.uniform(-k, k, 4 * H).astype(f32)))
    Wy = rng.uniform(-k, k, (V, H)).astype(f32)
    by = rng.uniform(-k, k, V).astype(f32)
    first = corpus.index(workload.seed_char)
    inv_temp = f32(1.0 / workload.temperature)

    def generate():
        hs = [np.zeros(H, f32) for _ in layers]
        cs = [np.zeros(H, f32) for _ in layers]
        u = rng.random(workload.T)
        ix, out = first, []
        for t in range(workload.T):
            Wx, Wh, b = layers[0]
            x_proj = Wx[:, ix]                      # one-hot input = a column of W_x
            for l, (Wx, Wh, b) in enumerate(layers):
                if l > 0:
                    x_proj = Wx @ hs[l - 1]
                z = x_proj + Wh @ hs[l] + b         # [4H]
                ifo = 1 / (1 + np.exp(-z[: 3 * H]))  # the three sigmoid gates at once
                g = np.tanh(z[3 * H :])
                cs[l] = ifo[H : 2 * H] * cs[l] + ifo[:H] * g
                hs[l] = ifo[2 * H :] * np.tanh(cs[l])
            y = (Wy @ hs[-1] + by) * inv_temp
            p = np.cumsum(np.exp(y - y.max()))
            ix = min(int(np.searchsorted(p, u[t] * p[-1], side="right")), V - 1)
            out.append(ix)
        return None   # sampling has no loss

    return time_steps(generate, protocol, workload.T)
