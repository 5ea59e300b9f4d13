"""``python -m unrolled`` is the ``unrolled`` command."""

import sys

from unrolled.launch import main

sys.exit(main())
