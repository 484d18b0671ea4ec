"""The records every reader yields, in **original-image pixels** (boxes ``[x0, y0, x1, y1]``).

A ``Sample`` is one image and its annotations; which task it serves (trace, refer, region, ...) is
chosen when targets are built (``pixelllm.data.targets``), so one reader can feed several tasks.
Localized Narrative traces stay **normalized** (x, y in [0, 1] of the image, times in seconds): they
become pixels only in the token alignment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ImageSource = str | Path | bytes | Image.Image | np.ndarray


@dataclass
class Utterance:
    """A spoken piece of a narrative (one or a few words) and its time window in seconds."""

    text: str
    start_time: float
    end_time: float


@dataclass
class Narrative:
    """A Localized Narrative: the caption, its timed utterances, and the mouse trace.

    ``trace`` is float64 ``(T, 3)`` with columns ``x, y, t`` (normalized, seconds): all trace
    segments concatenated and sorted by ``t``.
    """

    caption: str
    utterances: list[Utterance]
    trace: np.ndarray
    annotator_id: str = ""


@dataclass
class Region:
    """An object or region: its box, texts (expressions, phrases, names), and optional mask.

    ``segmentation`` is kept as the file has it (COCO polygons, or an RLE dict) and decoded on
    demand by ``pixelllm.data.coco.decode_segmentation``.
    """

    box: tuple[float, float, float, float]
    texts: list[str] = field(default_factory=list)
    segmentation: Any = None
    category_id: int | None = None
    region_id: str | None = None


@dataclass
class Question:
    """A MUSE question, its answer text (``{seg}`` marks each target in order), and the targets."""

    text: str
    answer: str | None
    targets: list[Region]


@dataclass
class Sample:
    """One image and its annotations.

    ``image`` is anything ``pixelllm.data.images.load_image`` accepts (usually a path, loaded
    lazily), or None where the data has no image (Video Localized Narratives). ``image_size`` is
    ``(W, H)`` as the annotation file states it, or None.
    """

    image: ImageSource | None
    image_id: str
    image_size: tuple[int, int] | None = None
    source: str = ""
    narratives: list[Narrative] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    questions: list[Question] = field(default_factory=list)


def xywh_to_xyxy(box: Any) -> tuple[float, float, float, float]:
    """``[x, y, w, h]`` (COCO, VG) to ``(x0, y0, x1, y1)``; ``ValueError``/``TypeError`` if malformed."""
    x, y, w, h = (float(v) for v in box)
    return (x, y, x + w, y + h)


def check_box(
    box: tuple[float, float, float, float], size: tuple[int, int] | None, tolerance: float = 1.0
) -> tuple[tuple[float, float, float, float] | None, str | None]:
    """Validate a box against the image ``size = (W, H)``: ``(clipped box, None)`` or ``(None, reason)``.

    Boxes may overshoot the image by ``tolerance`` pixels (annotation tools round), and are then
    clipped; more than that is an error, as is a box with no area. Reasons are short phrases
    used as skip-report keys.
    """
    if not all(math.isfinite(v) for v in box):
        return None, "non-numeric box"
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        return None, "degenerate box"
    if size is None:
        return box, None
    w, h = size
    if x0 < -tolerance or y0 < -tolerance or x1 > w + tolerance or y1 > h + tolerance:
        return None, "box outside the image"
    clipped = (max(x0, 0.0), max(y0, 0.0), min(x1, float(w)), min(y1, float(h)))
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return None, "degenerate box"
    return clipped, None


# ----------------------------------------------------------------------------------------------
# JSON round trip (used by the shard writer and reader)


def sample_to_dict(sample: Sample) -> dict:
    """A JSON-ready dict of everything but the image."""
    return {
        "image_id": sample.image_id,
        "image_size": list(sample.image_size) if sample.image_size else None,
        "source": sample.source,
        "narratives": [_narrative_to_dict(n) for n in sample.narratives],
        "captions": list(sample.captions),
        "regions": [_region_to_dict(r) for r in sample.regions],
        "questions": [
            {"text": q.text, "answer": q.answer, "targets": [_region_to_dict(r) for r in q.targets]}
            for q in sample.questions
        ],
    }


def sample_from_dict(data: dict, image: ImageSource) -> Sample:
    """Inverse of ``sample_to_dict``, with the image given separately."""
    size = data.get("image_size")
    return Sample(
        image=image,
        image_id=str(data["image_id"]),
        image_size=(int(size[0]), int(size[1])) if size else None,
        source=data.get("source", ""),
        narratives=[_narrative_from_dict(n) for n in data.get("narratives", [])],
        captions=list(data.get("captions", [])),
        regions=[_region_from_dict(r) for r in data.get("regions", [])],
        questions=[
            Question(q["text"], q.get("answer"), [_region_from_dict(r) for r in q.get("targets", [])])
            for q in data.get("questions", [])
        ],
    )


def _narrative_to_dict(n: Narrative) -> dict:
    return {
        "caption": n.caption,
        "utterances": [[u.text, u.start_time, u.end_time] for u in n.utterances],
        "trace": n.trace.tolist(),
        "annotator_id": n.annotator_id,
    }


def _narrative_from_dict(d: dict) -> Narrative:
    trace = np.asarray(d["trace"], dtype=np.float64).reshape(-1, 3)
    return Narrative(
        d["caption"],
        [Utterance(t, float(s), float(e)) for t, s, e in d["utterances"]],
        trace,
        d.get("annotator_id", ""),
    )


def _region_to_dict(r: Region) -> dict:
    seg = r.segmentation
    if isinstance(seg, dict) and isinstance(seg.get("counts"), bytes):
        seg = {**seg, "counts": seg["counts"].decode("ascii")}
    return {
        "box": list(r.box),
        "texts": list(r.texts),
        "segmentation": seg,
        "category_id": r.category_id,
        "region_id": r.region_id,
    }


def _region_from_dict(d: dict) -> Region:
    return Region(
        tuple(float(v) for v in d["box"]),
        list(d.get("texts", [])),
        d.get("segmentation"),
        d.get("category_id"),
        d.get("region_id"),
    )
