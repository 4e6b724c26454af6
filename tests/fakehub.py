"""A recording fake of the Hugging Face Hub HTTP API on 127.0.0.1 — the only fake in this project.

It implements just what huggingface_hub 2.4 sends for ``create_repo`` + ``create_branch`` + one
``create_commit`` (read from ``hf_api.py``, ``_commit_api.py`` and ``lfs.py``):

* ``POST /api/repos/create``                         -> 200 ``{url}`` (409 if it exists)
* ``GET  /api/models/{repo}``                        -> repo info (404 ``RepoNotFound``)
* ``POST /api/models/{repo}/branch/{branch}``        -> branch from main (409 if it exists)
* ``POST /api/validate-yaml``                        -> parses the README front matter with PyYAML
* ``POST /api/models/{repo}/preupload/{rev}``        -> ``lfs`` for ``*.safetensors`` and files >= 10 MiB
  (the Hub's default ``.gitattributes``), ``regular`` for the rest (their bytes travel inline, base64, in
  the commit NDJSON)
* ``POST /{repo}.git/info/lfs/objects/batch``       -> basic-transfer upload + verify actions
* ``PUT  /lfs-upload/{oid}``, ``POST /lfs-verify``   -> stores the object after checking its sha256
* ``POST /api/models/{repo}/commit/{rev}``           -> applies the NDJSON commit to the branch

The real client uploads ``lfs`` files through Xet storage when ``hf_xet`` is installed; this fake speaks the
classic LFS protocol only, so clients must run with ``HF_HUB_DISABLE_XET=1`` (huggingface_hub's own switch).

Every request is recorded (method, path, headers without ``Authorization``, body); ``commits`` holds each
commit's files as ``path -> bytes``. Failure modes: ``fail={"/commit/": 404}`` answers matching paths with that
status (401/403 as auth errors, 404 as ``RepoNotFound``); ``token=...`` answers 401 to any other bearer token;
``FakeHub.down_endpoint()`` is a loopback URL where nothing listens (connection refused).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

LFS_THRESHOLD = 10 * 1024 * 1024
_ERROR_CODES = {404: "RepoNotFound"}


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    authorized: bool


@dataclass
class Commit:
    repo_id: str
    revision: str
    summary: str
    oid: str
    files: dict[str, bytes] = field(default_factory=dict)


class FakeHub:
    """Threaded loopback server; use as a context manager. ``endpoint`` is its base URL."""

    def __init__(self, *, token: str | None = None, fail: dict[str, int] | None = None):
        self.token = token
        self.fail = dict(fail or {})
        self.requests: list[Recorded] = []
        self.commits: list[Commit] = []
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @staticmethod
    def down_endpoint() -> str:
        """A loopback URL where nothing listens: the port was bound, then released."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id]["branches"][branch])


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        # -- plumbing -------------------------------------------------------------------------------------

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(self, status: int, payload: object = None, headers: dict[str, str] | None = None) -> None:
            data = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, code: str | None = None) -> None:
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, {"error": message}, headers)

        def _handle(self, method: str) -> None:
            body = self._body()
            path = urlsplit(self.path).path
            auth = self.headers.get("Authorization")
            authorized = hub.token is None or auth == f"Bearer {hub.token}"
            headers = {k: v for k, v in self.headers.items() if k.lower() != "authorization"}
            with hub._lock:
                hub.requests.append(Recorded(method, path, headers, body, authorized))
            for fragment, status in hub.fail.items():
                if fragment in path:
                    return self._error(status, f"injected failure {status}", _ERROR_CODES.get(status))
            if not authorized and not path.startswith("/lfs-upload/"):  # presigned upload URLs carry no token
                return self._error(401, "Invalid credentials in Authorization header")
            try:
                with hub._lock:
                    self._route(method, path, body)
            except _HttpError as exc:
                self._error(exc.status, exc.message, exc.code)

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

        def do_PUT(self) -> None:
            self._handle("PUT")

        # -- the API ----------------------------------------------------------------------------------------

        def _route(self, method: str, path: str, body: bytes) -> None:
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(/.*)?", path)
            if method == "POST" and path == "/api/repos/create":
                return self._create_repo(json.loads(body))
            if method == "GET" and path == "/api/whoami-v2":  # reached only with the right token
                return self._send(200, {"type": "user", "name": "me", "auth": {"type": "access_token"}})
            if method == "POST" and path == "/api/validate-yaml":
                return self._validate_yaml(json.loads(body))
            if m:
                repo_id, rest = m.group(1), m.group(2) or ""
                repo = hub.repos.get(repo_id)
                if repo is None:
                    raise _HttpError(404, f"Repository {repo_id} not found", "RepoNotFound")
                if method == "GET" and rest == "":
                    return self._send(200, {"id": repo_id, "private": repo["private"], "sha": repo["head"]})
                sub = re.fullmatch(r"/(branch|preupload|commit)/(.+)", rest)
                if method == "POST" and sub:
                    kind, rev = sub.group(1), unquote(sub.group(2))
                    return getattr(self, f"_{kind}")(repo_id, repo, rev, body)
            m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
            if method == "POST" and m:
                return self._lfs_batch(json.loads(body))
            m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
            if method == "PUT" and m:
                if hashlib.sha256(body).hexdigest() != m.group(1):
                    raise _HttpError(400, "uploaded content does not match its sha256")
                hub.lfs[m.group(1)] = body
                return self._send(200, {})
            if method == "POST" and path == "/lfs-verify":
                req = json.loads(body)
                if len(hub.lfs.get(req["oid"], b"")) != req["size"] or req["oid"] not in hub.lfs:
                    raise _HttpError(404, f"LFS object {req['oid']} not found")
                return self._send(200, {})
            raise _HttpError(404, f"no route for {method} {path}")

        def _create_repo(self, req: dict) -> None:
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            url = f"{hub.endpoint}/{repo_id}"
            if repo_id in hub.repos:  # the Hub's 409 body carries the url; create_repo(exist_ok=True) reads it
                message = "You already created this model repo"
                return self._send(409, {"error": message, "url": url}, {"X-Error-Message": message})
            gitattributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            hub.repos[repo_id] = {"private": req.get("visibility") == "private", "head": "0" * 40,
                                  "branches": {"main": {".gitattributes": gitattributes}}}
            self._send(200, {"url": url, "name": repo_id, "id": repo_id})

        def _validate_yaml(self, req: dict) -> None:
            content = req["content"]
            if content.startswith("---"):
                try:
                    yaml.safe_load(content.split("---", 2)[1])
                except yaml.YAMLError as exc:
                    return self._send(400, {"errors": [{"message": str(exc)}], "warnings": []})
            self._send(200, {"errors": [], "warnings": []})

        def _branch(self, repo_id: str, repo: dict, branch: str, body: bytes) -> None:
            if branch in repo["branches"]:
                raise _HttpError(409, f"Branch {branch} already exists")
            start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
            repo["branches"][branch] = dict(repo["branches"][start])
            self._send(200, {})

        def _preupload(self, repo_id: str, repo: dict, rev: str, body: bytes) -> None:
            if rev not in repo["branches"]:
                raise _HttpError(404, f"Revision {rev} not found", "RevisionNotFound")
            files = []
            for f in json.loads(body)["files"]:
                lfs = f["path"].endswith(".safetensors") or f["size"] >= LFS_THRESHOLD
                files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                              "oid": None})
            self._send(200, {"files": files, "commitOid": repo["head"]})

        def _lfs_batch(self, req: dict) -> None:
            objects = []
            for obj in req["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in hub.lfs:
                    entry["actions"] = {
                        "upload": {"href": f"{hub.endpoint}/lfs-upload/{obj['oid']}"},
                        "verify": {"href": f"{hub.endpoint}/lfs-verify"},
                    }
                objects.append(entry)
            self._send(200, {"transfer": "basic", "objects": objects})

        def _commit(self, repo_id: str, repo: dict, rev: str, body: bytes) -> None:
            if rev not in repo["branches"]:
                raise _HttpError(404, f"Revision {rev} not found", "RevisionNotFound")
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next(item["value"] for item in lines if item["key"] == "header")
            files: dict[str, bytes] = {}
            for item in lines:
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "lfsFile":
                    if value["oid"] not in hub.lfs:
                        raise _HttpError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                    files[value["path"]] = hub.lfs[value["oid"]]
                elif item["key"] != "header":
                    raise _HttpError(400, f"unsupported commit operation {item['key']}")
            oid = hashlib.sha1(body).hexdigest()
            repo["branches"][rev].update(files)
            repo["head"] = oid
            hub.commits.append(Commit(repo_id, rev, header["summary"], oid, files))
            self._send(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid,
                             "success": True, "pullRequestUrl": None})

    return Handler


class _HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
