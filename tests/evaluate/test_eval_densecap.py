"""Dense captioning mAP (densecap protocol) and detection mAP."""

import itertools
import math
import random

import numpy as np
import pytest

from pixelllm.evaluate import DenseCaptioning
from pixelllm.evaluate.densecap import interpolated_ap, merge_regions

IOUS = (0.3, 0.4, 0.5, 0.6, 0.7)
METEORS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)


class FakeMeteor:
    """A deterministic stand-in for METEOR (no Java): a made-up score in [0, 0.3] per pair."""

    def __init__(self):
        self.requests = []

    @staticmethod
    def score(hypothesis, references):
        return (len(hypothesis) * 7 + len(references) * 3) % 31 / 100

    def pair_scores(self, hypotheses, references):
        self.requests.append(len(hypotheses))
        return [self.score(h, r) for h, r in zip(hypotheses, references, strict=True)]


class NoMeteor:
    def pair_scores(self, hypotheses, references):
        raise AssertionError("no caption should need METEOR here")


# --- an independent, deliberately plain implementation of the protocol, for comparison ---


def plain_iou(a, b):
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def plain_merge(regions):
    left = list(range(len(regions)))
    merged = []
    while left:
        near = {i: [j for j in left if plain_iou(regions[i][0], regions[j][0]) >= 0.7] for i in left}
        most = max(len(members) for members in near.values())
        members = near[next(i for i in left if len(near[i]) == most)]
        box = [sum(regions[j][0][k] for j in members) / len(members) for k in range(4)]
        merged.append((box, [regions[j][1] for j in members]))
        left = [j for j in left if j not in members]
    return merged


def plain_ap(hits, num_positives):
    total = 0.0
    for k in range(100):
        best = 0.0
        found = 0
        for rank, hit in enumerate(hits, start=1):
            found += hit
            if found / num_positives >= k / 100:
                best = max(best, found / rank)
        total += best
    return total / 100


def plain_densecap(images, meteor):
    """images: list of (predictions [(box, score, caption)], regions [(box, caption)])."""
    records, positives = [], 0
    for predictions, regions in images:
        merged = plain_merge(regions)
        positives += len(merged)
        taken = set()
        for box, score, caption in sorted(predictions, key=lambda p: -p[1]):
            ious = [plain_iou(box, region[0]) for region in merged]
            best = ious.index(max(ious)) if ious else None
            if best is not None and ious[best] > 0 and best not in taken:
                taken.add(best)
                records.append((score, ious[best], meteor(caption, tuple(merged[best][1]))))
            else:
                records.append((score, 0.0, None))
    records.sort(key=lambda r: -r[0])
    result = {}
    for t in IOUS:
        result[f"det{t}"] = plain_ap([r[2] is not None and r[1] >= t for r in records], positives)
        for m in METEORS:
            hits = [r[2] is not None and r[1] >= t and r[2] > m for r in records]
            result[f"cap{t},{m}"] = plain_ap(hits, positives)
    return result


# --- tests ---


def test_interpolated_ap_by_hand():
    # Ranked TP, FP, TP, FP with 3 positives: recall 1/3, 1/3, 2/3, 2/3; precision 1, 1/2, 2/3, 1/2.
    # k = 0..33 -> 1; k = 34..66 -> 2/3; k = 67..99 -> 0. AP = (34 + 33 * 2/3) / 100 = 0.56.
    assert interpolated_ap(np.array([True, False, True, False]), 3) == pytest.approx(0.56)
    assert interpolated_ap(np.array([True, True]), 2) == 1.0
    assert interpolated_ap(np.array([], dtype=bool), 2) == 0.0


def test_merge_takes_the_largest_cluster_first():
    # B and C each overlap A at IoU 0.75 but each other at 0.5; taking the regions in order would
    # merge B with A and leave C alone, the largest cluster (around A) takes all three.
    b, c, a, e = [0, 0, 10, 7.5], [0, 2.5, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]
    boxes, captions = merge_regions(np.array([b, c, a, e]), ["b", "c", "a", "e"])
    np.testing.assert_allclose(boxes, [[0, 2.5 / 3, 10, 27.5 / 3], e])
    assert captions == [("b", "c", "a"), ("e",)]


def test_hand_worked_two_images(meteor):
    metric = DenseCaptioning(meteor)
    # Image 1: the first two regions overlap at IoU 90/100 = 0.9 and merge into [0, 0, 10, 9.5]
    # with both captions. Image 2: one region. 3 positives.
    # Predictions by score: 0.9 takes the merged region (IoU 1, caption identical: METEOR 1);
    # 0.8 wants the same region, already taken: false positive; 0.7 takes image 2's region at
    # IoU 200/400 = 0.5 with an identical caption; 0.5 takes the dog region (IoU 1) with an
    # unrelated caption (METEOR 0, which never exceeds a METEOR threshold).
    metric.update(
        pred_boxes=[[[0, 0, 10, 9.5], [0, 0, 10, 9.5], [20, 20, 30, 30]], [[0, 0, 20, 10]]],
        pred_scores=[[0.9, 0.8, 0.5], [0.7]],
        pred_captions=[["a red car", "a red car", "blue sky"], ["a tree"]],
        gt_boxes=[[[0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30]], [[0, 0, 20, 20]]],
        gt_captions=[["a red car", "red vehicle", "a dog"], ["a tree"]],
    )
    result = metric.compute()
    # Captioning, IoU <= 0.5: TP FP TP FP -> 0.56 (see test_interpolated_ap_by_hand);
    # IoU 0.6, 0.7: TP FP FP FP -> 34 / 100. mAP = (3 * 0.56 + 2 * 0.34) / 5 = 0.472.
    assert result["mAP_iou0.5_meteor0.25"] == pytest.approx(56.0)
    assert result["mAP_iou0.6_meteor0.00"] == pytest.approx(34.0)
    assert result["mAP"] == pytest.approx(47.2)
    # Detection, IoU <= 0.5: TP FP TP TP: precision 1, 1/2, 2/3, 3/4 at recall 1/3, 1/3, 2/3, 1
    # -> (34 * 1 + 66 * 3/4) / 100 = 0.835. IoU 0.6, 0.7: TP FP FP TP: precision 1, then 1/2 at
    # recall 2/3 -> (34 + 33 / 2) / 100 = 0.505. mAP_detection = (3 * 0.835 + 2 * 0.505) / 5 = 0.703.
    assert result["mAP_detection_iou0.3"] == pytest.approx(83.5)
    assert result["mAP_detection_iou0.7"] == pytest.approx(50.5)
    assert result["mAP_detection"] == pytest.approx(70.3)
    assert result["num_gt_regions"] == 3.0
    assert result["num_predictions"] == 4.0
    assert len([key for key in result if key.startswith("mAP_iou")]) == 30


def test_perfect_predictions_give_100(meteor):
    metric = DenseCaptioning(meteor)
    metric.update(
        [[[0, 0, 10, 10], [30, 30, 50, 40]]],
        [[0.3, 0.9]],
        [["a small black cat", "a wooden table"]],
        [[[0, 0, 10, 10], [30, 30, 50, 40]]],
        [["a small black cat", "a wooden table"]],
    )
    result = metric.compute()
    assert result["mAP"] == 100.0
    assert result["mAP_detection"] == 100.0


def random_image(rng):
    words = ["a red car", "dog", "a tall green tree", "man in a hat", "sky"]
    regions = []
    for _ in range(rng.randint(0, 4)):
        x, y = rng.uniform(0, 50), rng.uniform(0, 50)
        w, h = rng.uniform(5, 30), rng.uniform(5, 30)
        for _ in range(rng.randint(1, 3)):  # near-copies that may merge
            jitter = [rng.uniform(-2, 2) for _ in range(4)]
            regions.append(
                ([x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]], rng.choice(words))
            )
    predictions = []
    for _ in range(rng.randint(0, 7)):
        x, y = rng.uniform(0, 50), rng.uniform(0, 50)
        box = [x, y, x + rng.uniform(3, 30), y + rng.uniform(3, 30)]
        predictions.append((box, rng.random(), rng.choice(words)))
    return predictions, regions


def test_matches_a_plain_reference_implementation_on_random_images():
    rng = random.Random(0)
    merges = partial_scores = 0
    for _ in range(20):
        images = [random_image(rng) for _ in range(5)]
        if not any(regions for _, regions in images):
            continue
        fake = FakeMeteor()
        metric = DenseCaptioning(fake)
        for predictions, regions in images:
            metric.update(
                [[p[0] for p in predictions]],
                [[p[1] for p in predictions]],
                [[p[2] for p in predictions]],
                [[r[0] for r in regions]],
                [[r[1] for r in regions]],
            )
        result = metric.compute()
        expected = plain_densecap(images, FakeMeteor.score)
        for t, m in itertools.product(IOUS, METEORS):
            assert result[f"mAP_iou{t:.1f}_meteor{m:.2f}"] == pytest.approx(100 * expected[f"cap{t},{m}"])
        for t in IOUS:
            assert result[f"mAP_detection_iou{t:.1f}"] == pytest.approx(100 * expected[f"det{t}"])
        assert len(fake.requests) <= 1  # all pairs in one request
        merges += result["num_gt_regions"] < sum(len(regions) for _, regions in images)
        partial_scores += 0 < result["mAP"] < result["mAP_detection"] < 100
    assert merges and partial_scores  # the random cases did exercise merging and the thresholds


def test_malformed_records():
    nan = float("nan")
    # Image 1: only the first region is usable (NaN box, zero width, caption not a string).
    # Predictions: NaN box at 0.9 (false positive), a good box at 0.5 whose caption is missing
    # (takes the region, scored as the empty caption), a good box with a NaN score (ranked last,
    # region already taken). Image 2: regions but none usable -> skipped.
    fake = FakeMeteor()
    metric = DenseCaptioning(fake)
    metric.update(
        [[[nan, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], [[0, 0, 1, 1]]],
        [[0.9, 0.5, nan], [0.9]],
        [["a cat", None, "a cat"], ["x"]],
        [[[0, 0, 10, 10], [nan, 0, 1, 1], [5, 5, 5, 9], [20, 20, 30, 30]], [[nan, 0, 1, 1]]],
        [["a cat", "x", "zero width", None], ["x"]],
    )
    result = metric.compute()
    assert result["num_samples"] == 1.0
    assert result["num_skipped"] == 1.0
    assert result["num_skipped_regions"] == 4.0
    assert result["num_invalid_predictions"] == 3.0
    assert fake.requests == [1]
    # Ranked FP, TP, FP with 1 positive: precision 1/2 at recall 1 -> detection AP 0.5 everywhere.
    assert result["mAP_detection"] == pytest.approx(50.0)
    # The empty caption scores FakeMeteor.score("", ("a cat",)) = 0.03: above thresholds 0 only.
    assert result["mAP_iou0.7_meteor0.00"] == pytest.approx(50.0)
    assert result["mAP_iou0.7_meteor0.05"] == 0.0


def test_a_region_with_an_empty_caption_accepts_any_caption():
    metric = DenseCaptioning(NoMeteor())
    metric.update([[[0, 0, 10, 10]]], [[1.0]], [["anything at all"]], [[[0, 0, 10, 10]]], [[""]])
    assert metric.compute()["mAP"] == 100.0


def test_predictions_are_clipped_when_image_sizes_are_given():
    # Unclipped IoU 100 / 200 = 0.5: a hit only at IoU thresholds 0.3-0.5.
    args = ([[[-10, 0, 10, 10]]], [[1.0]], [["x"]], [[[0, 0, 10, 10]]], [["y"]])
    unclipped, clipped = DenseCaptioning(FakeMeteor()), DenseCaptioning(FakeMeteor())
    unclipped.update(*args)
    clipped.update(*args, image_sizes=[[10, 10]])
    assert unclipped.compute()["mAP_detection"] == pytest.approx(60.0)
    assert clipped.compute()["mAP_detection"] == 100.0


def test_no_ground_truth_gives_nan():
    metric = DenseCaptioning(NoMeteor())
    metric.update([[[0, 0, 1, 1]]], [[1.0]], [["x"]], [np.zeros((0, 4))], [[]])
    result = metric.compute()
    assert math.isnan(result["mAP"]) and math.isnan(result["mAP_detection_iou0.5"])
    assert result["num_samples"] == 1.0
