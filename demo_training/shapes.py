"""The demo model's world: one shape on a plain background, drawn from a caption's grammar, and read back.

A scene is a shape, its colour, the background's colour, a position and a size. :func:`draw` paints
it (anti-aliased), :func:`caption` says it in the grammar the demo model was trained on, and
:func:`read_picture` recovers the background, the shape's colour and its position from pixels alone,
which is how the training report and the tests score what the model draws.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 215, 40),
    "purple": (140, 60, 190),
    "orange": (245, 135, 30),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star")
# Where the shape's centre lies, as fractions of the side (x, y), and how a caption says it.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# The shape's radius as a fraction of the side; a caption without a size means anything between.
SIZES = {"small": 0.11, "large": 0.21}
WORDS = ("a", "an", "on", "the", "at", "in", "background", *COLOURS, *SHAPES, *POSITIONS, *SIZES)

SIDE = 64  # pixels: the demo model is trained at 64x64
_SUPERSAMPLE = 4
_JITTER = 0.04


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    position: str
    size: float  # radius / side

    def caption(self, *, with_size: bool = True, with_position: bool = True) -> str:
        """The scene in the training grammar, e.g. 'a small red circle on the left on a blue background'."""
        words = [_size_word(self.size)] if with_size else []
        words += [self.colour, self.shape]
        words.insert(0, "an" if words[0][0] in "aeiou" else "a")
        if with_position:
            words.append(POSITION_PHRASES[self.position])
        words.append(f"on a {self.background} background")
        return " ".join(words)


def _size_word(size: float) -> str:
    return min(SIZES, key=lambda word: abs(SIZES[word] - size))


def is_held_out(colour: str, shape: str, background: str) -> bool:
    """About a tenth of the (colour, shape, background) triples are never drawn for training, so
    the tests can ask for combinations the model has not seen."""
    c, s, b = list(COLOURS).index(colour), SHAPES.index(shape), list(COLOURS).index(background)
    return (3 * c + 5 * s + 7 * b) % 10 == 7


def held_out_triples() -> list[tuple[str, str, str]]:
    return [(c, s, b) for c in COLOURS for s in SHAPES for b in COLOURS if c != b and is_held_out(c, s, b)]


def random_scene(rng: random.Random, *, held_out: bool = False) -> Scene:
    """A scene with every attribute drawn from ``rng``: a training scene, or a held-out one."""
    while True:
        colour, background = rng.sample(list(COLOURS), 2)
        shape = rng.choice(SHAPES)
        if is_held_out(colour, shape, background) == held_out:
            break
    position = rng.choice(list(POSITIONS))
    size = rng.choice([SIZES["small"], SIZES["large"], rng.uniform(SIZES["small"], SIZES["large"])])
    return Scene(shape, colour, background, position, size)


def training_caption(scene: Scene, rng: random.Random) -> str:
    """A caption that names the colours and shape always, the size half the time, the position most of it."""
    with_size = scene.size in SIZES.values() and rng.random() < 0.5
    return scene.caption(with_size=with_size, with_position=rng.random() < 0.8)


def draw(scene: Scene, rng: random.Random | None = None, side: int = SIDE) -> Image.Image:
    """Paint ``scene`` at ``side`` x ``side`` pixels; ``rng`` jitters the centre a little."""
    big = side * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), COLOURS[scene.background])
    pen = ImageDraw.Draw(image)
    x, y = POSITIONS[scene.position]
    if rng is not None:
        x += rng.uniform(-_JITTER, _JITTER)
        y += rng.uniform(-_JITTER, _JITTER)
    cx, cy, r = x * big, y * big, scene.size * big
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "square":
        half = 0.9 * r
        pen.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif scene.shape == "triangle":
        pen.polygon(_star_points(cx, cy + 0.25 * r, 1.25 * r, 1.25 * r, 3), fill=fill)
    elif scene.shape == "star":
        pen.polygon(_star_points(cx, cy, 1.25 * r, 0.5 * r, 5), fill=fill)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return image.resize((side, side), Image.Resampling.BOX)


def _star_points(cx: float, cy: float, outer: float, inner: float, points: int) -> list[tuple[float, float]]:
    """A regular polygon (inner == outer) or star, one point straight up."""
    if inner == outer:
        angles = [(-90 + 360 * i / points, outer) for i in range(points)]
    else:
        angles = [(-90 + 180 * i / points, outer if i % 2 == 0 else inner) for i in range(2 * points)]
    return [(cx + rad * math.cos(math.radians(a)), cy + rad * math.sin(math.radians(a))) for a, rad in angles]


@dataclass(frozen=True)
class Reading:
    """What :func:`read_picture` sees: the background colour, the shape's colour and position (None
    when no shape stands out)."""

    background: str
    colour: str | None
    position: str | None


def read_picture(image: Image.Image, min_share: float = 0.01) -> Reading:
    """Classify every pixel as its nearest palette colour: the commonest is the background, the
    commonest of the rest (if it covers at least ``min_share`` of the image) the shape's colour,
    and the centroid of all non-background pixels, by its nearest anchor, the shape's position."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width, _ = pixels.shape
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    nearest = ((pixels[:, :, None, :] - palette) ** 2).sum(-1).argmin(-1)
    counts = np.bincount(nearest.ravel(), minlength=len(palette))
    names = list(COLOURS)
    ranked = np.argsort(-counts, kind="stable")
    background, shape = int(ranked[0]), int(ranked[1])
    if counts[shape] < min_share * width * height:
        return Reading(names[background], None, None)
    ys, xs = np.nonzero(nearest != background)
    cx, cy = xs.mean() / width, ys.mean() / height
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    return Reading(names[background], names[shape], position)


def draw_at(scene: Scene, x: float, y: float, size: float | None = None, side: int = SIDE) -> Image.Image:
    """Paint ``scene``'s shape centred at (``x``, ``y``), fractions of the side, with radius ``size``
    (the scene's own by default): :func:`draw` anywhere, not only at the five caption positions.
    The ControlNet is trained on these, so it learns continuous placement."""
    fill, background = COLOURS[scene.colour], COLOURS[scene.background]
    return _paint_at(scene.shape, x, y, scene.size if size is None else size, fill, background, side)


def draw_silhouette(scene: Scene, x: float, y: float, size: float | None = None, side: int = SIDE) -> Image.Image:
    """The same shape as :func:`draw_at`, white on black: the ControlNet's control image, which says
    where and how big the shape is and nothing about its colours."""
    return _paint_at(scene.shape, x, y, scene.size if size is None else size, (255, 255, 255), (0, 0, 0), side)


def _paint_at(shape: str, x: float, y: float, size: float, fill: tuple[int, int, int],
              background: tuple[int, int, int], side: int) -> Image.Image:
    """One anti-aliased shape (the geometry of :func:`draw`) at the centre (x, y) and radius ``size``."""
    big = side * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), background)
    pen = ImageDraw.Draw(image)
    cx, cy, r = x * big, y * big, size * big
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        half = 0.9 * r
        pen.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "triangle":
        pen.polygon(_star_points(cx, cy + 0.25 * r, 1.25 * r, 1.25 * r, 3), fill=fill)
    elif shape == "star":
        pen.polygon(_star_points(cx, cy, 1.25 * r, 0.5 * r, 5), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image.resize((side, side), Image.Resampling.BOX)
