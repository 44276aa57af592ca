"""TEST-ONLY STAND-IN for the Supabase Management API (api.supabase.com).

The real Supabase CLI talks to it through a CLI profile (`--profile <yaml>` whose
`api_url` is this server on 127.0.0.1), so `supabase secrets list/set --project-ref` run
for real without a network. It implements only what those commands call:

    GET  /v1/projects/{ref}            the project (the CLI looks it up)
    GET  /v1/projects/{ref}/secrets    [{"name", "value": <sha256 digest>}]
    POST /v1/projects/{ref}/secrets    a JSON array of {"name", "value"}; 201

and answers 401 to a bearer token other than its own, 404 to an unknown project, and
records every request (method, path, headers, parsed body) for the tests to check.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

PROJECT_REF = "abcdefghijklmnopqrst"
ACCESS_TOKEN = "sbp_" + "0123456789abcdef" * 2 + "01234567"  # sbp_ + 40 hex digits, as the CLI demands


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class FakeManagementApi:
    def __init__(self, project_ref: str = PROJECT_REF, token: str = ACCESS_TOKEN) -> None:
        self.project_ref = project_ref
        self.token = token
        self.requests: list[Recorded] = []
        self.secrets: dict[str, str] = {}
        self._lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                with api._lock:
                    api.requests.append(Recorded(self.command, self.path, dict(self.headers), body))
                status, answer = api.answer(self.command, self.path.split("?")[0],
                                            self.headers.get("authorization", ""), body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-management-api", daemon=True)

    def answer(self, method: str, path: str, authorization: str, body: Any) -> tuple[int, Any]:
        if authorization != f"Bearer {self.token}":
            return 401, {"message": "Unauthorized"}
        prefix = f"/v1/projects/{self.project_ref}"
        if not path.startswith(prefix):
            return 404, {"message": "Project not found"}
        if method == "GET" and path == prefix:
            return 200, {"id": self.project_ref, "ref": self.project_ref, "organization_id": "test-org",
                         "name": "stand-in", "region": "local", "created_at": "2026-01-01T00:00:00Z",
                         "status": "ACTIVE_HEALTHY"}
        if path == f"{prefix}/secrets":
            if method == "GET":
                with self._lock:
                    return 200, [{"name": k, "value": hashlib.sha256(v.encode()).hexdigest()}
                                 for k, v in sorted(self.secrets.items())]
            if method == "POST" and isinstance(body, list):
                with self._lock:
                    self.secrets.update({item["name"]: item["value"] for item in body})
                return 201, {}
        return 404, {"message": f"the stand-in does not implement {method} {path}"}

    def posted_secrets(self) -> list[list[dict[str, str]]]:
        with self._lock:
            return [r.body for r in self.requests if r.method == "POST" and r.path.endswith("/secrets")]

    def profile(self, folder: Path) -> Path:
        """A Supabase CLI profile file pointing the CLI at this stand-in."""
        path = folder / "supabase-profile.yaml"
        path.write_text(
            "name: local-stand-in\n"
            f"api_url: {self.url}\n"
            f"dashboard_url: {self.url}/dashboard\n"
            "project_host: localhost\n"
        )
        return path

    def __enter__(self) -> FakeManagementApi:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
