"""A loopback Hugging Face Hub: serves repos the way huggingface.co does, for the real client.

Two threaded HTTP servers on 127.0.0.1 (random ports): the Hub (``/api/models/...`` metadata,
``/{repo}/resolve/{rev}/{file}``) and a "CDN" on another origin for LFS blobs, so the client
takes the same path as with huggingface.co: a HEAD on ``resolve`` answers with ``X-Repo-Commit``
and ``ETag`` (git blob sha1) for small files, and for LFS files a 302 to the CDN with
``X-Linked-Etag`` (sha256) and ``X-Linked-Size``. No ``X-Xet-*`` header is ever sent, so hf_xet
stays out and plain HTTP is used. Private repos answer 401 unless ``Authorization: Bearer
<token>`` matches; gated repos answer 401 ``GatedRepo`` without it. Every request is recorded,
and LFS downloads can be made to stall mid-file.

Uploads speak the protocol of ``HfApi`` (``create_repo``, ``create_branch``, ``create_commit``,
``upload_folder``): ``POST /api/repos/create``; ``POST /api/models/{repo}/preupload/{rev}`` (each
file ``regular`` or ``lfs``: ``lfs_threshold`` bytes and up, an LFS suffix, or a NUL byte in the
sample); the git-LFS batch API ``POST /{repo}.git/info/lfs/objects/batch`` answering the ``basic``
transfer: a PUT of the bytes to the CDN origin (as to S3's presigned URLs; the sha256 is checked)
and a verify POST on the Hub; ``POST /api/models/{repo}/commit/{branch}`` (the NDJSON payload),
which moves the branch by one commit or not at all; ``POST /api/models/{repo}/branch/{name}``.
Writes need the token when the server has one. ``huggingface_hub`` >= 1.x uploads through Xet
whenever hf_xet is installed (a client-side choice: no server answer turns it off), so
``use_hub`` sets ``HF_HUB_DISABLE_XET=1``, which also makes ``upload_folder`` one commit.

Point the client at it with ``use_hub`` (``HF_ENDPOINT=server.endpoint`` for child processes,
which read it when huggingface_hub is imported; an already imported huggingface_hub is patched).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".msgpack", ".onnx", ".onnx_data", ".h5", ".pt", ".pth",
                ".flashpack")
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub's: files of 10 MB and more are stored with LFS
# The .gitattributes a repo created through the API starts with (as on the Hub: one line per LFS pattern).
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file's contents (the Hub's ETag for non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class HubRepo:
    """A model repo: commits (sha -> files), branches (name -> sha), each commit's parent, which
    of its files are LFS files (commits made with ``push`` and no ``lfs``: by suffix) and the LFS
    objects uploaded to it (sha256 -> bytes)."""

    repo_id: str
    private: bool = False
    gated: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    parents: dict[str, str | None] = field(default_factory=dict)
    lfs: dict[str, frozenset[str]] = field(default_factory=dict)
    objects: dict[str, bytes] = field(default_factory=dict)

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

    def push(self, files: Mapping[str, bytes], branch: str = "main", lfs: Iterable[str] | None = None) -> str:
        """Add a commit with ``files`` on ``branch`` (its parent: the branch's head); returns its
        sha. ``lfs``: the paths stored with LFS (default: those with an LFS suffix)."""
        digest = hashlib.sha1(f"{self.repo_id}\0{len(self.commits)}".encode())
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        sha = digest.hexdigest()
        self.commits[sha] = dict(files)
        self.parents[sha] = self.branches.get(branch)
        if lfs is not None:
            self.lfs[sha] = frozenset(lfs)
        self.branches[branch] = sha
        return sha

    def resolve(self, rev: str) -> str | None:
        if rev in self.commits:
            return rev
        return self.branches.get(rev)

    def is_lfs(self, sha: str, name: str) -> bool:
        """Whether ``name`` is an LFS file in commit ``sha``."""
        if sha in self.lfs:
            return name in self.lfs[sha]
        return name.endswith(LFS_SUFFIXES)

    def lfs_object(self, oid: str) -> bytes | None:
        """The LFS object ``oid`` (sha256) if this repo has it: uploaded, or an LFS file of a commit."""
        if oid in self.objects:
            return self.objects[oid]
        for sha, files in list(self.commits.items()):
            for name, data in list(files.items()):
                if self.is_lfs(sha, name) and sha256(data) == oid:
                    return data
        return None


@dataclass
class Stall:
    """Stall the next ``times`` CDN downloads of files matching ``pattern`` after half the bytes."""

    pattern: str
    times: int


class _Refused(Exception):
    """An upload request refused: answered with ``status`` and the Hub's error headers."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubServer:
    """``with HubServer([repo], token="hf_...") as hub:`` then ``use_hub(monkeypatch, hub, home)``.

    Uploads: ``lfs_threshold`` (bytes; files this large go to LFS), ``lfs_suffixes``, ``username``
    (the namespace of a repo created without one), ``fail_lfs_uploads(n, status)``, ``head()``,
    ``files()``."""

    def __init__(self, repos: Iterable[HubRepo], token: str | None = None) -> None:
        self.repos = {r.repo_id: r for r in repos}
        self.token = token
        self.requests: list[tuple[str, str, str]] = []  # (server, method, path)
        self.stalls: list[Stall] = []
        self.lfs_threshold = LFS_THRESHOLD
        self.lfs_suffixes = LFS_SUFFIXES
        self.username = "user"
        self._upload_failures: list[int] = []  # statuses the next LFS PUTs answer
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
            by_sha = {sha256(data): name for repo in self.repos.values()
                      for files in list(repo.commits.values()) for name, data in files.items()}
        for server, method, path in requests:
            if method != "GET":
                continue
            if server == "cdn":
                names.add(by_sha.get(path.rsplit("/", 1)[-1], path))
            elif "/resolve/" in path:
                names.add(path.split("/resolve/", 1)[1].split("/", 1)[1])
        return names

    def head(self, repo_id: str, branch: str = "main") -> str | None:
        """The commit ``branch`` of ``repo_id`` points at (None: no such repo or branch)."""
        with self._lock:
            repo = self.repos.get(repo_id)
            return None if repo is None else repo.branches.get(branch)

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``rev`` (a branch or a commit)."""
        with self._lock:
            repo = self.repos[repo_id]
            return dict(repo.commits[repo.resolve(rev)])

    def stall(self, pattern: str, times: int) -> None:
        with self._lock:
            self.stalls.append(Stall(pattern, times))

    def fail_lfs_uploads(self, n: int, status: int = 500) -> None:
        """The next ``n`` LFS upload PUTs answer ``status`` and store nothing. The client retries
        500/502/503/504/429 (5 times, backing off 1, 2, 4, 8, 8 s) and not e.g. 403 (what S3
        answers to an expired URL): a 403 fails the upload at once."""
        with self._lock:
            self._upload_failures.extend([status] * n)

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

            def do_POST(self) -> None:
                hub._handle(self, name, head=False)

            def do_PUT(self) -> None:
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
            if h.command in ("POST", "PUT"):
                return self._handle_write(h, server, parts.path, parse_qs(parts.query))
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
        """False (after answering 401 the way the Hub does) when a private or gated repo lacks the token."""
        if not repo.private and not repo.gated:
            return True
        given = h.headers.get("Authorization", "")
        if given == f"Bearer {self.token}" and self.token:
            return True
        if given:
            self._error(h, 401, None, "Invalid credentials in Authorization header")
        elif repo.private:
            self._error(h, 401, "RepoNotFound", "Repository not found")
        else:
            self._error(h, 401, "GatedRepo", f"Access to model {repo.repo_id} is restricted. You must have access "
                                             "to it and be authenticated to access it. Please log in.")
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
        if len(bits) == 2:  # repo_info without a revision: the default branch
            bits += ["revision", "main"]
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
                "sha": sha, "private": repo.private, "disabled": False, "gated": "auto" if repo.gated else False,
                "tags": ["diffusers"], "library_name": "diffusers",
                "siblings": [{"rfilename": name} for name in sorted(files)],
            }
        else:
            subpath = "/".join(bits[4:])
            body = [self._tree_entry(name, data, repo.is_lfs(sha, name)) for name, data in sorted(files.items())
                    if not subpath or name.startswith(subpath + "/")]
        self._send(h, 200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head=False)

    @staticmethod
    def _tree_entry(name: str, data: bytes, lfs: bool | None = None) -> dict:
        entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": name}
        if name.endswith(LFS_SUFFIXES) if lfs is None else lfs:
            entry["lfs"] = {"oid": sha256(data), "size": len(data), "pointerSize": 134}
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
        if repo.is_lfs(sha, name):
            digest = sha256(data)
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
            commits = [c for r in self.repos.values() for c in list(r.commits.values())]
        if data is None:
            return self._error(h, 404, None, "no such blob")
        names = [n for c in commits for n, d in c.items() if sha256(d) == digest]
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

    # -- uploads ---------------------------------------------------------------------------------

    def _handle_write(self, h: BaseHTTPRequestHandler, server: str, raw_path: str, query: dict) -> None:
        """POST and PUT: the upload protocol. ``raw_path`` is still %-encoded (a revision may hold '/')."""
        body = self._read_body(h)
        segs = [unquote(s) for s in raw_path.lstrip("/").split("/")]
        try:
            if server == "cdn":
                if h.command == "PUT" and len(segs) == 4 and segs[0] == "upload":
                    return self._lfs_put(h, f"{segs[1]}/{segs[2]}", segs[3], body)
            elif h.command == "POST" and segs[:3] == ["api", "repos", "create"]:
                return self._create_repo(h, _json(body))
            elif h.command == "POST" and segs[:2] == ["api", "validate-yaml"]:
                return self._json(h, 200, {"errors": [], "warnings": []})
            elif h.command == "POST" and len(segs) >= 6 and segs[:2] == ["api", "models"]:
                repo_id, action, rev = f"{segs[2]}/{segs[3]}", segs[4], "/".join(segs[5:])
                if action == "preupload":
                    return self._preupload(h, repo_id, rev, _json(body))
                if action == "commit":
                    return self._commit(h, repo_id, rev, body, query)
                if action == "branch":
                    return self._create_branch(h, repo_id, rev, _json(body) if body.strip() else {})
            elif (h.command == "POST" and len(segs) == 6 and segs[1].endswith(".git")
                  and segs[2:5] == ["info", "lfs", "objects"]):
                repo_id = f"{segs[0]}/{segs[1][:-len('.git')]}"
                if segs[5] == "batch":
                    return self._lfs_batch(h, repo_id, _json(body))
                if segs[5] == "verify":
                    return self._lfs_verify(h, repo_id, _json(body))
            self._error(h, 404, None, "unknown route")
        except _Refused as refused:
            self._error(h, refused.status, refused.code, refused.message)

    @staticmethod
    def _read_body(h: BaseHTTPRequestHandler) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(h.rfile.read(size))
                h.rfile.readline()
        return h.rfile.read(int(h.headers.get("Content-Length") or 0))

    def _write_access(self, h: BaseHTTPRequestHandler, repo_id: str | None) -> HubRepo | None:
        """The repo (read access as for downloads), once the request may write: raises _Refused
        (401) when the server has a token and the request does not carry it."""
        repo = None
        if repo_id is not None:
            repo = self.repos.get(repo_id)
            if repo is None:
                raise _Refused(401, "Repository not found", "RepoNotFound")
            if not self._auth(h, repo):
                return None
        given = h.headers.get("Authorization", "")
        if self.token and given != f"Bearer {self.token}":
            raise _Refused(401, "Invalid credentials in Authorization header" if given else "Invalid username or password.")
        return repo

    def _create_repo(self, h: BaseHTTPRequestHandler, payload: dict) -> None:
        self._write_access(h, None)
        if (payload.get("type") or "model") != "model":
            raise _Refused(400, "this loopback Hub has model repos only")
        name = payload.get("name") or ""
        repo_id = f"{payload.get('organization') or self.username}/{name}"
        if not name or "/" in name:
            raise _Refused(400, f"invalid repo name {name!r}")
        private = payload.get("visibility") == "private" or payload.get("private") is True
        url = f"{self.endpoint}/{repo_id}"
        with self._lock:
            exists = repo_id in self.repos
            if not exists:
                repo = HubRepo(repo_id, private=private)
                repo.push({".gitattributes": GITATTRIBUTES}, lfs=())  # the Hub's "initial commit"
                self.repos[repo_id] = repo
        if exists:
            return self._json(h, 409, {"error": "You already created this model repo", "url": url},
                              {"X-Error-Message": "You already created this model repo"})
        self._json(h, 200, {"url": url, "name": repo_id, "id": hashlib.md5(repo_id.encode()).hexdigest()[:24]})

    def _create_branch(self, h: BaseHTTPRequestHandler, repo_id: str, branch: str, payload: dict) -> None:
        repo = self._write_access(h, repo_id)
        if repo is None:
            return
        start = payload.get("startingPoint") or "main"
        with self._lock:
            sha = repo.resolve(start)
            if sha is not None and branch not in repo.branches:
                repo.branches[branch] = sha
                return self._json(h, 200, {})
        if sha is None:
            raise _Refused(404, f"Invalid rev id: {start}", "RevisionNotFound")
        raise _Refused(409, f"Reference already exists: refs/heads/{branch}")

    def _preupload(self, h: BaseHTTPRequestHandler, repo_id: str, rev: str, payload: dict) -> None:
        repo = self._write_access(h, repo_id)
        if repo is None:
            return
        with self._lock:
            sha = repo.resolve(rev)
            files = dict(repo.commits[sha]) if sha else {}
        if sha is None:
            raise _Refused(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        answers = []
        for item in payload.get("files", []):
            path, size = item["path"], int(item["size"])
            sample = base64.b64decode(item.get("sample") or "")
            lfs = size >= self.lfs_threshold or path.endswith(tuple(self.lfs_suffixes)) or b"\0" in sample
            answer = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if path in files:  # what the client compares with its file: sha256 (LFS) or git blob sha1
                data = files[path]
                answer["oid"] = sha256(data) if repo.is_lfs(sha, path) else git_blob_sha1(data)
            answers.append(answer)
        self._json(h, 200, {"files": answers, "commitOid": sha})

    def _lfs_batch(self, h: BaseHTTPRequestHandler, repo_id: str, payload: dict) -> None:
        repo = self._write_access(h, repo_id)
        if repo is None:
            return
        if payload.get("operation") != "upload":
            raise _Refused(400, "this loopback Hub takes LFS uploads only")
        if "basic" not in payload.get("transfers", ["basic"]):
            raise _Refused(422, "no transfer adapter in common: this Hub has 'basic' only")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = str(obj["oid"]), int(obj["size"])
            entry: dict = {"oid": oid, "size": size, "authenticated": True}
            with self._lock:
                present = repo.lfs_object(oid) is not None
            if not present:  # no "actions": already there, nothing to send
                entry["actions"] = {
                    "upload": {"href": f"{self.cdn}/upload/{repo_id}/{oid}?X-Amz-Expires=900&sig=loopback",
                               "expires_in": 900},
                    "verify": {"href": f"{self.endpoint}/{repo_id}.git/info/lfs/objects/verify", "expires_in": 900},
                }
            objects.append(entry)
        self._json(h, 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, h: BaseHTTPRequestHandler, repo_id: str, oid: str, body: bytes) -> None:
        with self._lock:
            failure = self._upload_failures.pop(0) if self._upload_failures else None
            repo = self.repos.get(repo_id)
        if failure is not None:
            return self._send(h, failure, b"<Error><Code>InternalError</Code></Error>",
                              {"Content-Type": "application/xml"}, head=False)
        if repo is None:
            raise _Refused(404, "NoSuchBucket")
        if sha256(body) != oid:
            raise _Refused(400, f"BadDigest: the body's sha256 is not {oid}")
        with self._lock:
            repo.objects[oid] = body
        self._send(h, 200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}, head=False)

    def _lfs_verify(self, h: BaseHTTPRequestHandler, repo_id: str, payload: dict) -> None:
        repo = self._write_access(h, repo_id)
        if repo is None:
            return
        with self._lock:
            data = repo.objects.get(str(payload.get("oid")))
        if data is None or len(data) != payload.get("size"):
            raise _Refused(404, f"LFS object {payload.get('oid')} not found")
        self._json(h, 200, {"success": True})

    def _commit(self, h: BaseHTTPRequestHandler, repo_id: str, branch: str, body: bytes, query: dict) -> None:
        """One NDJSON commit: every line checked first, then the branch moves by one commit under
        the lock (or not at all)."""
        repo = self._write_access(h, repo_id)
        if repo is None:
            return
        if query.get("create_pr", [""])[0] in ("1", "true"):
            raise _Refused(400, "this loopback Hub does not open pull requests")
        try:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        except ValueError:
            raise _Refused(400, "the commit payload is not NDJSON") from None
        if not lines or lines[0].get("key") != "header":
            raise _Refused(400, "the commit payload does not start with its header")
        header = lines[0].get("value") or {}
        if not header.get("summary"):
            raise _Refused(400, "a commit needs a summary")
        ops: list[tuple[str, str, bytes | None]] = []  # (kind, path, data)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = _repo_path(value.get("path", ""), folder=key == "deletedFolder")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _Refused(400, f"{path}: unsupported encoding {value.get('encoding')!r}")
                ops.append(("file", path, base64.b64decode(value.get("content", ""))))
            elif key == "lfsFile":
                with self._lock:
                    data = repo.lfs_object(str(value.get("oid")))
                if data is None or ("size" in value and len(data) != value["size"]):
                    raise _Refused(400, "Your push was rejected because an LFS pointer pointed to a file that does "
                                        f"not exist. Offending file: - {path}")
                ops.append(("lfsFile", path, data))
            elif key in ("deletedFile", "deletedFolder"):
                ops.append((key, path, None))
            else:
                raise _Refused(400, f"unknown commit operation {key!r}")
        with self._lock:
            head = repo.branches.get(branch)
            error = None
            if head is None:
                error = _Refused(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            elif header.get("parentCommit") and not head.startswith(header["parentCommit"]):
                error = _Refused(412, "A commit has happened since. Please refresh and try again.")
            else:
                files = dict(repo.commits[head])
                lfs = {name for name in files if repo.is_lfs(head, name)}
                for kind, path, data in ops:
                    if kind == "deletedFile" and path not in files:
                        error = _Refused(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                        break
                    gone = [n for n in files if n == path or (kind == "deletedFolder" and n.startswith(path + "/"))]
                    if kind == "deletedFolder" and not gone:
                        error = _Refused(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                        break
                    for name in gone:
                        del files[name]
                        lfs.discard(name)
                    if data is not None:
                        files[path] = data
                        (lfs.add if kind == "lfsFile" else lfs.discard)(path)
                if error is None:
                    sha = repo.push(files, branch, lfs=lfs)
        if error is not None:
            raise error
        self._json(h, 200, {"success": True, "commitOid": sha, "commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}",
                            "pullRequestUrl": None, "hookOutput": ""})

    # -- answers ---------------------------------------------------------------------------------

    def _json(self, h: BaseHTTPRequestHandler, status: int, body: object,
              headers: Mapping[str, str] | None = None) -> None:
        self._send(h, status, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})},
                   head=False)

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


def _json(body: bytes) -> dict:
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        raise _Refused(400, "the body is not JSON") from None
    if not isinstance(value, dict):
        raise _Refused(400, "the body is not a JSON object")
    return value


def _repo_path(path: str, folder: bool = False) -> str:
    """A path in the repo as a commit may name it: relative, no '.' or '..' parts, not under .git/."""
    path = path.rstrip("/") if folder else path
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise _Refused(400, f"invalid path in repo: {path!r}")
    return path


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
    token (neither in the environment nor stored under HF_HOME), no inherited cache location, and
    HF_HUB_DISABLE_XET=1 (uploads take the LFS batch API's basic transfer, not Xet, which
    huggingface_hub picks by itself whenever hf_xet is installed). A huggingface_hub already
    imported in this process (it reads these at import) has its constants, and the endpoint of the
    HfApi behind its module-level functions (model_info, ...), patched to match."""
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    for var in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE", "HF_HUB_DISABLE_IMPLICIT_TOKEN", "APP_DATA_ROOT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        home = Path(hf_home)
        for name, value in {
            "ENDPOINT": server.endpoint,
            "HUGGINGFACE_CO_URL_TEMPLATE": server.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HUB_OFFLINE": False,
            "HF_HUB_DISABLE_XET": True,
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(home / "hub"),
            "HUGGINGFACE_HUB_CACHE": str(home / "hub"),
            "HF_TOKEN_PATH": str(home / "token"),
            "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        }.items():
            if hasattr(constants, name):
                monkeypatch.setattr(constants, name, value)
    hf_api = sys.modules.get("huggingface_hub.hf_api")
    if hf_api is not None and hasattr(hf_api, "api"):  # the HfApi behind huggingface_hub.model_info & co
        monkeypatch.setattr(hf_api.api, "endpoint", server.endpoint)
