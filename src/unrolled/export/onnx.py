"""Any folded graph as an ONNX model: the recurrence is one ``Scan`` whose body is one step.

What the model computes is what ``reference.run(graph, params, inputs,
init_states=..., backward=False)`` computes, outputs and final states::

    rings = expand(init_state)                 # per delayed vertex v: [D, B, F], oldest first
    for t in range(T):                         # the Scan
        v_prev_d = rings[v][D - d]             # a delay of depth d reads its ring
        ... one step of the folded graph (each op's ONNX rule, from ops.py) ...
        rings[v] = concat(rings[v][1:], v_t)   # keep the last D values of v
        outputs[t] = ...
    return outputs, rings                      # rings are the final states

The model's interface:

- inputs: one per input vertex the outputs and states need, by its name,
  ``[T, B, F]`` float (``[T, B]`` int64 for an index input);
- ``init_state.<v>`` for every delayed vertex ``v``: ``[D, B, F]`` (``[D, 1, F]``
  is broadcast over the batch), with a default (zeros, or the learned initial
  state) unless the state is ``init="given"``;
- outputs: every output vertex by its name ``[T, B, F]``, and
  ``final_state.<v>`` ``[D, B, F]`` to pass back as ``init_state.<v>``.

Losses are left out (an inference model; ``mse``/``cross_entropy`` have
rules, so a loss vertex that feeds an output is exported like any op).
Parameters are initializers under their own names.
"""

from __future__ import annotations

import json

import numpy as np

from unrolled.engines.runio import as_state, check_params
from unrolled.graph.folded import Graph, Param, Vertex
from unrolled.graph.ops import OPS

from . import need

OPSET = 17
IR_VERSION = 8  # what ONNX Runtimes of the last few years all read
INIT_PREFIX, FINAL_PREFIX = "init_state.", "final_state."
META_STATES = "unrolled.states"  # JSON {vertex: deepest delay}, in the order of the Scan's states


class _Builder:
    """Collects nodes; the op table's ONNX rules call :meth:`node` and :meth:`const` (see ops.Op.onnx)."""

    def __init__(self, helper, numpy_helper, dtype: np.dtype, prefix: str, counter: list[int]):
        self.helper, self.numpy_helper, self.dtype = helper, numpy_helper, dtype
        self.prefix, self._counter = prefix, counter  # one counter for the graph and its body: unique names
        self.float_type = helper.np_dtype_to_tensor_dtype(dtype)
        self.nodes: list = []

    def fresh(self, hint: str) -> str:
        self._counter[0] += 1
        return f"{self.prefix}{hint}_{self._counter[0]}"

    def node(self, op_type: str, inputs: list[str], *, out: str | None = None, **attributes) -> str:
        out = out or self.fresh(op_type)
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [out], **attributes))
        return out

    def const(self, value, integer: bool = False) -> str:
        a = np.asarray(value, dtype=np.int64 if integer else self.dtype)
        name = self.fresh("const")
        self.nodes.append(self.helper.make_node("Constant", [], [name], value=self.numpy_helper.from_array(a, name)))
        return name


def _needed(graph: Graph) -> list[Vertex]:
    """The vertices that outputs and final states depend on, in step order (delays first)."""
    want = {v.name for v in graph.outputs} | set(graph.delayed())
    stack = list(want)
    while stack:
        v = graph.vertices[stack.pop()]
        for a in v.args:
            if isinstance(a, Vertex) and a.name not in want:
                want.add(a.name)
                stack.append(a.name)
    delays = [v for v in graph.delays if v.name in want]
    return delays + [v for v in graph.step_order() if v.name in want]


def _elem(onnx, v: Vertex, dtype: np.dtype) -> int:
    if v.kind == "index":
        return onnx.TensorProto.INT64
    return onnx.helper.np_dtype_to_tensor_dtype(dtype)


def _step_input_shape(v: Vertex) -> list:
    return ["B"] if v.kind == "index" else ["B", v.size]


def _body(onnx, graph: Graph, order: list[Vertex], scanned: list[Vertex], dtype, counter):
    """The Scan body: one step of the folded graph, reading and rolling the rings of delayed vertices."""
    helper = onnx.helper
    b = _Builder(helper, onnx.numpy_helper, dtype, "step/", counter)
    delayed = graph.delayed()
    rings = {name: f"ring/{name}" for name in delayed}
    values = {v.name: f"step/{v.name}" for v in scanned}
    inputs = [helper.make_tensor_value_info(rings[n], _elem(onnx, graph.vertices[n], dtype),
                                            [D, "B", graph.vertices[n].size]) for n, D in delayed.items()]
    inputs += [helper.make_tensor_value_info(values[v.name], _elem(onnx, v, dtype), _step_input_shape(v))
               for v in scanned]
    for v in order:
        if v.kind == "delay":
            D = delayed[v.source.name]
            values[v.name] = b.node("Gather", [rings[v.source.name], b.const(D - v.depth, integer=True)], axis=0)
        elif v.kind == "op":
            values[v.name] = _apply_rule(b, v, values)
    outputs = []
    for name, D in delayed.items():
        newest = b.node("Unsqueeze", [values[name], b.const([0], integer=True)])
        if D > 1:
            older = b.node("Slice", [rings[name], b.const([1], integer=True), b.const([D], integer=True),
                                     b.const([0], integer=True)])
            newest = b.node("Concat", [older, newest], axis=0)
        v = graph.vertices[name]
        outputs.append(helper.make_tensor_value_info(
            b.node("Identity", [newest], out=f"ring/{name}/next"), _elem(onnx, v, dtype), [D, "B", v.size]))
    for v in graph.outputs:
        outputs.append(helper.make_tensor_value_info(
            b.node("Identity", [values[v.name]], out=f"step/{v.name}/out"), _elem(onnx, v, dtype), _step_input_shape(v)))
    return helper.make_graph(b.nodes, f"{graph.name}/step", inputs, outputs)


def _apply_rule(b: _Builder, v: Vertex, values: dict[str, str]) -> str:
    rule = OPS[v.op].onnx
    if rule is None:
        raise ValueError(
            f"vertex '{v.name}' = {v.op}(...) cannot be exported: op '{v.op}' has no ONNX rule; "
            f"give its entry in ops.py one (Op.onnx), or build the graph without it"
        )
    args = [a.name if isinstance(a, Param) else values[a.name] for a in v.args]
    return rule(b, args, dict(v.attrs, dtype=b.dtype))


def _initial_state(graph: Graph, params, name: str, D: int, dtype) -> np.ndarray | None:
    """The default of ``init_state.<name>``, ``[D, 1, F]``; None for a state the caller must give."""
    v = graph.vertices[name]
    if v.init == "given":
        return None
    elem = np.int64 if v.kind == "index" else dtype
    if v.init == "learned":
        return np.broadcast_to(np.asarray(params[graph.init_param_name(name)], dtype=elem), (D, 1, v.size)).copy()
    return np.zeros((D, 1, v.size), dtype=elem)


def _output_name(v: Vertex) -> str:
    """An output is named after its vertex, unless that name is already a model input."""
    return f"output.{v.name}" if v.kind in ("input", "index") else v.name


def to_onnx(graph: Graph, params: dict[str, np.ndarray], *, metadata: dict[str, str] | None = None):
    """The ONNX ``ModelProto`` of ``graph`` with ``params`` (see the module docstring)."""
    onnx = need("onnx")
    helper = onnx.helper
    graph.check()
    params, dtype = check_params(graph, params)
    order = _needed(graph)
    scanned = [v for v in order if v.kind in ("input", "index")]
    if not scanned:
        if not graph.inputs:
            raise ValueError(f"graph '{graph.name}' has no per-step input: an ONNX Scan needs one to count the "
                             f"steps; add an input (it may be unused)")
        scanned = [graph.inputs[0]]  # the outputs read none, but the Scan needs one to count the steps
    counter = [0]
    body = _body(onnx, graph, order, scanned, dtype, counter)
    b = _Builder(helper, onnx.numpy_helper, dtype, "", counter)
    inputs = [helper.make_tensor_value_info(v.name, _elem(onnx, v, dtype), ["T", *_step_input_shape(v)])
              for v in scanned]
    used = {a.name for v in order if v.kind == "op" for a in v.args if isinstance(a, Param)}
    initializers = [onnx.numpy_helper.from_array(np.ascontiguousarray(params[p], dtype=dtype), p)
                    for p in graph.params if p in used]
    batch = b.node("Shape", [scanned[0].name], start=1, end=2)
    states, finals, outputs = [], [], []
    for name, D in graph.delayed().items():
        v = graph.vertices[name]
        elem = _elem(onnx, v, dtype)
        inputs.append(helper.make_tensor_value_info(INIT_PREFIX + name, elem, [D, "B_init", v.size]))
        default = _initial_state(graph, params, name, D, dtype)
        if default is not None:
            initializers.append(onnx.numpy_helper.from_array(default, INIT_PREFIX + name))
        shape = b.node("Concat", [b.const([D], integer=True), batch, b.const([v.size], integer=True)], axis=0)
        states.append(b.node("Expand", [INIT_PREFIX + name, shape]))
        finals.append(FINAL_PREFIX + name)
        outputs.append(helper.make_tensor_value_info(FINAL_PREFIX + name, elem, [D, "B", v.size]))
    for v in graph.outputs:
        outputs.append(helper.make_tensor_value_info(_output_name(v), _elem(onnx, v, dtype),
                                                     ["T", *_step_input_shape(v)]))
    b.nodes.append(helper.make_node("Scan", states + [v.name for v in scanned],
                                    finals + [_output_name(v) for v in graph.outputs],
                                    body=body, num_scan_inputs=len(scanned)))
    main = helper.make_graph(b.nodes, graph.name, inputs, outputs, initializer=initializers)
    model = helper.make_model(main, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="unrolled",
                              ir_version=IR_VERSION)
    props = {META_STATES: json.dumps(graph.delayed()), **(metadata or {})}
    helper.set_model_props(model, props)
    onnx.checker.check_model(model, full_check=True)
    return model


def export_onnx(graph: Graph, params: dict[str, np.ndarray], path, *, metadata: dict[str, str] | None = None):
    """Write ``graph`` with ``params`` to the ONNX file ``path`` (atomically); returns the model."""
    from unrolled.atomic import atomic_write_bytes

    model = to_onnx(graph, params, metadata=metadata)
    atomic_write_bytes(path, model.SerializeToString())
    return model


class OnnxRunner:
    """An exported model in ONNX Runtime, fed and read like an engine run.

    ``run(inputs, init_states)`` takes the engine's forms (a state delayed
    once may be ``[B, F]``) and returns ``(outputs, final_states)`` in them.
    """

    def __init__(self, model_or_path):
        ort = need("onnxruntime")
        onnx = need("onnx")
        model = model_or_path if hasattr(model_or_path, "SerializeToString") else _load(onnx, model_or_path)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about unused defaults are not the user's business
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.metadata = {p.key: p.value for p in model.metadata_props}
        self.states: dict[str, int] = json.loads(self.metadata.get(META_STATES, "{}"))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray], init_states: dict[str, np.ndarray] | None = None):
        feeds = {k: v for k, v in inputs.items() if k in self.input_names}
        for name, a in (init_states or {}).items():
            if name not in self.states:
                raise ValueError(f"init_states names '{name}', which the model does not carry; "
                                 f"its states are {', '.join(self.states) or 'none'}")
            a = np.asarray(a)
            feeds[INIT_PREFIX + name] = a[None] if a.ndim == 2 else a
        try:
            got = dict(zip(self.output_names, self.session.run(None, feeds)))
        except Exception as e:  # ONNX Runtime's own error types: wrong shapes, dtypes or names of feeds
            raise ValueError(f"ONNX Runtime refused the feeds: {e}") from None
        finals = {k[len(FINAL_PREFIX):]: as_state(v) for k, v in got.items() if k.startswith(FINAL_PREFIX)}
        outputs = {k.removeprefix("output."): v for k, v in got.items() if not k.startswith(FINAL_PREFIX)}
        return outputs, finals


def _load(onnx, path):
    """An ONNX file, or one sentence saying it is not one."""
    with open(path, "rb") as f:  # a missing file is the OSError the command line reports
        data = f.read()
    try:
        return onnx.load_from_string(data)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ValueError(f"{path} is not an ONNX model ({type(e).__name__}); "
                         f"write one with 'unrolled export CKPT -o model.onnx'") from None
