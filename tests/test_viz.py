"""Pictures: sizes, where they change the image, colors, labels inside the canvas, saving."""

import os

import numpy as np
import pytest
from PIL import Image

from pixelllm.data.words import Word
from pixelllm.errors import InputError
from pixelllm.results import Caption, Region, Segmentation
from pixelllm.viz import (
    LEGEND_BACKGROUND,
    MIN_SIDE,
    MUTED,
    NEIGHBOURS,
    draw_caption,
    draw_location,
    draw_regions,
    draw_segmentation,
    palette,
    save_mask,
    save_picture,
)

GRAY = (128, 128, 128)
WIDTH, HEIGHT = 640, 480  # over MIN_SIDE: the picture's pixels are the image's


def gray(width=WIDTH, height=HEIGHT) -> np.ndarray:
    return np.full((height, width, 3), GRAY, dtype=np.uint8)


def word(text, x, y, half=10) -> Word:
    return Word(text, [x - half, y - half, x + half, y + half], [x, y], [])


def caption(words, size=(WIDTH, HEIGHT)) -> Caption:
    return Caption(" ".join(w.text for w in words), words, size)


def around(picture: Image.Image, x, y, radius) -> np.ndarray:
    return np.asarray(picture)[round(y) - radius : round(y) + radius + 1, round(x) - radius : round(x) + radius + 1]


def pixel(picture: Image.Image, x, y) -> tuple:
    return picture.getpixel((round(x), round(y)))


def has_color(array: np.ndarray, color) -> bool:
    return bool(np.all(array == color, axis=-1).any())


SPREAD = [word("a", 40, 40), word("red", 200, 40), word("circle", 120, 100), word("here.", 60, 150)]


def test_caption_picture_is_the_image_with_a_legend_strip_under_it():
    picture = draw_caption(gray(), caption(SPREAD))
    assert picture.mode == "RGB" and picture.width == WIDTH and picture.height > HEIGHT
    assert pixel(picture, 5, HEIGHT + 5) == LEGEND_BACKGROUND
    assert pixel(picture, WIDTH - 5, HEIGHT - 5) == GRAY  # far from every point, box and line


def test_each_word_is_marked_at_its_point_in_its_own_color_and_listed_in_the_legend():
    picture = draw_caption(gray(), caption(SPREAD))
    colors = palette(len(SPREAD))
    assert len(set(colors)) == len(SPREAD)
    legend = np.asarray(picture)[HEIGHT:]
    for w, color in zip(SPREAD, colors, strict=True):
        assert has_color(around(picture, *w.point, 4), color)
        assert has_color(legend, color)


def test_trace_markers_and_legend_dots_hold_the_word_numbers():
    """Each marker's middle holds dark or light text (its number) on the word's color."""
    picture = draw_caption(gray(), caption(SPREAD))
    for w, color in zip(SPREAD, palette(len(SPREAD)), strict=True):
        middle = around(picture, *w.point, 3).reshape(-1, 3)
        assert any(not np.array_equal(p, color) and (p.max() < 90 or p.min() > 170) for p in middle)


def test_words_at_one_spot_are_all_visible_near_it():
    words = [word(text, 200, 150) for text in ["in", "this", "image", "we", "can", "see"]]
    picture = draw_caption(gray(), caption(words))
    for color in palette(len(words)):
        assert has_color(around(picture, 200, 150, 70), color)


def test_long_captions_wrap_and_colors_stay_distinct():
    words = [word(f"word{i}", 20 + 5 * i, 90) for i in range(40)]
    picture = draw_caption(gray(), caption(words))
    one_word = draw_caption(gray(), caption(words[:1]))
    assert picture.width == WIDTH and picture.height > one_word.height  # more lines
    assert len(set(palette(40))) == 40


def test_colors_of_words_near_in_order_differ_and_a_longer_palette_starts_the_same():
    colors = np.array(palette(80), dtype=float)
    nearest = min(np.linalg.norm(colors[i] - colors[j]) for i in range(80) for j in range(i + 1, i + 1 + NEIGHBOURS)
                  if j < 80)
    assert nearest > 50  # of 441 across the RGB cube
    assert palette(30) == palette(80)[:30]


def test_an_empty_caption_still_gives_a_picture():
    picture = draw_caption(gray(), caption([]))
    assert picture.width == WIDTH and picture.height > HEIGHT


def test_a_prompt_box_and_point_are_drawn():
    image = gray()
    boxed = draw_caption(image, caption([]), prompt=[20, 20, 100, 80])
    pointed = draw_caption(image, caption([]), prompt=[150, 100])
    assert pixel(boxed, 20, 50) != GRAY and pixel(boxed, 60, 50) == GRAY
    ring = np.any(around(pointed, 150, 100, 30) != GRAY, axis=-1)
    assert ring.any() and not ring[30, 30]  # a ring around the point


def test_sizes_follow_the_image_from_160_to_4000_pixels():
    small = draw_caption(gray(160, 120), caption([word("dot", 80, 60)], (160, 120)))
    large = draw_caption(gray(4000, 3000), caption([word("dot", 2000, 1500, 200)], (4000, 3000)))
    small_strip, large_strip = small.height - MIN_SIDE * 120 // 160, large.height - 3000
    assert small.width == MIN_SIDE and small_strip >= 20  # enlarged; the minimum font stays readable
    assert large_strip > 5 * small_strip
    color = palette(1)[0]
    assert pixel(large, 2000 + 40, 1500) == color  # the marker is wider than on a small image


def test_a_small_image_is_enlarged_smoothly_and_what_is_drawn_follows_it():
    image = gray(160, 120)
    image[:, 80:] = 255  # the right half white
    picture = draw_location(image, [40, 30, 120, 90], "box")
    scale = MIN_SIDE / 160
    assert picture.size == (MIN_SIDE, round(120 * scale))
    row = np.asarray(picture)[5, :, 0]
    assert ((row > 140) & (row < 240)).any()  # the edge between the halves is resampled, not blocky
    assert pixel(picture, 40 * scale, 60 * scale) != pixel(picture, 30 * scale, 60 * scale)  # the outline, scaled


def test_the_input_image_is_not_changed():
    image = Image.fromarray(gray())
    draw_location(image, [10, 10, 50, 50], "box")
    assert np.all(np.asarray(image) == GRAY)


def test_location_draws_the_box_and_its_label_and_leaves_what_it_holds_as_it_is():
    picture = draw_location(gray(), [60, 60, 180, 150], "the red circle", score=0.03)
    assert pixel(picture, 60, 100) != GRAY  # the outline
    assert pixel(picture, 120, 100) == GRAY  # inside, untinted
    assert pixel(picture, 10, 470) == GRAY
    missing = draw_location(gray(), [60, 60, 180, 150], "the red circle", score=0.001, found=False)
    assert pixel(missing, 60, 100) == MUTED  # a box not found is gray


def disk_segmentation(width=WIDTH, height=HEIGHT) -> Segmentation:
    yy, xx = np.mgrid[:height, :width]
    mask = (xx - 300) ** 2 + (yy - 220) ** 2 < 100**2
    return Segmentation("the disk", [200, 120, 400, 320], mask, (width, height), score=0.05)


def test_the_mask_keeps_the_object_as_it_is_and_darkens_the_rest():
    segmentation = disk_segmentation()
    picture = np.asarray(draw_segmentation(gray(), segmentation)).astype(int)
    inside = np.zeros_like(segmentation.mask)
    inside[126:315, 206:395] = True  # clear of the box's outline, which touches the disk
    assert np.all(picture[segmentation.mask & inside] == GRAY)  # the object's own colors
    assert np.all(picture[470, 5] < 100)  # far outside: darkened
    ring = picture[220, 402:406]  # just right of the disk: its contour
    assert all(not np.array_equal(p, picture[470, 5]) for p in ring)


def test_an_empty_mask_darkens_nothing():
    segmentation = Segmentation("nothing", [10, 10, 20, 20], np.zeros((HEIGHT, WIDTH), bool), (WIDTH, HEIGHT))
    assert pixel(draw_segmentation(gray(), segmentation), 400, 400) == GRAY


def test_a_mask_of_the_wrong_size_is_refused():
    segmentation = disk_segmentation(120, 90)
    with pytest.raises(InputError, match="mask is 120x90 but the image is 640x480"):
        draw_segmentation(gray(), segmentation)


def test_a_mask_is_saved_as_black_and_white_of_the_image_size(tmp_path):
    segmentation = disk_segmentation()
    path = save_mask(segmentation.mask, tmp_path / "mask.png")
    with Image.open(path) as saved:
        values = np.asarray(saved)
        assert saved.mode == "L" and saved.size == (WIDTH, HEIGHT)
    assert set(np.unique(values)) == {0, 255} and np.array_equal(values == 255, segmentation.mask)


def test_regions_get_distinct_colors_and_the_best_is_on_top():
    regions = [Region([20, 20, 120, 120], 0.9, "a"), Region([60, 60, 200, 160], 0.5, "b")]
    picture = draw_regions(gray(), regions)
    first, second = palette(2)
    assert pixel(picture, 20, 110) == first
    assert pixel(picture, 200, 140) == second
    assert pixel(picture, 120, 60) == first  # where the boxes cross, the best region's edge shows


@pytest.mark.parametrize("box", [[400, 5, 500, 100], [5, 2, 160, 478], [540, 400, 620, 460], [3, 3, 637, 477]])
def test_region_labels_stay_whole_inside_the_image(box):
    region = Region(box, 0.87, "a large orange square to the right of a small green hexagon and more " * 2)
    picture = np.asarray(draw_regions(gray(), [region]))
    tag_fill = np.all(picture == palette(1)[0], axis=-1)
    ys, xs = np.nonzero(tag_fill)
    # the tag's one-pixel dark border is inside the canvas on every side
    assert xs.min() >= 1 and ys.min() >= 1 and xs.max() <= WIDTH - 2 and ys.max() <= HEIGHT - 2


def test_region_labels_do_not_cover_each_other():
    """Five regions on one box: every tag stays in view, each its own color."""
    regions = [Region([250, 200, 350, 300], 0.9 - 0.1 * i, f"region {i}") for i in range(5)]
    picture = np.asarray(draw_regions(gray(), regions))
    for color in palette(5):
        assert np.all(picture == color, axis=-1).sum() > 1000  # a whole tag (box outlines hide each other)


def test_no_regions_says_so():
    picture = draw_regions(gray(), [])
    assert np.any(np.asarray(picture) != GRAY)


def test_save_picture_writes_a_png_and_nothing_else(tmp_path):
    picture = draw_location(gray(), [10, 10, 50, 50], "box")
    path = save_picture(picture, tmp_path / "out.png")
    assert path == tmp_path / "out.png"
    with Image.open(path) as saved:
        assert saved.format == "PNG" and np.array_equal(np.asarray(saved), np.asarray(picture))
    assert os.listdir(tmp_path) == ["out.png"]
    save_picture(picture, path)  # overwriting is fine
    assert os.listdir(tmp_path) == ["out.png"]


def test_save_picture_into_a_missing_directory_is_a_one_line_input_error(tmp_path):
    with pytest.raises(InputError, match="directory .*missing does not exist") as error:
        save_picture(Image.new("RGB", (4, 4)), tmp_path / "missing" / "out.png")
    assert "\n" not in str(error.value)


def test_save_picture_over_a_directory_or_under_a_file_is_an_input_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="does not exist"):
        save_picture(Image.new("RGB", (4, 4)), tmp_path / "file" / "out.png")
    with pytest.raises(InputError, match="is a directory"):
        save_picture(Image.new("RGB", (4, 4)), tmp_path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_save_picture_into_a_read_only_directory_is_an_input_error(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(InputError, match="cannot write .*out.png: Permission denied"):
            save_picture(Image.new("RGB", (4, 4)), tmp_path / "out.png")
    finally:
        tmp_path.chmod(0o700)


def test_segments_each_get_a_contour_in_their_own_color_and_the_rest_darkens():
    from pixelllm.results import Segment
    from pixelllm.viz import draw_segments, palette

    image = np.full((600, 600, 3), 200, np.uint8)
    left, right = np.zeros((600, 600), bool), np.zeros((600, 600), bool)
    left[100:200, 100:200], right[300:450, 350:500] = True, True
    picture = np.asarray(draw_segments(image, "all the squares", [Segment([100, 100, 200, 200], left, 0.9),
                                                                  Segment([350, 300, 500, 450], right, 0.8)]))
    assert picture.shape == (600, 600, 3)
    assert (picture[150, 150] == 200).all() and (picture[400, 420] == 200).all()  # the targets as they are
    assert picture[550, 50].max() < 150  # outside them, darker
    first, second = palette(2)
    assert (picture[150, 98] == first).all() or (picture[98, 150] == first).all()
    assert (picture[400, 348] == second).all() or (picture[298, 420] == second).all()
    empty = np.asarray(draw_segments(image, "all the circles", []))
    assert empty[550, 50].max() == 200  # nothing darkened when nothing was found
