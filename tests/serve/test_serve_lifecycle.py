"""``pixelllm serve`` as a process: its address, a port in use, and SIGTERM finishing the work in flight."""

import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import pytest
from serve_helpers import SAMPLES, metric, post, serve_process

from pixelllm.cli import main


def test_sigterm_finishes_the_requests_in_flight_then_exits(tmp_path):
    images = sorted(SAMPLES.glob("*.png"))
    key = {"Authorization": "Bearer from-the-environment"}
    with serve_process("--max-batch", "8", "--max-wait-ms", "1500", log=tmp_path / "serve.log",
                       env={"PIXELLLM_API_KEY": "from-the-environment"}) as (process, url):
        assert httpx2.get(f"{url}/healthz").json() == {"status": "ok"}
        assert post(url, "caption", images[0]).status_code == 401
        with ThreadPoolExecutor(len(images)) as pool:
            answers = [pool.submit(post, url, "caption", image, headers=key) for image in images]
            deadline = time.monotonic() + 20
            while metric(url, "pixelllm_queue_depth", key) < len(images):  # all admitted, the batch still gathering
                assert time.monotonic() < deadline
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            statuses = [answer.result().status_code for answer in answers]
        assert statuses == [200] * len(images)
        assert process.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
        with pytest.raises(httpx2.ConnectError):
            httpx2.get(f"{url}/healthz")


def test_a_port_in_use_is_a_one_line_error(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot listen on 127.0.0.1:{port}"), err


@pytest.mark.parametrize("args, message", [
    (["--max-batch", "0"], "--max-batch: must be at least 1"),
    (["--max-queue", "many"], "--max-queue: not a whole number"),
])
def test_bad_options_are_one_line_errors(capsys, args, message):
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
