"""Gradients through time: where in the sequence a network's gradient comes from, and how far back it reaches.

Two measurements for a model (a graph and its parameters) on a sequence:

* :func:`copy_gradient_norms` — each copy's contribution to each weight's
  gradient: ``‖∂L/∂W_t‖`` for every parameter ``W`` and step ``t``, where
  ``W_t`` is the copy of ``W`` used at step ``t`` of the unrolled graph. The
  weight's gradient is the sum of these contributions (see reference.py).

* :func:`lag_profile` — how the gradient of one step's loss fades as it flows
  back: ``‖∂ℓ_t/∂s_k‖`` as a function of the lag ``t - k``, averaged over
  ``t``. Here ``ℓ_t`` is one sequence's loss at step ``t`` and ``s_k`` is the
  state step ``k`` hands to step ``k + 1``: the value of every vertex read
  through a delay (``h`` for an Elman network; ``h`` and ``c`` for an LSTM;
  every layer's), ``s_{-1}`` being the initial state. It is computed exactly,
  not estimated (see :func:`state_gradients`).

A vanishing gradient shows as a lag profile falling by orders of magnitude
within a few steps; the classic contrast is an Elman network against an LSTM
whose forget gates have learned to stay open. :func:`plot` draws both
measurements for one model or several; two small synthetic tasks
(:class:`DelayTask`, :class:`LatchTask`) and :func:`train` give a quick way
to compare untrained and trained weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from unrolled.engines import reference
from unrolled.engines.registry import make_engine
from unrolled.engines.runio import prepare
from unrolled.graph.folded import Graph
from unrolled.words import count

PLOT_FORMATS = (".png", ".svg", ".pdf")


# ------------------------------------------------------------ measurements


@dataclass
class CopyNorms:
    """``norms[t, j]``: the norm of the contribution to parameter ``weights[j]`` from its copy at step ``t``."""

    weights: list[str]
    norms: np.ndarray  # [T, P]; NaN where a parameter has no copy at that step
    loss: float  # the total loss of the run


def copy_gradient_norms(graph: Graph, params, inputs, *, init_states=None, masks=None) -> CopyNorms:
    """Each weight's per-step gradient contributions, by the reference engine (it keeps copies apart)."""
    T = prepare(graph, params, inputs, init_states, masks).T
    result = reference.run(graph, params, inputs, init_states=init_states, masks=masks, per_copy=True)
    weights = [name for name, steps in result.copy_steps.items() if any(t >= 0 for t in steps)]
    norms = np.full((T, len(weights)), np.nan)
    for j, name in enumerate(weights):
        for copy, t in zip(result.per_copy[name], result.copy_steps[name]):
            if t >= 0:  # a learned initial state's copy sits before step 0
                norms[t, j] = np.linalg.norm(copy)
    return CopyNorms(weights, norms, result.loss)


def state_gradients(graph: Graph, params, inputs, *, init_states=None, masks=None, max_lag: int | None = None,
                    engine: str | None = None, progress=None) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(t, k, g)``, ``g[b] = ∂ℓ_{t,b}/∂s_{k,b}``, for ``k = t-1, t-2, …, t-max_lag`` (and ``k >= -1``).

    ``g`` is ``[B, S]``: for each sequence ``b`` of the batch, the gradient of
    its loss at step ``t`` (mask applied, before any averaging) with respect
    to the state step ``k`` hands on, the states' arrays flattened and joined
    in the order of ``graph.delayed()``. Only steps ``t`` where some loss is
    unmasked are yielded.

    How, exactly: the run is split after step ``k``. Steps ``k+1 … k+n`` run
    from ``s_k`` as their initial state, with the batch repeated ``n`` times
    and the ``j``-th repeat's mask keeping step ``k+1+j`` only, so that one
    backward pass returns, as initial-state gradients, ``∂ℓ_t/∂s_k`` for the
    ``n`` later steps at once. ``s_k`` itself comes from running one step at a
    time from the initial state. ``progress(done, T)``, if given, is called
    after each split: a long sequence takes a while.
    """
    feeds = prepare(graph, params, inputs, init_states, masks)
    T = feeds.T
    max_lag = T if max_lag is None else max(1, min(int(max_lag), T))
    eng = make_engine(graph, engine)
    names = list(graph.delayed())
    if not names:
        raise ValueError(f"graph '{graph.name}' has no delay edge, so nothing flows from one step to the next: "
                         f"there are no gradients through time to measure")
    state = dict(feeds.init)  # s_{-1}: name -> [D, B, F]
    active = sum(feeds.masks.values()) > 0  # [T, B]
    for k in range(-1, T - 1):
        n = min(T - 1 - k, max_lag)
        if active[k + 1:k + 1 + n].any():
            grads = _split_gradients(graph, eng, params, feeds, state, k, n, names)  # [n, B, S]
            for j in range(n):
                if active[k + 1 + j].any():
                    yield k + 1 + j, k, grads[j]
        if k + 1 < T - 1:
            step = eng.run(params, {name: a[k + 1:k + 2] for name, a in feeds.inputs.items()},
                           init_states=state, backward=False, check_finite=False)  # feeds: scanned once, above
            state = {name: _history(step.final_states[name]) for name in names}
        if progress is not None:
            progress(k + 2, T)


def _split_gradients(graph, eng, params, feeds, state, k: int, n: int, names) -> np.ndarray:
    """``[n, B, S]``: ∂ℓ_{k+1+j}/∂s_k for j < n, each sequence's gradient on its own."""
    B = feeds.B
    inputs = {name: _repeat_batch(a[k + 1:k + 1 + n], n) for name, a in feeds.inputs.items()}
    init = {name: _repeat_batch(h, n) for name, h in state.items()}  # [D, n*B, F]
    total = {name: np.zeros_like(h) for name, h in init.items()}  # [D, n*B, F]
    for loss in graph.losses:
        keep = np.zeros((n, n * B), dtype=feeds.dtype)
        for j in range(n):
            keep[j, j * B:(j + 1) * B] = feeds.masks[loss.name][k + 1 + j]
        if not keep.any():
            continue
        masks = {l.name: (keep if l is loss else np.zeros_like(keep)) for l in graph.losses}
        result = eng.run(params, inputs, init_states=init, masks=masks, check_finite=False)  # scanned by the caller
        # The engine divides a "mean" loss by its mask's sum; undo that to get each sequence's own loss.
        scale = keep.sum() if loss.reduce == "mean" else 1.0
        for name in names:
            total[name] = total[name] + scale * _history(result.init_grads[name])
    flat = [total[name].transpose(1, 0, 2).reshape(n * B, -1) for name in names]  # [n*B, D*F] per state
    return np.concatenate(flat, axis=1).reshape(n, B, -1)


def _repeat_batch(a: np.ndarray, n: int) -> np.ndarray:
    """``a`` with its batch axis (axis 1) repeated ``n`` times, repeat ``j`` at rows ``j*B … (j+1)*B``."""
    return np.concatenate([a] * n, axis=1)


def _history(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a[None] if a.ndim == 2 else a


@dataclass
class LagProfile:
    """``‖∂ℓ_t/∂s_{t-lag}‖`` by lag: its mean over steps ``t`` and sequences, and its 10th–90th percentiles."""

    lags: np.ndarray  # [L] 1 … max_lag
    mean: np.ndarray  # [L]
    low: np.ndarray  # [L] 10th percentile
    high: np.ndarray  # [L] 90th percentile
    count: np.ndarray  # [L] how many (t, sequence) pairs each lag averages
    by_step: np.ndarray  # [T, L] mean over sequences for each step t; NaN where t - lag < -1 or no loss

    def at(self, lag: int) -> float:
        """The mean norm at one lag (NaN when the sequence is too short for it)."""
        return float(self.mean[lag - 1]) if 1 <= lag <= len(self.mean) else float("nan")


def lag_profile(graph: Graph, params, inputs, *, init_states=None, masks=None, max_lag: int | None = None,
                engine: str | None = None, progress=None) -> LagProfile:
    """The norm of ``∂ℓ_t/∂s_k`` against the lag ``t - k``, averaged over ``t`` (see :func:`state_gradients`).

    Each (step, sequence) pair whose loss is unmasked counts once.
    """
    feeds_masks = prepare(graph, params, inputs, init_states, masks).masks
    active = sum(feeds_masks.values()) > 0  # [T, B]
    T = active.shape[0]
    L = T if max_lag is None else max(1, min(int(max_lag), T))
    samples: list[list[float]] = [[] for _ in range(L)]
    by_step = np.full((T, L), np.nan)
    for t, k, g in state_gradients(graph, params, inputs, init_states=init_states, masks=masks, max_lag=L,
                                   engine=engine, progress=progress):
        norms = np.linalg.norm(g, axis=1)[active[t]]
        samples[t - k - 1].extend(norms.tolist())
        by_step[t, t - k - 1] = norms.mean()
    stat = lambda f: np.array([f(s) if s else np.nan for s in samples])  # noqa: E731
    return LagProfile(
        lags=np.arange(1, L + 1),
        mean=stat(np.mean),
        low=stat(lambda s: np.percentile(s, 10)),
        high=stat(lambda s: np.percentile(s, 90)),
        count=np.array([len(s) for s in samples]),
        by_step=by_step,
    )


@dataclass
class Diagnosis:
    """Both measurements for one model on one batch of sequences, with a label for the plots."""

    label: str
    loss: float
    copies: CopyNorms
    lags: LagProfile
    notes: list[str] = field(default_factory=list)


def diagnose(graph: Graph, params, inputs, *, label: str | None = None, init_states=None, masks=None,
             max_lag: int | None = None, engine: str | None = None, progress=None) -> Diagnosis:
    """Per-copy gradient norms and the lag profile of ``graph`` with ``params`` on ``inputs``.

    ``engine`` runs the lag measurement; the per-copy norms always come from
    the reference engine, the one that keeps each copy's contribution apart.
    ``progress(done, T)`` is told how far the lag measurement, the long part, has come.
    """
    copies = copy_gradient_norms(graph, params, inputs, init_states=init_states, masks=masks)
    return Diagnosis(
        label=label or graph.name,
        loss=copies.loss,
        copies=copies,
        lags=lag_profile(graph, params, inputs, init_states=init_states, masks=masks, max_lag=max_lag,
                         engine=engine, progress=progress),
    )


# ---------------------------------------------------- a task to train on


class _SymbolTask:
    """What the synthetic tasks share: one-hot symbols in, one class out per step, a graph to fit.

    A task has ``symbols`` (the classes), ``input_size``, ``describe()`` and ``batch(T, B, rng)``.
    """

    def fits(self, graph: Graph) -> bool:
        """Whether ``graph`` has the task's inputs: dense ``x`` [input_size] and index ``target`` over ``symbols``."""
        x, target = graph.vertices.get("x"), graph.vertices.get("target")
        return (x is not None and x.kind == "input" and x.size == self.input_size and target is not None
                and target.kind == "index" and target.size == self.symbols and len(graph.losses) == 1)

    def check(self, graph: Graph) -> None:
        if not self.fits(graph):
            raise ValueError(
                f"the {self.describe()} task needs a dense input 'x' of size {self.input_size}, an index input "
                f"'target' over {self.symbols} classes and one loss; graph '{graph.name}' has inputs "
                f"{', '.join(f'{v.name} [{v.size}] {v.kind}' for v in graph.inputs) or 'none'} "
                f"and {len(graph.losses)} loss(es)"
            )


@dataclass
class DelayTask(_SymbolTask):
    """Say the symbol seen ``delay`` steps ago.

    ``x`` is a one-hot vector of one of ``symbols`` random symbols; the
    target at step ``t`` is the symbol at ``t - delay``; steps before
    ``delay`` have no loss (masked). Solving it needs a memory exactly
    ``delay`` steps long, refreshed at every step.
    """

    symbols: int = 4
    delay: int = 10

    @property
    def input_size(self) -> int:
        return self.symbols

    def describe(self) -> str:
        return f"delay-{self.delay}"

    def batch(self, T: int, B: int, rng: np.random.Generator):
        """``(inputs, mask)`` for ``B`` sequences of ``T`` steps; the mask is ``[T, B]``."""
        if self.delay >= T:
            raise ValueError(f"a delay task with delay {self.delay} needs sequences longer than {count(self.delay, 'step')}")
        sym = rng.integers(0, self.symbols, size=(T, B))
        target = np.zeros_like(sym)
        target[self.delay:] = sym[:-self.delay]
        mask = np.ones((T, B))
        mask[: self.delay] = 0.0
        return {"x": np.eye(self.symbols)[sym], "target": target}, mask


@dataclass
class LatchTask(_SymbolTask):
    """Say the last symbol that came with a marker (a flip-flop, or latch).

    ``x`` is a one-hot symbol plus one marker bit; a marker comes at step 0
    and then with probability ``marker_rate`` at each step. The target at
    every step is the symbol of the latest marker, so the answer must be
    held, unchanged, across however many unmarked (distracting) steps
    follow: the kind of memory the LSTM's gates were designed for.
    """

    symbols: int = 4
    marker_rate: float = 0.05

    @property
    def input_size(self) -> int:
        return self.symbols + 1

    def describe(self) -> str:
        return f"latch (marker rate {self.marker_rate:g})"

    def batch(self, T: int, B: int, rng: np.random.Generator):
        sym = rng.integers(0, self.symbols, size=(T, B))
        marked = rng.random((T, B)) < self.marker_rate
        marked[0] = True
        held = np.maximum.accumulate(np.where(marked, np.arange(T)[:, None], 0), axis=0)  # latest marker's step
        target = np.take_along_axis(sym, held, axis=0)
        x = np.concatenate([np.eye(self.symbols)[sym], marked[..., None].astype(np.float64)], axis=2)
        return {"x": x, "target": target}, np.ones((T, B))


def random_inputs(graph: Graph, T: int, B: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs for any graph: standard normal dense inputs, uniformly random indices."""
    return {
        v.name: rng.integers(0, v.size, size=(T, B)) if v.kind == "index" else rng.normal(size=(T, B, v.size))
        for v in graph.inputs
    }


def train(graph: Graph, params, task: DelayTask | LatchTask, steps: int, *, T: int = 50, B: int = 16,
          lr: float = 1e-2, clip_norm: float = 1.0, seed: int = 0, engine: str | None = None):
    """Train briefly with Adam on fresh batches of ``task``; return ``(params, losses)``.

    A small self-contained loop, enough to compare trained with untrained
    weights; the real trainer is train.py.
    """
    task.check(graph)
    rng = np.random.default_rng(seed)
    eng = make_engine(graph, engine)
    params = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v2 = {k: np.zeros_like(v) for k, v in params.items()}
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    losses = []
    loss_name = graph.losses[0].name
    for i in range(1, steps + 1):
        inputs, mask = task.batch(T, B, rng)
        result = eng.run(params, inputs, masks={loss_name: mask})
        losses.append(result.loss)
        norm = np.sqrt(sum(float((g * g).sum()) for g in result.grads.values()))
        shrink = min(1.0, clip_norm / norm) if norm > 0 else 1.0
        for k, g in result.grads.items():
            g = g * shrink
            m[k] = beta1 * m[k] + (1 - beta1) * g
            v2[k] = beta2 * v2[k] + (1 - beta2) * g * g
            params[k] -= lr * (m[k] / (1 - beta1 ** i)) / (np.sqrt(v2[k] / (1 - beta2 ** i)) + eps)
    return params, losses


# --------------------------------------------------------------- pictures


def plot(diagnoses: list[Diagnosis], path, *, title: str | None = None) -> Path:
    """Draw per-copy gradient heatmaps (one per diagnosis) above the lag profiles (all in one plot).

    The lag profiles are drawn twice: as measured, and divided by each
    model's own value at lag 1, which compares how fast the gradients fade
    whatever their scale. ``path`` ends in .png, .svg or .pdf.
    """
    import matplotlib
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    if path.suffix.lower() not in PLOT_FORMATS:
        raise ValueError(f"cannot plot to '{path}': the file name must end in {', '.join(PLOT_FORMATS)}")
    if not diagnoses:
        raise ValueError("nothing to plot: no diagnoses given")
    n = len(diagnoses)
    ncol = min(n, 4)
    nrow = -(-n // ncol)
    with matplotlib.rc_context({"svg.fonttype": "none", "font.size": 8}):
        fig = Figure(figsize=(max(8.0, 3.6 * ncol), 2.9 * nrow + 3.6), layout="constrained")
        grid = fig.add_gridspec(nrow + 1, 2 * ncol, height_ratios=[1.0] * nrow + [1.25])
        for i, d in enumerate(diagnoses):
            ax = fig.add_subplot(grid[i // ncol, 2 * (i % ncol):2 * (i % ncol) + 2])
            _heatmap(fig, ax, d, LogNorm)
        ax_abs = fig.add_subplot(grid[nrow, :ncol])
        ax_rel = fig.add_subplot(grid[nrow, ncol:])
        colors = _line_colors(diagnoses)
        for d, (color, style) in zip(diagnoses, colors):
            p = d.lags
            ok = np.isfinite(p.mean) & (p.mean > 0)
            ax_abs.plot(p.lags[ok], p.mean[ok], color=color, linestyle=style, label=d.label)
            ax_abs.fill_between(p.lags[ok], p.low[ok], p.high[ok], color=color, alpha=0.12, linewidth=0)
            if ok.any() and p.mean[0] > 0:
                ax_rel.plot(p.lags[ok], p.mean[ok] / p.mean[0], color=color, linestyle=style, label=d.label)
        for ax, what in ((ax_abs, r"mean $\Vert\partial\ell_t\,/\,\partial s_{t-\mathrm{lag}}\Vert$ "
                                  "(band: 10th to 90th percentile)"),
                         (ax_rel, "the same, divided by its value at lag 1")):
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("lag t − k (steps)")
            ax.set_title(what)
            ax.grid(True, which="major", alpha=0.3)
        ax_abs.set_ylabel("gradient norm")
        ax_rel.legend(fontsize=7, loc="lower left")
        fig.suptitle(title or "gradients through time", fontsize=11)
        fig.savefig(path, dpi=130, facecolor="white")
    return path


def _heatmap(fig, ax, d: Diagnosis, LogNorm) -> None:
    norms = d.copies.norms.T  # [P, T]
    positive = norms[np.isfinite(norms) & (norms > 0)]
    if positive.size:
        lo, hi = positive.min(), positive.max()
        image = ax.imshow(np.where(norms > 0, norms, np.nan), aspect="auto", interpolation="nearest",
                          cmap="viridis", norm=LogNorm(vmin=max(lo, hi * 1e-8), vmax=hi))
        fig.colorbar(image, ax=ax, label=r"$\Vert\partial L/\partial W_t\Vert$", shrink=0.9)
    ax.set_yticks(range(len(d.copies.weights)), d.copies.weights)
    ax.set_xlabel("step t (the copy of W used there)")
    ax.set_title(f"{d.label}\nloss {d.loss:.3f}; each copy's share of the gradient", fontsize=8)


def _line_colors(diagnoses: list[Diagnosis]) -> list[tuple[str, str]]:
    """One colour per model name (the label's first word), dashed for untrained, solid otherwise."""
    palette = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
    models: list[str] = []
    out = []
    for d in diagnoses:
        model = d.label.split()[0]
        if model not in models:
            models.append(model)
        out.append((palette[models.index(model) % len(palette)], "--" if "untrained" in d.label else "-"))
    return out


def summary(diagnoses: list[Diagnosis], lags=(1, 5, 10, 20, 40)) -> str:
    """A small table of the lag profiles: the mean norm at a few lags, and the ratio to lag 1."""
    width = max(len(d.label) for d in diagnoses)
    head = f"{'model':<{width}}  {'loss':>7}  " + "  ".join(f"{'lag ' + str(g):>9}" for g in lags)
    lines = [head]
    for d in diagnoses:
        cells = "  ".join(f"{d.lags.at(g):9.2e}" for g in lags)
        lines.append(f"{d.label:<{width}}  {d.loss:7.4f}  {cells}")
    lines.append("ratio to lag 1:")
    for d in diagnoses:
        base = d.lags.at(1)
        cells = "  ".join(f"{d.lags.at(g) / base:9.2e}" if base > 0 else f"{'-':>9}" for g in lags)
        lines.append(f"{d.label:<{width}}  {'':7}  {cells}")
    return "\n".join(lines)
