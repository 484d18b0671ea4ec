"""Video Localized Narratives -> image Localized Narratives records (real human traces for tests).

A VidLN record narrates several actors of a video; each actor narrative has a caption, per-word
times (``time_alignment``: ``referenced_word``, ``start_ms``, ``end_ms`` relative to the recording
start) and mouse traces stamped in ms since the epoch. One image-LN record is made per actor
narrative:

- ``timed_caption``: one utterance per aligned word, times in seconds from the recording start;
- ``traces``: the same segments, ``t = (time_ms_since_epoch - recording_start_time_ms_since_epoch) / 1000``
  (so words and trace share one clock), ``kf_idx`` dropped (the narrative spans several keyframes);
- ``image_id``: ``"{video_id}/{actor index}"``.

Some files store nested fields as Python-literal strings; those are parsed with
``ast.literal_eval`` (never ``eval``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Sequence
from pathlib import Path

from pixelllm.data.ln import as_paths, iter_jsonl, read_narratives
from pixelllm.data.report import Reader, SkipRecord, require
from pixelllm.data.samples import Sample


def literal(value):
    """A Python-literal string (``"[...]"``, ``"{...}"``) parsed safely; anything else unchanged."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{", "("):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise SkipRecord("unparseable literal field") from None
    return value


def vidln_to_ln(record: dict) -> Iterator[dict]:
    """Image-LN records, one per actor narrative of a VidLN ``record``; raises ``SkipRecord`` if malformed."""
    video_id = str(require(record, "video_id"))
    narratives = literal(require(record, "actor_narratives"))
    if not isinstance(narratives, list):
        raise SkipRecord("field 'actor_narratives' is not a list")
    for index, actor in enumerate(narratives):
        yield _actor_to_ln(literal(actor), record, f"{video_id}/{index}")


def _actor_to_ln(actor: dict, record: dict, image_id: str) -> dict:
    origin = require(actor, "recording_start_time_ms_since_epoch")
    words = literal(require(actor, "time_alignment"))
    segments = literal(require(actor, "traces"))
    if not isinstance(words, list) or not isinstance(segments, list):
        raise SkipRecord("time_alignment or traces is not a list")
    try:
        timed = [
            {
                "utterance": w["referenced_word"],
                "start_time": w["start_ms"] / 1000.0,
                "end_time": w["end_ms"] / 1000.0,
            }
            for w in map(literal, words)
        ]
        traces = [
            [
                {"x": p["x"], "y": p["y"], "t": (p["time_ms_since_epoch"] - origin) / 1000.0}
                for p in map(literal, seg)
            ]
            for seg in map(literal, segments)
        ]
    except (KeyError, TypeError):
        raise SkipRecord("malformed word alignment or trace point") from None
    return {
        "dataset_id": str(record.get("dataset_id", "vidln")),
        "image_id": image_id,
        "annotator_id": record.get("annotator_id", ""),
        "caption": require(actor, "caption"),
        "timed_caption": timed,
        "traces": traces,
        "voice_recording": actor.get("recording_filename", ""),
    }


class VidlnReader(Reader):
    """Samples (one per actor narrative, no image) from Video Localized Narratives JSONL files."""

    name = "vidln"

    def __init__(self, paths: str | Path | Sequence[str | Path]) -> None:
        super().__init__()
        self.paths = as_paths(paths)

    def records(self) -> Iterator[dict]:
        """The converted image-LN records (valid or not; ``LocalizedNarrativesReader`` checks them)."""
        for record in iter_jsonl(self.paths, self.report, "Video Localized Narratives JSONL"):
            try:
                yield from vidln_to_ln(record)
            except SkipRecord as skip:
                self.report.skip(str(skip))

    def _samples(self) -> Iterator[Sample]:
        for dataset_id, image_id, narrative in read_narratives(self.records(), self.report):
            yield Sample(None, image_id, source=dataset_id, narratives=[narrative])
