"""Train a character-level language model on text files.

With no FILE it trains on a built-in corpus that needs no download (the
running Python's own standard-library sources). The fixed defaults are
char-rnn's: an LSTM, chunks of 50 characters × 50 streams, Adam at 2e-3,
gradients clipped to a global norm of 5, the last 10% held out. The rest is
chosen from the text and the budget (--steps, --minutes) and printed at the
start, each choice with the flag that overrides it: a short budget (a few
thousand updates) keeps char-rnn's constant rate and no dropout; a long one
(more updates, or --minutes) holds the rate, then decays it along a cosine
to 0 over the budget's last part (whichever of --steps and --minutes ends
first), with dropout unless it reads the text only a few times; 2 layers of
128 (the rule: unrolled/recipe.py). The best model by validation is kept in
best.npz.

While it runs it shows a progress bar (step, smoothed bits/char, chars/s),
prints a short sample and the validation bits/char now and then, and keeps
in the output folder: latest.npz (the run as it stands), best.npz (lowest
validation loss), loss.png (training and validation curves) and
metrics.csv (one row per update: step, elapsed_s, train_bpc, val_bpc, lr,
grad_norm, chars_per_s; TensorBoard events in tensorboard/ too when
tensorboardX or torch's tensorboard is installed, UNROLLED_TENSORBOARD=0 to
skip). Without a terminal it prints a plain progress line every few seconds.
A loss that diverges (NaN, or far above its best) stops the run, naming the
last good checkpoint.

Ctrl-C (or SIGTERM) stops after the update under way and saves; a second
Ctrl-C quits at once, without saving. `--resume DIR` continues
exactly where the run stopped (same losses, bit for bit, as if it had never
stopped). A resumed run keeps its model and training settings; only
--steps, --minutes and the reporting intervals may change (a cosine
schedule then stretches to the new --steps). It reads the
text it was trained on, found relative to the run folder and recognized by
its size and checksum; if the text moved, name it again. Naming another
text continues training on it in a new --out folder (--skip-unknown leaves
out characters the model's vocabulary lacks). A resumed run trains for the
rest of its --minutes (--minutes M: M minutes more; a new --steps alone: no
time limit), and a decaying rate stretches to the new end. One run at a
time writes in a folder: a second one started there is refused.

Under `mpiexec -n N` (pip install "unrolled[dist]") it trains data-parallel:
each of the N processes takes --batch/N of the streams, the gradients are
summed once per update, and rank 0 alone prints and writes. A checkpoint
resumes under any N that divides --batch, or in one process.

examples:
  unrolled train                                  # the built-in corpus
  unrolled train shakespeare.txt --minutes 10
  unrolled train books/                           # a folder: its text files, sorted
  cat notes/*.txt | unrolled train -              # standard input
  unrolled train notes.txt --cell gru --hidden 256 --layers 1 --out runs/gru
  unrolled train --resume runs/gru --steps 20000
  unrolled sample runs/gru --prime "The "
  mpiexec -n 4 unrolled train corpus.txt --batch 64 --out runs/dp
"""

from __future__ import annotations

from unrolled.charlm.model import ModelConfig, TrainConfig
from unrolled.charlm.text_files import MAX_TEXT_BYTES
from unrolled.engines.registry import ENGINE_NAMES
from unrolled.models import cells
from unrolled.train import distributed
from unrolled.train.interrupts import exit_code
from unrolled.train.optim import OPTIMIZERS

from . import UsageError

_M, _T = ModelConfig(), TrainConfig()
MAX_TEXT_MB = MAX_TEXT_BYTES / 1e6


def max_text_bytes(mb: float) -> int:
    """--max-text-mb as bytes, or a one-line refusal."""
    if not (mb > 0 and mb < 1e9):  # also refuses NaN
        raise UsageError(f"--max-text-mb {mb:g}: give a positive number of megabytes")
    return int(mb * 1e6)

# the flags that set a field of ModelConfig / TrainConfig of the same name
MODEL_FLAGS = ("cell", "hidden", "layers", "dropout", "embedding")
TRAIN_FLAGS = ("seq", "batch", "lr", "lr_schedule", "decay", "warmup", "optimizer", "clip", "k1", "k2", "steps", "minutes",
               "val_fraction", "seed", "sample_every", "sample_length", "eval_every", "checkpoint_every")


def add_arguments(p) -> None:
    p.add_argument("files", nargs="*", metavar="FILE", help="text files to learn (concatenated), folders of them "
                                                             "(their text files, sorted), - for standard input; "
                                                             "none: the built-in corpus (on resume: the run's own text)")
    m = p.add_argument_group("model")
    m.add_argument("--cell", choices=cells.CELLS, help=f"recurrent cell (default {_M.cell})")
    m.add_argument("--hidden", type=int, metavar="N", help="state size of each layer (default: chosen from the text's size, see above)")
    m.add_argument("--layers", type=int, metavar="N", help="stacked layers (default: chosen, see above)")
    m.add_argument("--dropout", type=float, metavar="P", help="dropout between layers and before the readout (default: chosen from the text and budget)")
    m.add_argument("--embedding", type=int, metavar="N", help="learn a character embedding of this size instead of one-hot input")
    t = p.add_argument_group("training")
    t.add_argument("--seq", type=int, metavar="T", help=f"characters per chunk, T (default {_T.seq})")
    t.add_argument("--batch", type=int, metavar="B", help=f"parallel streams, B (default {_T.batch})")
    t.add_argument("--lr", type=float, metavar="X", help=f"learning rate (default {_T.lr:g})")
    t.add_argument("--lr-schedule", choices=("constant", "cosine"),
                   help="constant, or cosine decay to 0 at the end of --steps or --minutes "
                        "(default: cosine when either is given)")
    t.add_argument("--decay", type=float, metavar="F", help="cosine: decay over the last F of the budget, the rate "
                                                           "held before it (default: chosen, see above)")
    t.add_argument("--warmup", type=int, metavar="N", help="updates of linear learning-rate warm-up (default 0)")
    t.add_argument("--optimizer", choices=sorted(OPTIMIZERS), help=f"update rule (default {_T.optimizer})")
    t.add_argument("--clip", type=float, metavar="X", help=f"largest global gradient norm, 0 = no clipping (default {_T.clip:g})")
    t.add_argument("--k1", type=int, metavar="N", help="truncated BPTT: characters between updates (default, or 0: --seq)")
    t.add_argument("--k2", type=int, metavar="N", help="truncated BPTT: steps the gradient flows back, >= k1 (default, or 0: --seq)")
    t.add_argument("--steps", type=int, metavar="N", help=f"stop after this many updates in all; 0 = no step limit (stop with --minutes "
                                                         f"or Ctrl-C) (default {_T.steps:,}; none with --minutes alone)")
    t.add_argument("--minutes", type=float, metavar="M", help="stop after this many minutes of updates (compiling, validation, "
                                                 "samples and saving are not counted); on --resume: M minutes more")
    t.add_argument("--val-fraction", type=float, metavar="F", help=f"the last part of the text held out (default {_T.val_fraction:g})")
    t.add_argument("--seed", type=int, metavar="S", help=f"initial weights and dropout (default {_T.seed})")
    r = p.add_argument_group("run")
    r.add_argument("--out", metavar="DIR", help="output folder (default runs/<date-time>, or the resumed folder)")
    r.add_argument("--resume", metavar="DIR", help="continue the run in DIR (or from a checkpoint file)")
    r.add_argument("--engine", choices=ENGINE_NAMES, help="compiled (fast) or reference (literal unrolling); "
                                                          "default: the library's default")
    r.add_argument("--encoding", default=None, metavar="NAME", help="text encoding of the files (default utf-8), e.g. latin-1")
    r.add_argument("--max-text-mb", type=float, default=MAX_TEXT_MB, metavar="MB",
                   help=f"the most text read, in MB (default {MAX_TEXT_MB:g}; the text is held in memory whole)")
    r.add_argument("--skip-unknown", action="store_true", help="on --resume with a new text: leave out characters "
                                                              "the model's vocabulary lacks (default: refuse)")
    r.add_argument("--sample-every", type=int, metavar="N", help=f"updates between printed samples, 0 = never (default {_T.sample_every})")
    r.add_argument("--sample-length", type=int, metavar="N", help=f"characters per printed sample (default {_T.sample_length})")
    r.add_argument("--eval-every", type=int, metavar="N", help=f"updates between validation passes and saves, 0 = only at the end "
                                                  f"(default {_T.eval_every})")
    r.add_argument("--checkpoint-every", type=int, metavar="N", help="updates between saves of latest.npz (default: at each validation)")


def run(args) -> int:
    from unrolled.charlm.run import RunOptions, train  # here, not above: `--help` needs no Numba

    if args.minutes is not None and args.minutes == 0:  # the library's "no time limit", not a user's wish
        raise UsageError("--minutes 0: give a positive number of minutes, or leave --minutes out for no time limit")
    model_flags = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    train_flags = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    if "minutes" in train_flags and "steps" not in train_flags and not args.resume:
        train_flags["steps"] = 0  # a time limit alone: no step limit
    options = RunOptions(files=list(args.files), encoding=args.encoding or "utf-8", out=args.out,
                         resume=args.resume, engine=args.engine, max_text_bytes=max_text_bytes(args.max_text_mb),
                         skip_unknown=args.skip_unknown,
                         comm=distributed.from_environment())
    summary = train(options, model_flags, train_flags)
    return exit_code(summary.signum) if summary.stopped == "interrupted" else 0
