import dataclasses

import pytest
import torch
from PIL import Image

from codis.config import preset
from codis.report.gradcam import default_layer, gradcam_figure, word_gradcam, word_map
from codis.model import CodisModel
from codis.text import load_tokenizer, tokenize

CAPTION = "A red square left of a blue circle."


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return CodisModel(preset("tiny"))


@pytest.fixture(scope="module")
def two_fusion():
    """The tiny preset with a second fusion layer, so that an inner layer's words get gradient."""
    torch.manual_seed(0)
    config = preset("tiny")
    return CodisModel(config.replace(text=dataclasses.replace(config.text, fusion_layers=2)))


SIZE = preset("tiny").vision.image_size


def _image(seed=0, size=SIZE):
    return torch.randn(3, size, size, generator=torch.Generator().manual_seed(seed))


def test_default_layer_follows_albef_and_avoids_the_last():
    assert default_layer(6) == 2  # ALBEF's block_num=8 of 6 text + 6 fusion layers
    assert default_layer(3) == 1 and default_layer(2) == 0 and default_layer(1) == 0


def test_in_the_last_fusion_layer_only_cls_gets_a_gradient(tiny):
    with pytest.warns(UserWarning, match="last"):
        result = word_gradcam(tiny, _image(), CAPTION, layer=len(tiny.text_encoder.fusion) - 1)
    tokens, maps = result["tokens"], result["maps"]
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert maps.shape == (len(tokens), SIZE, SIZE) and maps.dtype == torch.float32
    assert maps.min() >= 0 and maps.max() <= 1
    # [CLS] feeds the ITM head, so its map carries the gradient; no other token's does
    assert maps[0].max() == pytest.approx(1.0) and maps[0].min() == 0
    assert maps[1:].abs().max() == 0
    assert result["words"] == ["a", "red", "square", "left", "of", "a", "blue", "circle"]
    assert 0.0 < result["itm_score"] < 1.0


def test_word_maps_differ_between_words_and_images(two_fusion):
    result = word_gradcam(two_fusion, _image(0), CAPTION)
    assert result["layer"] == 0
    maps = result["maps"]
    assert maps.min() >= 0 and maps.max() <= 1
    red, circle = word_map(result, "red"), word_map(result, "circle")
    assert red.shape == (SIZE, SIZE) and red.max() == pytest.approx(1.0)
    assert (red - circle).abs().max() > 1e-3
    other = word_gradcam(two_fusion, _image(1), CAPTION)
    assert (other["maps"] - maps).abs().max() > 1e-3
    # deterministic
    again = word_gradcam(two_fusion, _image(0), CAPTION)
    torch.testing.assert_close(again["maps"], maps)


def test_itm_score_matches_the_model_and_attention_is_restored(two_fusion):
    model = two_fusion
    attention = model.text_encoder.fusion[0].crossattention.self
    config_before = attention.config
    implementation = config_before._attn_implementation
    image = _image(2)
    result = word_gradcam(model, image, CAPTION, layer=0)
    assert attention.config is config_before and config_before._attn_implementation == implementation
    assert not attention._forward_hooks
    # the eager layer computes what the default backend computes
    model.eval()
    ids, mask = tokenize(load_tokenizer("builtin"), ["a red square left of a blue circle"], 30)
    image_tokens, text_tokens = model.image_tokens(image[None]), model.text_tokens(ids, mask)
    expected = model.itm_score(image_tokens, text_tokens, mask).item()
    assert result["itm_score"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_no_parameter_gradients_and_mode_kept(two_fusion, training):
    model = two_fusion
    model.zero_grad(set_to_none=True)
    model.train(training)
    word_gradcam(model, _image(), CAPTION, layer=0)
    assert model.training is training
    assert all(module.training is training for module in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_works_with_frozen_parameters(two_fusion):
    model = two_fusion
    flags = [p.requires_grad for p in model.parameters()]
    try:
        model.requires_grad_(False)
        result = word_gradcam(model, _image(), CAPTION, layer=0)
        assert result["maps"][1:].abs().max() > 0
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def test_bad_inputs_name_the_argument(tiny):
    with pytest.raises(ValueError, match="image"):
        word_gradcam(tiny, _image(size=48), CAPTION)
    with pytest.raises(ValueError, match="image"):
        word_gradcam(tiny, torch.zeros(1, 3, SIZE, SIZE), CAPTION)
    with pytest.raises(ValueError, match="layer"):
        word_gradcam(tiny, _image(), CAPTION, layer=2)
    with pytest.raises(ValueError, match="text"):
        word_gradcam(tiny, _image(), " ?! ")


def test_gradcam_figure_draws_one_panel_per_word(two_fusion):
    image = _image()
    result = word_gradcam(two_fusion, image, CAPTION, layer=0)
    figure = gradcam_figure(image, result, ["red", "circle"], panel_size=64)
    assert isinstance(figure, Image.Image)
    everything = gradcam_figure(Image.new("RGB", (50, 40), "gray"), result, panel_size=64)
    # the image plus one panel per word, each 64 px wide with a margin
    assert everything.width - figure.width == (len(result["words"]) - 2) * (64 + 6)
    assert figure.height == everything.height > 64
    # the overlays differ from each other
    left = figure.crop((6 + 70, 28, 6 + 70 + 64, 28 + 64)).tobytes()
    right = figure.crop((6 + 140, 28, 6 + 140 + 64, 28 + 64)).tobytes()
    assert left != right
    with pytest.raises(ValueError, match="giraffe"):
        gradcam_figure(image, result, ["giraffe"])
