"""PyTorch peer, written the way a competent user writes it.

`nn.RNN` / `nn.LSTM` + `nn.Linear` + `F.cross_entropy` + `torch.optim`, one-hot
float inputs, state detached between chunks, `protocol.threads` threads
(two, per BENCHMARKS.md). Sampling uses
`nn.LSTMCell`s under `inference_mode`: on this CPU a one-step `nn.LSTM` call
costs ~2x more per character than two `LSTMCell` calls (measured while writing
this peer: ~2.2k vs ~5k chars/s).
"""

from __future__ import annotations

import time

from .corpus import Chunks, Corpus
from .protocol import Protocol, peak_rss_during, time_steps
from .workloads import Workload


def run(workload: Workload, corpus: Corpus, protocol: Protocol) -> dict:
    import torch

    torch.set_num_threads(protocol.threads)
    torch.manual_seed(protocol.seed)
    if workload.kind == "sample":
        return _sample(workload, corpus, protocol)
    return _train(workload, corpus, protocol)


def _model(workload: Workload, V: int):
    import torch.nn as nn
    import torch.nn.functional as F

    class CharRNN(nn.Module):
        def __init__(self):
            super().__init__()
            if workload.cell == "elman":
                self.rnn = nn.RNN(V, workload.hidden, workload.layers, nonlinearity="tanh")
            else:
                self.rnn = nn.LSTM(V, workload.hidden, workload.layers)
            self.head = nn.Linear(workload.hidden, V)

        def forward(self, x, state=None):
            h, state = self.rnn(F.one_hot(x, V).float(), state)   # [T, B, H]
            return self.head(h), state                             # [T, B, V]

    return CharRNN()


def _detach(state):
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


def _train(workload: Workload, corpus: Corpus, protocol: Protocol) -> dict:
    import torch
    import torch.nn.functional as F

    t0 = time.perf_counter()
    V, T, B = corpus.V, workload.T, workload.B
    model = _model(workload, V)
    params = list(model.parameters())
    if workload.optimizer == "adagrad":
        opt = torch.optim.Adagrad(params, lr=workload.lr)
    else:
        opt = torch.optim.Adam(params, lr=workload.lr)
    chunks = Chunks(corpus, T, B)
    state = None

    def step():
        nonlocal state
        x, y = chunks.next()
        logits, state = model(torch.from_numpy(x), state)
        state = _detach(state)
        loss = F.cross_entropy(logits.view(-1, V), torch.from_numpy(y).view(-1),
                               reduction=workload.reduction)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if workload.clip == "value":
            torch.nn.utils.clip_grad_value_(params, workload.clip_at)
        elif workload.clip == "norm":
            torch.nn.utils.clip_grad_norm_(params, workload.clip_at)
        opt.step()
        return loss.detach()

    setup_s = time.perf_counter() - t0
    if workload.kind == "memory":
        out = peak_rss_during(step)
    else:
        scale = 1.0 / (T * B) if workload.reduction == "sum" else 1.0
        out = time_steps(step, protocol, T * B, loss_scale=scale)
    out["setup_s"] = setup_s
    return out


def _sample(workload: Workload, corpus: Corpus, protocol: Protocol) -> dict:
    import torch
    import torch.nn as nn

    V, H = corpus.V, workload.hidden
    cells = [nn.LSTMCell(V if i == 0 else H, H) for i in range(workload.layers)]
    head = nn.Linear(H, V)
    eye = torch.eye(V)
    first = corpus.index(workload.seed_char)
    inv_temp = 1.0 / workload.temperature

    @torch.inference_mode()
    def generate():
        ix, states, out = first, [None] * len(cells), []
        for _ in range(workload.T):
            x = eye[ix].view(1, V)
            for i, cell in enumerate(cells):
                states[i] = cell(x, states[i])
                x = states[i][0]
            p = torch.softmax(head(x) * inv_temp, dim=-1)
            ix = torch.multinomial(p, 1).item()
            out.append(ix)
        return None   # sampling has no loss

    return time_steps(generate, protocol, workload.T)
