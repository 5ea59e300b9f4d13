"""One-to-many: a digit in, its English name out, letter by letter.

Trained with teacher forcing (the true previous letter is the input);
generation feeds each predicted letter back as the next input::

    python examples/one_to_many.py
"""

import sys

from _common import parse

from unrolled.models.flavors import OneToManyConfig, run_one_to_many, spell


def main(argv=None) -> int:
    cfg = parse(OneToManyConfig, __doc__.splitlines()[0], argv)
    result = run_one_to_many(cfg)
    print(result)
    for d in range(10):
        print(f"  {d} -> {spell(result.params, d, cfg)}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
