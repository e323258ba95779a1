"""The demo world: determinism, ALBEF formats, and that every text is true of its image.

Ground truth is re-derived here from the scene specs in meta/scenes.json with regular expressions
over the generated text, independently of the generator's own sentence builders.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image, UnidentifiedImageError

from codis.config import ConfigError
from codis.data.demo_world import DemoWorldConfig, generate_demo_world
from codis.data.demo_world.baselines import trivial_baselines
from codis.metrics import retrieval_chance

REPO = Path(__file__).resolve().parents[1]
# Not the shared tiny_world: these tests check the generator itself, at sizes where every split
# is large enough for its balancing and statistics to show, at an odd image size.
SMALL = dict(seed=3, image_size=40, pretrain_images=60, captions_per_pretrain_image=2,
             retrieval_images={"train": 30, "val": 20, "test": 20},
             vqa_images={"train": 60, "val": 40, "test": 20}, questions_per_image=3,
             nlvr_pairs={"train": 60, "dev": 24, "test": 24},
             ve_images={"train": 60, "dev": 30, "test": 20}, hypotheses_per_image=3,
             classification_images={"train": 30, "val": 20}, dead_urls=3, non_image_urls=2)

COLOR_WORDS = {"red": "red", "green": "green", "blue": "blue", "yellow": "yellow", "purple": "purple",
               "orange": "orange", "white": "white", "black": "black", "gray": "gray", "grey": "gray"}
SHAPE_WORDS = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon")
SIZE_WORDS = {"small": "small", "little": "small", "large": "large", "big": "large"}
NUMBERS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4}
COL = "(" + "|".join(COLOR_WORDS) + ")"
SHP = "(" + "|".join(SHAPE_WORDS) + ")"
PLURAL = "(?:es|s)"
SIZE = "(?:(" + "|".join(SIZE_WORDS) + ") )?"
NP = rf"(?:a|an) {SIZE}{COL} {SHP}"
NP_PLAIN = rf"(?:a|an) {COL} {SHP}"
REL_WORDS = {"to the left of": "left", "on the left of": "left", "left of": "left",
             "to the right of": "right", "on the right of": "right", "right of": "right",
             "above": "above", "over": "above", "below": "below", "under": "below", "beneath": "below"}
REL = "(" + "|".join(REL_WORDS) + ")"
MOD = "( made of (?:wood|paper|metal|glass|stone)| drawn by a child| drawn by hand)?"
POSITIONS = {"in the center": (1, 1), "in the middle": (1, 1), "at the top": (0, 1),
             "at the bottom": (2, 1), "on the left": (1, 0), "on the right": (1, 2)}
POSITIONS |= {f"in the {r} {c}{corner}": (ri, ci) for r, ri in (("top", 0), ("bottom", 2))
              for c, ci in (("left", 0), ("right", 2)) for corner in ("", " corner")}
POSITION = "(" + "|".join(sorted(POSITIONS, key=len, reverse=True)) + ")(?! of)"


# ------------------------------------------------------------------------------ scene semantics


def objects(world: dict, image: str) -> list[dict]:
    return world["scenes"][image]["objects"]


def matching(objs: list[dict], color: str | None = None, shape: str | None = None,
             size: str | None = None) -> list[dict]:
    color = COLOR_WORDS.get(color, color)
    size = SIZE_WORDS.get(size, size)
    return [o for o in objs if (color is None or o["color"] == color)
            and (shape is None or o["shape"] == shape) and (size is None or o["size"] == size)]


def related(a: dict, relation: str, b: dict) -> bool:
    dx, dy = a["col"] - b["col"], a["row"] - b["row"]
    return {"left": dx < 0, "right": dx > 0, "above": dy < 0, "below": dy > 0}[relation]


def some_pair(objs: list[dict], first: tuple, relation: str, second: tuple) -> bool:
    return any(related(a, REL_WORDS[relation], b) for a in matching(objs, *first)
               for b in matching(objs, *second) if a is not b)


# --------------------------------------------------------------------------------------- worlds


def load(root: Path) -> dict:
    read = lambda rel: json.loads((root / rel).read_text())  # noqa: E731
    world = {"root": root, "manifest": read("manifest.json"), "scenes": read("meta/scenes.json"),
             "qtypes": read("meta/vqa_question_types.json")}
    for rel in ("pretrain/captions.json", "vqa/answer_list.json"):
        world[rel] = read(rel)
    for task, splits in (("retrieval", ("train", "val", "test")), ("vqa", ("train", "val", "test")),
                         ("nlvr", ("train", "dev", "test")), ("ve", ("train", "dev", "test")),
                         ("classification", ("train", "val"))):
        for split in splits:
            world[f"{task}/{split}.json"] = read(f"{task}/{split}.json")
    return world


@pytest.fixture(scope="module")
def world_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("world") / "demo"
    generate_demo_world(root, DemoWorldConfig(**SMALL), progress=False)
    return root


@pytest.fixture(scope="module")
def world(world_root: Path) -> dict:
    return load(world_root)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------- determinism


def test_same_config_is_byte_identical_in_another_process(world_root: Path, tmp_path: Path) -> None:
    # Another interpreter with another hash seed: set iteration order must not leak into the files.
    other = tmp_path / "again"
    code = ("import codis, json, sys; from codis.data.demo_world import DemoWorldConfig, generate_demo_world;"
            "generate_demo_world(sys.argv[1], DemoWorldConfig(**json.loads(sys.argv[2])), progress=False)")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(other), json.dumps(SMALL)], check=True, cwd=REPO,
                   env=env, timeout=300)
    first, second = tree(world_root), tree(other)
    assert sorted(first) == sorted(second)
    assert [name for name in first if first[name] != second[name]] == []


def test_another_seed_differs(world_root: Path, tmp_path: Path) -> None:
    generate_demo_world(tmp_path, DemoWorldConfig(**{**SMALL, "seed": 4}), progress=False)
    first, second = tree(world_root), tree(tmp_path)
    for rel in ("pretrain/captions.json", "retrieval/test.json", "vqa/val.json", "nlvr/dev.json",
                "ve/dev.json", "images/retrieval_test/000000.jpg", "images/pretrain/000000.jpg"):
        assert first[rel] != second[rel], rel


def test_manifest_lists_files_with_hashes_and_no_temporaries(world: dict) -> None:
    root, manifest = world["root"], world["manifest"]
    assert manifest["config"] == DemoWorldConfig(**SMALL).to_dict()
    expected = {"pretrain/captions.json", "pretrain/urls.parquet", "vqa/answer_list.json",
                "meta/scenes.json", "meta/vqa_question_types.json"}
    expected |= {f"{t}/{s}.json" for t in ("retrieval", "vqa") for s in ("train", "val", "test")}
    expected |= {f"{t}/{s}.json" for t in ("nlvr", "ve") for s in ("train", "dev", "test")}
    expected |= {f"classification/{s}.json" for s in ("train", "val")}
    assert set(manifest["files"]) == expected
    for rel, entry in manifest["files"].items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == entry["sha256"], rel
        if rel.endswith(".json") and rel != "meta/scenes.json":
            assert len(json.loads((root / rel).read_text())) == entry["rows"], rel
    assert not [p for p in root.rglob("*.tmp")]
    n_images = sum(1 for p in (root / "images").rglob("*.jpg") if p.name != "not_an_image.jpg")
    assert sum(manifest["images"].values()) == n_images == len(world["scenes"])
    assert manifest["pretrain_pairs"] == SMALL["pretrain_images"] * SMALL["captions_per_pretrain_image"]


def test_a_failed_generation_does_not_look_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = DemoWorldConfig(**{**SMALL, "pretrain_images": 5})
    generate_demo_world(tmp_path, config, progress=False)
    assert (tmp_path / "manifest.json").exists()

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("codis.data.demo_world.questions.ve_rows", crash)
    with pytest.raises(OSError, match="disk full"):
        generate_demo_world(tmp_path, config, progress=False)
    assert not (tmp_path / "manifest.json").exists()


# -------------------------------------------------------------------------------------- formats


def test_pretrain_captions_format(world: dict) -> None:
    pairs = world["pretrain/captions.json"]
    assert len(pairs) == SMALL["pretrain_images"] * SMALL["captions_per_pretrain_image"]
    for pair in pairs:
        assert set(pair) == {"image", "caption"}
        assert pair["image"].startswith("images/pretrain/") and isinstance(pair["caption"], str)
    by_image = Counter(p["image"] for p in pairs)
    assert len(by_image) == SMALL["pretrain_images"]
    assert set(by_image.values()) == {SMALL["captions_per_pretrain_image"]}
    for image in by_image:  # differently worded captions of one image
        captions = [p["caption"] for p in pairs if p["image"] == image]
        assert len(set(captions)) == len(captions)


def test_url_list_has_good_dead_and_non_image_rows(world: dict) -> None:
    root = world["root"]
    table = pd.read_parquet(root / "pretrain/urls.parquet")
    assert list(table.columns) == ["url", "caption"]
    rows = list(zip(table["url"], table["caption"]))
    good = [(u, c) for u, c in rows if (root / u).is_file() and u.endswith(".jpg")
            and not u.endswith("not_an_image.jpg")]
    assert Counter(good) == Counter((p["image"], p["caption"]) for p in world["pretrain/captions.json"])
    dead = [u for u, _ in rows if not (root / u).exists()]
    assert len(dead) == SMALL["dead_urls"]
    non_image = [u for u, _ in rows if u.endswith("not_an_image.jpg")]
    assert len(non_image) == SMALL["non_image_urls"]
    with pytest.raises(UnidentifiedImageError):
        Image.open(root / non_image[0])
    assert sorted(dead) == sorted(world["manifest"]["bad_urls"]["dead"])
    # failures are spread through the list, not all at its end
    bad_positions = [i for i, (u, _) in enumerate(rows) if u in dead or u in non_image]
    assert bad_positions[0] < len(rows) // 2
    assert all(not u.startswith(("/", "http")) for u, _ in rows)  # relative to the world's root


def test_retrieval_formats(world: dict) -> None:
    train = world["retrieval/train.json"]
    assert len(train) == 5 * SMALL["retrieval_images"]["train"]
    ids: dict[str, int] = {}
    for row in train:
        assert set(row) == {"image", "caption", "image_id"}
        assert isinstance(row["caption"], str) and type(row["image_id"]) is int
        assert ids.setdefault(row["image"], row["image_id"]) == row["image_id"]
    assert len(set(ids.values())) == len(ids) == SMALL["retrieval_images"]["train"]
    for split in ("val", "test"):
        rows = world[f"retrieval/{split}.json"]
        assert len(rows) == SMALL["retrieval_images"][split]
        for row in rows:
            assert set(row) == {"image", "caption"}
            assert isinstance(row["caption"], list) and len(row["caption"]) == 5
            assert all(isinstance(c, str) and c for c in row["caption"])
            assert len(set(row["caption"])) == 5


def test_vqa_formats(world: dict) -> None:
    answer_list = world["vqa/answer_list.json"]
    assert len(answer_list) == len(set(answer_list)) and all(isinstance(a, str) for a in answer_list)
    all_ids = []
    for split in ("train", "val", "test"):
        rows = world[f"vqa/{split}.json"]
        assert len(rows) == SMALL["vqa_images"][split] * SMALL["questions_per_image"]
        for row in rows:
            keys = {"question_id", "question", "image", "dataset"}
            assert set(row) == (keys if split == "test" else keys | {"answer"})
            assert type(row["question_id"]) is int and isinstance(row["question"], str)
            assert row["dataset"] == "vqa"
            if split != "test":
                assert len(row["answer"]) == 10 and set(row["answer"]) <= set(answer_list)
            all_ids.append(row["question_id"])
    assert len(all_ids) == len(set(all_ids))
    assert set(world["qtypes"]) == {str(i) for i in all_ids}


def test_nlvr_and_ve_formats(world: dict) -> None:
    for split in ("train", "dev", "test"):
        nlvr = world[f"nlvr/{split}.json"]
        assert len(nlvr) == SMALL["nlvr_pairs"][split]
        for row in nlvr:
            assert set(row) == {"images", "sentence", "label"}
            assert isinstance(row["images"], list) and len(row["images"]) == 2
            assert row["images"][0] != row["images"][1]
            assert row["label"] in ("True", "False") and isinstance(row["sentence"], str)
        ve = world[f"ve/{split}.json"]
        assert len(ve) == SMALL["ve_images"][split] * SMALL["hypotheses_per_image"]
        for row in ve:
            assert set(row) == {"image", "sentence", "label"}
            assert row["label"] in ("entailment", "neutral", "contradiction")


def referenced_images(world: dict) -> set[str]:
    images = {p["image"] for p in world["pretrain/captions.json"]}
    for key, rows in world.items():
        if key.endswith(".json") and key.split("/")[0] in ("retrieval", "vqa", "nlvr", "ve", "classification") \
                and not key.endswith("answer_list.json"):
            for row in rows:
                images.update(row["images"] if "images" in row else [row["image"]])
    return images


def test_every_referenced_image_opens_at_the_configured_size(world: dict) -> None:
    images = referenced_images(world)
    assert images == set(world["scenes"])
    for rel in images:
        with Image.open(world["root"] / rel) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (SMALL["image_size"], SMALL["image_size"])


@pytest.mark.parametrize("size", [96, 256])
def test_other_image_sizes(tmp_path: Path, size: int) -> None:
    one, dev = {"train": 1, "val": 1, "test": 1}, {"train": 1, "dev": 1, "test": 1}
    config = DemoWorldConfig(image_size=size, pretrain_images=2, retrieval_images=one, vqa_images=one,
                             nlvr_pairs=dev, ve_images=dev)
    manifest = generate_demo_world(tmp_path, config, progress=False)
    assert manifest["image_size"] == size
    for rel in json.loads((tmp_path / "meta/scenes.json").read_text()):
        with Image.open(tmp_path / rel) as image:
            assert image.size == (size, size)


def test_retrieval_test_scenes_are_not_in_pretraining(world: dict) -> None:
    def spec(image: str) -> str:
        return json.dumps(world["scenes"][image], sort_keys=True)
    pretrain = [i for i in world["scenes"] if i.startswith("images/pretrain/")]
    test = [i for i in world["scenes"] if i.startswith("images/retrieval_test/")]
    assert len(test) == SMALL["retrieval_images"]["test"] and pretrain
    assert not {spec(i) for i in test} & {spec(i) for i in pretrain}
    digest = lambda rel: hashlib.sha256((world["root"] / rel).read_bytes()).hexdigest()  # noqa: E731
    assert not {digest(i) for i in test} & {digest(i) for i in pretrain}
    assert len({spec(i) for i in world["scenes"]}) == len(world["scenes"])  # no scene twice anywhere


# ------------------------------------------------------------------------- texts are true


def check_caption(caption: str, objs: list[dict]) -> None:
    words = caption.split()
    assert re.fullmatch(r"[a-z ]+", caption), caption
    colors = {COLOR_WORDS[w] for w in words if w in COLOR_WORDS}
    assert colors <= {o["color"] for o in objs}, caption
    shapes = {s for w in words for s in SHAPE_WORDS if re.fullmatch(s + PLURAL + "?", w)}
    assert shapes <= {o["shape"] for o in objs}, caption
    for number, size, color, shape in re.findall(rf"\b(one|two|three|four) {SIZE}{COL} {SHP}", caption):
        assert len(matching(objs, color, shape, size or None)) == NUMBERS[number], caption
    for number in re.findall(r"\b(one|two|three|four) shapes\b", caption):
        assert len(objs) == NUMBERS[number], caption
    for size1, c1, s1, rel, size2, c2, s2 in re.findall(rf"{NP} {REL} {NP}", caption):
        assert some_pair(objs, (c1, s1, size1 or None), rel, (c2, s2, size2 or None)), caption
    for size, color, shape, where in re.findall(rf"{NP} {POSITION}", caption):
        cells = {(o["row"], o["col"]) for o in matching(objs, color, shape, size or None)}
        assert POSITIONS[where] in cells, caption


def test_captions_describe_their_image(world: dict) -> None:
    checked = 0
    for pair in world["pretrain/captions.json"] + world["retrieval/train.json"]:
        check_caption(pair["caption"], objects(world, pair["image"]))
        checked += 1
    for split in ("val", "test"):
        for row in world[f"retrieval/{split}.json"]:
            for caption in row["caption"]:
                check_caption(caption, objects(world, row["image"]))
                checked += 1
    assert checked > 300


def test_captions_fail_the_checker_on_another_image(world: dict) -> None:
    # The checker above has teeth: pairing captions with the wrong image breaks it often.
    rows = world["retrieval/test.json"]
    failures = 0
    for row, other in zip(rows, rows[1:] + rows[:1]):
        for caption in row["caption"]:
            try:
                check_caption(caption, objects(world, other["image"]))
            except AssertionError:
                failures += 1
    assert failures > 0.8 * 5 * len(rows)


def vqa_truth(question: str, objs: list[dict]) -> tuple[str, str]:
    """(question type, answer) computed from the scene."""
    if m := re.fullmatch(rf"(?:what color is the|what is the color of the|which color is the) {SHP}", question):
        (found,) = matching(objs, shape=m[1])
        return "color", found["color"]
    if m := re.fullmatch(rf"(?:what shape is|which shape is|what is) {REL} the {COL} {SHP}", question):
        (ref,) = matching(objs, m[2], m[3])
        (target,) = [o for o in objs if o is not ref and related(o, REL_WORDS[m[1]], ref)]
        return "relation", target["shape"]
    if m := re.fullmatch(rf"(?:what shape is the|what is the shape of the) {COL} (?:object|thing)", question):
        (found,) = matching(objs, color=m[1])
        return "shape", found["shape"]
    if m := re.fullmatch(rf"how many {SHP}{PLURAL} (?:are there|are in the picture|can you see)", question):
        return "count", str(len(matching(objs, shape=m[1])))
    if m := re.fullmatch(rf"(?:is there|does the picture show) {NP_PLAIN}(?: in the image)?", question):
        return "exist", "yes" if matching(objs, m[1], m[2]) else "no"
    raise AssertionError(f"unparsed question: {question}")


def test_vqa_answers_are_the_scene_truth(world: dict) -> None:
    modal_agrees, total = 0, 0
    for split in ("train", "val", "test"):
        for row in world[f"vqa/{split}.json"]:
            question_type, answer = vqa_truth(row["question"], objects(world, row["image"]))
            assert world["qtypes"][str(row["question_id"])] == question_type
            if split != "test":
                counts = Counter(row["answer"])
                modal_agrees += counts[answer] == max(counts.values())
                total += 1
    assert modal_agrees >= 0.95 * total
    # annotator noise is present, so min(n / 3, 1) is not always 0 or 1
    rows = world["vqa/val.json"] + world["vqa/train.json"]
    assert any(len(set(r["answer"])) > 1 for r in rows)
    synonyms = {"grey", "zero", "none", "one", "two", "three", "four", "plus", "yeah"}
    assert synonyms & {a for r in rows for a in r["answer"]}


def nlvr_truth(sentence: str, left: list[dict], right: list[dict]) -> bool:
    side = lambda name: left if name == "left" else right  # noqa: E731
    has = lambda objs, c, s: bool(matching(objs, c, s))  # noqa: E731
    if m := (re.fullmatch(rf"(?:there are|the two images have) (two|three|four) {SHP}{PLURAL} in total", sentence)
             or re.fullmatch(rf"there are exactly (two|three|four) {SHP}{PLURAL} in the two images", sentence)):
        return len(matching(left, shape=m[2])) + len(matching(right, shape=m[2])) == NUMBERS[m[1]]
    if m := re.fullmatch(rf"the (left|right) image contains {NP_PLAIN} and the (left|right) image does not",
                         sentence):
        this, color, shape, other = m.groups()
    elif m := re.fullmatch(rf"there is {NP_PLAIN} in the (left|right) image but not in the (left|right) image",
                           sentence):
        color, shape, this, other = m.groups()
    if m:
        assert this != other
        return has(side(this), color, shape) and not has(side(other), color, shape)
    if m := (re.fullmatch(rf"(?:both images contain|each image contains) {NP_PLAIN}", sentence)
             or re.fullmatch(rf"there is {NP_PLAIN} in each image", sentence)):
        return has(left, m[1], m[2]) and has(right, m[1], m[2])
    if m := re.fullmatch(rf"(?:exactly one image contains|only one of the images contains) "
                         rf"(?:a|an) (?:{COL} object|{SHP})", sentence):
        query = {"color": m[1]} if m[1] else {"shape": m[2]}
        return bool(matching(left, **query)) != bool(matching(right, **query))
    if m := (re.fullmatch(r"the (left|right) image contains more shapes than the (left|right) image", sentence)
             or re.fullmatch(r"there are more shapes in the (left|right) image than in the (left|right) image",
                             sentence)):
        return len(side(m[1])) > len(side(m[2]))
    if m := (re.fullmatch(rf"in at least one image {NP_PLAIN} is {REL} {NP_PLAIN}", sentence)
             or re.fullmatch(rf"one of the images shows {NP_PLAIN} {REL} {NP_PLAIN}", sentence)):
        return any(some_pair(objs, (m[1], m[2]), m[3], (m[4], m[5])) for objs in (left, right))
    raise AssertionError(f"unparsed statement: {sentence}")


def test_nlvr_labels_are_the_scene_truth(world: dict) -> None:
    for split in ("train", "dev", "test"):
        for row in world[f"nlvr/{split}.json"]:
            left, right = (objects(world, image) for image in row["images"])
            assert str(nlvr_truth(row["sentence"], left, right)) == row["label"], row


def ve_parse(sentence: str) -> tuple[str, str | None, tuple]:
    """(polarity, modifier or None, claim) of a hypothesis."""
    exist = [("pos", rf"(?:there is|the image shows|the picture contains) {NP}{MOD}"),
             ("neg", rf"(?:there is no|the picture contains no) {SIZE}{COL} {SHP}{MOD}"),
             ("neg", rf"the image does not show {NP}{MOD}")]
    for polarity, pattern in exist:
        if m := re.fullmatch(pattern, sentence):
            return polarity, m[4], ("exist", m[2], m[3], m[1])
    relation = [("pos", rf"(?:a|an) {COL} {SHP}{MOD} is {REL} {NP_PLAIN}"),
                ("pos", rf"there is (?:a|an) {COL} {SHP}{MOD} {REL} {NP_PLAIN}"),
                ("neg", rf"no {COL} {SHP}{MOD} is {REL} {NP_PLAIN}"),
                ("neg", rf"there is no {COL} {SHP}{MOD} {REL} {NP_PLAIN}")]
    for polarity, pattern in relation:
        if m := re.fullmatch(pattern, sentence):
            return polarity, m[3], ("relation", (m[1], m[2]), m[4], (m[5], m[6]))
    raise AssertionError(f"unparsed hypothesis: {sentence}")


def test_classification_labels_are_the_shapes_and_colours_present(world: dict) -> None:
    for split, count in (("train", 30), ("val", 20)):
        rows = world[f"classification/{split}.json"]
        assert len(rows) == count
        for row in rows:
            assert row["image"].startswith(f"images/classification_{split}/")
            objs = objects(world, row["image"])
            assert sorted(row["labels"]) == sorted({o["shape"] for o in objs} | {o["color"] for o in objs})


def test_classification_images_leave_the_other_splits_unchanged(world_root: Path, tmp_path: Path) -> None:
    generate_demo_world(tmp_path, DemoWorldConfig(**{**SMALL, "classification_images": {"train": 5, "val": 3}}),
                        progress=False)
    first, second = tree(world_root), tree(tmp_path)
    changed = {name for name in first.keys() & second.keys() if first[name] != second[name]}
    assert changed == {"manifest.json", "meta/scenes.json", "classification/train.json",
                       "classification/val.json"}
    assert {n for n in first.keys() ^ second.keys() if not n.startswith("images/classification_")} == set()


def test_ve_labels_follow_from_the_scene(world: dict) -> None:
    for split in ("train", "dev", "test"):
        for row in world[f"ve/{split}.json"]:
            polarity, modifier, claim = ve_parse(row["sentence"])
            objs = objects(world, row["image"])
            if claim[0] == "exist":
                true = bool(matching(objs, claim[1], claim[2], claim[3]))
            else:
                true = some_pair(objs, claim[1], claim[2], claim[3])
            if modifier and true:  # the image cannot show what something is made of
                expected = "neutral"
            elif polarity == "pos":
                expected = "entailment" if true else "contradiction"
            else:
                expected = "contradiction" if true else "entailment"
            assert row["label"] == expected, row


# ------------------------------------------------------------------- balance and text-only priors


def test_labels_are_balanced(world: dict) -> None:
    for split in ("train", "dev", "test"):
        nlvr = Counter(r["label"] for r in world[f"nlvr/{split}.json"])
        assert abs(nlvr["True"] - nlvr["False"]) <= 1
        ve = Counter(r["label"] for r in world[f"ve/{split}.json"])
        assert set(ve) == {"entailment", "neutral", "contradiction"}
        assert max(ve.values()) - min(ve.values()) <= 1
    for split in ("train", "val"):
        per_type: dict[str, Counter] = defaultdict(Counter)
        for row in world[f"vqa/{split}.json"]:
            question_type, answer = vqa_truth(row["question"], objects(world, row["image"]))
            per_type[question_type][answer] += 1
        assert set(per_type) == {"color", "shape", "count", "exist", "relation"}
        possible = {"color": 9, "shape": 7, "count": 5, "exist": 2, "relation": 7}
        for question_type, counts in per_type.items():
            assert len(counts) == possible[question_type], (split, question_type, counts)
            assert max(counts.values()) - min(counts.values()) <= 2, (split, question_type, counts)


def skeleton(sentence: str) -> str:
    """The sentence with content words replaced: what a text-only model can key on at best."""
    sentence = re.sub(MOD.rstrip("?"), " MOD", sentence)
    sentence = re.sub(r"\ban\b", "a", sentence)
    sentence = re.sub(r"\b(" + "|".join(REL_WORDS) + r")\b", "REL", sentence)
    sentence = re.sub(r"\b(" + "|".join([*COLOR_WORDS, *SIZE_WORDS, *NUMBERS]) + r")\b", "W", sentence)
    return re.sub(rf"\b{SHP}{PLURAL}?\b", "S", sentence)


def text_only_accuracy(train: list[dict], held_out: list[dict]) -> float:
    """Accuracy on ``held_out`` of the majority label per sentence skeleton learnt on ``train``."""
    groups: dict[str, Counter] = defaultdict(Counter)
    for row in train:
        groups[skeleton(row["sentence"])][row["label"]] += 1
    overall = Counter(r["label"] for r in train).most_common(1)[0][0]
    guess = {k: c.most_common(1)[0][0] for k, c in groups.items()}
    return sum(guess.get(skeleton(r["sentence"]), overall) == r["label"] for r in held_out) / len(held_out)


def test_text_alone_does_not_give_the_label(world: dict) -> None:
    # Every VE template is 50/50 between two of the three labels by design (chance: 1/3, text-only
    # ceiling: 1/2); NLVR statements are drawn before their images (chance and ceiling: 1/2).
    ve_eval = world["ve/dev.json"] + world["ve/test.json"]
    assert text_only_accuracy(world["ve/train.json"], ve_eval) < 0.62
    nlvr_eval = world["nlvr/dev.json"] + world["nlvr/test.json"]
    assert text_only_accuracy(world["nlvr/train.json"], nlvr_eval) < 0.7


# ------------------------------------------------------------------------------------ baselines


def test_manifest_baselines(world: dict) -> None:
    baselines = world["manifest"]["baselines"]
    n = SMALL["retrieval_images"]["test"]
    retrieval = baselines["retrieval_test"]
    for k in (1, 5, 10):
        captions = 5 * n
        miss = 1.0
        for i in range(k):  # draw k captions one by one, none of the image's five
            miss *= (captions - 5 - i) / (captions - i)
        assert retrieval[f"txt_r{k}"] == pytest.approx(100 * (1 - miss))
        assert retrieval[f"img_r{k}"] == pytest.approx(100 * k / n)
    assert retrieval["r_mean"] == pytest.approx(sum(retrieval[f"{m}_r{k}"] for m in ("txt", "img")
                                                    for k in (1, 5, 10)) / 6)

    val = world["vqa/val.json"]
    answers = world["vqa/answer_list.json"]

    def accuracy(guess: str, rows: list[dict]) -> float:
        # Scored as the official VQA evaluation scores it: where the annotators disagree, number
        # words and digits are the same answer; the mean over the leave-one-annotator-out subsets.
        digits = {"none": "0", **{word: str(n) for word, n in NUMBERS.items()}}
        total = 0.0
        for r in rows:
            answers, given = r["answer"], guess
            if len(set(answers)) > 1:
                answers, given = [digits.get(a, a) for a in answers], digits.get(guess, guess)
            total += sum(min((answers[:i] + answers[i + 1:]).count(given) / 3, 1)
                         for i in range(len(answers))) / len(answers)
        return 100 * total / len(rows)

    best = max(accuracy(a, val) for a in answers)
    vqa = baselines["vqa_val"]
    assert vqa["majority_accuracy"] == pytest.approx(best)
    assert accuracy(vqa["majority_answer"], val) == pytest.approx(best)
    weighted = 0.0
    for question_type, entry in vqa["question_type_prior"].items():
        subset = [r for r in val if world["qtypes"][str(r["question_id"])] == question_type]
        assert entry["questions"] == len(subset)
        assert entry["accuracy"] == pytest.approx(max(accuracy(a, subset) for a in answers))
        weighted += entry["accuracy"] * len(subset)
    assert vqa["question_type_prior_accuracy"] == pytest.approx(weighted / len(val))
    assert vqa["question_type_prior_accuracy"] < 50  # the question alone is a weak guide

    for task in ("nlvr", "ve"):
        for split in ("dev", "test"):
            counts = Counter(r["label"] for r in world[f"{task}/{split}.json"])
            entry = baselines[task][split]
            assert entry["accuracy"] == pytest.approx(100 * max(counts.values()) / sum(counts.values()))
            assert counts[entry["majority_label"]] == max(counts.values())


def test_texts_use_the_builtin_vocabulary(world: dict) -> None:
    from codis.text import load_tokenizer
    texts = [p["caption"] for p in world["pretrain/captions.json"]]
    texts += [r["question"] for r in world["vqa/train.json"]] + world["vqa/answer_list.json"]
    texts += [r["sentence"] for s in ("train", "dev") for t in ("nlvr", "ve") for r in world[f"{t}/{s}.json"]]
    words = sorted({w for t in texts for w in t.split()})
    tokenizer = load_tokenizer("builtin")
    ids = tokenizer(words, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in {i for row in ids for i in row}
    vocab = tokenizer.get_vocab()
    whole = [w for w in words if w in vocab]
    assert len(whole) >= 0.9 * len(words)  # only plurals like "circles" are split into pieces


# ---------------------------------------------------------------------------------- bad config


@pytest.mark.parametrize(("changes", "field"), [
    ({"image_size": 16}, "image_size"),
    ({"seed": -1}, "seed"),
    ({"pretrain_images": 0}, "pretrain_images"),
    ({"captions_per_pretrain_image": True}, "captions_per_pretrain_image"),
    ({"retrieval_images": {"train": 5, "test": 5}}, "retrieval_images"),
    ({"vqa_images": {"train": 5, "val": 0, "test": 5}}, "vqa_images"),
    ({"nlvr_pairs": {"train": 5, "val": 5, "test": 5}}, "nlvr_pairs"),
    ({"ve_images": {"train": 5, "dev": 2.5, "test": 5}}, "ve_images"),
    ({"classification_images": {"train": 5}}, "classification_images"),
    ({"questions_per_image": 0}, "questions_per_image"),
    ({"hypotheses_per_image": 7}, "hypotheses_per_image"),
    ({"dead_urls": -1}, "dead_urls"),
    ({"jpeg_quality": 100}, "jpeg_quality"),
])
def test_bad_config_names_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"demo_world\.{field}\b") as raised:
        DemoWorldConfig(**changes)
    assert isinstance(raised.value, ValueError)


def test_config_copies_split_dicts() -> None:
    splits = {"train": 3, "val": 2, "test": 2}
    config = DemoWorldConfig(retrieval_images=splits)
    splits["test"] = 50
    assert config.retrieval_images["test"] == 2


def test_retrieval_chance_matches_a_simulation() -> None:
    # An independent check of the chance levels in the manifest: rank at random, count the hits.
    import random
    rng = random.Random(0)
    n, k, trials = 6, 5, 20000
    captions = list(range(5 * n))
    text_hits = sum(any(c // 5 == 0 for c in rng.sample(captions, k)) for _ in range(trials)) / trials
    image_hits = sum(0 in rng.sample(range(n), k) for _ in range(trials)) / trials
    chance = retrieval_chance(n, 5)
    assert chance[f"txt_r{k}"] == pytest.approx(100 * text_hits, abs=1.5)
    assert chance[f"img_r{k}"] == pytest.approx(100 * image_hits, abs=1.5)
    assert chance["img_r10"] == 100.0  # 10 of 6 images: every caption finds its image


def test_vqa_baselines_score_answers_as_the_evaluation_does() -> None:
    # "two" and "2" are one answer to the VQA evaluation when the annotators disagree, so the best
    # constant answer is "2", given by 4 of 5 annotators in both rows (every leave-one-out subset
    # keeps 3 of them: 100).
    rows = [{"question_id": 0, "answer": ["two", "two", "2", "2", "3"]},
            {"question_id": 1, "answer": ["2", "2", "2", "2", "3"]}]
    labels = {"dev": [{"label": "True"}], "test": [{"label": "False"}]}
    baselines = trivial_baselines(4, rows, {"0": "count", "1": "count"}, ["2", "3", "two"],
                                  labels, labels)
    vqa = baselines["vqa_val"]
    assert (vqa["majority_answer"], vqa["majority_accuracy"]) == ("2", 100.0)
    assert vqa["question_type_prior"] == {"count": {"answer": "2", "accuracy": 100.0, "questions": 2}}
    assert baselines["retrieval_test"] == {"images": 4, "captions": 20, **retrieval_chance(4, 5)}
