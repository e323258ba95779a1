"""Loaders over write_shards output: batch layout, skipping broken data, splits, determinism."""

from __future__ import annotations

import itertools
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import codis  # noqa: F401
from codis.config import ConfigError
from codis.data import loaders
from codis.data.loaders import (ExampleCache, ShardDataError, SkipCounter, nlvr_loader,
                                pretrain_loader, retrieval_eval_loader, retrieval_train_loader,
                                task_loader, ve_loader, vqa_loader)
from codis.data.shards import VERIFY_ENV, ShardIntegrityError, write_shards
from codis.text import clean_caption, load_tokenizer
from codis.transforms import normalize_on_device

N_IMAGES = 8


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin")


# Not the shared tiny_world: images of differing sizes and an undecodable file, which the tests
# of resizing and of skipping broken samples need.
@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        pixels = rng.integers(0, 256, size=(30 + 2 * i, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.jpg", quality=90)
    (root / "garbage.jpg").write_bytes(b"this is not a jpeg" * 20)
    return root


def caption_records(n: int) -> list[dict]:
    return [{"image": f"{i % N_IMAGES}.jpg", "caption": f"The Dog, on the LEFT of item #{i}!"}
            for i in range(n)]


def all_batches(loader) -> list[dict]:
    return list(loader)


def keys_of(batches: list[dict]) -> list[str]:
    return [key for batch in batches for key in batch["key"]]


def test_pretrain_batches(image_root: Path, tmp_path: Path, tokenizer) -> None:
    records = caption_records(10)
    write_shards(records, image_root, tmp_path / "s", kind="pretrain", samples_per_shard=4,
                 progress=False)
    loader = pretrain_loader(str(tmp_path / "s"), tokenizer=tokenizer, image_size=32, batch_size=4,
                             max_words=5, max_length=8, drop_last=True)
    batches = all_batches(loader)
    assert len(batches) == 2  # 10 samples, full batches of 4 only
    for batch in batches:
        # uint8 pixels: fit normalises them on the device
        assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.uint8
        assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[0] == 4
        assert batch["input_ids"].shape[1] <= 8
        assert batch["attention_mask"].shape == batch["input_ids"].shape
        assert len(batch["caption"]) == len(batch["key"]) == 4
        for key, caption in zip(batch["key"], batch["caption"]):
            assert caption == clean_caption(records[int(key)]["caption"], 5)
            assert len(caption.split()) == 5
        assert batch["image"].max() > 1  # bytes, not [0, 1] floats
    assert loader.skips.count == 0


def test_shuffle_is_seeded(image_root: Path, tmp_path: Path, tokenizer) -> None:
    write_shards(caption_records(24), image_root, tmp_path / "s", kind="pretrain",
                 samples_per_shard=4, progress=False)

    def order(seed: int, epoch: int) -> list[str]:
        return keys_of(pretrain_loader(str(tmp_path / "s"), tokenizer=tokenizer, image_size=16,
                                       batch_size=8, seed=seed, epoch=epoch, shuffle_buffer=10))

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert sorted(order(0, 1)) == sorted(order(0, 0))


def test_resampled_stream_does_not_end(image_root: Path, tmp_path: Path, tokenizer) -> None:
    write_shards(caption_records(6), image_root, tmp_path / "s", kind="pretrain",
                 samples_per_shard=2, progress=False)
    loader = pretrain_loader(str(tmp_path / "s"), tokenizer=tokenizer, image_size=16, batch_size=4,
                             resample=True, shuffle_buffer=4)
    batches = list(itertools.islice(loader, 5))  # 20 samples drawn from 6
    assert len(batches) == 5 and all(len(b["key"]) == 4 for b in batches)
    assert set(keys_of(batches)) <= {f"{i:09d}" for i in range(6)}


def _truncate_inside_second_sample(shard: Path) -> None:
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    second_image = next(m for m in members if m.name.endswith(".jpg") and m.name != members[0].name)
    data = shard.read_bytes()
    shard.chmod(0o644)
    shard.write_bytes(data[:second_image.offset_data + 50])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupted_image_member_is_skipped_and_counted(image_root: Path, tmp_path: Path, tokenizer,
                                                       num_workers: int) -> None:
    records = caption_records(12)
    records[5]["image"] = "garbage.jpg"
    write_shards(records, image_root, tmp_path / "s", kind="pretrain", samples_per_shard=3,
                 progress=False)
    loader = pretrain_loader(str(tmp_path / "s"), tokenizer=tokenizer, image_size=16, batch_size=2,
                             num_workers=num_workers, drop_last=False)
    keys = keys_of(all_batches(loader))
    assert sorted(keys) == [f"{i:09d}" for i in range(12) if i != 5]
    assert loader.skips.count == 1


def test_truncated_tar_is_skipped_and_counted(image_root: Path, tmp_path: Path, tokenizer,
                                              monkeypatch, caplog) -> None:
    manifest = write_shards(caption_records(12), image_root, tmp_path / "s", kind="pretrain",
                            samples_per_shard=3, progress=False)
    truncated = tmp_path / "s" / manifest["shards"][2]["name"]  # samples 6-8
    _truncate_inside_second_sample(truncated)
    with pytest.raises(ShardIntegrityError, match=rf"{truncated}: \d+ bytes, its manifest lists"):
        pretrain_loader(str(tmp_path / "s"), tokenizer=tokenizer, image_size=16, batch_size=2)
    # Unchecked (as a shard damaged after the check would be), the stream skips and counts.
    monkeypatch.setenv(VERIFY_ENV, "off")
    skips = SkipCounter()
    loader = pretrain_loader(str(tmp_path / "s"), tokenizer=tokenizer, image_size=16, batch_size=2,
                             drop_last=False, skips=skips)
    keys = keys_of(all_batches(loader))
    assert len(keys) == len(set(keys))
    intact = {f"{i:09d}" for i in (0, 1, 2, 3, 4, 5, 9, 10, 11)}
    assert intact <= set(keys)
    assert set(keys) - intact == {f"{6:09d}"}  # the sample before the cut survives
    assert loader.skips is skips and skips.count == 12 - len(keys) == 2  # 7 and 8, exactly
    assert f"{truncated}: read 1 sample(s), its manifest lists 3" in caplog.text


@pytest.mark.parametrize("num_workers", [0, 2])
def test_lost_samples_are_counted_exactly(image_root: Path, tmp_path: Path, tokenizer, monkeypatch,
                                          num_workers: int) -> None:
    """A tar cut between members ends without an error; a cut inside one raises on every later
    read. Either way the count is the manifest's samples minus those read, plus undecodable ones."""
    records = caption_records(24)
    records[1]["image"] = "garbage.jpg"
    manifest = write_shards(records, image_root, tmp_path / "s", kind="pretrain",
                            samples_per_shard=8, progress=False)
    monkeypatch.setenv(VERIFY_ENV, "off")
    between = tmp_path / "s" / manifest["shards"][1]["name"]
    with tarfile.open(between) as tar:
        fourth = [m for m in tar.getmembers() if m.name.startswith(f"{11:09d}.")][0]
    data = between.read_bytes()
    between.write_bytes(data[:fourth.offset])  # samples 8-10 whole, 11-15 gone, no end blocks
    _truncate_inside_second_sample(tmp_path / "s" / manifest["shards"][2]["name"])  # 17-23 gone
    skips = SkipCounter()
    keys = keys_of(all_batches(pretrain_loader(
        str(tmp_path / "s"), tokenizer=tokenizer, image_size=16, batch_size=4, drop_last=False,
        num_workers=num_workers, skips=skips)))
    expected = [i for i in range(24) if i != 1 and not 11 <= i <= 15 and not 17 <= i]
    assert sorted(keys) == [f"{i:09d}" for i in expected]
    assert skips.count == 24 - len(expected) == 1 + 5 + 7


def test_evaluation_names_the_shard_and_key_of_what_breaks(image_root: Path, tmp_path: Path,
                                                           monkeypatch) -> None:
    records = [{"image": "0.jpg", "sentence": "s", "label": "neutral"},
               {"image": "garbage.jpg", "sentence": "s", "label": "neutral"}]
    write_shards(records, image_root, tmp_path / "s", kind="ve", progress=False)
    shard = tmp_path / "s" / "shard-000000.tar"
    with pytest.raises(ShardDataError, match=rf"^{shard}: cannot decode member 'jpg' of sample "
                                             r"'000000001': "):
        all_batches(ve_loader(str(tmp_path / "s"), image_size=16, batch_size=2))

    records = [{"image": f"{i}.jpg", "sentence": "s", "label": "neutral"} for i in range(6)]
    manifest = write_shards(records, image_root, tmp_path / "t", kind="ve", samples_per_shard=3,
                            progress=False)
    shard = tmp_path / "t" / manifest["shards"][1]["name"]
    _truncate_inside_second_sample(shard)
    with pytest.raises(ShardIntegrityError, match=f"{shard}: "):  # checked before reading
        ve_loader(str(tmp_path / "t"), image_size=16, batch_size=2)
    monkeypatch.setenv(VERIFY_ENV, "off")
    with pytest.raises(ShardDataError, match=rf"^{shard}: the tar breaks at or after member "
                                             r"'000000004.jpg' \(sample '000000004'\): ReadError"):
        all_batches(ve_loader(str(tmp_path / "t"), image_size=16, batch_size=2))
    # a cut between members raises no error in the tar reader: the manifest's count catches it
    with tarfile.open(tmp_path / "s" / "shard-000000.tar") as tar:
        second = [m for m in tar.getmembers() if m.name.startswith(f"{1:09d}.")][0]
    first_only = tmp_path / "s" / "shard-000000.tar"
    first_only.write_bytes(first_only.read_bytes()[:second.offset])
    with pytest.raises(ShardDataError, match=rf"^{first_only}: read 1 sample\(s\), its manifest "
                                             r"lists 2 \(the last key read: '000000000'\)"):
        all_batches(ve_loader(str(tmp_path / "s"), image_size=16, batch_size=2))


def test_splits_see_every_sample_once(image_root: Path, tmp_path: Path, tokenizer,
                                      monkeypatch) -> None:
    write_shards(caption_records(15), image_root, tmp_path / "s", kind="pretrain",
                 samples_per_shard=2, progress=False)  # 8 shards
    expected = [f"{i:09d}" for i in range(15)]

    def keys_seen(epoch: int) -> list[str]:
        loader = pretrain_loader(str(tmp_path / "s"), tokenizer=tokenizer, image_size=16,
                                 batch_size=2, num_workers=2, drop_last=False, epoch=epoch)
        return keys_of(all_batches(loader))

    assert sorted(keys_seen(0)) == expected
    assert sorted(keys_seen(1)) == expected

    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append(keys_seen(0))
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == expected
    assert per_rank[0] and per_rank[1]


def _assert_same_batches(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for name in a:
            if isinstance(a[name], torch.Tensor):
                assert torch.equal(a[name], b[name])
            else:
                assert a[name] == b[name]


def test_retrieval_eval_loader(image_root: Path, tmp_path: Path, tokenizer) -> None:
    records = [{"image": f"{i}.jpg", "caption": [f"Caption {i}-{j}." for j in range(5)]}
               for i in range(7)]
    write_shards(records, image_root, tmp_path / "s", kind="retrieval_eval", samples_per_shard=3,
                 progress=False)
    make = lambda: retrieval_eval_loader(str(tmp_path / "s"), image_size=24, batch_size=2,  # noqa: E731
                                         tokenizer=tokenizer)
    first, second = all_batches(make()), all_batches(make())
    _assert_same_batches(first, second)
    assert keys_of(first) == [f"{i:09d}" for i in range(7)]  # record order, last batch kept
    batch = first[1]
    assert set(batch) == {"image", "image_index", "caption", "key", "shard", "text_image_index",
                          "input_ids", "attention_mask"}
    # samples 2 and 3 end the first shard of three and start the second
    assert batch["shard"] == [str(tmp_path / "s" / f"shard-00000{i}.tar") for i in (0, 1)]
    assert batch["image"].shape == (2, 3, 24, 24)
    assert batch["image_index"].tolist() == [2, 3]
    assert batch["caption"][0] == [clean_caption(c) for c in records[2]["caption"]]
    assert batch["text_image_index"].tolist() == [2] * 5 + [3] * 5
    assert batch["input_ids"].shape[0] == 10
    # eval transform: the same image gives the same tensor on every pass and no augmentation
    assert torch.equal(first[0]["image"], second[0]["image"])


def test_vqa_loader(image_root: Path, tmp_path: Path, tokenizer) -> None:
    records = [{"question_id": 7, "question": "What colour is it?", "image": "0.jpg",
                "answer": ["red", "red", "blue", "red"], "dataset": "vqa"},
               {"question_id": 8, "question": "Is it big?", "image": "1.jpg", "answer": "yes",
                "dataset": "vg"},
               {"question_id": 9, "question": "Where?", "image": "2.jpg", "dataset": "vqa"}]
    write_shards(records, image_root, tmp_path / "s", kind="vqa", samples_per_shard=2, progress=False)
    make = lambda: vqa_loader(str(tmp_path / "s"), image_size=16, batch_size=3,  # noqa: E731
                              tokenizer=tokenizer)
    first = all_batches(make())
    _assert_same_batches(first, all_batches(make()))
    (batch,) = first
    assert batch["question_id"].tolist() == [7, 8, 9]
    assert batch["question"] == ["what colour is it", "is it big", "where"]
    assert batch["answers"] == [["red", "blue"], ["yes"], []]
    assert batch["answer_weights"] == [[0.75, 0.25], [0.5], []]
    assert batch["image"].shape == (3, 3, 16, 16)
    assert batch["input_ids"].shape[0] == 3


def test_nlvr_and_ve_loaders(image_root: Path, tmp_path: Path, tokenizer) -> None:
    nlvr = [{"images": [f"{i}.jpg", f"{i + 1}.jpg"], "sentence": f"The left one, {i}.",
             "label": "True" if i % 2 else "False"} for i in range(5)]
    write_shards(nlvr, image_root, tmp_path / "nlvr", kind="nlvr", samples_per_shard=2,
                 progress=False)
    make = lambda: nlvr_loader(str(tmp_path / "nlvr"), image_size=16, batch_size=4,  # noqa: E731
                               tokenizer=tokenizer)
    first = all_batches(make())
    _assert_same_batches(first, all_batches(make()))
    assert set(first[0]) == {"image0", "image1", "sentence", "label", "key", "shard",
                             "input_ids", "attention_mask"}
    assert torch.cat([b["label"] for b in first]).tolist() == [0, 1, 0, 1, 0]
    assert first[0]["image0"].shape == first[0]["image1"].shape == (4, 3, 16, 16)
    # the right image of pair i is the left image of pair i + 1
    assert torch.equal(first[0]["image1"][0], first[0]["image0"][1])

    labels = ["contradiction", "entailment", "neutral", "entailment"]
    ve = [{"image": f"{i}.jpg", "sentence": f"Hypothesis {i}.", "label": label}
          for i, label in enumerate(labels)]
    write_shards(ve, image_root, tmp_path / "ve", kind="ve", samples_per_shard=3, progress=False)
    make = lambda: ve_loader(str(tmp_path / "ve"), image_size=16, batch_size=3)  # noqa: E731
    first = all_batches(make())
    _assert_same_batches(first, all_batches(make()))
    assert set(first[0]) == {"image", "sentence", "label", "key", "shard"}  # no tokenizer, no ids
    # ALBEF's ids (ve_dataset.py): contradiction 0, neutral 1, entailment 2
    assert torch.cat([b["label"] for b in first]).tolist() == [0, 2, 1, 2]
    assert first[0]["sentence"][0] == "hypothesis 0"


def test_training_without_augmentation_sees_the_evaluation_images(image_root: Path, tmp_path: Path) -> None:
    labels = ["contradiction", "entailment", "neutral", "entailment"]
    ve = [{"image": f"{i}.jpg", "sentence": f"Hypothesis {i}.", "label": label}
          for i, label in enumerate(labels)]
    write_shards(ve, image_root, tmp_path / "ve", kind="ve", samples_per_shard=4, progress=False)
    evaluation = {k: img for b in all_batches(ve_loader(str(tmp_path / "ve"), image_size=16, batch_size=4))
                  for k, img in zip(b["key"], b["image"])}

    def training(augment: bool) -> dict:
        loader = ve_loader(str(tmp_path / "ve"), image_size=16, batch_size=2, train=True, seed=1,
                           augment=augment, shuffle_buffer=4)
        return {k: img for b in all_batches(loader) for k, img in zip(b["key"], b["image"])}

    plain, augmented = training(False), training(True)
    assert set(plain) == set(evaluation)
    for key in plain:  # training batches are uint8, normalised on the device by fit
        torch.testing.assert_close(normalize_on_device(plain[key]), evaluation[key], rtol=0,
                                   atol=1e-6)
    assert any(not torch.allclose(normalize_on_device(augmented[k]), evaluation[k])
               for k in augmented)


def test_retrieval_train_loader_is_seeded(image_root: Path, tmp_path: Path, tokenizer) -> None:
    records = [{"image": f"{i % N_IMAGES}.jpg", "caption": f"caption {i}", "image_id": i // 2}
               for i in range(16)]
    write_shards(records, image_root, tmp_path / "s", kind="retrieval_train", samples_per_shard=4,
                 progress=False)

    def run(seed: int) -> list[dict]:
        return all_batches(retrieval_train_loader(str(tmp_path / "s"), image_size=16, batch_size=4,
                                                  tokenizer=tokenizer, seed=seed, shuffle_buffer=8))

    first = run(3)
    assert keys_of(first) == keys_of(run(3))
    assert sorted(keys_of(first)) == [f"{i:09d}" for i in range(16)]
    assert keys_of(first) != [f"{i:09d}" for i in range(16)]
    for batch in first:
        assert batch["image_id"].tolist() == [int(k) // 2 for k in batch["key"]]
        assert batch["input_ids"].shape[0] == 4


def test_an_example_cache_decodes_each_unaugmented_sample_once_per_run(
        image_root: Path, tmp_path: Path, tokenizer, transform_calls, monkeypatch) -> None:
    pairs = [{"images": [f"{i % N_IMAGES}.jpg", f"{(i + 1) % N_IMAGES}.jpg"],
              "sentence": f"Pair {i}.", "label": "True" if i % 3 else "False"} for i in range(11)]
    pairs[4]["images"][1] = "garbage.jpg"  # broken: skipped, and counted, in every epoch
    write_shards(pairs, image_root, tmp_path / "nlvr", kind="nlvr", samples_per_shard=4,
                 progress=False)
    image_bytes = 3 * 16 * 16
    tars_read: list[str] = []
    read_tar = loaders.tarfile_samples

    def counting_tar_reader(sources, **kwargs):
        sources = list(sources)
        tars_read.extend(Path(source["url"]).name for source in sources)
        return read_tar(iter(sources), **kwargs)
    monkeypatch.setattr(loaders, "tarfile_samples", counting_tar_reader)

    def epochs(cache: ExampleCache | None, augment: bool = False, num_workers: int = 0,
               image_size: int = 16) -> tuple[list[list[dict]], list[int], int, list[list[str]]]:
        skips, batches, decoded, read = SkipCounter(), [], [], []
        for epoch in range(3):
            transform_calls.value = 0
            tars_read.clear()
            batches.append(all_batches(nlvr_loader(
                str(tmp_path / "nlvr"), image_size=image_size, batch_size=3, train=True,
                tokenizer=tokenizer, seed=5, epoch=epoch, shuffle_buffer=8, augment=augment,
                num_workers=num_workers, skips=skips, cache=cache)))
            decoded.append(transform_calls.value)
            read.append(sorted(tars_read))
        return batches, decoded, skips.count, read

    shards = [f"shard-{i:06d}.tar" for i in range(3)]
    plain, plain_decoded, plain_skips, plain_read = epochs(None)
    assert plain_decoded == [20, 20, 20] and plain_skips == 3  # 10 readable pairs of two images
    assert plain_read == [shards] * 3
    cache = ExampleCache()
    cached, cached_decoded, cached_skips, cached_read = epochs(cache)
    assert cached_decoded == [20, 0, 0] and cached_skips == plain_skips
    # after the first epoch only the shard with the broken pair, whose example is not kept, is read
    assert cached_read == [shards, [shards[1]], [shards[1]]]
    assert len(cache) == 10 and cache.bytes == 10 * 2 * image_bytes
    for ours, theirs in zip(cached, plain):  # the same batches, in each epoch's own order
        _assert_same_batches(ours, theirs)
    assert keys_of(cached[0]) != keys_of(cached[1])

    # over budget: what fits is kept, the rest decoded each epoch, the batches unchanged
    small = ExampleCache(max_bytes=4 * 2 * image_bytes)
    partly, partly_decoded, _, _ = epochs(small)
    assert len(small) == 4 and partly_decoded == [20, 12, 12]
    for ours, theirs in zip(partly, plain):
        _assert_same_batches(ours, theirs)

    # random augmentation, or worker processes that end with the epoch: the cache is not used
    for unused in ({"augment": True}, {"num_workers": 1}):
        idle = ExampleCache()
        assert epochs(idle, **unused)[1] == [20, 20, 20] and len(idle) == 0, unused
    with pytest.raises(ValueError, match=r"^cache: filled by a loader reading \('nlvr', 16, 30\), "
                                         r"not by one reading \('nlvr', 32, 30\)"):
        epochs(cache, image_size=32)


def test_eval_loader_raises_on_broken_image(image_root: Path, tmp_path: Path) -> None:
    records = [{"image": "0.jpg", "sentence": "s", "label": "neutral"},
               {"image": "garbage.jpg", "sentence": "s", "label": "neutral"}]
    write_shards(records, image_root, tmp_path / "s", kind="ve", progress=False)
    with pytest.raises(Exception):
        all_batches(ve_loader(str(tmp_path / "s"), image_size=16, batch_size=2))


def test_kind_mismatch_and_bad_arguments(image_root: Path, tmp_path: Path, tokenizer) -> None:
    write_shards(caption_records(3), image_root, tmp_path / "s", kind="pretrain", progress=False)
    with pytest.raises(ValueError, match="holds 'pretrain' shards"):
        vqa_loader(str(tmp_path / "s"), image_size=16, batch_size=2)
    shards = str(tmp_path / "s")
    for arguments, field in [({"batch_size": 0}, "batch_size"), ({"max_words": 2.0}, "max_words"),
                             ({"num_workers": -1}, "num_workers"), ({"shuffle_buffer": True}, "shuffle_buffer")]:
        with pytest.raises(ConfigError, match=rf"^{field}: "):
            pretrain_loader(shards, tokenizer=tokenizer, image_size=16, **{"batch_size": 2, **arguments})
    with pytest.raises(ConfigError, match=r"^kind: .*got 'pretrain'"):
        task_loader(shards, "pretrain", image_size=16, batch_size=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no shards"):
        pretrain_loader(str(tmp_path / "empty"), tokenizer=tokenizer, image_size=16, batch_size=2)


def test_training_augmentations_do_not_depend_on_workers_or_the_global_rng(tmp_path):
    # Each sample's augmentation comes from its own seed: a resumed run and a run with another
    # number of workers see the same pixels for the same (seed, epoch, sample).
    records = []
    for index in range(12):
        Image.new("RGB", (48, 40), (index * 20, 100, 200 - index * 10)).save(tmp_path / f"{index}.jpg")
        records.append({"image": f"{index}.jpg", "caption": f"picture {index}"})
    write_shards(records, tmp_path, tmp_path / "shards", kind="pretrain", samples_per_shard=3,
                 progress=False)

    def images(workers: int, global_seed: int, epoch: int = 0) -> dict[str, torch.Tensor]:
        torch.manual_seed(global_seed)
        loader = pretrain_loader(str(tmp_path / "shards"), tokenizer=load_tokenizer("builtin"),
                                 image_size=32, batch_size=2, num_workers=workers, seed=7,
                                 epoch=epoch, shuffle_buffer=4)
        return {key: image for batch in loader for key, image in zip(batch["key"], batch["image"])}

    first = images(0, global_seed=1)
    assert len(first) == 12
    for other in (images(0, global_seed=2), images(2, global_seed=3)):
        assert other.keys() == first.keys()
        assert all(torch.equal(first[k], other[k]) for k in first)
    next_epoch = images(0, global_seed=1, epoch=1)
    assert any(not torch.equal(first[k], next_epoch[k]) for k in first)


def test_loader_workers_survive_a_process_that_ran_a_prefect_flow(tmp_path):
    # Prefect registers thread exit handlers that fail in forked DataLoader workers (status 1).
    import os
    import subprocess
    import sys

    records = []
    for index in range(6):
        Image.new("RGB", (20, 20), (index * 40, 80, 90)).save(tmp_path / f"{index}.jpg")
        records.append({"image": f"{index}.jpg", "caption": f"picture {index}"})
    write_shards(records, tmp_path, tmp_path / "shards", kind="pretrain", samples_per_shard=2,
                 progress=False)
    script = f"""
import codis
from prefect import flow
from codis.data.loaders import pretrain_loader
from codis.text import load_tokenizer

@flow
def noop():
    return 1

noop()
loader = pretrain_loader({str(tmp_path / "shards")!r}, tokenizer=load_tokenizer("builtin"),
                         image_size=16, batch_size=2, num_workers=2, drop_last=False)
print("samples", sum(len(batch["key"]) for batch in loader))
"""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "samples 6" in done.stdout


# ---- per-sample seeds, MLM masks, resuming without decoding -------------------------------------
def test_sample_seeding_gives_the_batches_torch_manual_seed_gave(image_root: Path, tmp_path: Path,
                                                                 tokenizer, monkeypatch) -> None:
    # Only the CPU generator is seeded per sample now (torch.manual_seed also seeded CUDA, at 30
    # times the cost); the pixels must be those of the torch.manual_seed version, byte for byte.
    write_shards(caption_records(12), image_root, tmp_path / "s", kind="pretrain",
                 samples_per_shard=3, progress=False)

    def batches() -> list[dict]:
        return all_batches(pretrain_loader(str(tmp_path / "s"), tokenizer=tokenizer, image_size=24,
                                           batch_size=4, seed=5, epoch=2, shuffle_buffer=6))

    def seeded_by_torch_manual_seed(sample, to_sample, seed, epoch, transform, max_words):
        sample_seed = loaders._sample_seed(seed, epoch, sample)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return to_sample(loaders._draw_caption(sample, sample_seed), transform, max_words)

    now = batches()
    monkeypatch.setattr(loaders, "_with_sample_seed", seeded_by_torch_manual_seed)
    _assert_same_batches(now, batches())


def test_mlm_masks_depend_on_seed_epoch_and_keys_only(image_root: Path, tmp_path: Path,
                                                      tokenizer) -> None:
    # Shards of one batch each and no sample shuffle: every epoch and worker count forms the same
    # batches (in other orders), so their masks can be compared batch by batch.
    write_shards(caption_records(16), image_root, tmp_path / "s", kind="pretrain",
                 samples_per_shard=4, progress=False)

    def masks(workers: int, epoch: int = 0, seed: int = 0) -> dict[tuple, tuple]:
        loader = pretrain_loader(str(tmp_path / "s"), tokenizer=tokenizer, image_size=16,
                                 batch_size=4, num_workers=workers, seed=seed, epoch=epoch,
                                 shuffle_buffer=0, mlm_probability=0.5)
        return {tuple(b["key"]): (b["input_ids"], b["mlm_ids"], b["mlm_labels"], b["mlm_positions"])
                for b in loader}

    first = masks(0)
    assert len(first) == 4
    for ids, masked, labels, positions in first.values():
        chosen = labels != -100
        assert chosen.any() and torch.equal(labels[chosen], ids[chosen])
        assert torch.equal(masked[~chosen], ids[~chosen])
        assert torch.equal(positions, chosen.flatten().nonzero().squeeze(1))
    for other in (masks(0), masks(2)):
        assert other.keys() == first.keys()
        for keys, tensors in first.items():
            assert all(torch.equal(a, b) for a, b in zip(tensors, other[keys]))
    for other in (masks(0, epoch=1), masks(0, seed=1)):
        assert other.keys() == first.keys()
        assert any(not torch.equal(first[keys][2], other[keys][2]) for keys in first)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_loader_continues_exactly_without_decoding_what_it_skips(
        image_root: Path, tmp_path: Path, tokenizer, monkeypatch, transform_calls,
        num_workers: int) -> None:
    records = caption_records(29)
    records[4]["image"] = records[17]["image"] = "garbage.jpg"
    manifest = write_shards(records, image_root, tmp_path / "s", kind="pretrain",
                            samples_per_shard=4, progress=False)
    _truncate_inside_second_sample(tmp_path / "s" / manifest["shards"][2]["name"])  # 9-11 lost
    monkeypatch.setenv(VERIFY_ENV, "off")
    decoded = transform_calls

    def loader():
        return pretrain_loader(str(tmp_path / "s"), tokenizer=tokenizer, image_size=16,
                               batch_size=3, num_workers=num_workers, seed=4, epoch=1,
                               shuffle_buffer=5, mlm_probability=0.15)

    straight = loader()
    iterator = iter(straight)
    batches, positions = [], []
    for batch in iterator:
        batches.append(batch)
        positions.append(iterator.position)
    assert len(batches) == 8 and straight.skips.count == 5
    all_decoded = decoded.value
    for k in (1, 3, len(batches) - 2):
        decoded.value = 0
        resumed = loader()
        _assert_same_batches(batches[k:], all_batches(resumed.resume(positions[k - 1])))
        # the k batches before the position were neither decoded nor augmented again
        assert decoded.value == all_decoded - 3 * k
        assert resumed.skips.count == 5  # those lost before the position count, and once
    # a fresh pass starts at the beginning
    _assert_same_batches(batches, all_batches(loader()))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resampled_stream_resumes_without_decoding_what_it_skips(
        image_root: Path, tmp_path: Path, tokenizer, transform_calls, num_workers: int) -> None:
    write_shards(caption_records(10), image_root, tmp_path / "s", kind="pretrain",
                 samples_per_shard=2, progress=False)
    decoded = transform_calls

    def loader():
        return pretrain_loader(str(tmp_path / "s"), tokenizer=tokenizer, image_size=16,
                               batch_size=2, num_workers=num_workers, resample=True,
                               shuffle_buffer=4)

    iterator = iter(loader())
    batches = [next(iterator) for _ in range(4)]
    position = iterator.position
    batches += [next(iterator) for _ in range(4)]
    del iterator  # its workers stop (they would go on decoding what they prefetch)
    decoded.value = 0
    resumed = loader().resume(position)
    _assert_same_batches(batches[4:], [next(resumed) for _ in range(4)])
    if num_workers == 0:
        assert decoded.value == 8
    else:  # at most 8 batches asked of the workers (4 taken, 2 x 2 prefetched); a replay adds 4
        assert decoded.value <= 2 * 8


def test_a_position_is_checked_against_the_loader(image_root: Path, tmp_path: Path,
                                                  tokenizer) -> None:
    write_shards(caption_records(4), image_root, tmp_path / "s", kind="pretrain", progress=False)
    train = pretrain_loader(str(tmp_path / "s"), tokenizer=tokenizer, image_size=16, batch_size=2)
    with pytest.raises(ValueError, match="recorded with 2 loader worker"):
        train.resume({"next": 0, "workers": [[0, 0], [2, 0]], "skipped": 0})
    write_shards([{"image": "0.jpg", "sentence": "s", "label": "neutral"}], image_root,
                 tmp_path / "ve", kind="ve", progress=False)
    evaluation = ve_loader(str(tmp_path / "ve"), image_size=16, batch_size=1)
    iterator = iter(evaluation)
    next(iterator)
    assert iterator.position is None
    with pytest.raises(ValueError, match="only training loaders resume"):
        evaluation.resume({"next": 0, "workers": [[0, 0]], "skipped": 0})
