"""`python -m worker_runtime ...`: the same as the `worker-runtime` command."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
