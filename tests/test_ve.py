"""SNLI-VE: metric and loss on hand cases, configs, end-to-end finetune + evaluate on a tiny demo
world, and that the classifier can fit a fixed batch."""

import dataclasses
import math
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import codis.tasks.ve
from codis.config import ConfigError, preset
from codis.data.loaders import VE_LABEL_IDS, ExampleCache, ve_loader
from codis.checkpoint import read_checkpoint
from codis.encoders import build_image_encoder
from codis.losses import classification_loss
from codis.metrics import accuracy
from codis.tasks.ve import (Distilled, FusionClassifier, ImageTokenCache, VEConfig, evaluate,
                            finetune, load_ve_model, mlp_head, pretrained_backbone)
from codis.tasks.ve import config as ve_config
from codis.train import OptimConfig, TrainConfig, task_schedule

# two threads may sum a CPU backward in either order (not bitwise), and only wait on each other
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(shards, tiny_checkpoint) -> dict[str, Path]:
    """The shared tiny world's SNLI-VE shards (8 training images, 4 dev images, 3 hypotheses each)
    and the tiny pretrained checkpoint."""
    return {"train": shards("ve", "train"), "dev": shards("ve", "dev"),
            "pretrained": tiny_checkpoint}


# ---- pure pieces ---------------------------------------------------------------------------------
def test_accuracy_on_hand_cases():
    assert accuracy([2, 1, 0, 2], [2, 0, 0, 1]) == 50.0
    assert accuracy(torch.tensor([1, 1, 1]), torch.tensor([1, 1, 1])) == 100.0
    assert accuracy([0, 0], [1, 2]) == 0.0
    assert accuracy([0, 1, 2], [0, 1, 1]) == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="equal length"):
        accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="no examples"):
        accuracy([], [])


def test_classification_loss_mixes_the_hard_label_and_the_teacher_distribution():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]])
    labels = torch.tensor([0, 2])
    teacher = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    ce = sum(-math.log(math.exp(row[y]) / sum(math.exp(v) for v in row))
             for row, y in zip(logits.tolist(), labels.tolist())) / 2
    soft = 0.0
    for row, trow in zip(logits.tolist(), teacher.tolist()):
        z, tz = sum(math.exp(v) for v in row), sum(math.exp(v) for v in trow)
        soft -= sum(math.exp(t) / tz * math.log(math.exp(v) / z) for v, t in zip(row, trow))
    soft /= 2
    loss, parts = classification_loss(logits, labels)
    assert float(loss) == pytest.approx(ce, rel=1e-6) and set(parts) == {"ce"}
    loss, parts = classification_loss(logits, labels, teacher, alpha=0.4)
    assert float(loss) == pytest.approx(0.6 * ce + 0.4 * soft, rel=1e-6)
    assert float(parts["distill"]) == pytest.approx(soft, rel=1e-6)
    with pytest.raises(ValueError, match="needs teacher_logits"):
        classification_loss(logits, labels, alpha=0.4)
    with pytest.raises(ValueError, match="labels must have shape"):
        classification_loss(logits, labels[:1])


def test_mlp_head_is_albef_cls_head():
    head = mlp_head(16, 3)
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[2].out_features) == (16, 16, 3)


def test_distilled_teacher_follows_the_student_by_ema():
    torch.manual_seed(0)
    student = nn.Linear(4, 3)
    model = Distilled(student, momentum=0.9)
    with torch.no_grad():
        student.weight.add_(1.0)  # the student moves; the teacher is still the old copy
    before = model.teacher.weight.clone()
    output = model(torch.randn(5, 4), labels=torch.tensor([0, 1, 2, 0, 1]), alpha=0.4)
    assert torch.allclose(model.teacher.weight, 0.9 * before + 0.1 * student.weight)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert {"ce", "distill", "accuracy"} <= set(output.parts)
    plain = Distilled(nn.Linear(4, 3), momentum=None)
    assert plain.teacher is None
    assert set(plain(torch.randn(2, 4), labels=torch.tensor([0, 1])).parts) == {"ce", "accuracy"}


# ---- configs -------------------------------------------------------------------------------------
def test_presets_hold_albef_settings():
    paper = ve_config("ve")
    assert (paper.image_size, paper.batch_size, paper.lr, paper.epochs) == (384, 32, 2e-5, 5)
    assert paper.distill and paper.alpha == 0.4 and not paper.alpha_warmup
    demo = ve_config("demo")
    assert demo.image_size == preset("tiny").vision.image_size
    assert VEConfig.from_dict(demo.to_dict()) == demo
    train, optim = task_schedule(paper, 1000)
    assert (train.steps, train.batch_size, train.alpha_warmup_steps) == (31 * 5, 32, 0)
    assert (optim.lr, optim.min_lr, optim.warmup_lr, optim.weight_decay) == (2e-5, 1e-6, 1e-5, 0.02)
    assert optim.warmup_steps == 31  # ALBEF's 100 warm-up steps, at most one epoch
    assert task_schedule(paper, 1000, world_size=2)[0].steps == 15 * 5


@pytest.mark.parametrize("changes, field", [
    ({"image_size": 0}, "ve.image_size"), ({"batch_size": 2.5}, "ve.batch_size"),
    ({"lr": 0}, "ve.lr"), ({"alpha": 1.5}, "ve.alpha"), ({"momentum": 1.0}, "ve.momentum"),
    ({"distill": "yes"}, "ve.distill"), ({"epochs": 0}, "ve.epochs"), ({"hflip": 1}, "ve.hflip"),
    ({"freeze_vision": "true"}, "ve.freeze_vision"),
])
def test_bad_config_values_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        VEConfig(**changes)


def test_bad_config_keys_presets_and_sizes_are_named():
    with pytest.raises(ConfigError, match=r"^ve\.image_sise: unknown field"):
        VEConfig.from_dict({"image_sise": 32})
    with pytest.raises(ConfigError, match=r"^ve\.preset"):
        ve_config("coco")
    with pytest.raises(ConfigError, match=r"^ve\.batch_size: 10 training samples"):
        task_schedule(ve_config("ve"), 10)


def test_bad_inputs_fail_before_training(world, tmp_path):
    train, optim = TrainConfig(steps=1, batch_size=4), OptimConfig()
    with pytest.raises(ConfigError, match=r"^ve\.image_size: 36 is not a multiple"):
        finetune(world["pretrained"], world["train"], tmp_path, ve_config("demo", image_size=36),
                 train=train, optim=optim, progress=False)
    with pytest.raises(ConfigError, match="expected a VEConfig"):
        finetune(world["pretrained"], world["train"], tmp_path, object(), train=train, optim=optim)
    with pytest.raises(FileNotFoundError, match="shards"):
        finetune(world["pretrained"], tmp_path / "nothing", tmp_path, ve_config("demo"),
                 train=train, optim=optim)
    with pytest.raises(ValueError, match="a 'pretrain' checkpoint; expected 've'"):
        load_ve_model(world["pretrained"])
    assert not (tmp_path / "model.pt").exists()


# ---- end to end ----------------------------------------------------------------------------------
def test_finetune_then_evaluate_end_to_end(world, tmp_path):
    logged = []
    config = ve_config("demo")
    train = TrainConfig(steps=4, batch_size=6, checkpoint_every=2, log_every=1, seed=1)
    optim = OptimConfig(lr=1e-4, warmup_lr=1e-5, warmup_steps=1, min_lr=1e-5)
    path = finetune(world["pretrained"], world["train"], tmp_path / "run", config, train=train,
                    optim=optim, callback=lambda step, m: logged.append((step, m)), progress=False)
    assert path == tmp_path / "run" / "model.pt" and path.is_file()
    assert [step for step, _ in logged] == [1, 2, 3, 4]
    assert {"loss", "ce", "distill", "alpha", "accuracy", "lr"} <= set(logged[-1][1])
    assert all(math.isfinite(m["loss"]) for _, m in logged)
    # SNLI-VE distils at full alpha from the first step (ALBEF's VE.yaml: warm_up False)
    assert [m["alpha"] for _, m in logged] == pytest.approx([0.4] * 4)

    payload = read_checkpoint(path)
    assert payload.kind == "ve" and VEConfig.from_dict(payload.task_config) == config
    assert not any(k.startswith("teacher") for k in payload.state_dict)

    model = load_ve_model(path)
    assert model.head[2].out_features == len(VE_LABEL_IDS) == 3
    first = evaluate(path, world["dev"], progress=False)
    assert set(first) == {"accuracy"} and 0.0 <= first["accuracy"] <= 100.0
    # deterministic, and independent of how the examples are batched
    assert evaluate(path, world["dev"], config, batch_size=5, progress=False) == first
    # same number as a hand-written pass over the eval loader
    loader = ve_loader(world["dev"], image_size=64, batch_size=64, tokenizer=model.tokenizer)
    hits = total = 0
    with torch.no_grad():
        for batch in loader:
            predicted = model([batch["image"]], batch["input_ids"], batch["attention_mask"]).argmax(-1)
            hits += int((predicted == batch["label"]).sum())
            total += len(batch["label"])
    assert total == 12 and first["accuracy"] == pytest.approx(100.0 * hits / total)
    with pytest.raises(ConfigError, match=r"^ve\.image_size: the checkpoint was finetuned at 64"):
        evaluate(path, world["dev"], ve_config("demo", image_size=40), progress=False)


def test_unaugmented_finetuning_decodes_each_image_once_and_trains_as_before(
        world, tmp_path, monkeypatch, transform_calls):
    # augment False: the run's example cache serves the second epoch; a cache that holds nothing
    # (max_bytes 0) decodes every epoch, and both train to the same weights.
    config = ve_config("demo", augment=False)
    train = TrainConfig(steps=8, batch_size=6, checkpoint_every=8, log_every=4, seed=1)
    optim = OptimConfig(lr=1e-4, warmup_lr=1e-5, warmup_steps=1, min_lr=1e-5)
    weights, decoded = {}, {}
    for form in ("cached", "decoded each epoch"):
        if form != "cached":
            monkeypatch.setattr(codis.tasks.ve, "ExampleCache", partial(ExampleCache, 0))
        transform_calls.value = 0
        path = finetune(world["pretrained"], world["train"], tmp_path / form, config,
                        train=train, optim=optim, progress=False)
        decoded[form] = transform_calls.value
        weights[form] = read_checkpoint(path).state_dict
    # 24 examples (8 images, 3 hypotheses each), batches of 6: 8 steps are 2 epochs
    assert decoded == {"cached": 24, "decoded each epoch": 48}
    for name, value in weights["cached"].items():
        assert torch.equal(value, weights["decoded each epoch"][name]), name


def test_a_frozen_vit_finetunes_to_its_pretrained_weights_while_the_rest_learns(world, tmp_path):
    train = TrainConfig(steps=4, batch_size=6, checkpoint_every=4, log_every=2, seed=1)
    optim = OptimConfig(lr=1e-3, warmup_lr=1e-4, warmup_steps=1, min_lr=1e-4, weight_decay=0.05)
    pretrained = pretrained_backbone(world["pretrained"], ve_config("demo"))
    before = {f"{part}.{name}": value for part in ("visual_encoder", "text")
              for name, value in getattr(pretrained, part).state_dict().items()}

    def moved(freeze: bool) -> set[str]:
        config = ve_config("demo", augment=False, freeze_vision=freeze)  # distilled, as ALBEF
        path = finetune(world["pretrained"], world["train"], tmp_path / str(freeze), config,
                        train=train, optim=optim, progress=False)
        payload = read_checkpoint(path)
        assert VEConfig.from_dict(payload.task_config).freeze_vision is freeze
        after = load_ve_model(path).state_dict()
        return {name.split(".")[0] for name, value in before.items()
                if not torch.equal(after[name], value)}

    assert moved(True) == {"text"}  # weight decay would move a frozen tensor left in AdamW
    assert moved(False) == {"visual_encoder", "text"}


def test_a_frozen_vit_keeps_its_batch_norm_statistics_and_builds_no_graph():
    vision = dataclasses.replace(preset("tiny").vision, stem="conv")
    size = vision.image_size
    images = torch.randn(4, 3, size, size)

    def after_training_forward(freeze: bool) -> tuple[FusionClassifier, torch.Tensor, dict]:
        torch.manual_seed(0)
        classifier = FusionClassifier(build_image_encoder(vision), nn.Identity(), nn.ModuleList(),
                                      nn.Identity())
        if freeze:
            classifier.freeze_vision()
        classifier.train()
        stats = {k: v.clone() for k, v in classifier.visual_encoder.state_dict().items()
                 if k.endswith("running_mean")}
        tokens = classifier.image_tokens(images)
        return classifier, tokens, stats

    frozen, tokens, stats = after_training_forward(True)
    assert stats  # the conv stem has batch norm
    encoder = frozen.visual_encoder.state_dict()
    assert all(torch.equal(encoder[k], v) for k, v in stats.items())
    assert not any(m.training for m in frozen.visual_encoder.modules()) and frozen.training
    assert tokens.grad_fn is None
    assert not frozen.train().visual_encoder.training  # train() again keeps it fixed
    trained, tokens, stats = after_training_forward(False)
    encoder = trained.visual_encoder.state_dict()
    assert not any(torch.equal(encoder[k], v) for k, v in stats.items())
    assert tokens.grad_fn is not None


@pytest.fixture
def vit_images(monkeypatch) -> list[int]:
    """The number of images each ViT pass of a classifier (``image_tokens``) was given."""
    passes: list[int] = []
    image_tokens = FusionClassifier.image_tokens

    def counted(self, images):
        passes.append(len(images))
        return image_tokens(self, images)

    monkeypatch.setattr(FusionClassifier, "image_tokens", counted)
    return passes


def test_the_token_cache_runs_the_vit_once_per_training_image(world, vit_images):
    backbone = pretrained_backbone(world["pretrained"], ve_config("demo"))
    classifier = FusionClassifier(backbone.visual_encoder, backbone.text, backbone.fusion,
                                  mlp_head(backbone.width, 3))
    with pytest.raises(ValueError, match="not frozen"):
        ImageTokenCache(classifier)
    classifier.freeze_vision().train()
    torch.manual_seed(0)
    images = [torch.randn(3, 3, 64, 64), torch.randn(3, 3, 64, 64)]  # two slots, as NLVR²
    batch = {"key": ["000", "001", "002"], "shard": ["a.tar", "a.tar", "b.tar"]}
    with torch.no_grad():
        expected = classifier.image_tokens(torch.cat(images))
    vit_images.clear()
    cache = ImageTokenCache(classifier)
    first = cache(images, batch)
    again = cache(images, batch)
    assert vit_images == [6] and len(cache) == 6  # the second call ran no ViT pass
    assert torch.equal(first, expected) and torch.allclose(again, expected, atol=1e-6)
    # a batch with one new sample, ("b.tar", "001"): only its two images go through the ViT
    mixed = {"key": ["001", "001", "002"], "shard": ["a.tar", "b.tar", "b.tar"]}
    tokens = cache([images[0][[1, 2, 2]], images[1][[1, 2, 2]]], mixed)
    assert vit_images == [6, 2] and len(cache) == 8
    assert torch.allclose(tokens, expected[[1, 2, 2, 4, 5, 5]], atol=1e-6)
    full = ImageTokenCache(classifier, max_bytes=first[0].numel() * first[0].element_size())
    full(images, batch)
    full(images, batch)
    assert len(full) == 1 and vit_images == [6, 2, 6, 5]  # room for one: the rest every time


def test_finetuning_a_frozen_vit_from_its_token_cache_trains_as_without_it(world, tmp_path,
                                                                            monkeypatch,
                                                                            vit_images):
    config = ve_config("demo", augment=False, freeze_vision=True)
    train = TrainConfig(steps=8, batch_size=6, checkpoint_every=8, log_every=4, seed=1)
    optim = OptimConfig(lr=1e-4, warmup_lr=1e-5, warmup_steps=1, min_lr=1e-5)
    weights, images = {}, {}
    for form in ("cached", "every step"):
        if form != "cached":
            monkeypatch.setattr(codis.tasks.ve, "ImageTokenCache",
                                partial(ImageTokenCache, max_bytes=0))
        vit_images.clear()
        path = finetune(world["pretrained"], world["train"], tmp_path / form, config,
                        train=train, optim=optim, progress=False)
        images[form] = sum(vit_images)
        weights[form] = read_checkpoint(path).state_dict
    # 24 examples, batches of 6: 8 steps are 2 epochs, and the second reads only the cache
    assert images == {"cached": 24, "every step": 48}
    for name, value in weights["cached"].items():
        assert torch.allclose(value, weights["every step"][name], atol=1e-6), name


def test_the_classifier_fits_a_fixed_batch(world):
    torch.manual_seed(0)
    config = ve_config("demo")
    backbone = pretrained_backbone(world["pretrained"], config)
    student = FusionClassifier(backbone.visual_encoder, backbone.text, backbone.fusion,
                               mlp_head(backbone.width, 3))
    model = Distilled(student, momentum=config.momentum)  # with distillation, as finetune runs it
    batch = next(iter(ve_loader(world["train"], image_size=64, batch_size=8,
                                tokenizer=backbone.tokenizer)))
    inputs = ([batch["image"]], batch["input_ids"], batch["attention_mask"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def eval_loss() -> float:
        student.eval()
        with torch.no_grad():
            value = float(F.cross_entropy(student(*inputs), batch["label"]))
        student.train()
        return value

    start = eval_loss()
    model.train()
    for _ in range(30):
        optimizer.zero_grad()
        model(*inputs, labels=batch["label"], alpha=config.alpha).loss.backward()
        optimizer.step()
    end = eval_loss()
    # the hard-label loss cannot reach 0 while the young teacher still pulls towards its own
    # near-uniform predictions, so ask for a clear drop and every example right
    assert end < 0.5 * start, (start, end)
    student.eval()
    with torch.no_grad():
        assert accuracy(student(*inputs).argmax(-1), batch["label"]) == 100.0
