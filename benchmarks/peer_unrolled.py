"""The system under test: `unrolled`, used the way its README tells a user to.

The same contract as every peer (`peer_torch.run`, ...):

    run(workload: Workload, corpus: Corpus, protocol: Protocol) -> dict

Training (W1-W3, W5) builds the character model from the library's cells,
runs the default engine (`make_engine(graph)`: the compiled engine, which
takes its Numba loop by itself for call-bound runs) on stateful chunks,
clips and steps the library's optimizer. Sampling (W4) is the library's
`Generator`. W6 (start) builds the default character model of
`unrolled train` (`charmodel.build_graph` of a default `ModelConfig`) and
runs one update of the default `TrainConfig` (Adam, global norm 5) with the
default engine. Nothing is tuned by hand for the benchmark: no environment
variables, no engine options (the harness sets `UNROLLED_JIT=0` only for
W6's row of the plain NumPy engine, and points the caches at empty folders
for W6's cold start).
"""

from __future__ import annotations

import importlib
import time
from types import SimpleNamespace

import numpy as np

from .corpus import Chunks, Corpus
from .protocol import Protocol, peak_rss_during, time_steps
from .workloads import Workload


def _graph(workload: Workload, V: int, package: str = "unrolled"):
    """The workload's model, built by ``package``'s graph layer (``benchmarks/revisions.py`` builds one
    with an older copy of the package: an engine reads only its own package's graphs)."""
    Graph = importlib.import_module(f"{package}.graph.folded").Graph
    cells = importlib.import_module(f"{package}.models.cells")
    g = Graph(workload.name)
    x = g.one_hot(g.index_input("x", V), name="x1h")
    h = cells.stack(g, workload.cell, x, workload.hidden, workload.layers)
    y = g.linear(g.param("Wy", (V, workload.hidden)), h, g.param("by", (V,), init="zeros"), name="y")
    g.output(y)
    g.loss("cross_entropy", y, g.index_input("target", V), name="loss", reduce=workload.reduction)
    return g


def run(workload: Workload, corpus: Corpus, protocol: Protocol) -> dict:
    if workload.kind == "sample":
        return _sample(workload, corpus, protocol)
    if workload.kind == "start":
        return _first_update(workload, corpus, protocol)
    return _train(workload, corpus, protocol)


def _first_update(workload: Workload, corpus: Corpus, protocol: Protocol) -> dict:
    """W6: the default character model's first update; the harness times it from the process's start,
    and each step's end (``marks``, wall-clock seconds) shows where a slow start spent its time."""
    marks = {"worker": time.time()}  # the interpreter, the worker's imports and the corpus
    from unrolled.charlm import model as charmodel
    from unrolled.engines.registry import make_engine
    from unrolled.train.clip import clip_by_global_norm
    from unrolled.train.optim import make_optimizer

    marks["imports"] = time.time()
    model, train = charmodel.ModelConfig(vocab_size=corpus.V), charmodel.TrainConfig()
    assert (model.cell, model.hidden, model.layers, train.seq, train.batch) == (
        workload.cell, workload.hidden, workload.layers, workload.T, workload.B), "W6 is the default model"
    g = charmodel.build_graph(model)
    params = charmodel.init_params(model, protocol.seed)
    engine = make_engine(g)
    optimizer = make_optimizer(train.optimizer, train.lr)
    x, y = Chunks(corpus, train.seq, train.batch).next()
    marks["model"] = time.time()
    r = engine.run(params, {charmodel.INPUT_NAME: x, charmodel.TARGET_NAME: y})
    marks["run"] = time.time()
    clip_by_global_norm(r.grads, train.clip)
    optimizer.step(params, r.grads)
    end_time = marks["update"] = time.time()  # before asking the route, which may import Numba
    engine_used = _first_run(engine, train.batch)
    # The child compiling in the background would go on beside the next row's worker: wait for it
    # here, after the time is taken, so every row starts on a quiet machine.
    from unrolled.engines.compiled import background

    background.wait()
    return {"end_time": end_time, "marks": marks, "loss": float(r.loss), "engine": engine_used}


def _first_run(engine, B: int) -> str:
    """Which loops ran the first update: the plain NumPy ones while a child compiled (background.py)."""
    warm = getattr(engine, "warm_start", None)
    if warm is not None and warm.numpy_runs:
        return engine.name + " (numpy loop while Numba compiles in the background)"
    jit = engine.uses_jit(B) if hasattr(engine, "uses_jit") else False
    return engine.name + (" (numba loop)" if jit else " (numpy loop)")


def _settle(run_once) -> None:
    """Run once, let the engine's background compile finish, run again: the timed runs that follow
    are the compiled engine's own, with its code loaded (background.py)."""
    from unrolled.engines.compiled import background

    run_once()
    background.wait()
    run_once()


def trainer(workload: Workload, corpus: Corpus, seed: int, package: str = "unrolled") -> SimpleNamespace:
    """A training workload's ``engine``, ``params`` and corpus ``chunks``, and ``step()``: one update
    (the states carried from the last, the workload's clipping and optimizer), returning its loss.
    ``package`` as in :func:`_graph`: ``benchmarks/revisions.py`` times an older copy of the
    package's updates beside this one's, each as the bench times it."""
    def module(name: str):
        return importlib.import_module(f"{package}.{name}")

    g = _graph(workload, corpus.V, package)
    params = g.init_params(seed, np.float32)
    engine = module("engines.registry").make_engine(g)
    clip = module("train.clip")
    optimizer = module("train.optim").make_optimizer(workload.optimizer, workload.lr)
    chunks = Chunks(corpus, workload.T, workload.B)
    carried = {"state": None}

    def step():
        x, y = chunks.next()
        r = engine.run(params, {"x": x, "target": y}, init_states=carried["state"])
        carried["state"] = r.final_states
        if workload.clip == "value":
            clip.clip_by_value(r.grads, workload.clip_at)
        elif workload.clip == "norm":
            clip.clip_by_global_norm(r.grads, workload.clip_at)
        optimizer.step(params, r.grads)
        return r.loss

    return SimpleNamespace(engine=engine, params=params, chunks=chunks, step=step)


def _train(workload: Workload, corpus: Corpus, protocol: Protocol) -> dict:
    t0 = time.perf_counter()
    run = trainer(workload, corpus, protocol.seed)
    engine, params, chunks, step = run.engine, run.params, run.chunks, run.step
    jit = engine.uses_jit(workload.B) if hasattr(engine, "uses_jit") else False
    extra = {"engine": engine.name + (" (numba loop)" if jit else " (numpy loop)"), "products": _products(engine, workload.B)}
    if workload.kind == "memory":
        # Set-up compiles the fused kernels on a 2-step run (its buffers are dropped when T
        # changes); the measured step is the first at full length, allocating every buffer.
        x, y = chunks.next()
        _settle(lambda: engine.run(params, {"x": x[:2], "target": y[:2]}))
        return {**peak_rss_during(step), **extra, "setup_s": time.perf_counter() - t0}
    _settle(step)  # set-up includes the first run's compilation (the JIT loop, when taken)
    extra["setup_s"] = time.perf_counter() - t0
    scale = 1.0 / (workload.T * workload.B) if workload.reduction == "sum" else 1.0
    return {**time_steps(step, protocol, workload.T * workload.B, loss_scale=scale), **extra}


def _products(engine, B: int) -> str:
    """Where the float32 products go: oneDNN when the fast extra installed it (see unrolled/onednn.py),
    except in a small run's whole-run function, which does its own; and whether the batch's rows
    run split across threads (unrolled/rowsplit.py)."""
    from unrolled.engines.compiled.kernels import onednn

    if getattr(engine, "uses_whole", lambda B: False)(B):
        return "whole-run kernels"
    if onednn.SGEMM is None:
        return "NumPy's BLAS"
    parts = getattr(engine, "row_parts", lambda B, dtype: None)(B, np.float32)
    return f"oneDNN {onednn.version()}" + (f", rows on {len(parts)} threads" if parts else "")


def _sample(workload: Workload, corpus: Corpus, protocol: Protocol) -> dict:
    t0 = time.perf_counter()
    generate, gen = sampler(workload, corpus, protocol.seed)

    def step():
        generate()
        return None   # sampling has no loss

    generate()  # compile (or load the compiled loop)
    extra = {"setup_s": time.perf_counter() - t0, "engine": "generator (numba)" if gen.use_jit else "generator (numpy)",
             "threads_used": gen.ran_on}
    return {**time_steps(step, protocol, workload.T * workload.B), **extra}


def sampler(workload: Workload, corpus: Corpus, seed: int):
    """``(generate, generator)``: ``generate()`` samples ``workload.T`` characters of each of
    ``workload.B`` streams, every stream from the seed character, as tokens ``[T, B]``."""
    from unrolled.engines.compiled.feedback import Generator

    g = _graph(workload, corpus.V)
    params = g.init_params(seed, np.float32)
    gen = Generator(g, "x", "y")
    prime = np.full((1, workload.B), corpus.index(workload.seed_char))
    rng = np.random.default_rng(seed)

    def generate() -> np.ndarray:
        return gen.run(params, length=workload.T, prime=prime, rng=rng, temperature=workload.temperature)[0]

    return generate, gen
