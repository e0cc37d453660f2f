"""The two ports fal's server binds, checked before setup() runs.

``fal run --local`` serves the app on one port (``--exposed-port``, default 8080) and Prometheus
metrics on another (``--exposed-metrics-port``, default 9090). fal binds both only after the
lifespan, i.e. after setup() has loaded the model: a port held by another process (a second ``make
serve``) used to fail with uvicorn's traceback once the whole setup was done. :func:`check_ports_free`
binds each port the way uvicorn will (all interfaces, SO_REUSEADDR) and lets go at once, so such a
start fails in its first second with a message naming the port.
"""

from __future__ import annotations

import errno
import inspect
import socket
from collections.abc import Callable
from typing import Any

# fal's serve() keyword -> what the port is, and the flag that moves it.
PORT_ROLES = {
    "port": "the app server's port (fal run --local --exposed-port; make serve PORT=N)",
    "metrics_port": "fal's metrics server port (fal run --local --exposed-metrics-port; make serve uses PORT + 1010, "
                    "or METRICS_PORT=N)",
}
# The interface uvicorn binds in fal's serve().
BIND_HOST = "0.0.0.0"


class PortInUseError(RuntimeError):
    """A port fal's server needs is held by another process."""


def serve_ports(serve: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, int]:
    """The ports ``serve(**kwargs)`` will bind, by name (``port``, ``metrics_port``), its own
    defaults filled in for those not given."""
    bound = inspect.signature(serve).bind_partial(**kwargs)
    bound.apply_defaults()
    return {name: bound.arguments[name] for name in PORT_ROLES if isinstance(bound.arguments.get(name), int)}


def check_ports_free(ports: dict[str, int], host: str = BIND_HOST) -> None:
    """Raise :class:`PortInUseError` naming the first of ``ports`` that cannot be bound on ``host``."""
    for name, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                raise PortInUseError(f"port {port} is already in use: it is {PORT_ROLES[name]}. Stop the process "
                                     "that holds it, or choose another port") from None
