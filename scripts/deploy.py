"""Deploy a worker function: `python scripts/deploy.py WORKER_NAME` from a project root.

A thin entry point; everything is in worker_runtime/deploy.py (also `python -m
worker_runtime.deploy`). Generated projects get the same file from the template.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from worker_runtime.deploy import main
except ModuleNotFoundError:  # run from a checkout of the kit without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from worker_runtime.deploy import main

raise SystemExit(main())
