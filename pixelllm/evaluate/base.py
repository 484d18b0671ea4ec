"""The shape every metric shares: feed it batch by batch, read a dict of floats at the end.

A metric never crashes on one bad record. The rule, the same for every task family:

- a **malformed ground-truth** record (NaN or inverted box, empty mask, no usable reference) cannot
  be scored at all: the sample is left out and counted in ``num_skipped``;
- a **malformed prediction** (NaN or inverted box, unreadable mask, missing caption) is scored as
  the worst outcome the metric allows (a miss, a false positive, an empty caption) and counted in
  ``num_invalid_predictions``; leaving it out would flatter the model.

A batch whose *structure* is wrong (a box array that is not ``(N, 4)``, sequences of different
lengths) is a caller's bug and raises ``ValueError``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sized
from typing import Any

import numpy as np

STANDARD_COUNTS = ("num_samples", "num_skipped", "num_invalid_predictions")


def as_array(values: Any, dtype: type | None = np.float64) -> np.ndarray:
    """A numpy copy of ``values`` (a numpy array, nested lists, or a torch tensor on any device);
    ``dtype=None`` keeps the input's own dtype."""
    if hasattr(values, "detach"):
        values = values.detach().cpu()
    return np.array(values, dtype=dtype)


def check_same_length(**sequences: Sized) -> int:
    """The common length of the per-sample sequences of one ``update`` call (``ValueError`` if not)."""
    lengths = {name: len(seq) for name, seq in sequences.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"one entry per sample expected in each argument, got lengths {lengths}")
    return next(iter(lengths.values()), 0)


class Metric(ABC):
    """Base class: subclasses add ``update(...)`` (one batch) and implement ``_values``.

    ``compute()`` returns the metric values merged with the counts (``num_samples`` scored,
    ``num_skipped``, ``num_invalid_predictions``, and any extra count a metric keeps), all floats.
    A metric value is NaN when no sample could be scored.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything fed so far."""
        self.counts: Counter[str] = Counter({name: 0 for name in STANDARD_COUNTS})
        self._clear()

    def compute(self) -> dict[str, float]:
        """The metric values and the counts over everything fed since the last ``reset``."""
        return {**self._values(), **{name: float(n) for name, n in self.counts.items()}}

    @abstractmethod
    def _clear(self) -> None:
        """Empty the accumulated state (the counts are reset by ``reset``)."""

    @abstractmethod
    def _values(self) -> dict[str, float]:
        """The metric values from the accumulated state."""
