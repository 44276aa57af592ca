-- TEST-ONLY STAND-INS for Supabase extensions that have no installable package here.
--
-- pg_net  -> net.http_post(...) with pg_net's signature. Unlike pg_net it sends the request
--            synchronously (PL/Python + urllib), but it really sends it, never raises on an
--            HTTP or network error, and records the outcome in net._http_response.
-- supabase_vault -> vault.secrets, vault.create_secret, vault.update_secret and the
--            vault.decrypted_secrets view, with Vault's names; secrets are stored unencrypted.
--
-- Never ship this file: it exists so tests can exercise edge_worker.ensure_workers().

create extension if not exists plpython3u;

create schema if not exists net;

create sequence if not exists net.http_request_id_seq;

create table if not exists net._http_response (
  id bigint primary key,
  status_code integer,
  content text,
  headers jsonb,
  timed_out boolean,
  error_msg text,
  created timestamptz not null default now(),
  -- what the stand-in sent, so tests can check it
  url text,
  request_headers jsonb,
  request_body jsonb
);

create or replace function net.http_post(
  url text,
  body jsonb default '{}'::jsonb,
  params jsonb default '{}'::jsonb,
  headers jsonb default '{"Content-Type": "application/json"}'::jsonb,
  timeout_milliseconds integer default 5000
)
returns bigint
language plpython3u
as $$
import json
import urllib.error
import urllib.parse
import urllib.request

request_id = plpy.execute("select nextval('net.http_request_id_seq') as id")[0]["id"]
query = urllib.parse.urlencode(json.loads(params or "{}"))
full_url = url + ("?" + query if query else "")
sent_headers = json.loads(headers or "{}")
data = (body or "{}").encode()
status, content, error, timed_out = None, None, None, False
try:
    req = urllib.request.Request(full_url, data=data, headers=sent_headers, method="POST")
    with urllib.request.urlopen(req, timeout=timeout_milliseconds / 1000) as resp:
        status, content = resp.status, resp.read().decode()
except urllib.error.HTTPError as exc:
    status, content = exc.code, exc.read().decode()
except TimeoutError as exc:
    timed_out, error = True, str(exc)
except Exception as exc:
    error = str(exc)

plan = plpy.prepare(
    "insert into net._http_response (id, status_code, content, timed_out, error_msg, url, request_headers, request_body)"
    " values ($1, $2, $3, $4, $5, $6, $7, $8)",
    ["bigint", "integer", "text", "boolean", "text", "text", "jsonb", "jsonb"],
)
plpy.execute(plan, [request_id, status, content, timed_out, error, url, headers, body])
return request_id
$$;

create schema if not exists vault;

create table if not exists vault.secrets (
  id uuid primary key default gen_random_uuid(),
  name text unique,
  description text not null default '',
  secret text not null,
  key_id uuid,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);

create or replace function vault.create_secret(
  new_secret text,
  new_name text default null,
  new_description text default '',
  new_key_id uuid default null
)
returns uuid
language sql
as $$
  insert into vault.secrets (secret, name, description, key_id)
  values (new_secret, new_name, new_description, new_key_id)
  returning id;
$$;

create or replace function vault.update_secret(
  secret_id uuid,
  new_secret text default null,
  new_name text default null,
  new_description text default null,
  new_key_id uuid default null
)
returns void
language sql
as $$
  update vault.secrets
     set secret = coalesce(new_secret, secret),
         name = coalesce(new_name, name),
         description = coalesce(new_description, description),
         key_id = coalesce(new_key_id, key_id),
         updated_at = now()
   where id = secret_id;
$$;

create or replace view vault.decrypted_secrets as
select id, name, description, secret, secret as decrypted_secret, key_id, created_at, updated_at
from vault.secrets;

revoke all on schema vault from public;
revoke all on schema net from public;
