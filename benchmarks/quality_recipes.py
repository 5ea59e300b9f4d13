"""A grid of training recipes on more than one text: what `unrolled train`'s budget rule is chosen from.

    python -m benchmarks.quality_recipes --steps 1000 --chars 250000
    python -m benchmarks.quality_recipes --minutes 10 --texts shakespeare --recipes classic,auto

Each recipe is a set of `unrolled train` flags (``auto`` is none at all: the
recipe `train` picks from the text and the budget). Every recipe trains on
every text for the same budget (a fixed number of updates with ``--steps``,
which is what a loaded machine can still compare fairly; wall-clock minutes
with ``--minutes``), scoring the held-out last 10% every ``--eval-every``
updates, and the table gives the best held-out bits/char seen during the run,
the update it was seen at, and the score at the end. ``--chars N`` keeps the
first N characters of each text, so that a short run makes as many passes
over it as a long run makes over the whole text (the regime where a recipe
overfits). The table, with the date, the command and the machine's load
average before and after, is appended to ``benchmarks/QUALITY.md``
(``--no-write`` only prints it).
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TABLE = HERE / "QUALITY.md"

# name -> the flags of `unrolled train` that make it (model flags, training flags)
RECIPES: dict[str, tuple[dict, dict]] = {
    "classic": ({"dropout": 0.0}, {"lr_schedule": "constant", "decay": 1.0}),  # char-rnn's: constant 2e-3, no dropout
    "cosine": ({"dropout": 0.0}, {"lr_schedule": "cosine", "decay": 1.0}),  # decay to the end of the budget, no dropout
    "tail0.3": ({"dropout": 0.0}, {"lr_schedule": "cosine", "decay": 0.3}),  # held, then decay over the last 30%
    "tail0.5": ({"dropout": 0.0}, {"lr_schedule": "cosine", "decay": 0.5}),
    "cos+d0.1": ({"dropout": 0.1}, {"lr_schedule": "cosine", "decay": 1.0}),
    "cos+d0.2": ({"dropout": 0.2}, {"lr_schedule": "cosine", "decay": 1.0}),
    "cos+d0.3": ({"dropout": 0.3}, {"lr_schedule": "cosine", "decay": 1.0}),
    "tail+d0.2": ({"dropout": 0.2}, {"lr_schedule": "cosine", "decay": 0.3}),
    "tail+d0.2+h256": ({"dropout": 0.2, "hidden": 256}, {"lr_schedule": "cosine", "decay": 0.3}),
    "auto": ({}, {}),  # whatever `unrolled train TEXT --steps N` picks with no other flag
}
BASE_MODEL = {"hidden": 128, "layers": 2}  # the size every recipe but auto and those naming one uses
TEXTS = ("shakespeare", "builtin")


def shakespeare() -> Path:
    """``../shared/data/shakespeare.txt`` beside the checkout (or a worktree's folder above it)."""
    for folder in HERE.parents:
        path = folder / "shared" / "data" / "shakespeare.txt"
        if path.exists():
            return path
    raise SystemExit("no shared/data/shakespeare.txt above the checkout; name the file in --texts")


def load_text(name: str, chars: int) -> str:
    from unrolled.charlm.corpus import builtin_corpus

    text = builtin_corpus() if name == "builtin" else Path(shakespeare() if name == "shakespeare" else name).read_text()
    return text[:chars] if chars else text


def run_one(text_file: Path, recipe: str, args, out: Path) -> dict:
    """Train one recipe on one text; its best and final held-out bits/char and its seconds of updates."""
    from unrolled.charlm.run import RunOptions, train
    from unrolled.train.checkpoint import load_checkpoint

    model_flags, train_flags = (dict(d) for d in RECIPES[recipe])
    if recipe != "auto":
        model_flags = {**BASE_MODEL, **model_flags}
    train_flags.update(eval_every=args.eval_every, sample_every=0, seed=args.seed)
    train_flags.update({"steps": args.steps} if args.steps else {"steps": 0, "minutes": args.minutes})
    log = io.StringIO()
    s = train(RunOptions(files=[str(text_file)], out=str(out), stream=log), model_flags, train_flags)
    _, meta = load_checkpoint(out / "latest.npz")
    first = log.getvalue().splitlines()[:2]
    return {"steps": s.step, "best": s.best_val_bpc, "best_step": s.best_step, "end": s.val_bpc,
            "seconds": meta["train_seconds"], "model": f"{meta['model']['layers']}×{meta['model']['hidden']}",
            "dropout": meta["model"]["dropout"], "schedule": _schedule(meta["train"]), "announce": first}


def _schedule(train: dict) -> str:
    if train["lr_schedule"] != "cosine":
        return train["lr_schedule"]
    decay = train.get("decay", 1.0)
    return "cosine" if decay == 1.0 else f"held, cosine over last {decay:.0%}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", default=",".join(TEXTS), help="shakespeare, builtin, or file paths (comma-separated)")
    ap.add_argument("--recipes", default="classic,cosine,cos+d0.2,cos+d0.3",
                    help=f"comma-separated, from: {', '.join(RECIPES)}")
    ap.add_argument("--steps", type=int, default=1000, help="updates per run (0: use --minutes)")
    ap.add_argument("--minutes", type=float, default=0.0, help="minutes of updates per run, with --steps 0")
    ap.add_argument("--chars", type=int, default=0, help="keep the first N characters of each text (0: all)")
    ap.add_argument("--eval-every", type=int, default=100, help="updates between held-out scores")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true", help=f"print the table, do not append it to {TABLE.name}")
    args = ap.parse_args(argv)
    recipes = args.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown or not (args.steps or args.minutes):
        ap.error(f"unknown recipe {unknown[0]}" if unknown else "give --steps N or --steps 0 --minutes M")
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.texts.split(","):
            text = load_text(name, args.chars)
            f = Path(tmp) / f"{Path(name).stem}.txt"
            f.write_text(text)
            for recipe in recipes:
                r = run_one(f, recipe, args, Path(tmp) / f"{Path(name).stem}-{recipe}")
                rows.append((Path(name).stem, len(text), recipe, r))
                print(f"{Path(name).stem} {recipe}: best {r['best']:.4f} at {r['best_step']}, end {r['end']:.4f} "
                      f"({r['steps']} updates, {r['seconds']:.0f} s); {r['announce'][-1].strip()}", file=sys.stderr)
    table = render(rows, args, load_before, os.getloadavg())
    print(table)
    if not args.no_write:
        with TABLE.open("a") as fh:
            fh.write("\n" + table)
    return 0


def render(rows, args, load_before, load_after) -> str:
    budget = f"{args.steps:,} updates" if args.steps else f"{args.minutes:g} minutes"
    cmd = "python -m benchmarks.quality_recipes " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [f"### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {budget} per run",
             "", f"`{cmd}`; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
             f"({os.cpu_count()} CPUs).", "",
             "| text | chars | recipe | model | dropout | schedule | updates | s of updates | best bits/char (update) | end bits/char | end − best |",
             "|---|---:|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for text, n, recipe, r in rows:
        lines.append(f"| {text} | {n:,} | {recipe} | {r['model']} | {r['dropout']:g} | {r['schedule']} | "
                     f"{r['steps']:,} | {r['seconds']:.0f} | {r['best']:.4f} ({r['best_step']:,}) | {r['end']:.4f} | "
                     f"{r['end'] - r['best']:+.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
