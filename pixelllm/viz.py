"""Pictures of results: a traced caption word by word, a located box, a mask, dense regions.

Every ``draw_*`` function takes the image (a path, ``PIL.Image`` or ``H x W x 3`` uint8 array)
and results in original-image pixels, and returns a new RGB ``PIL.Image`` (the input is never
changed). Line widths, markers and text grow with the image, so a picture looks the same whether
the image is 160 or 4000 pixels wide once it is fitted to a screen; everything drawn over the
image has a dark halo so it stays readable on any background.

    picture = draw_caption("photo.jpg", image.caption())
    save_picture(picture, "caption.png")
"""

from __future__ import annotations

import colorsys
import io
import math
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from pixelllm.data.images import load_image
from pixelllm.errors import InputError
from pixelllm.results import Caption, Region, Segmentation

Color = tuple[int, int, int]

PALETTE: tuple[Color, ...] = (
    (239, 71, 61),  # red
    (59, 140, 235),  # blue
    (250, 200, 30),  # yellow
    (60, 190, 90),  # green
    (220, 80, 210),  # magenta
    (40, 205, 215),  # cyan
    (250, 130, 30),  # orange
    (150, 110, 245),  # violet
    (170, 220, 50),  # lime
    (250, 130, 170),  # pink
    (30, 160, 140),  # teal
    (190, 150, 100),  # tan
)
"""Categorical colors, neighbours far apart in hue, all light enough to read on the dark legend."""

HALO: Color = (20, 20, 20)
LEGEND_BACKGROUND: Color = (32, 32, 36)
MUTED: Color = (150, 150, 150)
WHITE: Color = (255, 255, 255)
NO_WORDS = "(no words)"
NO_REGIONS = "(no regions)"
MASK_ALPHA = 110
BOX_FILL_ALPHA = 40
WORD_BOX_ALPHA = 130
GOLDEN_ANGLE = 0.381966  # of a full turn: hues past the palette never repeat and stay spread out


def palette(count: int) -> list[Color]:
    """``count`` distinct colors: ``PALETTE`` first, then golden-angle hues at alternating lightness."""
    colors = list(PALETTE[:count])
    for i in range(count - len(colors)):
        hue = (0.05 + i * GOLDEN_ANGLE) % 1.0
        lightness = (0.62, 0.78, 0.55)[i % 3]
        colors.append(tuple(round(255 * c) for c in colorsys.hls_to_rgb(hue, lightness, 0.8)))
    return colors


# -- public drawings ---------------------------------------------------------------------------


def draw_caption(image, caption: Caption, prompt: Sequence[float] | None = None) -> Image.Image:
    """The trace word by word: each word's point in its own color (its box faintly), a line through
    the points in word order, and under the image a legend strip of the words in their colors.

    ``prompt``, the box ``[x0, y0, x1, y1]`` or point ``[x, y]`` a region caption was asked about,
    is drawn in white under the trace.
    """
    picture, style = _canvas(image)
    colors = palette(len(caption.words))
    overlay = Image.new("RGBA", picture.size)
    faint = ImageDraw.Draw(overlay)
    for word, color in zip(caption.words, colors, strict=True):
        faint.rectangle(_rect(word.box), outline=(*color, WORD_BOX_ALPHA), width=style.thin)
    picture.alpha_composite(overlay)
    draw = ImageDraw.Draw(picture)
    if prompt is not None:
        _prompt(draw, prompt, style)
    points = [tuple(word.point) for word in caption.words]
    if len(points) > 1:
        _halo_line(draw, points, WHITE, style.thin, style)
    for point, color in zip(_dodge(points, 2 * style.marker_radius, picture.size), colors, strict=True):
        _marker(draw, point, color, style)
    entries = [(word.text, color) for word, color in zip(caption.words, colors, strict=True)]
    return _with_legend(picture.convert("RGB"), _legend(entries, picture.width, style))


def draw_location(image, box: Sequence[float], label: str) -> Image.Image:
    """A box over the image, faintly filled, with ``label`` in a tag beside it."""
    picture, style = _canvas(image)
    x0, y0, x1, y1 = (round(v) for v in _rect(box))
    color = _standout(np.asarray(picture)[max(y0, 0):y1, max(x0, 0):x1, :3])
    overlay = Image.new("RGBA", picture.size)
    ImageDraw.Draw(overlay).rectangle(_rect(box), fill=(*color, BOX_FILL_ALPHA))
    picture.alpha_composite(overlay)
    draw = ImageDraw.Draw(picture)
    _box(draw, box, color, style)
    _tag(draw, picture.size, box, label, color, style, taken=[])
    return picture.convert("RGB")


def draw_segmentation(image, segmentation: Segmentation) -> Image.Image:
    """The mask as a translucent overlay with a solid contour, its box, and the expression."""
    picture, style = _canvas(image)
    mask = np.asarray(segmentation.mask, dtype=bool)
    if mask.shape != (picture.height, picture.width):
        raise InputError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {picture.width}x{picture.height}")
    color = _standout(np.asarray(picture)[mask, :3])
    overlay = np.zeros((*mask.shape, 4), dtype=np.uint8)
    overlay[mask] = (*color, MASK_ALPHA)
    overlay[_contour(mask, style.line)] = (*color, 255)
    picture.alpha_composite(Image.fromarray(overlay, "RGBA"))
    draw = ImageDraw.Draw(picture)
    _box(draw, segmentation.box, color, style, width=style.thin)
    _tag(draw, picture.size, segmentation.box, segmentation.expression, color, style, taken=[])
    return picture.convert("RGB")


def draw_regions(image, regions: Sequence[Region]) -> Image.Image:
    """Each region's box in its own color with a tag "caption  score"; the best region (first) is
    drawn on top and its tag placed first, and tags avoid each other where they can."""
    picture, style = _canvas(image)
    draw = ImageDraw.Draw(picture)
    colors = palette(len(regions))
    for region, color in reversed(list(zip(regions, colors, strict=True))):
        _box(draw, region.box, color, style)
    taken: list[tuple[int, int, int, int]] = []
    if not regions:
        _tag(draw, picture.size, (0, 0, 0, 0), NO_REGIONS, MUTED, style, taken)
    for region, color in zip(regions, colors, strict=True):
        label = f"{region.caption or '(no caption)'}  {region.score:.2f}"
        _tag(draw, picture.size, region.box, label, color, style, taken)
    return picture.convert("RGB")


def save_picture(picture: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``picture`` as a PNG at ``path`` atomically (a reader never sees half a file)."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return write_atomically(path, buffer.getvalue())


def write_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``.

    Raises ``InputError`` (one line) when the directory does not exist or cannot be written.
    """
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        raise InputError(f"cannot write {path}: directory {directory} does not exist")
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a directory")
    # A plain open (not mkstemp) so that the file gets the usual permissions of the umask.
    temporary = directory / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(temporary, "xb") as file:
            file.write(data)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise InputError(f"cannot write {path}: {error.strerror or error}") from None
    return path


# -- sizes and fonts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Style:
    """Sizes in pixels for one image: everything scales with the image's longer side."""

    line: int  # box outlines, contours
    thin: int  # trace line, word boxes
    radius: int  # trace markers
    font: ImageFont.FreeTypeFont
    font_size: int
    pad: int

    @property
    def halo(self) -> int:
        return max(1, round(self.line / 2))

    @property
    def marker_radius(self) -> int:
        """The outer radius of a trace marker, its rings included."""
        return self.radius + 2 * self.halo


def _style(size: tuple[int, int]) -> _Style:
    unit = max(size) / 500  # 1.0 for a typical 500-pixel image
    font_size = max(11, round(15 * unit))
    return _Style(line=max(2, round(3 * unit)), thin=max(1, round(2 * unit)), radius=max(3, round(6 * unit)),
                  font=ImageFont.load_default(size=font_size), font_size=font_size,
                  pad=max(3, round(font_size * 0.4)))


def _canvas(image) -> tuple[Image.Image, _Style]:
    """A fresh RGBA copy of the image to draw on, and the sizes that suit it."""
    picture = load_image(image).convert("RGBA")
    return picture, _style(picture.size)


# -- primitives --------------------------------------------------------------------------------


def _rect(box: Sequence[float]) -> tuple[float, float, float, float]:
    """``[x0, y0, x1, y1]`` in the order Pillow needs (x1 >= x0, y1 >= y0) whatever it was given."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def _halo_line(draw: ImageDraw.ImageDraw, points, color: Color, width: int, style: _Style) -> None:
    draw.line(points, fill=HALO, width=width + 2 * style.halo, joint="curve")
    draw.line(points, fill=color, width=width, joint="curve")


def _box(draw: ImageDraw.ImageDraw, box, color: Color, style: _Style, width: int | None = None) -> None:
    """A box outline with a dark halo on both sides, so it shows on light and dark backgrounds."""
    width = width or style.line
    x0, y0, x1, y1 = _rect(box)
    halo = style.halo
    draw.rectangle((x0 - halo, y0 - halo, x1 + halo, y1 + halo), outline=HALO, width=width + 2 * halo)
    draw.rectangle((x0, y0, x1, y1), outline=color, width=width)


def _prompt(draw: ImageDraw.ImageDraw, prompt: Sequence[float], style: _Style) -> None:
    """A prompt box, or a prompt point as a ring, in white with a halo."""
    if len(prompt) == 4:
        _box(draw, prompt, WHITE, style)
        return
    x, y = prompt
    # Pillow draws an outline inward from the bounding box: the halo's box is larger by its width.
    for radius, width, color in ((2 * style.radius + style.halo, style.line + 2 * style.halo, HALO),
                                 (2 * style.radius, style.line, WHITE)):
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=color, width=width)


def _marker(draw: ImageDraw.ImageDraw, point, color: Color, style: _Style) -> None:
    """A filled dot in a white ring in a dark ring: visible on any background."""
    x, y = point
    for radius, fill in ((style.radius + 2 * style.halo, HALO), (style.radius + style.halo, WHITE),
                         (style.radius, color)):
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill)


def _dodge(points: list[tuple[float, float]], spacing: float, canvas: tuple[int, int],
           rings: int = 3) -> list[tuple[float, float]]:
    """Where to draw each point's marker so that markers do not hide each other: at the point if it
    is free, else at the first free place inside the ``canvas`` on rings of ``spacing`` around it
    (words spoken about one spot then show as a cluster around it, each visible), else at the point."""
    placed: list[tuple[float, float]] = []

    def free(x: float, y: float) -> bool:
        inside = 0 <= x <= canvas[0] and 0 <= y <= canvas[1]
        return inside and all(math.dist((x, y), other) >= 0.95 * spacing for other in placed)

    for x, y in points:
        spots = [(x, y)] + [(x + ring * spacing * math.sin(angle), y - ring * spacing * math.cos(angle))
                            for ring in range(1, rings + 1)
                            for angle in np.linspace(0, 2 * math.pi, 6 * ring, endpoint=False)]
        placed.append(next((spot for spot in spots if free(*spot)), (x, y)))
    return placed


def _contour(mask: np.ndarray, width: int) -> np.ndarray:
    """The mask's pixels within ``width`` of its edge (the contour stays inside the mask)."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    eroded = np.asarray(image.filter(ImageFilter.MinFilter(2 * width + 1))) > 0
    return mask & ~eroded


def _standout(pixels: np.ndarray) -> Color:
    """The palette color farthest from the mean of ``pixels`` (``(..., 3)``), so that a box or mask
    drawn over them shows: a red mask over a red object would hide it."""
    if pixels.size == 0:
        return PALETTE[0]
    mean = pixels.reshape(-1, 3).mean(axis=0)
    return max(PALETTE, key=lambda color: float(np.sum((np.array(color) - mean) ** 2)))


def _text_on(color: Color) -> Color:
    """Black or white text, whichever reads better on ``color``."""
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def _fit(text: str, font: ImageFont.FreeTypeFont, width: float) -> str:
    """``text``, shortened with an ellipsis if it is wider than ``width``."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text.rstrip() + "…"


def _tag(draw: ImageDraw.ImageDraw, canvas: tuple[int, int], box, label: str, color: Color, style: _Style,
         taken: list[tuple[int, int, int, int]]) -> None:
    """A label in a filled tag next to ``box``, wholly inside the ``canvas``, avoiding the ``taken``
    tags if it can; its rectangle is added to ``taken``."""
    width, height = canvas
    pad = style.pad // 2
    text = _fit(label, style.font, width - 2 * pad - 2)
    w = round(style.font.getlength(text)) + 2 * pad
    h = style.font_size + 2 * pad
    rect = _place((w, h), _rect(box), canvas, taken)
    taken.append(rect)
    draw.rectangle(rect, fill=color, outline=HALO, width=1)
    draw.text((rect[0] + pad, rect[1] + pad), text, font=style.font, fill=_text_on(color))


def _place(size: tuple[int, int], box, canvas: tuple[int, int], taken) -> tuple[int, int, int, int]:
    """Where a ``size`` tag goes: above the box, else inside its top, below it, inside its bottom;
    each clamped into the canvas; the first that overlaps no ``taken`` rectangle wins."""
    w, h = size
    x0, y0, x1, y1 = box
    candidates = []
    for top in (y0 - h, y0, y1, y1 - h):
        x = int(min(max(x0, 0), canvas[0] - w))
        y = int(min(max(top, 0), canvas[1] - h))
        candidates.append((x, y, x + w - 1, y + h - 1))
    free = [c for c in candidates if not any(_overlap(c, t) for t in taken)]
    return (free or candidates)[0]


def _overlap(a, b) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


# -- legend ------------------------------------------------------------------------------------


def _legend(entries: list[tuple[str, Color | None]], width: int, style: _Style) -> Image.Image:
    """A dark strip listing ``(word, color)`` entries in reading order, each after a dot of its
    color, wrapped to ``width``; an entry without a color is a muted note with no dot."""
    labels = entries or [(NO_WORDS, None)]
    positions, height = _legend_layout([(text, color is not None) for text, color in labels], width, style)
    strip = Image.new("RGB", (width, height), LEGEND_BACKGROUND)
    draw = ImageDraw.Draw(strip)
    radius = style.font_size * 0.3
    for (text, color), (x, y) in zip(labels, positions, strict=True):
        if color is not None:
            middle = y + style.font_size * 0.55
            draw.ellipse((x, middle - radius, x + 2 * radius, middle + radius), fill=color)
            x += 2 * radius + style.pad
        draw.text((x, y), text, font=style.font, fill=color or MUTED)
    return strip


def _legend_layout(entries: list[tuple[str, bool]], width: int, style: _Style) -> tuple[list[tuple[int, int]], int]:
    """Top-left corners of the ``(text, has a dot)`` entries, wrapped into lines, and the strip's height."""
    dot = style.font_size * 0.6 + style.pad
    gap = style.font_size * 0.8
    line_height = round(style.font_size * 1.5)
    x, y, positions = style.pad, style.pad, []
    for text, has_dot in entries:
        entry = dot * has_dot + style.font.getlength(text)
        if x > style.pad and x + entry > width - style.pad:
            x, y = style.pad, y + line_height
        positions.append((round(x), y))
        x += entry + gap
    return positions, y + line_height + style.pad


def _with_legend(picture: Image.Image, legend: Image.Image) -> Image.Image:
    stacked = Image.new("RGB", (picture.width, picture.height + legend.height))
    stacked.paste(picture, (0, 0))
    stacked.paste(legend, (0, picture.height))
    return stacked
