"""Helpers for the Copier template tests: a git copy of the kit to render from, and renders.

Rendering from a committed, tagged temp copy (copier.yml, template/ and the packaged
migration its symlink points at) makes every render see exactly the files under test,
and lets the update test add a second tagged version without touching the checkout.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import copier

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGED_MIGRATION = REPO_ROOT / "worker_runtime" / "sql" / "edge_worker.sql"
KIT_FILES = ["copier.yml", "template", "worker_runtime/sql/edge_worker.sql"]


def git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "-c", "init.defaultBranch=main",
         "-c", "commit.gpgsign=false", "-c", "tag.gpgsign=false", *args],
        cwd=cwd, capture_output=True, text=True, check=check,
    )


def make_kit_repo(dest: Path, tag: str = "v0.1.0") -> Path:
    """A git repo with the kit's template files, committed and tagged."""
    dest.mkdir(parents=True)
    for rel in KIT_FILES:
        src = REPO_ROOT / rel
        if src.is_dir():
            shutil.copytree(src, dest / rel, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "kit")
    git(dest, "tag", tag)
    return dest


def render(kit: Path, dst: Path, vcs_ref: str | None = None, **data: Any) -> Path:
    """`copier copy --trust --defaults --data ...` through Copier's API."""
    copier.run_copy(
        str(kit), str(dst), data=data, defaults=True, unsafe=True, quiet=True, vcs_ref=vcs_ref,
    )
    return dst


def read_env(project: Path) -> dict[str, str]:
    values = {}
    for line in (project / "supabase" / "functions" / ".env").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (but .git) by relative path."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".git" not in p.relative_to(root).parts and "__pycache__" not in p.parts
    }
