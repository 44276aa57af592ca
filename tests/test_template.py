"""The Copier template: rendered into temp folders, then checked file by file, against the
real Supabase CLI (`supabase init`, `supabase db push`) and real PostgreSQL, and by running
the generated worker and its generated tests."""

from __future__ import annotations

import asyncio
import difflib
import os
import signal
import subprocess
import sys
import tomllib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import asyncpg
import copier
import pytest
import yaml
from copier.errors import TaskError

from tests.pgcluster import PgCluster
from tests.supabase_cli import run_supabase
from tests.template_kit import (
    PACKAGED_MIGRATION,
    REPO_ROOT,
    git,
    make_kit_repo,
    read_env,
    render,
    snapshot,
)
from tests.waiting import wait_for
from worker_runtime.migrate import install_pgmq_sql

SPECIAL_PASSWORD = "p@ss:w/rd?#%& +=$;,'\"\\[]{}<>|^`~!é"


@pytest.fixture(scope="session")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_kit_repo(tmp_path_factory.mktemp("kit") / "supabase-worker-kit")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    path = tmp_path / "my-project"
    path.mkdir()
    git(path, "init", "-q")
    return path


def migrations(project: Path) -> list[str]:
    return sorted(p.name for p in (project / "supabase" / "migrations").glob("*.sql"))


# -- files and contents ---------------------------------------------------------------------------


def test_template_migration_is_the_packaged_one() -> None:
    link = REPO_ROOT / "template" / ".kit" / "edge_worker.sql"
    assert link.is_symlink(), "template/.kit/edge_worker.sql should stay a symlink to the packaged migration"
    assert link.read_bytes() == PACKAGED_MIGRATION.read_bytes()


def test_files_and_contents(kit: Path, project: Path) -> None:
    render(kit, project, worker_name="email-sender", max_concurrent=7, retry_limit=2, keepalive_schedule="10 seconds")

    files = set(snapshot(project))
    names = migrations(project)
    assert len(names) == 2 and names[0].endswith("_edge_worker.sql") and names[1].endswith("_email-sender_keepalive.sql")
    assert files == {
        ".copier-answers.email-sender.yml", ".gitignore", "Dockerfile", "requirements.txt",
        "scripts/deploy.py", "scripts/seed_vault.py",
        "supabase/.gitignore", "supabase/config.toml", "supabase/functions/.env",
        *(f"supabase/migrations/{n}" for n in names),
        "workers/README.md", "workers/pytest.ini",
        "workers/email-sender/worker.py", "workers/email-sender/test_worker.py",
    }

    # config.toml: a complete `supabase init` file with the three keys the runtime needs
    config = tomllib.loads((project / "supabase" / "config.toml").read_text())
    assert config["project_id"] == "my-project"
    assert config["db"]["pooler"]["enabled"] is True
    assert config["db"]["pooler"]["pool_mode"] == "transaction"
    assert config["edge_runtime"]["policy"] == "per_worker"
    assert config["api"]["port"] == 54321 and config["db"]["port"] == 54322

    # the edge_worker migration is the packaged one, byte for byte
    migration_dir = project / "supabase" / "migrations"
    assert (migration_dir / names[0]).read_bytes() == PACKAGED_MIGRATION.read_bytes()
    keepalive = (migration_dir / names[1]).read_text()
    assert "select edge_worker.register_function('email-sender', 'email_sender');" in keepalive
    assert "perform edge_worker.setup_keepalive('10 seconds');" in keepalive
    env = read_env(project)
    assert env["EDGE_WORKER_AUTH_SECRET"] not in keepalive and "postgres:" not in keepalive

    worker = (project / "workers" / "email-sender" / "worker.py").read_text()
    for option in ('queue_name="email_sender"', "max_concurrent=7", "max_pg_connections=4",
                   "visibility_timeout=3", "retry_limit=2", "retry_delay=5"):
        assert option in worker
    assert "EdgeWorker.start(\n    handler," in worker

    assert set(env) == {"EDGE_WORKER_DB_URL", "EDGE_WORKER_URL", "EDGE_WORKER_AUTH_SECRET"}
    assert env["EDGE_WORKER_DB_URL"] == "postgresql://postgres:postgres@localhost:54322/postgres"
    assert env["EDGE_WORKER_URL"] == "http://host.docker.internal:54380"
    assert len(env["EDGE_WORKER_AUTH_SECRET"]) >= 43
    assert (project / "supabase" / "functions" / ".env").stat().st_mode & 0o077 == 0

    deploy = (project / "scripts" / "deploy.py").read_text()
    assert "from worker_runtime.deploy import main" in deploy and "raise SystemExit(main())" in deploy
    dockerfile = (project / "Dockerfile").read_text()
    assert "worker-runtime serve --host 0.0.0.0" in dockerfile and "COPY workers/" in dockerfile
    assert ".env" not in dockerfile.split("COPY")[1]  # secrets never copied into the image
    readme = (project / "workers" / "README.md").read_text()
    for heading in ("## Run locally", "## Test", "## Deploy"):
        assert heading in readme
    assert "worker-runtime send email_sender" in readme


def test_answers_file_holds_no_secret(kit: Path, project: Path) -> None:
    render(kit, project, worker_name="billing", db_password=SPECIAL_PASSWORD)
    answers_text = (project / ".copier-answers.billing.yml").read_text()
    answers = yaml.safe_load(answers_text)
    assert answers["worker_name"] == "billing" and answers["queue_name"] == "billing"
    assert "db_password" not in answers and "db_url" not in answers
    env = read_env(project)
    for secret in (SPECIAL_PASSWORD, quote(SPECIAL_PASSWORD, safe=""), env["EDGE_WORKER_AUTH_SECRET"],
                   env["EDGE_WORKER_DB_URL"]):
        assert secret not in answers_text
    assert not (project / "supabase" / "functions" / ".env.copier-pending").exists()


@pytest.mark.parametrize("password", [SPECIAL_PASSWORD, "a b", "%41", "pass/word", "100%", "@:@"])
def test_password_is_url_encoded_and_decodes_back(kit: Path, project: Path, password: str) -> None:
    render(kit, project, db_password=password)
    url = read_env(project)["EDGE_WORKER_DB_URL"]
    assert url == f"postgresql://postgres:{quote(password, safe='')}@localhost:54322/postgres"
    parts = urlsplit(url)
    assert unquote(parts.password or "") == password
    assert (parts.hostname, parts.port, parts.path) == ("localhost", 54322, "/postgres")


async def test_special_password_url_connects_with_asyncpg(kit: Path, project: Path, pg: PgCluster) -> None:
    assert set("@:/?#%& ") <= set(pg.password)
    render(kit, project, db_password=pg.password, db_host="127.0.0.1", db_port=pg.port)
    url = read_env(project)["EDGE_WORKER_DB_URL"]
    assert unquote(urlsplit(url).password or "") == pg.password
    conn = await asyncpg.connect(url)  # over TCP with scram-sha-256: the password must be right
    try:
        assert await conn.fetchval("select current_user") == "postgres"
    finally:
        await conn.close()


def test_hosted_project_uses_the_pooler_user_and_port(kit: Path, project: Path) -> None:
    ref = "abcdefghijklmnopqrst"
    pasted = f"postgresql://postgres.{ref}:[YOUR-PASSWORD]@aws-0-eu-central-1.pooler.supabase.com:6543/postgres"
    render(kit, project, project_ref=ref, pooler_host=pasted, db_password="s3cret/@")
    assert read_env(project)["EDGE_WORKER_DB_URL"] == (
        f"postgresql://postgres.{ref}:s3cret%2F%40@aws-0-eu-central-1.pooler.supabase.com:6543/postgres"
    )
    answers = yaml.safe_load((project / ".copier-answers.worker.yml").read_text())
    assert answers["project_ref"] == ref and "db_host" not in answers


@pytest.mark.parametrize(("data", "reason"), [
    ({"worker_name": "Email Sender"}, "Supabase function name"),
    ({"worker_name": "-x"}, "starting with a letter or digit"),
    ({"worker_name": "ok", "queue_name": "bad-queue"}, "PGMQ queue name"),
    ({"queue_name": "q" * 48}, "at most 47"),
    ({"max_concurrent": 0}, "1 or more"),
    ({"max_pg_connections": 1}, "2 or more"),
    ({"visibility_timeout": 0}, "1 or more seconds"),
    ({"retry_limit": -1}, "0 (no retries)"),
    ({"retry_delay": -1}, "0 or more seconds"),
    ({"project_ref": "NOT-A-REF"}, "20 lowercase letters"),
    ({"project_ref": "abcdefghijklmnopqrst", "pooler_host": ""}, "Transaction pooler"),
    ({"db_port": 0}, "between 1 and 65535"),
    ({"worker_url": "host.docker.internal"}, "http(s) base URL"),
    ({"keepalive_schedule": "5 minutes"}, "seconds"),
])
def test_validators_give_a_reason(kit: Path, project: Path, data: dict[str, object], reason: str) -> None:
    with pytest.raises(ValueError, match="Validation error") as caught:
        render(kit, project, **data)
    message = str(caught.value)
    assert reason in message and "\n" not in message.strip()


# -- secrets stay out of git ------------------------------------------------------------------------


def test_git_ignores_every_secret_file(kit: Path, project: Path) -> None:
    (project / ".gitignore").write_text("node_modules/\n")  # the user's own lines are kept
    render(kit, project)
    assert (project / ".gitignore").read_text().startswith("node_modules/\n")
    secret_files = ["supabase/functions/.env", "supabase/functions/.env.copier-pending",
                    "supabase/functions/.env.production", ".env", "supabase/.temp/pooler-url"]
    check = git(project, "check-ignore", "--no-index", *secret_files, check=False)
    assert sorted(check.stdout.split()) == sorted(secret_files), check.stdout + check.stderr
    git(project, "add", "-A")
    staged = git(project, "diff", "--cached", "--name-only").stdout.split()
    assert "supabase/functions/.env" not in staged and "workers/worker/worker.py" in staged


# -- config.toml -----------------------------------------------------------------------------------


def changed_lines(before: str, after: str) -> list[str]:
    return [line for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def test_existing_config_from_supabase_init_keeps_every_other_line(kit: Path, project: Path) -> None:
    home = project.parent / "home"
    home.mkdir()
    init = run_supabase(["init"], cwd=project, home=home)
    assert init.returncode == 0, init.stdout + init.stderr
    config = project / "supabase" / "config.toml"
    before = config.read_text()
    assert "enabled = false" in before.split("[db.pooler]")[1].split("\n[")[0]
    gitignore_before = (project / "supabase" / ".gitignore").read_text()

    render(kit, project)

    after = config.read_text()
    # supabase init already has pool_mode = "transaction" and policy = "per_worker"
    assert changed_lines(before, after) == ["-enabled = false", "+enabled = true"]
    assert after.count("\n") == before.count("\n")
    assert tomllib.loads(after)["db"]["pooler"] == {**tomllib.loads(before)["db"]["pooler"], "enabled": True}
    assert (project / "supabase" / ".gitignore").read_text() == gitignore_before


def test_existing_config_only_the_three_keys_change(kit: Path, project: Path) -> None:
    config = project / "supabase" / "config.toml"
    config.parent.mkdir()
    before = (
        "# my project\nproject_id = \"mine\"\n\n[db]\nport = 5555  # custom port\n\n"
        "[db.pooler]\n# off for now\nenabled = false\npool_mode = \"session\"  # was session\n"
        "default_pool_size = 3\n\n[edge_runtime]\nenabled = true\npolicy = \"oneshot\"\n\n[auth]\nsite_url = \"x\"\n"
    )
    config.write_text(before)
    render(kit, project)
    after = config.read_text()
    assert changed_lines(before, after) == [
        "-enabled = false", "-pool_mode = \"session\"  # was session",
        "+enabled = true", "+pool_mode = \"transaction\"  # was session",
        "-policy = \"oneshot\"", "+policy = \"per_worker\"",
    ]
    assert not (project / "supabase" / ".gitignore").exists()  # not a fresh `supabase init`


def test_config_without_the_tables_gets_them(kit: Path, project: Path) -> None:
    config = project / "supabase" / "config.toml"
    config.parent.mkdir()
    config.write_text("project_id = \"bare\"\n# keep me\n")
    render(kit, project)
    after = config.read_text()
    assert after.startswith("project_id = \"bare\"\n# keep me\n")
    parsed = tomllib.loads(after)
    assert parsed["db"]["pooler"] == {"enabled": True, "pool_mode": "transaction"}
    assert parsed["edge_runtime"] == {"policy": "per_worker"}


def test_invalid_toml_stops_with_file_and_line_and_changes_nothing(
    kit: Path, project: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    config = project / "supabase" / "config.toml"
    config.parent.mkdir()
    broken = "project_id = \"x\"\n\n[db.pooler]\nenabled = = true\n"
    config.write_text(broken)
    (project / ".gitignore").write_text("mine\n")

    with pytest.raises(TaskError):
        render(kit, project, worker_name="mailer")

    err = capfd.readouterr().err
    assert "supabase/config.toml:4:" in err and "not valid TOML" in err and "line 4" in err
    assert config.read_text() == broken
    assert (project / ".gitignore").read_text() == "mine\n"
    assert not (project / "supabase" / "migrations").exists()
    assert not (project / "supabase" / "functions" / ".env").exists()
    assert not (project / "supabase" / "functions" / ".env.copier-pending").exists()


# -- more workers, re-runs, update -----------------------------------------------------------------


def test_second_worker_adds_only_its_files(kit: Path, project: Path) -> None:
    render(kit, project, worker_name="first")
    before = snapshot(project)

    render(kit, project, worker_name="second-one", queue_name="second", db_password="other")

    after = snapshot(project)
    changed = {path for path in before if after.get(path) != before[path]}
    added = set(after) - set(before)
    assert changed == set()
    keepalive = [n for n in migrations(project) if n.endswith("_second-one_keepalive.sql")]
    assert len(keepalive) == 1
    assert added == {
        ".copier-answers.second-one.yml", "workers/second-one/worker.py", "workers/second-one/test_worker.py",
        f"supabase/migrations/{keepalive[0]}",
    }
    assert len([n for n in migrations(project) if n.endswith("_edge_worker.sql")]) == 1
    assert migrations(project)[-1] == keepalive[0], "a new migration sorts after the existing ones"


def test_rerun_for_the_same_worker_changes_nothing(kit: Path, project: Path) -> None:
    render(kit, project, worker_name="again")
    before = snapshot(project)
    render(kit, project, worker_name="again")
    assert snapshot(project) == before  # auth secret, URL and migrations all kept


def test_env_file_keeps_user_lines_and_values(kit: Path, project: Path) -> None:
    env_file = project / "supabase" / "functions" / ".env"
    env_file.parent.mkdir(parents=True)
    env_file.write_text("OPENAI_API_KEY=sk-1\nEDGE_WORKER_AUTH_SECRET=mine\n")
    render(kit, project)
    text = env_file.read_text()
    assert text.startswith("OPENAI_API_KEY=sk-1\nEDGE_WORKER_AUTH_SECRET=mine\n")
    assert read_env(project)["EDGE_WORKER_AUTH_SECRET"] == "mine"
    assert read_env(project)["EDGE_WORKER_DB_URL"].startswith("postgresql://postgres:postgres@")


def test_copier_update_from_an_older_tagged_version(tmp_path: Path, project: Path) -> None:
    kit = make_kit_repo(tmp_path / "kit", tag="v0.1")
    render(kit, project, vcs_ref="v0.1", worker_name="mailer")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "scaffold v0.1")
    env_before = read_env(project)
    migrations_before = migrations(project)

    # The user edits the handler...
    worker_py = project / "workers" / "mailer" / "worker.py"
    worker_py.write_text(worker_py.read_text().replace('greeting = f"Hello, {name}!"', 'greeting = f"Hi there, {name}!"'))
    git(project, "commit", "-q", "-am", "my handler")
    # ...and the kit changes its template in v0.2.
    template = kit / "template" / "workers" / "{{ worker_name }}" / "worker.py.jinja"
    template.write_text(template.read_text().replace(
        "from worker_runtime import Context, EdgeWorker\n",
        "from worker_runtime import Context, EdgeWorker\n\n# Template v0.2: see workers/README.md for the options.\n",
    ))
    readme = kit / "template" / "workers" / "README.md.jinja"
    readme.write_text(readme.read_text() + "\n<!-- v0.2 -->\n")
    git(kit, "commit", "-q", "-am", "v0.2")
    git(kit, "tag", "v0.2")

    copier.run_update(str(project), answers_file=".copier-answers.mailer.yml", vcs_ref="v0.2",
                      defaults=True, overwrite=True, unsafe=True, quiet=True)

    text = worker_py.read_text()
    assert "# Template v0.2" in text and 'greeting = f"Hi there, {name}!"' in text
    status = git(project, "status", "--porcelain").stdout
    assert "<<<<<<<" not in text and ".rej" not in status
    answers = yaml.safe_load((project / ".copier-answers.mailer.yml").read_text())
    assert answers["_commit"] == "v0.2"
    assert read_env(project) == env_before  # update never touches .env
    assert migrations(project) == migrations_before  # nor applied migrations
    assert not (project / "supabase" / "functions" / ".env.copier-pending").exists()
    changed = {line[3:] for line in status.splitlines()}
    assert changed == {".copier-answers.mailer.yml", "workers/mailer/worker.py"}, status


# -- against real PostgreSQL -------------------------------------------------------------------------


@pytest.fixture
async def plain_pgmq_db(pg: PgCluster) -> AsyncIterator[str]:
    """A fresh database from template0 with only PGMQ: what `supabase db push` meets."""
    name = f"tpl_{uuid.uuid4().hex[:12]}"
    await pg.create_database(name, template="template0")
    conn = await asyncpg.connect(pg.url(name))
    try:
        await install_pgmq_sql(conn)
    finally:
        await conn.close()
    yield pg.url(name)
    await pg.drop_database(name)


async def test_supabase_db_push_applies_the_generated_migrations(
    kit: Path, project: Path, plain_pgmq_db: str
) -> None:
    render(kit, project, worker_name="pusher", queue_name="push_jobs")
    render(kit, project, worker_name="second")
    home = project.parent / "home"
    home.mkdir()
    push = run_supabase(["db", "push", "--db-url", f"{plain_pgmq_db}?sslmode=disable", "--yes"], cwd=project, home=home)
    output = push.stdout + push.stderr
    assert push.returncode == 0, output

    conn = await asyncpg.connect(plain_pgmq_db)
    try:
        versions = [r["version"] for r in await conn.fetch(
            "select version from supabase_migrations.schema_migrations order by version")]
        assert versions == [name.split("_", 1)[0] for name in migrations(project)]
        rows = await conn.fetch("select function_name, queue_name, url, enabled from edge_worker.functions order by 1")
        assert [tuple(r) for r in rows] == [("pusher", "push_jobs", None, True), ("second", "second", None, True)]
        # No pg_cron in this database (only `postgres` has it): the keep-alive warned, not failed.
        assert await conn.fetchval("select to_regnamespace('cron')") is None
    finally:
        await conn.close()


async def test_keepalive_migration_schedules_the_job_where_pg_cron_is(kit: Path, project: Path, pg: PgCluster) -> None:
    """In `postgres` (pg_cron's database) the same file schedules the job; rolled back after.

    Debian's pg_cron here is 1.4, which takes cron syntax only ('5 seconds' needs 1.5+).
    """
    render(kit, project, worker_name="cronned", keepalive_schedule="*/2 * * * *")
    sql = (project / "supabase" / "migrations" / migrations(project)[1]).read_text()
    conn = await asyncpg.connect(pg.url())
    try:
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.execute(sql)
            job = await conn.fetchrow("select schedule, command from cron.job where jobname = 'edge_worker_keepalive'")
            assert job is not None and job["schedule"] == "*/2 * * * *"
            assert job["command"] == "select edge_worker.ensure_workers()"
            assert await conn.fetchval(
                "select queue_name from edge_worker.functions where function_name = 'cronned'") == "cronned"
        finally:
            await tx.rollback()
    finally:
        await conn.close()


def run_python(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def project_env(db_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["EDGE_WORKER_DB_URL"] = db_url
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


async def test_generated_worker_processes_a_message(kit: Path, project: Path, db_url: str) -> None:
    render(kit, project, worker_name="greeter", queue_name="greetings")
    env = project_env(db_url)
    worker = subprocess.Popen(
        [sys.executable, "workers/greeter/worker.py"], cwd=project, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    conn = await asyncpg.connect(db_url)
    try:
        async def queue_exists() -> bool:
            if worker.poll() is not None:
                raise AssertionError(f"the worker exited early:\n{worker.stdout.read() if worker.stdout else ''}")
            return bool(await conn.fetchval("select exists (select 1 from pgmq.meta where queue_name = 'greetings')"))

        await wait_for(queue_exists, 30, "the worker to create its queue")
        sent = await asyncio.to_thread(
            run_python, ["-m", "worker_runtime", "send", "greetings", '{"name": "Ada"}'], project, env)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        msg_id = int(sent.stdout.split()[-1])

        async def archived() -> bool:
            return bool(await conn.fetchval("select exists (select 1 from pgmq.a_greetings where msg_id = $1)", msg_id))

        await wait_for(archived, 30, f"message {msg_id} to be archived")
        assert await conn.fetchval("select message from pgmq.a_greetings where msg_id = $1", msg_id) == '{"name": "Ada"}'
        assert await conn.fetchval("select count(*) from edge_worker.workers where function_name = 'greeter'") == 1
    finally:
        await conn.close()
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
        try:
            out, _ = worker.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            out, _ = worker.communicate()
    assert worker.returncode == 0, out
    assert "Hello, Ada!" in out


async def test_seed_vault_script_stores_url_and_secret(kit: Path, project: Path, db_url: str) -> None:
    render(kit, project)
    result = await asyncio.to_thread(run_python, ["scripts/seed_vault.py"], project, project_env(db_url))
    assert result.returncode == 0, result.stdout + result.stderr
    env = read_env(project)
    assert env["EDGE_WORKER_AUTH_SECRET"] not in result.stdout + result.stderr
    conn = await asyncpg.connect(db_url)
    try:
        rows = dict(await conn.fetch("select name, decrypted_secret from vault.decrypted_secrets"
                                     " where name like 'edge_worker_%'"))
    finally:
        await conn.close()
    assert rows == {"edge_worker_url": "http://host.docker.internal:54380",
                    "edge_worker_auth_secret": env["EDGE_WORKER_AUTH_SECRET"]}


def test_generated_test_worker_passes(kit: Path, project: Path) -> None:
    render(kit, project, worker_name="first")
    render(kit, project, worker_name="second-one")
    env = project_env("")
    env.pop("EDGE_WORKER_DB_URL")
    result = run_python(["-m", "pytest", "workers", "-q", "-p", "no:cacheprovider"], project, env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed" in result.stdout
