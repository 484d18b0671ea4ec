"""``python -m pixelllm.train`` with a deliberately broken data parallelism, for ``tests/test_train.py``:
rank 1's gradients are dropped (its loss keeps its value, for the log), so the processes no longer
average every micro-batch. The test checks that comparing 2 processes with 1 catches it."""

import sys

import torch.distributed as dist

from pixelllm import train
from pixelllm.model import PixelLLM

_forward = PixelLLM.forward


def _forward_dropping_rank_1(self, batch, all_heads=False):
    out = _forward(self, batch, all_heads)
    if dist.get_rank() == 1:
        out.loss = out.loss.detach() + 0.0 * out.loss  # the same value, a zero gradient
    return out


PixelLLM.forward = _forward_dropping_rank_1

if __name__ == "__main__":
    sys.exit(train.main())
