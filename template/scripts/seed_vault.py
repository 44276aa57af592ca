"""Put the worker host's URL and auth secret into Supabase Vault, where the keep-alive reads them.

    python scripts/seed_vault.py [--url URL] [--db-url URL]

Reads supabase/functions/.env when it runs (EDGE_WORKER_URL, EDGE_WORKER_AUTH_SECRET,
EDGE_WORKER_DB_URL; the environment wins), so no file holds the secret but that git-ignored
.env. Run it after `supabase start` and after every `supabase db reset` (a reset empties
Vault); against a hosted project pass --db-url (or set EDGE_WORKER_DB_URL) and --url.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from dotenv import load_dotenv

from worker_runtime import db
from worker_runtime.keepalive import set_vault_secret

ENV_FILE = Path(__file__).resolve().parent.parent / "supabase" / "functions" / ".env"


def fail(sentence: str) -> int:
    print(f"seed_vault: {sentence}", file=sys.stderr)
    return 1


async def seed(db_url: str, url: str, secret: str) -> None:
    conn = await db.connect(db_url)
    try:
        async with conn.transaction():
            await set_vault_secret(conn, "edge_worker_url", url.rstrip("/"), "Base URL of the worker function host")
            await set_vault_secret(conn, "edge_worker_auth_secret", secret, "Bearer secret for the worker function host")
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Store the worker URL and auth secret in Vault.")
    parser.add_argument("--url", help="base URL of the worker host (default: EDGE_WORKER_URL)")
    parser.add_argument("--db-url", help="database URL (default: EDGE_WORKER_DB_URL)")
    args = parser.parse_args(argv)
    load_dotenv(ENV_FILE, override=False)
    db_url = args.db_url or os.environ.get("EDGE_WORKER_DB_URL")
    url = args.url or os.environ.get("EDGE_WORKER_URL")
    secret = os.environ.get("EDGE_WORKER_AUTH_SECRET")
    if not db_url:
        return fail(f"no database URL: set EDGE_WORKER_DB_URL in {ENV_FILE} or pass --db-url.")
    if not url:
        return fail(f"no worker URL: set EDGE_WORKER_URL in {ENV_FILE} or pass --url.")
    if not secret:
        return fail(f"no auth secret: set EDGE_WORKER_AUTH_SECRET in {ENV_FILE} (the host checks starts against it).")
    try:
        asyncio.run(seed(db_url, url, secret))
    except Exception as exc:  # one sentence; worker_runtime's errors never show the password
        return fail(f"could not store the secrets in Vault: {exc}")
    print(f"Stored edge_worker_url ({url.rstrip('/')}) and edge_worker_auth_secret in Vault.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
