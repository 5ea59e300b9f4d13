"""The character-level language model: its configuration, its graph, its checkpoints.

One character per step goes in as an index, is turned into a vector (one-hot,
or a learned embedding), climbs a stack of recurrent cells and comes out as
one score per character of the vocabulary; the loss is the cross-entropy of
the next character, averaged over every (step, row) of a chunk, in nats::

    x_t (index) -> one_hot | embedding -> cells.stack -> logits = W_out · h + b_out
    loss = mean over t, b of cross_entropy(logits_t, y_t)        y_t = x_{t+1}

Bits per character are that loss divided by ln 2.

Configuration lives in two dataclasses, one per concern: :class:`ModelConfig`
(what the network is) and :class:`TrainConfig` (how it is trained). Both go
into every checkpoint's JSON meta, with the vocabulary, so that ``sample``
and ``evaluate`` need nothing but the checkpoint: :func:`graph_from_checkpoint`
rebuilds the graph and hands back its parameters.

Dropout is not an op: it is a dense mask input multiplied into a layer's
output (``cells.dropout``), which the trainer fills with ``0`` or ``1/(1-p)``
(inverted dropout). A graph built with ``train=False`` has no such inputs,
reads the same parameters, and needs no rescaling.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unrolled.engines.registry import make_engine
from unrolled.graph.buffers import aligned
from unrolled.graph.folded import Graph
from unrolled.models import cells
from unrolled.train.checkpoint import load_checkpoint, resolve_checkpoint

from .batching import iter_eval_chunks
from .memory import check_fits, evaluation_bytes
from .vocabulary import Vocabulary

# Bump when the graph's layout (vertex or parameter names, meta fields) changes
# in a way an older reader cannot follow; a checkpoint with another number is
# refused with a sentence, not misread.
MODEL_FORMAT = 1
CHECKPOINT_KIND = "unrolled.charmodel"

INPUT_NAME = "x"  # the index input: the current character
TARGET_NAME = "y"  # the index input: the next character
LOGITS_NAME = "logits"  # the output vertex: one score per character
LOSS_NAME = "loss"  # the cross-entropy loss
LR_SCHEDULES = ("constant", "cosine")


MAX_LAYERS = 1_000  # stacked layers: far beyond what trains, far below what hangs building the graph


@dataclass
class ModelConfig:
    """What the network is."""

    cell: str = "lstm"  # recurrent cell of every layer: elman, jordan, lstm or gru
    hidden: int = 128  # state size of every layer
    layers: int = 2  # stacked recurrent layers, each reading the one below
    dropout: float = 0.0  # probability of zeroing a layer's output while training (0 = off)
    vocab_size: int = 0  # distinct characters, input and output size; set from the training text
    embedding: int = 0  # size of a learned character embedding; 0 feeds one-hot vectors instead
    # Starting value of the LSTM forget gate's bias (ignored by other cells). 0, as nn.LSTM starts it:
    # 1.0 (the usual advice for long memory) learned slower per update on text (benchmarks/QUALITY.md).
    forget_bias: float = 0.0
    dtype: str = "float32"  # parameters and activations: float32 (fast) or float64 (exact checks)

    def check(self) -> "ModelConfig":
        if self.cell not in cells.CELLS:
            raise ValueError(f"unknown cell '{self.cell}'; known cells: {', '.join(cells.CELLS)}")
        _at_least(self.hidden, 1, "hidden size (--hidden)")
        _at_least(self.layers, 1, "number of layers (--layers)")
        if self.layers > MAX_LAYERS:  # each layer is a block of graph vertices: 100,000 take minutes to build
            raise ValueError(f"number of layers (--layers) is {self.layers:,}; it must be at most {MAX_LAYERS:,}")
        _at_least(self.vocab_size, 1, "vocabulary size")
        if self.embedding < 0:
            raise ValueError(f"embedding size {self.embedding}; use 0 for one-hot input or a positive size (--embedding)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout {self.dropout}; it is a probability, at least 0 and below 1 (--dropout)")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype '{self.dtype}'; use float32 or float64")
        return self


@dataclass
class TrainConfig:
    """How the network is trained (the defaults are char-rnn's)."""

    seq: int = 50  # characters per chunk (T): the default of k1 and k2, and the validation chunk length
    batch: int = 50  # parallel streams per chunk (B)
    lr: float = 2e-3  # learning rate (the schedule's starting value)
    lr_schedule: str = "constant"  # constant, or cosine (down to 0 at the end of the steps or minutes)
    warmup: int = 0  # updates of linear learning-rate warm-up in front of the schedule
    decay: float = 1.0  # cosine: the last fraction of the budget the rate decays over (held at lr before it)
    optimizer: str = "adam"  # update rule, see optim.py
    clip: float = 5.0  # largest global gradient norm before an update; 0 = no clipping
    k1: int = 0  # truncated BPTT: characters between updates; 0 = seq
    k2: int = 0  # truncated BPTT: steps the gradient flows back; 0 = seq
    steps: int = 10_000  # stop after this many updates in all (about 25 passes over 1 MB); 0 = no step limit
    minutes: float = 0.0  # stop after this many minutes of training in this invocation; 0 = no time limit
    val_fraction: float = 0.1  # the last part of the text held out for validation
    seed: int = 0  # initial weights, dropout masks, and everything else random
    sample_every: int = 500  # updates between printed samples; 0 = never
    sample_length: int = 200  # characters in each printed sample
    eval_every: int = 500  # updates between validation passes; 0 = only at the end
    checkpoint_every: int = 0  # updates between saves of latest.npz; 0 = at each validation pass

    @property
    def bptt_k1(self) -> int:
        return self.k1 or self.seq

    @property
    def bptt_k2(self) -> int:
        return self.k2 or self.seq

    def check(self) -> "TrainConfig":
        _at_least(self.seq, 1, "sequence length (--seq)")
        _at_least(self.batch, 1, "batch size (--batch)")
        _at_least(self.bptt_k1, 1, "k1 (--k1)")
        _at_least(self.bptt_k2, 1, "k2 (--k2)")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"learning rate {self.lr}; it must be a positive number (--lr)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"learning-rate schedule '{self.lr_schedule}'; use one of {', '.join(LR_SCHEDULES)}")
        if self.lr_schedule == "cosine" and not (self.steps or self.minutes):
            raise ValueError("the cosine schedule needs the run's length: give --steps or --minutes")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay {self.decay}; it is the fraction of the budget the rate decays over, "
                             f"above 0 and at most 1 (--decay)")
        if self.warmup < 0:
            raise ValueError(f"warm-up of {self.warmup} steps; it cannot be negative (--warmup)")
        if self.bptt_k1 > self.bptt_k2:
            raise ValueError(f"k1 = {self.bptt_k1} is larger than k2 = {self.bptt_k2}; the gradient must reach "
                             f"back at least over the steps since the last update (--k1 <= --k2)")
        if not (math.isfinite(self.clip) and self.clip >= 0):
            raise ValueError(f"clip {self.clip}; use a positive gradient norm, or 0 for no clipping (--clip)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"validation fraction {self.val_fraction}; it must be above 0 and below 1 (--val-fraction)")
        for name in ("steps", "sample_every", "sample_length", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                flag = name.replace('_', '-')
                raise ValueError(f"{flag} is {getattr(self, name)}; it cannot be negative (--{flag})")
        if self.minutes < 0 or not math.isfinite(self.minutes):
            raise ValueError(f"minutes is {self.minutes}; it must be a positive number, or 0 for no limit (--minutes)")
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed is {self.seed!r}; it must be a whole number from 0 to 2**63 - 1 (--seed)")
        return self


def _at_least(value, low: int, what: str) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f"{what} is {value!r}; it must be a whole number of at least {low}")


def config_from_dict(cls, data: dict, where: str):
    """A config dataclass from its JSON form, refusing fields this version does not know and
    values of the wrong type (a whole number where the field is one, a number, a string)."""
    if not isinstance(data, dict):
        raise ValueError(f"field '{where}' is {data!r:.40}, not a JSON object")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(
            f"field '{where}' has field(s) {', '.join(unknown)} that this version of unrolled does not know; "
            f"it was written by a newer version"
        )
    for name, value in data.items():
        want = type(known[name].default)
        ok = (type(value) is int if want is int else
              type(value) in (int, float) and math.isfinite(value) if want is float else
              isinstance(value, want))
        if not ok:
            kind = {int: "a whole number", float: "a finite number", str: "a string"}.get(want, want.__name__)
            raise ValueError(f"field '{where}.{name}' is {value!r:.40}, not {kind}")
    return cls(**data)


# Upper bounds on what a checkpoint may ask for: the settings a file brings are used to size
# memory (a chunk of seq × batch, the graph's layers), and a file may come from anyone.
LOADED_LIMITS = {"layers": MAX_LAYERS, "seq": 100_000, "batch": 100_000, "k1": 100_000, "k2": 100_000,
                 "sample_length": 10_000_000, "vocab_size": 0x110000}
MAX_LOADED_CHUNK = 10_000_000  # characters in one chunk, seq × batch


def check_loaded_ranges(model: ModelConfig, train: TrainConfig) -> None:
    """Refuse settings from a file beyond :data:`LOADED_LIMITS` (first, so that the message names the
    file's field), then the usual checks."""
    for cfg, section in ((model, "model"), (train, "train")):
        for name, limit in LOADED_LIMITS.items():
            if hasattr(cfg, name) and getattr(cfg, name) > limit:
                raise ValueError(f"field '{section}.{name}' is {getattr(cfg, name):,}, more than the "
                                 f"{limit:,} a checkpoint may ask for")
    if train.seq * train.batch > MAX_LOADED_CHUNK:
        raise ValueError(f"a chunk of train.seq {train.seq:,} × train.batch {train.batch:,} characters is more "
                         f"than the {MAX_LOADED_CHUNK:,} a checkpoint may ask for")
    model.check()
    train.check()


# -------------------------------------------------------------------- graph


def build_graph(config: ModelConfig, *, train: bool = True) -> Graph:
    """The folded graph of the language model (see the module docstring).

    With ``config.dropout > 0`` and ``train=True`` the graph has dropout
    masks (``cells.dropout``) between the layers and before the readout,
    where char-rnn puts them; ``train=False`` leaves them out, and the
    parameters are the same.
    """
    config.check()
    V, H = config.vocab_size, config.hidden
    g = Graph(f"char-{config.cell}-{config.layers}x{H}")
    x = g.index_input(INPUT_NAME, V)
    if config.embedding:
        E = g.param("embed", (V, config.embedding), init="normal:0.1")
        v = g.embedding(E, x, name="e")
    else:
        v = g.one_hot(x, name="e")
    rate = config.dropout if train else 0.0
    kw = {"forget_bias": config.forget_bias} if config.cell == "lstm" else {}
    v = cells.dropout_stack(g, config.cell, v, H, config.layers, dropout_rate=rate, **kw)
    if rate > 0:
        v = cells.dropout(g, v, rate, name="out.dropout")
    W = g.param("out.W", (V, H), init="xavier")
    b = g.param("out.b", (V,), init="zeros")
    logits = g.output(g.linear(W, v, b, name=LOGITS_NAME))
    g.loss("cross_entropy", logits, g.index_input(TARGET_NAME, V), name=LOSS_NAME, reduce="mean")
    return g.check()


def init_params(config: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Fresh parameters for :func:`build_graph` ``(config)``, drawn from ``seed``."""
    return build_graph(config, train=False).init_params(np.random.default_rng(seed), dtype=np.dtype(config.dtype))


def bits(nats: float) -> float:
    """Nats per character to bits per character."""
    return nats / math.log(2)


# -------------------------------------------------------------- checkpoints

PARAM_PREFIX = "param."


def checkpoint_contents(model: ModelConfig, train: TrainConfig, vocabulary: list[str],
                        params: dict[str, np.ndarray], **extra) -> tuple[dict, dict]:
    """The ``(arrays, meta)`` of a checkpoint holding a model; ``extra`` goes into the meta."""
    arrays = {PARAM_PREFIX + name: np.ascontiguousarray(a) for name, a in params.items()}
    meta = {
        "kind": CHECKPOINT_KIND,
        "model_format": MODEL_FORMAT,
        "model": dataclasses.asdict(model),
        "train": dataclasses.asdict(train),
        "vocabulary": list(vocabulary),
    }
    meta.update(extra)
    return arrays, meta


@dataclass
class LoadedModel:
    """What :func:`load_model` reads from a checkpoint."""

    path: Path  # the checkpoint file itself
    graph: Graph  # built with train=False: no dropout inputs
    params: dict[str, np.ndarray]
    model: ModelConfig
    train: TrainConfig
    vocabulary: list[str]  # character of each index
    meta: dict  # the whole JSON meta
    arrays: dict[str, np.ndarray] = field(repr=False, default_factory=dict)  # every array in the file


def load_model(path) -> LoadedModel:
    """Read a language-model checkpoint (a file, or a run folder) and rebuild its graph.

    Every way a file can be wrong becomes one ``ValueError`` sentence naming it.
    """
    file = Path(resolve_checkpoint(path))
    found = {}

    def check(meta: dict, declared: dict) -> None:  # before any array is read
        found.update(_model_from_meta(file, meta))
        _check_declared(file, found["graph"], found["model"], declared)

    arrays, meta = load_checkpoint(file, check=check)
    model, graph = found["model"], found["graph"]
    params = {}
    for name in graph.params:
        a = arrays[PARAM_PREFIX + name]
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{file}: parameter '{name}' holds NaN or infinite values; use an earlier checkpoint")
        params[name] = aligned(a)  # on a cache line, like fresh ones (graph.init_params)
    return LoadedModel(file, graph, params, model, found["train"], found["vocabulary"], meta, arrays)


def _model_from_meta(file: Path, meta: dict) -> dict:
    """The model, training config, vocabulary and graph a checkpoint's meta describes, every field checked."""
    kind = meta.get("kind")
    if kind != CHECKPOINT_KIND:
        raise ValueError(
            f"{file} is not a language-model checkpoint (it holds {str(kind or 'something else')!r:.60}); "
            f"use a checkpoint written by 'unrolled train'"
        )
    fmt = meta.get("model_format")
    if fmt != MODEL_FORMAT:
        raise ValueError(
            f"{file} was written with language-model format {fmt!r:.40}, but this version of unrolled reads "
            f"format {MODEL_FORMAT}; use the unrolled version that wrote it, or train again"
        )
    try:
        model = config_from_dict(ModelConfig, meta.get("model"), "model")
        train = config_from_dict(TrainConfig, meta.get("train"), "train")
        check_loaded_ranges(model, train)
        vocabulary = meta.get("vocabulary")
        if (not isinstance(vocabulary, list) or len(vocabulary) != model.vocab_size
                or not all(isinstance(c, str) and len(c) == 1 for c in vocabulary)
                or len(set(vocabulary)) != len(vocabulary)):
            raise ValueError("its vocabulary is missing or does not match the model's vocabulary size")
        graph = build_graph(model, train=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file} holds an unusable model: {e}") from None
    return {"model": model, "train": train, "vocabulary": vocabulary, "graph": graph}


def _check_declared(file: Path, graph: Graph, model: ModelConfig, declared: dict) -> None:
    """Every parameter the model needs is in the file with its exact dtype and shape, and the other
    arrays (optimizer moments, carried state, history) are not out of proportion to them."""
    dtype = np.dtype(model.dtype)
    param_bytes = 0
    for name, p in graph.params.items():
        d = declared.get(PARAM_PREFIX + name)
        if d is None:
            raise ValueError(f"{file} has no array for parameter '{name}'; the file is incomplete or foreign")
        if d != (dtype, tuple(p.shape)):
            raise ValueError(
                f"{file}: parameter '{name}' is {d[0]}{list(d[1])} but the model needs "
                f"{model.dtype}{list(p.shape)}; the file is damaged or foreign"
            )
        param_bytes += math.prod(p.shape) * dtype.itemsize
    other = sum(math.prod(s) * t.itemsize for n, (t, s) in declared.items() if not n.startswith(PARAM_PREFIX))
    limit = 4 * param_bytes + 256_000_000  # moments and state in proportion; history and state grow with the run
    if other > limit:
        raise ValueError(f"{file}: its arrays besides the parameters declare {other / 1e6:,.1f} MB, more than the "
                         f"{limit / 1e6:,.1f} MB a model of {param_bytes / 1e6:,.1f} MB can need; refusing to unpack it")


def graph_from_checkpoint(path) -> tuple[Graph, dict[str, np.ndarray], dict]:
    """``(graph, params, meta)`` of a language-model checkpoint (file or run folder), for other tools."""
    m = load_model(path)
    return m.graph, m.params, m.meta


# ---------------------------------------------------------------- scoring


@dataclass
class Score:
    """How well a model predicts a text (see :func:`score_text`)."""

    characters: int  # characters in the text
    scored: int  # predictions scored: the in-vocabulary characters but the first
    nats: float  # total cross-entropy of the scored predictions, in nats
    unknown: int  # characters outside the vocabulary (skipped)
    unknown_chars: dict[str, int]  # each distinct unknown character and its count
    vocab_size: int

    @property
    def bits_per_char(self) -> float:
        return bits(self.nats / self.scored)

    @property
    def perplexity(self) -> float:
        return 2.0 ** self.bits_per_char

    @property
    def bits_per_char_charged(self) -> float:
        """Bits/char if each unknown character were charged log2(V) bits (a uniform guess) instead of skipped."""
        total = self.nats / math.log(2) + self.unknown * math.log2(self.vocab_size)
        return total / (self.scored + self.unknown)


def score_text(model: LoadedModel, text: str, *, seq: int | None = None, batch: int | None = None,
               engine: str | None = None) -> Score:
    """Bits per character of ``text`` under ``model``.

    The unknown-character rule: a character outside the model's vocabulary
    is *skipped*, removed from the text before scoring, so it is neither
    predicted nor read; the score is over the remaining characters, and the
    skipped ones are counted (``Score.unknown``) so that a caller can report
    them. The text is cut into ``batch`` streams read ``seq`` characters at a
    time, with the state carried, as validation does in training; every
    remaining character but the first is predicted exactly once.
    """
    eng = make_engine(model.graph, engine)

    def run_chunk(x, y, mask, state):
        kw = {"init_states": state} if state is not None else {}
        with np.errstate(under="ignore"):
            # the first chunk scans the parameters; the later ones carry the state the engine made
            r = eng.run(model.params, {INPUT_NAME: x, TARGET_NAME: y}, masks={LOSS_NAME: mask}, backward=False,
                        check_finite=state is None, **kw)
        nats = float(r.step_losses[LOSS_NAME].sum(dtype=np.float64))
        return nats, {k: np.array(v, copy=True) for k, v in r.final_states.items()}

    def fits(seq, batch):
        check_fits(evaluation_bytes(model.graph, seq, batch, model.model.dtype),
                   f"scoring chunks of --seq {seq} × --batch {batch}", "lower --seq or --batch")

    return score_chunks(model.vocabulary, text, seq or model.train.seq, batch or model.train.batch, run_chunk,
                        fits=fits)


def score_chunks(vocabulary: list[str], text: str, seq: int, batch: int, run_chunk, *, fits=None) -> Score:
    """:func:`score_text`'s rule with any runner: ``run_chunk(x, y, mask, state) -> (nats, state)``
    scores one ``[T, B]`` chunk from ``state`` (None at the start) and returns the state after it;
    ``fits(seq, batch)``, if given, refuses chunks too large for memory before the first. The ONNX
    scorer (export/charmodel.py) shares the unknown-character rule and the chunking so."""
    vocab = Vocabulary.from_list(vocabulary)
    ids, unknown = vocab.encode(text, unknown="skip")
    unknown_chars: dict[str, int] = {}
    if unknown:
        for ch in text:
            if ch not in vocab:
                unknown_chars[ch] = unknown_chars.get(ch, 0) + 1
    if len(ids) < 2:
        raise ValueError(
            f"the text has {len(ids)} character{'s' if len(ids) != 1 else ''} the model knows "
            f"({unknown} others skipped); scoring needs at least 2"
        )
    batch = min(batch, len(ids) - 1)  # no stream without a character to predict
    seq = min(seq, -(-(len(ids) - 1) // batch))  # no longer than a stream: memory follows the text
    if fits is not None:
        fits(seq, batch)
    total, count, state = 0.0, 0, None
    for x, y, mask in iter_eval_chunks(ids, seq, batch):
        nats, state = run_chunk(x, y, mask, state)
        total += nats
        count += int(mask.sum())
    return Score(len(text), count, total, unknown, unknown_chars, len(vocab))
