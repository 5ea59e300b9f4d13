"""``python -m unrolled`` is the ``unrolled`` command."""

import sys

from .cli import main

sys.exit(main())
