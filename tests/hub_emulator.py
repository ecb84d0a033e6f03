"""A local folder served in the Hugging Face Hub's URL layout on loopback, for download tests.

The test machines have no Hub. `HubEmulator(root)` serves `root/<org>/<name>/...` as model repos, with
the endpoints huggingface_hub calls for a download:

- `GET /api/models/{repo}[/revision/{rev}]`: the model info with files metadata (siblings with sizes,
  blob ids, LFS sha256 for weights);
- `HEAD`/`GET /{repo}/resolve/{rev}/{path}`: the file, with X-Repo-Commit, ETag and Content-Length, and
  `Range: bytes=N-` answered 206 (resume).

No Xet headers are sent, so the library downloads over plain HTTP, as from a server without Xet.
It can refuse repos (401 private, 403 gated), throttle its output (so a test can cancel mid-file), and
counts the bytes of file content it sent.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")


def commit_of(repo_id: str) -> str:
    return hashlib.sha1(repo_id.encode()).hexdigest()


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubEmulator:
    """Start with `with HubEmulator(root) as hub:`; `hub.url` is the HF_ENDPOINT to use."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.private: set[str] = set()   # answered 401 unless the request has "Bearer <token>"
        self.gated: set[str] = set()     # answered 403 GatedRepo
        self.token = "hf_test_token"
        self.throttle: tuple[int, float] | None = None  # (bytes per write, seconds between writes)
        self.hold = False  # True: file content stops flowing (after the first write) until it is False again
        self.bytes_served = 0
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Range header)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-emulator", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add_repo(self, repo_id: str, folder: Path | None = None, files: dict[str, bytes] | None = None) -> Path:
        """Copy a model folder (and/or write files) into the served tree as `repo_id`."""
        target = self.root / repo_id
        if folder is not None:
            shutil.copytree(folder, target, dirs_exist_ok=True)
        for name, data in (files or {}).items():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(data)
        target.mkdir(parents=True, exist_ok=True)
        return target

    def point_hf_at(self, monkeypatch) -> None:
        """HF_ENDPOINT at this server, also in huggingface_hub's constants (read once at import; the URL
        template must agree with ENDPOINT, or hf_hub_url keeps huggingface.co). No token of this machine is sent."""
        import huggingface_hub.constants as constants

        monkeypatch.setenv("HF_ENDPOINT", self.url)
        monkeypatch.setattr(constants, "ENDPOINT", self.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", self.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        home = self.root.parent / "hf-home"  # no saved token of this machine, no registry file in ~/.cache
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / "agent_harnesses.json"))

    def __enter__(self) -> HubEmulator:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.throttle, self.hold = None, False
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    # -- what the Hub would say --------------------------------------------------------------------
    def _files(self, repo_id: str) -> list[Path]:
        folder = self.root / repo_id
        return sorted(p for p in folder.rglob("*") if p.is_file())

    def _etag(self, path: Path) -> str:
        data = path.read_bytes()
        return hashlib.sha256(data).hexdigest() if path.name.endswith(LFS_SUFFIXES) else git_blob_id(data)

    def model_info(self, repo_id: str) -> dict:
        siblings = []
        for p in self._files(repo_id):
            data = p.read_bytes()
            entry = {"rfilename": p.relative_to(self.root / repo_id).as_posix(), "size": len(data),
                     "blobId": git_blob_id(data)}
            if p.name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            siblings.append(entry)
        return {"id": repo_id, "modelId": repo_id, "sha": commit_of(repo_id), "private": repo_id in self.private,
                "siblings": siblings}

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _error(self, status: int, code: str = "", message: str = "") -> None:
                payload = json.dumps({"error": message or code}).encode()
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                if message:
                    self.send_header("X-Error-Message", message)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _refused(self, repo_id: str) -> bool:
                if not (hub.root / repo_id).is_dir():
                    self._error(404, "RepoNotFound", "Repository not found")
                    return True
                if repo_id in hub.gated and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    self._error(403, "GatedRepo", "Access to this model is restricted")
                    return True
                if repo_id in hub.private and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    self._error(401, "", "Invalid username or password.")
                    return True
                return False

            def _serve(self, body: bool) -> None:
                path = self.path.split("?")[0]
                with hub._lock:
                    hub.requests.append((self.command, path, self.headers.get("Range", "")))
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
                if m:
                    if not self._refused(m[1]):
                        self._json(hub.model_info(m[1]), body)
                    return
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if not m:
                    self._error(404, "", "Not found")
                    return
                repo_id, _revision, name = m[1], m[2], m[3]
                if self._refused(repo_id):
                    return
                file = hub.root / repo_id / name
                if not file.is_file():
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Repo-Commit", commit_of(repo_id))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._file(repo_id, file, body)

            def _json(self, data: dict, body: bool) -> None:
                payload = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if body:
                    self.wfile.write(payload)

            def _file(self, repo_id: str, file: Path, body: bool) -> None:
                data = file.read_bytes()
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if m and body and int(m[1]) < len(data):
                    start = int(m[1])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", commit_of(repo_id))
                self.send_header("ETag", f'"{hub._etag(file)}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                step, pause = hub.throttle or (len(data) or 1, 0.0)
                try:
                    for i in range(start, len(data), step):
                        piece = data[i:i + step]
                        self.wfile.write(piece)
                        self.wfile.flush()
                        with hub._lock:
                            hub.bytes_served += len(piece)
                        if pause and hub.throttle:
                            time.sleep(pause)
                        while hub.hold and i + step < len(data):
                            time.sleep(0.01)
                except (BrokenPipeError, ConnectionResetError):  # the client cancelled
                    self.close_connection = True

        return Handler
