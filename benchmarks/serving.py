"""Throughput of ``pixelllm serve`` with dynamic batching against ``--max-batch 1``, side by side.

    python benchmarks/serving.py                      # 16 clients, every workload, 3 rounds of 20 s per server
    python benchmarks/serving.py --clients 16 --seconds 20 --rounds 3 --workload caption

Both servers run the embedded default on 127.0.0.1 at once; each round loads one and then the
other with the same clients (every client sends its next request as soon as the last is
answered), so a busy machine slows both alike and the ratio holds. Prints answers per second,
median latency and the ratio of each round, then the median ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx2

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "pixelllm" / "assets" / "samples"
PHOTOS = ROOT / "tests" / "fixtures" / "real" / "photos"
WORKLOADS = {  # (task, image, form fields), asked in turn
    "caption": [("caption", SAMPLES / f"shapes{i}.png", {}) for i in (1, 2, 3)],
    "region": [("caption", SAMPLES / name, {"box": box}) for name, box in [
        ("shapes1.png", "[323, 154, 416, 244]"), ("shapes2.png", "[157, 118, 261, 223]"),
        ("shapes3.png", "[9, 53, 87, 132]")]],
    "locate": [("locate", SAMPLES / "shapes2.png", {"expression": "the yellow star"}),
               ("locate", SAMPLES / "shapes3.png", {"expression": "the black hexagon above the red square"})],
    "mix": [
        ("caption", SAMPLES / "shapes1.png", {}),
        ("locate", SAMPLES / "shapes2.png", {"expression": "the yellow star"}),
        ("segment", SAMPLES / "shapes3.png", {"expression": "the black hexagon"}),
        ("densecap", SAMPLES / "shapes2.png", {"max_regions": "5"}),
        ("caption", PHOTOS / "chelsea.png", {"box": "[100, 50, 300, 250]"}),
    ],
}


def start(max_batch: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "pixelllm.cli", "serve", "--port", "0", "--log-level", "warning",
                                "--max-batch", str(max_batch), "--max-queue", "256", *extra],
                               stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = process.stdout.readline()
    found = re.search(r"http://127\.0\.0\.1:\d+", line)
    if not found:
        process.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return process, found.group(0)


async def user(http: httpx2.AsyncClient, url: str, requests: list, first: int, until: float, latencies: list):
    images = {path: path.read_bytes() for _, path, _ in requests}
    turn = first
    while time.monotonic() < until:
        task, path, fields = requests[turn % len(requests)]
        turn += 1
        started = time.monotonic()
        response = await http.post(f"{url}/v1/{task}", files={"image": ("i", images[path])}, data=fields)
        response.raise_for_status()
        latencies.append(time.monotonic() - started)


def batch_totals(url: str) -> tuple[float, float, float]:
    """The server's batches so far (``/metrics``): requests in them, their count, the model's busy seconds."""
    lines = httpx2.get(f"{url}/metrics").text.splitlines()
    return tuple(sum(float(line.split()[-1]) for line in lines if line.startswith(f"{name}{{"))
                 for name in ("pixelllm_batch_size_sum", "pixelllm_batch_size_count", "pixelllm_batch_seconds_sum"))


async def round_trip(url: str, requests: list, clients: int, seconds: float) -> tuple[float, float, float, float]:
    """Answers per second, median latency, mean batch size and the model's busy share for ``clients``
    users during ``seconds``."""
    latencies: list[float] = []
    limits = httpx2.Limits(max_connections=clients)
    async with httpx2.AsyncClient(timeout=300, limits=limits) as http:
        for task, path, fields in requests:  # warm the server's first call of each task
            await http.post(f"{url}/v1/{task}", files={"image": ("i", path.read_bytes())}, data=fields)
        before = batch_totals(url)
        started = time.monotonic()
        await asyncio.gather(*(user(http, url, requests, n, started + seconds, latencies) for n in range(clients)))
        elapsed = time.monotonic() - started
    requests_run, batches, busy = (a - b for a, b in zip(batch_totals(url), before, strict=True))
    return len(latencies) / elapsed, statistics.median(latencies), requests_run / batches, busy / elapsed


def cpu_name() -> str:
    try:
        found = re.search(r"Model name:\s*(.+)", subprocess.run(["lscpu"], capture_output=True, text=True).stdout)
        return found.group(1).strip() if found else platform.processor()
    except OSError:
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0, help="per server per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=16, help="the batching server's --max-batch")
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument("--serve-args", default="", help="more options for both servers, e.g. '--threads 2'")
    args = parser.parse_args()
    extra = args.serve_args.split()
    import os

    print(f"{cpu_name()}, {os.cpu_count()} CPUs; {args.clients} clients, {args.seconds:g} s per server per round; "
          f"batching --max-batch {args.max_batch} vs --max-batch 1 {' '.join(extra)}")
    servers = {"batched": start(args.max_batch, extra), "one by one": start(1, extra)}
    try:
        for name in WORKLOADS if args.workload == "all" else [args.workload]:
            ratios = []
            for number in range(args.rounds):
                measured = {key: asyncio.run(round_trip(url, WORKLOADS[name], args.clients, args.seconds))
                            for key, (_, url) in servers.items()}
                (fast, fast_p50, size, fast_busy), (slow, slow_p50, _, slow_busy) = measured.values()
                ratios.append(fast / slow)
                print(f"{name} round {number + 1}: batched {fast:6.2f}/s (p50 {fast_p50:.2f} s, mean batch {size:.1f}, "
                      f"model busy {fast_busy:.0%}), one by one {slow:6.2f}/s (p50 {slow_p50:.2f} s, model busy "
                      f"{slow_busy:.0%}): {fast / slow:.2f}x", flush=True)
            print(f"{name}: throughput ratio, batched / one by one: {statistics.median(ratios):.2f}x "
                  f"(median of {args.rounds} rounds: {', '.join(f'{r:.2f}' for r in ratios)})", flush=True)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(60)


if __name__ == "__main__":
    main()
