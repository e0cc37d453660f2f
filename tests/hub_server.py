"""A loopback Hugging Face Hub: serves repos the way huggingface.co does, for the real client.

Two threaded HTTP servers on 127.0.0.1 (random ports): the Hub (``/api/models/...`` metadata,
``/{repo}/resolve/{rev}/{file}``) and a "CDN" on another origin for LFS blobs, so the client
takes the same path as with huggingface.co: a HEAD on ``resolve`` answers with ``X-Repo-Commit``
and ``ETag`` (git blob sha1) for small files, and for LFS files a 302 to the CDN with
``X-Linked-Etag`` (sha256) and ``X-Linked-Size``. No ``X-Xet-*`` header is ever sent, so hf_xet
stays out and plain HTTP is used. Private repos answer 401 unless ``Authorization: Bearer
<token>`` matches. Every request is recorded, and LFS downloads can be made to stall mid-file.

Point the client at it with ``HF_ENDPOINT=server.endpoint`` (read when huggingface_hub is
imported, i.e. in the download child process).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".msgpack", ".onnx", ".onnx_data", ".h5", ".pt", ".pth")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file's contents (the Hub's ETag for non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class HubRepo:
    """A model repo: commits (sha -> files) and branches (name -> sha)."""

    repo_id: str
    private: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dir(cls, repo_id: str, path: str | Path, extra: Mapping[str, bytes] | None = None,
                 private: bool = False) -> HubRepo:
        """A repo whose ``main`` holds every file under ``path`` plus ``extra``."""
        root = Path(path)
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        files.update(extra or {})
        repo = cls(repo_id, private=private)
        repo.push(files)
        return repo

    def push(self, files: Mapping[str, bytes], branch: str = "main") -> str:
        """Add a commit with ``files`` on ``branch``; returns its sha."""
        digest = hashlib.sha1(f"{self.repo_id}\0{len(self.commits)}".encode())
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        sha = digest.hexdigest()
        self.commits[sha] = dict(files)
        self.branches[branch] = sha
        return sha

    def resolve(self, rev: str) -> str | None:
        if rev in self.commits:
            return rev
        return self.branches.get(rev)


@dataclass
class Stall:
    """Stall the next ``times`` CDN downloads of files matching ``pattern`` after half the bytes."""

    pattern: str
    times: int


class HubServer:
    """``with HubServer([repo], token="hf_...") as hub:`` then ``HF_ENDPOINT=hub.endpoint``."""

    def __init__(self, repos: Iterable[HubRepo], token: str | None = None) -> None:
        self.repos = {r.repo_id: r for r in repos}
        self.token = token
        self.requests: list[tuple[str, str, str]] = []  # (server, method, path)
        self.stalls: list[Stall] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._blobs: dict[str, bytes] = {}
        self._servers = [self._make_server("hub"), self._make_server("cdn")]
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> HubServer:
        for srv in self._servers:
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    # -- inspection ------------------------------------------------------------------------------

    def count(self, server: str | None = None, method: str | None = None, path_glob: str = "*") -> int:
        with self._lock:
            return sum(
                1 for s, m, p in self.requests
                if (server is None or s == server) and (method is None or m == method) and fnmatch.fnmatch(p, path_glob)
            )

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()

    def downloaded(self) -> set[str]:
        """Repo file paths whose contents were sent (GET on resolve, or their LFS blob)."""
        names: set[str] = set()
        with self._lock:
            requests = list(self.requests)
        by_sha = {hashlib.sha256(data).hexdigest(): name
                  for repo in self.repos.values() for files in repo.commits.values() for name, data in files.items()}
        for server, method, path in requests:
            if method != "GET":
                continue
            if server == "cdn":
                names.add(by_sha.get(path.rsplit("/", 1)[-1], path))
            elif "/resolve/" in path:
                names.add(path.split("/resolve/", 1)[1].split("/", 1)[1])
        return names

    def stall(self, pattern: str, times: int) -> None:
        with self._lock:
            self.stalls.append(Stall(pattern, times))

    # -- serving ---------------------------------------------------------------------------------

    def _make_server(self, name: str) -> ThreadingHTTPServer:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, name, head=True)

            def do_GET(self) -> None:
                hub._handle(self, name, head=False)

        srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        srv.daemon_threads = True
        return srv

    def _handle(self, h: BaseHTTPRequestHandler, server: str, head: bool) -> None:
        parts = urlsplit(h.path)
        path = unquote(parts.path)
        with self._lock:
            self.requests.append((server, h.command, path))
        try:
            if server == "cdn":
                return self._serve_blob(h, path, head)
            if path.startswith("/api/models/"):
                return self._serve_api(h, path[len("/api/models/"):], parse_qs(parts.query))
            if "/resolve/" in path:
                return self._serve_resolve(h, path, head)
            self._error(h, 404, "EntryNotFound", "not found")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _auth(self, h: BaseHTTPRequestHandler, repo: HubRepo) -> bool:
        """False (after answering 401 the way the Hub does) when a private repo lacks the token."""
        if not repo.private:
            return True
        given = h.headers.get("Authorization", "")
        if given == f"Bearer {self.token}" and self.token:
            return True
        if given:
            self._error(h, 401, None, "Invalid credentials in Authorization header")
        else:
            self._error(h, 401, "RepoNotFound", "Repository not found")
        return False

    def _find(self, h: BaseHTTPRequestHandler, repo_id: str, rev: str) -> tuple[HubRepo, str] | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 401, "RepoNotFound", "Repository not found")
            return None
        if not self._auth(h, repo):
            return None
        sha = repo.resolve(rev)
        if sha is None:
            self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo, sha

    def _serve_api(self, h: BaseHTTPRequestHandler, rest: str, query: dict) -> None:
        bits = rest.split("/")
        if len(bits) < 4 or bits[2] not in ("revision", "tree"):
            return self._error(h, 404, None, "unknown api route")
        repo_id, kind, rev = f"{bits[0]}/{bits[1]}", bits[2], bits[3]
        found = self._find(h, repo_id, rev)
        if found is None:
            return
        repo, sha = found
        files = repo.commits[sha]
        if kind == "revision":
            body = {
                "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
                "sha": sha, "private": repo.private, "disabled": False, "gated": False,
                "tags": ["diffusers"], "library_name": "diffusers",
                "siblings": [{"rfilename": name} for name in sorted(files)],
            }
        else:
            subpath = "/".join(bits[4:])
            body = [self._tree_entry(name, data) for name, data in sorted(files.items())
                    if not subpath or name.startswith(subpath + "/")]
        self._send(h, 200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head=False)

    @staticmethod
    def _tree_entry(name: str, data: bytes) -> dict:
        entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": name}
        if name.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _serve_resolve(self, h: BaseHTTPRequestHandler, path: str, head: bool) -> None:
        repo_part, rest = path.lstrip("/").split("/resolve/", 1)
        rev, _, name = rest.partition("/")
        found = self._find(h, repo_part, rev)
        if found is None:
            return
        repo, sha = found
        files = repo.commits[sha]
        if name not in files:
            return self._error(h, 404, "EntryNotFound", f"{name} not found", {"X-Repo-Commit": sha})
        data = files[name]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"'}
        if name.endswith(LFS_SUFFIXES):
            digest = hashlib.sha256(data).hexdigest()
            with self._lock:
                self._blobs[digest] = data
            headers.update({
                "Location": f"{self.cdn}/lfs/{digest}?expires=9999999999&sig=loopback",
                "X-Linked-Etag": f'"{digest}"',
                "X-Linked-Size": str(len(data)),
            })
            return self._send(h, 302, b"", headers, head=True)
        self._send(h, 200, data, {**headers, "Content-Type": "application/octet-stream"}, head=head)

    def _serve_blob(self, h: BaseHTTPRequestHandler, path: str, head: bool) -> None:
        digest = path.rsplit("/", 1)[-1]
        with self._lock:
            data = self._blobs.get(digest)
        if data is None:
            return self._error(h, 404, None, "no such blob")
        names = [n for r in self.repos.values() for c in r.commits.values() for n, d in c.items()
                 if hashlib.sha256(d).hexdigest() == digest]
        start = 0
        rng = h.headers.get("Range", "")
        if rng.startswith("bytes=") and rng[6:].split("-")[0].isdigit():
            start = int(rng[6:].split("-")[0])
        body = data[start:]
        status = 206 if start else 200
        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{digest}"'}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if not head and self._take_stall(names):
            h.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            self._stop.wait(60)  # hold the connection open without sending another byte
            return
        self._send(h, status, body, headers, head=head)

    def _take_stall(self, names: list[str]) -> bool:
        with self._lock:
            for stall in self.stalls:
                if stall.times > 0 and any(fnmatch.fnmatch(n, stall.pattern) for n in names):
                    stall.times -= 1
                    return True
        return False

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, body: bytes, headers: Mapping[str, str], head: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head and body:
            h.wfile.write(body)

    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str | None, message: str,
               extra: Mapping[str, str] | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(h, status, json.dumps({"error": message}).encode(), headers, head=h.command == "HEAD")


def decoy_files(pipeline_dir: str | Path) -> dict[str, bytes]:
    """Files a real SD repo has that a pipeline download must not fetch: .bin copies next to
    safetensors, flax/onnx weights, a root single-file checkpoint, and an fp16 variant of the unet
    (fetched only when variant="fp16" is asked for)."""
    from safetensors.torch import load_file, save

    root = Path(pipeline_dir)
    unet = load_file(root / "unet" / "diffusion_pytorch_model.safetensors")
    unet_fp16 = save({k: v.half() if v.is_floating_point() else v for k, v in unet.items()})
    return {
        "unet/diffusion_pytorch_model.bin": b"decoy-bin" * 10,
        "unet/diffusion_pytorch_model.fp16.safetensors": unet_fp16,
        "text_encoder/flax_model.msgpack": b"decoy-flax" * 10,
        "vae/diffusion_pytorch_model.onnx": b"decoy-onnx" * 10,
        "v1-5-pruned-emaonly.safetensors": b"decoy-single-file" * 10,
        "README.md": b"# tiny\n",
        ".gitattributes": b"*.safetensors filter=lfs\n",
    }


def use_hub(monkeypatch, server: HubServer, hf_home: Path) -> None:
    """Point the Hub client at ``server`` for this test: HF_ENDPOINT set, no offline mode, no
    token (neither in the environment nor stored under HF_HOME), no inherited cache location."""
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    for var in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE", "HF_HUB_DISABLE_IMPLICIT_TOKEN", "APP_DATA_ROOT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(hf_home))
