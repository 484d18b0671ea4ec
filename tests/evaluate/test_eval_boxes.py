"""Box IoU, validity and clipping."""

import numpy as np

from pixelllm.evaluate.boxes import box_iou, clip_boxes, has_area, paired_box_iou, well_formed


def test_quarter_width_shift_gives_iou_0_6():
    # 4x4 box moved right by 1: intersection 3*4 = 12, union 16 + 16 - 12 = 20.
    assert paired_box_iou([[0, 0, 4, 4]], [[1, 0, 5, 4]])[0] == 0.6


def test_third_width_shift_gives_iou_exactly_0_5():
    # 3x3 box moved right by 1: intersection 2*3 = 6, union 9 + 9 - 6 = 12.
    assert paired_box_iou([[0, 0, 3, 3]], [[1, 0, 4, 3]])[0] == 0.5


def test_pairwise_matrix():
    iou = box_iou([[0, 0, 2, 2], [10, 10, 11, 11]], [[0, 0, 2, 2], [1, 1, 3, 3], [5, 5, 6, 6]])
    # [0,0,2,2] vs [1,1,3,3]: intersection 1, union 4 + 4 - 1 = 7.
    expected = np.array([[1.0, 1 / 7, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(iou, expected, rtol=0, atol=1e-15)


def test_zero_area_boxes_give_zero_not_nan():
    assert paired_box_iou([[1, 1, 1, 1]], [[1, 1, 1, 1]])[0] == 0.0
    assert box_iou(np.zeros((0, 4)), [[0, 0, 1, 1]]).shape == (0, 1)


def test_validity():
    boxes = np.array([[0, 0, 1, 1], [0, 0, 0, 1], [2, 0, 1, 1], [np.nan, 0, 1, 1], [0, 0, np.inf, 1]])
    np.testing.assert_array_equal(well_formed(boxes), [True, True, False, False, False])
    np.testing.assert_array_equal(has_area(boxes), [True, False, False, False, False])


def test_clip_to_image():
    clipped = clip_boxes(np.array([[-5.0, -1.0, 30.0, 8.0], [1.0, 2.0, 3.0, 4.0]]), [20, 10])
    np.testing.assert_array_equal(clipped, [[0, 0, 20, 8], [1, 2, 3, 4]])
