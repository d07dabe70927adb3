"""A stand-in for the Hugging Face Hub on 127.0.0.1, and huggingface_hub pointed at it, for tests.

It answers, over plain HTTP, the endpoints huggingface_hub 2.x calls to resolve a revision and
to download a snapshot:

- ``GET  /api/models/{repo}/revision/{revision}``: the commit a branch, tag or commit names
- ``GET  /api/models/{repo}/tree/{commit}``: the files at a commit (snapshot_download's listing)
- ``HEAD /{repo}/resolve/{commit}/{file}``: a file's X-Repo-Commit, ETag and Content-Length
- ``GET  /{repo}/resolve/{commit}/{file}``: its bytes

Failures are answered as the Hub answers them, with an ``X-Error-Code``: ``RepoNotFound``,
``RevisionNotFound``, and ``GatedRepo`` for a gated repo's files unless the request carries
its token. Nothing advertises Xet storage (no ``X-Xet-*`` header, no ``xetHash`` in a
listing), so huggingface_hub downloads each file with a plain GET.
"""

import contextlib
import hashlib
import http.server
import importlib
import json
import re
import threading
import urllib.parse
from pathlib import Path

import pytest

_API = re.compile(r"^/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class Hub:
    """What the server holds, what it was asked (``requests``: (method, path)), and the
    environment huggingface_hub reads its configuration from (``setenv``)."""

    def __init__(self):
        self.repos = {}  # repo id -> {"commits": {sha: {path: bytes}}, "refs": {name: sha}, "token": str|None}
        self.requests = []
        self.url = None
        self._env = None

    def push(self, repo, folder, branch="main", token=None):
        """Commit every file under ``folder`` to ``repo`` as ``branch``; return the commit's id.

        A repo with a ``token`` is gated: its files are served only to that token.
        """
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
                 if p.is_file()}
        tree = hashlib.sha1()  # a commit id made from the content, as git's is
        for path, data in sorted(files.items()):
            tree.update(path.encode() + b"\0" + hashlib.sha1(data).digest())
        sha = tree.hexdigest()
        state = self.repos.setdefault(repo, {"commits": {}, "refs": {}, "token": token})
        state["commits"][sha] = files
        state["refs"][branch] = sha
        return sha

    def setenv(self, **env):
        """Set (a value) or unset (None) environment variables, and have huggingface_hub read them
        again: it reads its configuration once, when first imported."""
        for name, value in env.items():
            if value is None:
                self._env.delenv(name, raising=False)
            else:
                self._env.setenv(name, value)
        _reread_hub_config()

    def answer(self, method, path, headers):
        """(status, headers, body) for one request."""
        self.requests.append((method, path))
        api, resolve = _API.match(path), _RESOLVE.match(path)
        match = api or resolve
        if match is None:
            return _error(404, "NotFound", f"no route {path}")
        repo, revision = (urllib.parse.unquote(g) for g in match.group(1, 3 if api else 2))
        state = self.repos.get(repo)
        if state is None:
            return _error(404, "RepoNotFound", f"Repository not found: {repo}")
        sha = revision if revision in state["commits"] else state["refs"].get(revision)
        if sha is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = state["commits"][sha]
        if api and api.group(2) == "revision":
            return _json({"id": repo, "sha": sha, "siblings": [{"rfilename": p} for p in sorted(files)]})
        if api:
            return _json([{"type": "file", "path": p, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                          for p, data in sorted(files.items())])
        if state["token"] and headers.get("Authorization") != f"Bearer {state['token']}":
            code = 403 if headers.get("Authorization") else 401
            return _error(code, "GatedRepo", f"Access to model {repo} is restricted.")
        data = files.get(urllib.parse.unquote(resolve.group(3)))
        if data is None:
            return _error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": sha})
        return 200, {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, data


def _json(obj):
    return 200, {"Content-Type": "application/json"}, json.dumps(obj).encode()


def _error(code, error_code, message, headers=None):
    headers = {"X-Error-Code": error_code, "X-Error-Message": message, "Content-Type": "application/json",
               **(headers or {})}
    return code, headers, json.dumps({"error": message}).encode()


def _handler(hub):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self._reply(send_body=True)

        def do_HEAD(self):
            self._reply(send_body=False)

        def _reply(self, send_body):
            status, headers, body = hub.answer(self.command, self.path.split("?")[0], self.headers)
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    return Handler


def _reread_hub_config():
    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)


@contextlib.contextmanager
def serving(tmp_path):
    """A running Hub, with huggingface_hub pointed at it through HF_ENDPOINT, its cache and home in
    ``tmp_path``, online and with no token; all as it was again on exit."""
    hub = Hub()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    # A short poll: shutdown() waits for it, at every test's end.
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.MonkeyPatch.context() as env:
            hub._env = env
            hub.setenv(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_CACHE=str(tmp_path / "hf-cache"),
                       HF_TOKEN=None, HUGGING_FACE_HUB_TOKEN=None, HF_HUB_OFFLINE=None, TRANSFORMERS_OFFLINE=None)
            yield hub
    finally:
        _reread_hub_config()  # the environment is the test's no more
        server.shutdown()
        server.server_close()
