"""The four flavors of recurrent network, each a ready configuration: task, graph, training, measure.

=================  =====================================  ============================================
flavor             task                                   measure
=================  =====================================  ============================================
many-to-one        the adding problem (Hochreiter &       mean squared error of the one answer, on
                   Schmidhuber): a sequence of (value,    held-out sequences of varying lengths
                   marker) pairs, answer the sum of the
                   two marked values
many-to-many       echo: repeat the input symbol seen     per-step accuracy on a held-out stream
(aligned)          ``delay`` steps ago, over endless
                   streams trained by truncated BPTT
one-to-many        a digit → its English name, letter     names generated exactly, the output fed
                   by letter                              back as the next input
encoder–decoder    reverse a string of digits (lengths    exact-match rate of greedy decoding on
                   vary)                                  held-out strings
=================  =====================================  ============================================

Each flavor is a configuration dataclass (every field commented) and a
function ``run_<flavor>(config, log=print) -> FlavorResult``: it builds the
graph, trains with :class:`~unrolled.train.trainer.Trainer` until the held-out
measure reaches ``config.target`` (checked every ``eval_every`` updates) or
``config.updates`` runs out, and reports what it reached. The models are
deliberately tiny so that each one learns in seconds even on the reference
engine. ``examples/`` has one runnable script per flavor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from unrolled.engines.registry import make_engine
from unrolled.graph.folded import Graph
from unrolled.train.optim import make_optimizer
from unrolled.train.trainer import Trainer
from unrolled.train.variable_length import freeze_after_end, keep_feed, last_step_mask, length_mask, pad
from unrolled.words import count

from . import cells
from .seq2seq import Seq2Seq, generate


@dataclass
class FlavorResult:
    """What a flavor's training reached."""

    flavor: str
    metric: str  # what ``value`` measures
    value: float  # the held-out figure reached
    target: float  # the bar set in the configuration
    higher_is_better: bool
    updates: int  # updates made
    seconds: float  # wall-clock time of the whole run
    params: dict | None = None  # the trained parameters

    @property
    def passed(self) -> bool:
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    def __str__(self) -> str:
        verdict = "reached" if self.passed else "missed"
        cmp = ">=" if self.higher_is_better else "<="
        return (f"{self.flavor}: {self.metric} {self.value:.4g} ({verdict} {cmp} {self.target:g}) "
                f"after {count(self.updates, 'update')} in {self.seconds:.1f} s")


def _loop(trainer: Trainer, batch: Callable[[], tuple], measure: Callable[[], float], *, updates: int,
          eval_every: int, target: float, higher_is_better: bool, log, name: str) -> tuple[float, int]:
    """Train until ``measure()`` reaches ``target`` or ``updates`` run out; return (last measure, updates)."""
    value = measure()
    done = 0
    while done < updates:
        stats = trainer.train_step(*batch())
        done += 1
        if done % eval_every == 0 or done == updates:
            value = measure()
            if log:
                log(f"{name}: update {done:5d}  loss {stats.loss:.4f}  |g| {stats.grad_norm:.3f}  held-out {value:.4f}")
            if (value >= target) if higher_is_better else (value <= target):
                break
    return value, done


def _readout(g: Graph, h, n_out: int, name: str = "y"):
    V = g.param("out.W", (n_out, h.size), init="xavier")
    c = g.param("out.b", (n_out,), init="zeros")
    return g.output(g.linear(V, h, c, name=name))


def _trainer(engine, params, cfg, **kw) -> Trainer:
    opt = make_optimizer(cfg.optimizer, cfg.lr)
    return Trainer(engine, params, opt, clip_norm=cfg.clip_norm, seed=cfg.seed, **kw)


# --------------------------------------------------------------------------------------- many-to-one


@dataclass
class ManyToOneConfig:
    min_len: int = 20  # shortest sequence
    max_len: int = 50  # longest sequence; a batch is padded to its longest row
    cell: str = "gru"  # elman, jordan, lstm or gru
    hidden: int = 16  # state size
    batch: int = 64  # sequences per update
    updates: int = 3000  # most updates
    optimizer: str = "adam"
    lr: float = 0.01
    clip_norm: float | None = 1.0  # global-norm clipping (None: off)
    eval_every: int = 50  # updates between held-out measurements
    held_out: int = 500  # held-out sequences
    target: float = 0.005  # held-out mean squared error to reach (always answering 1 scores ~0.17)
    seed: int = 0
    engine: str | None = None  # None: the default engine


def adding_problem(rng: np.random.Generator, n: int, min_len: int, max_len: int):
    """``n`` adding-problem sequences: inputs ``[T, n, 2]`` (value, marker), sums ``[n]``, lengths ``[n]``.

    Values are uniform in [0, 1]; exactly two steps are marked, one in each
    half of the row; the answer is the sum of the two marked values.
    """
    lengths = rng.integers(min_len, max_len + 1, n)
    T = int(lengths.max())
    x = np.zeros((T, n, 2))
    x[:, :, 0] = rng.random((T, n))
    for b, L in enumerate(lengths):
        first = rng.integers(0, L // 2)
        second = rng.integers(L // 2, L)
        x[[first, second], b, 1] = 1.0
    x[np.arange(T)[:, None] >= lengths[None, :]] = 0.0  # padding
    sums = (x[:, :, 0] * x[:, :, 1]).sum(axis=0)
    return x, sums, lengths


def many_to_one_graph(cfg: ManyToOneConfig) -> Graph:
    """x_t = (value, marker) → cell → y_t = V·h_t + c; an MSE loss, masked to each row's last step."""
    g = Graph("adding")
    h = cells.layer(g, cfg.cell, g.input("x", 2), cfg.hidden)
    y = _readout(g, h, 1)
    g.loss("mse", y, g.input("target", 1), name="mse")
    return g


def run_many_to_one(cfg: ManyToOneConfig | None = None, log=print) -> FlavorResult:
    """Train the adding problem; the answer is read at each row's own last step."""
    cfg = cfg or ManyToOneConfig()
    start = time.perf_counter()
    g = many_to_one_graph(cfg)
    engine = make_engine(g, cfg.engine)
    rng = np.random.default_rng(cfg.seed)
    params = g.init_params(rng)
    trainer = _trainer(engine, params, cfg)
    vx, vsum, vlen = adding_problem(np.random.default_rng(cfg.seed + 1), cfg.held_out, cfg.min_len, cfg.max_len)

    def feed(x, sums, lengths):
        T = x.shape[0]
        target = np.broadcast_to(sums[None, :, None], (T, len(sums), 1))
        return {"x": x, "target": target}, {"mse": last_step_mask(lengths, T)}

    def batch():
        return feed(*adding_problem(rng, cfg.batch, cfg.min_len, cfg.max_len))

    def measure():
        r = trainer.evaluate(*feed(vx, vsum, vlen))
        answers = r.outputs["y"][vlen - 1, np.arange(len(vlen)), 0]
        return float(np.mean((answers - vsum) ** 2))

    value, done = _loop(trainer, batch, measure, updates=cfg.updates, eval_every=cfg.eval_every,
                        target=cfg.target, higher_is_better=False, log=log, name="many-to-one")
    return FlavorResult("many-to-one (adding problem)", "held-out MSE", value, cfg.target, False, done,
                        time.perf_counter() - start, params)


# ------------------------------------------------------------------------------ many-to-many aligned


@dataclass
class EchoConfig:
    symbols: int = 8  # alphabet size
    delay: int = 6  # the answer at step t is the input at step t - delay
    cell: str = "elman"
    hidden: int = 64
    streams: int = 32  # parallel streams (the batch)
    k1: int = 4  # truncated BPTT: update every k1 steps ...
    k2: int = 10  # ... back-propagating k2 steps (k1 <= k2; k2 > delay, or no gradient links answer and input)
    updates: int = 3000
    optimizer: str = "adam"
    lr: float = 0.01
    clip_norm: float | None = 1.0
    eval_every: int = 50
    held_out: int = 200  # steps of the held-out streams
    target: float = 0.99  # per-step accuracy to reach on the held-out streams (chance: 1 / symbols)
    seed: int = 0
    engine: str | None = None


def echo_graph(cfg: EchoConfig) -> Graph:
    """x_t (a symbol, one-hot) → cell → logits_t; cross-entropy against the symbol ``delay`` steps back."""
    g = Graph("echo")
    x = g.one_hot(g.index_input("x", cfg.symbols), name="x1h")
    h = cells.layer(g, cfg.cell, x, cfg.hidden)
    y = _readout(g, h, cfg.symbols, "logits")
    g.loss("cross_entropy", y, g.index_input("target", cfg.symbols), name="xent")
    return g


def echo_stream(rng, steps: int, streams: int, symbols: int, delay: int, start: np.ndarray | None = None):
    """Symbols ``[steps, streams]`` and their echo targets; ``start`` is the stream's previous ``delay`` symbols."""
    x = rng.integers(0, symbols, (steps, streams))
    before = np.zeros((delay, streams), dtype=np.int64) if start is None else start
    full = np.concatenate([before, x])
    return x, full[:steps], full[-delay:]


def run_many_to_many(cfg: EchoConfig | None = None, log=print) -> FlavorResult:
    """Echo over endless streams with truncated BPTT(k2; k1), the state carried from chunk to chunk."""
    cfg = cfg or EchoConfig()
    start = time.perf_counter()
    g = echo_graph(cfg)
    engine = make_engine(g, cfg.engine)
    rng = np.random.default_rng(cfg.seed)
    params = g.init_params(rng)
    trainer = _trainer(engine, params, cfg, k1=cfg.k1, k2=cfg.k2)
    tail = None
    first = [True]

    def batch():
        nonlocal tail
        x, y, tail = echo_stream(rng, cfg.k1, cfg.streams, cfg.symbols, cfg.delay, tail)
        mask = np.ones(x.shape)
        if first[0]:
            mask[: cfg.delay] = 0.0  # the stream's first steps have nothing to echo
            first[0] = False
        return {"x": x, "target": y}, {"xent": mask}

    vx, vy, _ = echo_stream(np.random.default_rng(cfg.seed + 1), cfg.held_out, cfg.streams, cfg.symbols, cfg.delay)

    def measure():
        r = trainer.evaluate({"x": vx, "target": vy})
        hit = r.outputs["logits"].argmax(axis=-1) == vy
        return float(hit[cfg.delay :].mean())

    value, done = _loop(trainer, batch, measure, updates=cfg.updates, eval_every=cfg.eval_every,
                        target=cfg.target, higher_is_better=True, log=log, name="many-to-many")
    return FlavorResult(f"many-to-many (echo, delay {cfg.delay})", "held-out per-step accuracy", value, cfg.target,
                        True, done, time.perf_counter() - start, params)


# -------------------------------------------------------------------------------------- one-to-many

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass
class OneToManyConfig:
    cell: str = "gru"
    hidden: int = 32
    updates: int = 1000
    optimizer: str = "adam"
    lr: float = 0.02
    clip_norm: float | None = 1.0
    eval_every: int = 25
    target: float = 1.0  # fraction of the ten names generated exactly
    seed: int = 0
    engine: str | None = None


class Spelling:
    """The letters of the digit names plus one boundary mark ``.``: before the first letter and after the last."""

    def __init__(self, names=DIGIT_NAMES):
        self.names = tuple(names)
        self.alphabet = "." + "".join(sorted(set("".join(self.names))))
        self.index = {c: i for i, c in enumerate(self.alphabet)}

    def encode(self, word: str) -> list[int]:
        return [self.index[c] for c in word]

    def decode(self, ids) -> str:
        return "".join(self.alphabet[i] for i in ids)


def one_to_many_graph(cfg: OneToManyConfig, spelling: Spelling) -> Graph:
    """[one_hot(digit) ; one_hot(previous letter)] → cell → logits over letters; cross-entropy on the next letter.

    The digit is the fixed input, given at every step; the previous letter
    is the true one in training (teacher forcing) and the model's own
    prediction in generation.
    """
    g = Graph("spell")
    d = g.one_hot(g.index_input("digit", len(spelling.names)), name="digit1h")
    prev = g.one_hot(g.index_input("prev", len(spelling.alphabet)), name="prev1h")
    h = cells.layer(g, cfg.cell, g.concat(d, prev, name="x"), cfg.hidden)
    y = _readout(g, h, len(spelling.alphabet), "logits")
    g.loss("cross_entropy", y, g.index_input("next", len(spelling.alphabet)), name="xent")
    return g


def run_one_to_many(cfg: OneToManyConfig | None = None, log=print) -> FlavorResult:
    """Teach the ten digit names; measure by generating each name with the output fed back."""
    cfg = cfg or OneToManyConfig()
    start = time.perf_counter()
    sp = Spelling()
    g = one_to_many_graph(cfg, sp)
    engine = make_engine(g, cfg.engine)
    params = g.init_params(np.random.default_rng(cfg.seed))
    trainer = _trainer(engine, params, cfg)
    words = [sp.encode(w + ".") for w in sp.names]  # targets end with the boundary mark
    nxt, lengths = pad([np.array(w) for w in words])
    prev, _ = pad([np.array(sp.encode(".") + w[:-1]) for w in words])
    T, B = nxt.shape
    digits = np.broadcast_to(np.arange(B)[None, :], (T, B))
    feeds = ({"digit": digits, "prev": prev, "next": nxt}, {"xent": length_mask(lengths, T)})

    def measure():
        gen = generate(engine, params, {"digit": np.broadcast_to(np.arange(B), (T + 2, B))},
                       feedback={"prev": "logits"}, start={"prev": sp.index["."]}, steps=T + 2, end=sp.index["."])
        out = [sp.decode(gen.predictions["logits"][: gen.lengths[b] - 1, b]) for b in range(B)]
        return float(np.mean([o == w for o, w in zip(out, sp.names)]))

    value, done = _loop(trainer, lambda: feeds, measure, updates=cfg.updates, eval_every=cfg.eval_every,
                        target=cfg.target, higher_is_better=True, log=log, name="one-to-many")
    return FlavorResult("one-to-many (spell a digit's name)", "names generated exactly", value, cfg.target, True,
                        done, time.perf_counter() - start, params)


def spell(params, digit: int, cfg: OneToManyConfig | None = None) -> str:
    """Generate the name of ``digit`` with trained parameters (greedy, output fed back)."""
    cfg = cfg or OneToManyConfig()
    sp = Spelling()
    g = one_to_many_graph(cfg, sp)
    steps = max(map(len, sp.names)) + 2
    gen = generate(make_engine(g, cfg.engine), params, {"digit": np.full((steps, 1), digit)},
                   feedback={"prev": "logits"}, start={"prev": sp.index["."]}, steps=steps, end=sp.index["."])
    return sp.decode(gen.predictions["logits"][: gen.lengths[0] - 1, 0])


# ---------------------------------------------------------------------------------- encoder–decoder


@dataclass
class Seq2SeqConfig:
    task: str = "reverse"  # reverse or sort the digits
    min_len: int = 3  # shortest string
    max_len: int = 5  # longest string
    digits: int = 10  # alphabet 0 … digits-1
    cell: str = "gru"
    hidden: int = 64
    batch: int = 128
    updates: int = 3000
    optimizer: str = "adam"
    lr: float = 0.01
    clip_norm: float | None = 1.0
    sampling: float = 0.0  # scheduled sampling: chance of feeding the model's own previous prediction
    eval_every: int = 100
    held_out: int = 500  # strings never seen in training
    target: float = 0.99  # exact-match rate to reach on them
    seed: int = 0
    engine: str | None = None


def seq2seq_graphs(cfg: Seq2SeqConfig) -> tuple[Graph, Graph]:
    """Encoder: digits (one-hot) → cell, frozen after each string's end. Decoder: previous output → cell → logits.

    The decoder's symbols are the digits plus ``digits`` itself, the
    boundary mark (start of decoding, and end of the answer). The decoder
    state starts from the encoder's final state (same name ``h``).
    """
    enc = Graph("encoder")
    x = enc.one_hot(enc.index_input("src", cfg.digits), name="src1h")
    cells.layer(enc, cfg.cell, x, cfg.hidden, prefix="enc.")
    enc = freeze_after_end(enc)
    dec = Graph("decoder")
    V = cfg.digits + 1
    y_prev = dec.one_hot(dec.index_input("prev", V), name="prev1h")
    h = cells.layer(dec, cfg.cell, y_prev, cfg.hidden, prefix="dec.")
    y = _readout(dec, h, V, "logits")
    dec.loss("cross_entropy", y, dec.index_input("next", V), name="xent")
    return enc, dec


def seq2seq_model(cfg: Seq2SeqConfig) -> Seq2Seq:
    """The encoder–decoder of :func:`seq2seq_graphs`, each decoder state bridged from its encoder namesake."""
    enc, dec = seq2seq_graphs(cfg)
    bridge = {d: "enc." + d[len("dec."):] for d in dec.delayed()}  # dec.h <- enc.h (and dec.c <- enc.c)
    return Seq2Seq(enc, dec, bridge=bridge, feedback={"prev": "logits"}, sampling=cfg.sampling, seed=cfg.seed,
                   engine=cfg.engine)


def _answer(task: str, s: np.ndarray) -> np.ndarray:
    return s[::-1] if task == "reverse" else np.sort(s)


def run_seq2seq(cfg: Seq2SeqConfig | None = None, log=print) -> FlavorResult:
    """Train the encoder–decoder with teacher forcing (optionally scheduled sampling); measure exact matches."""
    cfg = cfg or Seq2SeqConfig()
    if cfg.task not in ("reverse", "sort"):
        raise ValueError(f"seq2seq task '{cfg.task}'; use 'reverse' or 'sort'")
    start = time.perf_counter()
    model = seq2seq_model(cfg)
    enc, dec = model.graphs
    rng = np.random.default_rng(cfg.seed)
    params = {**enc.init_params(rng), **dec.init_params(rng)}
    trainer = _trainer(model, params, cfg)
    END = cfg.digits

    def strings(r, n):
        lengths = r.integers(cfg.min_len, cfg.max_len + 1, n)
        return [r.integers(0, cfg.digits, L) for L in lengths]

    held = strings(np.random.default_rng(cfg.seed + 1), cfg.held_out)
    held_keys = {s.tobytes() for s in held}

    def feed(batch):
        src, lengths = pad(batch)
        ans = [np.append(_answer(cfg.task, s), END) for s in batch]
        nxt, out_len = pad(ans)
        prev, _ = pad([np.insert(a[:-1], 0, END) for a in ans])
        return ({"src": src, "keep": keep_feed(enc, lengths), "prev": prev, "next": nxt},
                {"xent": length_mask(out_len, nxt.shape[0])})

    def batch():
        out = []
        while len(out) < cfg.batch:
            out.extend(s for s in strings(rng, cfg.batch) if s.tobytes() not in held_keys)
        return feed(out[: cfg.batch])

    def measure():
        src, lengths = pad(held)
        gen = model.generate(params, {"src": src, "keep": keep_feed(enc, lengths)}, start={"prev": END},
                             steps=cfg.max_len + 1, end=END)
        preds = gen.predictions["logits"]
        hits = [gen.lengths[b] == len(s) + 1 and np.array_equal(preds[: len(s), b], _answer(cfg.task, s))
                for b, s in enumerate(held)]
        return float(np.mean(hits))

    value, done = _loop(trainer, batch, measure, updates=cfg.updates, eval_every=cfg.eval_every,
                        target=cfg.target, higher_is_better=True, log=log, name="encoder-decoder")
    return FlavorResult(f"encoder-decoder ({cfg.task} digits)", "held-out exact match", value, cfg.target, True,
                        done, time.perf_counter() - start, params)


FLAVORS = {
    "many-to-one": (ManyToOneConfig, run_many_to_one),
    "many-to-many": (EchoConfig, run_many_to_many),
    "one-to-many": (OneToManyConfig, run_one_to_many),
    "encoder-decoder": (Seq2SeqConfig, run_seq2seq),
}
