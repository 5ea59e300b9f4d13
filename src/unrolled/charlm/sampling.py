"""Generating text from a character-level language model, one character at a time.

Each draw takes the logits ``z`` after the last character read and picks the
next character from ``softmax(z / temperature)``, restricted to the
``top_k`` likeliest when asked; the pick is fed back as the next input. A
low temperature sharpens the distribution (safer, repetitive text; 0 always
takes the likeliest character), a high one flattens it (more surprising
text, more mistakes); 1 samples the model as trained. A prime text is read
first, so that the state is warm before the first draw.

Two paths compute the same text:

* the default, :class:`unrolled.engines.compiled.feedback.Generator`: one step of the model
  as straight code over small buffers (compiled with Numba when installed),
  with the sampling inside the loop;
* an engine (``engine="reference"`` or ``"compiled"``): the folded graph run
  forward only (``backward=False``) over a chunk of one step, its final
  states passed back in as the next step's ``init_states``.

Both draw their uniform numbers the same way from
``numpy.random.default_rng(seed)`` and pick with the same arithmetic
(:func:`unrolled.engines.compiled.kernels.sampling.sample_rows_numpy`), so one seed gives one
text whichever path runs it (up to float rounding between engines).
Text comes in blocks of :data:`BLOCK` characters, so that a long sample
streams; the block size is fixed, so it does not change the text.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from unrolled.engines.compiled.feedback import Generator
from unrolled.engines.compiled.kernels.sampling import sample_rows_numpy
from unrolled.engines.registry import make_engine
from unrolled.graph.folded import Graph
from unrolled.words import count

from .model import INPUT_NAME, LOGITS_NAME, TARGET_NAME, LoadedModel

START_CHAR = "\n"  # fed first when there is no prime text (a fresh line), if the vocabulary has it
BLOCK = 1000  # characters generated per call: a long sample streams in blocks of this size


class Sampler:
    """Draws text from a language-model graph (built with ``train=False``) and its parameters.

    ``engine=None`` uses the generator (fast); an engine name steps that engine instead.
    """

    def __init__(self, graph: Graph, params: dict[str, np.ndarray], vocabulary, *, engine: str | None = None):
        self.graph = graph
        self.params = params
        self.chars = list(vocabulary)
        self.index = {c: i for i, c in enumerate(self.chars)}
        if engine is None:
            self.generator, self.engine = Generator(graph, INPUT_NAME, LOGITS_NAME), None
        else:
            self.generator, self.engine = None, make_engine(graph, engine)

    @classmethod
    def from_model(cls, model: LoadedModel, *, engine: str | None = None) -> "Sampler":
        return cls(model.graph, model.params, model.vocabulary, engine=engine)

    def encode_prime(self, prime: str) -> list[int]:
        """The ids of ``prime``; a character the model does not know is an error naming it."""
        ids = []
        for i, ch in enumerate(prime):
            k = self.index.get(ch)
            if k is None:
                raise ValueError(
                    f"--prime character {ch!r} (U+{ord(ch):04X}) at position {i + 1} is not in the model's "
                    f"vocabulary of {count(len(self.chars), 'character')} ({_summary(self.chars)}); "
                    f"remove it from the prime text"
                )
            ids.append(k)
        return ids

    def generate(self, length: int, *, temperature: float = 1.0, top_k: int = 0, prime: str = "",
                 seed=0) -> Iterator[str]:
        """Yield ``length`` generated characters (the prime text itself is not repeated).

        The arguments and the prime text are checked at once, before the first character.
        """
        if not isinstance(length, (int, np.integer)) or length < 0:
            raise ValueError(f"length {length!r}; it must be a whole number of characters, 0 or more")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature {temperature}; it must be 0 (always the likeliest character) or positive")
        if not isinstance(top_k, (int, np.integer)) or top_k < 0:
            raise ValueError(f"top-k {top_k!r}; it must be a whole number, 0 meaning every character")
        ids = self.encode_prime(prime) or [self.index.get(START_CHAR, 0)]
        if temperature == 0:  # the likeliest character: the top one, at any temperature
            temperature, top_k = 1.0, 1
        top_k = min(int(top_k), len(self.chars))
        return self._blocks(ids, int(length), float(temperature), top_k, np.random.default_rng(seed))

    def sample(self, length: int, **kw) -> str:
        """The generated text as one string (see :meth:`generate`)."""
        return "".join(self.generate(length, **kw))

    def _blocks(self, prime: list[int], length: int, temperature: float, top_k: int, rng) -> Iterator[str]:
        step = self._generator_block if self.generator is not None else self._engine_block
        state = None  # the state before reading prime
        while length > 0:
            n = min(BLOCK, length)
            tokens, state = step(prime, n, temperature, top_k, rng, state)
            yield from (self.chars[k] for k in tokens)
            prime, length = [int(tokens[-1])], length - n

    # Each block: read ``prime`` from ``state``, draw ``n`` tokens, and return them with the
    # state *before* the last one is read (the next block's prime), so that blocks join exactly.

    def _generator_block(self, prime, n, temperature, top_k, rng, state):
        tokens, _ = self.generator.run(self.params, length=n, prime=np.array(prime)[:, None], rng=rng,
                                       temperature=temperature, top_k=top_k or None, init_states=state)
        tokens = tokens[:, 0]
        # The generator's final state has read the last token too; read up to the one before it instead.
        before = np.concatenate([prime, tokens[:-1]])[:, None]
        _, state = self.generator.run(self.params, length=0, prime=before, rng=np.random.default_rng(0),
                                      init_states=state)
        return tokens, state

    def _engine_block(self, prime, n, temperature, top_k, rng, state):
        U = rng.random((len(prime) + n, 1))  # as the generator draws them: one per step, the first P-1 unused
        probs = np.empty((1, len(self.chars)))
        tok = np.zeros(1, dtype=np.int64)
        tokens = np.zeros(n, dtype=np.int64)
        logits, state = self._advance(prime, state)
        for k in range(n):
            sample_rows_numpy(logits[None, :], temperature, top_k, U[len(prime) - 1 + k], probs, tok)
            tokens[k] = tok[0]
            if k < n - 1:
                logits, state = self._advance([tok[0]], state)
        return tokens, state

    def _advance(self, ids, state) -> tuple[np.ndarray, dict]:
        """Feed ``ids`` (one stream) to the engine; return the logits after the last and the state to carry."""
        x = np.asarray(ids, dtype=np.int64)[:, None]  # [T, 1]
        kw = {"init_states": state} if state is not None else {}
        with np.errstate(under="ignore"):
            r = self.engine.run(self.params, {INPUT_NAME: x, TARGET_NAME: np.zeros_like(x)}, backward=False,
                                check_finite=state is None, **kw)  # a carried state is the engine's own
        logits = np.array(r.outputs[LOGITS_NAME][-1, 0], dtype=np.float64)  # [V], copied out of engine buffers
        return logits, {k: np.array(v, copy=True) for k, v in r.final_states.items()}


def _summary(chars: list[str], limit: int = 40) -> str:
    shown = "".join(c for c in chars if c.isprintable() and c != " ")[:limit]
    more = "…" if len(chars) > limit else ""
    return f"e.g. {shown!r}{more}"
