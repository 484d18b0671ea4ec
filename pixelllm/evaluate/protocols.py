"""The evaluation protocol of each task: its ground-truth units on an image, how a model (or the
ground-truth oracle) answers them, and how the answers feed the metrics.

Everything here is in **original-image pixels** (boxes ``[x0, y0, x1, y1]``, points ``[x, y]``,
masks ``(H, W)``), the frame of the readers, of ``pixelllm.tasks`` and of the metrics.

- **trace**: every Localized Narrative of an image. The model reads the narrative's own caption
  (teacher-forced, trace prompt on the whole image); each token's predicted point (its box center)
  is scored against the trace samples of the utterance the token is aligned to (the official
  alignment: 16 samples over the utterance's time window): ``TracePointL1``. The image's generated
  caption (beam 4) is scored against its narratives' captions: ``CaptionMetrics``. On the shapes
  world, ``WordGrounding`` scores both the generated caption's words and the narratives' own words
  as read (``narrative_word_grounding``), and ``SceneCoverage`` how the caption covers the scene.
- **refer**: every expression of every object: the box at the expression's last word, the
  expression read teacher-forced (as the official RefCOCO inference does; nothing is decoded),
  against the object's box: ``ReferringLocalization`` (Precision@1).
- **refseg**: as refer, plus the mask against the object's mask: ``ReferringSegmentation`` (cIoU,
  gIoU) and the box's Precision@1.
- **regioncap**: every region (object) of an image, its box as the location prompt (greedy, at
  most 40 tokens); the caption against the region's texts: ``CaptionMetrics``.
- **densecap**: every image: the detected regions and their captions against all its regions:
  ``DenseCaptioning`` (mAP, detection mAP).
- **muse**: every multi-target question (PixelLM's MUSE): all the segments the model answers it
  with against all its targets: ``MultiTargetSegmentation`` (cIoU, gIoU; the IoU matching, and
  the official matching as ``cIoU_official``, ``gIoU_official``) and ``TargetCounts`` (the share
  of questions answered with exactly their number of targets, and of no-target questions answered
  with no mask).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from PIL import Image

from pixelllm.data.coco import decode_segmentation
from pixelllm.data.ln import align_official, utterance_samples
from pixelllm.data.report import SkipReport
from pixelllm.data.samples import Narrative, Sample
from pixelllm.data.words import words_from_ids
from pixelllm.errors import InputError
from pixelllm.evaluate.base import Metric
from pixelllm.evaluate.boxes import box_iou, clip_boxes, paired_box_iou
from pixelllm.evaluate.captions import CaptionMetrics, MeteorScorer
from pixelllm.evaluate.densecap import DenseCaptioning, merge_regions
from pixelllm.evaluate.refer import ReferringLocalization
from pixelllm.evaluate.refseg import MultiTargetSegmentation, ReferringSegmentation, TargetCounts
from pixelllm.evaluate.shapes import ColorShapeAccuracy, SceneCoverage, WordGrounding
from pixelllm.evaluate.trace import TracePointL1
from pixelllm.results import Region, Segment, Segmentation
from pixelllm.tokenization import encode_target

RECALL_IOU = 0.5  # densecap's per-image score: the share of regions some prediction finds at this IoU


@dataclass
class EvalImage:
    """One image under evaluation: its sample, the loaded picture, ``size`` ``(W, H)``, and the
    task's ground-truth units on it."""

    sample: Sample
    picture: Image.Image
    size: tuple[int, int]
    units: list


@dataclass
class TraceUnit:
    """A narrative: its caption's token ids (EOS excluded), each token's ground-truth trace points
    ``(T, S, 2)`` (NaN where the token has none) and ``mask (T,)``, the tokens to score."""

    caption: str
    token_ids: list[int]
    points: np.ndarray
    mask: np.ndarray


@dataclass
class TraceAnswer:
    """The image's generated caption (and its words with their points, when a model made it), and
    per narrative the predicted points of its tokens (``(T, 2)``, or ``(T, P, 2)`` for several
    points per token) and, from a model, the narrative's words with their points."""

    caption: str
    points: list[np.ndarray]
    words: list | None = None
    narrative_words: list[list] | None = None


@dataclass
class RegionUnit:
    """An object: its box, its texts (expressions or phrases), and its mask (refseg)."""

    box: list[float]
    texts: list[str]
    mask: np.ndarray | None = None


@dataclass
class ReferUnit:
    """One referring expression of an object."""

    expression: str
    region: RegionUnit


@dataclass
class DenseUnit:
    """All regions of an image: ``boxes (G, 4)`` and one caption each."""

    boxes: np.ndarray
    captions: list[str]


@dataclass
class MuseUnit:
    """A multi-target question, its answer text (``{seg}`` per target, or None) and its targets
    in the answer's order (each with its box and mask; none for a no-target question)."""

    question: str
    answer: str | None
    targets: list[RegionUnit]


class Protocol(ABC):
    """One task's evaluation. ``units`` turns a sample into ground-truth units; ``predict`` (a
    model) and ``oracle`` (the ground truth itself) answer a batch of images; ``update`` feeds the
    metrics and returns one record per scored unit (``image_id``, ``query``, ``prediction``,
    ``ground_truth``, ``scores``); ``compute`` reads the metrics.

    Subclasses set ``metrics`` (every metric fed, in the order their values are reported) and
    ``primary`` (the one whose counts are the evaluation's: ``num_samples``, ...).
    """

    metrics: list[Metric]
    primary: Metric

    name: ClassVar[str]
    headline: ClassVar[tuple[str, ...]]  # the values a report shows (``compute`` gives them all)
    score: ClassVar[str]  # the per-sample score that ranks the worst samples
    lower_is_better: ClassVar[bool] = False
    uses_meteor: ClassVar[bool] = False

    def __init__(self, report: SkipReport, meteor: MeteorScorer | None = None, tokenizer=None,
                 max_text_tokens: int = 128, per_sample: bool = False) -> None:
        """``report`` counts units that cannot be built; ``per_sample``: also compute per-sample
        scores that cost extra (METEOR of each region caption)."""
        self.report = report
        self.meteor = meteor
        self.tokenizer = tokenizer
        self.max_text_tokens = max_text_tokens
        self.per_sample = per_sample

    @abstractmethod
    def units(self, sample: Sample, size: tuple[int, int]) -> list:
        """The ground-truth units of ``sample``, whose image is ``size`` ``(W, H)``."""

    @abstractmethod
    def predict(self, predictor, encoded: list, images: list[EvalImage]) -> list:
        """One answer per image from a ``pixelllm.tasks.Predictor`` (``encoded``: the images, encoded)."""

    @abstractmethod
    def oracle(self, images: list[EvalImage]) -> list:
        """One answer per image made of the ground truth."""

    @abstractmethod
    def update(self, images: list[EvalImage], answers: list) -> list[dict]:
        """Feed the metrics with a batch; the per-sample records."""

    def compute(self) -> tuple[dict[str, float], dict[str, float]]:
        """The metric values (of the metrics that scored anything) and the primary metric's counts."""
        values: dict[str, float] = {}
        for metric in self.metrics:
            if metric is self.primary or metric.counts["num_samples"]:
                values.update({k: v for k, v in metric.compute().items() if k not in metric.counts})
        return values, {k: float(v) for k, v in self.primary.counts.items()}


def _alone(metric: Metric, *batch) -> dict[str, float]:
    """The values of a fresh metric of ``metric``'s kind fed with one batch (per-sample scores)."""
    fresh = type(metric)()
    fresh.update(*batch)
    return fresh.compute()


def _per_image(flat: list, images: list[EvalImage]) -> list[list]:
    """A flat list over all units cut back into one list per image."""
    items = iter(flat)
    return [[next(items) for _ in image.units] for image in images]


def _region_mask(region, size: tuple[int, int], report: SkipReport) -> np.ndarray | None:
    """The ``(H, W)`` bool mask of a region of an image of ``size`` ``(W, H)``, or None (counted in
    ``report``) when it cannot be decoded."""
    try:
        return decode_segmentation(region.segmentation, size[1], size[0])
    except (ValueError, TypeError):
        report.skip("unreadable mask")
        return None


def _record(image: EvalImage, query, prediction, ground_truth, **scores) -> dict:
    return {"image_id": image.sample.image_id, "image": str(image.sample.image), "query": query,
            "prediction": prediction, "ground_truth": ground_truth, "scores": scores}


# ----------------------------------------------------------------------------------------------


class TraceProtocol(Protocol):
    name = "trace"
    headline = ("point_l1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
    score = "point_l1"
    lower_is_better = True
    uses_meteor = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.tokenizer is None:
            raise InputError("trace evaluation needs a tokenizer (GroundTruthOracle(tokenizer)): it scores tokens")
        self.points = TracePointL1()
        self.captions = CaptionMetrics(self.meteor)
        # fed where the scene's objects are known (shapes world)
        self.grounding, self.narrative_grounding = WordGrounding(), WordGrounding("narrative_word_grounding")
        self.coverage = SceneCoverage()
        self.metrics = [self.points, self.captions, self.grounding, self.narrative_grounding, self.coverage]
        self.primary = self.points

    def units(self, sample: Sample, size: tuple[int, int]) -> list[TraceUnit]:
        return [self._unit(narrative, size) for narrative in sample.narratives]

    def _unit(self, narrative: Narrative, size: tuple[int, int]) -> TraceUnit:
        """Each token's ground truth: the official samples of its aligned utterance, in pixels."""
        target = encode_target(self.tokenizer, narrative.caption, self.max_text_tokens)
        alignment = align_official(narrative, target)
        samples, _ = utterance_samples(narrative)
        pixels = np.clip(samples, 0.0, 1.0) * np.asarray(size, dtype=np.float64)
        count = len(target.ids) - 1  # EOS has no location
        mask = alignment.mask[:count]
        points = np.full((count, samples.shape[1], 2), np.nan)
        points[mask] = pixels[alignment.utterance[:count][mask]]
        return TraceUnit(narrative.caption, target.ids[:count], points, mask)

    def predict(self, predictor, encoded: list, images: list[EvalImage]) -> list[TraceAnswer]:
        captions = predictor.caption_batch(encoded)
        readers = [e for e, image in zip(encoded, images, strict=True) for _ in image.units]
        ids = [unit.token_ids for image in images for unit in image.units]
        boxes = predictor.token_boxes(readers, ids)
        centers = [(b[:, :2] + b[:, 2:]) / 2 for b in boxes]
        read = _per_image(list(zip(ids, boxes, strict=True)), images)
        # the narratives' words only feed word grounding, which needs the scene's objects
        return [TraceAnswer(c.text, points, c.words,
                            [words_from_ids(predictor.tokenizer, i, b) for i, b in narratives]
                            if image.sample.regions else None)
                for c, points, narratives, image in zip(captions, _per_image(centers, images), read, images,
                                                        strict=True)]

    def oracle(self, images: list[EvalImage]) -> list[TraceAnswer]:
        return [TraceAnswer(image.units[0].caption, [unit.points for unit in image.units]) for image in images]

    def update(self, images: list[EvalImage], answers: list[TraceAnswer]) -> list[dict]:
        records = []
        for image, answer in zip(images, answers, strict=True):
            self.captions.update([answer.caption], [[unit.caption for unit in image.units]])
            objects = [(" ".join(region.texts), region.box) for region in image.sample.regions]
            if objects and answer.words is not None:
                self.grounding.update(answer.words, objects)
                self.coverage.update(answer.caption, [phrase for phrase, _ in objects])
            if objects and answer.narrative_words is not None:
                for words in answer.narrative_words:
                    self.narrative_grounding.update(words, objects)
            for unit, points in zip(image.units, answer.points, strict=True):
                batch = ([points], [unit.points], [unit.mask], [image.size])
                self.points.update(*batch)
                records.append(_record(image, None, {"caption": answer.caption, "points": points},
                                       {"caption": unit.caption}, point_l1=_alone(self.points, *batch)["point_l1"]))
        return records


class ReferProtocol(Protocol):
    name = "refer"
    headline = ("precision@1",)
    score = "box_iou"
    with_masks: ClassVar[bool] = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.boxes = ReferringLocalization()
        self.metrics, self.primary = [self.boxes], self.boxes

    def units(self, sample: Sample, size: tuple[int, int]) -> list[ReferUnit]:
        units = []
        for region in sample.regions:
            mask = _region_mask(region, size, self.report) if self.with_masks else None
            if self.with_masks and mask is None:
                continue
            unit = RegionUnit(list(region.box), region.texts, mask)
            units += [ReferUnit(text, unit) for text in region.texts]
        return units

    def predict(self, predictor, encoded: list, images: list[EvalImage]) -> list[list]:
        return predictor.locate_batch(encoded, self._expressions(images))

    @staticmethod
    def _expressions(images: list[EvalImage]) -> list[list[str]]:
        return [[unit.expression for unit in image.units] for image in images]

    def oracle(self, images: list[EvalImage]) -> list[list]:
        return [[unit.region.box for unit in image.units] for image in images]

    def update(self, images: list[EvalImage], answers: list[list]) -> list[dict]:
        records = []
        for image, boxes in zip(images, answers, strict=True):
            gt = np.array([unit.region.box for unit in image.units]).reshape(-1, 4)
            pred = np.array(boxes, dtype=np.float64).reshape(-1, 4)
            self.boxes.update(pred, gt, image.size)
            ious = paired_box_iou(clip_boxes(pred, image.size), clip_boxes(gt, image.size))
            records += [_record(image, unit.expression, list(p), list(g), box_iou=float(iou))
                        for unit, p, g, iou in zip(image.units, pred, gt, ious, strict=True)]
        return records


class RefsegProtocol(ReferProtocol):
    name = "refseg"
    headline = ("cIoU", "gIoU", "precision@1")
    score = "mask_iou"
    with_masks = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.masks = ReferringSegmentation()
        self.metrics, self.primary = [self.masks, self.boxes], self.masks

    def predict(self, predictor, encoded: list, images: list[EvalImage]) -> list[list[Segmentation]]:
        return predictor.segment_batch(encoded, self._expressions(images))

    def oracle(self, images: list[EvalImage]) -> list[list[Segmentation]]:
        return [[Segmentation(unit.expression, unit.region.box, unit.region.mask, image.size)
                 for unit in image.units] for image in images]

    def update(self, images: list[EvalImage], answers: list[list[Segmentation]]) -> list[dict]:
        records = super().update(images, [[s.box for s in answer] for answer in answers])
        rows = iter(records)
        for image, answer in zip(images, answers, strict=True):
            for unit, segmentation in zip(image.units, answer, strict=True):
                batch = ([segmentation.mask], [unit.region.mask])
                self.masks.update(*batch)
                record = next(rows)
                record["scores"]["mask_iou"] = _alone(self.masks, *batch)["gIoU"] / 100.0
                record["prediction"] = {"box": record["prediction"], "area": segmentation.area}
                record["ground_truth"] = {"box": record["ground_truth"], "area": int(unit.region.mask.sum())}
        return records


class RegionCaptionProtocol(Protocol):
    name = "regioncap"
    headline = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
    score = "meteor"
    uses_meteor = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.captions = CaptionMetrics(self.meteor)
        self.color_shape = ColorShapeAccuracy()  # scores references made of shapes-world words
        self.metrics, self.primary = [self.captions, self.color_shape], self.captions

    def units(self, sample: Sample, size: tuple[int, int]) -> list[RegionUnit]:
        return [RegionUnit(list(region.box), region.texts) for region in sample.regions]

    def predict(self, predictor, encoded: list, images: list[EvalImage]) -> list[list[str]]:
        captions = predictor.caption_regions_batch(encoded, [[unit.box for unit in image.units] for image in images])
        return [[caption.text for caption in image_captions] for image_captions in captions]

    def oracle(self, images: list[EvalImage]) -> list[list[str]]:
        return [[unit.texts[0] for unit in image.units] for image in images]

    def update(self, images: list[EvalImage], answers: list[list[str]]) -> list[dict]:
        pairs = [(image, unit, caption) for image, captions in zip(images, answers, strict=True)
                 for unit, caption in zip(image.units, captions, strict=True)]
        self.captions.update([caption for _, _, caption in pairs], [unit.texts for _, unit, _ in pairs])
        self.color_shape.update([caption for _, _, caption in pairs], [unit.texts for _, unit, _ in pairs])
        meteor = self._pair_meteor(pairs)
        return [_record(image, unit.box, caption, unit.texts, meteor=score)
                for (image, unit, caption), score in zip(pairs, meteor, strict=True)]

    def _pair_meteor(self, pairs: list) -> list[float]:
        """Each caption's METEOR (raw text, METEOR's own normalization), when per-sample scores are
        wanted; NaN otherwise."""
        if not (self.per_sample and pairs):
            return [math.nan] * len(pairs)
        return self.meteor.pair_scores([caption for _, _, caption in pairs], [unit.texts for _, unit, _ in pairs])


class DenseCaptionProtocol(Protocol):
    name = "densecap"
    headline = ("mAP", "mAP_detection")
    score = f"recall@{RECALL_IOU}"
    uses_meteor = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.regions = DenseCaptioning(self.meteor)
        self.metrics, self.primary = [self.regions], self.regions

    def units(self, sample: Sample, size: tuple[int, int]) -> list[DenseUnit]:
        pairs = [(region.box, text) for region in sample.regions for text in region.texts]
        return [DenseUnit(np.array([box for box, _ in pairs], dtype=np.float64).reshape(-1, 4),
                          [text for _, text in pairs])]

    def predict(self, predictor, encoded: list, images: list[EvalImage]) -> list[list[Region]]:
        """Every proposal the head gives, repeats included, as the official evaluation ranks them."""
        return predictor.dense_caption_batch(encoded, min_score=None, deduplicate=False)

    def oracle(self, images: list[EvalImage]) -> list[list[Region]]:
        """The ground-truth regions as the metric merges them (mean box, first caption), score 1."""
        answers = []
        for image in images:
            unit = image.units[0]
            boxes, captions = merge_regions(unit.boxes, unit.captions, self.regions.merge_iou)
            answers.append([Region(list(box), 1.0, texts[0]) for box, texts in zip(boxes, captions, strict=True)])
        return answers

    def update(self, images: list[EvalImage], answers: list[list[Region]]) -> list[dict]:
        records = []
        for image, regions in zip(images, answers, strict=True):
            unit = image.units[0]
            boxes = np.array([r.box for r in regions], dtype=np.float64).reshape(-1, 4)
            self.regions.update([boxes], [[r.score for r in regions]], [[r.caption for r in regions]],
                                [unit.boxes], [unit.captions], [image.size])
            prediction = [{"box": r.box, "score": r.score, "caption": r.caption} for r in regions]
            truth = [{"box": list(b), "caption": c} for b, c in zip(unit.boxes, unit.captions, strict=True)]
            records.append(_record(image, None, prediction, truth, **{self.score: _recall(unit.boxes, boxes)}))
        return records


class MuseProtocol(Protocol):
    """Multi-target segmentation: the model answers each question with any number of segments
    (``Predictor.segment_all_batch(encoded, queries)``, one encoded image per query)."""

    name = "muse"
    headline = ("gIoU", "cIoU", "gIoU_official", "cIoU_official", "count_accuracy", "no_target_accuracy")
    score = "question_giou"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.masks = MultiTargetSegmentation("iou")
        self.official = MultiTargetSegmentation("official")  # its keys are renamed in ``compute``
        self.target_counts = TargetCounts()
        self.metrics, self.primary = [self.masks, self.target_counts], self.masks

    def units(self, sample: Sample, size: tuple[int, int]) -> list[MuseUnit]:
        """The questions whose targets all have a readable mask (the others are skipped, counted)."""
        units = []
        for question in sample.questions:
            targets = [RegionUnit(list(t.box), t.texts, _region_mask(t, size, self.report)) for t in question.targets]
            if all(target.mask is not None for target in targets):
                units.append(MuseUnit(question.text, question.answer, targets))
        return units

    def predict(self, predictor, encoded: list, images: list[EvalImage]) -> list[list[list[Segment]]]:
        if not hasattr(predictor, "segment_all_batch"):
            raise InputError("muse evaluation needs a model that segments every target of a question "
                             "(segment_all_batch); this one has no such head")
        readers = [e for e, image in zip(encoded, images, strict=True) for _ in image.units]
        queries = [unit.question for image in images for unit in image.units]
        return _per_image(predictor.segment_all_batch(readers, queries), images)

    def oracle(self, images: list[EvalImage]) -> list[list[list[Segment]]]:
        return [[[Segment(t.box, t.mask, 1.0) for t in unit.targets] for unit in image.units] for image in images]

    def update(self, images: list[EvalImage], answers: list[list[list[Segment]]]) -> list[dict]:
        records = []
        for image, image_answers in zip(images, answers, strict=True):
            for unit, segments in zip(image.units, image_answers, strict=True):
                batch = ([[s.mask for s in segments]], [[t.mask for t in unit.targets]])
                self.masks.update(*batch)
                self.official.update(*batch, [image.sample.image_id])
                self.target_counts.update([len(segments)], [len(unit.targets)])
                records.append(_record(image, unit.question, _segments_record(segments),
                                       {**_segments_record(unit.targets), "answer": unit.answer},
                                       question_giou=_alone(self.masks, *batch)["gIoU"] / 100.0))
        return records

    def compute(self) -> tuple[dict[str, float], dict[str, float]]:
        values, counts = super().compute()
        official = self.official.compute()
        return {**values, "gIoU_official": official["gIoU"], "cIoU_official": official["cIoU"]}, counts


def _segments_record(segments: list) -> dict:
    """The boxes and mask areas of segments (or target regions), for the per-sample file."""
    return {"count": len(segments), "boxes": [list(s.box) for s in segments],
            "areas": [int(s.mask.sum()) for s in segments]}


def _recall(gt_boxes: np.ndarray, pred_boxes: np.ndarray) -> float:
    """The share of ground-truth boxes that some predicted box overlaps at IoU >= ``RECALL_IOU``."""
    if not len(gt_boxes):
        return math.nan
    if not len(pred_boxes):
        return 0.0
    return float((box_iou(gt_boxes, pred_boxes).max(axis=1) >= RECALL_IOU).mean())


PROTOCOLS: dict[str, type[Protocol]] = {
    p.name: p
    for p in (TraceProtocol, ReferProtocol, RefsegProtocol, RegionCaptionProtocol, DenseCaptionProtocol,
              MuseProtocol)
}
