"""Running the app on uvicorn: the listening socket, the binding rule, graceful shutdown.

SIGTERM (or Ctrl-C) stops accepting connections, lets the requests in flight finish (their
batches keep running), then stops the batcher and exits (uvicorn's own shutdown).
"""

from __future__ import annotations

import ipaddress
import socket

from pixelllm.errors import InputError
from pixelllm.serve.app import ServeSettings, create_app
from pixelllm.serve.tasks import TASKS


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_binding(host: str, api_key: str | None) -> None:
    """Any address but the loopback serves other machines: only with an API key."""
    if not is_loopback(host) and not api_key:
        raise InputError(f"binding {host} serves other machines: give an API key (--api-key KEY or PIXELLLM_API_KEY)")


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free one), or ``InputError`` saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve(predictor, settings: ServeSettings, sock: socket.socket, log_level: str = "info") -> None:
    """Serve ``predictor`` on the listening ``sock`` until SIGTERM or Ctrl-C; prints its address first."""
    import uvicorn

    app = create_app(predictor, settings)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    offered = ", ".join(name for name, task in TASKS.items() if task.available(predictor))
    print(f"pixelllm serve: http://{shown}:{port}/ (model {settings.model_name}; tasks {offered})", flush=True)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=settings.timeout_s + 5)
    uvicorn.Server(config).run(sockets=[sock])
