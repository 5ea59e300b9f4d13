"""Data-parallel training runs for ``tests/test_distributed.py``, run under ``mpiexec -n 2`` (and in one process).

``python dist_worker.py OUT`` trains a few updates of each case below on the
same global batches; started by ``mpiexec -n N`` the rows are split over the
N ranks (``Trainer(comm=...)``), alone it trains the whole batch in one
process. Rank 0 writes each case's final parameters to ``OUT/<case>.npz``.

``python dist_worker.py lm CORPUS OUT STEPS [RESUME]`` is a character-model
run (:func:`lm_run`), fresh or resumed, on as many ranks as it was started on.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("UNROLLED_JIT", "0")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import helpers  # noqa: E402

from unrolled.charlm import run as lm_train  # noqa: E402
from unrolled.charlm.model import INPUT_NAME, TARGET_NAME, ModelConfig, build_graph, init_params  # noqa: E402
from unrolled.charlm.run import RunOptions  # noqa: E402
from unrolled.engines.registry import make_engine  # noqa: E402
from unrolled.train import distributed
from unrolled.train.optim import make_optimizer  # noqa: E402
from unrolled.train.trainer import Trainer  # noqa: E402
from unrolled.train.variable_length import freeze_after_end, keep_feed, length_mask  # noqa: E402

UPDATES = 4
B = 4  # global rows, split over the ranks
VOCAB = 7
START: dict[str, dict[str, np.ndarray]] = {}  # each case's parameters before its first update


def char_model(dp, dtype: str) -> dict[str, np.ndarray]:
    """The character model with dropout and truncated BPTT (k1 < k2: a replay buffer), on B streams."""
    model = ModelConfig(cell="lstm", hidden=6, layers=2, dropout=0.25, vocab_size=VOCAB, dtype=dtype)
    params = init_params(model, seed=3)
    START[f"char{dtype[-2:]}"] = {k: v.copy() for k, v in params.items()}
    trainer = Trainer(make_engine(build_graph(model)), params, make_optimizer("adam", 0.01), clip_norm=0.5,
                      k1=3, k2=5, seed=11, comm=dp)
    ids = np.random.default_rng(5).integers(0, VOCAB, size=(3 * UPDATES + 1, B))
    for k in range(UPDATES):
        x, y = ids[3 * k : 3 * k + 3], ids[3 * k + 1 : 3 * k + 4]
        if dp is not None:
            x, y = dp.shard(x), dp.shard(y)
        trainer.train_step({INPUT_NAME: x, TARGET_NAME: y})
    return trainer.params


def user_graph(dp, dtype: str) -> dict[str, np.ndarray]:
    """A user's own LSTM graph on variable-length rows (masks, states frozen after each row's end), mean loss."""
    g = freeze_after_end(helpers.GRAPHS["lstm"]())
    rng = np.random.default_rng(7)
    params = helpers.make_params(g, rng, dtype=np.dtype(dtype))
    START[f"graph{dtype[-2:]}"] = {k: v.copy() for k, v in params.items()}
    trainer = Trainer(make_engine(g), params, make_optimizer("sgd", 0.1), clip_norm=1.0, combine="mean", seed=2,
                      comm=dp)
    T = 6
    for _ in range(UPDATES):
        lengths = rng.integers(1, T + 1, size=B)  # the ranks count different numbers of steps
        inputs = {k: v for k, v in helpers.make_inputs(g, T, B, rng).items() if k != "keep"}
        inputs["keep"] = keep_feed(g, lengths, T)
        masks = {loss.name: length_mask(lengths, T) for loss in g.losses}
        if dp is not None:
            inputs = {k: dp.shard(v) for k, v in inputs.items()}
            masks = {k: dp.shard(v) for k, v in masks.items()}
        trainer.train_step(inputs, masks)
    return trainer.params


def drift(dp) -> None:
    """Rank 1's parameters drift from rank 0's before update 2; the checksum after it must stop both."""
    model = ModelConfig(cell="gru", hidden=4, layers=1, vocab_size=VOCAB, dtype="float64")
    trainer = Trainer(make_engine(build_graph(model)), init_params(model, seed=1), make_optimizer("sgd", 0.1),
                      k1=3, k2=3, comm=distributed.DataParallel(check_every=2))
    ids = dp.shard(np.random.default_rng(5).integers(0, VOCAB, size=(4, B)))
    for k in range(2):
        if k == 1 and dp.rank == 1:
            next(iter(trainer.params.values()))[...] += 1e-9
        trainer.train_step({INPUT_NAME: ids[:3], TARGET_NAME: ids[1:]})


CASES = {
    "char64": lambda dp: char_model(dp, "float64"),
    "char32": lambda dp: char_model(dp, "float32"),
    "graph64": lambda dp: user_graph(dp, "float64"),
    "graph32": lambda dp: user_graph(dp, "float32"),
}


def lm_run(corpus: str, out: str, steps: int, resume: str | None = None, dp=None):
    """A tiny float64 character-model run with dropout and k1 < k2, validated and saved every 2 updates."""
    options = RunOptions(files=[corpus], out=out, resume=resume, stream=io.StringIO(), comm=dp)
    model = {} if resume else {"hidden": 8, "layers": 2, "dropout": 0.2, "dtype": "float64"}
    train = {"seq": 6, "batch": 4, "k1": 3, "k2": 5, "steps": steps, "eval_every": 2, "sample_every": 0}
    if resume:
        train = {"steps": steps}
    return lm_train.train(options, model, train)


def main(out: str) -> None:
    dp = distributed.from_environment()
    for name, case in CASES.items():
        params = case(dp)
        if dp is None or dp.is_root:
            np.savez(Path(out) / f"{name}.npz", **params)


def inject_fault(dp, spec: str) -> None:
    """``FAULT=rank,step,how``: at that update that rank raises, dies (SIGKILL) or hangs."""
    rank, step, how = spec.split(",")
    if dp is None or dp.rank != int(rank):
        return
    real = Trainer.train_step

    def train_step(self, *args, **kw):
        if self.step_count + 1 == int(step):
            if how == "raise":
                raise ValueError(f"injected failure at update {step}")
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)  # hang
        return real(self, *args, **kw)

    Trainer.train_step = train_step


if __name__ == "__main__":
    if sys.argv[1] == "drift":
        drift(distributed.from_environment())
    elif sys.argv[1] == "lm":
        dp = distributed.from_environment()
        inject_fault(dp, os.environ.get("FAULT", "-1,0,none"))
        summary = lm_run(sys.argv[2], sys.argv[3], int(sys.argv[4]), *sys.argv[5:], dp=dp)
        if dp is None or dp.is_root:
            print(f"{summary.stopped} at step {summary.step}", flush=True)
    else:
        main(sys.argv[1])
