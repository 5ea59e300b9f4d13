"""The PyTorch side of the quality comparison: the same character model, trained
for the same wall-clock time on the same split, scored the same way.

    python -m benchmarks.quality_torch ../shared/data/shakespeare.txt --minutes 10

Model and training follow `unrolled train`'s defaults (char-rnn's): LSTM 2 x 128,
one-hot input, linear readout, T = 50, B = 50 evenly spaced streams with the
state carried between chunks, Adam 2e-3, global-norm clip 5, the last 10% of
the text held out. Validation scores the held-out text the way
`unrolled evaluate` does: one stream, in 50-character chunks with the state
carried, every character after the first predicted once; it reports nats and
bits per character.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np


def main(argv=None) -> int:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    text = open(args.file, encoding="utf-8").read()
    chars = sorted(set(text))
    V = len(chars)
    lookup = {c: i for i, c in enumerate(chars)}
    ids = np.array([lookup[c] for c in text], dtype=np.int64)
    cut = int(len(ids) * 0.9)
    train, val = ids[:cut], ids[cut:]
    T, B, H, L = 50, 50, 128, 2

    class CharRNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(V, H, L)
            self.head = nn.Linear(H, V)

        def forward(self, x, state=None):
            h, state = self.rnn(F.one_hot(x, V).float(), state)
            return self.head(h), state

    model = CharRNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    stream = len(train) // B
    streams = torch.from_numpy(train[: stream * B].reshape(B, stream).T.copy())  # [stream, B]
    pos, state, steps = 0, None, 0
    start = time.perf_counter()
    while time.perf_counter() - start < args.minutes * 60:
        if pos + T + 1 > stream:
            pos, state = 0, None
        x, y = streams[pos:pos + T], streams[pos + 1:pos + T + 1]
        pos += T
        logits, state = model(x, state)
        state = tuple(s.detach() for s in state)
        loss = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        steps += 1
    elapsed = time.perf_counter() - start

    model.eval()
    with torch.no_grad():
        # as `unrolled evaluate` scores a text: one stream, every character after the first
        # predicted once, in chunks of T with the state carried
        v = torch.from_numpy(val)
        total, count, state = 0.0, 0, None
        for p in range(0, len(val) - 1, T):
            x, y = v[p:min(p + T, len(val) - 1)], v[p + 1:min(p + T, len(val) - 1) + 1]
            logits, state = model(x[:, None], state)
            total += float(F.cross_entropy(logits.reshape(-1, V), y, reduction="sum"))
            count += y.numel()
    nats = total / count
    print(f"torch: {steps} updates in {elapsed:.0f} s ({steps * T * B / elapsed:,.0f} chars/s), "
          f"validation {nats:.4f} nats/char = {nats / math.log(2):.4f} bits/char over {count} characters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
