"""Find and run the pinned Supabase CLI (npm `supabase@2.117.0`) for tests.

Looked up in this order: the SUPABASE_BIN environment variable, the copy that
scripts/test.sh installs into `.tools/` of the checkout, then PATH. A missing CLI is a
test failure that says how to install it, never a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

PINNED_VERSION = "2.117.0"
REPO_ROOT = Path(__file__).resolve().parent.parent
TOOLS_BIN = REPO_ROOT / ".tools" / "node_modules" / ".bin" / "supabase"
INSTALL_HINT = f"install it with scripts/test.sh or npm i -E supabase@{PINNED_VERSION}"


class SupabaseCliMissing(RuntimeError):
    """The Supabase CLI is not installed where the tests look for it."""


def find_supabase() -> str:
    """Path of the Supabase CLI: $SUPABASE_BIN, else .tools/, else PATH."""
    env_bin = os.environ.get("SUPABASE_BIN")
    if env_bin:
        if not Path(env_bin).exists():
            raise SupabaseCliMissing(f"SUPABASE_BIN={env_bin} does not exist: {INSTALL_HINT}.")
        return env_bin
    if TOOLS_BIN.exists():
        return str(TOOLS_BIN)
    on_path = shutil.which("supabase")
    if on_path:
        return on_path
    raise SupabaseCliMissing(f"The Supabase CLI was not found: {INSTALL_HINT}.")


def cli_env(home: Path) -> dict[str, str]:
    """Environment for the CLI: no telemetry, no update checks, a throwaway HOME.

    There is no network here beyond package registries, so nothing may phone home.
    """
    env = dict(os.environ)
    env.update(
        HOME=str(home),
        SUPABASE_TELEMETRY_DISABLED="1",
        DO_NOT_TRACK="1",
        SUPABASE_NO_UPDATE_NOTIFIER="1",
        SUPABASE_NO_KEYRING="1",
        NO_COLOR="1",
        CI="1",
    )
    return env


def run_supabase(
    args: Sequence[str], *, cwd: Path, home: Path, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """Run the CLI and return the finished process (the caller checks returncode)."""
    return subprocess.run(
        [find_supabase(), *args],
        cwd=cwd,
        env=cli_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def cli_version(home: Path) -> str:
    out = run_supabase(["--version"], cwd=home, home=home, timeout=60)
    return out.stdout.strip()
