"""Localized Narratives: geometry, both alignments (hand-worked numbers), and the reader's robustness."""

import json

import numpy as np
import pytest

from pixelllm.data.ln import (
    LocalizedNarrativesReader,
    align_official,
    align_time_window,
    path_in_window,
    trace_positions,
    utterance_locations,
)
from pixelllm.data.samples import Narrative, Utterance
from pixelllm.errors import DataError
from pixelllm.tokenization import EncodedTarget

# x goes 0.1 -> 0.5 during t in [0, 1], then y goes 0.2 -> 0.6 during t in [1, 2]
ELBOW = np.array([[0.1, 0.2, 0.0], [0.5, 0.2, 1.0], [0.5, 0.6, 2.0]])


def narrative(trace, windows, caption="unused"):
    return Narrative(caption, [Utterance(text, s, e) for text, s, e in windows], np.asarray(trace, float))


def target(n_tokens, offsets=None):
    """An EncodedTarget of ``n_tokens`` text tokens then EOS (id 1); ids and offsets are placeholders."""
    offsets = offsets or [(i, i + 1) for i in range(n_tokens)] + [(n_tokens, n_tokens)]
    return EncodedTarget("x" * n_tokens, list(range(10, 10 + n_tokens)) + [1], offsets)


def test_interpolation_and_extrapolation():
    xy = trace_positions(ELBOW, [0.5, 1.5, -1.0, 3.0])
    # inside: linear; before the start: first interval's slope (0.4, 0) per s; after the end:
    # last interval's slope (0, 0.4) per s
    np.testing.assert_allclose(xy, [[0.3, 0.2], [0.5, 0.4], [-0.3, 0.2], [0.5, 1.0]])


def test_points_sharing_a_time_are_averaged():
    trace = np.vstack([ELBOW, [[0.9, 0.2, 1.0]]])  # a second point at t = 1
    # at t = 1 the position is the mean (0.7, 0.2); halfway from (0.1, 0.2) at t = 0: 0.4
    np.testing.assert_allclose(trace_positions(trace, [1.0, 0.5]), [[0.7, 0.2], [0.4, 0.2]])


def test_utterance_boxes_and_centers():
    n = narrative(ELBOW, [("a", 0, 1), ("b", 1, 2), ("c", 2, 3), ("d", 0.5, 1.5), ("e", 1, 1)])
    boxes, centers = utterance_locations(n)
    np.testing.assert_allclose(boxes[:3], [[0.1, 0.2, 0.5, 0.2], [0.5, 0.2, 0.5, 0.6], [0.5, 0.6, 0.5, 1.0]])
    # a linear path's trapezoid average is its midpoint; [2, 3] is extrapolated up to y = 1.0
    np.testing.assert_allclose(centers[:3], [[0.3, 0.2], [0.5, 0.4], [0.5, 0.8]])
    # [0.5, 1.5]: samples t_k = 0.5 + k/15, the elbow at t = 1 falls between k = 7 and k = 8.
    # x_k = 0.3 + 0.4 k/15 for k <= 7, 0.5 after: sum = 8 * 0.3 + 0.4 * 28/15 + 8 * 0.5 = 6.4 + 11.2/15;
    # trapezoid mean = (sum - (x_0 + x_15)/2) / 15 = (6.0 + 11.2/15) / 15 = 0.449778 (exact integral: 0.45).
    # y_k = 0.2 for k <= 7, 0.2 + 0.4 (k - 7.5)/15 after: sum = 3.2 + 0.4 * 32/15; minus (0.2 + 0.4)/2:
    # (2.9 + 12.8/15) / 15 = 0.250222.
    np.testing.assert_allclose(centers[3], [(6.0 + 11.2 / 15) / 15, (2.9 + 12.8 / 15) / 15])
    np.testing.assert_allclose(boxes[3], [0.3, 0.2, 0.5, 0.4])
    # zero-length window: the plain mean of 16 equal samples
    np.testing.assert_allclose(centers[4], [0.5, 0.2])
    np.testing.assert_allclose(boxes[4], [0.5, 0.2, 0.5, 0.2])


def test_official_alignment_proportional_positions():
    n = narrative(ELBOW, [("In", 0, 0.5), ("  ", 0.5, 1), ("a cat", 1, 1.5), ("sits", 1.5, 2)])
    a = align_official(n, target(5))
    # valid utterances 0, 2, 3 (1 is blank): n = 3, positions 1/3, 2/3, 1.
    # 5 tokens: pos_j = 1/3 + (j/5)(1 - 1/3) = 7/15, 9/15, 11/15, 13/15, 15/15
    # nearest: 7/15 -> 1/3 (0.13 vs 0.2); 9/15, 11/15 -> 2/3; 13/15 (0.13 vs 0.2) and 1 -> 1
    assert a.utterance.tolist() == [0, 2, 2, 3, 3, -1]
    assert a.mask.tolist() == [True] * 5 + [False]
    boxes, centers = utterance_locations(n)
    np.testing.assert_allclose(a.boxes[:5], boxes[[0, 2, 2, 3, 3]])
    np.testing.assert_allclose(a.centers[1], centers[2])


def test_official_alignment_center_validity_tie_and_pixels():
    trace = [[0.0, 0.5, 0.0], [0.0, 0.5, 1.0], [0.8, 0.5, 2.0]]
    n = narrative(trace, [("A", 0, 1), ("B", 1, 2), ("C", 2, 3)])
    a = align_official(n, target(2))
    # A's center x is 0 (not > 1e-5): invalid. B, C: n = 2 at 1/2 and 1.
    # tokens: 1/2 + (1/2)(1/2) = 0.75 (a tie: the earlier utterance, B) and 1 (C)
    assert a.utterance.tolist() == [1, 2, -1]
    # B: x 0 -> 0.8 at y 0.5; C: x extrapolated 0.8 -> 1.6 (slope 0.8 per s)
    np.testing.assert_allclose(a.boxes[:2], [[0.0, 0.5, 0.8, 0.5], [0.8, 0.5, 1.6, 0.5]])
    # pixels of a 100 x 50 image: clipped to [0, 1], scaled, rounded
    np.testing.assert_array_equal(a.to_pixels((100, 50))[:2], [[0, 25, 80, 25], [80, 25, 100, 25]])


def test_official_alignment_without_valid_utterance():
    n = narrative(ELBOW, [(" ", 0, 1), ("", 1, 2)])
    assert not align_official(n, target(3)).mask.any()


# "A red  ball, bounces": words A (0,1), red (2,5), "ball," (7,12), bounces (13,20)
CAPTION = "A red  ball, bounces"
TOKENS = [(0, 1), (1, 5), (5, 9), (9, 11), (11, 12), (12, 17), (17, 20), (20, 20)]  # "A", " red", "  ba", ...
PATH = [[0.1, 0.1, 0.0], [0.9, 0.1, 1.0], [0.9, 0.5, 2.0]]
SPOKEN = [("A", 0.25, 0.5), ("red ball", 0.5, 1.5), ("extra", 3.0, 4.0)]


def test_path_in_window():
    box, center = path_in_window(np.array(PATH), 0.5, 1.5)
    # path: (0.5, 0.1) at 0.5 -> raw (0.9, 0.1) at 1 -> (0.9, 0.3) at 1.5
    np.testing.assert_allclose(box, [0.5, 0.1, 0.9, 0.3])
    # half a second averaging x 0.7, y 0.1, then half averaging x 0.9, y 0.2
    np.testing.assert_allclose(center, [0.8, 0.15])
    assert path_in_window(np.array(PATH), 3.0, 4.0) is None  # after the trace: no extrapolation
    box, _ = path_in_window(np.array(PATH), 1.5, 9.0)  # cut to the trace's end at t = 2
    np.testing.assert_allclose(box, [0.9, 0.3, 0.9, 0.5])


def test_time_window_alignment():
    n = narrative(PATH, SPOKEN, CAPTION)
    t = EncodedTarget(CAPTION, [10, 11, 12, 13, 14, 15, 16, 1], TOKENS)
    a = align_time_window(n, t)
    # A -> utterance 0; red and "ball," (and its subwords and comma) -> utterance 1 ("red ball");
    # "bounces" pairs with the unmatched "extra" (same-length replacement) whose window [3, 4]
    # lies after the trace: no target; EOS: none
    assert a.utterance.tolist() == [0, 1, 1, 1, 1, -1, -1, -1]
    assert a.mask.tolist() == [True] * 5 + [False] * 3
    # utterance 0, [0.25, 0.5]: x 0.3 -> 0.5 at y 0.1
    np.testing.assert_allclose(a.boxes[0], [0.3, 0.1, 0.5, 0.1])
    np.testing.assert_allclose(a.centers[0], [0.4, 0.1])
    np.testing.assert_allclose(a.boxes[1:5], [[0.5, 0.1, 0.9, 0.3]] * 4)
    np.testing.assert_allclose(a.centers[3], [0.8, 0.15])


def test_official_alignment_on_the_same_narrative():
    n = narrative(PATH, SPOKEN, CAPTION)
    a = align_official(n, EncodedTarget(CAPTION, [10, 11, 12, 13, 14, 15, 16, 1], TOKENS))
    # all 3 utterances valid (extra's center is extrapolated to (0.9, 1.1)): positions 1/3, 2/3, 1.
    # 7 tokens: 1/3 + (j/7)(2/3) = 9/21, 11/21, 13/21, 15/21, 17/21, 19/21, 21/21
    # nearest: 9/21 -> 1/3; 11/21 .. 17/21 -> 2/3 (17/21: 3/21 vs 4/21); 19/21, 1 -> 1
    assert a.utterance.tolist() == [0, 1, 1, 1, 1, 2, 2, -1]


# ----------------------------------------------------------------------------------------------
# Reader

GOOD = {
    "dataset_id": "coco",
    "image_id": "391895",
    "annotator_id": 7,
    "caption": "In this picture a man.",
    "timed_caption": [
        {"utterance": "In this picture", "start_time": 0.0, "end_time": 1.0},
        {"utterance": "a man", "start_time": 1.0, "end_time": 2.0},
    ],
    "traces": [
        [{"x": 0.1, "y": 0.2, "t": 0.0}, {"x": 0.2, "y": 0.2, "t": 0.5}],
        [{"x": 0.5, "y": 0.5, "t": 1.5}],
    ],
    "voice_recording": "coco_val/x.ogg",
}


def variant(**changes):
    record = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if value is None:
            del record[key]
        else:
            record[key] = value
    return json.dumps(record)


def test_reader_skips_and_counts(tmp_path):
    unsorted = [
        [{"x": 0.5, "y": 0.5, "t": 1.5}],
        [{"x": 0.1, "y": 0.2, "t": 0.0}, {"x": 0.2, "y": 0.2, "t": 0.5}],
    ]
    lines = [
        json.dumps(GOOD),
        "{not json",
        variant(traces=None),
        variant(traces=[[{"x": 0.1, "y": 0.1, "t": 0.0}]]),
        variant(traces=[[]]),
        variant(traces=[[{"x": "a", "y": 0.1, "t": 0.0}, {"x": 0.2, "y": 0.1, "t": 1.0}]]),
        variant(caption="  "),
        variant(timed_caption=[{"utterance": "x", "start_time": 2.0, "end_time": 1.0}]),
        variant(traces=unsorted),
        "",
        "[1, 2]",
    ]
    path = tmp_path / "ln.jsonl"
    path.write_text("\n".join(lines) + "\n")
    reader = LocalizedNarrativesReader(path, tmp_path / "images", "{image_id:0>12}.jpg")
    samples = list(reader)
    assert len(samples) == 2
    assert reader.report.kept == 2
    assert dict(reader.report.skipped) == {
        "malformed JSON line": 1,
        "missing field 'traces'": 1,
        "trace has <= 1 point": 2,
        "non-numeric trace point": 1,
        "empty caption": 1,
        "utterance ends before it starts": 1,
        "record is not a JSON object": 1,
    }
    assert dict(reader.report.repaired) == {"unsorted trace (sorted by time)": 1}
    assert samples[0].image == tmp_path / "images" / "000000391895.jpg"
    n = samples[1].narratives[0]
    assert n.trace[:, 2].tolist() == [0.0, 0.5, 1.5] and n.trace[2, :2].tolist() == [0.5, 0.5]
    assert n.utterances[1] == Utterance("a man", 1.0, 2.0)
    assert "kept 2, skipped 8" in reader.summary()
    list(reader)  # a second pass starts a fresh report
    assert reader.report.kept == 2 and sum(reader.report.skipped.values()) == 8


def test_unreadable_files_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl"):
        list(LocalizedNarrativesReader(tmp_path / "missing.jsonl"))
    junk = tmp_path / "junk.jsonl"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00garbage\nmore garbage\n")
    with pytest.raises(DataError, match="junk.jsonl has no valid JSON line"):
        list(LocalizedNarrativesReader(junk))
