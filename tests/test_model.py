import dataclasses

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForMaskedLM

from codis.config import MODES, ConfigError, TextConfig, VisionConfig, preset
from codis.encoders import TextFusionEncoder, build_image_encoder
from codis.model import CodisModel, load_model, save_model
from codis.text import load_tokenizer, text_tokenizer, tokenize

CAPTIONS = ["a red circle left of a blue square", "two green triangles", "a yellow star above a cross",
            "a small purple hexagon", "a large white diamond", "three black circles",
            "an orange square below a red star", "a blue cross right of a green circle"]


def make_batch(config, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokenizer = text_tokenizer(config.text)
    ids, mask = tokenize(tokenizer, CAPTIONS[:size], config.text.max_length)
    images = torch.randn(size, 3, config.vision.image_size, config.vision.image_size, generator=generator)
    return images, ids, mask


def tiny_model(mode="codis", seed=0, **changes):
    torch.manual_seed(seed)
    return CodisModel(preset("tiny", mode=mode, **changes))


def test_forward_returns_the_loss_parts_of_each_mode():
    batch = make_batch(preset("tiny"))
    expected = {
        "albef": {"ica_i2t", "ica_t2i", "itm", "mlm"},
        "albef_intra": {"ica_i2t", "ica_t2i", "ica_i2i", "ica_t2t", "itm", "mlm"},
        "codis_cross": {"ica_i2t", "ica_t2i", "code_t2p", "code_i2p", "code_ot_image", "code_ot_text"},
        "codis": {"ica_i2i", "ica_t2t", "code_t2p", "code_i2p", "code_ot_image", "code_ot_text"},
        "codis_student": {"ica_i2i", "code_t2p", "code_i2p"},
    }
    for mode in MODES:
        output = tiny_model(mode)(*batch)
        assert expected[mode] <= set(output.parts), mode
        assert ("code" in output.parts) == (mode.startswith("codis"))
        assert ("ica_i2i" in output.parts) == (mode in ("albef_intra", "codis", "codis_student"))
        assert torch.isfinite(output.loss) and output.loss.requires_grad
        summed = sum(output.parts[name] for name in ("ica", "itm", "mlm", "code") if name in output.parts)
        torch.testing.assert_close(output.loss.detach(), summed)


def test_teachers_get_no_gradient_and_move_by_exactly_the_ema_rule():
    model = tiny_model("codis")
    model.momentum_update()  # teachers are exact copies at start: an update leaves them unchanged
    for student, teacher in zip(model.visual_encoder.parameters(), model.visual_encoder_m.parameters()):
        torch.testing.assert_close(student, teacher, rtol=0, atol=0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = make_batch(model.config)
    model(*batch).loss.backward()
    optimizer.step()
    teacher_params = [p for m in model._teachers() for p in m.parameters()]
    student_params = [p for m in model._students() for p in m.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in teacher_params)
    before_teacher = [p.detach().clone() for p in teacher_params]
    before_student = [p.detach().clone() for p in student_params]
    assert any(not torch.equal(s, t) for s, t in zip(before_student, before_teacher))
    model.zero_grad()
    model(*batch)  # forward performs exactly one EMA step before computing the teacher features
    m = model.config.momentum
    for after, teacher, student in zip(teacher_params, before_teacher, before_student):
        torch.testing.assert_close(after, m * teacher + (1 - m) * student, rtol=1e-6, atol=1e-7)


def test_albef_mode_equals_codis_minus_the_extra_terms_on_identical_weights_and_inputs():
    codis = tiny_model("codis")
    albef = tiny_model("albef", seed=1)
    missing, unexpected = albef.load_state_dict(codis.state_dict(), strict=False)
    assert missing == [] and unexpected == ["codebook"]
    batch = make_batch(codis.config)
    torch.manual_seed(123)
    out_codis = codis(*batch)
    torch.manual_seed(123)
    out_albef = albef(*batch)
    for name in ("ica_i2t", "ica_t2i", "itm", "mlm"):
        torch.testing.assert_close(out_albef.parts[name], out_codis.parts[name])
    extra = (out_codis.parts["ica_i2i"] + out_codis.parts["ica_t2t"]) / 2 + out_codis.parts["code"]
    torch.testing.assert_close(out_albef.loss, out_codis.loss - extra)


@pytest.mark.parametrize("mode", MODES)
def test_a_few_optimiser_steps_on_one_batch_lower_the_loss(mode):
    # A queue of one batch is full from the second step on, so steps 1.. see the same number of
    # negatives; the same seed every step gives the same masks and hard negatives.
    model = tiny_model(mode, queue_size=8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = make_batch(model.config)
    losses = []
    for _ in range(10):
        torch.manual_seed(0)
        output = model(*batch)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss.item())
    assert losses[-1] < losses[1] - 0.1, losses


def test_codebook_receives_gradient_only_in_codebook_modes():
    model = tiny_model("codis")
    model(*make_batch(model.config)).loss.backward()
    assert model.codebook.grad is not None and model.codebook.grad.abs().sum() > 0
    assert tiny_model("albef").codebook is None


def test_save_load_round_trip_restores_weights_queues_and_outputs(tmp_path):
    model = tiny_model("codis")
    batch = make_batch(model.config)
    model(*batch)  # fills the queue and moves the teachers
    path = save_model(model, tmp_path / "ckpt" / "model.pt", extra={"step": 1})
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary left behind
    loaded = load_model(path)
    assert loaded.config == model.config
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert int(loaded.queue.filled) == 8
    torch.manual_seed(5)
    expected = model(*batch).loss
    torch.manual_seed(5)
    torch.testing.assert_close(loaded(*batch).loss, expected)


def test_loading_with_an_incompatible_config_names_the_mismatch(tmp_path):
    path = save_model(tiny_model("codis"), tmp_path / "model.pt")
    with pytest.raises(ConfigError, match=r"codebook\.size: checkpoint 32, requested 64"):
        load_model(path, config=preset("tiny").replace(
            codebook=dataclasses.replace(preset("tiny").codebook, size=64)))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_model(tmp_path / "missing.pt")


def test_inference_api_shapes_and_ranges():
    model = tiny_model("codis").eval()
    images, ids, mask = make_batch(model.config, size=4)
    image_feat, image_tokens = model.encode_image(images)
    text_feat, text_tokens = model.encode_text(ids, mask)
    assert image_feat.shape == text_feat.shape == (4, model.config.embed_dim)
    torch.testing.assert_close(image_feat.norm(dim=-1), torch.ones(4))
    scores = model.itm_score(image_tokens, text_tokens, mask)
    assert scores.shape == (4,) and ((scores >= 0) & (scores <= 1)).all()
    assignments = model.codeword_assignments(image_feat)
    assert assignments.shape == (4, model.config.codebook.size)
    torch.testing.assert_close(assignments.sum(-1), torch.ones(4))


def test_image_encoder_loads_local_pretrained_weights(tmp_path):
    config = preset("tiny").vision
    source = build_image_encoder(config)
    save_file(source.state_dict(), tmp_path / "vit.safetensors")
    loaded = build_image_encoder(dataclasses.replace(config, pretrained=str(tmp_path / "vit.safetensors")))
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError, match="vision.pretrained"):
        build_image_encoder(dataclasses.replace(config, pretrained=str(tmp_path / "none.safetensors")))


def test_conv_stem_replaces_the_patchify_projection_and_round_trips(tmp_path):
    base = preset("tiny")
    config = base.replace(vision=dataclasses.replace(base.vision, stem="conv"))  # patch 8: 3 convs
    torch.manual_seed(0)
    model = CodisModel(config)
    strides = [m.stride for m in model.visual_encoder.patch_embed.modules() if isinstance(m, torch.nn.Conv2d)]
    assert strides == [(2, 2)] * 3 + [(1, 1)]  # three stride-2 3x3 convs, then the 1x1 projection
    images, ids, mask = make_batch(config, size=4)
    tokens = model.visual_encoder.forward_features(images)
    grid = config.vision.image_size // config.vision.patch_size
    assert tokens.shape == (4, 1 + grid * grid, config.vision.width)
    model(images, ids, mask).loss.backward()
    assert all(p.grad is not None for p in model.visual_encoder.patch_embed.parameters())
    model.train(False)
    loaded = load_model(save_model(model, tmp_path / "model.pt")).train(False)
    assert loaded.config.vision.stem == "conv"
    torch.testing.assert_close(loaded.encode_image(images)[0], model.encode_image(images)[0])
    # A conv-stem ViT's weights file is a valid warm start for the same config.
    save_file(model.visual_encoder.state_dict(), tmp_path / "conv_vit.safetensors")
    warm = build_image_encoder(dataclasses.replace(config.vision, pretrained=str(tmp_path / "conv_vit.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(warm.eval().forward_features(images),
                                   model.visual_encoder.forward_features(images))


def test_conv_stem_computes_channels_last_with_timms_tokens_and_gradients():
    from timm.models.vision_transformer_hybrid import ConvStem
    vision = dataclasses.replace(preset("tiny").vision, stem="conv")
    torch.manual_seed(0)
    encoder = build_image_encoder(vision)
    stem = encoder.patch_embed.backbone
    layouts = []
    stem[0].register_forward_hook(
        lambda module, inputs, output: layouts.append(output.is_contiguous(memory_format=torch.channels_last)))
    images = torch.randn(4, 3, vision.image_size, vision.image_size)

    def tokens_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        encoder.zero_grad()
        tokens = encoder.forward_features(images)
        tokens.square().mean().backward()
        return tokens.detach(), [p.grad.clone() for p in encoder.parameters()]

    tokens, grads = tokens_and_grads()
    stem.__class__ = ConvStem  # timm's own forward on the same weights, contiguous NCHW throughout
    reference, reference_grads = tokens_and_grads()
    assert layouts == [True, False]
    torch.testing.assert_close(tokens, reference, rtol=1e-5, atol=1e-5)
    for grad, expected in zip(grads, reference_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_text_encoder_loads_a_local_bert_folder_into_text_and_fusion_layers(tmp_path):
    tokenizer = load_tokenizer("builtin")
    bert = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=4,
                                      num_attention_heads=2, intermediate_size=64))
    bert.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    config = TextConfig(pretrained=str(tmp_path / "bert"), text_layers=2, fusion_layers=2)
    encoder = TextFusionEncoder.from_config(config, vocab_size=len(tokenizer))
    source = bert.state_dict()
    torch.testing.assert_close(encoder.bert.embeddings.word_embeddings.weight,
                               source["bert.embeddings.word_embeddings.weight"])
    torch.testing.assert_close(encoder.bert.encoder.layer[1].output.dense.weight,
                               source["bert.encoder.layer.1.output.dense.weight"])
    torch.testing.assert_close(encoder.fusion[1].attention.self.query.weight,
                               source["bert.encoder.layer.3.attention.self.query.weight"])
    torch.testing.assert_close(encoder.mlm_head.predictions.transform.dense.weight,
                               source["cls.predictions.transform.dense.weight"])
    with pytest.raises(ConfigError, match="text.tokenizer"):
        TextFusionEncoder.from_config(config, vocab_size=len(tokenizer) + 1)


def test_vision_and_text_widths_must_match_for_cross_attention():
    config = preset("tiny")
    with pytest.raises(ConfigError, match="vision.width"):
        CodisModel(config.replace(vision=dataclasses.replace(config.vision, width=32)))


def test_small_preset_text_encoder_starts_from_the_offline_minilm_weights():
    from safetensors.torch import load_file

    from codis.text import minilm_folder

    config = preset("small").text
    encoder = TextFusionEncoder.from_config(config, vocab_size=len(load_tokenizer("minilm")))
    source = load_file(str(minilm_folder() / "model.safetensors"))
    key = next(k for k in source if k.endswith("encoder.layer.4.attention.self.query.weight"))
    torch.testing.assert_close(encoder.fusion[1].attention.self.query.weight, source[key])
    key = next(k for k in source if k.endswith("encoder.layer.2.output.dense.weight"))
    torch.testing.assert_close(encoder.bert.encoder.layer[2].output.dense.weight, source[key])
    assert len(encoder.bert.encoder.layer) == 3 and len(encoder.fusion) == 3


@pytest.mark.parametrize("mode", ["albef", "codis"])
def test_every_trainable_parameter_gets_a_gradient(mode):
    # DDP requires it (no unused parameters), and it catches heads that are built but never used.
    model = tiny_model(mode)
    model(*make_batch(model.config)).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_loss_weights_scale_the_total():
    from codis.config import LossWeights

    batch = make_batch(preset("tiny"))
    torch.manual_seed(9)
    plain = tiny_model("codis")(*batch)
    torch.manual_seed(9)
    weighted = tiny_model("codis", loss_weights=LossWeights(code=2.0, itm=0.5))(*batch)
    parts = plain.parts
    expected = parts["ica"] + 0.5 * parts["itm"] + parts["mlm"] + 2.0 * parts["code"]
    torch.testing.assert_close(weighted.loss.detach(), expected)


# ---- step efficiency: same numbers without host syncs ---------------------------------------------
def test_mlm_on_masked_positions_equals_the_head_on_every_token_then_boolean_selection():
    import torch.nn.functional as F

    from codis.text import mask_tokens, mlm_positions

    model = tiny_model("albef")
    images, ids, mask = make_batch(model.config)
    masked, labels = mask_tokens(ids, model.tokenizer, 0.3, generator=torch.Generator().manual_seed(3))
    f = model.pair_features(images, ids, mask)
    encoder, teacher = model.text_encoder, model.text_encoder_m
    parameters = [p for p in encoder.parameters() if p.requires_grad]

    # Former: the MLM head on every token, the masked rows picked by a boolean mask.
    logits = encoder.mlm_logits(encoder.fuse(encoder.encode_text(masked, mask), mask, f.image_tokens))
    with torch.no_grad():
        logits_m = teacher.mlm_logits(teacher.fuse(teacher.encode_text(masked, mask), mask,
                                                   f.image_tokens_m))
    chosen = labels != -100
    ce = F.cross_entropy(logits[chosen], labels[chosen])
    targets = F.softmax(logits_m[chosen], dim=-1)
    distill = -(targets * F.log_softmax(logits[chosen], dim=-1)).sum(-1).mean()
    former = 0.6 * ce + 0.4 * distill
    former_grads = torch.autograd.grad(former, parameters, allow_unused=True)

    for mlm_inputs in ((masked, labels, mlm_positions(labels)), (masked, labels)):
        total, parts = model._mlm_loss(ids, mask, f.image_tokens, f.image_tokens_m, 0.4, mlm_inputs)
        torch.testing.assert_close(total, former)
        torch.testing.assert_close(parts["ce"], ce)
        grads = torch.autograd.grad(total, parameters, allow_unused=True)
        for name, new, old in zip([n for n, p in encoder.named_parameters() if p.requires_grad],
                                  grads, former_grads):
            assert (new is None) == (old is None), name
            if new is not None:
                torch.testing.assert_close(new, old, msg=name)


def test_given_mlm_positions_must_be_those_of_the_labels():
    from codis.text import mask_tokens, mlm_positions

    model = tiny_model("albef")
    images, ids, mask = make_batch(model.config)
    masked, labels = mask_tokens(ids, model.tokenizer, 0.3, generator=torch.Generator().manual_seed(3))
    positions = mlm_positions(labels)
    assert len(positions) > 1
    for wrong in (positions[1:], positions.flip(0), positions + 1):
        with pytest.raises(RuntimeError, match="positions"):  # asserted on the device
            model(images, ids, mask, mlm_inputs=(masked, labels, wrong))
    with pytest.raises(ValueError, match="positions must be 1-D long"):
        model(images, ids, mask, mlm_inputs=(masked, labels, positions.int()))


def test_text_encoder_gives_the_hidden_states_of_transformers_2d_mask():
    model = tiny_model("codis").eval()
    _, ids, mask = make_batch(model.config)
    assert (mask == 0).any() and (mask.sum(1) == mask.shape[1]).any()  # padded and full rows
    encoder = model.text_encoder
    expected = encoder.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(encoder.encode_text(ids, mask), expected)
    # Without padding transformers drops the mask; ours is all zeros: the same attention.
    full = torch.ones_like(mask)
    torch.testing.assert_close(encoder.encode_text(ids, full),
                               encoder.bert(input_ids=ids, attention_mask=full).last_hidden_state)


def test_a_loaded_half_filled_queue_returns_its_filled_part():
    model = tiny_model("codis", queue_size=16)
    model(*make_batch(model.config))  # 8 of 16 entries
    loaded = tiny_model("codis", queue_size=16, seed=1)
    assert loaded.queue.contents()[0].shape[0] == 0
    loaded.load_state_dict(model.state_dict())
    image, text, ids = loaded.queue.contents()
    assert image.shape[0] == text.shape[0] == ids.shape[0] == 8
    torch.testing.assert_close(image, model.queue.contents()[0])
    # and it keeps counting from there
    loaded(*make_batch(loaded.config))
    assert loaded.queue.contents()[0].shape[0] == 16 == int(loaded.queue.filled)


def test_both_modalities_plans_in_one_call_equal_two_separate_solves():
    from codis.losses import codeword_distance
    from codis.ot import transport_plan

    model = tiny_model("codis")
    generator = torch.Generator().manual_seed(4)
    image, text = (torch.nn.functional.normalize(torch.randn(8, model.config.embed_dim,
                                                             generator=generator), dim=-1)
                   for _ in range(2))
    with torch.no_grad():
        image_plan, text_plan = model._local_plans(image, text)
        for features, plan in ((image, image_plan), (text, text_plan)):
            separate = transport_plan(codeword_distance(features, model.codebook),
                                      model.config.codebook.ot)
            torch.testing.assert_close(plan, separate, rtol=1e-5, atol=1e-9)
    assert not torch.allclose(image_plan, text_plan)


def test_rank_one_of_two_takes_the_other_ranks_rows_and_its_own_plan_rows(monkeypatch):
    import codis.model
    from codis.losses import codeword_distance
    from codis.ot import transport_plan

    # Rank 1 of two, without a process group: rank 0's batch is rank 1's reversed.
    monkeypatch.setattr(codis.model, "_world", lambda: (2, 1))
    monkeypatch.setattr(codis.model, "gather_from_all_ranks",
                        lambda tensor: torch.cat([tensor.flip(0), tensor]))
    model = tiny_model("codis")
    generator = torch.Generator().manual_seed(6)
    image, text = (torch.nn.functional.normalize(torch.randn(4, model.config.embed_dim,
                                                             generator=generator), dim=-1)
                   for _ in range(2))
    ids = torch.arange(4)
    others = codis.model._other_ranks(image, text, ids)
    for got, mine in zip(others, (image, text, ids)):
        assert torch.equal(got, mine.flip(0))
    with torch.no_grad():
        image_plan, text_plan = model._local_plans(image, text)
        for features, plan in ((image, image_plan), (text, text_plan)):
            everyone = torch.cat([features.flip(0), features])
            whole = transport_plan(codeword_distance(everyone, model.codebook),
                                   model.config.codebook.ot)
            torch.testing.assert_close(plan, 2 * whole[4:], rtol=1e-5, atol=1e-9)
