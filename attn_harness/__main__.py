"""``python -m attn_harness``: the ``attn-harness`` command line."""

import sys

from attn_harness.cli import main

sys.exit(main())
