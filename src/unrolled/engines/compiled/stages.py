"""Cutting a folded graph into stages, one recurrent core each.

A stack of recurrent layers has one cycle per layer, and layer 2 reads layer
1 only forwards in time. Running both in one step loop keeps all of layer
2's input product (``W[:, x] · h1``) inside the loop. Run layer by layer
instead (the cuDNN order) and that half becomes one big product over all
``T·B`` rows between the two loops, in the forward pass and in the
backward pass alike.

:func:`assign` orders the graph's cycles (its strongly connected components
through delay edges) so that each depends only on earlier ones, and puts
every vertex in the stage of the last cycle it depends on. :func:`cut`
builds each stage as a graph of its own: the same vertex and parameter
names, whatever it reads from earlier stages as inputs, and whatever later
stages read from it as outputs. The compiled engine runs the stages forward
in order and back-propagates through them in reverse, handing the input
gradients of one stage to the outputs of the one before (:class:`StagedRun`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from unrolled.engines.runio import CopyCounts, Feeds, RunResult
from unrolled.graph.folded import Graph, Param, Vertex

from .backward import Run
from .loops import StepLoops
from .plan import cyclic_components, edges_of, reach


@dataclass
class Stage:
    graph: Graph
    imports: list[str] = field(default_factory=list)  # vertices read from earlier stages (or graph inputs)
    exports: list[str] = field(default_factory=list)  # vertices later stages read
    outputs: list[str] = field(default_factory=list)  # the original graph's outputs computed here

    @property
    def delayed(self) -> dict[str, int]:
        """The states this stage keeps (and so the initial states it takes)."""
        return self.graph.delayed()


def _reverse(edges):
    rev: dict[str, list[str]] = {v: [] for v in edges}
    for src, dsts in edges.items():
        for d in dsts:
            rev[d].append(src)
    return rev


def assign(graph: Graph) -> tuple[dict[str, int], int]:
    """Each vertex's stage (1-based) and the number of stages (the number of cycles, at least 1)."""
    edges = edges_of(list(graph.vertices.values()))
    comps = cyclic_components(edges)
    rev = _reverse(edges)
    ancestors = [reach(c, rev) for c in comps]
    # order the cycles so that each comes after every cycle it depends on
    order: list[int] = []
    remaining = list(range(len(comps)))
    while remaining:
        ready = next(i for i in remaining
                     if not any(comps[j] & ancestors[i] for j in remaining if j != i))
        order.append(ready)
        remaining.remove(ready)
    stage = {v: 1 for v in graph.vertices}
    for k, i in enumerate(order, start=1):
        for v in reach(comps[i], edges):  # everything that depends on cycle i comes no earlier than stage k
            stage[v] = max(stage[v], k)
    return stage, max(len(comps), 1)


def cut(graph: Graph) -> list[Stage]:
    """The stages of ``graph``, each a graph of its own (see the module docstring)."""
    stage_of, count = assign(graph)
    order = graph.delays + graph.step_order()
    losses = {l.name: l for l in graph.losses}
    outputs = {v.name for v in graph.outputs}
    stages = [Stage(Graph(f"{graph.name}/stage{k}")) for k in range(1, count + 1)]
    later_readers: dict[str, int] = {}
    for v in order:
        if v.kind == "op":
            for a in v.args:
                if isinstance(a, Vertex) and stage_of[a.name] < stage_of[v.name]:
                    later_readers[a.name] = max(later_readers.get(a.name, 0), stage_of[v.name])
    for k, st in enumerate(stages, start=1):
        g = st.graph
        mine = [v for v in order if stage_of[v.name] == k]
        # vertices read from earlier stages, and the graph inputs this stage reads, become inputs
        needed = {a.name: a for v in mine if v.kind == "op" for a in v.args
                  if isinstance(a, Vertex) and stage_of[a.name] != k}
        needed.update({v.name: v for v in mine if v.kind in ("input", "index")})
        for name, a in needed.items():
            if a.kind == "index":
                g.index_input(name, a.size)
            else:
                g.input(name, a.size)
            if stage_of[name] != k or a.kind in ("input", "index"):
                st.imports.append(name)
        for name, a in needed.items():
            if a.init != "zeros":
                g.set_init(g.vertices[name], a.init)
        for v in mine:  # declare this stage's delayed vertices, so their delays can be read before they are defined
            if v.kind == "op" and any(d.source is v for d in graph.delays):
                g.state(v.name, v.size, init=v.init)
        for v in mine:
            if v.kind == "delay":
                g.delay(g.vertices[v.source.name], v.depth, name=v.name)
            elif v.kind == "op":
                args = [_param(g, a) if isinstance(a, Param) else g.vertices[a.name] for a in v.args]
                if v.name in losses:
                    g.loss(v.op, args[0], args[1], name=v.name, reduce=losses[v.name].reduce)
                else:
                    g.apply(v.op, *args, name=v.name, **v.attrs)
        for v in mine:
            if v.name in outputs:
                g.output(g.vertices[v.name])
                st.outputs.append(v.name)
            if later_readers.get(v.name, 0) > k and v.kind not in ("input", "index"):  # inputs reach every stage
                g.output(g.vertices[v.name])
                st.exports.append(v.name)
        for name, p in graph.params.items():  # learned initial states keep their parameters' initializers
            if name in g.params:
                g.params[name].init = p.init
    return stages


def _param(g: Graph, p: Param) -> Param:
    return g.params[p.name] if p.name in g.params else g.param(p.name, p.shape, init=p.init)


def stage_feeds(st: Stage, feeds: Feeds, values: dict[str, np.ndarray], params) -> Feeds:
    """A stage's arrays, cut from the whole run's (which :func:`~unrolled.engines.runio.prepare` has
    checked and converted): its inputs from ``values`` (the graph's inputs and what earlier stages
    exported), its states' initial values (the last ``D`` of the whole history, for a stage that
    reads a state less deep), its losses' masks and the whole batch's divisors. Nothing is checked
    or converted again: every stage of every part of a row split would repeat the whole run's checks."""
    g, delayed = st.graph, st.delayed
    return Feeds(
        T=feeds.T, B=feeds.B, dtype=feeds.dtype,
        inputs={n: values[n] for n in st.imports},
        init={k: feeds.init[k][len(feeds.init[k]) - D:] for k, D in delayed.items()},
        masks={l.name: feeds.masks[l.name] for l in g.losses},
        norms={l.name: feeds.norms[l.name] for l in g.losses},
        final_state_grads={k: v for k, v in feeds.final_state_grads.items() if k in delayed},
        output_grads={k: v for k, v in feeds.output_grads.items() if k in st.outputs},
        given_init=frozenset(k for k in feeds.given_init if k in delayed),
        params={k: params[k] for k in g.params},
    )


class StagedRun:
    """A graph of several recurrent cores run stage by stage, each stage on step loops of its own.

    Forward through the stages in order, then BPTT back through them in
    reverse; ``stages`` pairs each :class:`Stage` with its
    :class:`~unrolled.engines.compiled.loops.StepLoops`."""

    def __init__(self, graph: Graph, parts: list[Stage], jit: bool | str = "auto", chunk_steps: int | None = None):
        self.graph = graph
        self.stages = [(st, StepLoops(st.graph.check(), jit=jit, chunk_steps=chunk_steps)) for st in parts]
        self.code = "\n".join(loops.code for _, loops in self.stages)
        self.copies = CopyCounts(graph)  # combine="mean"'s divisors, per (T, given_init)

    @property
    def cores(self) -> list[StepLoops]:
        """Each stage's step loops, in order."""
        return [loops for _, loops in self.stages]

    @property
    def jit_code(self) -> str:
        """Each stage's loops as Numba compiles them."""
        return "\n".join(loops.jit_code for _, loops in self.stages)

    def uses_jit(self, B: int) -> bool:
        """Whether any stage runs ``B`` rows on the Numba loop."""
        return any(loops.uses_jit(B) for _, loops in self.stages)

    def compile_jit(self) -> None:
        """Load every stage's Numba loops now (a row split does, before its threads would each try)."""
        for _, loops in self.stages:
            loops.jit_namespace()

    def weights(self, params, dtype, backward: bool) -> list[dict[str, np.ndarray]]:
        """Each stage's pieces of its weights (:meth:`StepLoops.weights`), in order."""
        return [loops.weights(params, dtype, backward) for _, loops in self.stages]

    def run(self, params, feeds: Feeds, combine: str, backward: bool, part: int = 0,
            shared: list[dict[str, np.ndarray]] | None = None) -> RunResult:
        """One run over the rows of ``feeds``, in this thread; ``part`` picks each stage's set of buffers;
        ``shared``: the stages' weight pieces (:meth:`weights`) when made once for several parts."""
        with np.errstate(under="ignore", over="ignore"):
            if shared is None:
                shared = self.weights(params, feeds.dtype, backward)
            return self._run(params, feeds, combine, backward, part, shared)

    def _run(self, params, feeds: Feeds, combine, backward, part: int, shared) -> RunResult:
        """Forward through the stages in order, then BPTT back through them in reverse: the
        gradient a stage sends to an input it imported is an output gradient of the stage before."""
        values = dict(feeds.inputs)
        runs = []
        for (st, eng), pieces in zip(self.stages, shared):
            sub = stage_feeds(st, feeds, values, params)
            state = Run(eng, sub.params, sub, pieces, part)
            state.forward()
            r = state.collect(st.outputs)
            for n in st.exports:  # read in place: nothing writes the stage's buffers before this run ends
                values[n] = np.ascontiguousarray(state.value(eng.graph.vertices[n]))
            runs.append((st, state, r))
        if backward:
            sent: dict[str, np.ndarray] = {}  # gradients later stages send back, by vertex
            for st, state, r in reversed(runs):
                for n in st.exports:
                    if n in sent:
                        mine = state.f.output_grads.get(n)
                        state.f.output_grads[n] = sent.pop(n) if mine is None else mine + sent.pop(n)
                state.backward(r, "sum")  # "mean" divides by the whole graph's copies, in _merge
                for n, grad in r.input_grads.items():
                    sent[n] = grad if n not in sent else sent[n] + grad
        return self._merge(runs, feeds, backward, combine)

    def _merge(self, runs, feeds: Feeds, backward: bool, combine: str) -> RunResult:
        """One result from the stages' results. A parameter several stages read (a learned initial
        vector an op of another stage reads too) has copies in each: combine="mean" divides the
        sum of all its contributions by all its copies, never each stage's share by its own."""
        result = RunResult(loss=sum(r.loss for _, _, r in runs))
        for st, _, r in runs:
            result.outputs.update({n: r.outputs[n] for n in st.outputs})
            result.step_losses.update(r.step_losses)
            result.final_states.update(r.final_states)
            if backward:
                result.init_grads.update(r.init_grads)
                for k, grad in r.grads.items():
                    result.grads[k] = grad if k not in result.grads else result.grads[k] + grad
        if backward:
            grads = result.grads  # unused ones get zeros (made only for them)
            result.grads = {k: grads[k] if k in grads else np.zeros(p.shape, dtype=feeds.dtype)
                            for k, p in self.graph.params.items()}
            if combine == "mean":  # every array here is this run's own: a stage's, a sum or zeros
                for k, c in self.copies(feeds.T, feeds.given_init).items():
                    if c:
                        result.grads[k] /= c
            for v in self.graph.inputs:
                if v.kind == "input":
                    parts = [r.input_grads[v.name] for _, _, r in runs if v.name in r.input_grads]
                    result.input_grads[v.name] = (np.sum(parts, axis=0) if parts
                                                  else np.zeros((feeds.T, feeds.B, v.size), dtype=feeds.dtype))
        return result
