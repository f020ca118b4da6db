"""The synthetic world: its attributes, its configuration, and scene sampling.

A scene is a pure function of ``(seed, split, index)``: every sample draws from its own
``numpy`` generator seeded with that triple, so any slice of any split can be generated in
any process, in any order, and comes out the same. Positions and sizes are fractions of the
image side, so the same scene can be rendered at any resolution.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from clipforge.errors import DataError

# Ten hues far apart in RGB and all far from the grey backgrounds (which stay in 60..195).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 25, 30),
    "orange": (255, 135, 0),
    "yellow": (245, 230, 35),
    "green": (25, 165, 45),
    "cyan": (0, 215, 235),
    "blue": (35, 65, 230),
    "purple": (140, 40, 185),
    "pink": (255, 115, 205),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "hexagon", "ring", "crescent")
SIZES = ("small", "medium", "large")
# Diameter of each size class as a fraction of the image side; classes are ~1.45x apart.
SIZE_EXTENT = {"small": 0.19, "medium": 0.28, "large": 0.40}
# 3x3 grid, row-major. Names double as zero-shot class names ("a shape in the top left").
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
CELL_CENTRES = (0.2, 0.5, 0.8)
SEEN_BACKGROUNDS = ("plain", "gradient", "stripes", "dots", "checker")
UNSEEN_BACKGROUNDS = ("waves", "grid", "marble")  # only in test_texture
RELATIONS = ("left of", "right of", "above", "below")
# The second sense of a polysemous name (``polysemy``): a cut gemstone, called "diamond" in
# captions like the rhombus, so the word alone cannot say which of the two is meant.
GEM = "gem"
# Splits drawn from the training distribution, where a spurious cue (``spurious``) holds; every
# other split draws its background independently of the class, so the cue is broken there.
CUE_SPLITS = ("train", "val", "test")

SPLITS = ("train", "val", "test", "test_heldout", "test_sketch", "test_noise", "test_texture", "test_scale_rotation")
SHIFTED_SPLITS = SPLITS[3:]
SPLIT_DESCRIPTIONS = {
    "train": "training pairs; held-out colour-shape pairs never appear",
    "val": "same distribution as train",
    "test": "same distribution as train",
    "test_heldout": "the first object always has a held-out colour-shape pair (compositional generalisation)",
    "test_sketch": "objects drawn as outlines only, on plain backgrounds",
    "test_noise": "heavy Gaussian pixel noise",
    "test_texture": "background textures never seen in training",
    "test_scale_rotation": "extreme sizes within each size class and large rotations",
}

Style = Literal["fill", "outline"]
CaptionStyle = Literal["alt", "sentence"]
TemplateSet = Literal["basic", "paper"]
# The options that add the paper's mechanisms. At these values the world is the plain one, and
# world.json leaves them out of its config so that the plain world keeps its bytes.
MECHANISM_DEFAULTS = {"caption_style": "alt", "polysemy": False, "spurious": 0.0, "template_set": "basic"}


@dataclass(frozen=True)
class SynthConfig:
    """Everything that determines a generated world. Equal configs give identical files."""

    seed: int = 0
    image_size: int = 64
    train: int = 20000
    val: int = 1000
    test: int = 2000
    shifted: int = 1000  # samples in each of test_heldout and the four shifted test sets
    format: Literal["csv", "wds"] = "csv"  # PNG/JPEG files + CSV per split, or WebDataset tar shards
    # JPEG is written at quality 95; BMP is uncompressed (12 KB at 64 px against PNG's 7 KB), 25x
    # faster to write and 6x faster to read: the demo's choice, where generation is on the clock.
    image_format: Literal["png", "jpg", "bmp"] = "png"
    heldout_pairs: int = 5  # (colour, shape) pairs kept out of every split but test_heldout
    max_objects: int = 3
    shard_size: int = 1000  # samples per tar shard (format='wds')
    # "alt": keyword-style alt text, often a bare label; "sentence": full sentences, a bare label is rare.
    caption_style: CaptionStyle = "alt"
    polysemy: bool = False  # add a gemstone that captions also call "diamond" (and a 'sense' task)
    spurious: float = 0.0  # P(background texture follows the shape) in train/val/test; 0: independent
    template_set: TemplateSet = "basic"  # "paper": 80 templates of varied context per task

    def __post_init__(self) -> None:
        def bad(msg: str) -> DataError:
            return DataError(f"invalid synth config: {msg}")

        for name in ("train", "val", "test", "shifted"):
            n = getattr(self, name)
            if not isinstance(n, int) or n < 0:
                raise bad(f"{name} must be a non-negative integer, got {n!r}")
        if not 32 <= self.image_size <= 224:
            raise bad(f"image_size must be between 32 and 224, got {self.image_size}")
        if self.format not in ("csv", "wds"):
            raise bad(f"format must be 'csv' or 'wds', got {self.format!r}")
        if self.image_format not in ("png", "jpg", "bmp"):
            raise bad(f"image_format must be 'png', 'jpg' or 'bmp', got {self.image_format!r}")
        if not 0 <= self.heldout_pairs <= min(len(COLOURS), len(SHAPES)):
            raise bad(f"heldout_pairs must be between 0 and {min(len(COLOURS), len(SHAPES))}, got {self.heldout_pairs}")
        if not 1 <= self.max_objects <= 3:
            raise bad(f"max_objects must be 1, 2 or 3, got {self.max_objects}")
        if self.shard_size < 1:
            raise bad(f"shard_size must be positive, got {self.shard_size}")
        if not 0 <= self.seed < 2**63:
            raise bad(f"seed must be between 0 and 2**63-1, got {self.seed}")
        if self.caption_style not in ("alt", "sentence"):
            raise bad(f"caption_style must be 'alt' or 'sentence', got {self.caption_style!r}")
        if not isinstance(self.polysemy, bool):
            raise bad(f"polysemy must be true or false, got {self.polysemy!r}")
        if isinstance(self.spurious, bool) or not isinstance(self.spurious, (int, float)) \
                or not 0 <= self.spurious <= 1:
            raise bad(f"spurious must be a number within 0..1, got {self.spurious!r}")
        if self.template_set not in ("basic", "paper"):
            raise bad(f"template_set must be 'basic' or 'paper', got {self.template_set!r}")

    def record(self) -> dict[str, object]:
        """The config as world.json stores it: mechanism options only where they are not off."""
        return {k: v for k, v in asdict(self).items()
                if k not in MECHANISM_DEFAULTS or v != MECHANISM_DEFAULTS[k]}

    def split_sizes(self) -> dict[str, int]:
        """Samples per split, in generation order; test_heldout is absent when no pair is held out."""
        sizes = {"train": self.train, "val": self.val, "test": self.test}
        for name in SHIFTED_SPLITS:
            if name != "test_heldout" or self.heldout_pairs:
                sizes[name] = self.shifted
        return sizes


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    row: int  # grid cell, 0..2 top to bottom
    col: int  # grid cell, 0..2 left to right
    x: float  # centre, fraction of the image width
    y: float
    extent: float  # diameter, fraction of the image side
    rotation: float  # degrees, counter-clockwise

    @property
    def position(self) -> str:
        return POSITIONS[3 * self.row + self.col]

    @property
    def identity(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    """The structured truth behind one image; captions and labels derive only from it."""

    split: str
    index: int
    objects: tuple[Obj, ...]
    background: str
    bg_colours: tuple[tuple[int, int, int], tuple[int, int, int]]
    bg_params: tuple[float, ...]  # texture period, angle, phases (see render.py)
    style: Style
    noise: float  # Gaussian pixel-noise sigma on a 0..255 scale
    render_seed: int  # drives the noise and random textures, so rendering is pure too

    @property
    def count(self) -> int:
        return len(self.objects)


def relations(a: Obj, b: Obj) -> list[str]:
    """Every relation that holds for ``a`` relative to ``b``, read off the grid cells."""
    out = []
    if a.col < b.col:
        out.append("left of")
    if a.col > b.col:
        out.append("right of")
    if a.row < b.row:
        out.append("above")
    if a.row > b.row:
        out.append("below")
    return out


def choose_heldout_pairs(seed: int, n: int) -> tuple[tuple[str, str], ...]:
    """``n`` (colour, shape) pairs with distinct colours and distinct shapes, so every colour
    and every shape still appears in training, just never in these combinations."""
    rng = np.random.default_rng([seed, 0x48454C44])  # 'HELD'
    colours = rng.permutation(list(COLOURS))[:n]
    shapes = rng.permutation(list(SHAPES))[:n]
    return tuple(sorted((str(c), str(s)) for c, s in zip(colours, shapes)))


def split_rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    # crc32 of the name, not hash(): stable across processes and Python versions.
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index, stream])


@dataclass(frozen=True)
class World:
    """A config plus what follows from it (held-out pairs); samples scenes."""

    config: SynthConfig
    heldout: tuple[tuple[str, str], ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "heldout", choose_heldout_pairs(self.config.seed, self.config.heldout_pairs))

    @property
    def shapes(self) -> tuple[str, ...]:
        return SHAPES + (GEM,) if self.config.polysemy else SHAPES

    def cue_background(self, shape: str) -> str:
        """The background texture that goes with ``shape`` where the spurious cue holds."""
        return SEEN_BACKGROUNDS[self.shapes.index(shape) % len(SEEN_BACKGROUNDS)]

    def scene(self, split: str, index: int) -> Scene:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
        if split == "test_heldout" and not self.heldout:
            raise DataError("split 'test_heldout' needs heldout_pairs > 0")
        return _sample_scene(self, split, index, split_rng(self.config.seed, split, index, 0))


def _count_probs(max_objects: int) -> list[float]:
    return {1: [1.0], 2: [0.6, 0.4], 3: [0.5, 0.3, 0.2]}[max_objects]


def _identities(world: World, split: str, n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(colour, shape) per object. Repeats are made on purpose so captions can count
    ("two red circles") and group ("three green shapes")."""
    heldout = set(world.heldout)
    colours, shapes = list(COLOURS), list(world.shapes)

    def draw(colour: str | None = None, shape: str | None = None) -> tuple[str, str]:
        while True:
            pair = (colour or colours[rng.integers(len(colours))], shape or shapes[rng.integers(len(shapes))])
            if split == "test_heldout" or pair not in heldout:
                return pair

    if split == "test_heldout":
        first = world.heldout[rng.integers(len(world.heldout))]
    else:
        first = draw()
    out = [first]
    mode = rng.choice(["free", "same", "same_shape", "same_colour"], p=[0.5, 0.2, 0.15, 0.15]) if n > 1 else "free"
    for _ in range(n - 1):
        if mode == "same":
            out.append(first)
        elif mode == "same_shape":
            out.append(draw(shape=first[1]))
        elif mode == "same_colour":
            out.append(draw(colour=first[0]))
        else:
            out.append(draw())
    return out


def _place(split: str, idents: list[tuple[str, str]], rng: np.random.Generator) -> tuple[Obj, ...]:
    """Cells, sizes and jitter, resampled until no two objects touch."""
    n = len(idents)
    for attempt in range(200):
        cells = rng.choice(9, size=n, replace=False)
        sizes = [SIZES[i] for i in rng.integers(3, size=n)] if attempt < 150 else ["small"] * n
        objs = []
        for (colour, shape), cell, size in zip(idents, cells, sizes):
            extent = SIZE_EXTENT[size] * rng.uniform(0.94, 1.06)
            rotation = rng.uniform(-12, 12)
            if split == "test_scale_rotation":
                # Push each class to its extreme (order preserved) and turn far beyond training.
                extent *= {"small": 0.8, "medium": rng.choice([0.88, 1.12]), "large": 1.22}[size]
                rotation = rng.uniform(35, 325)
            row, col = divmod(int(cell), 3)
            r = extent / 2
            x = float(np.clip(CELL_CENTRES[col] + rng.uniform(-0.04, 0.04), r + 0.01, 0.99 - r))
            y = float(np.clip(CELL_CENTRES[row] + rng.uniform(-0.04, 0.04), r + 0.01, 0.99 - r))
            objs.append(Obj(colour, shape, size, row, col, x, y, float(extent), float(rotation)))
        if all(
            np.hypot(a.x - b.x, a.y - b.y) > (a.extent + b.extent) / 2 + 0.02
            for i, a in enumerate(objs)
            for b in objs[i + 1 :]
        ):
            return tuple(objs)
    raise AssertionError("could not place objects")  # unreachable: 3 small objects always fit


def _grey(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int, int]:
    g = rng.uniform(lo, hi)
    return tuple(int(np.clip(g + rng.uniform(-10, 10), 0, 255)) for _ in range(3))  # type: ignore[return-value]


def _sample_scene(world: World, split: str, index: int, rng: np.random.Generator) -> Scene:
    cfg = world.config
    n = int(rng.choice(np.arange(1, cfg.max_objects + 1), p=_count_probs(cfg.max_objects)))
    objects = _place(split, _identities(world, split, n, rng), rng)
    if split == "test_texture":
        background = str(rng.choice(UNSEEN_BACKGROUNDS))
    elif split == "test_sketch":
        background = "plain"
    else:
        background = str(rng.choice(SEEN_BACKGROUNDS))
        # A stream of its own: the cue changes the background and nothing else of the scene.
        if cfg.spurious and split in CUE_SPLITS and split_rng(cfg.seed, split, index, 2).random() < cfg.spurious:
            background = world.cue_background(objects[0].shape)
    c1 = _grey(rng, 80, 175)
    # The second tone is a visible but gentle step away from the first, never near an object colour.
    step = rng.uniform(25, 50) * (1 if sum(c1) / 3 < 128 else -1)
    c2 = tuple(int(np.clip(v + step, 60, 195)) for v in c1)
    bg_params = (
        float(rng.uniform(0.09, 0.2)),  # period, fraction of the side
        float(rng.uniform(0, 360)),  # angle (gradient) / orientation choice (stripes)
        float(rng.uniform(0, 1)),  # phase x
        float(rng.uniform(0, 1)),  # phase y
    )
    noise = float(rng.uniform(30, 45)) if split == "test_noise" else float(rng.uniform(0, 5))
    return Scene(
        split=split,
        index=index,
        objects=objects,
        background=background,
        bg_colours=(c1, c2),  # type: ignore[arg-type]
        bg_params=bg_params,
        style="outline" if split == "test_sketch" else "fill",
        noise=noise,
        render_seed=int(rng.integers(2**31)),
    )
