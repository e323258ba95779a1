"""write_shards: round trip through webdataset, validation before writing, atomic and resumable runs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

import codis  # noqa: F401
from codis.config import ConfigError
from codis.data import shards as shards_module
from codis.data.shards import MANIFEST, PROGRESS, TEXT_FIELD, image_files, write_shards


def make_images(root: Path, names: list[str], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        pixels = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / name, format="JPEG", quality=90)


def records_of(kind: str, n: int) -> list[dict]:
    """n records of ``kind`` over images img/{i}.jpg (nlvr: img/{i}.jpg and img/{i+1}.jpg)."""
    image = lambda i: f"img/{i % 8}.jpg"  # noqa: E731 - images are shared between records
    make = {
        "pretrain": lambda i: {"image": image(i), "caption": f"A photo, number {i}."},
        "retrieval_train": lambda i: {"image": image(i), "caption": f"caption {i}", "image_id": i // 2},
        "retrieval_eval": lambda i: {"image": image(i), "caption": [f"c{i}-{j}" for j in range(5)]},
        "vqa": lambda i: {"question_id": 100 + i, "question": f"What is {i}?", "image": image(i),
                          "answer": ["yes", "yes", "no"], "dataset": "vqa"},
        "nlvr": lambda i: {"images": [image(i), image(i + 1)], "sentence": f"left {i}",
                           "label": "True" if i % 2 else "False"},
        "ve": lambda i: {"image": image(i), "sentence": f"a hypothesis {i}",
                         "label": ("entailment", "neutral", "contradiction")[i % 3]},
    }[kind]
    return [make(i) for i in range(n)]


@pytest.fixture()
def image_root(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    make_images(root, [f"img/{i}.jpg" for i in range(8)])
    return root


def read_back(folder: Path, manifest: dict) -> list[dict]:
    urls = [str(folder / entry["name"]) for entry in manifest["shards"]]
    return list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


def file_state(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


@pytest.mark.parametrize("kind", ["pretrain", "retrieval_train", "retrieval_eval", "vqa", "nlvr", "ve"])
def test_round_trip(kind: str, image_root: Path, tmp_path: Path) -> None:
    records = records_of(kind, 11)
    out = tmp_path / "shards"
    manifest = write_shards(records, image_root, out, kind=kind, samples_per_shard=4,
                            source={"annotation": "ann.json"}, progress=False)

    assert manifest["num_samples"] == 11 and manifest["num_shards"] == 3
    assert [e["count"] for e in manifest["shards"]] == [4, 4, 3]
    assert manifest["source"]["annotation"] == "ann.json"
    assert manifest["source"]["image_root"] == str(image_root)
    assert json.loads((out / MANIFEST).read_text()) == manifest
    # nothing but the shards and the manifest: no temporary or progress files
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST] + [e["name"] for e in manifest["shards"]])
    for entry in manifest["shards"]:
        assert hashlib.sha256((out / entry["name"]).read_bytes()).hexdigest() == entry["sha256"]

    samples = read_back(out, manifest)
    assert len(samples) == len(records)
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(11)]
    for entry, start in zip(manifest["shards"], (0, 4, 8)):
        assert entry["first_key"] == f"{start:09d}"
        assert entry["last_key"] == f"{start + entry['count'] - 1:09d}"
    for record, sample in zip(records, samples):
        paths = record["images"] if kind == "nlvr" else [record["image"]]
        members = ["0.jpg", "1.jpg"] if kind == "nlvr" else ["jpg"]
        for member, path in zip(members, paths):
            assert sample[member] == (image_root / path).read_bytes()
        restored = json.loads(sample["json"])
        if kind in TEXT_FIELD:
            restored[TEXT_FIELD[kind]] = sample["txt"].decode("utf-8")
        else:
            assert "txt" not in sample
        assert restored == record


def test_missing_images_fail_before_writing(image_root: Path, tmp_path: Path) -> None:
    records = records_of("pretrain", 4) + [{"image": f"gone/{i}.jpg", "caption": "x"} for i in range(7)]
    out = tmp_path / "shards"
    with pytest.raises(FileNotFoundError) as info:
        write_shards(records, image_root, out, kind="pretrain", progress=False)
    message = str(info.value)
    assert "7 referenced image" in message
    for i in range(5):
        assert f"gone/{i}.jpg" in message
    assert "gone/5.jpg" not in message
    assert not out.exists()


def test_missing_nlvr_second_image_is_reported(image_root: Path, tmp_path: Path) -> None:
    records = [{"images": ["img/0.jpg", "img/nope.jpg"], "sentence": "s", "label": "True"}]
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        write_shards(records, image_root, tmp_path / "out", kind="nlvr", progress=False)


@pytest.mark.parametrize("kind,record,needle", [
    ("pretrain", {"image": "img/0.jpg", "text": "no caption key"}, "record 2: missing key 'caption'"),
    ("retrieval_train", {"image": "img/0.jpg", "caption": "c"}, "record 2: missing key 'image_id'"),
    ("nlvr", {"images": ["img/0.jpg"], "sentence": "s", "label": "True"}, "record 2: 'images'"),
    ("ve", {"image": "img/0.jpg", "sentence": "s", "label": "maybe"}, "record 2: 'label'"),
    ("retrieval_eval", {"image": "img/0.jpg", "caption": "one string"}, "record 2: 'caption'"),
])
def test_bad_record_fails_before_writing(kind: str, record: dict, needle: str, image_root: Path,
                                         tmp_path: Path) -> None:
    records = records_of(kind, 2) + [record]
    out = tmp_path / "shards"
    with pytest.raises(ValueError) as info:
        write_shards(records, image_root, out, kind=kind, progress=False)
    assert needle in str(info.value)
    assert not out.exists()


@pytest.mark.parametrize("changes, field", [({"kind": "captions"}, "kind"),
                                            ({"samples_per_shard": 0}, "samples_per_shard"),
                                            ({"samples_per_shard": True}, "samples_per_shard")])
def test_bad_arguments_name_the_field(image_root: Path, tmp_path: Path, changes: dict, field: str) -> None:
    arguments = {"kind": "pretrain", "progress": False, **changes}
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        write_shards(records_of("pretrain", 2), image_root, tmp_path / "o", **arguments)
    assert not (tmp_path / "o").exists()


def test_image_paths_resolve_as_albef_opens_them(tmp_path: Path) -> None:
    root, vg = tmp_path / "coco", tmp_path / "vg"
    ve = [{"image": "2248275918", "sentence": "s", "label": "neutral"},
          {"image": "sub/7.png", "sentence": "s", "label": "neutral"}]
    assert image_files(ve, "ve", root) == [[root / "2248275918.jpg"], [root / "sub/7.png"]]
    # the suffix rule is SNLI-VE's alone
    assert image_files([{"image": "12", "caption": "c"}], "pretrain", root) == [[root / "12"]]
    prefix = "/export/share/datasets/vision/coco/images/"
    pretrain = [{"image": prefix + "train2014/a.jpg", "caption": "c"},
                {"image": "/elsewhere/b.jpg", "caption": "c"}, {"image": "c.jpg", "caption": "c"}]
    assert image_files(pretrain, "pretrain", root, image_prefix=prefix) == [
        [root / "train2014/a.jpg"], [Path("/elsewhere/b.jpg")], [root / "c.jpg"]]
    vqa = [{"image": "a.jpg", "dataset": "vqa"}, {"image": "image/1.jpg", "dataset": "vg"},
           {"image": "b.jpg"}]
    assert image_files(vqa, "vqa", root, image_roots={"vqa": root, "vg": vg}) == [
        [root / "a.jpg"], [vg / "image/1.jpg"], [root / "b.jpg"]]
    assert image_files(vqa, "vqa", root) == [[root / "a.jpg"], [root / "image/1.jpg"], [root / "b.jpg"]]
    with pytest.raises(ValueError, match=r"^record 2: no image root"):
        image_files(vqa, "vqa", None, image_roots={"vqa": root, "vg": vg})


@pytest.mark.parametrize("changes, field", [({"image_roots": ["a"]}, "image_roots"),
                                            ({"image_roots": {"vqa": 3}}, "image_roots"),
                                            ({"image_root": None}, "image_root"),
                                            ({"image_prefix": ""}, "image_prefix")])
def test_bad_image_root_arguments_name_the_field(image_root: Path, tmp_path: Path, changes: dict,
                                                 field: str) -> None:
    arguments = {"image_root": image_root, "kind": "vqa", "progress": False, **changes}
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        write_shards(records_of("vqa", 2), output_dir=tmp_path / "o", **arguments)
    assert not (tmp_path / "o").exists()


def test_interrupted_run_resumes(image_root: Path, tmp_path: Path, monkeypatch) -> None:
    records = records_of("pretrain", 10)
    reference = write_shards(records, image_root, tmp_path / "reference", kind="pretrain",
                             samples_per_shard=3, progress=False)

    out = tmp_path / "shards"
    original_write = wds.TarWriter.write
    calls = {"n": 0}

    def crash_in_third_shard(self, obj):
        calls["n"] += 1
        if calls["n"] == 8:  # shards 0 and 1 hold samples 1-6; crash inside shard 2
            raise RuntimeError("simulated crash")
        return original_write(self, obj)

    monkeypatch.setattr(wds.TarWriter, "write", crash_in_third_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_shards(records, image_root, out, kind="pretrain", samples_per_shard=3, progress=False)
    monkeypatch.undo()

    names = sorted(p.name for p in out.iterdir())
    assert names == [PROGRESS, "shard-000000.tar", "shard-000001.tar"]  # no partial, no temp
    progress = json.loads((out / PROGRESS).read_text())
    assert [e["name"] for e in progress["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    before = {name: file_state(out / name) for name in ("shard-000000.tar", "shard-000001.tar")}

    resumed = write_shards(records, image_root, out, kind="pretrain", samples_per_shard=3,
                           progress=False)
    for name, state in before.items():
        assert file_state(out / name) == state  # completed shards were not rewritten
    assert resumed == reference
    for entry in reference["shards"]:
        assert (out / entry["name"]).read_bytes() == (tmp_path / "reference" / entry["name"]).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST] + [e["name"] for e in reference["shards"]])


def test_rerun_skips_everything(image_root: Path, tmp_path: Path, monkeypatch) -> None:
    records = records_of("vqa", 7)
    out = tmp_path / "shards"
    first = write_shards(records, image_root, out, kind="vqa", samples_per_shard=2, progress=False)
    states = {e["name"]: file_state(out / e["name"]) for e in first["shards"]}

    def no_writes(*args, **kwargs):
        raise AssertionError("a shard was rewritten")

    monkeypatch.setattr(shards_module, "_write_shard", no_writes)
    second = write_shards(records, image_root, out, kind="vqa", samples_per_shard=2, progress=False)
    assert second == first
    assert {name: file_state(out / name) for name in states} == states


def test_tampered_and_changed_shards_are_rewritten(image_root: Path, tmp_path: Path) -> None:
    records = records_of("pretrain", 9)
    out = tmp_path / "shards"
    first = write_shards(records, image_root, out, kind="pretrain", samples_per_shard=3, progress=False)
    states = {e["name"]: file_state(out / e["name"]) for e in first["shards"]}

    tampered = out / "shard-000001.tar"
    data = bytearray(tampered.read_bytes())
    data[600] ^= 0xFF
    os.chmod(tampered, 0o644)
    tampered.write_bytes(bytes(data))
    second = write_shards(records, image_root, out, kind="pretrain", samples_per_shard=3, progress=False)
    assert second == first
    assert hashlib.sha256(tampered.read_bytes()).hexdigest() == first["shards"][1]["sha256"]
    assert file_state(out / "shard-000000.tar") == states["shard-000000.tar"]
    assert file_state(out / "shard-000002.tar") == states["shard-000002.tar"]

    # a changed record invalidates exactly its shard
    records[7]["caption"] = "a different caption"
    third = write_shards(records, image_root, out, kind="pretrain", samples_per_shard=3, progress=False)
    assert third["shards"][2]["sha256"] != first["shards"][2]["sha256"]
    assert third["shards"][:2] == first["shards"][:2]
    assert file_state(out / "shard-000000.tar") == states["shard-000000.tar"]
    assert read_back(out, third)[7]["txt"].decode() == "a different caption"

    # fewer records: the shards past the end go, the manifest lists what is left
    fourth = write_shards(records[:5], image_root, out, kind="pretrain", samples_per_shard=3,
                          progress=False)
    assert [e["count"] for e in fourth["shards"]] == [3, 2]
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "shard-000000.tar", "shard-000001.tar"]
