"""Wall time of ``pixelllm`` commands, this tree against a commit, side by side.

    python benchmarks/cli.py                         # against HEAD (uncommitted changes vs the last commit)
    python benchmarks/cli.py --against HEAD~1 --repeats 7

The commit is extracted with ``git archive`` into a temporary directory (the working tree is not
touched) and both are run from the same interpreter, alternately, each command ``--repeats``
times; the medians and their ratio are printed. Commands: ``caption`` on the 451 x 300 photo (the
embedded default model), and ``--help`` (start-up alone).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "tests" / "fixtures" / "real" / "photos" / "chelsea.png"
COMMANDS = {"caption chelsea.png": ["caption", str(PHOTO)], "--help": ["--help"]}


def extract(revision: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", revision], check=True,
                             capture_output=True).stdout
    tar = into / "tree.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as opened:
        opened.extractall(into / "tree", filter="data")
    return into / "tree"


def seconds(tree: Path, arguments: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}  # ahead of the editable install of this checkout
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pixelllm.cli", *arguments], env=env, check=True, cwd=tree,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="HEAD", help="the commit to compare with (default HEAD)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        old = extract(args.against, Path(temporary))
        trees = {"this tree": ROOT, args.against: old}
        for name, arguments in COMMANDS.items():
            times = {tree: [] for tree in trees}
            for tree_name, tree in [*trees.items()] * args.repeats:
                times[tree_name].append(seconds(tree, arguments))
            new, before = (statistics.median(times[t]) for t in trees)
            print(f"pixelllm {name}: this tree {new:.2f} s, {args.against} {before:.2f} s "
                  f"(medians of {args.repeats}): time ratio {new / before:.2f}", flush=True)


if __name__ == "__main__":
    main()
