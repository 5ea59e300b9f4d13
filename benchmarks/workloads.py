"""The six benchmark workloads of BENCHMARKS.md, and batched sampling (W7), as plain data.

A peer reads everything it needs from a `Workload`: the model, the chunk
shape `[T, B]`, the optimizer and clipping, how the loss is reduced, and how
many floating-point operations one character costs (used for GFLOP/s).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Workload:
    id: str                 # "W1" .. "W7"
    name: str               # short name from BENCHMARKS.md
    kind: str               # "train" (chars/s), "sample" (chars/s), "memory" (peak MiB) or "start" (s)
    cell: str               # "elman" (tanh) or "lstm"
    hidden: int             # state size of every layer
    layers: int             # stacked recurrent layers
    T: int                  # steps per chunk (for "sample": characters generated per call and stream)
    B: int                  # streams per batch
    optimizer: str          # "adagrad", "adam" or "none"
    lr: float               # learning rate
    clip: str               # "value" (each gradient entry to [-c, c]), "norm" (global norm c), "none"
    clip_at: float          # the c of `clip`
    reduction: str          # "sum" or "mean" of the per-character cross-entropy
    flops_per_char: float   # 2 x dense multiply-adds per character; training = 3 x forward
    temperature: float = 1.0  # softmax temperature when sampling
    seed_char: str = "\n"   # first character fed when sampling

    def describe(self) -> str:
        model = f"{self.cell.upper() if self.cell == 'lstm' else 'Elman tanh'} {self.layers}x{self.hidden}"
        if self.kind == "sample":
            return f"{model}, sample {self.T} chars, batch {self.B}, temperature {self.temperature:g}"
        opt = f"{self.optimizer.capitalize()} {self.lr:g}"
        clip = {"value": f"clip [-{self.clip_at:g}, {self.clip_at:g}]",
                "norm": f"clip norm {self.clip_at:g}", "none": "no clip"}[self.clip]
        what = {"memory": "one full-BPTT step", "start": "fresh process to the end of the first update"
                }.get(self.kind, f"loss {self.reduction}")
        return f"{model}, T{self.T} B{self.B}, {opt}, {clip}, {what}"

    def as_dict(self) -> dict:
        return asdict(self)


WORKLOADS: dict[str, Workload] = {
    w.id: w
    for w in [
        Workload("W1", "minchar", "train", "elman", 100, 1, 25, 1,
                 "adagrad", 0.1, "value", 5.0, "sum", 150e3),
        Workload("W2", "charrnn", "train", "lstm", 128, 2, 50, 50,
                 "adam", 2e-3, "norm", 5.0, "mean", 1.468e6),
        Workload("W3", "big", "train", "lstm", 512, 1, 100, 64,
                 "adam", 2e-3, "norm", 5.0, "mean", 7.443e6),
        Workload("W4", "sample", "sample", "lstm", 128, 2, 2000, 1,
                 "none", 0.0, "none", 0.0, "mean", 0.489e6),
        Workload("W5", "memory", "memory", "lstm", 256, 1, 1000, 32,
                 "adam", 2e-3, "norm", 5.0, "mean", 2.149e6),
        # the default character model (charmodel.ModelConfig / TrainConfig): W2's shape and optimizer
        Workload("W6", "start", "start", "lstm", 128, 2, 50, 50,
                 "adam", 2e-3, "norm", 5.0, "mean", 1.468e6),
        # not in BENCHMARKS.md (issue 19 welcomes it): W4's model sampling 32 streams at once, as a
        # user generating many texts does; chars/s counts the characters of every stream
        Workload("W7", "sample-batch", "sample", "lstm", 128, 2, 500, 32,
                 "none", 0.0, "none", 0.0, "mean", 0.489e6),
    ]
}


def get(workload_id: str) -> Workload:
    try:
        return WORKLOADS[workload_id.upper()]
    except KeyError:
        raise ValueError(
            f"unknown workload {workload_id!r}: choose from {', '.join(WORKLOADS)}"
        ) from None
