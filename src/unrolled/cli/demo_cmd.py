"""The classic network, end to end, in a few seconds.

Builds Elman's network h = tanh(W·[x; h_prev] + b), y = V·h + c over the
characters of a small built-in text, prints the folded graph (with its delay
edge) and the graph unrolled over T = 3 steps (the weights shared, not
copied), then trains it by truncated BPTT while the loss falls.
"""

from __future__ import annotations

import math
import time

import numpy as np

from unrolled.charlm.batching import StreamBatcher
from unrolled.charlm.corpus import FALLBACK_CORPUS
from unrolled.charlm.memory import check_fits, training_bytes
from unrolled.charlm.vocabulary import Vocabulary
from unrolled.engines.compiled.kernels import compiling
from unrolled.engines.registry import make_engine
from unrolled.graph.folded import Graph
from unrolled.models import cells
from unrolled.train.clip import clip_by_value
from unrolled.train.optim import make_optimizer
from unrolled.words import count

from . import UsageError, seed

MAX_SECONDS = 3600  # a demonstration; longer training is what `unrolled train` is for
_clock = time.perf_counter  # a module attribute, so that tests can set it


def add_arguments(p) -> None:
    p.add_argument("--seconds", type=float, default=5.0,
                   help="how long to train, not counting the first run's compiling (default 5)")
    p.add_argument("--hidden", type=int, default=64, help="hidden units (default 64)")
    p.add_argument("--seed", type=seed, default=0, help="random seed (default 0)")


def classic_network(vocab_size: int, hidden: int) -> Graph:
    g = Graph("elman")
    x = g.one_hot(g.index_input("char", vocab_size), name="x")
    h = cells.elman(g, x, hidden)
    y = g.linear(g.param("V", (vocab_size, hidden)), h, g.param("c", (vocab_size,), init="zeros"), name="y")
    g.output(y)
    g.loss("cross_entropy", y, g.index_input("next", vocab_size), name="loss")
    return g


def run(args) -> int:
    if not (math.isfinite(args.seconds) and 0 < args.seconds <= MAX_SECONDS):
        raise UsageError(f"--seconds {args.seconds:g}: give a positive number of seconds, at most {MAX_SECONDS:,} "
                         f"(to train for longer: unrolled train)")
    if args.hidden < 1:
        raise UsageError(f"--hidden {args.hidden}: give a whole number of at least 1")
    text = FALLBACK_CORPUS
    vocab = Vocabulary.from_text(text)
    g = classic_network(vocab.size, args.hidden)
    check_fits(training_bytes(g, 25, 4, np.float64, "adagrad"), f"the demo's network with --hidden {args.hidden:,}",
               "lower --hidden")  # before the weights are made, not a MemoryError while making them
    print("The folded graph: one line per vertex; the delay edge h -> h_prev closes the cycle.\n")
    print(g)
    print("\nUnrolled over T = 3 steps: a DAG, every weight one node shared by all copies.\n")
    print(g.unroll(3))
    params = g.init_params(args.seed)
    engine = make_engine(g)
    optimizer = make_optimizer("adagrad", 0.1)
    batches = StreamBatcher(vocab.encode(text), 25, 4)
    print(f"\nTraining on {count(len(text), 'character')} ({vocab.size} distinct) for {args.seconds:g} s "
          f"by truncated BPTT (T = 25, B = 4), {engine.name} engine:")
    state, step, smooth = None, 0, None
    start, compiled = _clock(), compiling.seconds()
    while _clock() - start - (compiling.seconds() - compiled) < args.seconds:  # compiling is not training
        x, y = batches.next_batch()
        if batches.at_epoch_start:
            state = None
        r = engine.run(params, {"char": x, "next": y}, init_states=state)
        state = r.final_states
        clip_by_value(r.grads, 5.0)
        optimizer.step(params, r.grads)
        smooth = r.loss if smooth is None else 0.95 * smooth + 0.05 * r.loss
        if step % 100 == 0:
            print(f"  step {step:5d}   loss {smooth:.3f} nats/char   ({smooth / np.log(2):.2f} bits/char)")
        step += 1
    print(f"  step {step:5d}   loss {smooth:.3f} nats/char   (it started near ln {vocab.size} = "
          f"{np.log(vocab.size):.2f})")
    return 0
