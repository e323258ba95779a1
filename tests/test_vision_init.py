"""The image encoder's supervised initialisation (codis.train.vision_init) on the demo world's labelled
images: what it learns, the weights file it writes, resuming, and bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from codis.config import ConfigError, VisionConfig, preset
from codis.data.demo_world import COLORS
from codis.encoders import build_image_encoder
from codis.train import OptimConfig, TrainConfig
from codis.train.vision_init import balanced_accuracy, pretrain_vision, read_labelled_images

VISION = dataclasses.replace(preset("tiny").vision, image_size=32)  # 4 x 4 patches of 8 px
TRAIN = TrainConfig(steps=500, batch_size=32, checkpoint_every=500, log_every=50, seed=1)
OPTIM = OptimConfig(lr=2e-3, warmup_lr=1e-4, warmup_steps=10, min_lr=1e-4)


@pytest.fixture(scope="module")
def world(tiny_world: Path) -> Path:
    """The shared tiny world: 400 training and 200 evaluation labelled images of 32 px."""
    return tiny_world


@pytest.fixture(scope="module")
def trained(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vision_init")
    return pretrain_vision(VISION, world / "classification/train.json", world, out, train=TRAIN,
                           optim=OPTIM, eval_annotations=world / "classification/val.json",
                           progress=False)


def test_balanced_accuracy_by_hand() -> None:
    logits = torch.tensor([[1.0, -1.0], [1.0, 1.0], [-1.0, -1.0], [-1.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    # label 0: recall 2/3, specificity 1/1; label 1 is never present: specificity 2/4 alone
    torch.testing.assert_close(balanced_accuracy(logits, targets),
                               torch.tensor([100 * (2 / 3 + 1) / 2, 50.0]))


def test_it_learns_the_labels_and_writes_loadable_weights(trained: Path, world: Path) -> None:
    metrics = json.loads((trained.parent / "metrics.json").read_text())
    assert metrics["steps"] == TRAIN.steps and metrics["eval_images"] == 200
    colours = [metrics[f"balanced_accuracy.{c}"] for c in COLORS if f"balanced_accuracy.{c}" in metrics]
    assert len(colours) >= 8
    # Chance (and predicting every label absent) is 50; colours are the easy half of the labels
    # (64% here after 500 steps at 32 px; shapes need far more steps).
    assert sum(colours) / len(colours) > 57.0, metrics
    loaded = build_image_encoder(dataclasses.replace(VISION, pretrained=str(trained))).eval()
    fresh = build_image_encoder(VISION).eval()
    state = load_file(trained)
    assert set(state) == set(loaded.state_dict())
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, state[name])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(loaded.forward_features(images), fresh.forward_features(images))


def test_an_interrupted_run_resumes_to_the_same_weights(world: Path, tmp_path: Path) -> None:
    train = dataclasses.replace(TRAIN, steps=6, checkpoint_every=2)
    args = (VISION, world / "classification/train.json", world)
    straight = load_file(pretrain_vision(*args, tmp_path / "a", train=train, optim=OPTIM, progress=False))
    partial = pretrain_vision(*args, tmp_path / "b", train=train, optim=OPTIM, progress=False, stop_after=3)
    assert not partial.exists()  # nothing half-written: weights only when every step is done
    resumed = load_file(pretrain_vision(*args, tmp_path / "b", train=train, optim=OPTIM, progress=False))
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0)


def test_images_held_in_memory_train_to_the_same_weights_as_images_read_per_step(
        world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import codis.train.vision_init as vision_init

    train = dataclasses.replace(TRAIN, steps=4, checkpoint_every=4)
    args = (VISION, world / "classification/train.json", world)
    reads = []
    original = vision_init._ImageSet._read
    monkeypatch.setattr(vision_init._ImageSet, "_read",
                        lambda self, index: reads.append(index) or original(self, index))
    # by default when the set fits: 400 images of 32 px take 4.9 MB as float32
    assert vision_init.fits_in_memory(400, 32) and not vision_init.fits_in_memory(22_000, 64 * 8)
    held = load_file(pretrain_vision(*args, tmp_path / "held", train=train, optim=OPTIM, progress=False))
    assert sorted(reads) == list(range(400))  # each image decoded once, before training
    reads.clear()
    read = load_file(pretrain_vision(*args, tmp_path / "read", train=train, optim=OPTIM, progress=False,
                                     in_memory=False))
    assert len(reads) == train.steps * train.batch_size  # decoded for every batch
    for name, value in held.items():
        torch.testing.assert_close(read[name], value, rtol=0, atol=0)


def test_bad_input_is_named_before_training(world: Path, tmp_path: Path) -> None:
    rows = json.loads((world / "classification/train.json").read_text())
    cases = [
        ([{**rows[0], "image": "images/nowhere.jpg"}], FileNotFoundError, "nowhere.jpg"),
        ([rows[0], {"image": rows[1]["image"], "labels": "red"}], ConfigError, "record 1"),
        ([{"labels": ["red"]}], ConfigError, "record 0: needs an 'image'"),
        ({}, ConfigError, "non-empty JSON list"),
    ]
    for index, (content, error, message) in enumerate(cases):
        path = tmp_path / f"bad{index}.json"
        path.write_text(json.dumps(content))
        with pytest.raises(error, match=message):
            pretrain_vision(VISION, path, world, tmp_path / "out", train=TRAIN, optim=OPTIM,
                            progress=False)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps([{"image": rows[0]["image"], "labels": ["teal"]}]))
    with pytest.raises(ConfigError, match="teal"):
        read_labelled_images(unknown, world, labels=["red", "circle"])
    with pytest.raises(ConfigError, match="vision.pretrained"):
        pretrain_vision(dataclasses.replace(VISION, pretrained="x.safetensors"),
                        world / "classification/train.json", world, tmp_path / "out", train=TRAIN,
                        optim=OPTIM, progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="annotations"):
        read_labelled_images(tmp_path / "missing.json", world)


def test_conv_stem_weights_initialise_a_conv_model(world: Path, tmp_path: Path) -> None:
    vision = dataclasses.replace(VISION, stem="conv")
    weights = pretrain_vision(vision, world / "classification/train.json", world, tmp_path,
                              train=dataclasses.replace(TRAIN, steps=2), optim=OPTIM, progress=False)
    config = VisionConfig(**{**dataclasses.asdict(vision), "pretrained": str(weights)})
    loaded = build_image_encoder(config)
    assert set(loaded.state_dict()) == set(load_file(weights))
