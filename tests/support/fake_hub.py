"""A loopback HTTP server for download tests: plain files (with Range requests and a connection
that can be made to drop midway) and a fake Hugging Face hub behind ``HF_ENDPOINT``.

The hub part answers what huggingface_hub's ``model_info`` and ``hf_hub_download`` ask:
``GET /api/models/{repo}/revision/{rev}`` (commit sha and file list) and ``HEAD``/``GET
/{repo}/resolve/{rev}/{file}`` with the ``X-Repo-Commit`` and ``ETag`` headers it requires; unknown
repos and files get the ``X-Error-Code`` it maps to RepositoryNotFoundError / EntryNotFoundError.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # huggingface_hub wants a 40-hex commit id


class LoopbackServer:
    """``with LoopbackServer() as s:`` serves ``s.files`` at ``s.url(name)`` and ``s.repos``
    (repo id -> {file name: bytes}) as a hub at ``s.endpoint``. ``s.drop_once[name] = n`` sends n
    bytes of that file then closes the connection, once. ``s.requests`` logs (method, path, Range)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.repos: dict[str, dict[str, bytes]] = {}
        self.drop_once: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def url(self, name: str) -> str:
        return f"{self.endpoint}/files/{name}"

    def add_repo(self, repo: str, directory: Path) -> None:
        self.repos[repo] = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}

    def __enter__(self) -> "LoopbackServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(state: LoopbackServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = self.path.split("?", 1)[0]
            state.requests.append((self.command, path, self.headers.get("Range")))
            if path.startswith("/files/"):
                name = path[len("/files/"):]
                return self._send_file(state.files.get(name), name, body, {})
            api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
            if api:
                files = state.repos.get(api.group(1))
                if files is None:
                    return self._error(404, "RepoNotFound")
                info = {"id": api.group(1), "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}
                return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
            hub = re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path)
            if hub:
                files = state.repos.get(hub.group(1))
                if files is None:
                    return self._error(404, "RepoNotFound")
                if hub.group(2) not in files:
                    return self._error(404, "EntryNotFound")
                data = files[hub.group(2)]
                etag = '"' + hashlib.sha256(data).hexdigest() + '"'
                return self._send_file(data, hub.group(2), body, {"ETag": etag, "X-Repo-Commit": COMMIT})
            self._error(404, "")

        def _send_file(self, data: bytes | None, name: str, body: bool, headers: dict[str, str]) -> None:
            if data is None:
                return self._error(404, "")
            start = 0
            rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if rng:
                start = int(rng.group(1))
                if start >= len(data):
                    return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, body)
                headers = {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
            cut = state.drop_once.pop(name, None) if body else None
            self._send(206 if rng else 200, data[start:], headers, body, cut=cut)

        def _error(self, code: int, error_code: str) -> None:
            headers = {"X-Error-Code": error_code, "X-Repo-Commit": COMMIT} if error_code else {}
            self._send(code, b"{}", headers, True)

        def _send(self, code: int, data: bytes, headers: dict[str, str], body: bool, cut: int | None = None) -> None:
            self.send_response(code)
            for k, v in {"Content-Length": str(len(data)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            if body:
                # A drop: part of the body, then the connection closes (HTTP/1.0: after this handler).
                self.wfile.write(data if cut is None else data[:cut])
                self.wfile.flush()

    return Handler
