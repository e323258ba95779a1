"""A seeded synthetic "demo world" written in the annotation formats of the ALBEF release.

No real image-text corpus can be downloaded where the demo runs, so this module renders scenes of
one to four coloured shapes on varied backgrounds and writes, for those scenes, the files that
ALBEF's data code reads: pretraining pairs (and an img2dataset url list), retrieval, VQA, NLVR² and
SNLI-VE annotations, and labelled images (shapes and colours present) for the image encoder's
supervised initialisation, the demo's ImageNet (:mod:`codis.train.vision_init`). The demo then exercises the same download, sharding, loading and evaluation
code as a real run.

The tasks are built so that neither modality alone solves them:

* backgrounds come from a small shared set of presets chosen independently of the captions, so
  many scenes share a background and image statistics do not identify a caption;
* captions name colours, shapes, sizes, counts, positions and spatial relations;
* VQA answers are balanced within each question type, and colours and shapes are exchangeable in
  the scene sampler, so the question text says nothing about its answer;
* NLVR² statement parameters are drawn before the images, which are then drawn until the statement
  has the label asked for, so a statement's words carry no label information; labels are balanced
  within each statement family;
* SNLI-VE neutral hypotheses add a property that an image cannot show ("made of wood") to a claim
  that the image makes true. The same modifiers appear in entailed and contradicted hypotheses
  (whose underlying claim is false, e.g. "there is no red circle made of wood" without any red
  circle), so from text alone each template is 50/50 between two labels.

Everything is a pure function of :class:`DemoWorldConfig`: the same config gives byte-identical
files. Sidecar files under ``meta/`` (scene specs and VQA question types) are for tests and
debugging; the ALBEF-format files do not need them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw
from tqdm import tqdm

from codis.config import ConfigError
from codis.files import atomic_write_bytes, sha256_bytes

__all__ = [
    "COLORS", "GENERATOR_VERSION", "NLVR_LABELS", "RELATIONS", "SHAPES", "SIZES", "VE_LABELS",
    "VQA_QUESTION_TYPES", "DemoWorldConfig", "generate_demo_world",
]

GENERATOR_VERSION = "2"

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
    "yellow": (245, 220, 30), "purple": (130, 40, 170), "orange": (250, 140, 20),
    "white": (245, 245, 245), "black": (15, 15, 15), "gray": (130, 130, 130),
}
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
VQA_QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "exist", "relation")
NLVR_LABELS: tuple[str, ...] = ("True", "False")
VE_LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")

# Radius as a fraction of the image side; scenes live on a 3x3 grid of cells (1/3 of the side each)
# so that left/right/above/below between two objects is never ambiguous.
_RADIUS = {"small": 0.105, "large": 0.145}
_MARGIN = 0.012
_BACKGROUND_PRESETS = 48
_BACKGROUND_KINDS = ("solid", "gradient", "stripes", "checker", "noise")
# Minimum RGB distance between an object colour and every colour of its background, so shapes stay
# visible; the contrasting outline drawn round each shape covers the cases where no preset fits.
_MIN_CONTRAST = 80.0
_NON_IMAGE_TEXT = b"this is not an image, it is a text file that the download stage must reject\n"

# Words. Synonyms make captions and answers vary in wording, not in meaning.
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_COLOR_WORDS = {c: (c,) for c in COLORS} | {"gray": ("gray", "grey")}
_REL_WORDS = {
    "left": ("left of", "to the left of", "on the left of"),
    "right": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four")
_NEUTRAL_MODIFIERS = ("made of wood", "made of paper", "made of metal", "made of glass",
                      "made of stone", "drawn by a child", "drawn by hand")

_VQA_ANSWERS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS), "shape": SHAPES, "count": ("0", "1", "2", "3", "4"),
    "exist": ("yes", "no"), "relation": SHAPES,
}
_ANSWER_SYNONYMS: dict[str, tuple[str, ...]] = {
    "gray": ("grey",), "0": ("zero", "none"), "1": ("one",), "2": ("two",), "3": ("three",),
    "4": ("four",), "cross": ("plus",), "yes": ("yeah",),
}
_ANNOTATORS = 10


def _default_splits(train: int, val: int, test: int, val_name: str = "val") -> Callable[[], dict[str, int]]:
    return lambda: {"train": train, val_name: val, "test": test}


@dataclass(frozen=True)
class DemoWorldConfig:
    """Sizes of the demo world. Split dicts map split names to image (NLVR²: pair) counts.

    ``dead_urls`` url rows point to missing files and ``non_image_urls`` rows to a text file named
    ``.jpg``, so the download stage's failure handling runs. ``jpeg_quality`` is fixed so files are
    byte-identical between runs.
    """

    seed: int = 0
    image_size: int = 64
    pretrain_images: int = 2000
    captions_per_pretrain_image: int = 2
    retrieval_images: dict[str, int] = field(default_factory=_default_splits(500, 100, 100), hash=False)
    vqa_images: dict[str, int] = field(default_factory=_default_splits(300, 100, 100), hash=False)
    questions_per_image: int = 3
    nlvr_pairs: dict[str, int] = field(default_factory=_default_splits(500, 100, 100, "dev"), hash=False)
    ve_images: dict[str, int] = field(default_factory=_default_splits(300, 100, 100, "dev"), hash=False)
    hypotheses_per_image: int = 3
    # Labelled images for the image encoder's supervised initialisation (codis.train.vision_init), the
    # demo's stand-in for ImageNet: which shapes and which colours each scene holds.
    classification_images: dict[str, int] = field(
        default_factory=lambda: {"train": 300, "val": 100}, hash=False)
    dead_urls: int = 3
    non_image_urls: int = 2
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        _int_field(self, "seed", 0, 2**63 - 1)
        _int_field(self, "image_size", 32, 1024)
        _int_field(self, "pretrain_images", 1, 10**6)
        _int_field(self, "captions_per_pretrain_image", 1, 5)
        _int_field(self, "questions_per_image", 1, 5)
        _int_field(self, "hypotheses_per_image", 1, 6)
        _int_field(self, "dead_urls", 0, 1000)
        _int_field(self, "non_image_urls", 0, 1000)
        _int_field(self, "jpeg_quality", 1, 95)
        for name, splits in (("retrieval_images", ("train", "val", "test")),
                             ("vqa_images", ("train", "val", "test")),
                             ("nlvr_pairs", ("train", "dev", "test")),
                             ("ve_images", ("train", "dev", "test")),
                             ("classification_images", ("train", "val"))):
            value = getattr(self, name)
            if not isinstance(value, Mapping) or set(value) != set(splits):
                raise ConfigError(f"demo_world.{name}: must map exactly {', '.join(splits)} to counts, "
                                  f"got {value!r}")
            for split in splits:
                count = value[split]
                if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 10**6:
                    raise ConfigError(f"demo_world.{name}[{split!r}]: must be an integer in "
                                      f"[1, 1000000], got {count!r}")
            # A private copy in split order: the caller's dict may change later.
            object.__setattr__(self, name, {split: value[split] for split in splits})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _int_field(config: DemoWorldConfig, name: str, low: int, high: int) -> None:
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"demo_world.{name}: must be an integer in [{low}, {high}], got {value!r}")


# --------------------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class _Obj:
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
class _Scene:
    background: int  # preset index
    objects: tuple[_Obj, ...]

    def key(self) -> tuple:
        return (self.background, self.objects)


@dataclass(frozen=True)
class _Background:
    kind: str
    colors: tuple[tuple[int, int, int], tuple[int, int, int]]
    axis: int  # 0 horizontal, 1 vertical, 2 diagonal
    period: float  # stripes / checker period, fraction of the side
    seed: int


def _holds(a: _Obj, relation: str, b: _Obj) -> bool:
    """Whether ``a`` is ``relation`` ``b`` (grid cells, so never ambiguous)."""
    return {"left": a.col < b.col, "right": a.col > b.col,
            "above": a.row < b.row, "below": a.row > b.row}[relation]


def _matches(obj: _Obj, color: str | None, shape: str | None, size: str | None = None) -> bool:
    return ((color is None or obj.color == color) and (shape is None or obj.shape == shape)
            and (size is None or obj.size == size))


def _count(scene: _Scene, color: str | None = None, shape: str | None = None,
           size: str | None = None) -> int:
    return sum(_matches(o, color, shape, size) for o in scene.objects)


def _relation_exists(scene: _Scene, first: tuple, relation: str, second: tuple) -> bool:
    """Some object matching ``first`` (color, shape) is ``relation`` some object matching ``second``."""
    return any(_matches(a, *first) and _matches(b, *second) and _holds(a, relation, b)
               for a in scene.objects for b in scene.objects if a is not b)


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


# ------------------------------------------------------------------------------------- language


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _words(rng: random.Random, color: str | None, shape: str, size: str | None = None,
           count: int = 1) -> str:
    """``[size] [color] shape(s)`` with synonyms, no determiner."""
    parts = []
    if size is not None:
        parts.append(rng.choice(_SIZE_WORDS[size]))
    if color is not None:
        parts.append(rng.choice(_COLOR_WORDS[color]))
    parts.append(shape if count == 1 else _plural(shape))
    return " ".join(parts)


def _np(rng: random.Random, color: str | None, shape: str, size: str | None = None,
        count: int = 1) -> str:
    """A noun phrase: ``a red circle``, ``two large blue stars``."""
    words = _words(rng, color, shape, size, count)
    return f"{_article(words)} {words}" if count == 1 else f"{_NUMBER_WORDS[count]} {words}"


def _join(rng: random.Random, phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    head = phrases[0]
    for phrase in phrases[1:-1]:
        head += rng.choice((" and ", " with ")) + phrase
    return f"{head} and {phrases[-1]}"


def _position_words(rng: random.Random, obj: _Obj) -> str:
    if (obj.row, obj.col) == (1, 1):
        return rng.choice(("in the center", "in the middle"))
    if obj.col == 1:
        return "at the top" if obj.row == 0 else "at the bottom"
    if obj.row == 1:
        return "on the left" if obj.col == 0 else "on the right"
    corner = f"{'top' if obj.row == 0 else 'bottom'} {'left' if obj.col == 0 else 'right'}"
    return rng.choice((f"in the {corner} corner", f"in the {corner}"))


def _groups(scene: _Scene) -> list[list[_Obj]]:
    """Objects grouped by (color, shape), in order of first appearance."""
    groups: dict[tuple[str, str], list[_Obj]] = {}
    for obj in scene.objects:
        groups.setdefault((obj.color, obj.shape), []).append(obj)
    return list(groups.values())


def _group_phrase(rng: random.Random, group: list[_Obj]) -> str:
    sizes = {o.size for o in group}
    size = group[0].size if len(sizes) == 1 and rng.random() < 0.4 else None
    return _np(rng, group[0].color, group[0].shape, size, len(group))


def _relation_triples(scene: _Scene) -> list[tuple[_Obj, str, _Obj]]:
    return [(a, rel, b) for a in scene.objects for b in scene.objects if a is not b
            for rel in RELATIONS if _holds(a, rel, b)]


def _caption(rng: random.Random, scene: _Scene) -> str:
    """One true description of the scene, in one of four families of wordings."""
    n = len(scene.objects)
    family = rng.choices(("list", "relation", "position", "count"),
                         weights=(0.35, 0.3 if n > 1 else 0.0, 0.2, 0.15))[0]
    if family == "list":
        groups = _groups(scene)
        rng.shuffle(groups)
        body = _join(rng, [_group_phrase(rng, g) for g in groups])
        prefix = rng.choice(("", "a picture of ", "an image of ", "a photo of ", "the image shows ",
                             "this picture shows ", "there are " if len(groups[0]) > 1 else "there is "))
        return prefix + body
    if family == "relation":
        a, rel, b = rng.choice(_relation_triples(scene))
        first = _np(rng, a.color, a.shape, a.size if rng.random() < 0.3 else None)
        second = _np(rng, b.color, b.shape, b.size if rng.random() < 0.3 else None)
        prefix = rng.choice(("", "there is ", "the picture shows ", "an image of ", "a photo of "))
        tail = f" in a picture with {_NUMBER_WORDS[n]} shapes" if n >= 3 and rng.random() < 0.3 else ""
        return f"{prefix}{first} {rng.choice(_REL_WORDS[rel])} {second}{tail}"
    if family == "position":
        chosen = rng.sample(scene.objects, min(n, rng.choice((1, 2))))
        parts = [f"{_np(rng, o.color, o.shape, o.size if rng.random() < 0.3 else None)} "
                 f"{_position_words(rng, o)}" for o in chosen]
        prefix = rng.choice(("", "there is ", "the image shows ", "a picture with "))
        return prefix + " and ".join(parts)
    if n == 1:
        obj = scene.objects[0]
        words = _words(rng, obj.color, obj.shape, obj.size if rng.random() < 0.4 else None)
        return rng.choice(("a single ", "only one ", "just one ")) + words
    groups = _groups(scene)
    chosen = rng.sample(groups, min(len(groups), rng.choice((1, 2))))
    prefix = rng.choice(("", "a picture with ", "an image with ", "there are "))
    return (f"{prefix}{_NUMBER_WORDS[n]} shapes including "
            f"{_join(rng, [_group_phrase(rng, g) for g in chosen])}")


def _captions(rng: random.Random, scene: _Scene, count: int) -> list[str]:
    """``count`` distinct captions of the scene."""
    captions: list[str] = []
    for _ in range(500):
        caption = _caption(rng, scene)
        if caption not in captions:
            captions.append(caption)
            if len(captions) == count:
                return captions
    raise RuntimeError(f"could not word {count} distinct captions for scene {scene}")


# ------------------------------------------------------------------------------------------ VQA


def _exist_key_is_near_miss(scene: _Scene, key: tuple) -> bool:
    _, color, shape = key
    return _count(scene, color=color) > 0 or _count(scene, shape=shape) > 0


def _vqa_candidates(scene: _Scene) -> dict[str, list[tuple[tuple, str]]]:
    """Every askable question (as a key) with its answer, by question type."""
    candidates: dict[str, list[tuple[tuple, str]]] = {t: [] for t in VQA_QUESTION_TYPES}
    for shape in SHAPES:
        found = [o for o in scene.objects if o.shape == shape]
        if len(found) == 1:
            candidates["color"].append((("color", shape), found[0].color))
        candidates["count"].append((("count", shape), str(len(found))))
    for color in COLORS:
        found = [o for o in scene.objects if o.color == color]
        if len(found) == 1:
            candidates["shape"].append((("shape", color), found[0].shape))
        for shape in SHAPES:
            answer = "yes" if _count(scene, color, shape) else "no"
            candidates["exist"].append((("exist", color, shape), answer))
    for ref in scene.objects:
        if _count(scene, ref.color, ref.shape) != 1:
            continue  # "the red circle" must name one object
        for rel in RELATIONS:
            targets = [o for o in scene.objects if o is not ref and _holds(o, rel, ref)]
            if len(targets) == 1:
                candidates["relation"].append((("relation", rel, ref.color, ref.shape), targets[0].shape))
    return candidates


def _question_text(rng: random.Random, key: tuple) -> str:
    kind = key[0]
    if kind == "color":
        return rng.choice(("what color is the {s}", "what is the color of the {s}",
                           "which color is the {s}")).format(s=key[1])
    if kind == "shape":
        return rng.choice(("what shape is the {c} object", "what is the shape of the {c} object",
                           "what shape is the {c} thing")).format(c=rng.choice(_COLOR_WORDS[key[1]]))
    if kind == "count":
        return rng.choice(("how many {p} are there", "how many {p} are in the picture",
                           "how many {p} can you see")).format(p=_plural(key[1]))
    if kind == "exist":
        words = _words(rng, key[1], key[2])
        return rng.choice(("is there {a} {w}", "is there {a} {w} in the image",
                           "does the picture show {a} {w}")).format(a=_article(words), w=words)
    _, rel, color, shape = key
    return "{q} {r} the {w}".format(q=rng.choice(("what is", "what shape is", "which shape is")),
                                    r=rng.choice(_REL_WORDS[rel]), w=_words(rng, color, shape))


def _annotator_answers(rng: random.Random, answer: str, question_type: str) -> list[str]:
    """Ten answers: mostly right, some synonyms and some mistakes, as in VQA v2."""
    reliability = rng.choices((0.92, 0.75, 0.5), weights=(7, 2, 1))[0]
    wrong = [a for a in _VQA_ANSWERS[question_type] if a != answer]
    answers = []
    for _ in range(_ANNOTATORS):
        if rng.random() < reliability:
            answers.append(answer)
        elif answer in _ANSWER_SYNONYMS and rng.random() < 0.5:
            answers.append(rng.choice(_ANSWER_SYNONYMS[answer]))
        else:
            answers.append(rng.choice(wrong))
    return answers


def _answer_list() -> list[str]:
    answers: list[str] = []
    for question_type in VQA_QUESTION_TYPES:
        for answer in _VQA_ANSWERS[question_type]:
            for candidate in (answer, *_ANSWER_SYNONYMS.get(answer, ())):
                if candidate not in answers:
                    answers.append(candidate)
    return answers


def _least_used(rng: random.Random, tally: Counter, answers: Iterable[str]) -> str:
    answers = sorted(set(answers))
    fewest = min(tally[a] for a in answers)
    return rng.choice([a for a in answers if tally[a] == fewest])


# ---------------------------------------------------------------------------------------- NLVR²

_NLVR_FAMILIES = ("total", "side_only", "both", "exactly_one", "more", "relation")


def _nlvr_params(rng: random.Random, family: str) -> dict[str, Any]:
    params: dict[str, Any] = {"color": rng.choice(tuple(COLORS)), "shape": rng.choice(SHAPES)}
    if family == "total":
        params["n"] = rng.choice((2, 3, 4))
    if family in ("side_only", "more"):
        params["side"] = rng.choice(("left", "right"))
    if family == "exactly_one":
        params["attribute"] = rng.choice(("color", "shape"))
    if family == "relation":
        params["relation"] = rng.choice(RELATIONS)
        params["color2"], params["shape2"] = rng.choice(tuple(COLORS)), rng.choice(SHAPES)
    return params


def _nlvr_truth(family: str, p: dict[str, Any], left: _Scene, right: _Scene) -> bool:
    has = lambda scene: _count(scene, p["color"], p["shape"]) > 0  # noqa: E731
    if family == "total":
        return _count(left, shape=p["shape"]) + _count(right, shape=p["shape"]) == p["n"]
    if family == "side_only":
        this, other = (left, right) if p["side"] == "left" else (right, left)
        return has(this) and not has(other)
    if family == "both":
        return has(left) and has(right)
    if family == "exactly_one":
        attr = {"color": p["color"]} if p["attribute"] == "color" else {"shape": p["shape"]}
        return (_count(left, **attr) > 0) != (_count(right, **attr) > 0)
    if family == "more":
        this, other = (left, right) if p["side"] == "left" else (right, left)
        return len(this.objects) > len(other.objects)
    first, second = (p["color"], p["shape"]), (p["color2"], p["shape2"])
    return any(_relation_exists(s, first, p["relation"], second) for s in (left, right))


def _nlvr_sentence(rng: random.Random, family: str, p: dict[str, Any]) -> str:
    thing = _np(rng, p["color"], p["shape"])
    side = p.get("side", "left")
    other = "right" if side == "left" else "left"
    if family == "total":
        plural = _plural(p["shape"])
        n = _NUMBER_WORDS[p["n"]]
        return rng.choice((f"there are {n} {plural} in total",
                           f"the two images have {n} {plural} in total",
                           f"there are exactly {n} {plural} in the two images"))
    if family == "side_only":
        return rng.choice((f"the {side} image contains {thing} and the {other} image does not",
                           f"there is {thing} in the {side} image but not in the {other} image"))
    if family == "both":
        return rng.choice((f"both images contain {thing}", f"each image contains {thing}",
                           f"there is {thing} in each image"))
    if family == "exactly_one":
        if p["attribute"] == "color":
            words = f"{rng.choice(_COLOR_WORDS[p['color']])} object"
        else:
            words = p["shape"]
        target = f"{_article(words)} {words}"
        return rng.choice((f"exactly one image contains {target}",
                           f"only one of the images contains {target}"))
    if family == "more":
        return rng.choice((f"the {side} image contains more shapes than the {other} image",
                           f"there are more shapes in the {side} image than in the {other} image"))
    second = _np(rng, p["color2"], p["shape2"])
    rel = rng.choice(_REL_WORDS[p["relation"]])
    return rng.choice((f"in at least one image {thing} is {rel} {second}",
                       f"one of the images shows {thing} {rel} {second}"))


# -------------------------------------------------------------------------------------- SNLI-VE

# (polarity, modifier, claim truth) -> label. A modifier the image cannot show makes a true claim
# undecidable (neutral); a false claim stays false (or its negation true) whatever the modifier.
_VE_LABEL = {
    ("pos", False, True): "entailment", ("pos", False, False): "contradiction",
    ("neg", False, True): "contradiction", ("neg", False, False): "entailment",
    ("pos", True, True): "neutral", ("pos", True, False): "contradiction",
    ("neg", True, True): "neutral", ("neg", True, False): "entailment",
}
# Patterns per label, weighted so that each (polarity, modifier) template is 50/50 between its two
# possible labels: text alone cannot tell more than which label is impossible.
_VE_PATTERNS = {
    "neutral": ((("pos", True, True), ("neg", True, True)), (1, 1)),
    "entailment": ((("neg", True, False), ("pos", False, True), ("neg", False, False)), (2, 1, 1)),
    "contradiction": ((("pos", True, False), ("pos", False, False), ("neg", False, True)), (2, 1, 1)),
}


def _ve_claim(rng: random.Random, scene: _Scene, truth: bool) -> tuple | None:
    """An existence or relation claim about the scene with the given truth value, or None."""
    if len(scene.objects) > 1 and rng.random() < 0.35:
        triples = _relation_triples(scene)
        if truth:
            a, rel, b = rng.choice(triples)
            return ("relation", (a.color, a.shape), rel, (b.color, b.shape))
        pairs = [(a, b) for a in scene.objects for b in scene.objects if a is not b]
        a, b = rng.choice(pairs)
        false_rels = [r for r in RELATIONS
                      if not _relation_exists(scene, (a.color, a.shape), r, (b.color, b.shape))]
        if false_rels:
            return ("relation", (a.color, a.shape), rng.choice(false_rels), (b.color, b.shape))
    obj = rng.choice(scene.objects)
    with_size = rng.random() < 0.3
    if truth:
        return ("exist", (obj.size if with_size else None, obj.color, obj.shape))
    for _ in range(100):  # a near miss: change one attribute of a present object
        size, color, shape = obj.size if with_size else None, obj.color, obj.shape
        change = rng.choice(("color", "shape", "size") if with_size else ("color", "shape"))
        if change == "color":
            color = rng.choice([c for c in COLORS if c != color])
        elif change == "shape":
            shape = rng.choice([s for s in SHAPES if s != shape])
        else:
            size = "small" if size == "large" else "large"
        if _count(scene, color, shape, size) == 0:
            return ("exist", (size, color, shape))
    return None


def _ve_sentence(rng: random.Random, claim: tuple, polarity: str, modifier: str | None) -> str:
    mod = f" {modifier}" if modifier else ""
    if claim[0] == "exist":
        size, color, shape = claim[1]
        words = _words(rng, color, shape, size)
        article = _article(words)
        if polarity == "pos":
            return rng.choice((f"there is {article} {words}{mod}", f"the image shows {article} {words}{mod}",
                               f"the picture contains {article} {words}{mod}"))
        return rng.choice((f"there is no {words}{mod}", f"the image does not show {article} {words}{mod}",
                           f"the picture contains no {words}{mod}"))
    _, (c1, s1), rel, (c2, s2) = claim
    first, second = _words(rng, c1, s1), _np(rng, c2, s2)
    rel_words = rng.choice(_REL_WORDS[rel])
    if polarity == "pos":
        return rng.choice((f"{_article(first)} {first}{mod} is {rel_words} {second}",
                           f"there is {_article(first)} {first}{mod} {rel_words} {second}"))
    return rng.choice((f"no {first}{mod} is {rel_words} {second}",
                       f"there is no {first}{mod} {rel_words} {second}"))


# ------------------------------------------------------------------------------------ generator


def _json_bytes(rows: Any) -> bytes:
    return json.dumps(rows, ensure_ascii=True).encode("ascii")


def _balanced(rng: random.Random, items: Sequence[Any], n: int) -> list[Any]:
    """``n`` items cycling through ``items`` (so counts differ by at most one), shuffled."""
    out = [items[i % len(items)] for i in range(n)]
    rng.shuffle(out)
    return out


class _World:
    """Samples unique scenes and renders them; holds the per-run state (presets, seen scenes)."""

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
        return random.Random(":".join(str(p) for p in (self.config.seed, *parts)))

    # ---- sampling

    def sample(self, rng: random.Random, *, p_repeat: float = 0.3, inject: Sequence[tuple] = (),
               p_inject: float = 0.0, focus_shape: str | None = None, p_focus: float = 0.0) -> _Scene:
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
            objects.append(_Obj(shape=shape, color=color, size=size, row=row, col=col,
                                x=round((col + 0.5) / 3.0 + rng.uniform(-jitter, jitter), 3),
                                y=round((row + 0.5) / 3.0 + rng.uniform(-jitter, jitter), 3)))
        colors = {o.color for o in objects}
        fitting = [i for i, ok in enumerate(self._compatible) if colors <= ok]
        if not fitting:  # keep the preset with the best worst-case contrast
            best = max(min(_segment_distance(COLORS[c], *bg.colors) for c in colors)
                       for bg in self.backgrounds)
            fitting = [i for i, bg in enumerate(self.backgrounds)
                       if min(_segment_distance(COLORS[c], *bg.colors) for c in colors) == best]
        return _Scene(background=rng.choice(fitting), objects=tuple(objects))

    def unique(self, scene: _Scene) -> bool:
        return scene.key() not in self.seen

    # ---- rendering

    def _canvas(self, preset: int) -> Image.Image:
        if preset not in self._canvases:
            side = self.config.image_size * self.scale
            self._canvases[preset] = Image.fromarray(_background_array(self.backgrounds[preset], side))
        return self._canvases[preset]

    def render(self, scene: _Scene) -> Image.Image:
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

    def save(self, scene: _Scene, relative: str) -> str:
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

    def new_scene(self, rng: random.Random, **kwargs: Any) -> _Scene:
        for _ in range(1000):
            scene = self.sample(rng, **kwargs)
            if self.unique(scene):
                return scene
        raise RuntimeError("could not draw a new scene; the world is too small for these counts")

    # ---- tasks

    def pretrain(self) -> tuple[list[dict], list[dict]]:
        n, per = self.config.pretrain_images, self.config.captions_per_pretrain_image
        digits = max(6, len(str(n)))
        pairs = []
        for index in range(n):
            rng = self.rng("pretrain", index)
            scene = self.new_scene(rng)
            path = self.save(scene, f"images/pretrain/{index:0{digits}d}.jpg")
            pairs += [{"image": path, "caption": c} for c in _captions(rng, scene, per)]
        rows = [{"url": p["image"], "caption": p["caption"]} for p in pairs]
        rng = self.rng("pretrain", "bad_urls")
        bad = [{"url": f"images/pretrain/missing_{i:06d}.jpg",
                "caption": _caption(rng, self.sample(rng))} for i in range(self.config.dead_urls)]
        if self.config.non_image_urls:
            atomic_write_bytes(self.root / "images/pretrain/not_an_image.jpg", _NON_IMAGE_TEXT)
            bad += [{"url": "images/pretrain/not_an_image.jpg", "caption": _caption(rng, self.sample(rng))}
                    for _ in range(self.config.non_image_urls)]
        # Spread the failures through the list so they land in different download shards.
        for j, row in enumerate(bad):
            rows.insert(round((j + 1) * len(rows) / (len(bad) + 1)), row)
        return pairs, rows

    def classification(self, split: str, n: int) -> list[dict]:
        rows = []
        for index in range(n):
            rng = self.rng("classification", split, index)
            scene = self.new_scene(rng)
            path = self.save(scene, f"images/classification_{split}/{index:06d}.jpg")
            labels = sorted({o.shape for o in scene.objects}) + sorted({o.color for o in scene.objects})
            rows.append({"image": path, "labels": labels})
        return rows

    def retrieval(self, split: str, n: int) -> list[dict]:
        rows = []
        for index in range(n):
            rng = self.rng("retrieval", split, index)
            scene = self.new_scene(rng)
            path = self.save(scene, f"images/retrieval_{split}/{index:06d}.jpg")
            captions = _captions(rng, scene, 5)
            if split == "train":
                rows += [{"image": path, "caption": c, "image_id": index} for c in captions]
            else:
                rows.append({"image": path, "caption": captions})
        return rows

    def vqa(self, split: str, n: int, first_id: int) -> tuple[list[dict], dict[str, str]]:
        per = self.config.questions_per_image
        tallies = {t: Counter() for t in VQA_QUESTION_TYPES}
        rows, types = [], {}
        question_id = first_id
        for index in range(n):
            rng = self.rng("vqa", split, index)
            slots = [VQA_QUESTION_TYPES[(index * per + j) % len(VQA_QUESTION_TYPES)] for j in range(per)]
            # Draw images until each question can take one of its type's least-used answers (the
            # tolerance grows slowly if none fits), so answers stay balanced within every type.
            for attempt in range(4000):
                slack = attempt // 400
                scene = self.sample(rng, p_repeat=0.45)
                candidates = _vqa_candidates(scene)
                if self.unique(scene) and all(
                        any(tallies[t][a] <= min(tallies[t][b] for b in _VQA_ANSWERS[t]) + slack
                            for _, a in candidates[t]) for t in slots):
                    break
            else:
                raise RuntimeError(f"vqa {split} image {index}: no scene allows question types {slots}")
            path = self.save(scene, f"images/vqa_{split}/{index:06d}.jpg")
            for question_type in slots:  # distinct types (at most five slots), so distinct questions
                options = candidates[question_type]
                answer = _least_used(rng, tallies[question_type], [a for _, a in options])
                keys = [k for k, a in options if a == answer]
                if question_type == "exist" and answer == "no":  # prefer near misses to wild guesses
                    near = [k for k in keys if _exist_key_is_near_miss(scene, k)]
                    keys = near if near and rng.random() < 0.7 else keys
                key = rng.choice(keys)
                tallies[question_type][answer] += 1
                row = {"question_id": question_id, "question": _question_text(rng, key)}
                answers = _annotator_answers(rng, answer, question_type)
                if split != "test":
                    row["answer"] = answers
                row.update({"image": path, "dataset": "vqa"})
                rows.append(row)
                types[str(question_id)] = question_type
                question_id += 1
        return rows, types

    def nlvr(self, split: str, n: int) -> list[dict]:
        combos = _balanced(self.rng("nlvr", split, "labels"),
                           [(f, label) for f in _NLVR_FAMILIES for label in (True, False)], n)
        rows = []
        for index, (family, label) in enumerate(combos):
            rng = self.rng("nlvr", split, index)
            found = None
            for _ in range(200):  # parameters first, then images until the label is the one asked
                params = _nlvr_params(rng, family)
                inject = [(params["color"], params["shape"])]
                if family == "relation":
                    inject.append((params["color2"], params["shape2"]))
                for _ in range(100):
                    p = rng.uniform(0.15, 0.85)
                    kwargs: dict[str, Any] = {"inject": inject, "p_inject": p}
                    if family == "total":
                        kwargs = {"focus_shape": params["shape"], "p_focus": p}
                    elif family == "exactly_one" and params["attribute"] == "shape":
                        kwargs = {"focus_shape": params["shape"], "p_focus": p}
                    elif family == "more":
                        kwargs = {}
                    left, right = self.sample(rng, **kwargs), self.sample(rng, **kwargs)
                    if (_nlvr_truth(family, params, left, right) == label and self.unique(left)
                            and self.unique(right) and left.key() != right.key()):
                        found = params, left, right
                        break
                if found:
                    break
            if found is None:
                raise RuntimeError(f"nlvr {split} pair {index}: no images give {family} = {label}")
            params, left, right = found
            images = [self.save(left, f"images/nlvr_{split}/{index:06d}_img0.jpg"),
                      self.save(right, f"images/nlvr_{split}/{index:06d}_img1.jpg")]
            rows.append({"images": images, "sentence": _nlvr_sentence(rng, family, params),
                         "label": "True" if label else "False"})
        return rows

    def ve(self, split: str, n: int) -> list[dict]:
        per = self.config.hypotheses_per_image
        labels = _balanced(self.rng("ve", split, "labels"), VE_LABELS, n * per)
        rows = []
        for index in range(n):
            rng = self.rng("ve", split, index)
            scene = self.new_scene(rng)
            path = self.save(scene, f"images/ve_{split}/{index:06d}.jpg")
            sentences: list[str] = []
            for label in labels[index * per:(index + 1) * per]:
                patterns, weights = _VE_PATTERNS[label]
                for _ in range(200):
                    polarity, modified, truth = rng.choices(patterns, weights=weights)[0]
                    claim = _ve_claim(rng, scene, truth)
                    if claim is None:
                        continue
                    modifier = rng.choice(_NEUTRAL_MODIFIERS) if modified else None
                    sentence = _ve_sentence(rng, claim, polarity, modifier)
                    if sentence not in sentences:
                        break
                else:
                    raise RuntimeError(f"ve {split} image {index}: no distinct {label} hypothesis")
                assert _VE_LABEL[(polarity, modified, truth)] == label
                sentences.append(sentence)
                rows.append({"image": path, "sentence": sentence, "label": label})
        return rows


# ------------------------------------------------------------------------------------ baselines


def _retrieval_chance(n_images: int, per_image: int = 5) -> dict[str, float]:
    """Recall@k of a random ranking, in percent (ALBEF's ``itm_eval`` keys and units)."""
    n_captions = n_images * per_image
    out: dict[str, float] = {}
    for k in (1, 5, 10):
        # text retrieval: some of the image's captions among k drawn from all captions
        miss = math.comb(n_captions - per_image, k) / math.comb(n_captions, k) if k <= n_captions else 0.0
        out[f"txt_r{k}"] = 100.0 * (1.0 - miss)
        out[f"img_r{k}"] = 100.0 * min(1.0, k / n_images)
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in (1, 5, 10)) / 3
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in (1, 5, 10)) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def _vqa_accuracy(guess: str, answers: Sequence[str]) -> float:
    return min(sum(a == guess for a in answers) / 3.0, 1.0)


def _best_constant(rows: Sequence[dict], answer_list: Sequence[str]) -> tuple[str, float]:
    """The single answer with the highest mean VQA accuracy on ``rows`` (ties: first in sort order)."""
    scores = {a: sum(_vqa_accuracy(a, r["answer"]) for r in rows) for a in answer_list}
    best = min(scores, key=lambda a: (-scores[a], a))
    return best, 100.0 * scores[best] / len(rows)


def _vqa_baselines(rows: Sequence[dict], types: Mapping[str, str], answer_list: Sequence[str]) -> dict:
    answer, accuracy = _best_constant(rows, answer_list)
    per_type: dict[str, Any] = {}
    total = 0.0
    for question_type in VQA_QUESTION_TYPES:
        subset = [r for r in rows if types[str(r["question_id"])] == question_type]
        if not subset:
            continue
        guess, score = _best_constant(subset, answer_list)
        per_type[question_type] = {"answer": guess, "accuracy": score, "questions": len(subset)}
        total += score * len(subset)
    return {"split": "val", "questions": len(rows), "majority_answer": answer,
            "majority_accuracy": accuracy, "question_type_prior": per_type,
            "question_type_prior_accuracy": total / len(rows)}


def _majority_label(rows: Sequence[dict]) -> dict[str, Any]:
    counts = Counter(r["label"] for r in rows)
    label = min(counts, key=lambda lab: (-counts[lab], lab))
    return {"majority_label": label, "accuracy": 100.0 * counts[label] / len(rows), "rows": len(rows)}


# ---------------------------------------------------------------------------------------- entry


def generate_demo_world(root: str | Path, config: DemoWorldConfig = DemoWorldConfig(),
                        progress: bool = True) -> dict[str, Any]:
    """Render the demo world under ``root`` and return its manifest (also ``root/manifest.json``).

    Deterministic: the same config writes byte-identical files. ``manifest.json`` is removed first
    and written last, so a folder without it is an incomplete generation. Existing files of the
    layout are overwritten; other files under ``root`` are left alone.
    """
    if not isinstance(config, DemoWorldConfig):
        raise ConfigError(f"demo_world.config: expected a DemoWorldConfig, got {type(config).__name__}")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"demo world root {root} exists and is not a folder")
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").unlink(missing_ok=True)

    total_images = (config.pretrain_images + sum(config.retrieval_images.values())
                    + sum(config.vqa_images.values()) + 2 * sum(config.nlvr_pairs.values())
                    + sum(config.ve_images.values()) + sum(config.classification_images.values()))
    files: dict[str, Any] = {}

    def write(relative: str, rows: Any) -> None:
        data = _json_bytes(rows)
        atomic_write_bytes(root / relative, data)
        files[relative] = {"rows": len(rows), "sha256": sha256_bytes(data)}

    with tqdm(total=total_images, desc="demo world", unit="img", disable=not progress) as bar:
        world = _World(root, config, bar)
        # Evaluation splits first: their scenes do not depend on how large pretraining is.
        retrieval = {s: world.retrieval(s, config.retrieval_images[s]) for s in ("test", "val", "train")}
        answer_list = _answer_list()
        vqa: dict[str, list[dict]] = {}
        question_types: dict[str, str] = {}
        next_id = 0
        for split in ("val", "test", "train"):
            vqa[split], types = world.vqa(split, config.vqa_images[split], next_id)
            question_types.update(types)
            next_id += len(vqa[split])
        nlvr = {s: world.nlvr(s, config.nlvr_pairs[s]) for s in ("test", "dev", "train")}
        ve = {s: world.ve(s, config.ve_images[s]) for s in ("test", "dev", "train")}
        pairs, url_rows = world.pretrain()
        # Last, so that adding it left every earlier split's scenes as they were.
        classification = {s: world.classification(s, config.classification_images[s])
                          for s in ("val", "train")}

    write("pretrain/captions.json", pairs)
    table = pa.table({"url": [r["url"] for r in url_rows], "caption": [r["caption"] for r in url_rows]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    parquet = sink.getvalue().to_pybytes()
    atomic_write_bytes(root / "pretrain/urls.parquet", parquet)
    files["pretrain/urls.parquet"] = {"rows": len(url_rows), "sha256": sha256_bytes(parquet)}
    for split in ("train", "val", "test"):
        write(f"retrieval/{split}.json", retrieval[split])
        write(f"vqa/{split}.json", vqa[split])
    write("vqa/answer_list.json", answer_list)
    for split in ("train", "dev", "test"):
        write(f"nlvr/{split}.json", nlvr[split])
        write(f"ve/{split}.json", ve[split])
    for split in ("train", "val"):
        write(f"classification/{split}.json", classification[split])
    write("meta/scenes.json", dict(sorted(world.scenes.items())))
    write("meta/vqa_question_types.json", question_types)

    manifest = {
        "generator": "codis.data.demo_world",
        "generator_version": GENERATOR_VERSION,
        "config": config.to_dict(),
        "image_size": config.image_size,
        "images": dict(sorted(Counter(p.split("/")[1] for p in world.scenes).items())),
        "pretrain_pairs": len(pairs),
        "bad_urls": {"dead": [r["url"] for r in url_rows if "/missing_" in r["url"]],
                     "non_image": [r["url"] for r in url_rows if r["url"].endswith("not_an_image.jpg")]},
        "files": dict(sorted(files.items())),
        "baselines": {
            "units": "percent",
            "retrieval_test": {"images": config.retrieval_images["test"],
                               "captions": 5 * config.retrieval_images["test"],
                               **_retrieval_chance(config.retrieval_images["test"])},
            "vqa_val": _vqa_baselines(vqa["val"], question_types, answer_list),
            "nlvr": {s: _majority_label(nlvr[s]) for s in ("dev", "test")},
            "ve": {s: _majority_label(ve[s]) for s in ("dev", "test")},
        },
    }
    atomic_write_bytes(root / "manifest.json", json.dumps(manifest, indent=2).encode("ascii"))
    return manifest
