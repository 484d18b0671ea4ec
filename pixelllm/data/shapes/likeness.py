"""Whether an image could come from the shapes world, all that the embedded models were trained on.

The world paints flat objects in 8 colors (each channel within ``COLOR_JITTER`` of its color's) on
muted mid-tone backgrounds (every channel in 40..215, a gray tinted by up to 30 per channel, plus
blotches and grain). A pixel "fits" when it is near an object color or such a mid-tone. In 300
images of every background kind at least 99.9 % of the pixels fit (in 100 of them saved as JPEG of
quality 75, at least 96.5 %; halved in size, 98.4 %); in the photos of the tests, 30 to 83 %.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pixelllm.data.shapes.vocab import COLOR_JITTER, COLORS

FITTING_SHARE = 0.95
"""The least share of fitting pixels in an image that looks like the shapes world."""
COLOR_MARGIN = COLOR_JITTER + 4  # a little more than the world's jitter: resampling and JPEG move pixels too
MID_TONE = (40, 215)
MAX_TINT = 90  # the most two channels of a background pixel differ (tint, blotches and grain together)
_COLORS = np.array(list(COLORS.values()), dtype=np.int16)


SAMPLED_PIXELS = 250_000
"""At most this many pixels are tested (every k-th of a larger image): the share barely moves, and a
photo of 16 M pixels would otherwise take gigabytes against the 8 colors."""


def fitting_share(image: Image.Image) -> float:
    """The share of an RGB image's pixels that the shapes world could have painted."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16).reshape(-1, 3)
    pixels = pixels[:: max(1, len(pixels) // SAMPLED_PIXELS)]
    near_color = (np.abs(pixels[:, None] - _COLORS[None]).max(-1) <= COLOR_MARGIN).any(1)
    mid_tone = ((pixels >= MID_TONE[0]) & (pixels <= MID_TONE[1])).all(1) & (np.ptp(pixels, 1) <= MAX_TINT)
    return float((near_color | mid_tone).mean())


def looks_like_shapes_world(image: Image.Image) -> bool:
    return fitting_share(image) >= FITTING_SHARE
