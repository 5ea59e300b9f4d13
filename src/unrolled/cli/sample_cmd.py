"""Generate text from a trained language model, streamed to stdout.

CKPT is a checkpoint file written by `unrolled train`, or a run folder (its
latest.npz, else best.npz); the checkpoint carries everything needed. The
prime text, if any, is printed first and read by the model to warm its
state; then LENGTH characters are drawn one at a time, each fed back in.

Temperature divides the model's scores before the softmax: low temperatures
(0.2-0.5) make it cautious and repetitive, sticking to the likeliest
characters (0 always takes the single likeliest one); 1 samples the model
as trained; high temperatures (above 1) make it adventurous, inventing words
and making more mistakes. --top-k K draws only among the K likeliest
characters. The same --seed gives the same text.

examples:
  unrolled sample runs/20250101-120000
  unrolled sample runs/shakespeare/best.npz --prime "ROMEO:" --temperature 0.7 --length 1000
"""

from __future__ import annotations

import math
import sys

from unrolled.charlm.model import load_model
from unrolled.engines.registry import ENGINE_NAMES

from . import UsageError, seed


def add_arguments(p) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="a checkpoint file or a run folder")
    p.add_argument("--length", type=int, metavar="N", default=500, help="characters to generate (default 500)")
    p.add_argument("--temperature", type=float, metavar="T", default=1.0,
                   help="below 1: safer, more repetitive text (0: always the likeliest character); "
                        "above 1: wilder text with more mistakes (default 1)")
    p.add_argument("--top-k", type=int, metavar="K", default=0, help="draw only among the K likeliest characters (default 0: all)")
    p.add_argument("--prime", default="", metavar="TEXT", help="text to start from; printed, then continued")
    p.add_argument("--seed", type=seed, metavar="S", default=0, help="random seed: the same seed gives the same text (default 0)")
    p.add_argument("--engine", choices=ENGINE_NAMES,
                   help="step this engine one character at a time instead of the one-step generator (default); "
                        "the text is the same")


def run(args) -> int:
    if args.length < 0:
        raise UsageError(f"--length {args.length}: give a number of characters, 0 or more")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature {args.temperature}: give 0 or a positive finite number")
    if args.top_k < 0:
        raise UsageError(f"--top-k {args.top_k}: give a number of characters, or 0 for all")
    from unrolled.charlm.sampling import Sampler  # here, not above: `--help` needs no Numba

    model = load_model(args.checkpoint)
    sampler = Sampler.from_model(model, engine=args.engine)
    pieces = sampler.generate(args.length, temperature=args.temperature, top_k=args.top_k,
                              prime=args.prime, seed=args.seed)
    out = sys.stdout
    out.write(args.prime)
    last = args.prime[-1:]
    for i, ch in enumerate(pieces):
        out.write(ch)
        last = ch
        if ch == "\n" or i % 32 == 31:
            out.flush()
    if last != "\n":
        out.write("\n")
    out.flush()
    return 0
