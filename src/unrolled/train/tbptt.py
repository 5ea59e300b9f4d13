"""Truncated back-propagation through time over a stream: Williams & Peng's BPTT(k2; k1).

A stream too long to unroll whole (a character model's text) is trained a
chunk at a time: every ``k1`` new steps, back-propagate through the last
``k2`` steps, starting from the state carried (without gradient) to the
window's start. With ``k1 < k2`` the windows overlap, so the last ``k2 - k1``
steps are kept to be run again; that buffer and the carried state are what
a checkpoint must hold for a resumed run to compute the same numbers.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from unrolled.engines.runio import RunResult, check_combine, scan_arrays
from unrolled.graph.folded import Graph
from unrolled.words import count


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
