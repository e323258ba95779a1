"""VQA questions, NLVR² statements and SNLI-VE hypotheses about demo-world scenes, with their labels.

Each task is built so that its text alone does not give the answer:

* VQA answers are balanced within each question type, and colours and shapes are exchangeable in
  the scene sampler, so the question text says nothing about its answer;
* NLVR² statement parameters are drawn before the images, which are then drawn until the statement
  has the label asked for, so a statement's words carry no label information; labels are balanced
  within each statement family;
* SNLI-VE neutral hypotheses add a property that an image cannot show ("made of wood") to a claim
  that the image makes true. The same modifiers appear in entailed and contradicted hypotheses
  (whose underlying claim is false, e.g. "there is no red circle made of wood" without any red
  circle), so from text alone each template is 50/50 between two labels.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, Iterable, Sequence

from codis.data.demo_world.language import (COLOR_WORDS, NUMBER_WORDS, RELATION_WORDS, article,
                                            noun_phrase, plural, words)
from codis.data.demo_world.scenes import (COLORS, RELATIONS, SHAPES, Scene, World, count_objects, holds,
                                          relation_exists, relation_triples)
from codis.data.shards import VE_LABEL_NAMES

VQA_QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "exist", "relation")
_VQA_ANSWERS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS), "shape": SHAPES, "count": ("0", "1", "2", "3", "4"),
    "exist": ("yes", "no"), "relation": SHAPES,
}
_ANSWER_SYNONYMS: dict[str, tuple[str, ...]] = {
    "gray": ("grey",), "0": ("zero", "none"), "1": ("one",), "2": ("two",), "3": ("three",),
    "4": ("four",), "cross": ("plus",), "yes": ("yeah",),
}
_ANNOTATORS = 10


def _balanced(rng: random.Random, items: Sequence[Any], n: int) -> list[Any]:
    """``n`` items cycling through ``items`` (so counts differ by at most one), shuffled."""
    out = [items[i % len(items)] for i in range(n)]
    rng.shuffle(out)
    return out


# ---- VQA ------------------------------------------------------------------------------------------

def _exist_key_is_near_miss(scene: Scene, key: tuple) -> bool:
    _, color, shape = key
    return count_objects(scene, color=color) > 0 or count_objects(scene, shape=shape) > 0


def _vqa_candidates(scene: Scene) -> dict[str, list[tuple[tuple, str]]]:
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
            answer = "yes" if count_objects(scene, color, shape) else "no"
            candidates["exist"].append((("exist", color, shape), answer))
    for ref in scene.objects:
        if count_objects(scene, ref.color, ref.shape) != 1:
            continue  # "the red circle" must name one object
        for rel in RELATIONS:
            targets = [o for o in scene.objects if o is not ref and holds(o, rel, ref)]
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
                           "what shape is the {c} thing")).format(c=rng.choice(COLOR_WORDS[key[1]]))
    if kind == "count":
        return rng.choice(("how many {p} are there", "how many {p} are in the picture",
                           "how many {p} can you see")).format(p=plural(key[1]))
    if kind == "exist":
        text = words(rng, key[1], key[2])
        return rng.choice(("is there {a} {w}", "is there {a} {w} in the image",
                           "does the picture show {a} {w}")).format(a=article(text), w=text)
    _, rel, color, shape = key
    return "{q} {r} the {w}".format(q=rng.choice(("what is", "what shape is", "which shape is")),
                                    r=rng.choice(RELATION_WORDS[rel]), w=words(rng, color, shape))


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


def answer_list() -> list[str]:
    """Every answer and its synonyms, by question type (``vqa/answer_list.json``)."""
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


def vqa_rows(world: World, split: str, n: int, first_id: int) -> tuple[list[dict], dict[str, str]]:
    """``questions_per_image`` questions on each of ``n`` new images, numbered from ``first_id``;
    returns the ALBEF rows (no answers on test) and each question id's type."""
    per = world.config.questions_per_image
    tallies = {t: Counter() for t in VQA_QUESTION_TYPES}
    rows, types = [], {}
    question_id = first_id
    for index in range(n):
        rng = world.rng("vqa", split, index)
        slots = [VQA_QUESTION_TYPES[(index * per + j) % len(VQA_QUESTION_TYPES)] for j in range(per)]
        # Draw images until each question can take one of its type's least-used answers (the
        # tolerance grows slowly if none fits), so answers stay balanced within every type.
        for attempt in range(4000):
            slack = attempt // 400
            scene = world.sample(rng, p_repeat=0.45)
            candidates = _vqa_candidates(scene)
            if world.unique(scene) and all(
                    any(tallies[t][a] <= min(tallies[t][b] for b in _VQA_ANSWERS[t]) + slack
                        for _, a in candidates[t]) for t in slots):
                break
        else:
            raise RuntimeError(f"vqa {split} image {index}: no scene allows question types {slots}")
        path = world.save(scene, f"images/vqa_{split}/{index:06d}.jpg")
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


# ---- NLVR² ----------------------------------------------------------------------------------------

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


def _nlvr_truth(family: str, p: dict[str, Any], left: Scene, right: Scene) -> bool:
    has = lambda scene: count_objects(scene, p["color"], p["shape"]) > 0  # noqa: E731
    if family == "total":
        return count_objects(left, shape=p["shape"]) + count_objects(right, shape=p["shape"]) == p["n"]
    if family == "side_only":
        this, other = (left, right) if p["side"] == "left" else (right, left)
        return has(this) and not has(other)
    if family == "both":
        return has(left) and has(right)
    if family == "exactly_one":
        attr = {"color": p["color"]} if p["attribute"] == "color" else {"shape": p["shape"]}
        return (count_objects(left, **attr) > 0) != (count_objects(right, **attr) > 0)
    if family == "more":
        this, other = (left, right) if p["side"] == "left" else (right, left)
        return len(this.objects) > len(other.objects)
    first, second = (p["color"], p["shape"]), (p["color2"], p["shape2"])
    return any(relation_exists(s, first, p["relation"], second) for s in (left, right))


def _nlvr_sentence(rng: random.Random, family: str, p: dict[str, Any]) -> str:
    thing = noun_phrase(rng, p["color"], p["shape"])
    side = p.get("side", "left")
    other = "right" if side == "left" else "left"
    if family == "total":
        shapes = plural(p["shape"])
        n = NUMBER_WORDS[p["n"]]
        return rng.choice((f"there are {n} {shapes} in total",
                           f"the two images have {n} {shapes} in total",
                           f"there are exactly {n} {shapes} in the two images"))
    if family == "side_only":
        return rng.choice((f"the {side} image contains {thing} and the {other} image does not",
                           f"there is {thing} in the {side} image but not in the {other} image"))
    if family == "both":
        return rng.choice((f"both images contain {thing}", f"each image contains {thing}",
                           f"there is {thing} in each image"))
    if family == "exactly_one":
        if p["attribute"] == "color":
            text = f"{rng.choice(COLOR_WORDS[p['color']])} object"
        else:
            text = p["shape"]
        target = f"{article(text)} {text}"
        return rng.choice((f"exactly one image contains {target}",
                           f"only one of the images contains {target}"))
    if family == "more":
        return rng.choice((f"the {side} image contains more shapes than the {other} image",
                           f"there are more shapes in the {side} image than in the {other} image"))
    second = noun_phrase(rng, p["color2"], p["shape2"])
    rel = rng.choice(RELATION_WORDS[p["relation"]])
    return rng.choice((f"in at least one image {thing} is {rel} {second}",
                       f"one of the images shows {thing} {rel} {second}"))


def nlvr_rows(world: World, split: str, n: int) -> list[dict]:
    """``n`` image pairs with one statement each, labels balanced within each statement family."""
    combos = _balanced(world.rng("nlvr", split, "labels"),
                       [(f, label) for f in _NLVR_FAMILIES for label in (True, False)], n)
    rows = []
    for index, (family, label) in enumerate(combos):
        rng = world.rng("nlvr", split, index)
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
                left, right = world.sample(rng, **kwargs), world.sample(rng, **kwargs)
                if (_nlvr_truth(family, params, left, right) == label and world.unique(left)
                        and world.unique(right) and left.key() != right.key()):
                    found = params, left, right
                    break
            if found:
                break
        if found is None:
            raise RuntimeError(f"nlvr {split} pair {index}: no images give {family} = {label}")
        params, left, right = found
        images = [world.save(left, f"images/nlvr_{split}/{index:06d}_img0.jpg"),
                  world.save(right, f"images/nlvr_{split}/{index:06d}_img1.jpg")]
        rows.append({"images": images, "sentence": _nlvr_sentence(rng, family, params),
                     "label": "True" if label else "False"})
    return rows


# ---- SNLI-VE --------------------------------------------------------------------------------------

_NEUTRAL_MODIFIERS = ("made of wood", "made of paper", "made of metal", "made of glass",
                      "made of stone", "drawn by a child", "drawn by hand")
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


def _ve_claim(rng: random.Random, scene: Scene, truth: bool) -> tuple | None:
    """An existence or relation claim about the scene with the given truth value, or None."""
    if len(scene.objects) > 1 and rng.random() < 0.35:
        triples = relation_triples(scene)
        if truth:
            a, rel, b = rng.choice(triples)
            return ("relation", (a.color, a.shape), rel, (b.color, b.shape))
        pairs = [(a, b) for a in scene.objects for b in scene.objects if a is not b]
        a, b = rng.choice(pairs)
        false_rels = [r for r in RELATIONS
                      if not relation_exists(scene, (a.color, a.shape), r, (b.color, b.shape))]
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
        if count_objects(scene, color, shape, size) == 0:
            return ("exist", (size, color, shape))
    return None


def _ve_sentence(rng: random.Random, claim: tuple, polarity: str, modifier: str | None) -> str:
    mod = f" {modifier}" if modifier else ""
    if claim[0] == "exist":
        size, color, shape = claim[1]
        text = words(rng, color, shape, size)
        a = article(text)
        if polarity == "pos":
            return rng.choice((f"there is {a} {text}{mod}", f"the image shows {a} {text}{mod}",
                               f"the picture contains {a} {text}{mod}"))
        return rng.choice((f"there is no {text}{mod}", f"the image does not show {a} {text}{mod}",
                           f"the picture contains no {text}{mod}"))
    _, (c1, s1), rel, (c2, s2) = claim
    first, second = words(rng, c1, s1), noun_phrase(rng, c2, s2)
    rel_words = rng.choice(RELATION_WORDS[rel])
    if polarity == "pos":
        return rng.choice((f"{article(first)} {first}{mod} is {rel_words} {second}",
                           f"there is {article(first)} {first}{mod} {rel_words} {second}"))
    return rng.choice((f"no {first}{mod} is {rel_words} {second}",
                       f"there is no {first}{mod} {rel_words} {second}"))


def ve_rows(world: World, split: str, n: int) -> list[dict]:
    """``hypotheses_per_image`` distinct hypotheses on each of ``n`` new images, labels balanced."""
    per = world.config.hypotheses_per_image
    labels = _balanced(world.rng("ve", split, "labels"), VE_LABEL_NAMES, n * per)
    rows = []
    for index in range(n):
        rng = world.rng("ve", split, index)
        scene = world.new_scene(rng)
        path = world.save(scene, f"images/ve_{split}/{index:06d}.jpg")
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
