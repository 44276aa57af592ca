"""The version of a worker function: a content hash of its folder.

The deploy script records it in `edge_worker.functions.version` and waits for a worker of
that version; the function host computes the same hash when it loads `workers/<name>/`
and starts workers with it (`WorkerConfig.version`), so both sides agree on what "the new
version" is without a build step, a git tag or a shared file. The host also compares the
hash on every start request and reloads a function whose folder changed, so a deploy to
a running host serves the new code.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

VERSION_LENGTH = 12  # hex digits: like a short git hash

# Written by Python, pytest and editors, never part of what a worker function is.
_SKIPPED_DIRS = {"__pycache__"}
_SKIPPED_SUFFIXES = (".pyc", ".pyo")


def _files(folder: Path) -> list[Path]:
    found: list[Path] = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith("."))
        found += [Path(root) / f for f in files if not f.startswith(".") and not f.endswith(_SKIPPED_SUFFIXES)]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def folder_version(folder: str | os.PathLike[str]) -> str:
    """sha256 over the sorted relative paths and bytes of the folder's files, first 12 hex.

    Hidden files and folders, `__pycache__` and compiled files are left out, so importing
    the module or running its tests does not change the version.
    """
    root = Path(folder)
    digest = hashlib.sha256()
    for path in _files(root):
        data = path.read_bytes()
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(str(len(data)).encode())
        digest.update(b"\0")
        digest.update(data)
    return digest.hexdigest()[:VERSION_LENGTH]


def worker_version(content_hash: str, declared: str | None = None) -> str:
    """The version workers run with: the content hash, after a `version=` the module declared.

    `EdgeWorker.start(handler, version="1.4.0")` gives "1.4.0+<hash>": the label a user
    chose stays readable, and a code change without a new label is still a new version.
    """
    return f"{declared}+{content_hash}" if declared else content_hash
