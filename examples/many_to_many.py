"""Many-to-many, aligned: echo the symbol seen `delay` steps ago, one answer per step, over endless streams.

Trained by truncated BPTT(k2; k1): every k1 steps, back-propagate k2 steps,
the state carried (without gradient) from chunk to chunk::

    python examples/many_to_many.py
    python examples/many_to_many.py --delay 8 --k1 5 --k2 12
"""

import sys

from _common import parse

from unrolled.models.flavors import EchoConfig, run_many_to_many


def main(argv=None) -> int:
    cfg = parse(EchoConfig, __doc__.splitlines()[0], argv)
    result = run_many_to_many(cfg)
    print(result)
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
