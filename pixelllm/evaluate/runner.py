"""The evaluation runner: a model (or the ground-truth oracle) over a dataset in its real format,
into the metrics.

    from pixelllm.evaluate.runner import evaluate, GroundTruthOracle
    result = evaluate(predictor, "refer", "data/refcoco", split="testA", images="coco/train2014")
    result.metrics["precision@1"], result.num_samples, result.skipped
    evaluate(GroundTruthOracle(predictor.tokenizer), "refer", "data/refcoco")  # the metric's best

Images are encoded ``batch_size`` at a time in one pass; all prompts of a batch (every expression,
region or narrative of those images) are decoded together. Malformed records are skipped and
counted, never fatal: the readers skip bad records, the runner skips images that are missing,
unreadable or of another size than the annotations say, and the metrics skip ground truth they
cannot score. ``DataError`` only when the data cannot be read at all or nothing is left to score.
See ``docs/metrics.md`` ("The evaluation runner").
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pixelllm.data.images import load_image
from pixelllm.data.report import Reader, SkipReport
from pixelllm.data.samples import Sample
from pixelllm.data.sources import EXPECTED, open_source
from pixelllm.errors import DataError, InputError
from pixelllm.evaluate.captions import MeteorScorer
from pixelllm.evaluate.protocols import PROTOCOLS, EvalImage, Protocol
from pixelllm.evaluate.shapes import SHAPES_METRICS
from pixelllm.model.pixelllm import PixelLLM
from pixelllm.tasks import Predictor

WORST_SAMPLES = 5


@dataclass
class EvalResult:
    """What an evaluation measured.

    ``metrics``: the metric values (percent, except ``point_l1``: image fractions, lower is better;
    docs/metrics.md). ``num_samples``: units scored (narratives for trace, expressions for refer and
    refseg, regions for regioncap, images for densecap, questions for muse). ``skipped``: every
    record left out, by reason (bad records in the files, missing or unreadable images, ground truth
    the metric cannot score), ``num_skipped`` their total, ``summary`` one line per stage.
    """

    task: str
    metrics: dict[str, float]
    num_samples: int
    num_skipped: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    num_invalid_predictions: int = 0
    summary: list[str] = field(default_factory=list)
    data: str = ""
    split: str | None = None

    def to_dict(self) -> dict:
        """INTERFACE.md's eval JSON (``task``, ``metrics``, ``num_samples``) plus the skips, the
        invalid predictions, the data and the split."""
        return {
            "task": self.task,
            "metrics": {name: _finite(value) for name, value in self.metrics.items()},
            "num_samples": self.num_samples,
            "num_skipped": self.num_skipped,
            "skipped": dict(self.skipped),
            "num_invalid_predictions": self.num_invalid_predictions,
            "data": self.data,
            "split": self.split,
        }


class GroundTruthOracle:
    """Answers every prompt with its ground truth (boxes, masks, captions, traces, regions) through
    the same runner and metrics: its scores are the best the metrics allow on that data.

    ``tokenizer`` is needed for trace only (the trace is scored per token of the caption).
    """

    def __init__(self, tokenizer=None, max_text_tokens: int = 128) -> None:
        self.tokenizer = tokenizer
        self.max_text_tokens = max_text_tokens

    def answer(self, protocol: Protocol, images: list[EvalImage]) -> list:
        return protocol.oracle(images)


class _ModelAnswers:
    """A ``Predictor`` answering a batch: its images encoded in one pass, then the task's prompts."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.tokenizer = predictor.tokenizer
        self.max_text_tokens = predictor.model.config.max_text_tokens

    def answer(self, protocol: Protocol, images: list[EvalImage]) -> list:
        encoded = self.predictor.encode_batch([image.picture for image in images])
        return protocol.predict(self.predictor, encoded, images)


def evaluate(
    predictor: Predictor | PixelLLM | GroundTruthOracle,
    task: str,
    data: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    split: str | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    progress: bool = True,
    per_sample_path: str | os.PathLike | None = None,
    report_path: str | os.PathLike | None = None,
    meteor: MeteorScorer | None = None,
) -> EvalResult:
    """Evaluate ``predictor`` on ``task`` (trace, refer, refseg, regioncap, densecap, muse) over ``data``.

    Args:
        predictor: a ``Predictor``, a ``PixelLLM`` (wrapped; its train/eval mode is restored after),
            or a ``GroundTruthOracle``.
        data: a dataset path (layouts in ``pixelllm.data.sources``); ``images``: the image folder
            when it is not the default; ``split``: the RefCOCO split (default: the file's only split,
            else ``val``).
        batch_size: images encoded and answered together. limit: only the first ``limit`` images.
        progress: a progress bar over the images (stderr).
        per_sample_path: write one JSON line per scored unit (prediction, ground truth, scores).
        report_path: write a markdown report (metrics, skips, the worst samples).
        meteor: a shared ``MeteorScorer``; without one, tasks that need METEOR start their own.

    Raises:
        DataError: ``data`` is not a readable dataset for ``task``, or nothing in it could be scored.
    """
    if task not in PROTOCOLS:
        raise InputError(f"unknown task {task!r}; choose one of {', '.join(PROTOCOLS)}")
    if batch_size < 1 or (limit is not None and limit < 1):
        raise InputError(f"batch_size and limit must be at least 1, got {batch_size} and {limit}")
    source = open_source(task, data, images=images, split=split)
    samples = _images(source.reader, limit)
    if task == "trace":
        _attach_scene_objects(samples, data, images)
    report = SkipReport("evaluation")
    want_records = per_sample_path is not None or report_path is not None
    with ExitStack() as stack:
        answers = _answers(predictor, stack)
        needs_meteor = meteor is None and PROTOCOLS[task].uses_meteor
        scorer = stack.enter_context(MeteorScorer()) if needs_meteor else meteor
        protocol = PROTOCOLS[task](report, scorer, answers.tokenizer, answers.max_text_tokens, want_records)
        records = _run(protocol, answers, samples, batch_size, progress, report, want_records)
        values, counts = protocol.compute()
    result = _result(task, values, counts, [source.reader.report, report], f"{data}", source.split)
    if result.num_samples == 0:
        raise DataError(f"nothing to evaluate in {data} ({EXPECTED[source.layout]}, images from {source.images}): "
                        + "; ".join(result.summary))
    if per_sample_path is not None:
        _write_jsonl(Path(per_sample_path), records)
    if report_path is not None:
        Path(report_path).write_text(markdown_report(result, records, protocol))
    return result


def _answers(predictor, stack: ExitStack) -> GroundTruthOracle | _ModelAnswers:
    if isinstance(predictor, GroundTruthOracle):
        return predictor
    model = predictor if isinstance(predictor, PixelLLM) else predictor.model
    stack.enter_context(_restored_mode(model))
    return _ModelAnswers(Predictor(model) if isinstance(predictor, PixelLLM) else predictor)


@contextmanager
def _restored_mode(model: PixelLLM):
    """The model in eval mode for the evaluation; a model that was training goes back to training."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def _attach_scene_objects(samples: list[Sample], data, images) -> None:
    """Give narratives the regions of their image where the same data has them (a shapes-world
    split: Visual Genome regions beside the narratives), for the word-grounding metric."""
    try:
        regions = {str(s.image_id): s.regions for s in open_source("regioncap", data, images=images).reader}
    except DataError:
        return
    for sample in samples:
        sample.regions = list(regions.get(str(sample.image_id), []))


def _images(reader: Reader, limit: int | None) -> list[Sample]:
    """The reader's samples, one per image: Localized Narratives files have a line per narrative,
    and an image's narratives are gathered into one sample (in the order of first appearance)."""
    by_image: dict[str, Sample] = {}
    for sample in reader:
        key = str(sample.image)
        if key in by_image:
            by_image[key].narratives.extend(sample.narratives)
        else:
            by_image[key] = replace(sample, narratives=list(sample.narratives))
    return list(by_image.values())[:limit]


def _run(protocol: Protocol, answers, samples: list[Sample], batch_size: int, progress: bool,
         report: SkipReport, keep_records: bool) -> list[dict]:
    """Answer and score the samples, ``batch_size`` images at a time; the per-sample records (when
    ``keep_records``)."""
    records: list[dict] = []
    with tqdm(total=len(samples), desc=f"eval {protocol.name}", unit="img", disable=not progress) as bar:
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            images = [image for image in (_load(sample, protocol, report) for sample in batch) if image and image.units]
            if images:
                batch_records = protocol.update(images, answers.answer(protocol, images))
                records += batch_records if keep_records else []
            bar.update(len(batch))
    return records


def _load(sample: Sample, protocol: Protocol, report: SkipReport) -> EvalImage | None:
    """The sample's picture and ground-truth units, or None (counted) when the image cannot be used."""
    if isinstance(sample.image, str | Path) and not Path(sample.image).is_file():
        report.skip("image not found")
        return None
    try:
        picture = load_image(sample.image)
    except InputError:
        report.skip("unreadable image")
        return None
    if sample.image_size is not None and tuple(sample.image_size) != picture.size:
        report.skip("image size differs from the annotations")
        return None
    report.keep()
    return EvalImage(sample, picture, picture.size, protocol.units(sample, picture.size))


def _result(task: str, values: dict[str, float], counts: dict[str, float], reports: list[SkipReport],
            data: str, split: str | None) -> EvalResult:
    skipped = Counter()
    for stage in reports:
        skipped.update(stage.skipped)
    unscorable = int(counts["num_skipped"])
    if unscorable:
        skipped["ground truth the metric cannot score"] += unscorable
    summary = [stage.summary() for stage in reports]
    return EvalResult(task, values, int(counts["num_samples"]), sum(skipped.values()), dict(skipped),
                      int(counts["num_invalid_predictions"]), summary, data, split)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _jsonable(value):
    """Records as JSON: arrays become lists, floats are rounded to 0.01 (0.0001 below 1), NaN
    becomes null."""
    if isinstance(value, dict):
        return {key: _jsonable(v) for key, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | np.floating):
        value = float(value)
        return round(value, 4 if abs(value) < 1 else 2) if math.isfinite(value) else None
    return value.item() if isinstance(value, np.generic) else value


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(_jsonable(record)) + "\n")


def markdown_report(result: EvalResult, records: list[dict], protocol: Protocol) -> str:
    """The headline metrics, the skips, and the ``WORST_SAMPLES`` worst samples by the task's
    per-sample score."""
    split = f", split `{result.split}`" if result.split else ""
    lines = [f"# Evaluation: {result.task}", "", f"- data: `{result.data}`{split}",
             f"- samples scored: {result.num_samples}; skipped: {result.num_skipped}; "
             f"invalid predictions: {result.num_invalid_predictions}", "", "| metric | value |", "| --- | ---: |"]
    shown = [*protocol.headline, *(name for name in SHAPES_METRICS if name in result.metrics)]
    lines += [f"| {name} | {_number(result.metrics[name])} |" for name in shown]
    lines += ["", "## Skipped", "", *(f"- {line}" for line in result.summary)]
    score = protocol.score
    ranked = sorted((r for r in records if math.isfinite(r["scores"][score])),
                    key=lambda r: r["scores"][score], reverse=protocol.lower_is_better)[:WORST_SAMPLES]
    columns = [("image", "image_id"), ("query", "query"), ("prediction", "prediction"),
               ("ground truth", "ground_truth")]
    columns = [(title, key) for title, key in columns if any(r[key] is not None for r in ranked)]
    lines += ["", f"## Worst samples ({'highest' if protocol.lower_is_better else 'lowest'} {score})", "",
              "| " + " | ".join(title for title, _ in columns) + f" | {score} |",
              "|" + " --- |" * len(columns) + " ---: |"]
    for r in ranked:
        cells = [_describe(r[key]).replace("|", "/") for _, key in columns]
        lines.append("| " + " | ".join(cells) + f" | {_number(r['scores'][score])} |")
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1 else f"{value:.2f}"


def _describe(value: Any) -> str:
    """A short text of a record's query, prediction or ground truth (for the markdown report)."""
    if isinstance(value, str):
        return value if len(value) <= 60 else value[:57] + "..."
    if isinstance(value, dict):
        return _describe(value.get("caption", value.get("box", "")))
    if isinstance(value, list | tuple | np.ndarray):
        if len(value) == 4 and all(isinstance(v, int | float | np.floating) for v in value):
            return "[" + ", ".join(f"{float(v):.0f}" for v in value) + "]"
        return f"{len(value)} items" if not all(isinstance(v, str) for v in value) else _describe(" | ".join(value))
    return "" if value is None else str(value)
