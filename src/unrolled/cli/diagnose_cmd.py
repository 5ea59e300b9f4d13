"""Draw gradients through time: each copy's share of each weight's gradient,
and how far back the gradient of one step's loss reaches.

For each model the picture shows a heatmap of ‖∂L/∂W_t‖ (the contribution
of the copy of weight W used at step t) and, in log scale, the mean norm of
∂ℓ_t/∂s_k against the lag t − k: how much one step's loss still depends on
the state k steps earlier. A curve that drops by orders of magnitude within
a few steps is a vanishing gradient.

WHAT is a cell name (elman, jordan, lstm, gru: a network around the cell,
fed a synthetic task, see --task), a checkpoint (a .npz file or run folder of
`unrolled train`, fed text), or module:function returning a Graph (or
(Graph, params)). Several WHATs share one picture. With --train-steps N a
cell network is measured untrained, trained N steps on the task, and measured
again, so both show.

tasks (inputs are one-hot symbols; the loss is the cross-entropy at each step):
  delay  say the symbol seen --delay steps ago
  latch  say the last symbol that came with a marker (markers are rare, so
         the answer must be held across many distracting steps)

examples:
  unrolled diagnose elman lstm -o untrained.png
  unrolled diagnose elman lstm --forget-bias 2 --delay 20 --train-steps 1000 -o trained.png
  unrolled diagnose runs/shakespeare --text play.txt -o lm.png
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from unrolled.viz import diagnose
from unrolled.viz.diagnose import PLOT_FORMATS
from unrolled.words import count

from . import UsageError, seed
from .draw_cmd import add_network_arguments, check_extension, load_model

TASKS = ("delay", "latch")
PROGRESS_SECONDS = 5.0  # between plain progress lines when stderr is not a terminal


def add_arguments(p) -> None:
    p.add_argument("what", metavar="WHAT", nargs="+",
                   help="cell name(s), checkpoint(s) (.npz or run folder), or module:function")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the picture: .png, .svg or .pdf")
    p.add_argument("--steps", type=int, default=50, metavar="T", help="sequence length (default 50)")
    p.add_argument("--batch", type=int, default=8, metavar="B", help="sequences averaged over (default 8)")
    p.add_argument("--max-lag", type=int, default=40, metavar="L", help="longest lag measured (default 40)")
    p.add_argument("--seed", type=seed, default=0, metavar="S",
                   help="weights, sequences and training batches (default 0)")
    p.add_argument("--engine", choices=("reference", "compiled"), default="reference",
                   help="engine for the lag measurement and training (default reference)")
    task = p.add_argument_group("the task a cell network is fed (and trained on)")
    task.add_argument("--task", choices=TASKS, default="delay", help="delay (default) or latch")
    task.add_argument("--symbols", type=int, default=4, metavar="K", help="distinct symbols (default 4)")
    task.add_argument("--delay", type=int, default=10, metavar="D",
                      help="delay task: how many steps back (default 10)")
    task.add_argument("--marker-rate", type=float, default=0.05, metavar="P",
                      help="latch task: chance of a marker at each step (default 0.05)")
    task.add_argument("--train-steps", type=int, default=0, metavar="N",
                      help="train N steps and show the network before and after (default 0: untrained only)")
    task.add_argument("--lr", type=float, default=0.01, help="Adam learning rate for --train-steps (default 0.01)")
    task.add_argument("--train-batch", type=int, default=16, metavar="B",
                      help="sequences per training step (default 16)")
    add_network_arguments(p, hidden=32, inputs=0, outputs=0)
    p.add_argument("--text", metavar="FILE",
                   help="checkpoints: the text to read (default: the built-in corpus of `unrolled train`)")


def run(args) -> int:
    path = Path(args.output)
    check_extension(path, PLOT_FORMATS)
    for name in ("steps", "batch", "max_lag", "train_batch"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: it must be at least 1")
    if args.symbols < 2:  # one symbol: nothing to remember, every gradient 0, nothing to plot on a log scale
        raise UsageError(f"--symbols {args.symbols}: a task needs at least 2 symbols to tell apart")
    if args.train_steps < 0:
        raise UsageError(f"--train-steps {args.train_steps}: it must be 0 or more")
    if not 0 < args.marker_rate <= 1:  # also NaN; refused even where the task does not use it
        raise UsageError(f"--marker-rate {args.marker_rate}: it must be above 0 and at most 1")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr {args.lr}: give a positive learning rate")
    task = _task(args)
    results = []
    for what in args.what:
        results += _diagnose_one(what, task, args)
    fed = ", ".join(dict.fromkeys(note for r in results for note in r.notes))
    title = f"gradients through time: T={args.steps}, {count(args.batch, 'sequence')} of {fed}"
    diagnose.plot(results, path, title=title)
    print(diagnose.summary(results, lags=[g for g in (1, 5, 10, 20, 40) if g <= args.max_lag]))
    print(f"wrote {path}")
    return 0


def _task(args):
    if args.task == "delay":
        return diagnose.DelayTask(symbols=args.symbols, delay=args.delay)
    return diagnose.LatchTask(symbols=args.symbols, marker_rate=args.marker_rate)


def _check_task(args) -> None:
    """The task's own options, checked only when a network is fed the task."""
    if args.task == "delay" and not 1 <= args.delay < args.steps:
        raise UsageError(f"--delay {args.delay}: it must be between 1 and --steps - 1 = {args.steps - 1}")


def _diagnose_one(what: str, task, args) -> list[diagnose.Diagnosis]:
    model = load_model(what, layers=args.layers, hidden=args.hidden, inputs=task.input_size,
                       outputs=task.symbols, forget_bias=args.forget_bias)
    if model.kind == "checkpoint" and args.train_steps:
        raise UsageError(f"--train-steps trains a network on the {args.task} task; '{what}' is a checkpoint, "
                         f"already trained: leave --train-steps out")
    rng = np.random.default_rng(args.seed + 1)  # the measured sequences, the same for every model
    graph = model.graph
    params = model.params if model.params is not None else graph.init_params(args.seed)
    if model.kind == "checkpoint":
        inputs, masks, about = _text_inputs(model, args.text, args.steps, args.batch, rng), None, "text"
    elif task.fits(graph):
        _check_task(args)
        batch, mask = task.batch(args.steps, args.batch, rng)
        inputs, masks, about = batch, {graph.losses[0].name: mask}, f"the {task.describe()} task"
    else:
        inputs, masks, about = diagnose.random_inputs(graph, args.steps, args.batch, rng), None, "random inputs"
    kw = dict(masks=masks, max_lag=args.max_lag, engine=args.engine)
    name = f"{what} (forget bias {args.forget_bias:g})" if what == "lstm" and args.forget_bias else what
    if not args.train_steps:
        d = _measure(graph, params, inputs, name, **kw)
        d.notes.append(about)
        return [d]
    task.check(graph)
    _check_task(args)
    before = _measure(graph, params, inputs, f"{name} untrained", **kw)
    trained, losses = diagnose.train(graph, params, task, args.train_steps, T=args.steps, B=args.train_batch,
                                     lr=args.lr, seed=args.seed + 2, engine=args.engine)
    print(f"{name}: trained {count(args.train_steps, 'step')} on the {task.describe()} task, loss "
          f"{np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f} (mean of the first and last 10 batches)")
    after = _measure(graph, trained, inputs, f"{name} trained {count(args.train_steps, 'step')}", **kw)
    before.notes.append(about)
    after.notes.append(about)
    return [before, after]


def _measure(graph, params, inputs, label: str, **kw) -> diagnose.Diagnosis:
    """:func:`diagnose.diagnose`, saying what it measures and showing how far it has come: a bar on a
    terminal, plain lines every few seconds when piped (a long sequence takes minutes)."""
    print(f"measuring {label}: per-copy gradients, then gradients through time", file=sys.stderr, flush=True)
    with tqdm(desc=label, unit="step", file=sys.stderr, disable=None, leave=False, dynamic_ncols=True) as bar:
        shown = [time.monotonic()]

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
            if bar.disable and time.monotonic() - shown[0] >= PROGRESS_SECONDS:
                shown[0] = time.monotonic()
                print(f"  {label}: step {done} of {total}", file=sys.stderr, flush=True)

        return diagnose.diagnose(graph, params, inputs, label=label, progress=progress, **kw)


def _text_inputs(model, text_path, T: int, B: int, rng) -> dict:
    """``B`` stretches of ``T + 1`` characters of a text, as a language model's inputs and next-character targets."""
    from unrolled.charlm.corpus import builtin_corpus
    from unrolled.charlm.model import INPUT_NAME, TARGET_NAME
    from unrolled.charlm.text_files import read_text

    vocabulary = model.meta.get("vocabulary") or []
    index = {c: i for i, c in enumerate(vocabulary)}
    text = read_text(text_path) if text_path else builtin_corpus(max_chars=200_000)
    ids = np.array([index[c] for c in text if c in index], dtype=np.int64)
    if len(ids) < T + 1:
        where = text_path or "the built-in corpus"
        raise ValueError(f"{where} has {count(len(ids), 'character')} of the model's vocabulary; T={T} needs at least {T + 1}")
    starts = rng.integers(0, len(ids) - T, size=B)
    seq = np.stack([ids[s:s + T + 1] for s in starts], axis=1)  # [T+1, B]
    return {INPUT_NAME: seq[:-1], TARGET_NAME: seq[1:]}
