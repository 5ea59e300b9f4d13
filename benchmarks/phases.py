"""Where one training update's time goes, phase by phase, on one thread.

The 8- and 16-core estimate of SCALING_CORES.md needs fractions, not a
bench figure: which share of an update the row split runs in parallel, which
share only threaded products could shorten, and which share stays on one
core whatever the machine. This script wraps the compiled engine's phase
methods and the update's own calls with ``time.perf_counter`` (exclusive
times: a wrapped call inside another is counted once, in itself) and times a
W2 or W3 update, as peer_unrolled.py runs it, over a range of batch sizes:
a row split's part runs exactly the engine's run over ``B / parts`` rows on
one thread, so the one-thread time at smaller ``B`` is what a part costs.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python -m benchmarks.phases W2 --rows 50,25,17 --updates 20

Run by hand, like the rest of this folder; prints one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import numpy as np

from unrolled.engines.compiled.kernels import blas

_clock = {"on": False, "stack": [], "excl": {}}


def _charge(label: str, fn, *args, **kw):
    """Run ``fn`` and add its time, less that of wrapped calls inside it, to ``label``."""
    if not _clock["on"]:
        return fn(*args, **kw)
    stack, excl = _clock["stack"], _clock["excl"]
    stack.append(0.0)
    t0 = time.perf_counter()
    try:
        return fn(*args, **kw)
    finally:
        dt = time.perf_counter() - t0
        inner = stack.pop()
        excl[label] = excl.get(label, 0.0) + dt - inner
        if stack:
            stack[-1] += dt


def _wrap(owner, name: str, label) -> None:
    """Replace ``owner.name`` by a timed call; ``label`` is a string or ``label(*args)``."""
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def timed(*args, **kw):
        return _charge(label(*args) if callable(label) else label, fn, *args, **kw)

    setattr(owner, name, timed)


# The products must be wrapped before the engine's modules bind them (forward.py's op table does).
_plain_product = blas.product


def _timed_product(*args, **kw):
    """``blas.product``, charged to ``product in <phase>``: the phase of the call around it."""
    if not _clock["on"] or not _clock["stack"]:
        return _plain_product(*args, **kw)
    return _charge(f"product in {_clock['phase']}", _plain_product, *args, **kw)


blas.product = _timed_product
_clock["phase"] = "?"


def _phase(label):
    """A phase wrapper that also names the phase the products inside it belong to."""
    def run(fn, *args, **kw):
        name = label(*args) if callable(label) else label
        before, _clock["phase"] = _clock["phase"], name
        try:
            return _charge(name, fn, *args, **kw)
        finally:
            _clock["phase"] = before
    return run


def _wrap_phase(owner, name: str, label) -> None:
    fn = getattr(owner, name)
    timed_phase = _phase(label)

    @functools.wraps(fn)
    def timed(*args, **kw):
        return timed_phase(fn, *args, **kw)

    setattr(owner, name, timed)


def instrument(clip, optimizer) -> None:
    """Wrap the engine's phases (forward.py, backward.py, stages.py, engine.py) and the update's calls."""
    from unrolled.engines.compiled import backward, engine, forward, rowsplit, stages

    def by_phase(kind):
        return lambda run, v: f"{run.p.phase[v.name]} {kind}"  # pre/post forward, pre/post backward

    F, R = forward.ForwardRun, backward.Run
    _wrap_phase(F, "_batched_forward", by_phase("forward"))
    _wrap_phase(F, "_pre_product", "pre forward")
    _wrap_phase(F, "_call", lambda run, fn, t0, t1: fn.replace("_", " "))  # forward loop, backward loop
    _wrap_phase(F, "_prepare_loop", "loop set-up")
    _wrap_phase(F, "__init__", "loop set-up")
    _wrap_phase(F, "collect", "collect")
    _wrap_phase(R, "_batched_backward", by_phase("backward"))
    _wrap_phase(R, "_prepare_backward_loop", "loop set-up")
    _wrap_phase(R, "_start_chunk", "loop set-up")
    _wrap_phase(R, "_loop_param_grads", "weight gradients")
    _wrap_phase(R, "_pre_param_grads", "weight gradients")
    _wrap_phase(R, "_loop_outside_grads", "backward rest")
    _wrap_phase(R, "_finish", "backward rest")
    _wrap_phase(R, "backward", "backward rest")
    _wrap_phase(stages.StagedRun, "_run", "engine rest")
    _wrap_phase(stages.StagedRun, "_merge", "merge stages")
    _wrap_phase(engine.CompiledEngine, "run", "engine rest")
    _wrap_phase(rowsplit, "merge", "merge parts")
    _wrap(clip, "clip_by_global_norm", "clip")
    _wrap(optimizer, "step", "optimizer")


def profile(workload, corpus, rows: int, updates: int, warmup: int) -> dict:
    """One-thread fractions of a ``workload`` update over ``rows`` streams, and its plain time."""
    from unrolled.engines.compiled import background
    from unrolled.engines.registry import make_engine
    from unrolled.train import clip
    from unrolled.train.optim import make_optimizer

    from .corpus import Chunks
    from .peer_unrolled import _graph

    g = _graph(workload, corpus.V)
    params = g.init_params(0, np.float32)
    engine = make_engine(g)
    opt = make_optimizer(workload.optimizer, workload.lr)
    chunks = Chunks(corpus, workload.T, rows)
    state = {"carried": None}

    def update():
        x, y = chunks.next()
        r = engine.run(params, {"x": x, "target": y}, init_states=state["carried"])
        state["carried"] = r.final_states
        clip.clip_by_global_norm(r.grads, workload.clip_at)
        opt.step(params, r.grads)

    def timed(n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            update()
            out.append(time.perf_counter() - t0)
        return out

    update()
    background.wait()  # the timed updates are the compiled engine's own, not the NumPy loops' it starts on
    for _ in range(warmup):
        update()
    _clock["on"] = False
    plain = timed(updates)
    _clock["excl"].clear()
    _clock["on"] = True
    wrapped = timed(updates)
    _clock["on"] = False
    total = sum(wrapped)
    excl = dict(_clock["excl"])
    excl["python between"] = total - sum(excl.values())
    return {"rows": rows, "strategies": sorted(engine.strategies(workload.T, rows, np.float32)),
            "update_ms_median": 1e3 * float(np.median(plain)), "update_ms_min": 1e3 * min(plain),
            "wrapped_ms_median": 1e3 * float(np.median(wrapped)),
            "fractions": {k: round(v / total, 4) for k, v in sorted(excl.items(), key=lambda kv: -kv[1])}}


def split_overhead(workload, corpus, parts: int, reps: int) -> dict:
    """What a row split adds around its parts for ``parts`` threads: cutting the rows (rowsplit.rows)
    and merging the parts' results (rowsplit.merge), on one thread, in ms."""
    from unrolled.engines.compiled import rowsplit
    from unrolled.engines.registry import make_engine
    from unrolled.engines.runio import prepare

    from .corpus import Chunks
    from .peer_unrolled import _graph

    g = _graph(workload, corpus.V)
    params = g.init_params(0, np.float32)
    engine = make_engine(g)
    x, y = Chunks(corpus, workload.T, workload.B).next()
    feeds = prepare(g, params, {"x": x, "target": y})
    B = workload.B
    ranges = [(B * k // parts, B * (k + 1) // parts) for k in range(parts)]

    def cut():
        return [rowsplit.rows(feeds, lo, hi) for lo, hi in ranges]

    pieces = cut()
    cut_s, merge_s = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        cut()
        cut_s.append(time.perf_counter() - t0)
        results = [engine.loops.run(params, p, "sum", True, i) for i, p in enumerate(pieces)]
        t0 = time.perf_counter()
        rowsplit.merge(results)
        merge_s.append(time.perf_counter() - t0)
    return {"parts": parts, "cut_ms": 1e3 * float(np.median(cut_s)), "merge_ms": 1e3 * float(np.median(merge_s))}


def main(argv=None) -> None:
    from . import corpus as corpus_mod
    from . import workloads

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload", help="W2 or W3")
    ap.add_argument("--rows", default="", help="batch sizes to profile, comma-separated (default: the workload's B)")
    ap.add_argument("--updates", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--split", default="", help="part counts whose cut and merge to time, comma-separated")
    args = ap.parse_args(argv)
    w = workloads.get(args.workload)
    from unrolled.engines.compiled.kernels import onednn
    from unrolled.train import clip, optim

    instrument(clip, optim.Optimizer)
    c = corpus_mod.load()
    rows = [int(r) for r in args.rows.split(",") if r] or [w.B]
    out = {"workload": w.id, "describe": w.describe(), "onednn": onednn.version(), "onednn_threads": onednn.threads(),
           "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE")},
           "load_before": os.getloadavg()[0],
           "profiles": [profile(w, c, r, args.updates, args.warmup) for r in rows],
           "split": [split_overhead(w, c, int(p), 10) for p in args.split.split(",") if p]}
    out["load_after"] = os.getloadavg()[0]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
