"""Copier task: the project files that must be merged, not rendered.

Copier renders the worker's own files. This script, run by Copier after it (with the
Python that runs Copier), does what a rendered file cannot do without clobbering what
the user wrote:

* `supabase/config.toml`: written as `supabase init` (CLI 2.117.0) writes it when absent;
  when present only `[db.pooler] enabled`, `pool_mode` and `[edge_runtime] policy` are
  set (tomlkit keeps every other line and comment). Invalid TOML stops the run with the
  file and line before anything is written.
* `supabase/migrations/<ts>_edge_worker.sql` once per project (the packaged migration,
  byte for byte) and `<ts>_<worker>_keepalive.sql` once per worker. Migrations are
  written once and never rewritten: an applied migration must not change.
* `supabase/functions/.env`: EDGE_WORKER_DB_URL, EDGE_WORKER_URL and a new
  EDGE_WORKER_AUTH_SECRET, each only when the file does not set it yet. The DB URL comes
  from a hand-off file Copier rendered (so no secret is on a command line or in Copier's
  output); it is deleted here whatever happens.
* `.gitignore` lines so no secret file can be committed.

Only the standard library and tomlkit; no kit code is needed at generation time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import secrets
import sys
from pathlib import Path

KIT = Path(__file__).resolve().parent
MIGRATION = KIT / "edge_worker.sql"
INIT_CONFIG = KIT / "supabase_init" / "config.toml"
INIT_GITIGNORE = KIT / "supabase_init" / "gitignore"

CONFIG = Path("supabase/config.toml")
MIGRATIONS = Path("supabase/migrations")
ENV_FILE = Path("supabase/functions/.env")
HANDOFF = Path("supabase/functions/.env.copier-pending")
GITIGNORE = Path(".gitignore")

GITIGNORE_MARK = "# supabase-worker-kit: secrets never go into git"
GITIGNORE_LINES = [
    "supabase/functions/.env",
    "supabase/functions/.env.*",
    "!supabase/functions/.env.example",
    ".env",
    ".env.local",
    ".env.*.local",
    "supabase/.temp/",
]
# (table path, key, value) that the worker runtime needs in config.toml.
CONFIG_KEYS = [
    (("db", "pooler"), "enabled", True),
    (("db", "pooler"), "pool_mode", "transaction"),
    (("edge_runtime",), "policy", "per_worker"),
]


class TaskError(Exception):
    """Stops the run with one sentence; nothing has been written when it is raised early."""


def say(message: str) -> None:
    print(f"supabase-worker-kit: {message}", file=sys.stderr)


# -- config.toml -----------------------------------------------------------------------------


def parse_toml(text: str, path: Path):  # -> tomlkit.TOMLDocument
    try:
        import tomlkit
        from tomlkit.exceptions import ParseError
    except ModuleNotFoundError:
        raise TaskError(
            f"tomlkit is not installed in the Python that runs Copier ({sys.executable}): "
            "run 'pip install tomlkit' (or 'pipx inject copier tomlkit') and run Copier again."
        ) from None
    try:
        return tomlkit.parse(text)
    except ParseError as exc:
        reason = str(exc).split(" at line ")[0]
        raise TaskError(
            f"{path}:{exc.line}:{exc.col}: {path} is not valid TOML ({reason} at line {exc.line}, "
            f"column {exc.col}). Fix that line and run Copier again; nothing was changed."
        ) from None


def plan_config(project_name: str) -> tuple[str, str | None]:
    """(new text, old text or None): what config.toml becomes. Raises before any write."""
    if CONFIG.exists():
        old = CONFIG.read_text(encoding="utf-8")
        doc = parse_toml(old, CONFIG)
    else:
        old = None
        doc = parse_toml(INIT_CONFIG.read_text(encoding="utf-8"), INIT_CONFIG)
        doc["project_id"] = project_name  # as `supabase init` does: the folder's name
    for tables, key, value in CONFIG_KEYS:
        table = doc
        for name in tables:
            if name not in table:
                import tomlkit

                table[name] = tomlkit.table()
            table = table[name]
        if table.get(key) != value:
            table[key] = value
    return doc.as_string(), old


# -- migrations ------------------------------------------------------------------------------


def migration_versions() -> list[str]:
    if not MIGRATIONS.is_dir():
        return []
    return sorted(m.group(1) for p in MIGRATIONS.glob("*.sql") if (m := re.match(r"^(\d{14})_", p.name)))


def next_version(after: list[str]) -> str:
    """A `supabase migration new`-style UTC timestamp, later than every existing one."""
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0, tzinfo=None)
    if after:
        last = dt.datetime.strptime(after[-1], "%Y%m%d%H%M%S")
        now = max(now, last + dt.timedelta(seconds=1))
    return now.strftime("%Y%m%d%H%M%S")


def sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def keepalive_sql(worker: str, queue: str, schedule: str) -> str:
    return f"""\
-- Keep-alive for the worker function '{worker}' (supabase-worker-kit).
-- Registers the function, so edge_worker.ensure_workers() starts a worker for it when none
-- is alive, and (re)schedules that check with pg_cron. No secret here: ensure_workers() reads
-- the host URL and the bearer secret from Vault (edge_worker_url, edge_worker_auth_secret).

select edge_worker.register_function({sql_literal(worker)}, {sql_literal(queue)});

-- pg_cron runs only in one database (cron.database_name: `postgres` on Supabase). Enable it
-- where it can be enabled; where it cannot, warn with the fix instead of failing the
-- migration, so the rest of the schema still applies.
do $keepalive$
begin
  if to_regnamespace('cron') is null
     and exists (select 1 from pg_available_extensions where name = 'pg_cron') then
    begin
      create extension if not exists pg_cron;
    exception when others then
      raise warning 'could not enable pg_cron in database %: %', current_database(), sqlerrm;
    end;
  end if;
  if to_regnamespace('cron') is null then
    raise warning 'pg_cron is not enabled in database %, so the worker keep-alive is not scheduled. '
      'Enable pg_cron (Supabase: Dashboard > Integrations > Cron) and run: '
      'select edge_worker.setup_keepalive(%);', current_database(), {sql_literal(sql_literal(schedule))};
  else
    perform edge_worker.setup_keepalive({sql_literal(schedule)});
  end if;
end
$keepalive$;
"""


# -- .env ------------------------------------------------------------------------------------


def env_keys(text: str) -> set[str]:
    keys = set()
    for line in text.splitlines():
        m = re.match(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=", line)
        if m:
            keys.add(m.group(1))
    return keys


def read_handoff() -> dict[str, str]:
    """The values Copier rendered for .env; the file is removed right away."""
    if not HANDOFF.exists():
        return {}
    try:
        text = HANDOFF.read_text(encoding="utf-8")
    finally:
        HANDOFF.unlink()
    values = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def merge_env(handoff: dict[str, str]) -> list[str]:
    """Add what .env lacks; never change a value that is already there. Returns keys added."""
    old = ENV_FILE.read_text(encoding="utf-8") if ENV_FILE.exists() else ""
    present = env_keys(old)
    wanted = dict(handoff)
    wanted["EDGE_WORKER_AUTH_SECRET"] = secrets.token_urlsafe(32)
    added = [key for key in ("EDGE_WORKER_DB_URL", "EDGE_WORKER_URL", "EDGE_WORKER_AUTH_SECRET")
             if key in wanted and key not in present]
    kept = [key for key in ("EDGE_WORKER_DB_URL", "EDGE_WORKER_URL") if key in handoff and key in present]
    if kept:
        say(f"{ENV_FILE} already sets {', '.join(kept)}: kept as it is (edit the file to change it).")
    if not added:
        return []
    lines = [] if not old else [old if old.endswith("\n") else old + "\n"]
    if not old:
        lines.append("# Secrets for the worker functions (supabase-worker-kit). Git-ignored: never commit.\n")
    lines += [f"{key}={wanted[key]}\n" for key in added]
    write_private(ENV_FILE, "".join(lines))
    return added


# -- .gitignore ------------------------------------------------------------------------------


def merge_gitignore() -> bool:
    old = GITIGNORE.read_text(encoding="utf-8") if GITIGNORE.exists() else ""
    have = {line.strip() for line in old.splitlines()}
    missing = [line for line in GITIGNORE_LINES if line not in have]
    if not missing:
        return False
    block = ("" if not old or old.endswith("\n") else "\n") + ("\n" if old else "")
    block += GITIGNORE_MARK + "\n" + "".join(f"{line}\n" for line in missing)
    GITIGNORE.write_text(old + block, encoding="utf-8")
    return True


# -- main ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> None:
    handoff = read_handoff()  # first, so the hand-off never outlives this task
    # Everything that can fail is checked before the first write.
    config_text, config_old = plan_config(Path.cwd().name)
    migration = MIGRATION.read_bytes()
    if not migration.lstrip().startswith(b"--"):
        raise TaskError(f"{MIGRATION} is not the edge_worker migration (a symlink checked out as text?): "
                        "clone the kit with symlinks enabled (git config core.symlinks true).")

    if config_old != config_text:
        CONFIG.parent.mkdir(parents=True, exist_ok=True)
        CONFIG.write_text(config_text, encoding="utf-8")
        say(f"{'updated' if config_old is not None else 'wrote'} {CONFIG} "
            "(pooler in transaction mode, edge_runtime policy per_worker)")
        supabase_gitignore = CONFIG.parent / ".gitignore"
        if config_old is None and not supabase_gitignore.exists():
            supabase_gitignore.write_bytes(INIT_GITIGNORE.read_bytes())

    MIGRATIONS.mkdir(parents=True, exist_ok=True)
    if not list(MIGRATIONS.glob("*_edge_worker.sql")):
        path = MIGRATIONS / f"{next_version(migration_versions())}_edge_worker.sql"
        path.write_bytes(migration)
        say(f"wrote {path}")
    if not list(MIGRATIONS.glob(f"*_{args.worker_name}_keepalive.sql")):
        path = MIGRATIONS / f"{next_version(migration_versions())}_{args.worker_name}_keepalive.sql"
        path.write_text(keepalive_sql(args.worker_name, args.queue_name, args.schedule), encoding="utf-8")
        say(f"wrote {path}")

    added = merge_env(handoff)
    if added:
        say(f"set {', '.join(added)} in {ENV_FILE}")
    if merge_gitignore():
        say(f"added the secret files to {GITIGNORE}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker-name", required=True)
    parser.add_argument("--queue-name", required=True)
    parser.add_argument("--schedule", required=True)
    args = parser.parse_args(argv)
    try:
        run(args)
    except TaskError as exc:
        say(str(exc))
        return 1
    finally:
        if HANDOFF.exists():
            HANDOFF.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
