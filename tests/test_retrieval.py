"""Retrieval: recall metrics on hand-made cases, batched vs per-query re-ranking, deterministic
evaluation, finetuning on a small demo world, and configuration errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from codis.config import ConfigError, preset
from benchmarks.retrieval_eval import build_model as spread_model  # repo root: python -m pytest
from codis.model import CodisModel
from codis.tasks.retrieval import (EncodedEvalSet, RetrievalConfig, RetrievalObjective, encode_images,
                             encode_texts, evaluate, finetune, image_key, image_keys,
                             load_retrieval_model, rerank, rerank_per_query, 
                             shared_match_logits)
from codis.checkpoint import read_checkpoint, save_checkpoint
from codis.data.shards import write_shards
from codis.metrics import retrieval_metrics
from codis.tasks.retrieval import config as retrieval_config
from codis.train import task_schedule
from codis.text import tokenize
from codis.train import OptimConfig, TrainConfig


pytestmark = pytest.mark.usefixtures("one_thread")


METRIC_NAMES = {"txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10",
                "img_r_mean", "r_mean"}


# ---- metrics -------------------------------------------------------------------------------------
def test_metrics_hand_case_with_several_captions_and_a_tie() -> None:
    # 3 images; captions 0-1 show image 0, 2-4 image 1, 5 image 2.
    text_to_image = torch.tensor([0, 0, 1, 1, 1, 2])
    score_i2t = torch.tensor([
        [0.1, 0.9, 0.8, 0.2, 0.3, 0.95],  # best own caption 0.9, one wrong caption above: rank 1
        [0.5, 0.4, 0.6, 0.1, 0.2, 0.3],  # own caption 2 is the top: rank 0
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # own caption last of six: rank 5
    ])
    score_t2i = torch.tensor([
        [0.9, 0.1, 0.2],  # rank 0
        [0.1, 0.5, 0.5],  # rank 2
        [0.3, 0.3, 0.1],  # tied with a wrong image: counts against, rank 1
        [0.0, 0.7, 0.2],  # rank 0
        [0.8, 0.6, 0.9],  # rank 2
        [0.2, 0.1, 0.4],  # rank 0
    ])
    metrics = retrieval_metrics(score_i2t, score_t2i, text_to_image)
    expected = {"txt_r1": 100 / 3, "txt_r5": 200 / 3, "txt_r10": 100.0,
                "img_r1": 50.0, "img_r5": 100.0, "img_r10": 100.0}
    expected["txt_r_mean"] = (100 / 3 + 200 / 3 + 100) / 3
    expected["img_r_mean"] = (50 + 100 + 100) / 3
    expected["r_mean"] = (expected["txt_r_mean"] + expected["img_r_mean"]) / 2
    assert set(metrics) == METRIC_NAMES
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value), name


def _structured(images: int = 20, per_image: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    text_to_image = torch.arange(images).repeat_interleave(per_image)
    right = (text_to_image[None, :] == torch.arange(images)[:, None]).float()  # (images, texts)
    return text_to_image, right


def test_metrics_perfect_reversed_and_constant_scores() -> None:
    text_to_image, right = _structured()
    perfect = retrieval_metrics(right, right.T, text_to_image)
    assert all(value == 100.0 for value in perfect.values())
    # Right pairs scored lowest: 57 wrong captions above every image's own, 19 wrong images above
    # every caption's own, so nothing is found within 10.
    reversed_ = retrieval_metrics(-right, -right.T, text_to_image)
    assert all(value == 0.0 for value in reversed_.values())
    # Constant scores: every wrong candidate ties with the right one and ties count against.
    constant = torch.zeros_like(right)
    assert all(value == 0.0 for value in retrieval_metrics(constant, constant.T,
                                                           text_to_image).values())


def test_metrics_second_caption_counts_and_ties_at_the_top() -> None:
    text_to_image, right = _structured(images=12, per_image=2)
    score_i2t = torch.rand(12, 24, generator=torch.Generator().manual_seed(0)) * 0.5
    # Image 0: its second caption is ranked 3rd (two wrong captions above), its first far below.
    score_i2t[0, 0], score_i2t[0, 1] = -1.0, 0.8
    score_i2t[0, 5], score_i2t[0, 7] = 0.9, 0.95
    # Image 1: its caption ties with a wrong one at the top: not a hit at 1, a hit at 5.
    score_i2t[1, 2], score_i2t[1, 3], score_i2t[1, 10] = 2.0, 0.0, 2.0
    score_t2i = right.T.clone()
    metrics = retrieval_metrics(score_i2t, score_t2i, text_to_image)
    ranks = _albef_text_ranks(score_i2t.numpy(), text_to_image.numpy())
    assert ranks[0] == 2
    assert metrics["img_r1"] == 100.0
    hits_at_1 = sum(ranks[i] < 1 for i in range(2, 12))  # images 2-11: random, tie-free
    assert metrics["txt_r1"] == pytest.approx(100.0 * hits_at_1 / 12)  # images 0 and 1 miss
    hits_at_5 = 2 + sum(ranks[i] < 5 for i in range(2, 12))  # images 0 and 1 hit at 5
    assert metrics["txt_r5"] == pytest.approx(100.0 * hits_at_5 / 12)


def _albef_text_ranks(score_i2t: np.ndarray, text_to_image: np.ndarray) -> list[int]:
    """ALBEF's itm_eval loop: the position of the best-placed own caption in the sorted row
    (1e20 for an image without captions)."""
    ranks = []
    for image, row in enumerate(score_i2t):
        order = np.argsort(row)[::-1]
        own = np.where(text_to_image == image)[0]
        ranks.append(min((int(np.where(order == t)[0][0]) for t in own), default=1e20))
    return ranks


def test_metrics_agree_with_albef_itm_eval_without_ties() -> None:
    generator = torch.Generator().manual_seed(0)
    text_to_image = torch.arange(30).repeat_interleave(5)
    score_i2t = torch.randn(30, 150, generator=generator, dtype=torch.float64)
    score_t2i = torch.randn(150, 30, generator=generator, dtype=torch.float64)
    # Make the scores informative so that the recalls are neither 0 nor 100.
    score_i2t[text_to_image, torch.arange(150)] += 2.0
    score_t2i[torch.arange(150), text_to_image] += 2.0
    metrics = retrieval_metrics(score_i2t, score_t2i, text_to_image)
    txt_ranks = np.array(_albef_text_ranks(score_i2t.numpy(), text_to_image.numpy()))
    img_ranks = np.array([int(np.where(np.argsort(row)[::-1] == text_to_image[t].item())[0][0])
                          for t, row in enumerate(score_t2i.numpy())])
    for k in (1, 5, 10):
        assert metrics[f"txt_r{k}"] == pytest.approx(100.0 * np.mean(txt_ranks < k))
        assert metrics[f"img_r{k}"] == pytest.approx(100.0 * np.mean(img_ranks < k))
    assert 0 < metrics["txt_r1"] < 100 and 0 < metrics["img_r1"] < 100


def test_an_image_without_captions_is_a_miss_as_in_albef() -> None:
    # 4 images, image 2 has no caption; captions 0-1 show image 0, 2 image 1, 3-4 image 3.
    text_to_image = torch.tensor([0, 0, 1, 3, 3])
    generator = torch.Generator().manual_seed(0)
    score_i2t = torch.rand(4, 5, generator=generator, dtype=torch.float64)
    score_t2i = torch.rand(5, 4, generator=generator, dtype=torch.float64)
    score_i2t[text_to_image, torch.arange(5)] += 1.0  # every captioned image finds a caption first
    metrics = retrieval_metrics(score_i2t, score_t2i, text_to_image)
    # Few candidates: 5 captions < 10, yet the caption-less image misses at every k.
    assert metrics["txt_r1"] == metrics["txt_r5"] == metrics["txt_r10"] == 75.0
    ranks = _albef_text_ranks(score_i2t.numpy(), text_to_image.numpy())
    assert ranks[2] == 1e20 and [ranks[i] for i in (0, 1, 3)] == [0, 0, 0]
    img_ranks = [int(np.where(np.argsort(row)[::-1] == text_to_image[t].item())[0][0])
                 for t, row in enumerate(score_t2i.numpy())]
    for k in (1, 5, 10):
        assert metrics[f"img_r{k}"] == pytest.approx(100.0 * np.mean(np.array(img_ranks) < k))


def test_ties_count_against_the_query_whatever_the_order() -> None:
    # ALBEF's argsort breaks ties by position: 2 images x 1 caption, all scores 0, gives it
    # R@1 = 50; counted against the query it is 0, and R@5 (both candidates) is 100.
    text_to_image = torch.tensor([0, 1])
    zeros = torch.zeros(2, 2)
    albef = _albef_text_ranks(zeros.numpy(), text_to_image.numpy())
    assert sorted(albef) == [0, 1]
    metrics = retrieval_metrics(zeros, zeros.T, text_to_image)
    assert (metrics["txt_r1"], metrics["img_r1"], metrics["txt_r5"], metrics["img_r5"]) == (
        0.0, 0.0, 100.0, 100.0)
    # Coarse scores with many ties: the metrics are the same for every order of images and
    # captions, and never above ALBEF's.
    generator = torch.Generator().manual_seed(1)
    text_to_image = torch.arange(8).repeat_interleave(3)
    score_i2t = torch.randint(0, 4, (8, 24), generator=generator).double()
    score_t2i = torch.randint(0, 4, (24, 8), generator=generator).double()
    score_i2t[text_to_image, torch.arange(24)] += 1  # right pairs score higher, and still tie
    score_t2i[torch.arange(24), text_to_image] += 1
    metrics = retrieval_metrics(score_i2t, score_t2i, text_to_image)
    images, texts = torch.randperm(8, generator=generator), torch.randperm(24, generator=generator)
    new_row = torch.empty_like(images)
    new_row[images] = torch.arange(8)
    shuffled = retrieval_metrics(score_i2t[images][:, texts], score_t2i[texts][:, images],
                                 new_row[text_to_image[texts]])
    assert shuffled == pytest.approx(metrics)
    txt = np.array(_albef_text_ranks(score_i2t.numpy(), text_to_image.numpy()))
    img = np.array([int(np.where(np.argsort(row)[::-1] == text_to_image[t].item())[0][0])
                    for t, row in enumerate(score_t2i.numpy())])
    albef = {f"{name}_r{k}": 100.0 * np.mean(ranks < k)
             for name, ranks in (("txt", txt), ("img", img)) for k in (1, 5, 10)}
    assert all(metrics[name] <= albef[name] for name in albef)
    assert sum(metrics[name] for name in albef) < sum(albef.values())  # the ties did cost something


@pytest.mark.parametrize("change, message", [
    (dict(score_t2i=torch.zeros(3, 6)), "score_t2i"),
    (dict(text_to_image=torch.tensor([0, 0, 1, 1, 1])), "text_to_image"),
    (dict(text_to_image=torch.tensor([0, 0, 1, 1, 1, 3])), "text_to_image"),
    (dict(score_i2t=torch.zeros(0, 0), score_t2i=torch.zeros(0, 0),
          text_to_image=torch.zeros(0, dtype=torch.long)), "at least one image and one caption"),
    (dict(score_i2t=torch.full((3, 6), float("nan"))), "score_i2t: contains NaN"),
])
def test_metrics_reject_bad_input(change: dict, message: str) -> None:
    arguments = dict(score_i2t=torch.zeros(3, 6), score_t2i=torch.zeros(6, 3),
                     text_to_image=torch.tensor([0, 0, 1, 1, 1, 2]))
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(**arguments)


# ---- configuration -------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("image_size", 0), ("k_test", 0), ("k_test", 2.5), ("alpha", 1.5), ("queue_size", 0),
    ("rerank_batch_size", 0), ("num_workers", -1), ("hflip", "no"), ("eval_precision", "fp16"),
])
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"retrieval\.{field}\b"):
        RetrievalConfig(**{field: value})


def test_presets_and_schedule() -> None:
    assert (retrieval_config("coco").k_test, retrieval_config("coco").image_size) == (256, 384)
    assert retrieval_config("flickr").k_test == 128
    assert (retrieval_config("coco").epochs, retrieval_config("flickr").epochs) == (5, 10)  # ALBEF
    assert retrieval_config("demo").image_size == preset("tiny").vision.image_size
    assert retrieval_config("demo", k_test=4).k_test == 4
    with pytest.raises(ConfigError, match=r"retrieval\.preset"):
        retrieval_config("msrvtt")
    train, optim = task_schedule(retrieval_config("coco"), 566_747, world_size=8)
    assert train.batch_size == 32 and train.steps == 5 * (566_747 // 256)
    assert train.alpha_warmup_steps == 566_747 // 256
    assert (optim.lr, optim.weight_decay, optim.warmup_steps, optim.min_lr) == (1e-5, 0.02, 0, 1e-6)
    with pytest.raises(ConfigError, match=r"retrieval\.batch_size: 31 training samples"):
        task_schedule(retrieval_config("coco"), 31)


def test_image_keys_are_stable_and_distinct() -> None:
    assert image_key(7) == image_key("7") == image_key(7)
    keys = image_keys(["COCO_val2014_000000391895.jpg", "COCO_val2014_000000522418.jpg", 3])
    assert keys.dtype == torch.long and len(set(keys.tolist())) == 3 and bool((keys >= 0).all())
    assert image_keys(torch.tensor([3, 3, 4])).tolist() == [image_key(3)] * 2 + [image_key(4)]


# ---- re-ranking ----------------------------------------------------------------------------------
# spread_model: the re-ranking benchmark's random tiny model, weights at std 0.2 so that its ITM
# scores depend on their inputs (at BERT's 0.02 they differ by ~1e-7: their order is float noise).
def _synthetic_set(model: CodisModel, images: int, per_image: int) -> EncodedEvalSet:
    """Random images and distinct random captions (a repeated caption would tie exactly)."""
    generator = torch.Generator().manual_seed(1)
    words = "red blue green circle square star small large left right above below the of".split()
    texts: list[str] = []
    while len(texts) < images * per_image:
        length = int(torch.randint(3, 9, (1,), generator=generator))
        text = " ".join(words[j] for j in torch.randint(len(words), (length,), generator=generator))
        if text not in texts:
            texts.append(text)
    input_ids, mask = tokenize(model.tokenizer, texts, 30)
    size = model.config.vision.image_size
    image_feat, image_tokens = encode_images(
        model, torch.randn(images, 3, size, size, generator=generator).split(16))
    text_feat, text_tokens = encode_texts(model, input_ids, mask, batch_size=32)
    return EncodedEvalSet(image_feat, image_tokens, text_feat, text_tokens, mask,
                          torch.arange(images).repeat_interleave(per_image))


@pytest.mark.parametrize("fusion_layers", [1, 3])
def test_shared_match_logits_equal_the_fusion_encoder(fusion_layers: int) -> None:
    model = spread_model(fusion_layers, seed=0)
    encoded = _synthetic_set(model, images=6, per_image=3)
    generator = torch.Generator().manual_seed(2)
    image_rows = torch.randint(6, (40,), generator=generator)  # repeats, unsorted
    text_rows = torch.randint(18, (40,), generator=generator)
    shared = shared_match_logits(model, encoded.image_tokens, encoded.text_tokens,
                                 encoded.text_mask, image_rows, text_rows)
    with torch.no_grad():
        direct = model.itm_logits(encoded.image_tokens[image_rows], encoded.text_tokens[text_rows],
                                  encoded.text_mask[text_rows])[:, 1]
    assert direct.std() > 0.1  # the comparison means something
    torch.testing.assert_close(shared, direct, atol=1e-5, rtol=1e-5)


def _same_ranking(scores: torch.Tensor, reference: torch.Tensor, tolerance: float = 1e-5) -> bool:
    """Whether the order that ``scores`` give each row also sorts ``reference`` (descending),
    allowing swaps only between candidates whose reference scores differ by float noise."""
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    sorted_reference = reference.gather(1, order)
    return bool((sorted_reference[:, 1:] <= sorted_reference[:, :-1] + tolerance).all())


@pytest.mark.parametrize("k_test, batch_size, share_work", [
    (5, 12, True),  # 2 queries per pass and a last, partial pass
    (5, 12, False),
    (40, 1, True),  # k above the number of images: capped; one query per pass
])
def test_batched_rerank_ranks_as_the_per_query_loop(k_test: int, batch_size: int,
                                                    share_work: bool) -> None:
    model = spread_model(2, seed=0)
    encoded = _synthetic_set(model, images=12, per_image=3)
    similarity = encoded.similarity()
    batched = rerank(model, encoded, similarity, k_test=k_test, batch_size=batch_size,
                     share_work=share_work)
    looped = rerank_per_query(model, encoded, similarity, k_test=k_test)
    for fast, reference, candidates in zip(batched, looped, (min(k_test, 36), min(k_test, 12))):
        assert bool(((reference > -100).sum(dim=1) == candidates).all())
        assert torch.equal(fast == -100, reference == -100)
        torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
        assert _same_ranking(fast, reference) and _same_ranking(reference, fast)
    assert (retrieval_metrics(*batched, encoded.text_to_image)
            == retrieval_metrics(*looped, encoded.text_to_image))


def test_ranking_check_detects_a_swap() -> None:
    reference = torch.tensor([[3.0, 2.0, 1.0, 1.0 + 1e-7]])
    assert _same_ranking(reference, reference)
    assert _same_ranking(torch.tensor([[3.0, 2.0, 1.0 + 1e-7, 1.0]]), reference)  # noise-level tie
    assert not _same_ranking(torch.tensor([[2.0, 3.0, 1.0, 1.0]]), reference)


# ---- evaluation and finetuning on a demo world ---------------------------------------------------
@pytest.fixture(scope="module")
def world(tiny_world: Path, shards, tiny_checkpoint: Path) -> dict[str, Path]:
    """The shared tiny world's retrieval shards (8 training images, 7 test images, 5 captions
    each) and the tiny pretrained checkpoint."""
    return {"root": tiny_world, "train": shards("retrieval_train", "train"),
            "test": shards("retrieval_eval", "test"), "pretrained": tiny_checkpoint}


def test_zero_shot_evaluation_is_deterministic(world: dict[str, Path]) -> None:
    config = retrieval_config("demo", k_test=8)
    first = evaluate(world["pretrained"], world["test"], config, progress=False)
    second = evaluate(world["pretrained"], world["test"], config, batch_size=4, progress=False)
    assert set(first) == METRIC_NAMES
    assert first == second
    assert all(0.0 <= value <= 100.0 for value in first.values())
    # 7 images: every caption's image is within its top 10, whatever the model.
    assert first["img_r10"] == 100.0
    # Zero-shot at another resolution resamples the ViT position embeddings.
    bigger = evaluate(world["pretrained"], world["test"], retrieval_config("demo", image_size=48),
                      progress=False)
    assert set(bigger) == METRIC_NAMES


def test_an_evaluation_image_without_captions_counts_as_a_miss(world: dict[str, Path],
                                                               tmp_path: Path) -> None:
    records = json.loads((world["root"] / "retrieval" / "test.json").read_text())
    records[0]["caption"] = []  # ALBEF's itm_eval: this image's text retrieval always misses
    write_shards(records, world["root"], tmp_path / "shards", kind="retrieval_eval", progress=False)
    metrics = evaluate(world["pretrained"], tmp_path / "shards", retrieval_config("demo", k_test=8),
                       progress=False)
    assert set(metrics) == METRIC_NAMES
    assert metrics["txt_r10"] <= 100.0 * 6 / 7 + 1e-9  # 7 images, one that cannot be found
    assert metrics["img_r10"] == 100.0  # the 30 captions of the other six still query all images


def test_evaluation_rejects_bad_input_before_computing(world: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"retrieval\.image_size"):
        evaluate(world["pretrained"], world["test"], retrieval_config("demo", image_size=36),
                 progress=False)
    with pytest.raises(ValueError, match="retrieval_eval"):
        evaluate(world["pretrained"], world["train"], retrieval_config("demo"), progress=False)
    with pytest.raises(FileNotFoundError):
        evaluate(world["root"] / "missing.pt", world["test"], retrieval_config("demo"))


def test_finetune_end_to_end_then_evaluate(world: dict[str, Path], tmp_path: Path) -> None:
    logged: list[dict[str, float]] = []
    config = retrieval_config("demo", k_test=8, queue_size=64)
    arguments = dict(train=TrainConfig(steps=3, batch_size=8, alpha_warmup_steps=2,
                                       checkpoint_every=3, log_every=1),
                     optim=OptimConfig(lr=1e-4, warmup_steps=0),
                     callback=lambda step, metrics: logged.append(metrics), progress=False)
    path = finetune(world["pretrained"], world["train"], tmp_path / "run", config, stop_after=2,
                    **arguments)
    assert not path.exists()  # interrupted after 2 of 3 steps: continued below
    assert finetune(world["pretrained"], world["train"], tmp_path / "run", config,
                    **arguments) == path
    assert path == tmp_path / "run" / "model.pt" and path.is_file()
    with pytest.raises(ConfigError, match="retrieval"):  # a resume with other settings is refused
        finetune(world["pretrained"], world["train"], tmp_path / "run",
                 dataclasses.replace(config, alpha=0.1), **arguments)
    assert [round(m["alpha"], 3) for m in logged] == [0.0, 0.2, 0.4]  # ALBEF's ramp
    assert all(np.isfinite(m["loss"]) and "ica_i2i" in m and "itm" in m for m in logged)
    payload = read_checkpoint(path)
    assert payload.kind == "retrieval" and payload.task_config["k_test"] == 8
    model = load_retrieval_model(path)
    assert model.config.queue_size == 64 and int(model.queue.filled) == 24  # 3 steps of 8
    # Same-image captions were stored with one id each: 8 images, 5 captions each.
    ids = model.queue.ids[:24].tolist()
    assert set(ids) <= {image_key(i) for i in range(8)}
    metrics = evaluate(path, world["test"], config, progress=False)
    assert set(metrics) == METRIC_NAMES
    assert metrics == evaluate(path, world["test"], config, progress=False)

    payload.kind = "vqa"
    save_checkpoint(tmp_path / "vqa.pt", payload)
    with pytest.raises(ValueError, match="a 'vqa' checkpoint; expected 'pretrain' or 'retrieval'"):
        load_retrieval_model(tmp_path / "vqa.pt")


def test_finetuning_fits_a_fixed_batch() -> None:
    """A few dozen steps on 4 images x 2 captions drive L_ica to its floor and L_itm near 0."""
    torch.manual_seed(0)
    # A queue of one batch, so from step 1 on every caption has 4 positives (2 in the batch, 2
    # queued) and each of the 4 L_ica terms is at least log 4. Momentum 0.5: the teachers of a
    # random model give near-identical text features, which a 0.995 EMA keeps for hundreds of steps.
    model = CodisModel(preset("tiny", queue_size=8, momentum=0.5))
    objective = RetrievalObjective(model).train()
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(4, 3, 64, 64, generator=generator).repeat_interleave(2, dim=0)
    images = images + 0.1 * torch.randn(images.shape, generator=generator)
    texts = ["a red circle", "one red circle on the left", "two blue squares",
             "blue squares above a star", "a large green star", "the green star is big",
             "a small white cross", "one white cross below"]
    input_ids, mask = tokenize(model.tokenizer, texts, 30)
    image_ids = image_keys(torch.arange(4).repeat_interleave(2))
    trainable = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    ica, itm = [], []
    for step in range(70):
        output = objective(images, input_ids, mask, image_ids, alpha=0.0)
        optimizer.zero_grad()
        output.loss.backward()
        if step == 0:  # every trainable parameter is reached (DDP needs that)
            assert all(p.grad is not None for p in trainable)
        optimizer.step()
        ica.append(float(output.parts["ica"]))
        itm.append(float(output.parts["itm"]))
    assert model.codebook is not None and not model.codebook.requires_grad
    floor = 2 * np.log(4)  # (i2t + t2i) / 2 + (i2i + t2t) / 2 with uniform targets over 4
    assert np.mean(ica[1:4]) > floor + 1.5
    assert np.mean(ica[-3:]) < floor + 0.15
    assert np.mean(itm[1:4]) > 0.55 and np.mean(itm[-3:]) < 0.25
