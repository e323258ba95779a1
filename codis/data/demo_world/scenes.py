"""Scenes of the demo world: what they hold, how they are drawn at random, and how they are rendered.

A scene is one to four coloured shapes in distinct cells of a 3x3 grid on one of a small shared set
of background presets (so image statistics do not identify a caption). :class:`World` draws scenes
that no earlier image of the run has shown, renders them and remembers them for ``meta/scenes.json``.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from codis.data.demo_world.config import DemoWorldConfig
from codis.files import atomic_write_bytes

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
    "yellow": (245, 220, 30), "purple": (130, 40, 170), "orange": (250, 140, 20),
    "white": (245, 245, 245), "black": (15, 15, 15), "gray": (130, 130, 130),
}
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")

# Radius as a fraction of the image side; scenes live on a 3x3 grid of cells (1/3 of the side each)
# so that left/right/above/below between two objects is never ambiguous.
_RADIUS = {"small": 0.105, "large": 0.145}
_MARGIN = 0.012
_BACKGROUND_PRESETS = 48
_BACKGROUND_KINDS = ("solid", "gradient", "stripes", "checker", "noise")
# Minimum RGB distance between an object colour and every colour of its background, so shapes stay
# visible; the contrasting outline drawn round each shape covers the cases where no preset fits.
_MIN_CONTRAST = 80.0


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    row: int  # grid cell, 0 = top
    col: int  # grid cell, 0 = left
    x: float  # centre, fraction of the image side
    y: float

    def to_json(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "size": self.size, "row": self.row,
                "col": self.col, "x": self.x, "y": self.y}


@dataclass(frozen=True)
class Scene:
    background: int  # preset index
    objects: tuple[SceneObject, ...]

    def key(self) -> tuple:
        return (self.background, self.objects)


@dataclass(frozen=True)
class _Background:
    kind: str
    colors: tuple[tuple[int, int, int], tuple[int, int, int]]
    axis: int  # 0 horizontal, 1 vertical, 2 diagonal
    period: float  # stripes / checker period, fraction of the side
    seed: int


# ---- what a scene shows ---------------------------------------------------------------------------

def holds(a: SceneObject, relation: str, b: SceneObject) -> bool:
    """Whether ``a`` is ``relation`` ``b`` (grid cells, so never ambiguous)."""
    return {"left": a.col < b.col, "right": a.col > b.col,
            "above": a.row < b.row, "below": a.row > b.row}[relation]


def _matches(obj: SceneObject, color: str | None, shape: str | None, size: str | None = None) -> bool:
    return ((color is None or obj.color == color) and (shape is None or obj.shape == shape)
            and (size is None or obj.size == size))


def count_objects(scene: Scene, color: str | None = None, shape: str | None = None,
                  size: str | None = None) -> int:
    """How many objects of the scene have the given colour, shape and size (None: any)."""
    return sum(_matches(o, color, shape, size) for o in scene.objects)


def relation_exists(scene: Scene, first: tuple, relation: str, second: tuple) -> bool:
    """Some object matching ``first`` (color, shape) is ``relation`` some object matching ``second``."""
    return any(_matches(a, *first) and _matches(b, *second) and holds(a, relation, b)
               for a in scene.objects for b in scene.objects if a is not b)


def relation_triples(scene: Scene) -> list[tuple[SceneObject, str, SceneObject]]:
    """Every (a, relation, b) that holds between two objects of the scene."""
    return [(a, rel, b) for a in scene.objects for b in scene.objects if a is not b
            for rel in RELATIONS if holds(a, rel, b)]


# ---- backgrounds and drawing ----------------------------------------------------------------------

def _make_backgrounds(seed: int) -> list[_Background]:
    rng = random.Random(f"{seed}:backgrounds")
    presets = []
    for index in range(_BACKGROUND_PRESETS):
        kind = _BACKGROUND_KINDS[index % len(_BACKGROUND_KINDS)]
        first = tuple(rng.randrange(256) for _ in range(3))
        if kind == "solid":
            second = first
        else:  # a second colour 30-80 away: textured, but not a second "object colour"
            direction = [rng.gauss(0.0, 1.0) for _ in range(3)]
            norm = math.sqrt(sum(d * d for d in direction)) or 1.0
            step = rng.uniform(30.0, 80.0)
            second = tuple(int(min(255, max(0, c + step * d / norm))) for c, d in zip(first, direction))
        presets.append(_Background(kind=kind, colors=(first, second), axis=rng.randrange(3),
                                   period=rng.uniform(0.06, 0.2), seed=rng.getrandbits(32)))
    return presets


def _segment_distance(point: Sequence[float], a: Sequence[float], b: Sequence[float]) -> float:
    """Distance from ``point`` to the RGB segment a-b (every pixel of a preset lies on it)."""
    p, a, b = (np.asarray(v, dtype=np.float64) for v in (point, a, b))
    ab = b - a
    denominator = float(ab @ ab)
    t = 0.0 if denominator == 0.0 else float(np.clip((p - a) @ ab / denominator, 0.0, 1.0))
    return float(np.linalg.norm(p - (a + t * ab)))


def _background_array(background: _Background, side: int) -> np.ndarray:
    first, second = (np.asarray(c, dtype=np.float32) for c in background.colors)
    coords = (np.arange(side, dtype=np.float32) + 0.5) / side
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    along = (xx, yy, (xx + yy) / 2.0)[background.axis]
    if background.kind == "solid":
        t = np.zeros((side, side), np.float32)
    elif background.kind == "gradient":
        t = along
    elif background.kind == "stripes":
        t = (np.floor(along / background.period) % 2).astype(np.float32)
    elif background.kind == "checker":
        t = ((np.floor(xx / background.period) + np.floor(yy / background.period)) % 2).astype(np.float32)
    else:  # smooth blotches plus fine grain
        rng = np.random.default_rng(background.seed)
        coarse = Image.fromarray((rng.random((6, 6)) * 255).astype(np.uint8))
        t = np.asarray(coarse.resize((side, side), Image.BILINEAR), np.float32) / 255.0
        t = np.clip(t + rng.normal(0.0, 0.06, (side, side)).astype(np.float32), 0.0, 1.0)
    pixels = first * (1.0 - t[..., None]) + second * t[..., None]
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring(radii: Sequence[float], start_deg: float) -> list[tuple[float, float]]:
        n = len(radii)
        return [(cx + rad * math.cos(math.radians(start_deg + 360.0 * i / n)),
                 cy + rad * math.sin(math.radians(start_deg + 360.0 * i / n))) for i, rad in enumerate(radii)]

    if shape == "square":
        h = 0.8 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # lowered a little so the triangle's centre of mass sits on the cell centre
        return [(x, y + 0.15 * r) for x, y in ring([r] * 3, -90.0)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.68 * r, cy), (cx, cy + r), (cx - 0.68 * r, cy)]
    if shape == "star":
        return ring([r, 0.45 * r] * 5, -90.0)
    if shape == "hexagon":
        return ring([r] * 6, 0.0)
    if shape == "cross":
        t, a = 0.33 * r, 0.95 * r
        return [(cx - t, cy - a), (cx + t, cy - a), (cx + t, cy - t), (cx + a, cy - t),
                (cx + a, cy + t), (cx + t, cy + t), (cx + t, cy + a), (cx - t, cy + a),
                (cx - t, cy + t), (cx - a, cy + t), (cx - a, cy - t), (cx - t, cy - t)]
    raise ValueError(f"unknown shape {shape!r}")


def _outline(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """A contrasting edge colour that depends on the fill only (so it carries no other signal)."""
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    if luminance > 110:
        return tuple(int(c * 0.35) for c in rgb)
    return tuple(int(c * 0.4 + 150) for c in rgb)


# ---- the world being generated --------------------------------------------------------------------

class World:
    """Draws unique scenes and renders them under ``root``; holds the per-run state (background
    presets, the scenes seen so far, each saved image's scene spec)."""

    def __init__(self, root: Path, config: DemoWorldConfig, bar: tqdm) -> None:
        self.root, self.config, self.bar = root, config, bar
        self.backgrounds = _make_backgrounds(config.seed)
        # Supersample small images so edges are antialiased after the box-filter reduction.
        self.scale = 4 if config.image_size <= 64 else 2
        self._canvases: dict[int, Image.Image] = {}
        self._compatible = [
            frozenset(c for c, rgb in COLORS.items()
                      if _segment_distance(rgb, *bg.colors) >= _MIN_CONTRAST)
            for bg in self.backgrounds]
        self.seen: set[tuple] = set()
        self.scenes: dict[str, dict[str, Any]] = {}

    def rng(self, *parts: Any) -> random.Random:
        """A generator of its own for each part of the world, so one split's size never changes
        another split's scenes."""
        return random.Random(":".join(str(p) for p in (self.config.seed, *parts)))

    # ---- sampling

    def sample(self, rng: random.Random, *, p_repeat: float = 0.3, inject: Sequence[tuple] = (),
               p_inject: float = 0.0, focus_shape: str | None = None, p_focus: float = 0.0) -> Scene:
        """A scene of 1-4 objects in distinct grid cells on a compatible background preset.

        ``inject``: (color, shape) pairs each placed with probability ``p_inject``; ``focus_shape``
        is picked for each other object with probability ``p_focus``; ``p_repeat`` copies an earlier
        object's shape (and often colour), so counts like "two red circles" occur.
        """
        n = rng.choices((1, 2, 3, 4), weights=(2, 3, 3, 2))[0]
        attributes: list[tuple[str, str]] = [pair for pair in inject if rng.random() < p_inject][:4]
        n = max(n, len(attributes))
        while len(attributes) < n:
            if attributes and rng.random() < p_repeat:
                color, shape = rng.choice(attributes)
                if rng.random() < 0.4:
                    color = rng.choice(tuple(COLORS))
            else:
                color = rng.choice(tuple(COLORS))
                shape = focus_shape if focus_shape and rng.random() < p_focus else rng.choice(SHAPES)
            attributes.append((color, shape))
        rng.shuffle(attributes)
        cells = sorted(rng.sample(range(9), n))
        objects = []
        for (color, shape), cell in zip(attributes, cells):
            size = rng.choice(SIZES)
            jitter = 1.0 / 6.0 - _RADIUS[size] - _MARGIN
            row, col = divmod(cell, 3)
            objects.append(SceneObject(shape=shape, color=color, size=size, row=row, col=col,
                                       x=round((col + 0.5) / 3.0 + rng.uniform(-jitter, jitter), 3),
                                       y=round((row + 0.5) / 3.0 + rng.uniform(-jitter, jitter), 3)))
        colors = {o.color for o in objects}
        fitting = [i for i, ok in enumerate(self._compatible) if colors <= ok]
        if not fitting:  # keep the preset with the best worst-case contrast
            best = max(min(_segment_distance(COLORS[c], *bg.colors) for c in colors)
                       for bg in self.backgrounds)
            fitting = [i for i, bg in enumerate(self.backgrounds)
                       if min(_segment_distance(COLORS[c], *bg.colors) for c in colors) == best]
        return Scene(background=rng.choice(fitting), objects=tuple(objects))

    def unique(self, scene: Scene) -> bool:
        return scene.key() not in self.seen

    def new_scene(self, rng: random.Random, **kwargs: Any) -> Scene:
        """A scene no saved image shows (``kwargs``: :meth:`sample`'s)."""
        for _ in range(1000):
            scene = self.sample(rng, **kwargs)
            if self.unique(scene):
                return scene
        raise RuntimeError("could not draw a new scene; the world is too small for these counts")

    # ---- rendering

    def _canvas(self, preset: int) -> Image.Image:
        if preset not in self._canvases:
            side = self.config.image_size * self.scale
            self._canvases[preset] = Image.fromarray(_background_array(self.backgrounds[preset], side))
        return self._canvases[preset]

    def render(self, scene: Scene) -> Image.Image:
        side = self.config.image_size * self.scale
        image = self._canvas(scene.background).copy()
        draw = ImageDraw.Draw(image)
        edge = max(1, self.scale * self.config.image_size // 64)
        for obj in scene.objects:
            cx, cy, r = obj.x * side, obj.y * side, _RADIUS[obj.size] * side
            fill = COLORS[obj.color]
            if obj.shape == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=_outline(fill), width=edge)
            else:
                draw.polygon(_shape_polygon(obj.shape, cx, cy, r), fill=fill, outline=_outline(fill),
                             width=edge)
        return image.reduce(self.scale) if self.scale > 1 else image

    def save(self, scene: Scene, relative: str) -> str:
        """Render, write atomically, and remember the scene (so no later image repeats it)."""
        buffer = io.BytesIO()
        self.render(scene).save(buffer, format="JPEG", quality=self.config.jpeg_quality, subsampling=0)
        atomic_write_bytes(self.root / relative, buffer.getvalue())
        self.seen.add(scene.key())
        self.scenes[relative] = {"background": {"preset": scene.background,
                                                "kind": self.backgrounds[scene.background].kind},
                                 "objects": [o.to_json() for o in scene.objects]}
        self.bar.update(1)
        return relative
