"""``python -m unrolled`` is the ``unrolled`` command."""

import sys

from unrolled.cli import main

sys.exit(main())
