"""Deploy a worker function: `python scripts/deploy.py <worker-name>` (see workers/README.md)."""

from worker_runtime.deploy import main

raise SystemExit(main())
