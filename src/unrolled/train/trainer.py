"""Training updates: the :class:`Trainer` and the :func:`fit` loop.

One update = run the engine, clip the gradients (reporting the norm before
clipping), set the learning rate from a schedule, let the optimizer step.
Dropout masks are filled from a seeded generator, so a seed makes a run
bit-identical.

With ``k1``/``k2`` an update is one step of truncated BPTT over a stream
(``tbptt.py``); variable-length batches are built with ``variable_length.py``.
Optimizers, clipping and schedules live in ``optim.py``, ``clip.py`` and
``lr_schedules.py``; this module only wires them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from unrolled.engines.runio import RunResult, check_combine, scan_arrays
from unrolled.graph.dropout import dropout_rates

from .clip import clip_by_global_norm, clip_by_value, global_norm
from .lr_schedules import Schedule, schedule_from_dict
from .optim import Optimizer, optimizer_from_state
from .tbptt import TruncatedBPTT


@dataclass
class StepStats:
    """What one update did."""

    step: int  # updates done so far, this one included
    loss: float  # the engine's loss for this update's batch or chunk
    grad_norm: float  # global L2 norm of the gradients, before clipping
    lr: float  # the learning rate used
    skipped: bool = False  # True when the gradient was not finite and no update was made
    result: RunResult | None = field(default=None, repr=False)  # the engine's full answer


@dataclass
class Batch:
    """One mini-batch for :meth:`Trainer.train_step`: inputs, and optionally loss masks and initial states."""

    inputs: dict[str, np.ndarray]
    masks: dict[str, np.ndarray] | None = None
    init_states: dict[str, np.ndarray] | None = None


class Trainer:
    """Runs an engine on batches and updates the parameters in place.

    One update: fill the graph's dropout masks (training masks from the
    trainer's seeded generator), run the engine forward and back (or, with
    ``k1``/``k2``, one :class:`TruncatedBPTT` step over a stream), measure
    the global gradient norm, clip by value and/or by global norm if asked,
    take the learning rate from ``schedule.lr_at(step)`` (or the
    optimizer's own), and let the optimizer step. Weight decay belongs to
    the optimizer (``make_optimizer("adamw", lr, weight_decay=...)``).

    ``engine`` is anything with ``graph`` and ``run(params, inputs, **kw)``
    returning a :class:`RunResult` (an engine, or ``seq2seq.Seq2Seq``).
    A non-finite gradient skips the update (``StepStats.skipped``).
    The caller's arrays are scanned for NaN and infinities (the parameters
    once, here; each batch's inputs and initial states at its update), the
    way an engine run scans them; the engine then runs unscanned, so that
    parameters an update made non-finite show as a non-finite loss or
    gradient of the next update, which the training loop reports by step.
    Nothing here is random except the dropout masks, so the same seed, data
    and engine give bit-identical parameters.

    ``comm`` (an MPI communicator or a :class:`distributed.DataParallel`)
    trains data-parallel: each rank passes its own rows of the global batch
    (``dp.shard(x)``), the gradients of all ranks are summed by one allreduce
    per update, and every rank applies the same update (see
    :mod:`unrolled.train.distributed`). Dropout masks are drawn for the global batch
    from the one generator every rank holds, so ``n`` ranks compute what one
    process computes on the whole batch.
    """

    def __init__(self, engine, params: dict[str, np.ndarray], optimizer: Optimizer, *,
                 schedule: Schedule | None = None, clip_norm: float | None = None, clip_value: float | None = None,
                 combine: str = "sum", k1: int | None = None, k2: int | None = None, seed: int = 0,
                 comm=None):
        check_combine(combine)
        if (k1 is None) != (k2 is None):
            raise ValueError("truncated BPTT needs both k1 and k2 (k1 <= k2); give both or neither")
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm={clip_norm!r}; it must be a positive number (None turns clipping off)")
        if clip_value is not None and not clip_value > 0:
            raise ValueError(f"clip_value={clip_value!r}; it must be a positive number (None turns clipping off)")
        scan_arrays(params, hint="")
        self.engine = engine
        self.params = params
        self.optimizer = optimizer
        self.schedule = schedule
        self.clip_norm, self.clip_value = clip_norm, clip_value
        self.combine = combine
        self.tbptt = TruncatedBPTT(engine, k1, k2, combine=combine) if k1 is not None else None
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)
        self.step_count = 0
        graphs = getattr(engine, "graphs", None) or [engine.graph]
        self._dropout = {name: rate for g in graphs for name, rate in dropout_rates(g).items()}
        self._dropout_sizes = {name: g.vertices[name].size for g in graphs for name in dropout_rates(g)}
        self._losses = [loss for g in graphs for loss in g.losses]
        self.dist = None
        if comm is not None:
            from .distributed import as_data_parallel

            self.dist = as_data_parallel(comm)
            self.dist.broadcast_params(self.params)

    @property
    def lr(self) -> float:
        """The learning rate the next update will use."""
        return self.schedule.lr_at(self.step_count) if self.schedule is not None else self.optimizer.lr

    def train_step(self, inputs: dict[str, np.ndarray], masks: dict | None = None, *,
                   init_states: dict | None = None, **run_kw) -> StepStats:
        """One update on one batch (or, with k1/k2, on the stream's next chunk)."""
        if run_kw.pop("check_finite", True):
            scan_arrays(inputs=inputs, init_states=init_states)
        inputs = self._with_dropout(inputs, train=True)
        if self.tbptt is not None:
            if init_states is not None or run_kw:
                raise ValueError("with truncated BPTT the trainer carries the state itself; "
                                 "pass initial states with trainer.tbptt.reset(init_states)")
            result = self.tbptt.step(self.params, inputs, masks, check_finite=False)
        else:
            result = self.engine.run(self.params, inputs, init_states=init_states, masks=masks,
                                     combine=self.combine, check_finite=False, **run_kw)
        if self.dist is None:
            return self.apply_gradients(result.grads, loss=result.loss, result=result)
        grads, loss = self._allreduce(result, inputs, masks)
        stats = self.apply_gradients(grads, loss=loss, result=result)
        self.dist.check_params(self.params, self.step_count)
        return stats

    def _allreduce(self, result: RunResult, inputs: dict, masks: dict | None) -> tuple[dict, float]:
        """The global batch's gradients and loss from this rank's: one flat buffer, one allreduce.

        A loss with ``reduce="mean"`` divides by the number of terms it
        counted (its mask's sum, or T·B): this rank's count, where the update
        needs the global one. So the local gradients are multiplied back by
        the local count, summed over ranks with the counts, and divided by the
        global count. ``combine="mean"`` needs nothing more: it divides by the
        number of steps, the same on every rank.
        """
        local = self._local_count(inputs, masks)
        names = sorted(result.grads)
        dtype = result.grads[names[0]].dtype if names else np.dtype(np.float64)
        extra = np.array([result.loss, 1.0], dtype=dtype)  # times the count: this rank's loss sum, its count
        *summed, (loss, total) = self.dist.allreduce_sum([result.grads[n] for n in names] + [extra], scale=local)
        divisor = dtype.type(total if total > 0 else 1.0)  # no term counted anywhere: the gradients are zeros
        for g in summed:
            g /= divisor
        return dict(zip(names, summed)), float(loss) / float(divisor)

    def _local_count(self, inputs: dict, masks: dict | None) -> float:
        """The count this rank's losses divided by (1 when every loss is a sum); one count for all losses."""
        kinds = {loss.reduce for loss in self._losses}
        if kinds <= {"sum"}:
            return 1.0
        if "sum" in kinds:
            raise ValueError("data-parallel training needs the graph's losses to be all reduce='sum' or all "
                             "reduce='mean' (their gradients are rescaled by the global count); make them alike")
        T, B = _time_batch(inputs)
        counts = set()
        for loss in self._losses:
            m = (masks or {}).get(loss.name)
            m = np.ones((T, B)) if m is None else np.asarray(m, dtype=np.float64)
            n = float(np.broadcast_to(m.reshape(T, -1), (T, B)).sum())
            if n > 0:
                counts.add(n)
        if len(counts) > 1:
            raise ValueError("data-parallel training needs the graph's mean losses to count the same terms "
                             "(the same mask); give them one mask, or reduce='sum'")
        return counts.pop() if counts else 0.0

    def apply_gradients(self, grads: dict[str, np.ndarray], *, loss: float = math.nan,
                        result: RunResult | None = None) -> StepStats:
        """Clip ``grads`` (in place), then update the parameters; for loops that compute gradients themselves.

        With ``comm``, ``grads`` must already be the global batch's, the same on every rank
        (:meth:`train_step` reduces them; a loop of its own uses ``self.dist.allreduce_sum``).
        """
        lr = self.lr
        if self.clip_norm is not None:
            norm = clip_by_global_norm(grads, self.clip_norm)
        else:
            norm = global_norm(grads)
        skipped = not math.isfinite(norm)
        if not skipped:
            if self.clip_value is not None:
                clip_by_value(grads, self.clip_value)
            self.optimizer.step(self.params, grads, lr=lr)
        self.step_count += 1
        return StepStats(self.step_count, float(loss), float(norm), float(lr), skipped, result)

    def evaluate(self, inputs: dict[str, np.ndarray], masks: dict | None = None, *,
                 init_states: dict | None = None, **run_kw) -> RunResult:
        """A forward pass with dropout off (masks of ones), over exactly these inputs.

        Neither the parameters nor a truncated-BPTT stream's carried state are touched.
        """
        if run_kw.pop("check_finite", True):
            scan_arrays(inputs=inputs, init_states=init_states)
        inputs = self._with_dropout(inputs, train=False)
        return self.engine.run(self.params, inputs, init_states=init_states, masks=masks, backward=False,
                               check_finite=False, **run_kw)

    def _with_dropout(self, inputs: dict, train: bool) -> dict:
        missing = [n for n in self._dropout if n not in inputs]
        if not missing:
            return inputs
        T, B = _time_batch(inputs)
        dtype = next(iter(self.params.values())).dtype if self.params else np.float64
        out = dict(inputs)
        ranks = self.dist.size if self.dist is not None else 1
        for name in missing:  # in graph order, so the draws are reproducible
            shape = (T, B, self._dropout_sizes[name])
            keep = 1.0 - self._dropout[name]
            if train and keep < 1.0:
                # Drawn for the global batch, this rank's rows kept: every rank's generator stays the same.
                draw = self.rng.random((T, B * ranks, shape[2]))
                draw = draw if ranks == 1 else self.dist.shard(draw)
                out[name] = (draw < keep).astype(dtype) / np.asarray(keep, dtype=dtype)
            else:
                out[name] = np.ones(shape, dtype=dtype)
        return out

    # ----------------------------------------------------------------------------- resume

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Optimizer state (``optimizer/…``) and carried stream state (``tbptt/…``); parameters are the caller's."""
        out = {f"optimizer/{k}": v for k, v in self.optimizer.state_arrays().items()}
        if self.tbptt is not None:
            carried = self.tbptt.state_arrays()
            if self.dist is not None:  # every rank's rows, joined: the checkpoint of the global batch
                carried = self.dist.gather_rows(carried, {k: _batch_axis(k, v) for k, v in carried.items()})
            out.update({f"tbptt/{k}": v for k, v in carried.items()})
        return out

    def state_meta(self) -> dict:
        """JSON-able: step count, generator state, optimizer, schedule, clipping, truncation."""
        return {
            "step": self.step_count, "seed": self.seed, "rng": self.rng.bit_generator.state,
            "optimizer": self.optimizer.state_meta(),
            "schedule": self.schedule.to_dict() if self.schedule is not None else None,
            "clip_norm": self.clip_norm, "clip_value": self.clip_value, "combine": self.combine,
            "tbptt": self._tbptt_meta() if self.tbptt is not None else None,
        }

    def _tbptt_meta(self) -> dict:
        meta = self.tbptt.state_meta()
        if self.dist is not None and meta["batch"] is not None:
            meta["batch"] *= self.dist.size  # the arrays hold the global batch
        return meta

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Continue exactly where :meth:`state_arrays` / :meth:`state_meta` left off."""
        opt = {k[len("optimizer/"):]: v for k, v in arrays.items() if k.startswith("optimizer/")}
        self.optimizer = optimizer_from_state(opt, meta["optimizer"])
        self.schedule = schedule_from_dict(meta["schedule"]) if meta.get("schedule") else None
        self.clip_norm, self.clip_value = meta.get("clip_norm"), meta.get("clip_value")
        self.step_count = int(meta["step"])
        self.seed = int(meta.get("seed", self.seed))
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = meta["rng"]
        if (meta.get("tbptt") is None) != (self.tbptt is None):
            raise ValueError("the saved trainer state and this trainer disagree on truncated BPTT; "
                             "resume with the same k1 and k2")
        if self.tbptt is not None:
            carried = {k[len("tbptt/"):]: v for k, v in arrays.items() if k.startswith("tbptt/")}
            tmeta = meta["tbptt"]
            if self.dist is not None:  # the checkpoint holds the global batch: keep this rank's rows
                carried = {k: self.dist.shard(v, _batch_axis(k, v)) for k, v in carried.items()}
                if tmeta.get("batch") is not None:
                    rows = self.dist.rows(int(tmeta["batch"]))
                    tmeta = dict(tmeta, batch=rows.stop - rows.start)
            self.tbptt.load_state(carried, tmeta)


def _batch_axis(name: str, a: np.ndarray) -> int:
    """The batch axis of a carried array: ``history/<input>`` is ``[h, B, ...]``, a state ``[B, F]`` or ``[D, B, F]``."""
    return 1 if name.startswith("history/") else np.ndim(a) - 2


def _time_batch(inputs: dict) -> tuple[int, int]:
    for a in inputs.values():
        shape = np.shape(a)
        if len(shape) >= 2:
            return shape[0], shape[1]
    raise ValueError("cannot tell the number of steps and rows: no input given")


@dataclass
class History:
    """Per-update figures of a :func:`fit` run."""

    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    skipped: int = 0


def fit(trainer: Trainer, batches: Iterable, *, steps: int | None = None,
        callback: Callable[[StepStats], object] | None = None) -> History:
    """Update on each batch in turn (at most ``steps`` updates); return the figures.

    A batch is a :class:`Batch`, an ``(inputs, masks)`` pair, or a plain
    inputs dict. ``callback(stats)`` is called after each update; returning
    ``False`` from it stops the run (early stopping).
    """
    history = History()
    for i, batch in enumerate(batches):
        if steps is not None and i >= steps:
            break
        if isinstance(batch, Batch):
            stats = trainer.train_step(batch.inputs, batch.masks, init_states=batch.init_states)
        elif isinstance(batch, tuple):
            stats = trainer.train_step(*batch)
        else:
            stats = trainer.train_step(batch)
        history.losses.append(stats.loss)
        history.grad_norms.append(stats.grad_norm)
        history.lrs.append(stats.lr)
        history.skipped += stats.skipped
        if callback is not None and callback(stats) is False:
            break
    return history
