import pytest

from codis.config import MODES, ConfigError, ModelConfig, OTConfig, VisionConfig, preset


def test_presets_build_and_round_trip_through_dicts():
    for name in ("tiny", "small", "base"):
        config = preset(name)
        assert ModelConfig.from_dict(config.to_dict()) == config


def test_base_preset_has_the_papers_hyper_parameters():
    config = preset("base")
    assert (config.vision.image_size, config.vision.patch_size, config.vision.width) == (256, 16, 768)
    assert config.vision.pretrained.startswith("deit_base_patch16_224")
    assert config.text.pretrained == "bert-base-uncased"
    assert (config.text.text_layers, config.text.fusion_layers) == (6, 6)
    assert config.embed_dim == 256 and config.queue_size == 65536
    assert config.momentum == 0.995 and config.alpha == 0.4 and config.temperature == 0.07
    assert (config.temperature_min, config.temperature_max) == (0.001, 0.5)
    assert config.mlm_probability == 0.15
    # ALBEF's code (issue #14): captions "[CLS] x" cut at 25 tokens, queues filled with random
    # features, negatives per process, a raw temperature; 3K codewords, a size the paper tested.
    assert config.text.max_length == 25 and config.text.append_sep is False
    assert (config.queue_init, config.negatives, config.temperature_parameter) == (
        "random", "per_rank", "raw")
    assert config.codebook.size == 3000


@pytest.mark.parametrize("mode, intra, codebook", [
    ("albef", False, "off"), ("albef_intra", True, "off"), ("codis_cross", False, "teacher"),
    ("codis", True, "teacher"), ("codis_student", True, "student")])
def test_modes_map_to_the_papers_rows(mode, intra, codebook):
    config = preset("tiny", mode=mode)
    assert config.intra_modal is intra and config.codebook_features == codebook
    assert mode in MODES


@pytest.mark.parametrize("build, field", [
    (lambda: preset("tiny", mode="clip"), "mode"),
    (lambda: preset("tiny", momentum=1.0), "momentum"),
    (lambda: preset("tiny", temperature=0.9), "temperature"),
    (lambda: preset("tiny", queue_size=0), "queue_size"),
    (lambda: VisionConfig(image_size=250, patch_size=16), "vision.image_size"),
    (lambda: VisionConfig(stem="cnn"), "vision.stem"),
    (lambda: VisionConfig(stem="conv", image_size=48, patch_size=12), "vision.patch_size"),
    (lambda: VisionConfig(stem="conv", pretrained="deit_base_patch16_224.fb_in1k"), "vision.pretrained"),
    (lambda: OTConfig(solver="emd"), "codebook.ot.solver"),
    (lambda: ModelConfig.from_dict({**preset("tiny").to_dict(), "embed_dims": 3}), "embed_dims"),
    (lambda: ModelConfig.from_dict({"codebook": {"size": 1}}), "codebook.size"),
    (lambda: preset("huge"), "preset"),
    # YAML's true is no number, and NaN or infinity no value (issue #16)
    (lambda: preset("tiny", alpha=True), "alpha"),
    (lambda: preset("tiny", momentum=float("nan")), "momentum"),
    (lambda: preset("tiny", embed_dim=True), "embed_dim"),
    (lambda: preset("tiny", mlm_probability=float("nan")), "mlm_probability"),
    (lambda: ModelConfig.from_dict({"loss_weights": {"code": float("inf")}}), "loss_weights.code"),
    (lambda: ModelConfig.from_dict({"loss_weights": {"itm": True}}), "loss_weights.itm"),
    (lambda: ModelConfig.from_dict({"codebook": {"size": True}}), "codebook.size"),
    (lambda: ModelConfig.from_dict({"text": {"dropout": False}}), "text.dropout"),
    (lambda: ModelConfig.from_dict({"text": {"append_sep": "no"}}), "text.append_sep"),
    (lambda: preset("tiny", queue_init="zeros"), "queue_init"),
    (lambda: preset("tiny", negatives="all"), "negatives"),
    (lambda: preset("tiny", temperature_parameter="exp"), "temperature_parameter"),
    (lambda: preset("tiny", ica_terms="sum"), "ica_terms"),
])
def test_bad_configs_fail_at_construction_naming_the_field(build, field):
    with pytest.raises(ConfigError) as error:
        build()
    assert str(error.value).startswith(field)


def test_check_finite_names_the_nested_field():
    from codis.config import check_finite

    check_finite({"train": {"steps": 3, "lr": 1e-4}, "shards": ["a", 1.5]})
    with pytest.raises(ConfigError, match=r"^optim\.lr: must be a finite number, got nan"):
        check_finite({"train": {"steps": 3}, "optim": {"lr": float("nan")}})
    with pytest.raises(ConfigError, match=r"^data\.1: must be a finite number, got inf"):
        check_finite({"data": [1.0, float("inf")]})
