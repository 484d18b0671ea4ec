"""Pictures of results: a traced caption word by word, a located box, a mask, dense regions.

Every ``draw_*`` function takes the image (a path, ``PIL.Image`` or ``H x W x 3`` uint8 array)
and results in original-image pixels, and returns a new RGB ``PIL.Image`` (the input is never
changed). An image whose longer side is under ``MIN_SIDE`` pixels is drawn on a smoothly enlarged
copy of that size (``picture_scale``), so that text and markers stay sharp; above it, line widths,
markers and text grow with the image, so a picture looks the same whether the image is 160 or 4000
pixels wide once it is fitted to a screen. Everything drawn over the image has a dark halo so it
stays readable on any background.

    picture = draw_caption("photo.jpg", image.caption())
    save_picture(picture, "caption.png")
    save_mask(image.segment("the red circle").mask, "mask.png")   # black and white, the image's size
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
from pixelllm.results import Caption, Region, Segment, Segmentation

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

MIN_SIDE = 512
"""Pixels: a picture's longer side is at least this (a smaller image is enlarged, smoothly)."""
NEIGHBOURS = 6
"""``palette`` keeps each color far from the colors of this many entries before it."""
MIN_LIGHTNESS = 55.0
"""CIELAB L* of the least light color ``palette`` adds past ``PALETTE`` (readable on the legend)."""

HALO: Color = (20, 20, 20)
LEGEND_BACKGROUND: Color = (32, 32, 36)
MUTED: Color = (150, 150, 150)
WHITE: Color = (255, 255, 255)
NO_WORDS = "(no words)"
NO_REGIONS = "(no regions)"
NO_TARGETS = "none found"
DIM_ALPHA = 150  # of 255: how much the picture outside a mask darkens
WORD_BOX_ALPHA = 130


def palette(count: int) -> list[Color]:
    """``count`` distinct colors: ``PALETTE`` first, then, one at a time, the color of a grid of
    hues and lightnesses that lies farthest (CIELAB) from the ``NEIGHBOURS`` colors before it.
    Each word of a trace gets the next color, so words spoken one after the other never share a
    shade; the first ``n`` colors are the same for every ``count >= n``."""
    colors = list(PALETTE[:count])
    candidates = [c for c in _color_grid() if c not in PALETTE]
    labs = _lab(candidates)  # (K, 3), row i the candidate i
    while len(colors) < count:
        recent = _lab(colors[-NEIGHBOURS:])
        distance = np.linalg.norm(labs[:, None] - recent[None], axis=-1).min(1)  # to the nearest recent color
        best = int(distance.argmax())  # the first of equals, as max() would pick
        colors.append(candidates.pop(best))
        labs = np.delete(labs, best, axis=0)
    return colors


def _color_grid() -> list[Color]:
    """Saturated colors of 36 hues at 3 lightnesses, those light enough to read on the legend."""
    grid = [tuple(round(255 * v) for v in colorsys.hls_to_rgb(hue / 36, lightness, 0.8))
            for lightness in (0.55, 0.65, 0.75) for hue in range(36)]
    return [color for color, lab in zip(grid, _lab(grid), strict=True) if lab[0] >= MIN_LIGHTNESS]


def _lab(colors) -> np.ndarray:
    """CIELAB (D65) ``(..., 3)`` of sRGB colors ``(..., 3)``: distances in it follow how different colors look."""
    rgb = np.asarray(colors, dtype=np.float64) / 255
    linear = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = linear @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    f = np.cbrt(xyz / np.array([0.95047, 1.0, 1.08883]))
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def picture_scale(size: tuple[int, int]) -> float:
    """How much a picture of an image of ``size`` is enlarged: to ``MIN_SIDE`` on its longer side, or not."""
    return max(1.0, MIN_SIDE / max(size))


# -- public drawings ---------------------------------------------------------------------------


def draw_caption(image, caption: Caption, prompt: Sequence[float] | None = None) -> Image.Image:
    """The trace word by word: each word's point as a dot in its own color holding the word's
    number (its box faintly), a line through the points in word order, and under the image a
    legend strip of the numbered words in their colors.

    ``prompt``, the box ``[x0, y0, x1, y1]`` or point ``[x, y]`` a region caption was asked about,
    is drawn in white under the trace.
    """
    picture, style = _canvas(image)
    colors = palette(len(caption.words))
    overlay = Image.new("RGBA", picture.size)
    faint = ImageDraw.Draw(overlay)
    for word, color in zip(caption.words, colors, strict=True):
        faint.rectangle(style.box(word.box), outline=(*color, WORD_BOX_ALPHA), width=style.thin)
    picture.alpha_composite(overlay)
    draw = ImageDraw.Draw(picture)
    if prompt is not None:
        _prompt(draw, prompt, style)
    points = [style.point(word.point) for word in caption.words]
    if len(points) > 1:
        _halo_line(draw, points, WHITE, style.thin, style)
    spots = _dodge(points, 2 * style.marker_radius, picture.size)
    for number, (spot, color) in enumerate(zip(spots, colors, strict=True), 1):
        _marker(draw, spot, color, style, number)
    entries = [(word.text, color) for word, color in zip(caption.words, colors, strict=True)]
    return _with_legend(picture.convert("RGB"), _legend(entries, picture.width, style))


def draw_location(image, box: Sequence[float], label: str, score: float | None = None,
                  found: bool = True) -> Image.Image:
    """A box over the image (what it holds keeps its colors) with ``label`` (and ``score``) in a tag
    beside it; a box not ``found`` is drawn gray, its tag saying so."""
    picture, style = _canvas(image)
    rect = style.box(box)
    x0, y0, x1, y1 = (round(v) for v in rect)
    color = _standout(np.asarray(picture)[max(y0, 0):y1, max(x0, 0):x1, :3]) if found else MUTED
    draw = ImageDraw.Draw(picture)
    _box(draw, rect, color, style)
    _tag(draw, picture.size, rect, _found_label(label, score, found), color, style, taken=[])
    return picture.convert("RGB")


def draw_segmentation(image, segmentation: Segmentation) -> Image.Image:
    """The mask shown by darkening the rest of the picture (the object keeps its own colors), a
    contour around it, its box, and the expression with its score in a tag."""
    picture, style = _canvas(image)
    mask = _picture_mask(segmentation.mask, picture, style)
    color = _standout(np.asarray(picture)[mask, :3])
    label = _found_label(segmentation.expression, segmentation.score, segmentation.found)
    return _draw_masks(picture, style, [(mask, segmentation.box, color, label)])


def draw_segments(image, query: str, segments: Sequence[Segment]) -> Image.Image:
    """Every target of a multi-target answer (``segment_all``): the picture darkened outside them,
    each with a contour, a box and a tag "query #i  score" in its own color; a tag saying so when
    there is none."""
    picture, style = _canvas(image)
    colors = palette(len(segments))
    drawn = [(_picture_mask(s.mask, picture, style), s.box, color, f"{query} #{i}  {s.score:.2f}")
             for i, (s, color) in enumerate(zip(segments, colors, strict=True), 1)]
    if not drawn:
        _tag(ImageDraw.Draw(picture), picture.size, (0, 0, 0, 0), f"{query}: {NO_TARGETS}", MUTED, style, [])
    return _draw_masks(picture, style, drawn)


def _picture_mask(mask: np.ndarray, picture: Image.Image, style: _Style) -> np.ndarray:
    """An ``(H, W)`` mask of the image at the picture's size; ``InputError`` if it is not the image's size."""
    width, height = style.image_size
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (height, width):
        raise InputError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {width}x{height}")
    return _resized(mask, picture.size)


def _draw_masks(picture: Image.Image, style: _Style, drawn: list) -> Image.Image:
    """``drawn``: ``(mask at the picture's size, box in image pixels, color, label)`` each. The picture
    outside every mask darkened, each mask's contour in its color, its box and its tag."""
    union = np.zeros((picture.height, picture.width), dtype=bool)
    for mask, *_ in drawn:
        union |= mask
    overlay = np.zeros((*union.shape, 4), dtype=np.uint8)
    if union.any():
        overlay[~union] = (*HALO, DIM_ALPHA)
    for mask, _, color, _ in drawn:
        if mask.any():
            ring = _ring(mask, style.line)
            overlay[_ring(mask | ring, style.halo) & ~union] = (*HALO, 255)
            overlay[ring] = (*color, 255)
    picture.alpha_composite(Image.fromarray(overlay, "RGBA"))
    draw = ImageDraw.Draw(picture)
    taken: list[tuple[int, int, int, int]] = []
    for _, box, color, label in drawn:
        rect = style.box(box)
        _box(draw, rect, color, style, width=style.thin)
        _tag(draw, picture.size, rect, label, color, style, taken)
    return picture.convert("RGB")


def draw_regions(image, regions: Sequence[Region]) -> Image.Image:
    """Each region's box in its own color with a tag "caption  score"; the best region (first) is
    drawn on top and its tag placed first, and no tag covers another where the picture has room."""
    picture, style = _canvas(image)
    draw = ImageDraw.Draw(picture)
    colors = palette(len(regions))
    for region, color in reversed(list(zip(regions, colors, strict=True))):
        _box(draw, style.box(region.box), color, style)
    taken: list[tuple[int, int, int, int]] = []
    if not regions:
        _tag(draw, picture.size, (0, 0, 0, 0), NO_REGIONS, MUTED, style, taken)
    for region, color in zip(regions, colors, strict=True):
        label = f"{region.caption or '(no caption)'}  {region.score:.2f}"
        _tag(draw, picture.size, style.box(region.box), label, color, style, taken)
    return picture.convert("RGB")


def save_picture(picture: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``picture`` as a PNG at ``path`` atomically (a reader never sees half a file)."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return write_atomically(path, buffer.getvalue())


def save_mask(mask: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an ``(H, W)`` bool mask as a black-and-white PNG of the image's size (255 inside, 0
    outside; 8-bit grayscale), atomically."""
    return save_picture(Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255, "L"), path)


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
    """Sizes in pixels of one picture (everything scales with its longer side), the ``image_size``
    it shows, and ``scale``, the picture's pixels per image pixel."""

    image_size: tuple[int, int]
    scale: float
    line: int  # box outlines, contours
    thin: int  # trace line, word boxes
    radius: int  # trace markers: wide enough for a two-digit number
    font: ImageFont.FreeTypeFont
    font_size: int
    number_font: ImageFont.FreeTypeFont  # the numbers in the trace markers
    pad: int

    @property
    def halo(self) -> int:
        return max(1, round(self.line / 2))

    @property
    def marker_radius(self) -> int:
        """The outer radius of a trace marker, its rings included."""
        return self.radius + 2 * self.halo

    def box(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        """An image box on the picture, in the order Pillow needs (x1 >= x0, y1 >= y0)."""
        x0, y0, x1, y1 = (float(v) * self.scale for v in box)
        return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)

    def point(self, point: Sequence[float]) -> tuple[float, float]:
        return float(point[0]) * self.scale, float(point[1]) * self.scale


def _style(size: tuple[int, int], image_size: tuple[int, int], scale: float) -> _Style:
    unit = max(size) / 500  # 1.0 for a typical 500-pixel picture
    font_size = max(11, round(15 * unit))
    number_font = ImageFont.load_default(size=max(9, round(font_size * 0.7)))
    radius = max(round(6 * unit), math.ceil(number_font.getlength("88") / 2) + 1)
    return _Style(image_size=image_size, scale=scale, line=max(2, round(3 * unit)), thin=max(1, round(2 * unit)),
                  radius=radius, font=ImageFont.load_default(size=font_size), font_size=font_size,
                  number_font=number_font, pad=max(3, round(font_size * 0.4)))


def _canvas(image) -> tuple[Image.Image, _Style]:
    """A fresh RGBA copy of the image to draw on (enlarged to ``MIN_SIDE``, smoothly, if smaller),
    and the sizes that suit it."""
    picture = load_image(image).convert("RGBA")
    image_size, scale = picture.size, picture_scale(picture.size)
    if scale > 1:
        size = (round(picture.width * scale), round(picture.height * scale))
        picture = picture.resize(size, Image.Resampling.LANCZOS)
    return picture, _style(picture.size, image_size, scale)


# -- primitives --------------------------------------------------------------------------------


def _halo_line(draw: ImageDraw.ImageDraw, points, color: Color, width: int, style: _Style) -> None:
    draw.line(points, fill=HALO, width=width + 2 * style.halo, joint="curve")
    draw.line(points, fill=color, width=width, joint="curve")


def _box(draw: ImageDraw.ImageDraw, rect, color: Color, style: _Style, width: int | None = None) -> None:
    """A box outline (picture pixels, ``_Style.box``) with a dark halo on both sides, so it shows on
    light and dark backgrounds."""
    width = width or style.line
    x0, y0, x1, y1 = rect
    halo = style.halo
    draw.rectangle((x0 - halo, y0 - halo, x1 + halo, y1 + halo), outline=HALO, width=width + 2 * halo)
    draw.rectangle((x0, y0, x1, y1), outline=color, width=width)


def _prompt(draw: ImageDraw.ImageDraw, prompt: Sequence[float], style: _Style) -> None:
    """A prompt box, or a prompt point as a ring, in white with a halo."""
    if len(prompt) == 4:
        _box(draw, style.box(prompt), WHITE, style)
        return
    x, y = style.point(prompt)
    # Pillow draws an outline inward from the bounding box: the halo's box is larger by its width.
    for radius, width, color in ((2 * style.radius + style.halo, style.line + 2 * style.halo, HALO),
                                 (2 * style.radius, style.line, WHITE)):
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=color, width=width)


def _marker(draw: ImageDraw.ImageDraw, point, color: Color, style: _Style, number: int) -> None:
    """A filled dot holding ``number``, in a white ring in a dark ring: visible on any background."""
    x, y = point
    for radius, fill in ((style.radius + 2 * style.halo, HALO), (style.radius + style.halo, WHITE),
                         (style.radius, color)):
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill)
    _number(draw, (x, y), number, color, style)


def _number(draw: ImageDraw.ImageDraw, center, number: int, color: Color, style: _Style) -> None:
    """``number`` centered on ``center``, in black or white, whichever reads on ``color``."""
    draw.text(center, str(number), font=style.number_font, fill=_text_on(color), anchor="mm")


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


def _ring(mask: np.ndarray, width: int) -> np.ndarray:
    """The pixels within ``width`` outside the mask's edge (the object's own pixels stay as they are)."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    dilated = np.asarray(image.filter(ImageFilter.MaxFilter(2 * width + 1))) > 0
    return dilated & ~mask


def _resized(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A bool mask at the picture's ``size`` (smooth edges: resized as gray, then thresholded)."""
    if (mask.shape[1], mask.shape[0]) == size:
        return mask
    gray = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.BILINEAR)
    return np.asarray(gray) > 127


def _found_label(label: str, score: float | None, found: bool) -> str:
    """A tag's text: the label with its score, and whether it was found."""
    if score is None:
        return label if found else f"{label}: not found"
    return f"{label}  {score:.3f}" if found else f"{label}: not found ({score:.3f})"


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
    """A label in a filled tag next to ``box`` (picture pixels), wholly inside the ``canvas``,
    avoiding the ``taken`` tags if it can; its rectangle is added to ``taken``."""
    width, height = canvas
    pad = style.pad // 2
    text = _fit(label, style.font, width - 2 * pad - 2)
    w = round(style.font.getlength(text)) + 2 * pad
    h = style.font_size + 2 * pad
    rect = _place((w, h), box, canvas, taken)
    taken.append(rect)
    draw.rectangle(rect, fill=color, outline=HALO, width=1)
    draw.text((rect[0] + pad, rect[1] + pad), text, font=style.font, fill=_text_on(color))


def _place(size: tuple[int, int], box, canvas: tuple[int, int], taken) -> tuple[int, int, int, int]:
    """Where a ``size`` tag goes: above the box, else inside its top, below it, inside its bottom,
    each at the box's left edge and then at its right, then ever farther above and below the box a
    tag's height at a time; each clamped into the canvas. The first that overlaps no ``taken``
    rectangle wins; if every one does, the one that overlaps them least."""
    w, h = size
    x0, y0, x1, y1 = box
    steps = range(1, canvas[1] // max(h, 1) + 1)
    tops = [y0 - h, y0, y1, y1 - h] + [top for k in steps for top in (y0 - h - k * h, y1 + k * h)]
    candidates = []
    for top in tops:
        for left in (x0, x1 - w):
            x = int(min(max(left, 0), canvas[0] - w))
            y = int(min(max(top, 0), canvas[1] - h))
            candidates.append((x, y, x + w - 1, y + h - 1))
    return min(candidates, key=lambda c: sum(_overlap(c, t) for t in taken))  # min keeps the first of equals


def _overlap(a, b) -> int:
    """The area two rectangles (inclusive pixel corners) share."""
    width = min(a[2], b[2]) - max(a[0], b[0]) + 1
    height = min(a[3], b[3]) - max(a[1], b[1]) + 1
    return max(width, 0) * max(height, 0)


# -- legend ------------------------------------------------------------------------------------


def _legend(entries: list[tuple[str, Color]], width: int, style: _Style) -> Image.Image:
    """A dark strip listing ``(word, color)`` entries in reading order, each after a dot of its
    color holding its number (as the trace marks it), wrapped to ``width``; with no entry, a muted
    note."""
    if not entries:
        strip = Image.new("RGB", (width, round(style.font_size * 1.5) + 2 * style.pad), LEGEND_BACKGROUND)
        ImageDraw.Draw(strip).text((style.pad, style.pad), NO_WORDS, font=style.font, fill=MUTED)
        return strip
    positions, line_height, height = _legend_layout([text for text, _ in entries], width, style)
    strip = Image.new("RGB", (width, height), LEGEND_BACKGROUND)
    draw = ImageDraw.Draw(strip)
    radius = style.radius
    for number, ((text, color), (x, y)) in enumerate(zip(entries, positions, strict=True), 1):
        middle = y + line_height / 2
        draw.ellipse((x, middle - radius, x + 2 * radius, middle + radius), fill=color)
        _number(draw, (x + radius, middle), number, color, style)
        draw.text((x + 2 * radius + style.pad / 2, middle), text, font=style.font, fill=color, anchor="lm")
    return strip


def _legend_layout(texts: list[str], width: int, style: _Style) -> tuple[list[tuple[int, int]], int, int]:
    """Top-left corners of the entries (a numbered dot, then the text), wrapped into lines; the
    height of a line and of the strip."""
    dot = 2 * style.radius + style.pad / 2
    gap = style.font_size * 0.8
    line_height = max(round(style.font_size * 1.5), 2 * style.radius + style.pad // 2)
    x, y, positions = style.pad, style.pad, []
    for text in texts:
        entry = dot + style.font.getlength(text)
        if x > style.pad and x + entry > width - style.pad:
            x, y = style.pad, y + line_height
        positions.append((round(x), y))
        x += entry + gap
    return positions, line_height, y + line_height + style.pad


def _with_legend(picture: Image.Image, legend: Image.Image) -> Image.Image:
    stacked = Image.new("RGB", (picture.width, picture.height + legend.height))
    stacked.paste(picture, (0, 0))
    stacked.paste(legend, (0, picture.height))
    return stacked
