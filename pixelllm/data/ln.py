"""Localized Narratives: the JSONL reader and the token <-> trace alignments.

File layout (one JSON object per line)::

    {dataset_id, image_id, annotator_id, caption,
     timed_caption: [{utterance, start_time, end_time}], traces: [[{x, y, t}]], voice_recording}

x, y are normalized to the image, times are seconds. Two alignments turn a narrative into one
box per caption token (``TokenAlignment``, normalized coordinates):

``align_official`` (the default; PixelLLM's preprocessing, read from the official code)
    1. All trace segments are concatenated and sorted by t; x(t) and y(t) are interpolated
       linearly and **extrapolated** linearly past both ends (with the first / last interval's
       slope).
    2. Each utterance is sampled at 16 times ``linspace(start_time, end_time, 16)``; its **box** is
       the min/max of the samples, its **center** the trapezoid time-average of the 16 samples
       (the plain mean when ``end - start < 1e-5``).
    3. Utterance ``i`` is *valid* when its stripped text is non-empty and both center coordinates
       are ``> 1e-5``. With ``n`` valid utterances, valid utterance ``k`` (1-based, in order) sits at
       relative position ``k / n``.
    4. The caption is tokenized whole (no sentence split); with ``m`` text tokens (the target's
       ids without EOS), token ``j`` (1-based) sits at ``j / m`` *rescaled to the utterances' span*
       ``[1/n, 1]``: ``pos_j = 1/n + (j/m) * (1 - 1/n)``. So the last token lands on the last
       utterance, and the first token sits one token-step past the first utterance.
    5. Each token takes the utterance with the nearest position (squared distance; ties go to
       the earlier utterance). Subword tokens are independent tokens here: a proportional
       alignment, not a time match. EOS has no location.
    Caption truncation (``max_tokens``) happens before step 4, as in the official code, so a
    truncated caption is spread over all utterances.

``align_time_window`` (the Localized Narratives paper's definition)
    Caption words (whitespace-separated, punctuation stays on its word) are matched to the
    utterances' words in order (``difflib`` on lowercased alphanumerics; equal-length replaced runs
    are paired positionally). A matched word's box is the bounding box of the trace *path* during
    its utterance's time window (the interpolated positions at both window ends plus every raw
    point inside; no extrapolation: the window is cut to the trace's time span, and a window
    entirely outside it gets no box). Its center is the exact time-average of the piecewise-linear
    path over the window. Tokens take their word's box through their character offsets.

Both keep unclipped normalized coordinates; ``to_pixels`` clips to [0, 1] and scales to the image.

Deviation for degenerate traces: points sharing a timestamp are averaged into one (the official
SciPy interpolation is undefined there), and a trace whose points all share one time is a fixed
position.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pixelllm.data.report import Reader, SkipRecord, SkipReport, require
from pixelllm.data.samples import Narrative, Sample, Utterance
from pixelllm.data.words import caption_words, word_at
from pixelllm.errors import DataError
from pixelllm.tokenization import EncodedTarget

NUM_SAMPLES = 16
CENTER_EPS = 1e-5


# ----------------------------------------------------------------------------------------------
# Reading


def parse_ln_record(record: dict) -> tuple[str, str, Narrative]:
    """One JSONL object -> ``(dataset_id, image_id, Narrative)``; raises ``SkipRecord(reason)``.

    The narrative's trace is sorted by time (``trace_is_sorted`` tells whether the file's was).
    """
    if not isinstance(record, dict):
        raise SkipRecord("record is not a JSON object")
    caption = require(record, "caption")
    if not isinstance(caption, str) or not caption.strip():
        raise SkipRecord("empty caption")
    utterances = [_parse_utterance(u) for u in _as_list(require(record, "timed_caption"), "timed_caption")]
    if not utterances:
        raise SkipRecord("no timed utterances")
    trace = _parse_trace(require(record, "traces"))
    if len(trace) <= 1:
        raise SkipRecord("trace has <= 1 point")
    narrative = Narrative(caption, utterances, trace, str(record.get("annotator_id", "")))
    return str(record.get("dataset_id", "")), str(require(record, "image_id")), narrative


def trace_is_sorted(record_traces: Sequence) -> bool:
    """Whether the file's trace points (all segments concatenated) are in time order."""
    times = [p["t"] for segment in record_traces for p in segment]
    return all(a <= b for a, b in zip(times, times[1:], strict=False))


class LocalizedNarrativesReader(Reader):
    """Samples (one per narrative line) from Localized Narratives JSONL files.

    ``image_name`` turns ``image_id`` into the image's file name under ``image_dir``: a format
    string (``"{image_id}.jpg"`` for Open Images, ``"{image_id:0>12}.jpg"`` for COCO) or a
    callable ``(dataset_id, image_id) -> name``. Skipped lines are counted by reason; a file
    that cannot be opened, or in which no line is a JSON object, raises ``DataError``.
    """

    name = "localized-narratives"

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        image_dir: str | Path | None = None,
        image_name: str | Callable[[str, str], str] = "{image_id}.jpg",
    ) -> None:
        super().__init__()
        self.paths = as_paths(paths)
        self.image_dir = Path(image_dir) if image_dir is not None else None
        self.image_name = image_name

    def _samples(self) -> Iterator[Sample]:
        records = iter_jsonl(self.paths, self.report, "Localized Narratives JSONL")
        for dataset_id, image_id, narrative in read_narratives(records, self.report):
            yield Sample(
                self._image_path(dataset_id, image_id),
                image_id,
                source=dataset_id or self.name,
                narratives=[narrative],
            )

    def _image_path(self, dataset_id: str, image_id: str) -> Path | None:
        if self.image_dir is None:
            return None
        if callable(self.image_name):
            return self.image_dir / self.image_name(dataset_id, image_id)
        return self.image_dir / self.image_name.format(image_id=image_id, dataset_id=dataset_id)


def read_narratives(records: Iterable, report: SkipReport) -> Iterator[tuple[str, str, Narrative]]:
    """``parse_ln_record`` of each record: skipped ones counted by reason, unsorted traces counted
    as repaired (sorted)."""
    for record in records:
        try:
            parsed = parse_ln_record(record)
        except SkipRecord as skip:
            report.skip(str(skip))
            continue
        if not trace_is_sorted(record["traces"]):
            report.repair("unsorted trace (sorted by time)")
        yield parsed


def as_paths(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """One path or several, as a list."""
    return [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]


def iter_jsonl(paths: Path | Sequence[Path], report: SkipReport, what: str) -> Iterator[dict]:
    """The JSON objects of JSONL files, in order; broken lines are skipped as ``malformed JSON line``.

    Raises ``DataError`` when a file cannot be opened or has lines but no JSON object at all.
    """
    for path in as_paths(paths):
        yield from _jsonl_objects(path, report, what)


def _jsonl_objects(path: Path, report: SkipReport, what: str) -> Iterator[dict]:
    try:
        handle = open(path, "rb")  # noqa: SIM115 - the `with` below needs the open error separately
    except OSError as exc:
        raise DataError(f"cannot open {what} {path}: {exc.strerror or exc}") from None
    lines = parsed = 0
    with handle:
        for line in handle:
            if not line.strip():
                continue
            lines += 1
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                report.skip("malformed JSON line")
                continue
            parsed += 1
            yield record
    if lines and not parsed:
        raise DataError(f"{path} has no valid JSON line: it is not a {what} file")


def _as_list(value, field: str) -> list:
    if not isinstance(value, list):
        raise SkipRecord(f"field '{field}' is not a list")
    return value


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SkipRecord(f"non-numeric {what}")
    return float(value)


def _parse_utterance(u) -> Utterance:
    text = require(u, "utterance")
    start, end = (
        _number(require(u, "start_time"), "utterance time"),
        _number(require(u, "end_time"), "utterance time"),
    )
    if not isinstance(text, str):
        raise SkipRecord("utterance is not text")
    if end < start:
        raise SkipRecord("utterance ends before it starts")
    return Utterance(text, start, end)


def _parse_trace(segments) -> np.ndarray:
    points = [
        (
            _number(require(p, "x"), "trace point"),
            _number(require(p, "y"), "trace point"),
            _number(require(p, "t"), "trace point"),
        )
        for segment in _as_list(segments, "traces")
        for p in _as_list(segment, "traces")
    ]
    trace = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    return trace[np.argsort(trace[:, 2], kind="stable")]


# ----------------------------------------------------------------------------------------------
# Trace geometry


def _unique_times(trace: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique times ``(K,)`` and positions ``(K, 2)``, averaging points that share a time."""
    times, inverse = np.unique(trace[:, 2], return_inverse=True)
    xy = np.zeros((len(times), 2))
    np.add.at(xy, inverse, trace[:, :2])
    return times, xy / np.bincount(inverse)[:, None]


def trace_positions(trace: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Positions ``(len(times), 2)`` of the trace at ``times``: linear interpolation, linear extrapolation."""
    t, xy = _unique_times(trace)
    times = np.asarray(times, dtype=np.float64)
    out = np.stack([np.interp(times, t, xy[:, 0]), np.interp(times, t, xy[:, 1])], axis=-1)
    if len(t) < 2:
        return out
    before, after = times < t[0], times > t[-1]
    out[before] = xy[0] + (times[before, None] - t[0]) * (xy[1] - xy[0]) / (t[1] - t[0])
    out[after] = xy[-1] + (times[after, None] - t[-1]) * (xy[-1] - xy[-2]) / (t[-1] - t[-2])
    return out


def utterance_samples(narrative: Narrative, num_samples: int = NUM_SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """The official per-utterance trace samples: positions ``(U, S, 2)`` (normalized, unclipped) at
    the times ``(U, S)`` ``linspace(start_time, end_time, S)``."""
    times = np.array([np.linspace(u.start_time, u.end_time, num_samples) for u in narrative.utterances])
    times = times.reshape(len(narrative.utterances), num_samples)
    return np.array([trace_positions(narrative.trace, t) for t in times]).reshape(*times.shape, 2), times


def utterance_locations(
    narrative: Narrative, num_samples: int = NUM_SAMPLES
) -> tuple[np.ndarray, np.ndarray]:
    """Official per-utterance ``boxes (U, 4)`` and ``centers (U, 2)``, normalized, unclipped."""
    positions, times = utterance_samples(narrative, num_samples)
    boxes = np.zeros((len(narrative.utterances), 4))
    centers = np.zeros((len(narrative.utterances), 2))
    for i, (xy, t) in enumerate(zip(positions, times, strict=True)):
        boxes[i] = [*xy.min(axis=0), *xy.max(axis=0)]
        span = t[-1] - t[0]
        centers[i] = xy.mean(axis=0) if span < CENTER_EPS else np.trapezoid(xy, t, axis=0) / span
    return boxes, centers


def path_in_window(trace: np.ndarray, start: float, end: float) -> tuple[np.ndarray, np.ndarray] | None:
    """``(box (4,), center (2,))`` of the trace path during ``[start, end]``, or None if no overlap.

    The window is cut to the trace's time span (no extrapolation); the path is the interpolated
    positions at the window's ends and the raw points inside; the center is its exact time-average.
    """
    t, xy = _unique_times(trace)
    lo, hi = max(start, t[0]), min(end, t[-1])
    if lo > hi:
        return None
    inside = (t > lo) & (t < hi)
    times = np.concatenate([[lo], t[inside], [hi]])
    path = np.concatenate([trace_positions(trace, [lo]), xy[inside], trace_positions(trace, [hi])])
    box = np.array([*path.min(axis=0), *path.max(axis=0)])
    center = path[0] if hi - lo <= 0 else np.trapezoid(path, times, axis=0) / (hi - lo)
    return box, center


# ----------------------------------------------------------------------------------------------
# Token alignment


@dataclass
class TokenAlignment:
    """Per target token (including the final EOS): normalized, unclipped locations.

    ``boxes`` float64 ``(L, 4)``, ``centers`` ``(L, 2)``, ``utterance`` int ``(L,)`` (index into
    ``narrative.utterances``, -1 where none), ``mask`` bool ``(L,)`` (True where there is a target).
    """

    boxes: np.ndarray
    centers: np.ndarray
    utterance: np.ndarray
    mask: np.ndarray

    @classmethod
    def empty(cls, length: int) -> TokenAlignment:
        return cls(np.zeros((length, 4)), np.zeros((length, 2)), np.full(length, -1), np.zeros(length, bool))

    def to_pixels(self, image_size: tuple[int, int]) -> np.ndarray:
        """Boxes clipped to [0, 1] and scaled to ``image_size = (W, H)``: original pixels ``(L, 4)``.

        The official code also rounds to whole pixels; so does this.
        """
        w, h = image_size
        return np.round(np.clip(self.boxes, 0.0, 1.0) * np.array([w, h, w, h]))


def align_official(narrative: Narrative, target: EncodedTarget) -> TokenAlignment:
    """PixelLLM's proportional alignment (module docstring, steps 1-5)."""
    length = len(target.ids)
    alignment = TokenAlignment.empty(length)
    boxes, centers = utterance_locations(narrative)
    valid_utt = np.array([bool(u.text.strip()) for u in narrative.utterances]) & np.all(
        centers > CENTER_EPS, axis=1
    )
    n, m = int(valid_utt.sum()), length - 1  # the last id is EOS
    if n == 0 or m == 0:
        return alignment
    utt_pos = np.where(valid_utt, np.cumsum(valid_utt) / n, -1.0)
    start, end = utt_pos[valid_utt].min(), utt_pos[valid_utt].max()
    token_pos = start + (np.arange(1, m + 1) / m) * (end - start)
    nearest = np.argmin((token_pos[:, None] - utt_pos[None, :]) ** 2, axis=1)
    alignment.utterance[:m] = nearest
    alignment.boxes[:m] = boxes[nearest]
    alignment.centers[:m] = centers[nearest]
    alignment.mask[:m] = True
    return alignment


def align_time_window(narrative: Narrative, target: EncodedTarget) -> TokenAlignment:
    """The LN paper's alignment: each word's own trace during its time window (module docstring)."""
    alignment = TokenAlignment.empty(len(target.ids))
    words = caption_words(narrative.caption)
    utt_words = [(_normalize(w), i) for i, u in enumerate(narrative.utterances) for w in u.text.split()]
    matches = match_words([_normalize(text) for _, _, text in words], [w for w, _ in utt_words])
    located: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}
    for word_index, utt_word_index in matches.items():
        utt = utt_words[utt_word_index][1]
        u = narrative.utterances[utt]
        found = path_in_window(narrative.trace, u.start_time, u.end_time)
        if found is not None:
            located[word_index] = (utt, *found)
    for j, (start, end) in enumerate(target.offsets[:-1]):
        word_index = word_at(words, narrative.caption, start, end)
        if word_index in located:
            utt, box, center = located[word_index]
            alignment.utterance[j], alignment.boxes[j], alignment.centers[j] = utt, box, center
            alignment.mask[j] = True
    return alignment


ALIGNMENTS = {"official": align_official, "time": align_time_window}


def match_words(caption: Sequence[str], spoken: Sequence[str]) -> dict[int, int]:
    """In-order matching of normalized caption words to spoken words: ``{caption index: spoken index}``."""
    matches: dict[int, int] = {}
    matcher = difflib.SequenceMatcher(None, list(caption), list(spoken), autojunk=False)
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal" or (op == "replace" and a1 - a0 == b1 - b0):
            matches.update({a: b for a, b in zip(range(a0, a1), range(b0, b1), strict=True) if caption[a]})
    return matches


def _normalize(word: str) -> str:
    return "".join(ch for ch in word.lower() if ch.isalnum())
