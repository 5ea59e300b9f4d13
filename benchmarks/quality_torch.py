"""The PyTorch side of the quality comparison: the same character model, trained
for the same budget on the same split, scored the same way.

    python -m benchmarks.quality_torch ../shared/data/shakespeare.txt --minutes 10
    python -m benchmarks.quality_torch ../shared/data/shakespeare.txt --minutes 10 --recipe new

``--recipe classic`` (the default) is char-rnn's, `unrolled train`'s defaults
before it chose from the budget: LSTM 2 x 128, no dropout, Adam 2e-3
constant. ``--recipe new`` is what `unrolled train TEXT --minutes M` (or
``--steps N``) now picks, taken from the same rule (:mod:`unrolled.charlm.recipe`):
the model's size and dropout (between the layers and before the readout, where
unrolled puts it), and a learning rate held, then decaying along a cosine to 0
over the last part of the budget, driven by the fraction of update-seconds (or
updates) spent.
So classic-vs-new in PyTorch is the recipe's gain, and unrolled-vs-PyTorch
with one recipe is the engine's.

Both: one-hot input, linear readout, T = 50, B = 50 evenly spaced streams with
the state carried between chunks, global-norm clip 5, the last 10% of the
text held out. Every ``--eval-every`` updates (and at the end) the held-out
text is scored the way `unrolled train` validates it (unrolled's own
``iter_eval_chunks``: B streams, T-character chunks, the state carried, every
character after the first predicted once); the time that takes is left out of
the budget, as unrolled leaves it out of ``--minutes``. The last line gives
the best held-out bits/char of the run, the update it was seen at, and the
score at the end.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

T, B, LR, CLIP = 50, 50, 2e-3, 5.0


def recipe_settings(name: str, train_chars: int, steps: int, minutes: float) -> dict:
    """hidden, layers, dropout and schedule of a recipe, the new one from unrolled's own rule."""
    if name == "classic":
        return {"hidden": 128, "layers": 2, "dropout": 0.0, "lr_schedule": "constant", "decay": 1.0}
    from unrolled.charlm import recipe

    chosen = recipe.choose(train_chars, steps=steps, minutes=minutes, k1=T, batch=B, lr=LR)
    return {c.field: c.value for c in chosen}


def main(argv=None) -> int:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from unrolled.charlm.batching import iter_eval_chunks
    from unrolled.charlm.recipe import decayed, progress
    from unrolled.train.lr_schedules import Cosine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--minutes", type=float, default=10.0, help="minutes of updates (scoring not counted)")
    ap.add_argument("--steps", type=int, default=0, help="stop after this many updates instead (0: --minutes)")
    ap.add_argument("--recipe", choices=("classic", "new"), default="classic")
    ap.add_argument("--eval-every", type=int, default=500, help="updates between held-out scores")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dropout", type=float, default=None, help="override the recipe's dropout (as unrolled's flag)")
    ap.add_argument("--lr-schedule", choices=("constant", "cosine"), default=None,
                    help="override the recipe's schedule (as unrolled's flag)")
    ap.add_argument("--decay", type=float, default=None, help="override the recipe's decay fraction (as unrolled's)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    minutes = 0.0 if args.steps else args.minutes

    text = open(args.file, encoding="utf-8").read()
    chars = sorted(set(text))
    V = len(chars)
    lookup = {c: i for i, c in enumerate(chars)}
    ids = np.array([lookup[c] for c in text], dtype=np.int64)
    cut = len(ids) - int(round(len(ids) * 0.1))  # unrolled's split: the last 10% held out
    train, val = ids[:cut], ids[cut:]
    r = recipe_settings(args.recipe, len(train), args.steps, minutes)
    for name in ("dropout", "lr_schedule", "decay"):  # the same overrides `unrolled train` takes
        if getattr(args, name) is not None:
            r[name] = getattr(args, name)
    r.setdefault("decay", 1.0)
    H, L, p = r["hidden"], r["layers"], r["dropout"]

    class CharRNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(V, H, L, dropout=p if L > 1 else 0.0)
            self.drop = nn.Dropout(p)
            self.head = nn.Linear(H, V)

        def forward(self, x, state=None):
            h, state = self.rnn(F.one_hot(x, V).float(), state)
            return self.head(self.drop(h)), state

    model = CharRNN()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    cosine = Cosine(LR, 1) if r["lr_schedule"] == "cosine" else None
    schedule = f"held, then a cosine to 0 over the last {r['decay']:.0%} of the budget" if cosine else "constant"
    print(f"torch, recipe {args.recipe}: LSTM {L}×{H}, dropout {p:g}, Adam {LR:g} "
          f"{schedule}; "
          f"{len(train):,} training / {len(val):,} held-out characters", flush=True)

    def score() -> float:
        """Held-out bits/char, as unrolled's validation: B streams, the state carried, every character once."""
        model.eval()
        total, count, state = 0.0, 0.0, None
        with torch.no_grad():
            for x, y, mask in iter_eval_chunks(val, T, B):
                logits, state = model(torch.from_numpy(x), state)
                nats = F.cross_entropy(logits.reshape(-1, V), torch.from_numpy(y).reshape(-1), reduction="none")
                total += float((nats.double() * torch.from_numpy(mask).reshape(-1)).sum())
                count += float(mask.sum())
        model.train()
        return total / count / math.log(2)

    stream = len(train) // B
    streams = torch.from_numpy(train[: stream * B].reshape(B, stream).T.copy())  # [stream, B]
    pos, state, steps, spent = 0, None, 0, 0.0
    budget = minutes * 60
    best, best_step, end = math.inf, 0, math.nan
    while (steps < args.steps) if args.steps else (spent < budget):
        t0 = time.perf_counter()
        if cosine is not None:
            for group in opt.param_groups:
                group["lr"] = cosine.at_fraction(decayed(progress(steps, args.steps, spent, budget), r["decay"]))
        if pos + T + 1 > stream:
            pos, state = 0, None
        x, y = streams[pos:pos + T], streams[pos + 1:pos + T + 1]
        pos += T
        logits, state = model(x, state)
        state = tuple(s.detach() for s in state)
        loss = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        steps += 1
        spent += time.perf_counter() - t0
        done = (steps >= args.steps) if args.steps else (spent >= budget)
        if steps % args.eval_every == 0 or done:  # scoring is outside the timed part
            end = score()
            if end < best:
                best, best_step = end, steps
            print(f"update {steps}: held-out {end:.4f} bits/char (best {best:.4f} at {best_step})", flush=True)
    print(f"torch {args.recipe}: {steps} updates in {spent:.0f} s of updates ({steps * T * B / spent:,.0f} chars/s), "
          f"best held-out {best:.4f} bits/char at update {best_step}, end {end:.4f} bits/char")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
