"""Locations written as tokens (VisionLLM v1, Pix2Seq, Kosmos-2): boxes to text and back.

Shared by the data (training targets) and the model (the head ``location_tokens``), so it sits
beside ``tokenization``. Every value is quantized against a **frame size**: the valid image,
``(W, H)`` in original pixels when targets are built, ``(W * s, H * s)`` canvas pixels when the
model's answer is read back. A box is ``(x0, y0, x1, y1)``, x first; x values use the width, y values
the height. A resize of the whole image changes no token, which is why the tasks that write these
tokens take no crop or flip (``pixelllm.data.pipeline``).

Quantization (``coords``), ``B = num_bins``:

- ``absolute`` (Pix2Seq / Kosmos-2): bin ``j = clamp(floor(v / size * B), 0, B - 1)``, read back as
  the bin's center ``(j + 0.5) / B * size``;
- ``relative`` (VisionLLM v1's offsets ``-K..K``, ``B = 2K + 1``): offset ``i = clamp(round(K * (v - l)
  / size), -K, K)`` from the anchor ``l``, the center of the frame (we have no image tokens to
  anchor on), read back as ``l + i / K * size``; its bin is ``j = i + K``.

Either way a value inside the frame comes back within half a step (``size / 2B`` or ``size / 2K``).

Spelling (``format``):

- ``bins``: the bin as one extra vocabulary token ``<bin_j>``;
- ``text``: the number written with the LM's own tokenizer, the bin ``j`` (absolute) or the signed
  offset ``i`` (relative), values separated by spaces: ``"3 17 9 30"``.

Answers (the template): a referring expression's answer is its box, ``"<bin_a><bin_b><bin_c><bin_d>"``;
a detection answer is, for every object, its class token then its box, ``"<c0>box<c0>box<c1>box"``
(bins: no spaces, so that every token is a slot) or ``"<c0> 3 17 9 30 <c1> 4 4 8 9"`` (text); the class
tokens ``<c0>..<cK-1>`` are bound to names by the instruction, in the order given.
Prompts: ``LOCATE_PROMPT`` and ``DETECT_PROMPT``, e.g. ``"detect <c0>: circle, <c1>: red star"``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

FORMATS = ("bins", "text")
COORDS = ("absolute", "relative")
LOCATE_PROMPT = "locate {expression}"
DETECT_PROMPT = "detect {classes}"
CLASS_BINDING = "{token}: {label}"
BINDING_SEPARATOR = ", "
BOX_VALUES = 4
_PIECES = re.compile(r"<c(\d+)>|<bin_(\d+)>|(-?\d+)")


@dataclass(frozen=True)
class LocationFormat:
    """How locations are written: ``format`` (``bins`` | ``text``), ``num_bins`` (absolute: the bins
    over the frame; relative: ``2K + 1`` offsets), ``coords`` (``absolute`` | ``relative``) and
    ``num_class_tokens`` (``<c0>..``, the slots detection binds labels to)."""

    format: str = "bins"
    num_bins: int = 64
    coords: str = "absolute"
    num_class_tokens: int = 16

    def problem(self) -> str | None:
        """What makes this format unusable, or None."""
        if self.format not in FORMATS:
            return f"format must be one of {', '.join(FORMATS)}, got {self.format!r}"
        if self.coords not in COORDS:
            return f"coords must be one of {', '.join(COORDS)}, got {self.coords!r}"
        if self.num_bins < 2:
            return f"num_bins must be at least 2, got {self.num_bins}"
        if self.coords == "relative" and self.num_bins % 2 == 0:
            return f"relative coords take an odd num_bins (2K + 1 offsets -K..K), got {self.num_bins}"
        if self.num_class_tokens < 0:
            return f"num_class_tokens must be >= 0, got {self.num_class_tokens}"
        return None

    @property
    def max_offset(self) -> int:
        """``K`` of the relative offsets ``-K..K``."""
        return (self.num_bins - 1) // 2

    def bin_tokens(self) -> list[str]:
        """The vocabulary's location tokens (none when numbers are written as text)."""
        return [f"<bin_{j}>" for j in range(self.num_bins)] if self.format == "bins" else []

    def class_tokens(self) -> list[str]:
        return [f"<c{k}>" for k in range(self.num_class_tokens)]

    def special_tokens(self) -> list[str]:
        return self.bin_tokens() + self.class_tokens()

    # -- numbers --------------------------------------------------------------------------------

    def quantize(self, boxes, size) -> np.ndarray:
        """``(..., 4)`` boxes in the frame of ``size = (W, H)`` -> ``(..., 4)`` int64 bins in ``[0, B)``."""
        boxes, sides = np.asarray(boxes, np.float64), _sides(size)
        if self.coords == "absolute":
            return np.clip(np.floor(boxes / sides * self.num_bins), 0, self.num_bins - 1).astype(np.int64)
        k = self.max_offset
        offsets = np.clip(np.round(k * (boxes - sides / 2) / sides), -k, k)
        return (offsets + k).astype(np.int64)

    def dequantize(self, bins, size) -> np.ndarray:
        """``(..., 4)`` bins -> ``(..., 4)`` float64 boxes in the frame of ``size = (W, H)``."""
        bins, sides = np.asarray(bins, np.float64), _sides(size)
        if self.coords == "absolute":
            return (bins + 0.5) / self.num_bins * sides
        k = self.max_offset
        return sides / 2 + (bins - k) / k * sides

    def step(self, size) -> np.ndarray:
        """``(4,)``: the distance between neighbouring bins of each value, in the frame's units."""
        return _sides(size) / (self.num_bins if self.coords == "absolute" else self.max_offset)

    # -- text -----------------------------------------------------------------------------------

    def box_text(self, box, size) -> str:
        """One box ``(4,)`` in the frame of ``size`` as its four location values."""
        bins = self.quantize(box, size)
        if self.format == "bins":
            return "".join(f"<bin_{j}>" for j in bins)
        shift = self.max_offset if self.coords == "relative" else 0
        return " ".join(str(int(j) - shift) for j in bins)

    def answer(self, objects, size) -> str:
        """The answer text of ``objects``, ``(class slot or None, box (4,))`` pairs, in order. Special
        tokens are written without spaces between them (a tokenizer would make a space a token)."""
        space = "" if self.format == "bins" else " "
        return space.join(self.box_text(box, size) if slot is None else f"<c{slot}>{space}{self.box_text(box, size)}"
                          for slot, box in objects)

    def parse(self, text: str, with_class: bool) -> list[tuple[int | None, np.ndarray]]:
        """The complete ``(class slot, bins (4,))`` groups of an answer (the slot None when
        ``with_class`` is False); incomplete groups and pieces of the other spelling are skipped, and
        text numbers out of range are clamped to it."""
        groups, slot, values = [], None, []
        for piece in _PIECES.finditer(text):
            cls, bin_index, number = piece.groups()
            if cls is not None:
                slot, values = int(cls), []
                continue
            value = self._bin_of(bin_index, number)
            if value is None or (with_class and slot is None):
                continue
            values.append(value)
            if len(values) == BOX_VALUES:
                groups.append((slot, np.array(values, np.int64)))
                slot, values = None, []
        return groups

    def _bin_of(self, bin_index: str | None, number: str | None) -> int | None:
        """The bin a matched piece names in this spelling, or None for a piece of the other one."""
        if self.format == "bins":
            return None if bin_index is None else min(int(bin_index), self.num_bins - 1)
        if number is None:
            return None
        shift = self.max_offset if self.coords == "relative" else 0
        return int(np.clip(int(number) + shift, 0, self.num_bins - 1))

    # -- prompts --------------------------------------------------------------------------------

    def detect_prompt(self, labels: list[str]) -> str:
        """The instruction that binds ``labels[k]`` to ``<ck>``: ``"detect <c0>: circle, <c1>: red star"``."""
        if len(labels) > self.num_class_tokens:
            raise ValueError(f"{len(labels)} labels but only {self.num_class_tokens} class tokens")
        bindings = BINDING_SEPARATOR.join(CLASS_BINDING.format(token=f"<c{k}>", label=label)
                                          for k, label in enumerate(labels))
        return DETECT_PROMPT.format(classes=bindings)


def locate_prompt(expression: str) -> str:
    return LOCATE_PROMPT.format(expression=expression)


def _sides(size) -> np.ndarray:
    """``(W, H)`` -> ``(4,)`` ``[W, H, W, H]``, the side each box value is measured against."""
    width, height = (float(v) for v in size)
    return np.array([width, height, width, height])
