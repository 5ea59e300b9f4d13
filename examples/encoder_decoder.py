"""Encoder-decoder: a string of digits in, the same digits reversed (or sorted) out.

The encoder reads the digits (strings of different lengths in one batch, its
state frozen after each string's end); the decoder starts from the encoder's
final state and writes the answer, BPTT running back through both. Teacher
forcing, optionally with scheduled sampling::

    python examples/encoder_decoder.py
    python examples/encoder_decoder.py --task sort --sampling 0.25
"""

import sys

import numpy as np
from _common import parse

from unrolled.models.flavors import Seq2SeqConfig, run_seq2seq, seq2seq_model
from unrolled.train.variable_length import keep_feed, pad


def main(argv=None) -> int:
    cfg = parse(Seq2SeqConfig, __doc__.splitlines()[0], argv)
    result = run_seq2seq(cfg)
    print(result)
    model = seq2seq_model(cfg)
    enc = model.encoder.graph
    rng = np.random.default_rng(123)
    strings = [rng.integers(0, cfg.digits, n) for n in rng.integers(cfg.min_len, cfg.max_len + 1, 5)]
    src, lengths = pad(strings)
    gen = model.generate(result.params, {"src": src, "keep": keep_feed(enc, lengths)}, start={"prev": cfg.digits},
                         steps=cfg.max_len + 1, end=cfg.digits)
    for b, s in enumerate(strings):
        out = gen.predictions["logits"][: gen.lengths[b] - 1, b]
        print(f"  {''.join(map(str, s)):>{cfg.max_len}} -> {''.join(map(str, out))}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
