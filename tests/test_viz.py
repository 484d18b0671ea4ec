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
    draw_caption,
    draw_location,
    draw_regions,
    draw_segmentation,
    palette,
    save_picture,
)

GRAY = (128, 128, 128)


def gray(width=240, height=180) -> np.ndarray:
    return np.full((height, width, 3), GRAY, dtype=np.uint8)


def word(text, x, y, half=10) -> Word:
    return Word(text, [x - half, y - half, x + half, y + half], [x, y], [])


def caption(words, size=(240, 180)) -> Caption:
    return Caption(" ".join(w.text for w in words), words, size)


def pixel(picture: Image.Image, x, y) -> tuple:
    return picture.getpixel((round(x), round(y)))


def has_color(array: np.ndarray, color) -> bool:
    return bool(np.all(array == color, axis=-1).any())


SPREAD = [word("a", 40, 40), word("red", 200, 40), word("circle", 120, 100), word("here.", 60, 150)]


def test_caption_picture_is_the_image_with_a_legend_strip_under_it():
    picture = draw_caption(gray(), caption(SPREAD))
    assert picture.mode == "RGB" and picture.width == 240 and picture.height > 180
    assert pixel(picture, 5, 185) == LEGEND_BACKGROUND
    assert pixel(picture, 235, 175) == GRAY  # far from every point, box and line


def test_each_word_is_marked_at_its_point_in_its_own_color_and_listed_in_the_legend():
    picture = draw_caption(gray(), caption(SPREAD))
    colors = palette(len(SPREAD))
    assert len(set(colors)) == len(SPREAD)
    legend = np.asarray(picture)[180:]
    for w, color in zip(SPREAD, colors, strict=True):
        assert pixel(picture, *w.point) == color
        assert has_color(legend, color)


def test_words_at_one_spot_are_all_visible_near_it():
    words = [word(text, 120, 90) for text in ["in", "this", "image", "we", "can", "see"]]
    picture = np.asarray(draw_caption(gray(), caption(words)))
    near = picture[50:130, 80:160]
    for color in palette(len(words)):
        assert has_color(near, color)


def test_long_captions_wrap_and_colors_stay_distinct():
    words = [word(f"word{i}", 20 + 5 * i, 90) for i in range(40)]
    picture = draw_caption(gray(), caption(words))
    one_word = draw_caption(gray(), caption(words[:1]))
    assert picture.width == 240 and picture.height > one_word.height  # more lines
    assert len(set(palette(40))) == 40


def test_an_empty_caption_still_gives_a_picture():
    picture = draw_caption(gray(), caption([]))
    assert picture.width == 240 and picture.height > 180


def test_a_prompt_box_and_point_are_drawn():
    image = gray()
    boxed = draw_caption(image, caption([]), prompt=[20, 20, 100, 80])
    pointed = draw_caption(image, caption([]), prompt=[150, 100])
    assert pixel(boxed, 20, 50) != GRAY and pixel(boxed, 60, 50) == GRAY
    around = np.any(np.asarray(pointed)[85:116, 135:166] != GRAY, axis=-1)
    assert around.any() and not around[15, 15]  # a ring around the point


def test_sizes_follow_the_image_from_160_to_4000_pixels():
    small = draw_caption(gray(160, 120), caption([word("dot", 80, 60)], (160, 120)))
    large = draw_caption(gray(4000, 3000), caption([word("dot", 2000, 1500, 200)], (4000, 3000)))
    small_strip, large_strip = small.height - 120, large.height - 3000
    assert small_strip >= 20  # the minimum font stays readable
    assert large_strip > 5 * small_strip
    color = palette(1)[0]
    assert pixel(large, 2000 + 30, 1500) == color  # the marker is wider than on a small image


def test_the_input_image_is_not_changed():
    image = Image.fromarray(gray())
    draw_location(image, [10, 10, 50, 50], "box")
    assert np.all(np.asarray(image) == GRAY)


def test_location_draws_the_box_and_its_label():
    picture = draw_location(gray(), [60, 60, 180, 150], "the red circle")
    assert pixel(picture, 60, 100) != GRAY  # the outline
    assert pixel(picture, 120, 100) != GRAY  # faintly filled
    assert pixel(picture, 10, 170) == GRAY


def disk_segmentation(width=240, height=180) -> Segmentation:
    yy, xx = np.mgrid[:height, :width]
    mask = (xx - 140) ** 2 + (yy - 100) ** 2 < 50**2
    return Segmentation("the disk", [90, 50, 190, 150], mask, (width, height))


def test_the_mask_colors_only_pixels_inside_the_mask():
    segmentation = disk_segmentation()
    picture = np.asarray(draw_segmentation(gray(), segmentation))
    changed = np.any(picture != GRAY, axis=-1)
    assert changed[segmentation.mask].all()
    box_interior = np.zeros_like(segmentation.mask)
    box_interior[56:145, 96:185] = True  # inside the box, clear of its outline
    assert not changed[box_interior & ~segmentation.mask].any()  # the disk's corners in its box
    assert not changed[:, :80].any()  # left of the box and its tag


def test_a_mask_of_the_wrong_size_is_refused():
    segmentation = disk_segmentation(120, 90)
    with pytest.raises(InputError, match="mask is 120x90 but the image is 240x180"):
        draw_segmentation(gray(), segmentation)


def test_regions_get_distinct_colors_and_the_best_is_on_top():
    regions = [Region([20, 20, 120, 120], 0.9, "a"), Region([60, 60, 200, 160], 0.5, "b")]
    picture = draw_regions(gray(), regions)
    first, second = palette(2)
    assert pixel(picture, 20, 110) == first
    assert pixel(picture, 200, 140) == second
    assert pixel(picture, 120, 60) == first  # where the boxes cross, the best region's edge shows


@pytest.mark.parametrize("box", [[150, 5, 190, 40], [5, 2, 60, 178], [200, 150, 230, 170], [3, 3, 237, 177]])
def test_region_labels_stay_whole_inside_the_image(box):
    region = Region(box, 0.87, "a large orange square to the right of a small green hexagon and more")
    picture = np.asarray(draw_regions(gray(), [region]))
    tag_fill = np.all(picture == palette(1)[0], axis=-1)
    ys, xs = np.nonzero(tag_fill)
    # the tag's one-pixel dark border is inside the canvas on every side
    assert xs.min() >= 1 and ys.min() >= 1 and xs.max() <= 238 and ys.max() <= 178


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
