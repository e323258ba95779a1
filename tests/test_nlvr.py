"""NLVR²: the two-image fusion encoder, text-assignment batches and step, finetune + evaluate on a
tiny demo world, learning a fixed batch, and configuration errors."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from codis.checkpoint import read_checkpoint
from codis.config import ConfigError, preset
from codis.data.loaders import nlvr_loader
from codis.metrics import accuracy
from codis.model import CodisModel, load_model
from codis.tasks.nlvr import (TA_LABELS, NLVRConfig, evaluate, finetune, initial_nlvr_model,
                              load_nlvr_model, pair_fusion, text_assignment, text_assignment_pairs)
from codis.tasks.nlvr import config as nlvr_config
from codis.tasks.ve import Distilled, fuse
from codis.tasks.ve import config as ve_config
from codis.train import OptimConfig, TrainConfig, task_schedule


@pytest.fixture(scope="module")
def world(shards, tiny_checkpoint) -> dict[str, Path]:
    """The shared tiny world's NLVR² shards (16 training pairs, 10 dev pairs), its pretraining
    shards (text assignment) and the tiny pretrained checkpoint."""
    return {"train": shards("nlvr", "train"), "dev": shards("nlvr", "dev"),
            "pretrain": shards("pretrain", "train"), "pretrained": tiny_checkpoint}


@pytest.fixture(scope="module")
def ta_checkpoint(world, tmp_path_factory) -> tuple[Path, list]:
    logged = []
    train = TrainConfig(steps=2, batch_size=8, log_every=1, checkpoint_every=2, seed=2)
    optim = OptimConfig(lr=1e-4, warmup_lr=1e-5, warmup_steps=1, min_lr=1e-5)
    path = text_assignment(world["pretrained"], world["pretrain"],
                           tmp_path_factory.mktemp("ta"), nlvr_config("demo"), train=train,
                           optim=optim, callback=lambda step, m: logged.append(m), progress=False)
    return path, logged


def fixed_batch(world, tokenizer, size: int) -> dict:
    return next(iter(nlvr_loader(world["train"], image_size=64, batch_size=size,
                                 tokenizer=tokenizer)))


# ---- the two-image fusion encoder -----------------------------------------------------------------
def test_pair_fusion_copies_each_pretrained_layer_twice_and_ties_key_and_value():
    torch.manual_seed(0)
    layers = CodisModel(preset("tiny", mode="albef")).text_encoder.fusion
    pairs = pair_fusion(layers)
    assert len(pairs) == 2 * len(layers)
    for index, block in enumerate(pairs):
        source = layers[index // 2].state_dict()
        for name, value in block.state_dict().items():
            assert torch.equal(value, source[name]), name
    first, second = pairs[0].crossattention.self, pairs[1].crossattention.self
    assert first.key.weight is second.key.weight and first.value.bias is second.value.bias
    # queries, self-attention and feed-forward are per block: they may diverge in training
    assert first.query.weight is not second.query.weight
    with torch.no_grad():
        first.query.weight.add_(1.0)
    assert not torch.equal(first.query.weight, second.query.weight)
    assert pairs[0].output.dense.weight is not pairs[1].output.dense.weight


def test_initial_model_reads_the_pretrained_cross_attention(world):
    pretrained = load_model(world["pretrained"])
    model, backbone = initial_nlvr_model(world["pretrained"], nlvr_config("demo"))
    source = pretrained.text_encoder.fusion[0].crossattention
    for block in model.fusion[:2]:
        for name, value in source.state_dict().items():
            assert torch.equal(block.crossattention.state_dict()[name], value), name
    assert torch.equal(model.visual_encoder.pos_embed, pretrained.visual_encoder.pos_embed)
    assert model.head[2].out_features == 2 and backbone.tokenizer is not None


def test_two_image_fusion_reads_both_images_in_order(world):
    torch.manual_seed(0)
    model, backbone = initial_nlvr_model(world["pretrained"], nlvr_config("demo"))
    model.eval()
    batch = fixed_batch(world, backbone.tokenizer, 4)
    ids, mask = batch["input_ids"], batch["attention_mask"]

    def fused(image0: torch.Tensor, image1: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            text = model.text(input_ids=ids, attention_mask=mask).last_hidden_state
            return fuse(model.fusion, text, mask, [model.image_tokens(image0),
                                                   model.image_tokens(image1)])[:, 0]

    base = fused(batch["image0"], batch["image1"])
    assert torch.equal(base, fused(batch["image0"], batch["image1"]))  # eval mode: deterministic
    other = batch["image1"].roll(1, dims=0)
    assert not torch.allclose(base, fused(batch["image0"], other), atol=1e-4)  # image1 is read
    assert not torch.allclose(base, fused(other, batch["image1"]), atol=1e-4)  # image0 is read
    assert not torch.allclose(base, fused(batch["image1"], batch["image0"]), atol=1e-4)  # order
    with torch.no_grad():
        logits = model([batch["image0"], batch["image1"]], ids, mask)
    assert logits.shape == (4, 2)
    assert torch.allclose(logits, model.head(base), atol=1e-5)


# ---- text assignment -----------------------------------------------------------------------------
def test_text_assignment_pairs_follow_albef_labels():
    generator = torch.Generator().manual_seed(0)
    batch = 6
    similarity = torch.randn(batch, batch, generator=generator)
    own = torch.arange(batch)
    seen = torch.zeros(3)
    for _ in range(50):
        first, second, labels = text_assignment_pairs(similarity, generator)
        is_first, is_second = labels == TA_LABELS["first"], labels == TA_LABELS["second"]
        neither = labels == TA_LABELS["neither"]
        assert torch.equal(first == own, is_first) and torch.equal(second == own, is_second)
        assert bool((first[neither] != second[neither]).all())
        assert bool((first != second).all())
        seen += torch.bincount(labels, minlength=3)
    assert bool((seen / seen.sum() > 0.25).all())  # about a third each

    # partners are drawn by similarity: a dominant partner is the one paired with the text's image
    peaked = torch.full((batch, batch), -30.0)
    peaked[own, (own + 1) % batch] = 30.0
    first, second, labels = text_assignment_pairs(peaked, generator)
    partner = torch.where(labels == TA_LABELS["first"], second, first)
    assert torch.equal(partner, (own + 1) % batch)
    with pytest.raises(ValueError, match="at least 3"):
        text_assignment_pairs(torch.zeros(2, 2))


def test_text_assignment_trains_and_finetune_starts_from_its_checkpoint(world, ta_checkpoint):
    path, logged = ta_checkpoint
    assert path.name == "model.pt" and path.is_file()
    assert len(logged) == 2 and {"loss", "ta", "accuracy"} <= set(logged[0])
    assert all(math.isfinite(m["loss"]) and m["loss"] < 3 * math.log(3) for m in logged)
    payload = read_checkpoint(path)
    assert payload.kind == "nlvr_ta" and payload.state_dict["network.head.weight"].shape[0] == 3
    blocks = {k.split(".")[2] for k in payload.state_dict if k.startswith("network.fusion.")}
    fusion_layers = preset("tiny").text.fusion_layers
    assert blocks == {str(i) for i in range(2 * fusion_layers)}  # each fusion layer, as a pair of blocks

    # finetuning at another size starts from the TA weights (position embeddings resampled)
    model, _ = initial_nlvr_model(path, nlvr_config("demo", image_size=40))
    state = model.state_dict()
    for name, value in payload.state_dict.items():
        if name.startswith("network.") and "head" not in name and "pos_embed" not in name:
            assert torch.equal(state[name[len("network."):]], value), name
    assert model.visual_encoder.pos_embed.shape[1] == 1 + (40 // 8) ** 2
    assert model.head[2].out_features == 2


# ---- finetuning and evaluation -------------------------------------------------------------------
def test_finetune_then_evaluate_end_to_end(world, ta_checkpoint, tmp_path):
    logged = []
    config = nlvr_config("demo")
    train = TrainConfig(steps=3, batch_size=6, checkpoint_every=3, log_every=1, seed=1,
                        alpha_warmup_steps=4)
    optim = OptimConfig(lr=1e-4, warmup_lr=1e-5, warmup_steps=1, min_lr=1e-5)
    path = finetune(ta_checkpoint[0], world["train"], tmp_path / "run", config, train=train,
                    optim=optim, callback=lambda step, m: logged.append(m), progress=False)
    assert path.is_file() and len(logged) == 3
    assert {"ce", "distill", "alpha", "accuracy"} <= set(logged[0])
    assert [m["alpha"] for m in logged] == pytest.approx([0.0, 0.1, 0.2])  # NLVR.yaml warm_up
    payload = read_checkpoint(path)
    assert payload.kind == "nlvr" and NLVRConfig.from_dict(payload.task_config) == config

    first = evaluate(path, world["dev"], progress=False)
    assert set(first) == {"accuracy"} and 0.0 <= first["accuracy"] <= 100.0
    assert evaluate(path, world["dev"], config, batch_size=3, progress=False) == first
    model = load_nlvr_model(path)
    predictions, labels = [], []
    with torch.no_grad():
        for batch in nlvr_loader(world["dev"], image_size=64, batch_size=64,
                                 tokenizer=model.tokenizer):
            predictions.append(model([batch["image0"], batch["image1"]], batch["input_ids"],
                                     batch["attention_mask"]).argmax(-1))
            labels.append(batch["label"])
    assert len(torch.cat(labels)) == 10
    assert first["accuracy"] == pytest.approx(accuracy(torch.cat(predictions), torch.cat(labels)))

    with pytest.raises(ValueError, match="a 'nlvr_ta' checkpoint; expected 'nlvr'"):
        load_nlvr_model(ta_checkpoint[0])
    with pytest.raises(ConfigError, match=r"^nlvr\.image_size: the checkpoint was finetuned at 64"):
        evaluate(path, world["dev"], nlvr_config("demo", image_size=40), progress=False)
    with pytest.raises(ValueError, match="a 'nlvr' checkpoint; expected 'pretrain' or 'nlvr_ta'"):
        initial_nlvr_model(path, config)  # a finetuned checkpoint is no starting point


def test_the_two_image_model_fits_a_fixed_batch(world):
    torch.manual_seed(0)
    config = nlvr_config("demo")
    student, backbone = initial_nlvr_model(world["pretrained"], config)
    model = Distilled(student, momentum=config.momentum)
    batch = fixed_batch(world, backbone.tokenizer, 8)
    inputs = ([batch["image0"], batch["image1"]], batch["input_ids"], batch["attention_mask"])
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
    assert end < 0.5 * start, (start, end)
    student.eval()
    with torch.no_grad():
        assert accuracy(student(*inputs).argmax(-1), batch["label"]) == 100.0


# ---- configuration -------------------------------------------------------------------------------
def test_presets_hold_albef_settings():
    paper = nlvr_config("nlvr")
    assert (paper.image_size, paper.batch_size, paper.lr, paper.epochs) == (384, 16, 2e-5, 10)
    assert paper.alpha_warmup and paper.distill and not paper.hflip
    assert (paper.ta_image_size, paper.ta_batch_size, paper.ta_lr, paper.ta_epochs) == (256, 64, 2e-5, 1)
    train, optim = task_schedule(paper, 1600)
    assert (train.steps, train.alpha_warmup_steps) == (1000, 100)  # alpha ramps over epoch 1
    ta_train, ta_optim = task_schedule(paper.text_assignment(), 6400)
    assert (ta_train.steps, ta_train.batch_size, ta_optim.min_lr) == (100, 64, 1e-5)
    demo = nlvr_config("demo")
    assert demo.image_size == demo.ta_image_size == preset("tiny").vision.image_size
    assert NLVRConfig.from_dict(demo.to_dict()) == demo


@pytest.mark.parametrize("changes, field", [
    ({"ta_batch_size": 2}, "nlvr.ta_batch_size"), ({"ta_image_size": 0}, "nlvr.ta_image_size"),
    ({"ta_lr": -1.0}, "nlvr.ta_lr"), ({"lr": 0}, "nlvr.lr"), ({"hflip": None}, "nlvr.hflip"),
    ({"alpha": -0.1}, "nlvr.alpha"),
])
def test_bad_config_values_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        NLVRConfig(**changes)


def test_bad_inputs_fail_before_any_training(world, tmp_path):
    train, optim = TrainConfig(steps=1, batch_size=4), OptimConfig()
    with pytest.raises(ConfigError, match=r"^nlvr\.preset"):
        nlvr_config("vqa")
    with pytest.raises(ConfigError, match=r"^nlvr\.batch_sise: unknown field"):
        NLVRConfig.from_dict({"batch_sise": 3})
    with pytest.raises(ConfigError, match=r"^train\.batch_size: text assignment"):
        text_assignment(world["pretrained"], world["pretrain"], tmp_path, nlvr_config("demo"),
                        train=TrainConfig(steps=1, batch_size=2), optim=optim)
    with pytest.raises(ConfigError, match=r"^nlvr\.ta_image_size: 36 is not a multiple"):
        text_assignment(world["pretrained"], world["pretrain"], tmp_path,
                        nlvr_config("demo", ta_image_size=36), train=train, optim=optim)
    with pytest.raises(ConfigError, match=r"^nlvr\.image_size: 36 is not a multiple"):
        finetune(world["pretrained"], world["train"], tmp_path, nlvr_config("demo", image_size=36),
                 train=train, optim=optim)
    with pytest.raises(ConfigError, match="expected a NLVRConfig"):
        finetune(world["pretrained"], world["train"], tmp_path, ve_config("demo"), train=train,
                 optim=optim)
    with pytest.raises(ValueError, match="holds 'pretrain' shards"):
        finetune(world["pretrained"], world["pretrain"], tmp_path, nlvr_config("demo"),
                 train=train, optim=optim)
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "checkpoints").exists()
