"""Speech timing and the simulated mouse trace of a narrative.

Times are seconds from the start of the recording. Trace points are computed in image pixels
(x right, y down) and written normalized to [0, 1] by the caller.

The annotator's mouse scribbles over what is being talked about while its words are said
(a Lissajous loop with hand jitter, kept on the object and off its box's edges), rests
while connecting words are said, and travels to the next target along a slightly bent path with
a minimum-jerk speed profile, arriving as the first word about it starts. The speech waits for the
mouse: a pause is inserted when the connecting words are too short for the travel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pixelllm.data.shapes.geometry import Box
from pixelllm.data.shapes.narrative import Focus, Word
from pixelllm.data.shapes.scene import Scene, rasterize

Path = Callable[[np.ndarray], np.ndarray]
"""Maps an array of N times to (N, 2) pixel positions."""

SAMPLE_INTERVAL = (0.03, 0.07)
"""Range of the time between two recorded mouse positions, seconds."""
TRAVEL_TIME = (0.3, 0.6)
"""Range of the time the mouse takes to reach the next thing talked about, seconds."""
INNER_MARGIN = 0.15
"""Share of a target box's width (height) kept free on each side while scribbling over it."""


@dataclass(frozen=True)
class Run:
    """Consecutive words about one focus, said from ``start`` to ``end`` seconds."""

    focus: Focus
    start: float
    end: float


def speak(words: list[Word], rate: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    """(start, end) seconds of each word. Longer words last longer; commas and full stops add
    pauses; the first word about a new focus waits until the mouse can have travelled there.
    ``rate`` scales every duration (a slower or faster speaker)."""
    times = []
    clock = rng.uniform(0.3, 1.0)
    free_since = 0.0  # when the mouse last left a focus (or the recording started)
    previous: Focus = None
    for word in words:
        if word.focus is not None and word.focus != previous:
            clock = max(clock, free_since + rng.uniform(*TRAVEL_TIME))
        duration = (0.1 + 0.055 * len(word.utterance)) * rate * rng.uniform(0.85, 1.15)
        times.append((clock, clock + duration))
        clock += duration
        if word.focus is not None:
            free_since = clock
        previous = word.focus
        pause = {".": (0.35, 0.8), ",": (0.15, 0.35)}.get(word.text[-1], (0.03, 0.1))
        clock += rng.uniform(*pause) * rate
    return times


def runs(words: list[Word], times: list[tuple[float, float]]) -> list[Run]:
    """The focused runs of a narrative, in order: maximal stretches of consecutive words with the
    same focus (words with no focus are left out)."""
    found: list[Run] = []
    previous: Focus = None
    for word, (start, end) in zip(words, times, strict=True):
        if word.focus is not None and word.focus == previous:
            found[-1] = Run(word.focus, found[-1].start, end)
        elif word.focus is not None:
            found.append(Run(word.focus, start, end))
        previous = word.focus
    return found


@dataclass(frozen=True)
class Target:
    """What the mouse scribbles over: a box, the point the loop turns around, and for an object
    its mask cut to its box (top-left pixel at the box's corner), which the scribble never
    leaves."""

    box: Box
    center: np.ndarray
    mask: np.ndarray | None = None

    def inside(self, points: np.ndarray) -> np.ndarray:
        """Whether each of the (N, 2) pixel positions lies on the mask (all True without one)."""
        if self.mask is None:
            return np.ones(len(points), dtype=bool)
        height, width = self.mask.shape
        columns = np.floor(points[:, 0] - self.box[0]).astype(int)
        rows = np.floor(points[:, 1] - self.box[1]).astype(int)
        within = (columns >= 0) & (columns < width) & (rows >= 0) & (rows < height)
        result = np.zeros(len(points), dtype=bool)
        result[within] = self.mask[rows[within], columns[within]]
        return result

    def pull_inside(self, points: np.ndarray) -> np.ndarray:
        """Points off the mask moved toward ``center`` until they are on it."""
        points = points.copy()
        outside = np.flatnonzero(~self.inside(points))
        for factor in (0.8, 0.6, 0.4, 0.2, 0.0):
            if not len(outside):
                break
            candidates = self.center + factor * (points[outside] - self.center)
            landed = self.inside(candidates)
            points[outside[landed]] = candidates[landed]
            outside = outside[~landed]
        return points


def target(scene: Scene, focus: Focus) -> Target:
    """The target for ``focus``: the object (turning around its mask's centroid), the union of
    all objects' boxes, or the whole image for the background."""
    if isinstance(focus, int):
        obj = scene.objects[focus]
        x0, y0, x1, y1 = obj.box
        mask = rasterize(obj.polygon, scene.width, scene.height)[y0:y1, x0:x1]
        rows, columns = np.nonzero(mask)
        return Target(obj.box, np.array([x0 + columns.mean() + 0.5, y0 + rows.mean() + 0.5]), mask)
    if focus == "scene":
        boxes = np.array([o.box for o in scene.objects], dtype=np.float64)
        box = (*boxes[:, :2].min(axis=0), *boxes[:, 2:].max(axis=0))
    else:
        box = (0.0, 0.0, float(scene.width), float(scene.height))
    return Target(box, np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]))


def _scribble(goal: Target, amplitude: float, rng: np.random.Generator) -> tuple[Path, Path]:
    """A loop around the target's center reaching ``amplitude`` of its box's half-size; returns
    the smooth path and the path with hand jitter, both kept inside the box's inner part and on
    the target's mask."""
    x0, y0, x1, y1 = goal.box
    middle = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
    half = np.array([(x1 - x0) / 2, (y1 - y0) / 2])
    radius = amplitude * half
    omega = 2 * np.pi / rng.uniform(0.8, 2.0) * rng.choice([-1.0, 1.0])
    ratio = float(rng.choice([1.0, 2.0, 0.5, rng.uniform(0.7, 1.4)]))
    phase = rng.uniform(0, 2 * np.pi, size=2)
    inner_low, inner_high = middle - half * (1 - 2 * INNER_MARGIN), middle + half * (1 - 2 * INNER_MARGIN)
    jitter = 0.04 * half.min()

    def smooth(t: np.ndarray) -> np.ndarray:
        angles = np.stack([omega * t + phase[0], ratio * omega * t + phase[1]], axis=1)
        return goal.pull_inside(np.clip(goal.center + radius * np.sin(angles), inner_low, inner_high))

    def jittered(t: np.ndarray) -> np.ndarray:
        shaken = np.clip(smooth(t) + rng.normal(0, jitter, size=(len(t), 2)), inner_low, inner_high)
        return goal.pull_inside(shaken)

    return smooth, jittered


def _travel(start: np.ndarray, end: np.ndarray, t0: float, t1: float, rng: np.random.Generator) -> Path:
    """Movement from ``start`` at ``t0`` to ``end`` at ``t1``: a minimum-jerk speed profile along
    a path bent sideways by up to 15% of its length."""
    bend = rng.uniform(-0.15, 0.15)
    step = end - start
    normal = np.array([-step[1], step[0]])

    def path(t: np.ndarray) -> np.ndarray:
        s = np.clip((t - t0) / max(t1 - t0, 1e-6), 0, 1)[:, None]
        progress = 10 * s**3 - 15 * s**4 + 6 * s**5
        return start + step * progress + normal * bend * np.sin(np.pi * s)

    return path


def _rest(point: np.ndarray, rng: np.random.Generator) -> Path:
    """A resting mouse: the point with sub-pixel tremor."""
    return lambda t: point + rng.normal(0, 0.4, size=(len(t), 2))


@dataclass(frozen=True)
class _Piece:
    start: float
    path: Path
    travel_end: float | None = None  # set on travel pieces: when the travel arrives


def _pieces(scene: Scene, focused: list[Run], rng: np.random.Generator) -> list[_Piece]:
    """The trace as pieces in time order: rest, travel, scribble, rest, travel, scribble, ..."""
    here = rng.uniform([0, 0], [scene.width, scene.height])
    now = 0.0
    pieces: list[_Piece] = []
    for run in focused:
        amplitude = rng.uniform(0.15, 0.5) if isinstance(run.focus, int) else rng.uniform(0.5, 0.8)
        smooth, jittered = _scribble(target(scene, run.focus), amplitude, rng)
        arrival = smooth(np.array([run.start]))[0]
        depart = max(now, run.start - rng.uniform(*TRAVEL_TIME))
        pieces.append(_Piece(now, _rest(here, rng)))
        pieces.append(_Piece(depart, _travel(here, arrival, depart, run.start, rng), run.start))
        pieces.append(_Piece(run.start, jittered))
        here, now = smooth(np.array([run.end]))[0], run.end
    pieces.append(_Piece(now, _rest(here, rng)))
    return pieces


def _sample_times(duration: float, rng: np.random.Generator) -> np.ndarray:
    """Recording times from 0 to ``duration`` with irregular gaps."""
    count = int(duration / SAMPLE_INTERVAL[0]) + 2
    times = np.concatenate([[0.0], np.cumsum(rng.uniform(*SAMPLE_INTERVAL, size=count))])
    return times[times <= duration]


def _lifts(pieces: list[_Piece], rng: np.random.Generator) -> list[tuple[float, float]]:
    """Time spans (in the middle of some travels) where the mouse was lifted and not recorded,
    which splits the trace into several segments."""
    spans = []
    for piece in pieces:
        if piece.travel_end is not None and piece.travel_end - piece.start > 0.2 and rng.random() < 0.15:
            quarter = (piece.travel_end - piece.start) / 4
            spans.append((piece.start + quarter, piece.travel_end - quarter))
    return spans


def simulate_trace(
    scene: Scene, words: list[Word], times: list[tuple[float, float]], rng: np.random.Generator
) -> list[np.ndarray]:
    """Trace segments, each an (N, 3) array of (x, y, t): x, y in pixels clipped to the image,
    t in seconds. Recording runs from 0 until a moment after the last word."""
    pieces = _pieces(scene, runs(words, times), rng)
    sample_times = _sample_times(times[-1][1] + rng.uniform(0.2, 0.6), rng)
    starts = np.array([p.start for p in pieces])
    which = np.searchsorted(starts, sample_times, side="right") - 1
    points = np.zeros((len(sample_times), 2))
    for index, piece in enumerate(pieces):
        chosen = which == index
        if chosen.any():
            points[chosen] = piece.path(sample_times[chosen])
    points = np.clip(points, 0, [scene.width, scene.height])
    samples = np.column_stack([points, sample_times])
    kept = np.ones(len(samples), dtype=bool)
    for low, high in _lifts(pieces, rng):
        kept &= ~((sample_times > low) & (sample_times < high))
    # A new segment starts wherever recorded points were dropped just before.
    breaks = np.flatnonzero(np.diff(np.flatnonzero(kept)) > 1) + 1
    return [part for part in np.split(samples[kept], breaks) if len(part)]
