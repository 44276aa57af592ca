-- supabase-worker-kit: the edge_worker SQL contract.
--
-- One file shared by the Python runtime, the pg_cron keep-alive, the deploy script and
-- the Copier template (worker_runtime/sql/edge_worker.sql is a byte-identical copy).
-- It is idempotent: applying it twice changes nothing. It needs PGMQ; pg_cron, pg_net
-- and Vault are only needed by the keep-alive and are looked up when it runs.

-- PGMQ: the Supabase Queues extension where the server has it, else a plain-SQL install.
do $pgmq$
begin
  if exists (select 1 from pg_extension where extname = 'pgmq') then
    return;
  elsif to_regnamespace('pgmq') is not null then
    return;  -- PGMQ installed as plain SQL: creating the extension over it would fail
  elsif exists (select 1 from pg_available_extensions where name = 'pgmq') then
    create extension pgmq;
  else
    raise exception 'PGMQ is not installed in this database.'
      using hint = 'On Supabase enable Queues (Dashboard > Integrations > Queues, or "create extension pgmq;"); '
                   'elsewhere install PGMQ (the extension, or its pgmq.sql) before this migration.';
  end if;
end
$pgmq$;

create schema if not exists edge_worker;

-- Workers -------------------------------------------------------------------------------

create table if not exists edge_worker.workers (
  worker_id uuid primary key,
  queue_name text not null,
  function_name text not null,
  started_at timestamptz not null default now(),
  stopped_at timestamptz,
  deprecated_at timestamptz,
  last_heartbeat_at timestamptz not null default now(),
  version text,
  host text,
  pid integer
);
create index if not exists workers_function_heartbeat_idx
  on edge_worker.workers (function_name, last_heartbeat_at desc);

-- The seed's views: a worker is active while it heartbeats within 6 seconds.
create or replace view edge_worker.active_workers with (security_invoker = true) as
select worker_id, queue_name, function_name, started_at, stopped_at, last_heartbeat_at
from edge_worker.workers
where stopped_at is null
  and last_heartbeat_at > now() - make_interval(secs => 6);

create or replace view edge_worker.inactive_workers with (security_invoker = true) as
select worker_id, queue_name, function_name, started_at, stopped_at, last_heartbeat_at
from edge_worker.workers
where stopped_at is null
  and last_heartbeat_at <= now() - make_interval(secs => 6);

-- Functions the keep-alive keeps alive ---------------------------------------------------

create table if not exists edge_worker.functions (
  function_name text primary key
    constraint function_name_format check (function_name ~ '^[a-z0-9][a-z0-9_-]*$'),
  queue_name text not null,
  url text,
  enabled boolean not null default true,
  min_workers integer not null default 1 constraint min_workers_non_negative check (min_workers >= 0),
  debounce interval not null default '10 seconds',
  version text,
  last_invoked_at timestamptz,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);
comment on column edge_worker.functions.url is
  'Base URL of the host that serves this function; null means the Vault secret edge_worker_url.';

-- Dead letters -----------------------------------------------------------------------------

create table if not exists edge_worker.dead_letters (
  id bigint generated always as identity primary key,
  queue_name text not null,
  msg_id bigint not null,
  message jsonb,
  headers jsonb,
  read_ct integer not null,
  enqueued_at timestamptz,
  failed_at timestamptz not null default now(),
  error jsonb not null,
  worker_id uuid,
  function_name text,
  requeued_at timestamptz,
  requeued_msg_id bigint
);
create index if not exists dead_letters_queue_idx
  on edge_worker.dead_letters (queue_name, failed_at) where requeued_at is null;

-- Runtime functions ----------------------------------------------------------------------

-- The queue table of a PGMQ queue, named as PGMQ names it: PGMQ (1.4.4 and later)
-- lowercases 'q_' || queue_name, so queue 'MyQueue' lives in pgmq.q_myqueue.
create or replace function edge_worker._queue_table(queue_name text)
returns text
language sql
immutable
set search_path = ''
as $$ select format('pgmq.%I', lower('q_' || queue_name)) $$;

create or replace function edge_worker.register_worker(
  worker_id uuid,
  queue_name text,
  function_name text,
  version text default null,
  host text default null,
  pid integer default null
)
returns void
language sql
set search_path = ''
as $$
  insert into edge_worker.workers as w (worker_id, queue_name, function_name, version, host, pid)
  values (register_worker.worker_id, register_worker.queue_name, register_worker.function_name,
          register_worker.version, register_worker.host, register_worker.pid)
  on conflict (worker_id) do update
    set last_heartbeat_at = now(), stopped_at = null;
$$;

-- Returns whether the worker should keep going: false once it was deprecated (a deploy's
-- hand-over, `worker-runtime stop`) or marked stopped, or if its row is gone.
create or replace function edge_worker.heartbeat(worker_id uuid)
returns boolean
language sql
set search_path = ''
as $$
  with beat as (
    update edge_worker.workers w
       set last_heartbeat_at = now()
     where w.worker_id = heartbeat.worker_id and w.stopped_at is null
    returning w.deprecated_at is null as keep_going
  )
  select coalesce((select keep_going from beat), false);
$$;

create or replace function edge_worker.mark_worker_stopped(worker_id uuid)
returns void
language sql
set search_path = ''
as $$
  update edge_worker.workers w
     set stopped_at = coalesce(w.stopped_at, now())
   where w.worker_id = mark_worker_stopped.worker_id;
$$;

-- A handler failed. In one round trip: make the message visible again after `retry_delay`
-- seconds, or, once `retry_limit` retries are used (read_ct > retry_limit), move it to
-- dead_letters with its error and remove it from the queue.
-- Returns 'retry', 'dead_letter', or 'missing' (already archived or deleted).
create or replace function edge_worker.fail(
  queue_name text,
  msg_id bigint,
  error jsonb,
  retry_limit integer,
  retry_delay integer,
  worker_id uuid default null,
  function_name text default null
)
returns text
language plpgsql
set search_path = ''
as $$
declare
  qtable text := edge_worker._queue_table(fail.queue_name);
  msg jsonb;
begin
  if retry_limit < 0 or retry_delay < 0 then
    raise exception 'edge_worker.fail: retry_limit and retry_delay must be >= 0 (got %, %)',
      retry_limit, retry_delay;
  end if;
  execute format('select to_jsonb(q) from %s q where q.msg_id = $1 for update', qtable)
    into msg using fail.msg_id;
  if msg is null then
    return 'missing';
  end if;
  if (msg ->> 'read_ct')::int <= retry_limit then
    execute format('update %s set vt = clock_timestamp() + make_interval(secs => $2) where msg_id = $1', qtable)
      using fail.msg_id, retry_delay;
    return 'retry';
  end if;
  insert into edge_worker.dead_letters
    (queue_name, msg_id, message, headers, read_ct, enqueued_at, error, worker_id, function_name)
  values
    (fail.queue_name, fail.msg_id, msg -> 'message', nullif(msg -> 'headers', 'null'::jsonb), (msg ->> 'read_ct')::int,
     (msg ->> 'enqueued_at')::timestamptz, fail.error, fail.worker_id, fail.function_name);
  execute format('delete from %s where msg_id = $1', qtable) using fail.msg_id;
  return 'dead_letter';
end;
$$;

-- Keep in-flight messages invisible while their handlers run. Returns the ids still queued.
create or replace function edge_worker.extend_vt(queue_name text, msg_ids bigint[], seconds integer)
returns setof bigint
language plpgsql
set search_path = ''
as $$
begin
  return query execute format(
    'update %s set vt = clock_timestamp() + make_interval(secs => $2) where msg_id = any($1) returning msg_id',
    edge_worker._queue_table(extend_vt.queue_name))
  using msg_ids, seconds;
end;
$$;

-- Ask the live workers of a function to stop (their next heartbeat returns false).
-- With keep_version, workers of that version are left running (a deploy's hand-over).
create or replace function edge_worker.deprecate_workers(function_name text, keep_version text default null)
returns integer
language sql
set search_path = ''
as $$
  with deprecated as (
    update edge_worker.workers w
       set deprecated_at = now()
     where w.function_name = deprecate_workers.function_name
       and w.stopped_at is null
       and w.deprecated_at is null
       and (keep_version is null or w.version is distinct from keep_version)
    returning 1
  )
  select count(*)::int from deprecated;
$$;

-- Put dead letters back on their queue (all of a queue, or the given dead-letter ids).
-- Returns (dead letter id, new msg_id) pairs.
create or replace function edge_worker.requeue_dead_letters(queue_name text, ids bigint[] default null)
returns table (dead_letter_id bigint, msg_id bigint)
language plpgsql
set search_path = ''
as $$
declare
  d record;
  new_id bigint;
begin
  for d in
    select dl.id, dl.message, dl.headers from edge_worker.dead_letters dl
     where dl.queue_name = requeue_dead_letters.queue_name
       and dl.requeued_at is null
       and (ids is null or dl.id = any(ids))
     order by dl.id
     for update
  loop
    if d.headers is not null and to_regprocedure('pgmq.send(text,jsonb,jsonb,integer)') is not null then
      -- PGMQ 1.5+ keeps headers: send them again (dynamic: 1.4.4 has no such overload)
      execute 'select pgmq.send($1, $2, $3, 0)' into new_id
        using requeue_dead_letters.queue_name, coalesce(d.message, 'null'::jsonb), d.headers;
    else
      select s into new_id from pgmq.send(requeue_dead_letters.queue_name, coalesce(d.message, 'null'::jsonb)) s;
    end if;
    update edge_worker.dead_letters set requeued_at = now(), requeued_msg_id = new_id where id = d.id;
    dead_letter_id := d.id;
    msg_id := new_id;
    return next;
  end loop;
end;
$$;

-- LISTEN/NOTIFY: one notification per insert statement on a queue, on channel
-- edge_worker_<queue>. Our own trigger, because PGMQ's enable_notify_insert is 1.7+ only.
create or replace function edge_worker._notify_insert()
returns trigger
language plpgsql
set search_path = ''
as $$
begin
  perform pg_notify('edge_worker_' || tg_argv[0], '');
  return null;
end;
$$;

create or replace function edge_worker.enable_notify(queue_name text)
returns void
language plpgsql
set search_path = ''
as $$
declare
  qtable text := edge_worker._queue_table(enable_notify.queue_name);
begin
  execute format('drop trigger if exists edge_worker_notify on %s', qtable);
  execute format(
    'create trigger edge_worker_notify after insert on %s for each statement execute function edge_worker._notify_insert(%L)',
    qtable, enable_notify.queue_name);
end;
$$;

-- Keep-alive -------------------------------------------------------------------------------

-- Register (or update) a function for the keep-alive. Leaves last_invoked_at alone.
create or replace function edge_worker.register_function(
  function_name text,
  queue_name text,
  url text default null,
  min_workers integer default 1,
  debounce interval default '10 seconds',
  version text default null,
  enabled boolean default true
)
returns void
language sql
set search_path = ''
as $$
  insert into edge_worker.functions as f
    (function_name, queue_name, url, min_workers, debounce, version, enabled)
  values
    (register_function.function_name, register_function.queue_name, register_function.url,
     register_function.min_workers, register_function.debounce, register_function.version,
     register_function.enabled)
  on conflict (function_name) do update
    set queue_name = excluded.queue_name,
        url = excluded.url,
        min_workers = excluded.min_workers,
        debounce = excluded.debounce,
        version = coalesce(excluded.version, f.version),
        enabled = excluded.enabled,
        updated_at = now();
$$;

-- `worker-runtime stop`: the keep-alive leaves the function alone and its workers stop.
create or replace function edge_worker.stop_function(function_name text)
returns integer
language plpgsql
set search_path = ''
as $$
begin
  update edge_worker.functions f set enabled = false, updated_at = now()
   where f.function_name = stop_function.function_name;
  return edge_worker.deprecate_workers(stop_function.function_name);
end;
$$;

-- Start a worker (HTTP POST through pg_net) for every enabled function with fewer live
-- workers than min_workers that was not invoked within its debounce. The base URL is the
-- function's url or the Vault secret 'edge_worker_url'; the bearer token is the Vault
-- secret 'edge_worker_auth_secret'. One row per enabled function.
create or replace function edge_worker.ensure_workers()
returns table (function_name text, invoked boolean, request_id bigint, reason text)
language plpgsql
security definer
set search_path = ''
as $$
declare
  f record;
  live integer;
  base_url text;
  secret text;
begin
  if to_regprocedure('net.http_post(text,jsonb,jsonb,jsonb,integer)') is null then
    raise exception 'edge_worker.ensure_workers needs pg_net: run "create extension pg_net;" (Supabase: Database > Extensions).';
  end if;
  if to_regclass('vault.decrypted_secrets') is null then
    raise exception 'edge_worker.ensure_workers needs Supabase Vault (schema vault): enable supabase_vault.';
  end if;
  execute 'select decrypted_secret from vault.decrypted_secrets where name = $1 limit 1'
    into secret using 'edge_worker_auth_secret';

  for f in
    select * from edge_worker.functions fn where fn.enabled order by fn.function_name for update skip locked
  loop
    function_name := f.function_name;
    invoked := false;
    request_id := null;
    select count(*) into live from edge_worker.workers w
     where w.function_name = f.function_name
       and w.stopped_at is null and w.deprecated_at is null
       and w.last_heartbeat_at > now() - make_interval(secs => 6);
    base_url := f.url;
    if base_url is null then
      execute 'select decrypted_secret from vault.decrypted_secrets where name = $1 limit 1'
        into base_url using 'edge_worker_url';
    end if;

    if live >= f.min_workers then
      reason := 'alive';
    elsif f.last_invoked_at is not null and f.last_invoked_at > now() - f.debounce then
      reason := 'debounced';
    elsif base_url is null then
      reason := 'no url: set functions.url or the Vault secret edge_worker_url';
    elsif secret is null then
      reason := 'no auth secret: set the Vault secret edge_worker_auth_secret';
    else
      execute 'select net.http_post(url => $1, body => $2, params => $3, headers => $4, timeout_milliseconds => $5)'
        into request_id
        using rtrim(base_url, '/') || '/functions/v1/' || f.function_name,
              jsonb_build_object('function_name', f.function_name, 'source', 'edge_worker.ensure_workers'),
              '{}'::jsonb,
              jsonb_build_object('Authorization', 'Bearer ' || secret, 'Content-Type', 'application/json'),
              5000;
      update edge_worker.functions fn set last_invoked_at = now() where fn.function_name = f.function_name;
      invoked := true;
      reason := 'started';
    end if;
    return next;
  end loop;
end;
$$;

-- (Re)create the one pg_cron job that calls ensure_workers(). Idempotent. Returns the job id.
create or replace function edge_worker.setup_keepalive(schedule text default '5 seconds')
returns bigint
language plpgsql
set search_path = ''
as $$
declare
  job_id bigint;
begin
  if to_regnamespace('cron') is null then
    raise exception 'edge_worker.setup_keepalive needs pg_cron: run "create extension pg_cron;" in the database named by cron.database_name (postgres on Supabase).';
  end if;
  begin
    execute 'select cron.schedule($1, $2, $3)' into job_id
      using 'edge_worker_keepalive', schedule, 'select edge_worker.ensure_workers()';
  exception when others then
    raise exception 'pg_cron refused the keep-alive schedule "%": %', schedule, sqlerrm
      using hint = 'pg_cron before 1.5 takes cron syntax only (for example ''* * * * *'', at most once a minute); '
                   'second intervals such as ''5 seconds'' need pg_cron 1.5 or later, as on Supabase.';
  end;
  return job_id;
end;
$$;

-- Security ---------------------------------------------------------------------------------

alter table edge_worker.workers enable row level security;
alter table edge_worker.functions enable row level security;
alter table edge_worker.dead_letters enable row level security;

revoke all on schema edge_worker from public;
revoke all on all tables in schema edge_worker from public;
revoke all on all sequences in schema edge_worker from public;
revoke execute on all functions in schema edge_worker from public;
-- No "alter default privileges in schema edge_worker revoke execute ... from public": PUBLIC's
-- EXECUTE comes from a global default that a per-schema revoke cannot remove (it would be a
-- silent no-op). Functions added later are still shut off by the schema: anon and
-- authenticated have no USAGE on edge_worker, and re-running this file revokes EXECUTE.

do $grants$
begin
  if exists (select 1 from pg_roles where rolname = 'anon') then
    revoke all on schema edge_worker from anon;
    revoke all on all tables in schema edge_worker from anon;
    revoke execute on all functions in schema edge_worker from anon;
  end if;
  if exists (select 1 from pg_roles where rolname = 'authenticated') then
    revoke all on schema edge_worker from authenticated;
    revoke all on all tables in schema edge_worker from authenticated;
    revoke execute on all functions in schema edge_worker from authenticated;
  end if;
  -- service_role (server-side keys) may read and operate the workers, like postgres.
  if exists (select 1 from pg_roles where rolname = 'service_role') then
    grant usage on schema edge_worker to service_role;
    grant select, insert, update, delete on all tables in schema edge_worker to service_role;
    grant execute on all functions in schema edge_worker to service_role;
  end if;
end
$grants$;
