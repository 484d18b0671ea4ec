"""Real servers for the tests, on 127.0.0.1 only: uvicorn in a thread of the test process, or
``pixelllm serve`` as a process of its own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2
import uvicorn

from pixelllm.serve.app import ServeSettings, create_app
from pixelllm.serve.server import listen

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "pixelllm" / "assets" / "samples"
PHOTOS = ROOT / "tests" / "fixtures" / "real" / "photos"


@contextmanager
def running(predictor, **settings) -> Iterator[str]:
    """``create_app(predictor, ServeSettings(**settings))`` on uvicorn at a free port; yields its URL."""
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(predictor, ServeSettings(**settings)), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)


@contextmanager
def serve_process(*args: str, log: Path, env: dict | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """``pixelllm serve --port 0 ARGS`` as a process (stderr to ``log``, ``env`` added to the environment);
    yields it and its URL."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    with open(log, "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "pixelllm.cli", "serve", "--port", "0",
                                    "--log-level", "warning", *args],
                                   stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=ROOT)
    try:
        line = process.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert found, f"no address in {line!r}; log: {log.read_text()}"
        yield process, found.group(0)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)
        process.stdout.close()


HTTP = httpx2.Client()  # one client: making one costs some 40 ms (its TLS context)


def post(url: str, task: str, image: Path | bytes, timeout: float = 60, headers=None, **fields) -> httpx2.Response:
    """``POST /v1/{task}`` as multipart (the page's form), ``fields`` as the form's text."""
    content = image.read_bytes() if isinstance(image, Path) else image
    return HTTP.post(f"{url}/v1/{task}", files={"image": ("image", content)}, data=fields, timeout=timeout,
                     headers=headers)


def metric(url: str, name: str, headers=None) -> float:
    """The sum of every sample of ``name`` (all label values) in ``GET /metrics``."""
    text = HTTP.get(f"{url}/metrics", headers=headers).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))
