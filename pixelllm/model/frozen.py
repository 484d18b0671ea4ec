"""Frozen submodules: no gradients, and eval mode however the model around them trains."""

from __future__ import annotations

from torch import nn


class KeepsFrozenInEval(nn.Module):
    """A part whose submodules at the paths in ``self.frozen`` (``"sam"``, ``"heads.mask"``) stay in
    eval mode (no dropout, no stochastic depth in a frozen tower); the part itself decides which of
    their weights still get gradients."""

    frozen: tuple[str, ...] = ()

    def train(self, mode: bool = True):
        super().train(mode)
        for path in self.frozen:
            self.get_submodule(path).eval()
        return self
