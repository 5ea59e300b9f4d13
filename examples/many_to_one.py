"""Many-to-one: the adding problem. A sequence of (value, marker) pairs in, the sum of the two marked values out.

Sequences in a batch have different lengths; the answer is read (and the
loss taken) at each row's own last step::

    python examples/many_to_one.py                 # GRU, lengths 20-50
    python examples/many_to_one.py --cell lstm --max-len 80 --updates 5000
"""

import sys

import numpy as np
from _common import parse

from unrolled.engines.registry import make_engine
from unrolled.models.flavors import ManyToOneConfig, adding_problem, many_to_one_graph, run_many_to_one


def main(argv=None) -> int:
    cfg = parse(ManyToOneConfig, __doc__.splitlines()[0], argv)
    result = run_many_to_one(cfg)
    print(result)
    x, sums, lengths = adding_problem(np.random.default_rng(99), 3, cfg.min_len, cfg.max_len)
    r = make_engine(many_to_one_graph(cfg), cfg.engine).run(result.params, {"x": x, "target": np.zeros(x.shape[:2] + (1,))},
                                                          backward=False)
    for b in range(3):
        answer = r.outputs["y"][lengths[b] - 1, b, 0]
        print(f"  length {lengths[b]:2d}: marked sum {sums[b]:.3f}, answer {answer:.3f}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
