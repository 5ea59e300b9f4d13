"""What the parts of a row split cost each other: a split update on two threads, against one part alone.

A row split (rowsplit.py) runs each part's rows start to finish on a thread
of its own. Each part runs the engine's Python between its native calls
(products, Numba loops), and the parts' Python takes turns on the
interpreter's lock (the GIL): a part whose native call returns while the
other part is in Python waits for it. This script measures what that and the
split's own work cost, so that a change to the engine's Python can be judged
by the time it gives back. In one process, update by update in turns:

- **a part alone**: the same update over one part's rows on one thread
  (``threads=1``, products on one thread), as a part runs them;
- **the split update** over the workload's rows, and for each part its wall
  time and its thread's CPU time (``time.thread_time``): the difference is
  time the part spent off its core, waiting for the GIL or preempted;
- **around the parts**: the update's start to the first part's start, the
  second part's start after the first, the last part's end to the parts'
  return, the merge, the clip and the optimizer;
- **native calls**, in each part and in the part alone: the time inside the
  engine's products, weight gradients, step loops, cross-entropy kernels and
  weight copies (a weight gradient's product counts in the weight gradient).
  The rest of a part's time is the engine's Python and the small NumPy
  calls between. In a split part a native call's time includes the wait for
  the GIL when it returns, which the part alone does not have.

    python -m benchmarks.splitcost W2 --updates 300

prints one JSON object (milliseconds, medians over the updates). Run by hand,
on a quiet machine, like the rest of this folder.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import threading
import time

import numpy as np

from unrolled.engines.compiled.kernels import blas

_native = threading.local()  # this thread's times of native calls, by label, and whether one is running


def _charged(label: str, fn):
    """``fn``, its time added to this thread's ``label``; a charged call inside another (a weight
    gradient's product) counts in the outer one's."""
    @functools.wraps(fn)
    def timed(*args, **kw):
        times = getattr(_native, "times", None)
        if times is None or _native.inside:
            return fn(*args, **kw)
        _native.inside = True
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            times[label] = times.get(label, 0.0) + time.perf_counter() - t0
            _native.inside = False
    return timed


def _counting() -> dict[str, float]:
    """Start charging this thread's native calls into a new dict, and return it."""
    _native.inside, _native.times = False, {}
    return _native.times


def instrument() -> None:
    """Charge the engine's native calls (the module docstring's list) to their thread. Called
    before the engine's modules are imported: forward.py's op table binds the product it finds."""
    import sys

    if "unrolled.engines.compiled.forward" in sys.modules:
        raise RuntimeError("splitcost.instrument() must run before the compiled engine is imported")
    blas.product = _charged("products", blas.product)
    from unrolled.engines.compiled import backward, forward, weights
    from unrolled.engines.compiled.kernels import rows

    backward.weight_gradient = _charged("weight gradients", backward.weight_gradient)
    forward.ForwardRun._call = _charged("step loops", forward.ForwardRun._call)
    weights.derive = _charged("weight copies", weights.derive)
    for name in ("cross_entropy_rows", "cross_entropy_back_rows"):
        setattr(rows, name, _charged("cross-entropy", getattr(rows, name)))


class Recorder:
    """Wraps rowsplit's ``in_parts`` and ``merge`` and records, per split update, when each part ran."""

    def __init__(self):
        from unrolled.engines.compiled import rowsplit

        self.rowsplit, self.marks = rowsplit, {}
        self._in_parts, self._merge = rowsplit.in_parts, rowsplit.merge
        rowsplit.in_parts, rowsplit.merge = self.in_parts, self.merge

    def in_parts(self, calls, workers):
        def timed(i, call):
            def run():
                natives = _counting()
                wall, cpu = time.perf_counter(), time.thread_time()
                try:
                    return call()
                finally:
                    self.marks[f"part{i}"] = (wall, time.perf_counter(), time.thread_time() - cpu)
                    self.marks[f"natives{i}"] = dict(natives)
            return run

        t0 = time.perf_counter()
        try:
            return self._in_parts([timed(i, c) for i, c in enumerate(calls)], workers)
        finally:
            self.marks["parts"] = (t0, time.perf_counter())

    def merge(self, results):
        t0 = time.perf_counter()
        try:
            return self._merge(results)
        finally:
            self.marks["merge"] = (t0, time.perf_counter())


def _trainer(workload, corpus, rows: int, threads):
    """``update() -> {phase: (start, end)}``: one training update over ``rows`` streams, as
    peer_unrolled.py runs it, with its own parameters, optimizer and chunks."""
    from unrolled.engines.registry import make_engine
    from unrolled.train.clip import clip_by_global_norm
    from unrolled.train.optim import make_optimizer

    from .corpus import Chunks
    from .peer_unrolled import _graph

    g = _graph(workload, corpus.V)
    params = g.init_params(0, np.float32)
    engine = make_engine(g, threads=threads)
    opt = make_optimizer(workload.optimizer, workload.lr)
    chunks = Chunks(corpus, workload.T, rows)
    state = {"carried": None}

    def update() -> dict:
        x, y = chunks.next()
        t0 = time.perf_counter()
        r = engine.run(params, {"x": x, "target": y}, init_states=state["carried"])
        t1 = time.perf_counter()
        state["carried"] = r.final_states
        clip_by_global_norm(r.grads, workload.clip_at)
        t2 = time.perf_counter()
        opt.step(params, r.grads)
        t3 = time.perf_counter()
        return {"run": (t0, t1), "clip": (t1, t2), "optimizer": (t2, t3), "update": (t0, t3)}

    return engine, update


def measure(workload, corpus, updates: int, warmup: int) -> dict:
    """Medians, in ms, of the split update's figures and of a part alone (see the module docstring)."""
    from unrolled.engines.compiled import background
    from unrolled.engines.compiled.rowsplit import products_as_in_a_part

    instrument()
    recorder = Recorder()
    split_engine, split_update = _trainer(workload, corpus, workload.B, "auto")
    ranges = split_engine.row_parts(workload.B, np.float32)
    if not ranges or len(ranges) != 2:
        raise SystemExit(f"{workload.id}'s {workload.B} rows do not split in two on this machine "
                         f"({split_engine.explain(workload.T, workload.B).splitlines()[2]})")
    part_rows = ranges[0][1] - ranges[0][0]
    _, alone_update = _trainer(workload, corpus, part_rows, 1)

    def alone():
        with products_as_in_a_part():
            return alone_update()

    split_update()
    # The timed updates are the compiled engine's own, not the NumPy loops'; and the part alone's
    # first runs, which time the libraries for its products (kernels/layouts.py, libraries.py),
    # run on a machine no compiler shares.
    background.wait()
    for _ in range(warmup):
        split_update()
        alone()
    rows: dict[str, list[float]] = {}

    def add(key: str, seconds: float) -> None:
        rows.setdefault(key, []).append(1e3 * seconds)

    for i in range(updates):
        for which in (("alone", "split") if i % 2 else ("split", "alone")):
            if which == "alone":
                natives = _counting()
                marks = alone()
                start, end = marks["run"]
                add("part alone, run", end - start)
                add("part alone, update", marks["update"][1] - marks["update"][0])
                _record_natives("part alone", dict(natives), end - start, add)
            else:
                recorder.marks.clear()
                marks = split_update()
                _record_split({**marks, **recorder.marks}, add)
    return {"workload": workload.id, "rows": workload.B, "parts": [hi - lo for lo, hi in ranges],
            "updates": updates, "ms_median": {k: round(statistics.median(v), 3) for k, v in rows.items()},
            "libraries": _choices()}


def _choices() -> dict[str, str]:
    """Which library each product shape took in this process, as the engine measured it."""
    from unrolled.engines.compiled.kernels import layouts, libraries

    out = {f"weight gradient {r}x{o}x{i}": "NumPy's BLAS" if numpy else "oneDNN"
           for (r, o, i, _), numpy in libraries.chosen().items()}
    out.update({f"step product {r}x{i}x{c}": ("NumPy's BLAS" if k.numpy_blas else "oneDNN")
                + (", transposed" if k.transposed else "")
                for (r, i, c, *_), k in layouts.chosen().items()})
    return out


def _record_split(m: dict, add) -> None:
    """One split update's figures: its whole time, each part's wall, CPU and off-core time, and
    the time around the parts."""
    (u0, u1), parts = m["update"], [m["part0"], m["part1"]]
    add("split update", u1 - u0)
    for i, (start, end, cpu) in enumerate(parts):
        add(f"part {i} wall", end - start)
        add(f"part {i} cpu", cpu)
        add(f"part {i} off core", (end - start) - cpu)
        _record_natives(f"part {i}", m[f"natives{i}"], end - start, add)
    first_start = min(p[0] for p in parts)
    last_end = max(p[1] for p in parts)
    add("before the parts", first_start - u0)
    add("second part's start after the first", max(p[0] for p in parts) - first_start)
    add("parts' ends apart", abs(parts[0][1] - parts[1][1]))
    add("last part's end to the parts' return", m["parts"][1] - last_end)
    add("merge", m["merge"][1] - m["merge"][0])
    add("after the merge, in the run", m["run"][1] - m["merge"][1])
    add("clip", m["clip"][1] - m["clip"][0])
    add("optimizer", m["optimizer"][1] - m["optimizer"][0])


def _record_natives(who: str, natives: dict[str, float], wall: float, add) -> None:
    """Each kind of native call's time in ``who``, and the rest of its ``wall`` time."""
    for label in ("products", "weight gradients", "step loops", "cross-entropy", "weight copies"):
        add(f"{who}: {label}", natives.get(label, 0.0))
    add(f"{who}: the rest (Python, small NumPy calls)", wall - sum(natives.values()))


def main(argv=None) -> None:
    from . import corpus as corpus_mod
    from . import workloads

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload", help="a training workload whose rows split in two (W2)")
    ap.add_argument("--updates", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args(argv)
    from unrolled.engines.compiled.kernels import onednn

    out = {"onednn": onednn.version(), "onednn_threads": onednn.threads(), "load_before": os.getloadavg()[0],
           **measure(workloads.get(args.workload), corpus_mod.load(), args.updates, args.warmup)}
    out["load_after"] = os.getloadavg()[0]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
