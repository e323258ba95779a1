"""Every annotation file in ALBEF's released formats shards and loads unedited.

The annotation files are hand-written in the released layouts (tests/fixtures/released, see its
README), not by the demo world generator; the images they name are generated here, at the paths
ALBEF's own dataset code would open, under image roots in ``tmp_path``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image

import codis  # noqa: F401
from codis.config import ConfigError
from codis.data.loaders import (VE_LABEL_IDS, nlvr_loader, pretrain_loader, retrieval_eval_loader,
                                retrieval_train_loader, ve_loader, vqa_loader)
from codis.data.manifest import read_annotations
from codis.data.shards import write_shards
from codis.tasks.vqa import load_answer_list
from codis.text import clean_caption, load_tokenizer
from codis.transforms import eval_transform

RELEASED = Path(__file__).parent / "fixtures" / "released"
REPO = Path(__file__).resolve().parents[1]
SIZE = 16
COCO_PREFIX = "/export/share/datasets/vision/coco/images/"  # ALBEF's pretraining coco.json
VG_PREFIX = "/export/share/datasets/vision/visual-genome/"  # ALBEF's pretraining vg.json


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin")


def released(name: str) -> list[dict]:
    return json.loads((RELEASED / name).read_text(encoding="utf-8"))


def make_image(path: Path) -> Path:
    """A small image of its own pixels at ``path`` (PNG or JPEG by suffix); an existing one is kept."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        seed = int.from_bytes(str(path).encode()[-8:], "little")
        pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, format="PNG" if path.suffix == ".png" else "JPEG")
    return path


def raw_samples(folder: Path) -> dict[str, dict]:
    """The samples of a shard folder as stored (undecoded), by key."""
    manifest = json.loads((folder / "manifest.json").read_text())
    urls = [str(folder / entry["name"]) for entry in manifest["shards"]]
    return {s["__key__"]: s for s in wds.DataPipeline(wds.SimpleShardList(urls),
                                                      wds.tarfile_to_samples())}


def evaluation_image(path: Path) -> torch.Tensor:
    return eval_transform(SIZE)(Image.open(path).convert("RGB"))


def batches(loader) -> list[dict]:
    return list(loader)


# ---- pretraining ----------------------------------------------------------------------------------
def test_coco_and_vg_pretraining_files_with_absolute_server_paths(tmp_path: Path, tokenizer) -> None:
    coco_root, vg_root = tmp_path / "coco", tmp_path / "visual_genome"
    folders, expected = [], {}
    for name, root, prefix in (("coco.json", coco_root, COCO_PREFIX), ("vg.json", vg_root, VG_PREFIX)):
        records = released(name)
        assert all(r["image"].startswith(prefix) for r in records)  # as released: absolute
        files = [make_image(root / r["image"][len(prefix):]) for r in records]
        out = tmp_path / name.removesuffix(".json")
        manifest = write_shards(records, root, out, kind="pretrain", samples_per_shard=2,
                                image_prefix=prefix, progress=False)
        assert manifest["source"]["image_prefix"] == prefix
        stored = raw_samples(out)
        for index, (record, file) in enumerate(zip(records, files)):
            sample = stored[f"{index:09d}"]
            assert sample["jpg"] == file.read_bytes()
            assert sample["txt"].decode() == record["caption"]
            assert json.loads(sample["json"])["image"] == record["image"]  # the record unedited
        folders.append(out)
        expected.update({(out.name, f"{i:09d}"): r["caption"] for i, r in enumerate(records)})

    # without the prefix, the absolute server paths are looked up as they are
    with pytest.raises(FileNotFoundError, match="/export/share/datasets/vision/coco/images/train2014"):
        write_shards(released("coco.json"), coco_root, tmp_path / "unmapped", kind="pretrain",
                     progress=False)

    tars = [str(p) for folder in folders for p in sorted(folder.glob("*.tar"))]
    loader = pretrain_loader(tars, tokenizer=tokenizer, image_size=SIZE, batch_size=6,
                             drop_last=False, shuffle_buffer=0)
    (batch,) = batches(loader)
    assert batch["image"].shape == (6, 3, SIZE, SIZE)
    assert sorted(batch["caption"]) == sorted(clean_caption(c) for c in expected.values())
    assert batch["input_ids"].shape[0] == 6 and loader.skips.count == 0


def caption_list_shards(tmp_path: Path) -> tuple[list[dict], Path]:
    records = released("caption_lists.json")
    for record in records:
        make_image(tmp_path / "images" / record["image"])
    out = tmp_path / "shards"
    write_shards(records, tmp_path / "images", out, kind="pretrain", samples_per_shard=2,
                 progress=False)
    return records, out


def test_caption_lists_stay_lists_in_the_shards(tmp_path: Path) -> None:
    records, out = caption_list_shards(tmp_path)
    stored = raw_samples(out)
    for index, record in enumerate(records):
        sample = stored[f"{index:09d}"]
        if isinstance(record["caption"], list):
            assert "txt" not in sample
            assert json.loads(sample["json"])["caption"] == record["caption"]
        else:
            assert sample["txt"].decode() == record["caption"]


def test_one_caption_is_drawn_per_sample_and_epoch_seeded(tmp_path: Path, tokenizer) -> None:
    records, out = caption_list_shards(tmp_path)

    def drawn(epoch: int, seed: int = 5, workers: int = 0, global_seed: int = 0) -> dict[str, str]:
        random.seed(global_seed)  # the draw must not come from the global RNGs
        torch.manual_seed(global_seed)
        loader = pretrain_loader(str(out), tokenizer=tokenizer, image_size=SIZE, batch_size=1,
                                 seed=seed, epoch=epoch, num_workers=workers, shuffle_buffer=2)
        return {key: caption for batch in loader for key, caption in zip(batch["key"], batch["caption"])}

    first = drawn(0)
    assert set(first) == {f"{i:09d}" for i in range(len(records))}
    for index, record in enumerate(records):
        captions = record["caption"] if isinstance(record["caption"], list) else [record["caption"]]
        assert first[f"{index:09d}"] in [clean_caption(c) for c in captions]
    assert first == drawn(0, global_seed=1) == drawn(0, workers=2, global_seed=2)
    epochs = [drawn(epoch) for epoch in range(8)]
    for index, record in enumerate(records):
        seen = {captions[f"{index:09d}"] for captions in epochs}
        # a list draws anew each epoch (8 epochs from 4 or 3 captions: not all alike); a string never varies
        assert len(seen) > 1 if isinstance(record["caption"], list) else len(seen) == 1
    assert drawn(0, seed=6) != first or drawn(1, seed=6) != epochs[1]


@pytest.mark.parametrize("caption", [[], ["fine", 3]])
def test_a_bad_caption_list_is_named(tmp_path: Path, caption: list) -> None:
    make_image(tmp_path / "a.jpg")
    with pytest.raises(ValueError, match=r"record 0: 'caption' must be a non-empty list of strings"):
        write_shards([{"image": "a.jpg", "caption": caption}], tmp_path, tmp_path / "s",
                     kind="pretrain", progress=False)


# ---- retrieval ------------------------------------------------------------------------------------
@pytest.mark.parametrize("train_file, test_file", [("coco_train.json", "coco_test.json"),
                                                   ("flickr30k_train.json", "flickr30k_test.json")])
def test_retrieval_files(train_file: str, test_file: str, tmp_path: Path, tokenizer) -> None:
    root = tmp_path / "images"
    train, test = released(train_file), released(test_file)
    for record in train + test:
        make_image(root / record["image"])

    write_shards(train, root, tmp_path / "train", kind="retrieval_train", samples_per_shard=2,
                 progress=False)
    (batch,) = batches(retrieval_train_loader(str(tmp_path / "train"), image_size=SIZE,
                                              batch_size=len(train), tokenizer=tokenizer,
                                              drop_last=False))
    by_key = {int(key): index for index, key in enumerate(batch["key"])}
    ids = batch["image_id"].tolist() if isinstance(batch["image_id"], torch.Tensor) else batch["image_id"]
    assert [ids[by_key[i]] for i in range(len(train))] == [r["image_id"] for r in train]
    assert [batch["caption"][by_key[i]] for i in range(len(train))] == \
        [clean_caption(r["caption"]) for r in train]
    assert batch["image"].shape == (len(train), 3, SIZE, SIZE)

    write_shards(test, root, tmp_path / "test", kind="retrieval_eval", progress=False)
    (batch,) = batches(retrieval_eval_loader(str(tmp_path / "test"), image_size=SIZE,
                                             batch_size=len(test), tokenizer=tokenizer))
    assert batch["caption"] == [[clean_caption(c) for c in r["caption"]] for r in test]
    assert batch["text_image_index"].tolist() == [i for i, r in enumerate(test) for _ in r["caption"]]
    assert batch["input_ids"].shape[0] == sum(len(r["caption"]) for r in test)
    for index, record in enumerate(test):
        assert torch.allclose(batch["image"][index], evaluation_image(root / record["image"]))


# ---- VQA and VG-QA --------------------------------------------------------------------------------
def test_vqa_and_vg_qa_in_one_source_with_per_record_roots(tmp_path: Path, tokenizer) -> None:
    coco, vg = tmp_path / "coco", tmp_path / "visual_genome"
    files = [RELEASED / "vqa_train.json", RELEASED / "vg_qa.json"]
    records = read_annotations(files)
    expected = [make_image((coco if r["dataset"] == "vqa" else vg) / r["image"]) for r in records]
    out = tmp_path / "train"
    manifest = write_shards(records, None, out, kind="vqa", samples_per_shard=2,
                            image_roots={"vqa": coco, "vg": vg}, progress=False)
    assert manifest["source"]["image_roots"] == {"vqa": str(coco), "vg": str(vg)}
    stored = raw_samples(out)
    for index, file in enumerate(expected):
        assert stored[f"{index:09d}"]["jpg"] == file.read_bytes()

    (batch,) = batches(vqa_loader(str(out), image_size=SIZE, batch_size=len(records),
                                  tokenizer=tokenizer))
    assert batch["question_id"].tolist() == [r["question_id"] for r in records]
    assert batch["question"][0] == "what is this photo taken looking through"
    # ALBEF's targets: each distinct annotator answer by its share; a VG answer weighs 0.5
    assert batch["answers"][0] == ["net", "netting", "mesh"]
    assert batch["answer_weights"][0] == pytest.approx([0.8, 0.1, 0.1])
    assert batch["answers"][3:] == [["two"], ["white"]]
    assert batch["answer_weights"][3:] == [[0.5], [0.5]]
    for index, file in enumerate(expected):
        assert torch.allclose(batch["image"][index], evaluation_image(file))

    # a dataset the roots do not name is refused before anything is written, naming the record
    with pytest.raises(ValueError, match=r"vg_qa.json: record 0: 'dataset' is 'vg', image_roots has 'vqa'"):
        write_shards(records, coco, tmp_path / "bad", kind="vqa", image_roots={"vqa": coco},
                     progress=False)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ConfigError, match="^image_root: "):
        write_shards(records, None, tmp_path / "bad", kind="vqa", progress=False)


def test_one_root_per_file_still_works(tmp_path: Path) -> None:
    # codis-4m.yaml's layout: vqa_train.json and vg_qa.json as separate sources, a root each
    for name, root in (("vqa_train.json", tmp_path / "coco"), ("vg_qa.json", tmp_path / "vg")):
        records = released(name)
        files = [make_image(root / r["image"]) for r in records]
        write_shards(records, root, tmp_path / name, kind="vqa", progress=False)
        stored = raw_samples(tmp_path / name)
        assert [stored[f"{i:09d}"]["jpg"] for i in range(len(records))] == [f.read_bytes() for f in files]


def test_vqa_test_file_and_answer_list(tmp_path: Path, tokenizer) -> None:
    records = released("vqa_test.json")
    for record in records:
        make_image(tmp_path / "coco" / record["image"])
    write_shards(records, None, tmp_path / "test", kind="vqa", image_roots={"vqa": tmp_path / "coco"},
                 source={"answer_list": str(RELEASED / "answer_list.json")}, progress=False)
    (batch,) = batches(vqa_loader(str(tmp_path / "test"), image_size=SIZE, batch_size=2,
                                  tokenizer=tokenizer))
    assert batch["question_id"].tolist() == [262144000, 262144001]
    assert batch["answers"] == [[], []] and batch["answer_weights"] == [[], []]
    assert load_answer_list(str(tmp_path / "test")) == released("answer_list.json")


# ---- NLVR2 and SNLI-VE ----------------------------------------------------------------------------
def test_nlvr2_file(tmp_path: Path, tokenizer) -> None:
    records = released("nlvr_dev.json")
    pairs = [[make_image(tmp_path / path) for path in r["images"]] for r in records]
    write_shards(records, tmp_path, tmp_path / "dev", kind="nlvr", progress=False)
    (batch,) = batches(nlvr_loader(str(tmp_path / "dev"), image_size=SIZE, batch_size=2,
                                   tokenizer=tokenizer))
    assert batch["label"].tolist() == [0, 1]  # "False", "True"
    assert batch["sentence"][1] == "one image contains exactly two dogs"
    for index, (left, right) in enumerate(pairs):  # PNGs, stored under the jpg member names
        assert torch.allclose(batch["image0"][index], evaluation_image(left))
        assert torch.allclose(batch["image1"][index], evaluation_image(right))


def test_snli_ve_bare_flickr_ids(tmp_path: Path, tokenizer) -> None:
    records = released("ve_test.json")
    root = tmp_path / "flickr30k-images"
    assert all("." not in r["image"] for r in records)  # as released: the id alone
    files = [make_image(root / f"{r['image']}.jpg") for r in records]  # ALBEF opens '%s.jpg'
    write_shards(records, root, tmp_path / "test", kind="ve", samples_per_shard=3, progress=False)
    stored = raw_samples(tmp_path / "test")
    for index, (record, file) in enumerate(zip(records, files)):
        assert stored[f"{index:09d}"]["jpg"] == file.read_bytes()
        assert json.loads(stored[f"{index:09d}"]["json"])["image"] == record["image"]
    batch = {k: v for b in batches(ve_loader(str(tmp_path / "test"), image_size=SIZE, batch_size=4,
                                             tokenizer=tokenizer)) for k, v in b.items()}
    assert batch["label"].tolist() == [VE_LABEL_IDS[r["label"]] for r in records] == [2, 1, 0, 0]
    for index, file in enumerate(files):
        assert torch.allclose(batch["image"][index], evaluation_image(file))

    # a path with a suffix (the demo world's) is opened as it is, not as '<path>.jpg'
    make_image(tmp_path / "named" / "1.png")
    write_shards([{**records[0], "image": "1.png"}], tmp_path / "named", tmp_path / "named-shards",
                 kind="ve", progress=False)


# ---- recipes: the source fields and the shard stage -----------------------------------------------
def test_recipe_sources_take_per_record_roots_and_a_prefix(tmp_path: Path, monkeypatch) -> None:
    from pydantic import ValidationError

    from flows import recipe as recipes
    from flows import stages
    from flows.store import Store
    from flows.tracking import Tracker

    source = recipes.AnnotationSource(
        name="vqa-vg", annotations=[str(RELEASED / "vqa_train.json"), str(RELEASED / "vg_qa.json")],
        image_roots={"vqa": str(tmp_path / "coco"), "vg": str(tmp_path / "vg")}, samples_per_shard=2)
    with pytest.raises(ValidationError, match="image_root: required unless image_roots"):
        recipes.AnnotationSource(annotations=[str(RELEASED / "vqa_train.json")])

    records = read_annotations(source.annotations)
    for record in records:
        make_image(tmp_path / ("coco" if record["dataset"] == "vqa" else "vg") / record["image"])
    ctx = stages.StageContext(store=Store(tmp_path / "store"), tracker=Tracker(None, "x"),
                              progress=False)
    result = stages.shard_stage(ctx, source, "vqa")
    assert result.outputs["samples"] == len(records)
    assert set(result.marker["inputs"]) == {"annotations", "image_root", "image_roots.vqa",
                                            "image_roots.vg"}
    assert stages.shard_stage(ctx, source, "vqa").cached

    pretrain = recipes.AnnotationSource(annotations=str(RELEASED / "coco.json"),
                                        image_root=str(tmp_path / "coco"), image_prefix=COCO_PREFIX)
    for record in released("coco.json"):
        make_image(tmp_path / "coco" / record["image"][len(COCO_PREFIX):])
    result = stages.shard_stage(ctx, pretrain, "pretrain")
    assert result.outputs["samples"] == 3 and result.marker["params"]["image_prefix"] == COCO_PREFIX

    # the per-record roots are inputs that must exist before any work
    data = yaml.safe_load((REPO / "pipelines" / "codis-4m.yaml").read_text(encoding="utf-8"))
    vqa = next(task for task in data["tasks"] if task["task"] == "vqa")
    vqa["train_data"] = [{"annotations": ["${CODIS_DATA}/albef/vqa_train.json",
                                          "${CODIS_DATA}/albef/vg_qa.json"],
                          "image_roots": {"vqa": "${CODIS_DATA}/coco", "vg": "${CODIS_DATA}/vg"}}]
    recipe = recipes.parse_recipe(data)
    monkeypatch.setenv("CODIS_DATA", str(tmp_path / "data"))
    with pytest.raises(recipes.RecipeError) as caught:
        recipes.check_inputs(recipe)
    index = data["tasks"].index(vqa)
    assert f"tasks.{index}.train_data.0.image_roots.vg: {tmp_path}/data/vg does not exist" \
        in str(caught.value)
