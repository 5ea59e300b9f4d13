"""Training: truncated BPTT over streams, variable-length batches, and the update loop.

Three pieces, each usable alone:

* :class:`TruncatedBPTT` — Williams & Peng's BPTT(k2; k1) over a stream:
  every ``k1`` new steps, back-propagate through the last ``k2`` steps,
  starting from the state carried (without gradient) to the window's start.
* :func:`freeze_after_end` and the mask helpers — variable-length sequences
  in one padded batch: the loss sees each row's own steps only, and each
  row's state stops changing after its last step, so its final state is its
  own.
* :class:`Trainer` and :func:`fit` — one update = run the engine, clip the
  gradients (reporting the norm before clipping), set the learning rate from
  a schedule, let the optimizer step. Dropout masks are filled from a seeded
  generator, so a seed makes a run bit-identical.

Optimizers, clipping and schedules live in ``optim.py``, ``clip.py`` and
``lr_schedules.py``; this module only wires them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from unrolled.engines.runio import RunResult, check_combine, scan_arrays
from unrolled.graph.folded import Graph, Vertex
from unrolled.models import cells
from unrolled.words import count

from .clip import clip_by_global_norm, clip_by_value, global_norm
from .lr_schedules import Schedule, schedule_from_dict
from .optim import Optimizer, optimizer_from_state

# ----------------------------------------------------------------------------------------- truncated BPTT


class TruncatedBPTT:
    """Williams & Peng's BPTT(k2; k1) over a stream: every k1 steps, back-propagate k2 steps (k1 <= k2).

    Each call to :meth:`step` brings the next ``k1`` steps of the stream
    (``[k1, B, ...]`` per input; a last, shorter chunk of ``n`` steps is
    allowed and back-propagates ``k2 - k1 + n`` steps). The
    engine then runs over the *window* of the last ``k2`` steps, the
    ``k2 - k1`` already seen ones replayed from a buffer, starting from the
    state carried to the window's start. That state is a constant: no
    gradient flows into it, which is exactly the cut of the unrolled graph
    at the truncation point. The loss is counted on the ``k1`` new steps
    only (the replayed steps are masked out), so ``reduce="mean"`` averages
    over the new steps, and every step's loss is counted exactly once over
    the stream. In plain loop form, for chunk ``n`` covering steps
    ``[n·k1, (n+1)·k1)``::

        w  = max(0, (n+1)·k1 - k2)                      # the window's start
        h_w = state carried to step w (forward only, no gradient)
        L_n = sum_{t = n·k1}^{(n+1)·k1 - 1} loss_t(h_w, x_w … x_t)
        grads = dL_n / dparams through steps w … (n+1)·k1 - 1 only

    ``k1 == k2`` is plain chunked stateful BPTT (each chunk starts from the
    previous chunk's final state); ``k2`` at least the stream's length is
    full BPTT (the window always reaches back to step 0).

    The replayed steps are recomputed with the current parameters (the
    usual implementation; Williams & Peng's online network would reuse
    activations computed with the weights of their own time). When
    ``k1 < k2`` the carried state must move ``k1`` steps forward after each
    update; it is recomputed by a forward-only run over the steps that leave
    the window, with the same parameters as the update's own run, so it
    equals the value that run computed there.
    """

    def __init__(self, engine, k1: int, k2: int, *, combine: str = "sum"):
        for name, k in (("k1", k1), ("k2", k2)):
            if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
                raise ValueError(f"truncated BPTT: {name}={k!r}; it must be a whole number of steps, at least 1")
        if k1 > k2:
            raise ValueError(
                f"truncated BPTT: k1={k1} > k2={k2}; back-propagation must reach at least as far back as "
                f"the steps since the last update (k1 <= k2), e.g. k2={k1}"
            )
        check_combine(combine)
        self.engine = engine
        self.graph: Graph = engine.graph
        self.k1, self.k2, self.combine = int(k1), int(k2), combine
        self.reset()

    def reset(self, init_states: dict[str, np.ndarray] | None = None) -> None:
        """Forget the carried state and the buffered steps (a new stream, or a new batch layout).

        ``init_states`` (optional) is where the next stream starts; without
        it, the graph's own initial states (zeros, learned or given).
        """
        scan_arrays(init_states=init_states, hint="")
        self._state = {k: np.array(v, copy=True) for k, v in init_states.items()} if init_states else None
        self._history: dict[str, np.ndarray] = {}  # inputs of the steps in [window start, now), [h, B, ...]
        self._history_steps = 0
        self._batch: int | None = None
        self.steps_seen = 0  # stream steps consumed since the last reset
        self.updates = 0

    @property
    def carried_state(self) -> dict[str, np.ndarray] | None:
        """The state at the start of the next window (``None``: the graph's own initial state)."""
        return self._state

    def step(self, params, inputs: dict[str, np.ndarray], masks: dict | None = None, *,
             check_finite: bool = True) -> RunResult:
        """One update: run the window ending with these new steps; see the class docstring.

        Returns the engine's :class:`RunResult` restricted to the new steps:
        ``loss`` and ``step_losses`` of these steps, ``outputs`` and
        ``input_grads`` of these steps, ``grads`` through the whole window,
        ``final_states`` after these steps. ``init_grads`` is empty: the
        carried state takes no gradient. ``check_finite`` scans ``params``
        and the new steps for NaN and infinities, as an engine run does;
        the replayed steps were scanned when new, and the carried state is
        computed, so the engine runs unscanned.
        """
        n, B = self._check_chunk(inputs)
        if check_finite:
            scan_arrays(params, inputs)
        if self._state is None:
            given = [name for name in self.graph.delayed() if self.graph.vertices[name].init == "given"]
            if given:
                raise ValueError(f"truncated BPTT: state '{given[0]}' has init=given; say where the stream "
                                 f"starts with reset(init_states={{'{given[0]}': array}}) before the first chunk")
        h = self._history_steps
        window = {name: (np.concatenate([self._history[name], a]) if h else a) for name, a in inputs.items()}
        window_masks = self._window_masks(masks, h, n, B)
        kw = {"init_states": self._state} if self._state is not None else {}
        result = self.engine.run(params, window, masks=window_masks, combine=self.combine, check_finite=False, **kw)

        # Move the window start forward past the steps the next window no longer holds.
        keep = min(self.k2 - self.k1, h + n)
        drop = h + n - keep
        if keep == 0:
            self._state = {k: np.array(v, copy=True) for k, v in result.final_states.items()}
        elif drop > 0:
            head = {name: a[:drop] for name, a in window.items()}
            self._state = self.engine.run(params, head, backward=False, check_finite=False, **kw).final_states
        self._history = {name: a[drop:].copy() for name, a in window.items()} if keep else {}
        self._history_steps = keep
        self._batch = B
        self.steps_seen += n
        self.updates += 1
        return _restrict(result, h)

    # --------------------------------------------------------------------------------- resume

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The carried state (``state/<vertex>``) and the buffered inputs (``history/<input>``)."""
        out = {f"state/{k}": np.array(v, copy=True) for k, v in (self._state or {}).items()}
        out.update({f"history/{k}": np.array(v, copy=True) for k, v in self._history.items()})
        return out

    def state_meta(self) -> dict:
        """JSON-able: k1, k2, combine, counters, and whether a state is carried."""
        return {
            "kind": "truncated_bptt", "k1": self.k1, "k2": self.k2, "combine": self.combine,
            "has_state": self._state is not None, "history_steps": self._history_steps,
            "batch": self._batch, "steps_seen": self.steps_seen, "updates": self.updates,
        }

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Put back what :meth:`state_arrays` / :meth:`state_meta` saved, for an exact resume."""
        if not isinstance(meta, dict) or meta.get("kind") != "truncated_bptt":
            raise ValueError("the saved state is not a truncated-BPTT state (no kind 'truncated_bptt' in its meta)")
        if (meta["k1"], meta["k2"]) != (self.k1, self.k2):
            raise ValueError(
                f"the saved truncated-BPTT state is for k1={meta['k1']}, k2={meta['k2']} but this one has "
                f"k1={self.k1}, k2={self.k2}; resume with the same k1 and k2"
            )
        states = {k[len("state/"):]: np.array(v) for k, v in arrays.items() if k.startswith("state/")}
        history = {k[len("history/"):]: np.array(v) for k, v in arrays.items() if k.startswith("history/")}
        unknown = [k for k in arrays if not k.startswith(("state/", "history/"))]
        if unknown:
            raise ValueError(f"saved truncated-BPTT array '{unknown[0]}' is neither 'state/<vertex>' nor 'history/<input>'")
        delayed, inputs = self.graph.delayed(), {v.name for v in self.graph.inputs}
        bad = [k for k in states if k not in delayed] + [k for k in history if k not in inputs]
        if bad:
            raise ValueError(f"saved truncated-BPTT state names '{bad[0]}', which graph '{self.graph.name}' does not have")
        if meta["has_state"] and set(states) != set(delayed):
            raise ValueError(f"saved truncated-BPTT state lacks the carried value of '{sorted(set(delayed) - set(states))[0]}'")
        h = int(meta["history_steps"])
        if h and (set(history) != inputs or any(a.shape[0] != h for a in history.values())):
            raise ValueError(f"saved truncated-BPTT history must hold {h} steps of every input of graph '{self.graph.name}'")
        self._state = states if meta["has_state"] else None
        self._history = history if h else {}
        self._history_steps = h
        self._batch = meta.get("batch")
        self.steps_seen = int(meta.get("steps_seen", 0))
        self.updates = int(meta.get("updates", 0))

    # -------------------------------------------------------------------------------- helpers

    def _check_chunk(self, inputs) -> tuple[int, int]:
        names = {v.name for v in self.graph.inputs}
        if set(inputs) != names:
            missing, extra = sorted(names - set(inputs)), sorted(set(inputs) - names)
            what = f"input '{missing[0]}' was not given" if missing else f"graph '{self.graph.name}' has no input '{extra[0]}'"
            raise ValueError(f"truncated BPTT: {what}; each chunk brings every input of the graph")
        if not names:
            raise ValueError(f"truncated BPTT needs a graph with inputs; graph '{self.graph.name}' has none")
        shapes = {name: np.shape(a)[:2] for name, a in inputs.items()}
        if len(set(shapes.values())) != 1 or any(len(s) < 2 for s in shapes.values()):
            raise ValueError(f"truncated BPTT: the chunk's inputs cover different [T, B]: {shapes}")
        n, B = next(iter(shapes.values()))
        if not 1 <= n <= self.k1:
            raise ValueError(f"truncated BPTT: a chunk covers {count(n, 'step')}; it must bring 1 to k1={self.k1} new steps")
        if self._batch is not None and B != self._batch and (self._history_steps or self._state is not None):
            raise ValueError(
                f"truncated BPTT: this chunk has {B} rows but the carried state has {self._batch}; "
                f"call reset() before changing the batch layout"
            )
        return n, B

    def _window_masks(self, masks, h: int, n: int, B: int) -> dict[str, np.ndarray]:
        masks = dict(masks or {})
        losses = {l.name for l in self.graph.losses}
        extra = sorted(set(masks) - losses)
        if extra:
            raise ValueError(f"a mask names '{extra[0]}', which is not a loss; losses: {', '.join(sorted(losses)) or 'none'}")
        out = {}
        for name in losses:
            m = masks.get(name)
            m = np.ones((n, B)) if m is None else np.asarray(m, dtype=np.float64)
            if m.shape == (n,):
                m = np.broadcast_to(m[:, None], (n, B))
            if m.shape != (n, B):
                raise ValueError(f"mask of loss '{name}' is {list(m.shape)}; it must cover the new steps, [{n}, {B}] or [{n}]")
            out[name] = np.concatenate([np.zeros((h, B)), m]) if h else m
        return out


def _restrict(result: RunResult, h: int) -> RunResult:
    """The part of a window's result that belongs to its new steps (from step ``h`` on)."""
    if h:
        result.step_losses = {k: v[h:] for k, v in result.step_losses.items()}
        result.outputs = {k: v[h:] for k, v in result.outputs.items()}
        result.input_grads = {k: v[h:] for k, v in result.input_grads.items()}
    result.init_grads = {}
    return result


def split_stream(arrays: dict[str, np.ndarray], k1: int) -> Iterator[dict[str, np.ndarray]]:
    """Cut ``[N, B, ...]`` arrays into consecutive chunks of ``k1`` steps (the last may be shorter)."""
    lengths = {np.shape(a)[0] for a in arrays.values()}
    if len(lengths) != 1:
        raise ValueError(f"split_stream: the arrays cover different numbers of steps: {sorted(lengths)}")
    N = lengths.pop()
    for s in range(0, N, k1):
        yield {k: a[s : s + k1] for k, a in arrays.items()}


# ------------------------------------------------------------------------------ variable lengths

KEEP_INPUT = "keep"


def freeze_after_end(graph: Graph, keep: str = KEEP_INPUT) -> Graph:
    """A copy of ``graph`` in which every state stops changing after each row's last step.

    Each vertex ``s`` read through a delay gets its next value through a
    gate, ``keep`` being a new dense input that is 1 on a row's own steps and
    0 on its padding::

        s.raw_t = (what s was)
        s_t     = keep_t ⊙ s.raw_t + (1 - keep_t) ⊙ s_{t-1}

    With ``keep`` exactly 0 or 1 this is exact in floating point: on a row's
    steps ``s = s.raw``, after them ``s`` holds its last value, so the final
    state is the state at the row's last step, and no gradient reaches the
    padding's computations. Parameters, state names and everything else are
    unchanged, so the same parameters run both graphs. ``keep`` is one input
    the size of the largest state (sliced for smaller ones), because
    elementwise ops take equal sizes; :func:`keep_feed` builds it from the
    lengths. Only states read one step back can be frozen this way.
    """
    g = copy.deepcopy(graph.check())
    delayed = g.delayed()
    if not delayed:
        raise ValueError(f"freeze_after_end: graph '{graph.name}' has no state (no vertex is read through a delay)")
    deep = sorted(n for n, d in delayed.items() if d > 1)
    if deep:
        raise ValueError(
            f"freeze_after_end: '{deep[0]}' is read {count(delayed[deep[0]], 'step')} back; freezing after a row's end "
            f"keeps one step of history, so it supports states read one step back only"
        )
    width = max(g.vertices[n].size for n in delayed)
    k = g.input(keep, width)
    gates: dict[int, tuple[Vertex, Vertex]] = {}

    def gate(size: int) -> tuple[Vertex, Vertex]:
        if size not in gates:
            ks = k if size == width else g.slice(k, 0, size, name=_fresh(g, f"{keep}.{size}"))
            gates[size] = (ks, g.one_minus(ks, name=_fresh(g, f"{ks.name}.off")))
        return gates[size]

    for name in delayed:
        s = g.vertices[name]
        if s.kind != "op":
            raise ValueError(f"freeze_after_end: '{name}' is an input read through a delay; only computed states can be frozen")
        raw = g._add(Vertex(g, _fresh(g, f"{name}.raw"), s.size, "op", s.op, s.args, s.attrs))
        on, off = gate(s.size)
        kept = g.mul(on, raw, name=_fresh(g, f"{name}.kept"))
        held = g.mul(off, g.delay(s, 1), name=_fresh(g, f"{name}.held"))
        s.op, s.args, s.attrs = "add", (kept, held), {}
        g._changed()  # the graph caches its order and checks; s was rewired in place
    g.name = f"{graph.name}+frozen"
    return g.check()


def _fresh(g: Graph, name: str) -> str:
    while name in g.vertices or name in g.params:
        name += "_"
    return name


def _lengths(lengths, T: int | None) -> tuple[np.ndarray, int]:
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"lengths must be a 1-D array of whole numbers (one per row), got {lengths.dtype} {list(lengths.shape)}")
    if lengths.size and lengths.min() < 0:
        raise ValueError(f"a length is {lengths.min()}; lengths must be at least 0")
    T = int(lengths.max(initial=0)) if T is None else int(T)
    if lengths.size and lengths.max() > T:
        raise ValueError(f"a row is {count(int(lengths.max()), 'step')} long but the batch covers T={T}; pad to at least that")
    return lengths, T


def length_mask(lengths, T: int | None = None) -> np.ndarray:
    """``[T, B]``: 1 on each row's own steps (``t < length``), 0 on its padding."""
    lengths, T = _lengths(lengths, T)
    return (np.arange(T)[:, None] < lengths[None, :]).astype(np.float64)


def last_step_mask(lengths, T: int | None = None) -> np.ndarray:
    """``[T, B]``: 1 at each row's last step only (a many-to-one loss); rows of length 0 get none."""
    lengths, T = _lengths(lengths, T)
    return (np.arange(T)[:, None] == lengths[None, :] - 1).astype(np.float64)


def keep_feed(graph: Graph, lengths, T: int | None = None, keep: str = KEEP_INPUT) -> np.ndarray:
    """The ``keep`` input of a graph from :func:`freeze_after_end`: ``[T, B, F]``, 1 on a row's steps, 0 after."""
    if keep not in graph.vertices or graph.vertices[keep].kind != "input":
        raise ValueError(f"graph '{graph.name}' has no input '{keep}'; build it with freeze_after_end(graph)")
    m = length_mask(lengths, T)
    return np.repeat(m[:, :, None], graph.vertices[keep].size, axis=2)


def pad(sequences, T: int | None = None, value=0) -> tuple[np.ndarray, np.ndarray]:
    """Sequences of different lengths (each ``[L_i, ...]``) as one time-major batch ``[T, B, ...]`` and their lengths."""
    seqs = [np.asarray(s) for s in sequences]
    if not seqs:
        raise ValueError("pad: no sequences")
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    _, T = _lengths(lengths, T)
    tail = {s.shape[1:] for s in seqs}
    if len(tail) != 1:
        raise ValueError(f"pad: the sequences' steps have different shapes {sorted(tail)}")
    out = np.full((T, len(seqs)) + tail.pop(), value, dtype=np.result_type(*seqs))
    for b, s in enumerate(seqs):
        out[: len(s), b] = s
    return out, lengths


# ----------------------------------------------------------------------------------------- trainer


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
        self._dropout = {name: rate for g in graphs for name, rate in cells.dropout_rates(g).items()}
        self._dropout_sizes = {name: g.vertices[name].size for g in graphs for name in cells.dropout_rates(g)}
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
