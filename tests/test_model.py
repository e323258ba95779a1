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
