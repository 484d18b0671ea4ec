"""load_image: every kind of image in, 8-bit RGB out; bad files refused with one-line InputErrors."""

import io

import numpy as np
import pytest
from PIL import Image

from pixelllm.data.images import MAX_PIXELS, ImageTooSmall, load_image
from pixelllm.errors import InputError


@pytest.mark.parametrize(
    ("name", "size"),
    [("chelsea.png", (451, 300)), ("rocket.jpg", (640, 427)), ("grace_hopper.jpg", (512, 600))],
)
def test_real_photos(real_data, name, size):
    image = load_image(real_data / "photos" / name)
    assert image.mode == "RGB" and image.size == size
    assert np.asarray(image).std() > 10  # a photograph, not a blank


def test_real_coco_png(real_data):
    image = load_image(str(real_data / "coco" / "000000039769.png"))
    assert image.mode == "RGB" and image.size == (640, 480)


def big(array: np.ndarray, factor: int = 8) -> np.ndarray:
    """Each pixel of ``array`` as a ``factor`` x ``factor`` block (images under 8 pixels are refused)."""
    return array.repeat(factor, axis=0).repeat(factor, axis=1)


def test_grayscale_becomes_gray_rgb(tmp_path):
    gray = big(np.array([[0, 100], [200, 255]], np.uint8))
    Image.fromarray(gray).save(tmp_path / "g.png")
    rgb = np.asarray(load_image(tmp_path / "g.png"))
    assert rgb.shape == (16, 16, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], gray)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque: unchanged
    rgba[0, 1] = (10, 20, 30, 0)  # transparent: white
    rgba[0, 2] = (0, 0, 0, 128)  # half: 255 * (1 - 128/255) = 127 of white shows through
    Image.fromarray(big(rgba)).save(tmp_path / "a.png")
    rgb = np.asarray(load_image(tmp_path / "a.png")).astype(int)[::8, ::8]
    assert rgb[0, 0].tolist() == [10, 20, 30]
    assert rgb[0, 1].tolist() == [255, 255, 255]
    assert np.all(np.abs(rgb[0, 2] - 127) <= 1)


def test_gray_alpha_and_rgba_array():
    la = Image.fromarray(big(np.array([[[50, 0], [50, 255]]], np.uint8)))  # gray 50: transparent, opaque
    assert la.mode == "LA"
    assert np.asarray(load_image(la))[::8, ::8].tolist() == [[[255, 255, 255], [50, 50, 50]]]
    arr = np.zeros((8, 8, 4), np.uint8)  # fully transparent black
    assert np.all(np.asarray(load_image(arr)) == 255)


def test_palette_with_and_without_transparency(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image = image.resize((16, 8), Image.Resampling.NEAREST)
    image.save(tmp_path / "p.png")
    assert np.asarray(load_image(tmp_path / "p.png"))[::8, ::8].tolist() == [[[255, 0, 0], [0, 0, 255]]]
    image.info["transparency"] = 1
    image.save(tmp_path / "pt.png", transparency=1)
    assert np.asarray(load_image(tmp_path / "pt.png"))[::8, ::8].tolist() == [[[255, 0, 0], [255, 255, 255]]]


def test_sixteen_bit_png_is_scaled(tmp_path):
    values = big(np.array([[0, 257 * 100, 65535]], np.uint16))  # 0..65535 -> 0..255 by /257
    Image.fromarray(values).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode.startswith("I")
    rgb = np.asarray(load_image(tmp_path / "16.png"))
    assert rgb[::8, ::8, 0].tolist() == [[0, 100, 255]]


def test_arrays():
    assert np.asarray(load_image(np.full((8, 9), 7, np.uint8))).shape == (8, 9, 3)
    color = np.zeros((8, 10, 3), np.uint8)
    color[..., 1] = 9
    np.testing.assert_array_equal(np.asarray(load_image(color)), color)
    assert np.asarray(load_image(np.full((8, 8, 3), 257 * 3, np.uint16))).max() == 3
    with pytest.raises(InputError, match="uint8 or uint16"):
        load_image(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(InputError, match="shape"):
        load_image(np.zeros((2, 2, 2), np.uint8))


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:5, :5] = 255  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "r.jpg", exif=exif, quality=95)
    shown = np.asarray(load_image(tmp_path / "r.jpg"))
    assert shown.shape == (40, 20, 3)  # width and height swapped
    assert shown[:5, -5:].mean() > 200 and shown[:5, :5].mean() < 50  # the marker is now top-right


def test_decompression_bomb_refused_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("1", (8100, 8100)).save(path)  # 65.6 MP, a few kB on disk
    assert MAX_PIXELS < 8100 * 8100
    with pytest.raises(InputError, match="big.png.*over the limit"):
        load_image(path)
    with pytest.raises(InputError, match="over the limit"):
        load_image(np.zeros((30, 30), np.uint8), max_pixels=100)


def test_truncated_jpeg(real_data, tmp_path):
    data = (real_data / "photos" / "rocket.jpg").read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as info:
        load_image(path)
    message = str(info.value)
    assert "cut.jpg" in message and "truncated" in message and "\n" not in message


def test_corrupt_missing_and_wrong_type(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image" * 10)
    with pytest.raises(InputError, match="junk.jpg.*not an image"):
        load_image(tmp_path / "junk.jpg")
    with pytest.raises(InputError, match="not found.*nope.png"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(InputError, match="is a directory, not an image file"):
        load_image(tmp_path)
    with pytest.raises(InputError, match="cannot use int"):
        load_image(3)


def test_bytes_input(real_data):
    data = (real_data / "photos" / "chelsea.png").read_bytes()
    assert load_image(data).size == (451, 300)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, "PNG")
    assert np.asarray(load_image(buffer.getvalue()))[0, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize("size", [(1, 1), (1, 4000), (4000, 1), (3000, 2), (7, 8)])
def test_an_image_with_a_side_under_8_pixels_is_refused(tmp_path, size):
    """As a file, bytes, a PIL image or an array: one line that names the image and its size."""
    image = Image.new("RGB", size, (200, 30, 30))
    image.save(tmp_path / "small.png")
    sources = [tmp_path / "small.png", (tmp_path / "small.png").read_bytes(), image, np.asarray(image)]
    for source in sources:
        with pytest.raises(ImageTooSmall, match=f"is {size[0]}x{size[1]} pixels: a side under 8 pixels"):
            load_image(source)
    assert issubclass(ImageTooSmall, InputError)
    assert load_image(Image.new("RGB", (8, 8))).size == (8, 8)


def test_the_builder_skips_and_counts_a_degenerate_image():
    from helpers import tokenizer

    from pixelllm.data.pipeline import ExampleBuilder, Skip, TaskConfig
    from pixelllm.data.samples import Narrative, Sample

    narrative = Narrative("a red strip", [], np.zeros((0, 3)))
    sample = Sample(np.zeros((2, 3000, 3), np.uint8), "strip", (3000, 2), narratives=[narrative])
    builder = ExampleBuilder(tokenizer(), TaskConfig("trace", 160), name="strips")
    assert builder.build(sample) == Skip("strips", "image under 8 pixels on a side")
    assert builder(sample) is None and builder.report.skipped == {"image under 8 pixels on a side": 1}
