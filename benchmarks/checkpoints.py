"""What the checkpoints' checksum costs, measured on the embedded default and on a large file.

    python benchmarks/checkpoints.py [--large-gb 1.5] [--repeats 3] [--dir /tmp]

Each pair is timed alternately (A, B, A, B, ...) and compared by medians, so that a busy shared
machine slows both alike; the large file is read from the page cache (written just before). Rows:

1. Writing the embedded default's weights: with the checksum (and flushed to the disk) vs
   safetensors' plain writer.
2. Loading it (``PixelLLM.from_pretrained``): verified vs ``PIXELLLM_VERIFY_CHECKSUM=0``.
3. A large safetensors file (``--large-gb``): writing it with the checksum vs without (both flushed
   to the disk), verifying it alone, and reading it into memory (``load_file``, copied) for scale.

Results go to docs/training.md by hand.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pixelllm.assets import default_checkpoint
from pixelllm.files import finish
from pixelllm.model import PixelLLM
from pixelllm.model.checkpoint import _tied_names, verify_checksum, write_tensors


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def alternate(repeats: int, **actions) -> dict[str, float]:
    """The median seconds of each action, timed in turn."""
    times = {name: [] for name in actions}
    for _ in range(repeats):
        for name, action in actions.items():
            times[name].append(timed(action))
    return {name: statistics.median(values) for name, values in times.items()}


def with_env(name: str, value: str, action):
    def run():
        os.environ[name] = value
        try:
            action()
        finally:
            del os.environ[name]
    return run


def default_rows(work: Path, repeats: int) -> None:
    model = PixelLLM.from_pretrained(default_checkpoint())
    model.save_pretrained(work / "default")
    tied = _tied_names(model)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    size = (work / "default" / "model.safetensors").stat().st_size / 1e6
    saved = alternate(repeats, checksum=lambda: write_tensors(state, work / "weights.safetensors"),
                      plain=lambda: save_file(state, str(work / "plain.safetensors")))
    print(f"1. write the embedded default's weights ({size:.0f} MB): {saved['checksum']:.3f} s with the checksum "
          f"(flushed to the disk), {saved['plain']:.3f} s plain")
    loaded = alternate(repeats, verified=lambda: PixelLLM.from_pretrained(work / "default"),
                       unverified=with_env("PIXELLLM_VERIFY_CHECKSUM", "0",
                                           lambda: PixelLLM.from_pretrained(work / "default")))
    verify = alternate(repeats, verify=lambda: verify_checksum(work / "default" / "model.safetensors"))["verify"]
    print(f"2. load it: verified {loaded['verified']:.3f} s, unverified {loaded['unverified']:.3f} s; "
          f"the verification alone {verify * 1000:.1f} ms")


def large_rows(work: Path, gigabytes: float, repeats: int) -> None:
    count = int(gigabytes * 1e9 / 4 / 64)
    tensors = {f"layer.{i}": torch.randn(count, generator=torch.Generator().manual_seed(i)) for i in range(64)}
    size = sum(t.numel() * 4 for t in tensors.values()) / 1e9
    def plain() -> None:
        save_file(tensors, str(work / "plain.safetensors"))
        finish(work / "plain.safetensors")

    written = alternate(repeats, checksum=lambda: write_tensors(tensors, work / "large.safetensors"), plain=plain)
    read = alternate(repeats, verify=lambda: verify_checksum(work / "large.safetensors"),
                     load=lambda: [t.clone() for t in load_file(str(work / "large.safetensors")).values()])
    print(f"3. a {size:.2f} GB file: written and flushed to the disk in {written['checksum']:.2f} s with the "
          f"checksum, {written['plain']:.2f} s without; verified in {read['verify']:.2f} s "
          f"({size / read['verify']:.2f} GB/s), read into memory in {read['load']:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--large-gb", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        default_rows(Path(work), args.repeats)
        large_rows(Path(work), args.large_gb, args.repeats)


if __name__ == "__main__":
    main()
