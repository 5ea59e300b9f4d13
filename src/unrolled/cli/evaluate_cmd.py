"""Bits per character and perplexity of a text under a trained language model.

CKPT is a checkpoint file written by `unrolled train`, or a run folder.
The text is read in --batch streams of --seq characters with the state
carried (the checkpoint's own settings by default), exactly as validation
does during training, so evaluating the held-out part of the training text
reproduces the validation figure.

Characters outside the model's vocabulary are skipped: removed from the
text before scoring, neither predicted nor read. They are counted and
listed, and the figure they would give if each were charged log2(V) bits
(the cost of a uniform guess among the V characters) is printed beside it.

With --onnx MODEL instead of CKPT the model exported by `unrolled export`
runs in ONNX Runtime (the export extra); the figures are the same.

examples:
  unrolled evaluate runs/shakespeare other_play.txt
  unrolled evaluate --onnx model.onnx other_play.txt
"""

from __future__ import annotations

from unrolled.charlm.model import load_model, score_text
from unrolled.charlm.text_files import read_text
from unrolled.engines.registry import ENGINE_NAMES
from unrolled.words import count

from . import UsageError
from .train_cmd import MAX_TEXT_MB, max_text_bytes


def add_arguments(p) -> None:
    p.add_argument("checkpoint", metavar="CKPT", nargs="?", help="a checkpoint file or a run folder")
    p.add_argument("file", metavar="FILE", help="the text to score (- for standard input)")
    p.add_argument("--encoding", default="utf-8", metavar="NAME", help="text encoding of FILE (default utf-8), e.g. latin-1")
    p.add_argument("--max-text-mb", type=float, default=MAX_TEXT_MB, metavar="MB",
                   help=f"the most text read, in MB (default {MAX_TEXT_MB:g}; the text is held in memory whole)")
    p.add_argument("--seq", type=int, metavar="T", help="characters per chunk (default: the checkpoint's)")
    p.add_argument("--batch", type=int, metavar="B", help="parallel streams (default: the checkpoint's)")
    p.add_argument("--engine", choices=ENGINE_NAMES, help="compiled or reference (default: the library's default)")
    p.add_argument("--onnx", metavar="MODEL", help="score with this ONNX model (from `unrolled export`) instead of CKPT")


def run(args) -> int:
    for flag in ("seq", "batch"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} {value}: give a whole number of at least 1")
    if (args.onnx is None) == (args.checkpoint is None):
        raise UsageError("give either CKPT or --onnx MODEL before FILE, not both" if args.onnx
                         else "give the checkpoint to score with: unrolled evaluate CKPT FILE")
    if args.onnx and args.engine:
        raise UsageError("--engine chooses how a checkpoint runs; an --onnx model runs in ONNX Runtime")
    model = load_model(args.checkpoint) if args.checkpoint else None
    text = read_text(args.file, args.encoding, max_bytes=max_text_bytes(args.max_text_mb))
    if model is None:
        from unrolled.export.charmodel import score_text_onnx

        s = score_text_onnx(args.onnx, text, seq=args.seq, batch=args.batch)
    else:
        s = score_text(model, text, seq=args.seq, batch=args.batch, engine=args.engine)
    print(f"{args.file}: {count(s.characters, 'character', spec=',')}, "
          f"{count(s.scored, 'prediction', spec=',')} scored")
    print(f"bits/char {s.bits_per_char:.4f}   perplexity {s.perplexity:.3f}   "
          f"({s.nats / s.scored:.4f} nats/char)")
    if s.unknown:
        listed = ", ".join(f"{c!r} ×{n}" for c, n in sorted(s.unknown_chars.items(), key=lambda kv: -kv[1])[:8])
        more = ", …" if len(s.unknown_chars) > 8 else ""
        print(f"out of vocabulary: {count(s.unknown, 'character', spec=',')} ({len(s.unknown_chars)} distinct: {listed}{more}) were "
              f"skipped, not scored; charged log2({s.vocab_size}) bits each instead, bits/char would be "
              f"{s.bits_per_char_charged:.4f}")
    else:
        print("out of vocabulary: none")
    return 0
