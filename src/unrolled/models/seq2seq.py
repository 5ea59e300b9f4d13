"""Generation and composition: feeding outputs back, bidirectional encoders, encoder–decoders.

Everything here is built from engine runs, so it works with any engine and
needs no engine code of its own:

* :func:`generate` — the output fed back as the next input, one step at a
  time (greedy decoding), the state carried from step to step.
* :func:`scheduled_inputs` — scheduled sampling (Bengio et al. 2015): some
  teacher-forced inputs replaced by the model's own previous prediction.
* :func:`reverse_time` and :class:`BidirectionalEncoder` — a graph from
  ``cells.bidirectional`` run forwards and backwards, its halves re-aligned.
* :class:`Seq2Seq` — an encoder and a decoder joined at the state: the
  decoder's initial state is the encoder's final state, and the decoder's
  gradient with respect to its initial state (``init_grads``) is fed to the
  encoder's backward pass as ``final_state_grads``, so BPTT runs through both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from unrolled.engines.registry import make_engine
from unrolled.engines.runio import RunResult
from unrolled.graph.folded import Graph, Vertex
from unrolled.train.variable_length import KEEP_INPUT

from . import cells

# ------------------------------------------------------------------------------------- generation


@dataclass
class Generation:
    """What :func:`generate` produced."""

    tokens: dict[str, np.ndarray]  # per fed-back input: [steps, B] the tokens it was given, start included
    predictions: dict[str, np.ndarray]  # per fed-back output: [steps, B] its argmax at each step
    outputs: dict[str, np.ndarray]  # per output: [steps, B, F]
    final_states: dict[str, np.ndarray] = field(default_factory=dict)
    lengths: np.ndarray | None = None  # [B] steps until (and including) the end token, when one is given


def _engine(e, engine_name=None):
    return make_engine(e, engine_name) if isinstance(e, Graph) else e


def _filler_inputs(graph: Graph) -> set[str]:
    """Inputs that nothing but a loss's target reads, and dropout masks: a generation pass may fill them."""
    readers: dict[str, list] = {v.name: [] for v in graph.inputs}
    for v in graph.vertices.values():
        if v.kind == "op":
            for i, a in enumerate(v.args):
                if isinstance(a, Vertex) and a.name in readers:
                    readers[a.name].append((v, i))
    losses = {l.vertex.name for l in graph.losses}
    only_targets = {n for n, rs in readers.items() if rs and all(v.name in losses and i == 1 for v, i in rs)}
    return only_targets | set(cells.dropout_rates(graph))


def _fill(graph: Graph, inputs: dict, T: int, B: int, dtype) -> dict:
    out = dict(inputs)
    for name in _filler_inputs(graph):
        if name in out:
            continue
        v = graph.vertices[name]
        if name in cells.dropout_rates(graph):
            out[name] = np.ones((T, B, v.size), dtype=dtype)  # evaluation: dropout off
        elif v.kind == "index":
            out[name] = np.zeros((T, B), dtype=np.int64)
        else:
            out[name] = np.zeros((T, B, v.size), dtype=dtype)
    return out


def generate(engine, params, inputs: dict[str, np.ndarray] | None = None, *, feedback: dict[str, str],
             start: dict[str, np.ndarray | int], steps: int, init_states: dict | None = None,
             end: int | None = None, batch: int | None = None) -> Generation:
    """Run ``steps`` steps one at a time, each fed-back input given the argmax of its output at the previous step.

    ``feedback`` maps an index input to the output whose argmax becomes its
    next value (``{"prev_letter": "logits"}``); ``start`` gives each such
    input's value at step 0 (a token number, or ``[B]``). ``inputs`` holds
    the other inputs for all steps (``[steps, B, ...]``); inputs only a loss
    reads (targets) are filled with zeros and dropout masks with ones.
    With ``end``, generation stops once every row has produced that token;
    ``lengths`` then says where each row's ended (``steps`` if it never did).
    """
    engine = _engine(engine)
    graph = engine.graph
    inputs = dict(inputs or {})
    _check_feedback(graph, inputs, feedback, start)
    B = batch if batch is not None else _batch_rows(inputs, start)
    dtype = next(iter(params.values())).dtype if params else np.float64
    inputs = _fill(graph, inputs, steps, B, dtype)
    tokens = _start_tokens(feedback, start, steps, B)
    preds = {o: np.zeros((steps, B), dtype=np.int64) for o in set(feedback.values())}
    outs = {o: [] for o in {v.name for v in graph.outputs}}
    state = init_states
    ended = np.zeros(B, dtype=bool)
    lengths = np.full(B, steps, dtype=np.int64)
    done = steps
    for t in range(steps):
        r = _run_step(engine, params, inputs, tokens, t, state)
        state = r.final_states
        for o in outs:
            outs[o].append(r.outputs[o][0])
        for o in preds:
            preds[o][t] = r.outputs[o][0].argmax(axis=-1)
        if end is not None:
            _mark_ended(next(iter(preds.values()))[t] == end, t, ended, lengths)
        if t + 1 < steps:
            for i, o in feedback.items():
                tokens[i][t + 1] = preds[o][t]
        if end is not None and ended.all():
            done = t + 1
            break
    return Generation(
        tokens={i: a[:done] for i, a in tokens.items()},
        predictions={o: a[:done] for o, a in preds.items()},
        outputs={o: np.stack(v) for o, v in outs.items()},
        final_states=state or {},
        lengths=lengths if end is not None else None,
    )


def _check_feedback(graph: Graph, inputs: dict, feedback: dict[str, str], start: dict) -> None:
    """Each fed-back input is an index input with a start value, read from an output, and not passed in inputs."""
    outputs = {v.name for v in graph.outputs}
    for i, o in feedback.items():
        if i not in graph.vertices or graph.vertices[i].kind != "index":
            raise ValueError(f"generate: feedback names '{i}', which is not an index input of graph '{graph.name}'")
        if o not in outputs:
            raise ValueError(f"generate: feedback reads '{o}', which is not an output of graph '{graph.name}'; mark it with g.output()")
        if i in inputs:
            raise ValueError(f"generate: '{i}' is fed back, so do not pass it in inputs; give its first value in start")
        if i not in start:
            raise ValueError(f"generate: no start value for fed-back input '{i}'")


def _batch_rows(inputs: dict, start: dict) -> int:
    """The batch size the caller implied: the rows of the first input, else of a ``[B]`` start value, else 1."""
    rows = [np.shape(a)[1] for a in inputs.values()] + [np.size(s) for s in start.values() if np.ndim(s) == 1]
    return rows[0] if rows else 1


def _start_tokens(feedback: dict[str, str], start: dict, steps: int, B: int) -> dict[str, np.ndarray]:
    """Per fed-back input, ``[steps, B]`` tokens: step 0 from ``start``, the later steps filled as they are made."""
    tokens = {i: np.zeros((steps, B), dtype=np.int64) for i in feedback}
    for i in feedback:
        tokens[i][0] = np.broadcast_to(np.asarray(start[i], dtype=np.int64), (B,))
    return tokens


def _run_step(engine, params, inputs: dict, tokens: dict, t: int, state) -> RunResult:
    """Step ``t`` alone: its slice of the inputs and tokens, from the state the previous step left."""
    feed = {k: a[t : t + 1] for k, a in inputs.items()}
    feed.update({i: a[t : t + 1] for i, a in tokens.items()})
    # one scan of the parameters and the caller's state, at the first step: the later steps read what it made
    return engine.run(params, feed, backward=False, check_finite=t == 0,
                      **({"init_states": state} if state is not None else {}))


def _mark_ended(hit_end: np.ndarray, t: int, ended: np.ndarray, lengths: np.ndarray) -> None:
    """Rows that produce the end token for the first time at step ``t`` end there: their length is ``t + 1``."""
    newly = hit_end & ~ended
    lengths[newly] = t + 1
    ended |= newly


def scheduled_inputs(engine, params, inputs: dict[str, np.ndarray], *, feedback: dict[str, str], ratio: float,
                     rng, init_states: dict | None = None) -> dict[str, np.ndarray]:
    """Teacher-forced inputs with some replaced by the model's own previous predictions (scheduled sampling).

    At each step ``t >= 1`` and row, with probability ``ratio`` the fed-back
    input gets the argmax of its output at step ``t-1`` — computed by a
    forward pass that itself ran on the inputs chosen so far — instead of
    the true previous token. The choice is data, not a function of the
    parameters, so the returned inputs are then trained on as usual.
    ``ratio = 0`` is teacher forcing, ``ratio = 1`` free running.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"scheduled sampling ratio {ratio!r}; it must be in [0, 1]")
    if ratio == 0.0:
        return inputs
    engine = _engine(engine)
    T, B = np.shape(next(iter(inputs.values())))[:2]
    flips = np.random.default_rng(rng).random((T, B)) < ratio
    flips[0] = False
    out = {k: np.array(a, copy=True) for k, a in inputs.items()}
    state = init_states
    for t in range(T - 1):
        feed = {k: a[t : t + 1] for k, a in out.items()}
        r = engine.run(params, feed, backward=False, check_finite=t == 0,  # the later steps read what it made
                       **({"init_states": state} if state is not None else {}))
        state = r.final_states
        for i, o in feedback.items():
            guess = r.outputs[o][0].argmax(axis=-1)
            out[i][t + 1] = np.where(flips[t + 1], guess, out[i][t + 1])
    return out


# ---------------------------------------------------------------------------------- bidirectional


def reverse_time(a: np.ndarray, lengths=None) -> np.ndarray:
    """``a`` ``[T, B, ...]`` reversed in time within each row's length (padding stays at the end).

    Its own inverse: ``reverse_time(reverse_time(a, L), L) == a``.
    """
    a = np.asarray(a)
    T, B = a.shape[:2]
    if lengths is None:
        return a[::-1].copy()
    lengths = np.asarray(lengths)
    t = np.arange(T)[:, None]
    src = np.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)  # [T, B]
    return a[src, np.arange(B)[None, :]]


def _lengths_from_keep(inputs: dict, keep: str = KEEP_INPUT):
    if keep not in inputs:
        return None
    return np.asarray(inputs[keep])[:, :, 0].sum(axis=0).round().astype(np.int64)


class BidirectionalEncoder:
    """Runs a graph built with ``cells.bidirectional``: forwards on ``x``, backwards on ``x`` reversed.

    The caller gives ``x`` only; the reversed copy (within each row's length,
    read from the ``keep`` input of a graph from ``train.freeze_after_end``)
    is added here. The result has, besides the engine's own entries:

    * ``outputs[joined]`` ``[T, B, 2H]``: ``[→h_t ; ←h_t]`` with the backward
      half re-aligned to the original time (meaningless past a row's end);
    * ``final_states[joined]`` ``[B, 2H]``: ``[→h at the row's last step ;
      ←h after reading the row back to its first step]``.

    ``output_grads[joined]`` and ``final_state_grads[joined]`` are split and
    re-aligned the same way, so it trains like any engine.
    """

    def __init__(self, graph: Graph, *, x: str, x_reversed: str, fwd: str, bwd: str, joined: str = "enc",
                 engine: str | None = None):
        for name in (fwd, bwd):
            if name not in graph.vertices:
                raise ValueError(f"bidirectional encoder: graph '{graph.name}' has no vertex '{name}'")
        for name in (x, x_reversed):
            if name not in graph.vertices or graph.vertices[name].kind not in ("input", "index"):
                raise ValueError(f"bidirectional encoder: graph '{graph.name}' has no input '{name}'")
        graph.output(fwd)  # both directions' values are needed at every step
        graph.output(bwd)
        self.graph = graph
        self.engine = make_engine(graph, engine)
        self.x, self.x_reversed, self.fwd, self.bwd, self.joined = x, x_reversed, fwd, bwd, joined
        self.H = graph.vertices[fwd].size

    def feeds(self, inputs: dict) -> dict:
        """``inputs`` plus the time-reversed copy of ``x``."""
        out = dict(inputs)
        out[self.x_reversed] = reverse_time(inputs[self.x], _lengths_from_keep(inputs))
        return out

    def run(self, params, inputs, *, output_grads=None, final_state_grads=None, **kw) -> RunResult:
        lengths = _lengths_from_keep(inputs)
        H = self.H
        og = dict(output_grads or {})
        if self.joined in og:
            d = np.asarray(og.pop(self.joined))
            og[self.fwd] = og.get(self.fwd, 0) + d[..., :H]
            og[self.bwd] = og.get(self.bwd, 0) + reverse_time(d[..., H:], lengths)
        fg = dict(final_state_grads or {})
        if self.joined in fg:
            d = np.asarray(fg.pop(self.joined))
            fg[self.fwd] = fg.get(self.fwd, 0) + d[..., :H]
            fg[self.bwd] = fg.get(self.bwd, 0) + d[..., H:]
        r = self.engine.run(params, self.feeds(inputs), output_grads=og or None, final_state_grads=fg or None, **kw)
        r.outputs[self.joined] = np.concatenate(
            [r.outputs[self.fwd], reverse_time(r.outputs[self.bwd], lengths)], axis=-1)
        r.final_states[self.joined] = np.concatenate([r.final_states[self.fwd], r.final_states[self.bwd]], axis=-1)
        r.input_grads.pop(self.x_reversed, None)
        return r


# ----------------------------------------------------------------------------------- encoder–decoder


class Seq2Seq:
    """An encoder and a decoder joined at the state, trained end to end.

    ``bridge`` maps each decoder state to the encoder final state(s) it
    starts from (a list is concatenated, e.g. both directions of a
    bidirectional encoder). One run::

        enc = encoder.run(src)                                  # forward only
        dec = decoder.run(tgt, init_states = bridge(enc.final_states))
        encoder.run(src, final_state_grads = bridge⁻¹(dec.init_grads))   # BPTT into the encoder

    Inputs are given in one dict (the two graphs' input names must differ);
    parameters too (a name in both graphs is one shared parameter, its two
    gradients added). ``feedback`` (decoder index input → decoder output)
    enables :meth:`generate` and scheduled sampling: with ``sampling > 0``
    each training run first picks its decoder inputs with
    :func:`scheduled_inputs`. Usable wherever an engine is (``Trainer``).
    """

    def __init__(self, encoder, decoder, *, bridge: dict[str, str | list[str]] | None = None,
                 feedback: dict[str, str] | None = None, sampling: float = 0.0, seed: int = 0,
                 engine: str | None = None):
        self.encoder = _engine(encoder, engine)
        self.decoder = _engine(decoder, engine)
        self.graph = self.decoder.graph
        self.graphs = [self.encoder.graph, self.decoder.graph]
        enc_states, dec_states = self.encoder.graph.delayed(), self.decoder.graph.delayed()
        if bridge is None:
            bridge = {n: n for n in dec_states if n in enc_states}
            if not bridge:
                raise ValueError("seq2seq: the encoder and decoder share no state name; say which decoder state "
                                 "starts from which encoder state with bridge={decoder_state: encoder_state}")
        self.bridge = {d: [e] if isinstance(e, str) else list(e) for d, e in bridge.items()}
        enc_finals = set(enc_states)
        if isinstance(self.encoder, BidirectionalEncoder):
            enc_finals.add(self.encoder.joined)
        for d, es in self.bridge.items():
            if d not in dec_states:
                raise ValueError(f"seq2seq: bridge names decoder state '{d}', which no delay of the decoder reads")
            for e in es:
                if e not in enc_finals:
                    raise ValueError(f"seq2seq: bridge names encoder state '{e}', which the encoder does not have")
            size = sum(self._enc_size(e) for e in es)
            if size != self.decoder.graph.vertices[d].size:
                raise ValueError(f"seq2seq: decoder state '{d}' is [{self.decoder.graph.vertices[d].size}] but "
                                 f"encoder state(s) {es} give [{size}]; make the sizes equal")
        both = {v.name for v in self.encoder.graph.inputs} & {v.name for v in self.decoder.graph.inputs}
        if both:
            raise ValueError(f"seq2seq: input '{sorted(both)[0]}' is in both graphs; give the encoder's and "
                             f"the decoder's inputs different names")
        self.feedback = dict(feedback or {})
        self.sampling = float(sampling)
        self.rng = np.random.default_rng(seed)

    def _enc_size(self, name: str) -> int:
        if isinstance(self.encoder, BidirectionalEncoder) and name == self.encoder.joined:
            return 2 * self.encoder.H
        return self.encoder.graph.vertices[name].size

    def split(self, inputs: dict) -> tuple[dict, dict]:
        enc_names = {v.name for v in self.encoder.graph.inputs}
        if isinstance(self.encoder, BidirectionalEncoder):
            enc_names.discard(self.encoder.x_reversed)
        dec_names = {v.name for v in self.decoder.graph.inputs}
        extra = sorted(set(inputs) - enc_names - dec_names)
        if extra:
            raise ValueError(f"seq2seq: no input named '{extra[0]}' in the encoder or the decoder")
        return ({k: v for k, v in inputs.items() if k in enc_names},
                {k: v for k, v in inputs.items() if k in dec_names})

    def split_params(self, params) -> tuple[dict, dict]:
        """The encoder's parameters and the decoder's, from one dict (a name in both is one shared parameter)."""
        enc, dec = self.encoder.graph.params, self.decoder.graph.params
        if not isinstance(params, Mapping):
            raise TypeError(f"seq2seq: params is {type(params).__name__}; pass a dict of arrays by parameter "
                            f"name, e.g. {{**encoder_graph.init_params(), **decoder_graph.init_params()}}")
        extra = sorted(k for k in params if k not in enc and k not in dec)
        if extra:
            raise ValueError(f"seq2seq: no parameter named '{extra[0]}' in the encoder or the decoder")
        missing = [k for k in [*enc, *dec] if k not in params]
        if missing:
            raise ValueError(f"seq2seq: no value for parameter '{missing[0]}'; "
                             f"each graph's init_params() makes its own")
        return {k: params[k] for k in enc}, {k: params[k] for k in dec}

    def encode(self, params, enc_inputs, init_states=None) -> RunResult:
        p, _ = self.split_params(params)
        return self.encoder.run(p, enc_inputs, init_states=init_states, backward=False)

    def bridged(self, enc_finals: dict) -> dict:
        return {d: np.concatenate([enc_finals[e] for e in es], axis=-1) for d, es in self.bridge.items()}

    def run(self, params, inputs, *, masks=None, combine: str = "sum", backward: bool = True,
            init_states: dict | None = None, sampling: float | None = None, check_finite: bool = True,
            **kw) -> RunResult:
        """Encoder forward, decoder forward (and back), encoder back; one merged :class:`RunResult`.

        ``init_states`` are the encoder's; ``masks`` the decoder's losses'.
        ``sampling`` overrides the scheduled-sampling ratio (training runs only).
        ``check_finite``: as the engines' (the encoder's second pass reads
        what the first one checked, and is not scanned again).
        """
        if kw:
            raise TypeError(f"seq2seq run: unexpected option(s) {', '.join(sorted(kw))}")
        enc_inputs, dec_inputs = self.split(inputs)
        enc_p, dec_p = self.split_params(params)
        enc = self.encoder.run(enc_p, enc_inputs, init_states=init_states, backward=False, check_finite=check_finite)
        dec_init = self.bridged(enc.final_states)
        ratio = self.sampling if sampling is None else float(sampling)
        if backward and ratio > 0:
            if not self.feedback:
                raise ValueError("seq2seq: scheduled sampling needs feedback={decoder input: decoder output}")
            dec_inputs = scheduled_inputs(self.decoder, dec_p, dec_inputs, feedback=self.feedback, ratio=ratio,
                                          rng=self.rng, init_states=dec_init)
        dec = self.decoder.run(dec_p, dec_inputs, init_states=dec_init, masks=masks, combine=combine, backward=backward,
                               check_finite=check_finite)
        result = RunResult(loss=dec.loss, outputs={**enc.outputs, **dec.outputs}, step_losses=dec.step_losses,
                           final_states=dec.final_states)
        if not backward:
            return result
        fsg: dict[str, np.ndarray] = {}
        for d, es in self.bridge.items():
            g, start = dec.init_grads[d], 0
            for e in es:
                size = self._enc_size(e)
                piece = g[..., start : start + size]
                fsg[e] = fsg[e] + piece if e in fsg else piece
                start += size
        enc_b = self.encoder.run(enc_p, enc_inputs, init_states=init_states, final_state_grads=fsg, combine=combine,
                                 check_finite=False)
        grads = dict(enc_b.grads)
        for k, v in dec.grads.items():
            grads[k] = grads[k] + v if k in grads else v
        result.grads = grads
        result.input_grads = {**enc_b.input_grads, **dec.input_grads}
        result.init_grads = enc_b.init_grads
        return result

    def generate(self, params, enc_inputs: dict, *, start: dict, steps: int, end: int | None = None,
                 dec_inputs: dict | None = None) -> Generation:
        """Encode, then decode greedily from the bridged state, feeding each prediction back."""
        if not self.feedback:
            raise ValueError("seq2seq: generation needs feedback={decoder input: decoder output}")
        enc = self.encode(params, enc_inputs)
        B = next(iter(enc.final_states.values())).shape[-2]
        _, dec_p = self.split_params(params)
        return generate(self.decoder, dec_p, dec_inputs, feedback=self.feedback, start=start, steps=steps,
                        init_states=self.bridged(enc.final_states), end=end, batch=B)
