"""A hostile https server for the tests of caller URLs, on an address fal's SSRF guard lets through.

fal's client refuses loopback and private addresses, as it must; so the server listens on a
globally routable address (:data:`ADDRESS`, in a block no one here routes to) added to this
machine's loopback interface for the session, with a self-signed certificate that the children
trust through ``SSL_CERT_FILE``. Nothing in the app is switched off for it. Needs root, ``ip`` and
``openssl``; :func:`start` says why it cannot run otherwise.

Paths: ``/files/<name>`` (what ``files[name]`` holds), ``/status/<code>``, ``/drip/<bytes>/<every_s>``
(a body that beats every read timeout), ``/hang`` (headers, then nothing), ``/truncated/<bytes>``
(declares more than it sends), ``/loop`` (redirects to itself), ``/to-http/<name>`` (302 to the
same file over plain http), ``/huge`` (declares 10 GB). ``hits[path]`` counts the requests.
"""

from __future__ import annotations

import collections
import http.server
import shutil
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# TEST range: 11.0.0.0/8 is globally routable (ipaddress.is_global) and reached by nothing here.
ADDRESS = "11.211.0.7"


class Unavailable(RuntimeError):
    """Why the server cannot run on this machine."""


@dataclass
class HostileServer:
    url: str  # https://ADDRESS:port
    http_url: str  # http://ADDRESS:port, for redirects to plain http
    files: dict[str, bytes] = field(default_factory=dict)
    hits: collections.Counter = field(default_factory=collections.Counter)
    open_connections: list[int] = field(default_factory=lambda: [0])

    def file_url(self, name: str, data: bytes) -> str:
        self.files[name] = data
        return f"{self.url}/files/{name}"


def _handler(server: HostileServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            server.hits[self.path] += 1
            server.open_connections[0] += 1
            try:
                self._answer(self.path.strip("/").split("/"))
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
                pass
            finally:
                server.open_connections[0] -= 1

        def _answer(self, parts: list[str]) -> None:
            head = parts[0]
            if head == "files" and parts[1] in server.files:
                self._send(200, server.files[parts[1]])
            elif head == "status":
                self._send(int(parts[1]), b"nope")
            elif head == "drip":
                total, every = int(parts[1]), float(parts[2])
                self._headers(200, total)
                for _ in range(total // 1024):
                    self.wfile.write(b"x" * 1024)
                    self.wfile.flush()
                    time.sleep(every)
            elif head == "hang":
                self._headers(200, 1000)
                time.sleep(60)
            elif head == "truncated":
                self._headers(200, int(parts[1]) + 100)
                self.wfile.write(b"y" * int(parts[1]))
                self.wfile.flush()
                self.close_connection = True
            elif head == "loop":
                self._redirect(f"{server.url}/loop")
            elif head == "to-http":
                self._redirect(f"{server.http_url}/files/{parts[1]}")
            elif head == "huge":
                self._headers(200, 10 * 1024**3)
                self.wfile.write(b"z" * 65536)
            else:
                self._send(404, b"no such path")

        def _headers(self, status: int, length: int) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(length))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()

        def _send(self, status: int, body: bytes) -> None:
            self._headers(status, len(body))
            self.wfile.write(body)

        def _redirect(self, location: str) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise Unavailable(f"{' '.join(command)} failed: {result.stderr.strip()[:200]}")


def start(workdir: Path) -> tuple[HostileServer, str, callable]:
    """The server, the CA file to put in ``SSL_CERT_FILE``, and a function that stops it all."""
    for tool in ("ip", "openssl"):
        if shutil.which(tool) is None:
            raise Unavailable(f"no {tool} command on this machine")
    listed = subprocess.run(["ip", "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True).stdout
    added = f" {ADDRESS}/" not in listed
    if added:
        _run(["ip", "addr", "add", f"{ADDRESS}/32", "dev", "lo"])
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    _run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=hostile.test",
          "-addext", f"subjectAltName=IP:{ADDRESS}", "-keyout", str(key), "-out", str(cert)])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    tls = http.server.ThreadingHTTPServer((ADDRESS, 0), http.server.BaseHTTPRequestHandler)
    plain = http.server.ThreadingHTTPServer((ADDRESS, 0), http.server.BaseHTTPRequestHandler)
    server = HostileServer(f"https://{ADDRESS}:{tls.server_address[1]}", f"http://{ADDRESS}:{plain.server_address[1]}")
    tls.RequestHandlerClass = plain.RequestHandlerClass = _handler(server)
    tls.daemon_threads = plain.daemon_threads = True
    tls.socket = context.wrap_socket(tls.socket, server_side=True)
    for s in (tls, plain):
        threading.Thread(target=s.serve_forever, daemon=True).start()

    def stop() -> None:
        for s in (tls, plain):
            s.shutdown()
            s.server_close()
        if added:
            subprocess.run(["ip", "addr", "del", f"{ADDRESS}/32", "dev", "lo"], capture_output=True)

    with socket.create_connection((ADDRESS, tls.server_address[1]), timeout=5):
        pass
    return server, str(cert), stop
