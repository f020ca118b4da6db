"""Pillow rendering of a ``Scene``: textured background, filled or outlined shapes, noise.

Everything is drawn at ``ss`` times the output size and box-downsampled, which antialiases
edges without any per-shape care. Shapes are polygons in unit coordinates (radius 1 is half
the object's extent), rotated analytically; only circles and rings use ellipses.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from clipforge.data.synth.world import COLOURS, Obj, Scene

Point = tuple[float, float]


def _regular(n: int, radius: float, start_deg: float) -> list[Point]:
    angles = [math.radians(start_deg + 360 * i / n) for i in range(n)]
    return [(radius * math.cos(a), radius * math.sin(a)) for a in angles]


def _star() -> list[Point]:
    outer, inner = _regular(5, 1.0, -90), _regular(5, 0.45, -54)
    pts = [p for pair in zip(outer, inner) for p in pair]
    return [(x, y + 0.1) for x, y in pts]  # the star's bounding box sits high: recentre it


def _heart() -> list[Point]:
    ts = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(ts) ** 3
    y = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))  # y grows downwards
    return [(float(a) / 16.5, (float(b) + 2.5) / 16.5) for a, b in zip(x, y)]


def _cross(arm: float = 0.32, reach: float = 0.95) -> list[Point]:
    a, r = arm, reach
    return [(-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r), (-a, r), (-a, a), (-r, a), (-r, -a), (-a, -a)]


def _crescent(offset: float = 0.5, inner: float = 0.85) -> list[Point]:
    """Unit disc minus a disc of radius ``inner`` centred at (offset, 0), as one polygon."""
    t0 = math.acos((1 + offset**2 - inner**2) / (2 * offset))  # where the circles cross, on the outer one
    p0 = math.acos((1 - offset**2 - inner**2) / (2 * offset * inner))  # ... on the inner one
    outer = [(math.cos(t), math.sin(t)) for t in np.linspace(t0, 2 * math.pi - t0, 32)]
    hole = [(offset + inner * math.cos(p), inner * math.sin(p)) for p in np.linspace(2 * math.pi - p0, p0, 24)]
    shift = (1 - math.cos(t0)) / 2  # the bounding box spans x in [-1, cos t0]: centre it
    return [(x + shift, y) for x, y in outer + hole]


UNIT_POLYGONS: dict[str, list[Point]] = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(0.0, -0.88), (0.98, 0.82), (-0.98, 0.82)],
    "star": _star(),
    "heart": _heart(),
    "cross": _cross(),
    "diamond": [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)],
    "hexagon": _regular(6, 0.95, 0),
    "crescent": _crescent(),
    # a cut gemstone's side view (flat table, sloping crown, pointed pavilion): the second
    # "diamond" of a world with polysemy, wider than the rhombus and flat on top
    "gem": [(-0.45, -0.8), (0.45, -0.8), (0.95, -0.35), (0.0, 0.85), (-0.95, -0.35)],
}
CIRCLE_RADIUS = 0.9
RING_INNER = 0.58  # inner radius of a ring, relative to its outer radius


def supersampling(image_size: int) -> int:
    return max(2, min(4, 256 // image_size))


def _polygon(shape: str, cx: float, cy: float, r: float, rotation: float) -> list[Point]:
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    # Counter-clockwise on screen, where y points down.
    return [(cx + r * (u * c + v * s), cy + r * (-u * s + v * c)) for u, v in UNIT_POLYGONS[shape]]


def _draw_object(draw: ImageDraw.ImageDraw, obj: Obj, side: int, outline: bool, colour=None) -> None:
    colour = COLOURS[obj.colour] if colour is None else colour
    cx, cy, r = obj.x * side, obj.y * side, obj.extent * side / 2
    width = max(2, round(0.035 * side))  # sketch stroke: ~2 px at 64 px output

    def disc(radius: float, **kw: object) -> None:
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), **kw)  # type: ignore[arg-type]

    if obj.shape == "circle":
        disc(r * CIRCLE_RADIUS, **({"outline": colour, "width": width} if outline else {"fill": colour}))
    elif obj.shape == "ring":
        outer = r * CIRCLE_RADIUS * 1.05
        if outline:
            disc(outer, outline=colour, width=width)
            disc(outer * RING_INNER, outline=colour, width=width)
        else:
            disc(outer, outline=colour, width=round(outer * (1 - RING_INNER)))
    else:
        pts = _polygon(obj.shape, cx, cy, r, obj.rotation)
        if outline:
            draw.line(pts + pts[:1], fill=colour, width=width, joint="curve")
        else:
            draw.polygon(pts, fill=colour)


@lru_cache(maxsize=8)
def _axis(side: int) -> np.ndarray:
    return np.arange(side, dtype=np.float32) / side  # [S]: fractions of the side


def _background(scene: Scene, side: int, rng: np.random.Generator) -> np.ndarray:
    """[S, S, 3] uint8 texture. ``mask`` picks the second tone (the blend weight, for gradients).
    Every pattern is built from per-row and per-column terms (x as a row [1, S], y as a column
    [S, 1]) broadcast once: the same values as on full grids, a fraction of the work."""
    c1, c2 = (np.asarray(c, np.float32) for c in scene.bg_colours)
    period, angle, px, py = scene.bg_params
    x, y = _axis(side)[None, :], _axis(side)[:, None]
    kind = scene.background
    if kind == "gradient":
        t = np.cos(np.radians(angle)) * (x - 0.5) + np.sin(np.radians(angle)) * (y - 0.5)
        mask = np.clip(t + 0.5, 0, 1)
    elif kind == "stripes":
        coord = x if angle < 180 else y  # vertical or horizontal bands
        mask = np.broadcast_to((coord / period + px) % 1.0 < 0.5, (side, side))
    elif kind == "dots":
        dx, dy = (x / period + px) % 1.0 - 0.5, (y / period + py) % 1.0 - 0.5
        mask = dx * dx + dy * dy < 0.22**2
    elif kind == "checker":
        # the two cell indices' sum is odd where exactly one of them is
        mask = (np.floor(x / period + px) % 2 > 0.5) ^ (np.floor(y / period + py) % 2 > 0.5)
    elif kind == "waves":
        wobble = 0.06 * np.sin(2 * np.pi * (x / 0.35 + px))  # bands undulate sideways
        mask = np.sin(2 * np.pi * (y + wobble) / period) > 0
    elif kind == "grid":
        mask = ((x / period + px) % 1.0 < 0.15) | ((y / period + py) % 1.0 < 0.15)
    elif kind == "marble":
        low = Image.fromarray(rng.uniform(0, 255, (5, 5)).astype(np.uint8))
        mask = np.asarray(low.resize((side, side), Image.BICUBIC), np.float32) / 255.0
        mask = np.clip((mask - 0.5) * 3 + 0.5, 0, 1)  # sharpen into veins and blobs
    else:
        raise ValueError(f"unknown background {kind!r}")
    if mask.dtype != np.bool_:  # blended tones
        return (c1 + mask[..., None] * (c2 - c1)).astype(np.uint8)  # [S, S, 3]
    # two tones: looked up, not blended (the same pixels; np.take is ~4x faster than np.where here)
    return np.take(np.stack([c1, c2]).astype(np.uint8), mask.astype(np.uint8), axis=0)


def render(scene: Scene, image_size: int = 64) -> Image.Image:
    """The RGB image of ``scene`` at ``image_size`` pixels square (deterministic)."""
    ss = supersampling(image_size)
    side = image_size * ss
    rng = np.random.default_rng(scene.render_seed)
    if scene.background == "plain":
        canvas = Image.new("RGB", (side, side), scene.bg_colours[0])
    else:
        # Textures are smooth enough at 2x the output size; numpy at the full 4x was the
        # generator's main cost. Nearest upsampling keeps their edges for the final box filter.
        tex_side = image_size * min(ss, 2)
        canvas = Image.fromarray(_background(scene, tex_side, rng))
        if tex_side != side:
            canvas = canvas.resize((side, side), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        _draw_object(draw, obj, side, outline=scene.style == "outline")
    image = canvas.reduce(ss)  # box filter: the antialiasing step
    if scene.noise > 0:
        arr = np.asarray(image, np.float32) + rng.normal(0.0, scene.noise, (image_size, image_size, 3))
        image = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    return image


def object_mask(obj: Obj, image_size: int = 64, outline: bool = False) -> np.ndarray:
    """[S, S] bool: the pixels ``obj`` covers in a render at ``image_size`` (at least half covered
    after the same supersampling and box filter), for checks of where a model looks."""
    ss = supersampling(image_size)
    canvas = Image.new("L", (image_size * ss,) * 2, 0)
    _draw_object(ImageDraw.Draw(canvas), obj, image_size * ss, outline, colour=255)
    return np.asarray(canvas.reduce(ss)) >= 128
