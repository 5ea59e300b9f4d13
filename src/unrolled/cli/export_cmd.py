"""Take a model elsewhere: to ONNX, to PyTorch weights, or PyTorch weights back into a checkpoint.

SOURCE is a checkpoint file or a run folder (for --format onnx or torch), or
a safetensors state dict (for --format checkpoint). The format defaults to
the one OUT's suffix names: .onnx, .safetensors, .npz.

  onnx        the whole model, its recurrence as one ONNX Scan: input x [T, B]
              (int64 character ids), output logits [T, B, V]; each state is an
              input init_state.<name> and an output final_state.<name> [D, B, F]
              (defaults: zeros). The vocabulary and settings are in the model's
              metadata, so `unrolled evaluate --onnx` needs nothing else.
  torch       the weights under PyTorch's names and layouts, for nn.LSTM /
              nn.GRU / nn.RNN ("rnn.*"), nn.Linear ("head.*") and nn.Embedding
              ("embedding.weight", when the model has one), as safetensors; the
              settings and vocabulary are in its metadata.
  checkpoint  such a state dict back into a checkpoint for `sample` and
              `evaluate`; the cell and sizes are read from the tensors, the
              vocabulary from the file's metadata or --vocabulary.

The packages come with the export extra: pip install "unrolled[export]".

examples:
  unrolled export runs/shakespeare -o model.onnx
  unrolled export runs/shakespeare -o weights.safetensors
  unrolled export weights.safetensors -o model.npz --vocabulary vocab.json
"""

from __future__ import annotations

from pathlib import Path

from unrolled.models.cells import CELLS

from . import UsageError

FORMATS = {".onnx": "onnx", ".safetensors": "torch", ".npz": "checkpoint"}


def add_arguments(p) -> None:
    p.add_argument("source", metavar="SOURCE", help="a checkpoint or run folder; a .safetensors state dict for --format checkpoint")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="the file to write")
    p.add_argument("--format", choices=sorted(set(FORMATS.values())), help="what to write (default: from OUT's suffix)")
    p.add_argument("--vocabulary", metavar="FILE",
                   help="--format checkpoint: a JSON list of the characters in id order (default: the file's metadata)")
    p.add_argument("--cell", choices=CELLS, help="--format checkpoint: the cell the weights must be (default: read from them)")


def run(args) -> int:
    fmt = args.format or FORMATS.get(Path(args.out).suffix.lower())
    if fmt is None:
        raise UsageError(f"cannot tell the format from '{args.out}': give --format onnx, torch or checkpoint, "
                         f"or an OUT ending in {', '.join(FORMATS)}")
    if fmt != "checkpoint" and (args.vocabulary or args.cell):
        raise UsageError("--vocabulary and --cell are for --format checkpoint (reading a PyTorch state dict)")
    from unrolled.export import charmodel as ex

    if fmt == "checkpoint":
        vocabulary = ex.read_vocabulary(args.vocabulary) if args.vocabulary else None
        m = ex.checkpoint_from_torch(args.source, args.out, vocabulary=vocabulary, cell=args.cell)
        print(f"wrote {args.out}: a {m.model.layers}-layer {m.model.cell} of hidden size {m.model.hidden} over "
              f"{m.model.vocab_size} characters, from {args.source}")
        return 0
    from unrolled.charlm.model import load_model

    m = load_model(args.source)
    if fmt == "onnx":
        ex.export_charmodel_onnx(m, args.out)
        states = ", ".join(m.graph.delayed())
        print(f"wrote {args.out}: ONNX, input x [T, B] -> logits [T, B, {m.model.vocab_size}], states {states} "
              f"(init_state.<name> in, final_state.<name> out); the loss is left out")
    else:
        tensors = ex.export_torch(m, args.out)
        print(f"wrote {args.out}: {len(tensors)} tensors for PyTorch ({', '.join(tensors)})")
    return 0
