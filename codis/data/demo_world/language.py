"""Words and captions of the demo world: noun phrases with synonyms, and true captions of a scene.

Synonyms make captions, questions and answers vary in wording, not in meaning.
"""

from __future__ import annotations

import random
from typing import Sequence

from codis.data.demo_world.scenes import COLORS, Scene, SceneObject, relation_triples

SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
COLOR_WORDS = {c: (c,) for c in COLORS} | {"gray": ("gray", "grey")}
RELATION_WORDS = {
    "left": ("left of", "to the left of", "on the left of"),
    "right": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def words(rng: random.Random, color: str | None, shape: str, size: str | None = None,
          count: int = 1) -> str:
    """``[size] [color] shape(s)`` with synonyms, no determiner."""
    parts = []
    if size is not None:
        parts.append(rng.choice(SIZE_WORDS[size]))
    if color is not None:
        parts.append(rng.choice(COLOR_WORDS[color]))
    parts.append(shape if count == 1 else plural(shape))
    return " ".join(parts)


def noun_phrase(rng: random.Random, color: str | None, shape: str, size: str | None = None,
                count: int = 1) -> str:
    """A noun phrase: ``a red circle``, ``two large blue stars``."""
    text = words(rng, color, shape, size, count)
    return f"{article(text)} {text}" if count == 1 else f"{NUMBER_WORDS[count]} {text}"


def _join(rng: random.Random, phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    head = phrases[0]
    for phrase in phrases[1:-1]:
        head += rng.choice((" and ", " with ")) + phrase
    return f"{head} and {phrases[-1]}"


def _position_words(rng: random.Random, obj: SceneObject) -> str:
    if (obj.row, obj.col) == (1, 1):
        return rng.choice(("in the center", "in the middle"))
    if obj.col == 1:
        return "at the top" if obj.row == 0 else "at the bottom"
    if obj.row == 1:
        return "on the left" if obj.col == 0 else "on the right"
    corner = f"{'top' if obj.row == 0 else 'bottom'} {'left' if obj.col == 0 else 'right'}"
    return rng.choice((f"in the {corner} corner", f"in the {corner}"))


def _groups(scene: Scene) -> list[list[SceneObject]]:
    """Objects grouped by (color, shape), in order of first appearance."""
    groups: dict[tuple[str, str], list[SceneObject]] = {}
    for obj in scene.objects:
        groups.setdefault((obj.color, obj.shape), []).append(obj)
    return list(groups.values())


def _group_phrase(rng: random.Random, group: list[SceneObject]) -> str:
    sizes = {o.size for o in group}
    size = group[0].size if len(sizes) == 1 and rng.random() < 0.4 else None
    return noun_phrase(rng, group[0].color, group[0].shape, size, len(group))


def caption(rng: random.Random, scene: Scene) -> str:
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
        a, rel, b = rng.choice(relation_triples(scene))
        first = noun_phrase(rng, a.color, a.shape, a.size if rng.random() < 0.3 else None)
        second = noun_phrase(rng, b.color, b.shape, b.size if rng.random() < 0.3 else None)
        prefix = rng.choice(("", "there is ", "the picture shows ", "an image of ", "a photo of "))
        tail = f" in a picture with {NUMBER_WORDS[n]} shapes" if n >= 3 and rng.random() < 0.3 else ""
        return f"{prefix}{first} {rng.choice(RELATION_WORDS[rel])} {second}{tail}"
    if family == "position":
        chosen = rng.sample(scene.objects, min(n, rng.choice((1, 2))))
        parts = [f"{noun_phrase(rng, o.color, o.shape, o.size if rng.random() < 0.3 else None)} "
                 f"{_position_words(rng, o)}" for o in chosen]
        prefix = rng.choice(("", "there is ", "the image shows ", "a picture with "))
        return prefix + " and ".join(parts)
    if n == 1:
        obj = scene.objects[0]
        text = words(rng, obj.color, obj.shape, obj.size if rng.random() < 0.4 else None)
        return rng.choice(("a single ", "only one ", "just one ")) + text
    groups = _groups(scene)
    chosen = rng.sample(groups, min(len(groups), rng.choice((1, 2))))
    prefix = rng.choice(("", "a picture with ", "an image with ", "there are "))
    return (f"{prefix}{NUMBER_WORDS[n]} shapes including "
            f"{_join(rng, [_group_phrase(rng, g) for g in chosen])}")


def captions(rng: random.Random, scene: Scene, count: int) -> list[str]:
    """``count`` distinct captions of the scene."""
    found: list[str] = []
    for _ in range(500):
        text = caption(rng, scene)
        if text not in found:
            found.append(text)
            if len(found) == count:
                return found
    raise RuntimeError(f"could not word {count} distinct captions for scene {scene}")
