"""PyTorch peer, written the way a competent user writes it, eager or compiled.

`nn.RNN` / `nn.LSTM` + `nn.Linear` + `F.cross_entropy` + `torch.optim`, one-hot
float inputs, state detached between chunks, `protocol.threads` threads
(two, per BENCHMARKS.md). Sampling uses `nn.LSTMCell`s under
`inference_mode`: a one-step `nn.LSTM` call costs more per character than
two `LSTMCell` calls.

Two variants (`protocol.variant`), each run in its own process; the harness
reports the faster per workload (BENCHMARKS.md: the fastest configuration a
competent user reaches for):

- "eager": the loop above, as written.
- "compile": what the `torch.compile` tutorials tell a user to do. The
  forward and loss are one compiled function; Dynamo cannot trace `nn.RNN`
  and `nn.LSTM` (it breaks the graph there, and its experimental
  `allow_rnn` fails on the CPU's oneDNN RNN op), so the recurrent layers
  run eager inside it and the one-hot input, the readout and the loss are
  compiled around them. Clipping and the optimizer step are one compiled
  function (the "compiled optimizer" recipe), which fuses the per-parameter
  updates. Sampling compiles the per-character cell step. The first steps,
  which compile, are timed as `compile_s` and are not part of throughput.
"""

from __future__ import annotations

import time

from .corpus import Chunks, Corpus
from .protocol import Protocol, peak_rss_during, time_steps
from .workloads import Workload

VARIANTS = ("eager", "compile")


def run(workload: Workload, corpus: Corpus, protocol: Protocol) -> dict:
    import torch

    torch.set_num_threads(protocol.threads)
    torch.manual_seed(protocol.seed)
    variant = protocol.variant or "eager"
    if variant not in VARIANTS:
        raise ValueError(f"unknown torch variant {variant!r}: choose from {', '.join(VARIANTS)}")
    if workload.kind == "sample":
        out = _sample(workload, corpus, protocol, variant == "compile")
    elif workload.kind == "start":
        out = _first_update(workload, corpus, protocol, variant == "compile")
    else:
        out = _train(workload, corpus, protocol, variant == "compile")
    return {**out, "variant": variant}


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


def _zero_state(workload: Workload, B: int):
    """The carried state from the start, so a compiled forward sees one signature throughout."""
    import torch

    shape = (workload.layers, B, workload.hidden)
    if workload.cell == "lstm":
        return torch.zeros(shape), torch.zeros(shape)
    return torch.zeros(shape)


def _update_step(workload: Workload, corpus: Corpus, compile: bool):
    """A zero-argument training step on consecutive chunks; returns the detached loss."""
    import torch
    import torch.nn.functional as F

    V, T, B = corpus.V, workload.T, workload.B
    model = _model(workload, V)
    params = list(model.parameters())
    if workload.optimizer == "adagrad":
        opt = torch.optim.Adagrad(params, lr=workload.lr)
    else:
        opt = torch.optim.Adam(params, lr=workload.lr)
    chunks = Chunks(corpus, T, B)
    state = _zero_state(workload, B)

    def forward_loss(x, y, state):
        logits, state = model(x, state)
        loss = F.cross_entropy(logits.view(-1, V), y.view(-1), reduction=workload.reduction)
        return loss, state

    def update():
        if workload.clip == "value":
            torch.nn.utils.clip_grad_value_(params, workload.clip_at)
        elif workload.clip == "norm":
            torch.nn.utils.clip_grad_norm_(params, workload.clip_at)
        opt.step()

    if compile:
        forward_loss, update = torch.compile(forward_loss), torch.compile(update)

    def step():
        nonlocal state
        x, y = chunks.next()
        loss, state = forward_loss(torch.from_numpy(x), torch.from_numpy(y), state)
        state = _detach(state)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        update()
        return loss.detach()

    return step


def _train(workload: Workload, corpus: Corpus, protocol: Protocol, compile: bool) -> dict:
    t0 = time.perf_counter()
    step = _update_step(workload, corpus, compile)
    setup_s = time.perf_counter() - t0
    extra = {"setup_s": setup_s}
    if compile:   # the first two steps compile (the second sees gradients and optimizer state)
        t0 = time.perf_counter()
        step()
        step()
        extra["compile_s"] = time.perf_counter() - t0
    if workload.kind == "memory":
        return {**peak_rss_during(step), **extra}
    scale = 1.0 / (workload.T * workload.B) if workload.reduction == "sum" else 1.0
    return {**time_steps(step, protocol, workload.T * workload.B, loss_scale=scale), **extra}


def _first_update(workload: Workload, corpus: Corpus, protocol: Protocol, compile: bool) -> dict:
    """W6: build the model and run one update; the harness times it from the process's start."""
    step = _update_step(workload, corpus, compile)
    loss = float(step())
    return {"end_time": time.time(), "loss": loss}


def _sample(workload: Workload, corpus: Corpus, protocol: Protocol, compile: bool) -> dict:
    generate = sampler(workload, corpus, compile)

    def step():
        generate()
        return None   # sampling has no loss

    extra = {}
    if compile:
        t0 = time.perf_counter()
        generate()
        extra["compile_s"] = time.perf_counter() - t0
    return {**time_steps(step, protocol, workload.T * workload.B), **extra}


def sampler(workload: Workload, corpus: Corpus, compile: bool = False):
    """``generate()``: ``workload.T`` characters of each of ``workload.B`` streams, every stream
    from the seed character, as a list of ``T`` token tensors ``[B]`` (of ints at one stream).
    One stream feeds back a Python int (`.item()`), as a user sampling one text writes it; many
    feed back the batch's token tensor, drawn with one `torch.multinomial` over ``[B, V]``."""
    import torch
    import torch.nn as nn

    V, H, B = corpus.V, workload.hidden, workload.B
    cells = [nn.LSTMCell(V if i == 0 else H, H) for i in range(workload.layers)]
    head = nn.Linear(H, V)
    eye = torch.eye(V)
    first = corpus.index(workload.seed_char)
    inv_temp = 1.0 / workload.temperature

    def cell_step(x, states):
        """One character through every layer: the next-character probabilities and the new states."""
        new = []
        for cell, s in zip(cells, states):
            s = cell(x, s)
            new.append(s)
            x = s[0]
        return torch.softmax(head(x) * inv_temp, dim=-1), new

    if compile:
        cell_step = torch.compile(cell_step)

    @torch.inference_mode()
    def generate():
        states = [(torch.zeros(B, H), torch.zeros(B, H)) for _ in cells]
        out = []
        if B == 1:
            ix = first
            for _ in range(workload.T):
                p, states = cell_step(eye[ix].view(1, V), states)
                ix = torch.multinomial(p, 1).item()
                out.append(ix)
            return out
        ix = torch.full((B,), first)
        for _ in range(workload.T):
            p, states = cell_step(eye[ix], states)
            ix = torch.multinomial(p, 1).squeeze(1)
            out.append(ix)
        return out

    return generate
