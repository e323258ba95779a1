"""Issue #14: ``base`` follows ALBEF's code where ours differed, each of our variants stays a named
option, and ``tiny`` (the demo) is exactly what it was. One section per point of the issue.

The base-semantics models are ``base()`` at tiny's sizes, built offline (no pretrained weights,
the builtin tokenizer); only the encoder sizes are replaced, every semantics field is base's.
"""

import copy
import dataclasses
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

import codis.model
import codis.queue
from codis import losses
from codis.checkpoint import read_checkpoint, save_checkpoint
from codis.config import CodebookConfig, ConfigError, ModelConfig, preset
from codis.model import CodisModel, load_model, save_model
from codis.queue import FeatureQueue
from codis.text import appends_sep, load_tokenizer, mask_tokens, tokenize
from codis.train.engine import build_optimizer
from codis.train.schedules import OptimConfig

CAPTIONS = ["a red circle left of a blue square", "two green triangles", "a yellow star above a cross",
            "a small purple hexagon", "a large white diamond", "three black circles",
            "an orange square below a red star", "a blue cross right of a green circle"]
LONG = "a red circle left of a blue square above a green triangle right of a yellow star " * 3

# tiny() as it was before issue #14, as a checkpoint of that time holds it (no field of the issue).
TINY_BEFORE_ISSUE_14 = {
    "vision": {"timm_model": "vit_base_patch16_224", "pretrained": None, "image_size": 64,
               "patch_size": 8, "width": 64, "depth": 2, "heads": 2, "mlp_ratio": 2.0,
               "stem": "patch"},
    "text": {"pretrained": None, "tokenizer": "builtin", "hidden_size": 64, "text_layers": 1,
             "fusion_layers": 2, "heads": 2, "intermediate_size": 128, "max_length": 30,
             "init_std": 0.1, "dropout": 0.0},
    "codebook": {"size": 32, "temperature": 0.1,
                 "ot": {"solver": "ipot", "epsilon": 0.1, "iterations": 20, "inner_iterations": 1,
                        "log_domain": True}},
    "mode": "codis", "embed_dim": 64, "queue_size": 32, "momentum": 0.95, "alpha": 0.4,
    "temperature": 0.07, "temperature_min": 0.001, "temperature_max": 0.5,
    "mlm_probability": 0.15, "loss_weights": {"ica": 1.0, "itm": 1.0, "mlm": 1.0, "code": 1.0}}
NEW_FIELDS = {"queue_init", "negatives", "temperature_parameter", "ica_terms"}


def small_base(**changes) -> ModelConfig:
    """base() with tiny's encoder sizes, no pretrained weights and the builtin tokenizer."""
    base = preset("base")
    vision = dataclasses.replace(base.vision, pretrained=None, image_size=64, patch_size=8, width=64,
                                 depth=2, heads=2, mlp_ratio=2.0)
    text = dataclasses.replace(base.text, pretrained=None, tokenizer="builtin", hidden_size=64,
                               text_layers=1, fusion_layers=2, heads=2, intermediate_size=128,
                               init_std=0.1, dropout=0.0)
    return base.replace(vision=vision, text=text, embed_dim=64, queue_size=256, **changes)


def build(config: ModelConfig, seed: int = 0) -> CodisModel:
    torch.manual_seed(seed)
    return CodisModel(config)


def batch_for(model: CodisModel, size: int = 8, seed: int = 0):
    ids, mask = tokenize(model.tokenizer, CAPTIONS[:size], model.config.text.max_length)
    image_size = model.config.vision.image_size
    images = torch.randn(size, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    return images, ids, mask


def test_base_has_albef_semantics_and_tiny_is_todays():
    base = preset("base")
    assert (base.text.append_sep, base.text.max_length) == (False, 25)
    assert (base.queue_init, base.negatives, base.temperature_parameter) == ("random", "per_rank", "raw")
    assert small_base().queue_init == "random" and small_base().text.append_sep is False
    # tiny is field for field what it was, and a checkpoint's config of that time reads as tiny.
    assert ModelConfig.from_dict(TINY_BEFORE_ISSUE_14) == preset("tiny")
    tiny = preset("tiny").to_dict()
    assert {k: v for k, v in tiny.items() if k not in NEW_FIELDS} == {
        **TINY_BEFORE_ISSUE_14, "text": {**TINY_BEFORE_ISSUE_14["text"], "append_sep": True}}
    assert {k: tiny[k] for k in NEW_FIELDS} == {"queue_init": "empty", "negatives": "global",
                                               "temperature_parameter": "log", "ica_terms": "pairs"}
    small = preset("small")
    assert (small.text.append_sep, small.text.max_length, small.queue_init, small.negatives,
            small.temperature_parameter, small.codebook.size) == (True, 30, "empty", "global", "log", 256)


# ---- 1. tokenisation without [SEP] ---------------------------------------------------------------
def test_albef_tokenizer_gives_cls_x_without_sep_and_bert_tokenizer_keeps_it():
    albef, bert = load_tokenizer("builtin", append_sep=False), load_tokenizer("builtin")
    cls, sep = bert.cls_token_id, bert.sep_token_id
    words = bert("a red circle", add_special_tokens=False)["input_ids"]
    assert albef("a red circle")["input_ids"] == [cls, *words]
    assert bert("a red circle")["input_ids"] == [cls, *words, sep]
    assert appends_sep(bert) and not appends_sep(albef)
    # ALBEF's pair layout, and truncation keeps max_length - 1 word pieces after [CLS].
    assert albef("a", "red")["input_ids"] == [cls, words[0], sep, words[1], sep]
    ids, mask = tokenize(albef, [LONG, "a"], 25)
    assert ids.shape == (2, 25) and sep not in ids.tolist()[0] and ids[0, 0] == cls
    assert mask[1].tolist() == [1, 1] + [0] * 23
    # A data-loading worker gets a pickled copy: it tokenises alike.
    assert pickle.loads(pickle.dumps(albef))("a red")["input_ids"] == albef("a red")["input_ids"]


def test_the_model_and_its_task_models_tokenise_as_the_config_says():
    base_model, tiny_model = build(small_base(mode="albef")), build(preset("tiny", mode="albef"))
    assert not appends_sep(base_model.tokenizer) and appends_sep(tiny_model.tokenizer)
    from codis.tasks.ve import empty_backbone
    from codis.tasks.vqa import VQAModel, config as vqa_config
    vqa = VQAModel(base_model.config, base_model.text_encoder.architecture(), vqa_config("demo"))
    assert not appends_sep(vqa.tokenizer)
    assert not appends_sep(empty_backbone(base_model.config, base_model.text_encoder.architecture(),
                                          base_model.config.vision.image_size).tokenizer)


def test_vqa_answers_end_with_sep_whatever_the_tokenizer():
    from codis.tasks.vqa import _answer_batch
    albef, bert = load_tokenizer("builtin", append_sep=False), load_tokenizer("builtin")
    batch = {"answers": [["yes"], ["two", LONG]], "answer_weights": [[1.0], [0.5, 0.5]]}
    without, with_sep = (_answer_batch(batch, t, 6, torch.device("cpu")) for t in (albef, bert))
    for got, expected in zip(without, with_sep):
        assert torch.equal(got, expected)
    ids, mask = without[:2]
    ends = mask.sum(1) - 1
    assert (ids[torch.arange(3), ends] == bert.sep_token_id).all()  # the long answer too (truncated)
    assert ids.shape[1] == 6 and (ids[:, 0] == bert.cls_token_id).all()


@pytest.mark.parametrize("append_sep", [False, True])
def test_mlm_never_masks_special_tokens(append_sep):
    tokenizer = load_tokenizer("builtin", append_sep=append_sep)
    ids, _ = tokenize(tokenizer, CAPTIONS, 25)
    special = (ids == tokenizer.cls_token_id) | (ids == tokenizer.pad_token_id) | (
        ids == tokenizer.sep_token_id)
    masked, labels = mask_tokens(ids, tokenizer, 0.999, generator=torch.Generator().manual_seed(0))
    assert (labels[special] == -100).all() and torch.equal(masked[special], ids[special])
    assert (labels[~special] != -100).float().mean() > 0.9


# ---- 2. ALBEF's per-task maximum lengths ---------------------------------------------------------
def test_task_max_lengths_are_albefs_in_paper_presets_and_the_models_in_demo_presets():
    from codis.tasks import nlvr, retrieval, ve, vqa
    paper = {retrieval.config("coco"): 30, retrieval.config("flickr"): 30, vqa.config("vqa"): 25,
             nlvr.config("nlvr"): 512, ve.config("ve"): 512}
    for task_config, length in paper.items():
        assert task_config.max_length == length
        assert task_config.text_max_length(preset("tiny")) == length
    for module in (retrieval, vqa, nlvr, ve):
        demo = module.config("demo")
        assert demo.max_length is None
        assert demo.text_max_length(preset("tiny")) == 30
        assert demo.text_max_length(preset("base")) == 25
    with pytest.raises(ConfigError, match=r"^retrieval\.max_length"):
        retrieval.config("coco", max_length=2)


def test_retrieval_evaluation_cuts_captions_at_the_tasks_max_length(shards, tiny_checkpoint):
    from codis.tasks import retrieval
    model = load_model(tiny_checkpoint).eval()
    test = shards("retrieval_eval", "test")
    cut = retrieval.encode_eval_set(model, test, retrieval.config("demo", max_length=5))
    whole = retrieval.encode_eval_set(model, test, retrieval.config("demo"))
    assert cut.text_mask.shape[1] == 5 < whole.text_mask.shape[1]


# ---- 3. queue initialisation ---------------------------------------------------------------------
def test_random_queue_is_albefs_draw_and_in_use_from_the_first_step():
    torch.manual_seed(3)
    queue = FeatureQueue(16, 8, init="random")
    torch.manual_seed(3)
    image, text = (F.normalize(torch.randn(8, 16), dim=0).T for _ in range(2))
    assert torch.equal(queue.image, image) and torch.equal(queue.text, text)
    contents = queue.contents()
    assert contents[0].shape == (16, 8) and (contents[2] == -1).all()
    assert (int(queue.pointer), int(queue.filled)) == (0, 16)
    torch.testing.assert_close(contents[1].norm(dim=1), torch.ones(16))
    queue.enqueue(torch.ones(4, 8), torch.ones(4, 8), torch.arange(4))
    assert (int(queue.pointer), int(queue.filled)) == (4, 16)
    assert torch.equal(queue.ids[:4], torch.arange(4)) and torch.equal(queue.image[4:], image[4:])
    with pytest.raises(ValueError, match="init"):
        FeatureQueue(4, 2, init="zeros")


def test_base_contrasts_with_the_whole_random_queue_and_tiny_with_the_filled_part():
    model = build(small_base(mode="albef"))
    assert int(model.queue.filled) == model.config.queue_size
    queue_before = model.queue.image.clone(), model.queue.text.clone()
    images, ids, mask = batch_for(model)
    f = model.pair_features(images, ids, mask)
    _, parts = model.contrastive_loss(f, alpha=0.4)
    _, expected = losses.ica_loss(f.image_feat, f.text_feat, f.image_feat_m, f.text_feat_m,
                                  *queue_before, temperature=model.temperature, alpha=0.4,
                                  intra_modal=False)
    torch.testing.assert_close(parts["i2t"], expected["i2t"])
    assert int(build(preset("tiny")).queue.filled) == 0
    # A retrieval queue of another size starts as the model's config says.
    from codis.tasks import retrieval
    resized = retrieval.prepare_model(model, retrieval.config("demo", queue_size=16))
    assert int(resized.queue.filled) == 16
    tiny = retrieval.prepare_model(build(preset("tiny")), retrieval.config("demo", queue_size=16))
    assert int(tiny.queue.filled) == 0


# ---- 4. negatives under DDP ----------------------------------------------------------------------
def test_per_rank_negatives_leave_out_the_other_ranks_and_the_queue_still_gets_them(monkeypatch):
    # Rank 0 of two, without a process group: rank 1's batch is rank 0's reversed.
    def gather(tensor):
        return torch.cat([tensor, tensor.flip(0)])

    monkeypatch.setattr(codis.model, "_world", lambda: (2, 0))
    monkeypatch.setattr(codis.model, "gather_from_all_ranks", gather)
    monkeypatch.setattr(codis.queue, "gather_from_all_ranks", gather)
    results = {}
    for negatives in ("per_rank", "global"):
        model = build(small_base(mode="albef", negatives=negatives))
        queue = model.queue.image.clone(), model.queue.text.clone()
        images, ids, mask = batch_for(model)
        f = model.pair_features(images, ids, mask)
        _, parts = model.contrastive_loss(f, alpha=0.4)
        others = (f.image_feat_m.flip(0), f.text_feat_m.flip(0)) if negatives == "global" else (
            f.image_feat_m[:0], f.text_feat_m[:0])
        _, expected = losses.ica_loss(
            f.image_feat, f.text_feat, f.image_feat_m, f.text_feat_m,
            torch.cat([others[0], queue[0]]), torch.cat([others[1], queue[1]]),
            temperature=model.temperature, alpha=0.4, intra_modal=False)
        for name in ("i2t", "t2i"):
            torch.testing.assert_close(parts[name], expected[name])
        results[negatives] = parts["i2t"]
        model.queue.enqueue(f.image_feat_m, f.text_feat_m)  # as the forward does
        assert int(model.queue.pointer) == 16  # both ranks' features, as ALBEF's concat_all_gather
        assert torch.equal(model.queue.image[8:16], f.image_feat_m.flip(0))
    assert not torch.allclose(results["per_rank"], results["global"])


# ---- 5. temperature ------------------------------------------------------------------------------
def test_raw_temperature_is_a_parameter_named_temp_clamped_in_place():
    model = build(small_base(mode="albef"))
    names = dict(model.named_parameters())
    assert "temp" in names and "log_temp" not in names and names["temp"].shape == ()
    assert model.temperature is model.temp and model.temp.item() == pytest.approx(0.07)
    with torch.no_grad():
        model.temp.fill_(0.9)
    output = model(*batch_for(model))
    assert model.temp.item() == 0.5  # clamped before use, in place
    output.loss.backward()
    assert model.temp.grad is not None and model.temp.grad.abs() > 0
    tiny = build(preset("tiny"))
    assert "log_temp" in dict(tiny.named_parameters()) and not hasattr(tiny, "temp")
    assert tiny.temperature.item() == pytest.approx(0.07)


def test_one_adamw_step_moves_the_raw_temperature_as_albefs_and_14_times_the_log_one():
    optim = OptimConfig(lr=1e-4, weight_decay=0.02)
    moved = {}
    for parameter in ("raw", "log"):
        model = build(small_base(mode="albef", temperature_parameter=parameter, queue_init="empty"))
        optimizer = build_optimizer(model, optim)
        torch.manual_seed(0)
        model(*batch_for(model)).loss.backward()
        before = model.temperature.item()
        if parameter == "raw":
            # ALBEF's AdamW group for temp: decayed (its rule exempts only 1-d tensors and biases).
            reference = torch.nn.Parameter(torch.tensor(0.07))
            reference.grad = model.temp.grad.clone()
            torch.optim.AdamW([{"params": [reference], "weight_decay": 0.02}], lr=1e-4).step()
        optimizer.step()
        if parameter == "raw":
            torch.testing.assert_close(model.temp.detach(), reference.detach(), rtol=0, atol=0)
        moved[parameter] = abs(model.temperature.item() - before)
    assert 13 < moved["raw"] / moved["log"] < 15.5, moved  # ~1 / 0.07


def test_only_the_raw_temperature_joins_the_decayed_group():
    def decay_of(model, name):
        parameter = dict(model.named_parameters())[name]
        groups = build_optimizer(model, OptimConfig(weight_decay=0.02)).param_groups
        return next(g["weight_decay"] for g in groups if any(p is parameter for p in g["params"]))

    assert decay_of(build(small_base(mode="albef")), "temp") == 0.02
    tiny = build(preset("tiny", mode="albef"))
    assert decay_of(tiny, "log_temp") == 0.0 and decay_of(tiny, "itm_head.bias") == 0.0
    assert decay_of(tiny, "itm_head.weight") == 0.02


def test_a_checkpoint_saved_before_the_issue_loads_as_it_was_trained(tmp_path):
    model = build(preset("tiny"))
    path = save_model(model, tmp_path / "model.pt")
    checkpoint = read_checkpoint(path)
    old = {k: v for k, v in checkpoint.model_config.items() if k not in NEW_FIELDS}
    old["text"] = {k: v for k, v in old["text"].items() if k != "append_sep"}
    assert old == TINY_BEFORE_ISSUE_14
    save_checkpoint(path, dataclasses.replace(checkpoint, model_config=old))
    loaded = load_model(path)
    assert loaded.config == preset("tiny") and appends_sep(loaded.tokenizer)
    torch.testing.assert_close(loaded.temperature, model.temperature)


# ---- 6. given MLM inputs, ITM negatives and generator --------------------------------------------
def test_given_draws_reproduce_the_generators_loss():
    model = build(small_base(mode="albef"))
    drawn, given, again, probe = (copy.deepcopy(model) for _ in range(4))
    images, ids, mask = batch_for(model)

    torch.manual_seed(100)  # the global generator must not matter
    from_generator = drawn(images, ids, mask, generator=torch.Generator().manual_seed(7))

    # The same draws by hand, in the model's order: ITM negatives, then the MLM mask.
    generator = torch.Generator().manual_seed(7)
    probe.clamp_temperature()
    f = probe.pair_features(images, ids, mask)
    with torch.no_grad():
        sim_i2t = f.image_feat @ f.text_feat_m.T / probe.temperature
        sim_t2i = f.text_feat @ f.image_feat_m.T / probe.temperature
    negatives = losses.hard_negative_indices(sim_i2t, sim_t2i, generator=generator)
    mlm = mask_tokens(ids, probe.tokenizer, probe.config.mlm_probability, generator=generator)
    assert (mlm[1] != -100).any()

    torch.manual_seed(200)
    first = given(images, ids, mask, mlm_inputs=mlm, itm_negatives=negatives)
    torch.manual_seed(300)
    second = again(images, ids, mask, mlm_inputs=mlm, itm_negatives=negatives)
    for name in ("ica", "itm", "mlm"):
        assert torch.equal(first.parts[name], second.parts[name]), name
        torch.testing.assert_close(first.parts[name], from_generator.parts[name], rtol=0, atol=0)
    assert torch.equal(first.loss, from_generator.loss)


def test_given_draws_are_checked_and_used():
    model = build(small_base(mode="albef"))
    images, ids, mask = batch_for(model)
    negatives = (torch.arange(8).roll(1), torch.arange(8).roll(2))
    with pytest.raises(ValueError, match="mlm_inputs: labels"):
        model(images, ids, mask, mlm_inputs=(ids, ids[:, :3]))
    with pytest.raises(ValueError, match="itm_negatives: negative_text_for_image"):
        model(images, ids, mask, itm_negatives=(negatives[0], torch.zeros(8)))
    with pytest.raises(ValueError, match=r"itm_negatives: .*outside \[0, 8\)"):
        model(images, ids, mask, itm_negatives=(negatives[0] + 8, negatives[1]))
    no_mask = (ids.clone(), torch.full_like(ids, -100))
    output = copy.deepcopy(model)(images, ids, mask, mlm_inputs=no_mask, itm_negatives=negatives)
    assert output.parts["mlm"] == 0  # nothing masked: nothing to predict
    other = copy.deepcopy(model)(images, ids, mask, mlm_inputs=no_mask,
                                 itm_negatives=(negatives[1], negatives[0]))
    assert not torch.equal(output.parts["itm"], other.parts["itm"])


# ---- 7. L_ica weighting --------------------------------------------------------------------------
def test_ica_terms_pairs_and_mean():
    generator = torch.Generator().manual_seed(0)
    image, text, image_m, text_m = (F.normalize(torch.randn(4, 8, generator=generator), dim=-1)
                                    for _ in range(4))
    queue = F.normalize(torch.randn(6, 8, generator=generator), dim=-1)
    kwargs = dict(temperature=0.07, alpha=0.4)
    totals = {}
    for terms in ("pairs", "mean"):
        for intra in (True, False):
            totals[terms, intra], parts = losses.ica_loss(image, text, image_m, text_m, queue, queue,
                                                          intra_modal=intra, terms=terms, **kwargs)
            if intra:
                cross, within = parts["i2t"] + parts["t2i"], parts["i2i"] + parts["t2t"]
                expected = cross / 2 + within / 2 if terms == "pairs" else (cross + within) / 4
            else:
                expected = (parts["i2t"] + parts["t2i"]) / 2
            torch.testing.assert_close(totals[terms, intra], expected)
    torch.testing.assert_close(totals["pairs", False], totals["mean", False])
    with pytest.raises(ValueError, match="terms"):
        losses.ica_loss(image, text, image_m, text_m, queue, queue, intra_modal=True, terms="sum",
                        **kwargs)
    # The model passes its config's choice on.
    model = build(preset("tiny", mode="albef_intra", ica_terms="mean"))
    parts = model(*batch_for(model)).parts
    torch.testing.assert_close(parts["ica"], sum(parts[f"ica_{n}"] for n in ("i2t", "t2i", "i2i", "t2t")) / 4)


# ---- 8. codebook size ----------------------------------------------------------------------------
def test_base_uses_a_codebook_size_the_paper_tested():
    assert preset("base").codebook.size == 3000
    assert (preset("tiny").codebook.size, preset("small").codebook.size) == (32, 256)
    assert CodebookConfig().size == 1024  # untested by the paper, and its docstring says so
    assert "untested" in CodebookConfig.__doc__
    model = build(small_base())
    assert model.codebook.shape == (3000, 64)
    assert math.isfinite(model(*batch_for(model)).loss.item())
