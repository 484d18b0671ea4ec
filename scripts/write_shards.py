"""Write a task's data (any layout of ``pixelllm.data.sources``) into tar shards, which training
streams instead of holding in memory (docs/data.md, "Shards").

    PYTHONPATH=. python scripts/write_shards.py --task refer --data runs/shapes_tiny/data/train \
        --out shards/refer

A shapes-world split holds several datasets (narratives, RefCOCO, Visual Genome): write one shard
folder per task's layout. Samples whose image cannot be read are left out and counted.
"""

from __future__ import annotations

import argparse
import sys

from pixelllm.data.report import SkipReport
from pixelllm.data.shards import ShardWriter
from pixelllm.data.sources import LAYOUTS, open_source
from pixelllm.errors import DataError, PixelLLMError


def write_source_shards(task: str, data: str, out: str, *, images: str | None = None, split: str | None = None,
                        samples_per_shard: int = 1000) -> tuple[int, str]:
    """Write the samples of ``task``'s data at ``data`` into shards in ``out``; returns the number
    of shards and a line of what was kept and skipped."""
    source = open_source(task, data, images=images, split=split)
    report = SkipReport("shards")
    with ShardWriter(out, samples_per_shard) as writer:
        for sample in source.reader:
            try:
                writer.write(sample)
            except DataError:
                report.skip("unreadable image")
                continue
            report.keep()
    return len(writer.close()), f"{source.reader.summary()}; {report.summary()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="write_shards", description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, choices=sorted(LAYOUTS))
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--images", default=None)
    parser.add_argument("--split", default=None)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    args = parser.parse_args(argv)
    try:
        shards, summary = write_source_shards(args.task, args.data, args.out, images=args.images, split=args.split,
                                              samples_per_shard=args.samples_per_shard)
    except PixelLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{shards} shards in {args.out}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
