"""`codis convert-albef` on state dicts laid out as ALBEF's model classes lay theirs out.

The fixtures write ALBEF's key names and shapes from its code (models/vit.py, models/xbert.py and
the model_*.py files of salesforce/ALBEF), at a tiny size, each tensor random and distinct (so that a
student swapped with its teacher, or one layer with another, cannot pass), saved as ALBEF's scripts
save them: ``{"model": state, "optimizer": ..., "config": ..., "epoch": ...}``. Beside each ALBEF key
they note the key of ours it must land in, so the checks compare tensors exactly."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from codis.albef import (ConversionError, convert_albef_checkpoint, detect_kind, read_albef_state,
                         resample_pos_embed)
from codis.checkpoint import read_checkpoint
from codis.cli import main
from codis.config import ConfigError, preset
from codis.model import load_model
from codis.tasks import nlvr, retrieval, ve, vqa
from codis.tasks.albef import convert_albef
from codis.text import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Sizes:
    """A tiny ALBEF: the tiny preset's widths (its 2 heads), 1 text + 2 fusion layers."""

    image: int = 64
    patch: int = 8
    width: int = 64
    depth: int = 2
    mlp: int = 128
    vocab: int = len(load_tokenizer("builtin"))
    positions: int = 64
    text_layers: int = 1
    fusion_layers: int = 2
    intermediate: int = 128
    embed: int = 32
    queue: int = 16


S = Sizes()
Entry = tuple[str, tuple[int, ...], "str | None"]  # ALBEF key, shape, our key (None: unplaced)


def vit(albef: str, ours: str | None) -> list[Entry]:
    """models/vit.py's VisionTransformer (timm's names)."""
    w, grid = S.width, S.image // S.patch
    shapes = {"cls_token": (1, 1, w), "pos_embed": (1, 1 + grid * grid, w),
              "patch_embed.proj.weight": (w, 3, S.patch, S.patch), "patch_embed.proj.bias": (w,),
              "norm.weight": (w,), "norm.bias": (w,)}
    for i in range(S.depth):
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in {
            "norm1.weight": (w,), "norm1.bias": (w,), "attn.qkv.weight": (3 * w, w),
            "attn.qkv.bias": (3 * w,), "attn.proj.weight": (w, w), "attn.proj.bias": (w,),
            "norm2.weight": (w,), "norm2.bias": (w,), "mlp.fc1.weight": (S.mlp, w),
            "mlp.fc1.bias": (S.mlp,), "mlp.fc2.weight": (w, S.mlp), "mlp.fc2.bias": (w,)}.items()})
    return [(f"{albef}.{k}", shape, ours and f"{ours}.{k}") for k, shape in shapes.items()]


def bert_layer(albef: str, ours: str | None, cross: bool) -> list[Entry]:
    """xbert's BertLayer: crossattention (to the image, encoder_width = width) from fusion_layer on."""
    d, i = S.width, S.intermediate
    parts = ["attention"] + (["crossattention"] if cross else [])
    shapes = {}
    for part in parts:
        for name in ("query", "key", "value"):
            shapes.update({f"{part}.self.{name}.weight": (d, d), f"{part}.self.{name}.bias": (d,)})
        shapes.update({f"{part}.output.dense.weight": (d, d), f"{part}.output.dense.bias": (d,),
                       f"{part}.output.LayerNorm.weight": (d,), f"{part}.output.LayerNorm.bias": (d,)})
    shapes.update({"intermediate.dense.weight": (i, d), "intermediate.dense.bias": (i,),
                   "output.dense.weight": (d, i), "output.dense.bias": (d,),
                   "output.LayerNorm.weight": (d,), "output.LayerNorm.bias": (d,)})
    return [(f"{albef}.{k}", shape, ours and f"{ours}.{k}") for k, shape in shapes.items()]


def bert(albef: str, layers: list[tuple[str | None, bool]], embeddings: str | None) -> list[Entry]:
    """xbert's BertModel without pooler: embeddings (with the position_ids buffer that
    transformers 4 saved) and ``layers`` (our key prefix of layer N, whether it cross-attends)."""
    d = S.width
    entries = [(f"{albef}.embeddings.{k}", shape, embeddings and f"{embeddings}.{k}")
               for k, shape in {"word_embeddings.weight": (S.vocab, d),
                                "position_embeddings.weight": (S.positions, d),
                                "token_type_embeddings.weight": (2, d),
                                "LayerNorm.weight": (d,), "LayerNorm.bias": (d,)}.items()]
    entries.append((f"{albef}.embeddings.position_ids", (1, S.positions), None))
    for n, (ours, cross) in enumerate(layers):
        entries += bert_layer(f"{albef}.encoder.layer.{n}", ours, cross)
    return entries


def mlm_head(albef: str, ours: str | None) -> list[Entry]:
    """xbert's BertOnlyMLMHead (decoder tied to the word embeddings, its bias to ``bias``)."""
    d = S.width
    return [(f"{albef}.predictions.{k}", shape, ours and f"{ours}.predictions.{k}")
            for k, shape in {"bias": (S.vocab,), "transform.dense.weight": (d, d),
                             "transform.dense.bias": (d,), "transform.LayerNorm.weight": (d,),
                             "transform.LayerNorm.bias": (d,), "decoder.weight": (S.vocab, d),
                             "decoder.bias": (S.vocab,)}.items()]


def linear(albef: str, ours: str | None, out: int, inp: int) -> list[Entry]:
    return [(f"{albef}.weight", (out, inp), ours and f"{ours}.weight"),
            (f"{albef}.bias", (out,), ours and f"{ours}.bias")]


def text_layers(ours: str, fusion: str, pairs: bool = False) -> list[tuple[str, bool]]:
    """ALBEF's layers 0..F-1 -> ``ours``.N, then the fusion layers -> ``fusion``.(N - F)."""
    count = S.fusion_layers * (2 if pairs else 1)
    return ([(f"{ours}.encoder.layer.{n}", False) for n in range(S.text_layers)]
            + [(f"{fusion}.{j}", True) for j in range(count)])


def kept(keep: bool, ours: str) -> str | None:
    """``ours``, or None for a momentum copy that our task checkpoints do not hold."""
    return ours if keep else None


def layout(kind: str) -> list[Entry]:
    """The keys of ALBEF's model of ``kind`` and the keys of ours they belong in."""
    w, e = S.width, S.embed
    entries: list[Entry] = []
    if kind in ("pretrain", "retrieval"):
        for m in ("", "_m"):
            bert_prefix = f"text_encoder{m}.bert" if kind == "pretrain" else f"text_encoder{m}"
            entries += vit(f"visual_encoder{m}", f"visual_encoder{m}")
            entries += bert(bert_prefix, text_layers(f"text_encoder{m}.bert", f"text_encoder{m}.fusion"),
                            f"text_encoder{m}.bert.embeddings")
            if kind == "pretrain":
                entries += mlm_head(f"text_encoder{m}.cls", f"text_encoder{m}.mlm_head")
            entries += linear(f"vision_proj{m}", f"vision_proj{m}", e, w)
            entries += linear(f"text_proj{m}", f"text_proj{m}", e, w)
        entries += linear("itm_head", "itm_head", 2, w)
        entries += [("temp", (), "temp"), ("image_queue", (e, S.queue), "queue.image"),
                    ("text_queue", (e, S.queue), "queue.text"), ("queue_ptr", (1,), "queue.pointer")]
        if kind == "retrieval":
            entries.append(("idx_queue", (1, S.queue), None))
    elif kind == "vqa":
        for m, keep in (("", True), ("_m", False)):
            entries += vit(f"visual_encoder{m}", kept(keep, "visual_encoder"))
            layers = text_layers("text_encoder.bert", "text_encoder.fusion")
            entries += bert(f"text_encoder{m}", [(kept(keep, o), c) for o, c in layers],
                            kept(keep, "text_encoder.bert.embeddings"))
            decoder = [(kept(keep, f"decoder.layers.{n}"), True) for n in range(S.fusion_layers)]
            entries += bert(f"text_decoder{m}.bert", decoder, kept(keep, "decoder.embeddings"))
            entries += mlm_head(f"text_decoder{m}.cls", kept(keep, "decoder.lm_head"))
    else:
        net = "network." if kind == "nlvr_ta" else ""
        for m, keep in (("",  True), ("_m", False)):
            if m and kind == "nlvr_ta":
                break  # ALBEF's TA model has no momentum copies
            entries += vit(f"visual_encoder{m}", kept(keep, f"{net}visual_encoder"))
            layers = text_layers(f"{net}text", f"{net}fusion", pairs=kind != "ve")
            entries += bert(f"text_encoder{m}", [(kept(keep, o), c) for o, c in layers],
                            kept(keep, f"{net}text.embeddings"))
            if kind == "nlvr_ta":
                entries += linear("ta_head", "network.head", 3, w)
            else:
                entries += linear(f"cls_head{m}.0", kept(keep, "head.0"), w, w)
                entries += linear(f"cls_head{m}.2", kept(keep, "head.2"), 3 if kind == "ve" else 2, w)
        if kind == "nlvr_ta":
            entries += linear("vision_proj", "vision_proj", e, w)
            entries += linear("text_proj", None, e, w) + [("temp", (), None)]
    return entries


def albef_state(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random distinct tensors under ALBEF's keys, tied where ALBEF ties them."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape, _ in layout(kind):
        if key.endswith("position_ids"):
            state[key] = torch.arange(shape[1]).expand(1, -1)
        elif key == "queue_ptr":
            state[key] = torch.tensor([4])
        elif key == "idx_queue":
            state[key] = torch.randint(0, 100, shape, generator=generator)
        elif key == "temp":
            state[key] = torch.tensor(0.05)
        elif key.endswith("_queue"):
            state[key] = F.normalize(torch.randn(shape, generator=generator), dim=0)
        else:
            state[key] = torch.randn(shape, generator=generator)
    for key in list(state):
        if key.endswith("predictions.decoder.weight"):  # tied to the word embeddings
            state[key] = state[key.split(".cls.")[0] + ".bert.embeddings.word_embeddings.weight"]
        elif key.endswith("predictions.decoder.bias"):
            state[key] = state[key.replace("decoder.bias", "bias")]
    if kind in ("nlvr", "nlvr_ta"):  # share_cross_attention: layer F+2i uses layer F+2i+1's key/value
        for key in list(state):
            parts = key.split(".")
            if ".crossattention.self.key." in key or ".crossattention.self.value." in key:
                index = int(parts[3])
                if (index - S.text_layers) % 2 == 0:
                    parts[3] = str(index + 1)
                    state[key] = state[".".join(parts)]
    return state


def save_albef(path, state):
    """As ALBEF's scripts save: the model beside optimiser, scheduler, config and epoch."""
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []},
                "lr_scheduler": {"t_initial": 30}, "config": {"image_res": S.image, "temp": 0.07},
                "epoch": 29}, path)
    return path


def expected(kind: str) -> dict[str, str]:
    return {ours: albef for albef, _, ours in layout(kind) if ours is not None}


def convert(tmp_path, layout_kind, state=None, **options):
    """Save ALBEF's ``layout_kind`` model (or ``state``) and convert it at the tiny preset."""
    source = save_albef(tmp_path / f"{layout_kind}.pth",
                        albef_state(layout_kind) if state is None else state)
    output = tmp_path / f"{layout_kind}.pt"
    return convert_albef(source, output, base=preset("tiny"), **options), output


def same(ours: torch.Tensor, albef: torch.Tensor, key: str) -> torch.Tensor:
    """ALBEF's tensor as ours must hold it: queues transposed, the pointer a scalar."""
    if key in ("queue.image", "queue.text"):
        return albef.T
    return albef.reshape(()) if key == "queue.pointer" else albef


LOADERS = {"pretrain": load_model, "retrieval": retrieval.load_retrieval_model,
           "vqa": vqa.load_vqa_model, "ve": ve.load_ve_model, "nlvr": nlvr.load_nlvr_model}


# ---- every layout --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["pretrain", "retrieval", "vqa", "nlvr_ta", "nlvr", "ve"])
def test_every_tensor_lands_exactly_where_albef_keeps_it(tmp_path, kind):
    state = albef_state(kind)
    assert detect_kind(state) == kind
    conversion, output = convert(tmp_path, kind, state)
    saved = read_checkpoint(output, (kind,)).state_dict
    wanted = expected(kind)
    for ours, albef in wanted.items():
        assert torch.equal(saved[ours], same(saved[ours], state[albef], ours)), (ours, albef)
        assert conversion.placed[ours] == albef
    # what is not placed from ALBEF is derived, and each derived tensor is accounted for
    assert set(saved) == set(wanted) | set(conversion.derived)
    assert set(wanted).isdisjoint(conversion.derived)
    unplaced = {albef for albef, _, ours in layout(kind) if ours is None}
    assert set(conversion.unplaced) == unplaced
    assert set(conversion.placed.values()) | unplaced == set(state)
    if kind in LOADERS:
        LOADERS[kind](output)  # loads as any checkpoint of its kind (strict)
    else:
        # NLVR² finetuning starts from the text-assignment checkpoint
        model, _ = nlvr.initial_nlvr_model(output, nlvr.config("nlvr", image_size=S.image))
        assert torch.equal(model.fusion[0].output.dense.weight,
                           state[f"text_encoder.encoder.layer.{S.text_layers}.output.dense.weight"])


def test_a_pretrained_checkpoint_becomes_an_albef_model_of_its_sizes(tmp_path):
    conversion, output = convert(tmp_path, "pretrain")
    model = load_model(output)
    config = model.config
    assert (config.mode, config.temperature_parameter, config.queue_init, config.negatives) == (
        "albef", "raw", "random", "per_rank")
    assert config.text.append_sep is False and model.tokenizer("a")["input_ids"][-1] != \
        model.tokenizer.sep_token_id
    assert (config.vision.image_size, config.vision.patch_size, config.vision.depth) == (64, 8, 2)
    assert (config.text.text_layers, config.text.fusion_layers) == (1, 2)
    assert (config.embed_dim, config.queue_size) == (S.embed, S.queue)
    assert float(model.temperature.detach()) == pytest.approx(0.05)
    assert int(model.queue.filled) == S.queue and bool((model.queue.ids == -1).all())
    image, text, _ = model.queue.contents()
    assert image.shape == (S.queue, S.embed)  # the whole ALBEF queue is in use
    # the MLM decoder stays tied to the word embeddings
    head = model.text_encoder.mlm_head.predictions
    assert head.decoder.weight is model.text_encoder.bert.embeddings.word_embeddings.weight
    assert set(conversion.derived) == {"queue.ids", "queue.filled"}


def test_the_log_temperature_target_holds_log_tau(tmp_path):
    from codis.albef import albef_model_config, albef_shape, convert_state
    from codis.model import CodisModel

    state = albef_state("pretrain")
    shape = albef_shape(state, "pretrain")
    config = albef_model_config(shape, preset("tiny")).replace(temperature_parameter="log")
    from codis.albef import albef_text_architecture

    model = CodisModel(config, albef_text_architecture(shape, config))
    conversion = convert_state(state, "pretrain", model.state_dict(), shape.text_layers)
    assert float(conversion.state_dict["log_temp"]) == pytest.approx(math.log(0.05))
    assert conversion.transformed["log_temp"] == "log"


def tiny_albef_config(**changes):
    """The tiny preset at the fixtures' sizes with ALBEF's semantics: what a recipe would name."""
    config = preset("tiny")
    return config.replace(mode="albef", embed_dim=S.embed, queue_size=S.queue,
                          temperature_parameter="raw", queue_init="random", negatives="per_rank",
                          text=dataclasses.replace(config.text, append_sep=False), **changes)


def test_a_recipe_gets_the_pretrained_checkpoint_at_exactly_its_config(tmp_path):
    state = albef_state("pretrain")
    source = save_albef(tmp_path / "ALBEF_4M.pth", state)
    config = tiny_albef_config()
    conversion = convert_albef_checkpoint(source, tmp_path / "model.pt", config)
    model = load_model(tmp_path / "model.pt", config)  # saved with exactly this config
    assert torch.equal(model.text_encoder_m.fusion[1].crossattention.self.value.weight,
                       state["text_encoder_m.bert.encoder.layer.2.crossattention.self.value.weight"])
    assert set(conversion.to_dict()) == {"kind", "placed", "transformed", "derived", "unplaced"}
    # another image size is resampled; other sizes must be the file's
    bigger = config.replace(vision=dataclasses.replace(config.vision, image_size=96))
    convert_albef_checkpoint(source, tmp_path / "model96.pt", bigger)
    assert load_model(tmp_path / "model96.pt").visual_encoder.pos_embed.shape[1] == 1 + 12 * 12
    with pytest.raises(ConfigError, match=r"text.fusion_layers: checkpoint 2, config 3; "
                                          r"embed_dim: checkpoint 32, config 64"):
        convert_albef_checkpoint(source, tmp_path / "x.pt", config.replace(
            embed_dim=64, text=dataclasses.replace(config.text, fusion_layers=3)))
    with pytest.raises(ConfigError, match="mode: ALBEF's checkpoints have no codebook"):
        convert_albef_checkpoint(source, tmp_path / "x.pt", config.replace(mode="codis"))
    with pytest.raises(ConversionError, match="holds an ALBEF retrieval model, not a pretrained"):
        convert_albef_checkpoint(save_albef(tmp_path / "coco.pth", albef_state("retrieval")),
                                 tmp_path / "x.pt", config)
    assert not (tmp_path / "x.pt").exists()


# ---- what cannot be placed, and what is missing ---------------------------------------------------
def test_a_missing_tensor_is_named(tmp_path):
    state = albef_state("pretrain")
    del state["text_encoder_m.bert.encoder.layer.2.crossattention.self.key.bias"]
    with pytest.raises(ConversionError, match=r"text_encoder_m\.fusion\.1\.crossattention\.self\.key\.bias"):
        convert(tmp_path, "pretrain", state)
    assert not (tmp_path / "pretrain.pt").exists()


def test_an_unknown_tensor_is_listed_not_dropped_silently(tmp_path):
    state = albef_state("pretrain")
    state["text_encoder.bert.pooler.dense.weight"] = torch.zeros(S.width, S.width)
    conversion, _ = convert(tmp_path, "pretrain", state)
    assert "no counterpart" in conversion.unplaced["text_encoder.bert.pooler.dense.weight"]
    assert "constant buffer" in conversion.unplaced["text_encoder.bert.embeddings.position_ids"]


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path):
    state = albef_state("pretrain")
    state["itm_head.weight"] = torch.zeros(3, S.width)
    with pytest.raises(ConversionError, match=r"itm_head\.weight \(3, 64\) -> itm_head\.weight \(2, 64\)"):
        convert(tmp_path, "pretrain", state)


def test_tied_tensors_that_differ_are_refused(tmp_path):
    state = albef_state("nlvr")
    key = f"text_encoder.encoder.layer.{S.text_layers}.crossattention.self.key.weight"
    state[key] = state[key] + 1  # no longer shared with the next layer's, as ALBEF shares them
    with pytest.raises(ConversionError, match="are one tensor in our model but differ"):
        convert(tmp_path, "nlvr", state)


def test_a_given_kind_must_match_the_file(tmp_path):
    with pytest.raises(ConversionError, match="holds an ALBEF retrieval model, not pretrain"):
        convert(tmp_path, "retrieval", kind="pretrain")


def test_retrieval_keeps_the_queue_but_not_albefs_dataset_indices(tmp_path):
    conversion, output = convert(tmp_path, "retrieval")
    model = retrieval.load_retrieval_model(output)
    assert bool((model.queue.ids == -1).all()) and int(model.queue.pointer) == 4
    assert "image keys" in conversion.unplaced["idx_queue"]
    derived = [k for k in conversion.derived if "mlm_head.predictions.transform" in k]
    assert len(derived) == 8  # dense and LayerNorm, weight and bias, student and teacher
    assert read_checkpoint(output).task_config["image_size"] == S.image


# ---- position embeddings --------------------------------------------------------------------------
def test_position_embeddings_are_resampled_as_albef_does(tmp_path):
    state = albef_state("pretrain")
    conversion, output = convert(tmp_path, "pretrain", state, image_size=96)
    model = load_model(output)
    assert model.config.vision.image_size == 96
    grid, old = 96 // S.patch, S.image // S.patch
    source = state["visual_encoder.pos_embed"]
    # ALBEF's interpolate_pos_embed: [CLS] kept, the grid resized bicubically (align_corners False)
    patches = source[:, 1:].reshape(1, old, old, S.width).permute(0, 3, 1, 2)
    resized = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    want = torch.cat([source[:, :1], resized.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
    torch.testing.assert_close(model.visual_encoder.pos_embed.detach(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.visual_encoder_m.pos_embed.detach(),
                               resample_pos_embed(state["visual_encoder_m.pos_embed"], grid))
    assert "from 8x8 to 12x12" in conversion.transformed["visual_encoder.pos_embed"]
    with torch.no_grad():  # the model runs at its new size
        assert model.encode_image(torch.zeros(1, 3, 96, 96))[1].shape == (1, 1 + grid * grid, S.width)


# ---- files and the command line --------------------------------------------------------------------
def test_reading_files(tmp_path):
    path = tmp_path / "bare.pth"
    torch.save(albef_state("ve"), path)  # a bare state dict reads too
    assert detect_kind(read_albef_state(path)) == "ve"
    with pytest.raises(FileNotFoundError, match="no ALBEF checkpoint at"):
        read_albef_state(tmp_path / "missing.pth")
    (tmp_path / "text.pth").write_text("not torch")
    with pytest.raises(ConversionError, match="not a torch checkpoint file"):
        read_albef_state(tmp_path / "text.pth")
    with pytest.raises(ConversionError, match="cannot tell which ALBEF model wrote"):
        detect_kind({"temp": torch.tensor(0.07), "cls_head.2.weight": torch.zeros(5, 4)})
    torch.save({"model": {"a": 1}}, tmp_path / "odd.pth")
    with pytest.raises(ConversionError, match="no ALBEF model state dict"):
        read_albef_state(tmp_path / "odd.pth")


def test_the_command_converts_and_lists_what_it_did_not_place(tmp_path, capsys):
    source = save_albef(tmp_path / "ALBEF_4M.pth", albef_state("pretrain"))
    output = tmp_path / "converted.pt"
    assert main(["convert-albef", str(source), str(output), "--preset", "tiny", "--report"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == str(output)
    assert out[0].startswith("ALBEF pretrain model: ") and "2 ALBEF keys unplaced" in out[0]
    assert any(line.startswith("unplaced text_encoder_m.bert.embeddings.position_ids: ")
               for line in out)
    assert load_model(output).config.text.fusion_layers == 2
    report = {line.split(":")[0] for line in out if line.startswith(("unplaced ", "derived "))}
    assert report == {"unplaced text_encoder.bert.embeddings.position_ids",
                      "unplaced text_encoder_m.bert.embeddings.position_ids",
                      "derived queue.ids", "derived queue.filled"}


@pytest.mark.parametrize("args, message", [
    (["missing.pth", "out.pt"], "error: no ALBEF checkpoint at missing.pth"),
    (["notes.txt", "out.pt"], "error: notes.txt: not a torch checkpoint file"),
    (["model.pt", "out.pt"], "error: model.pt: a codis checkpoint (kind 'pretrain') already"),
    (["notes.txt", "out.pt", "--set", '{"txet": {}}'], "error: txet: unknown field"),
    (["ALBEF.pth", "ALBEF.pth"], "error: ALBEF.pth: the output would overwrite"),
])
def test_bad_input_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, tiny_checkpoint,
                                              args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "model.pt").symlink_to(tiny_checkpoint)
    save_albef(tmp_path / "ALBEF.pth", {"temp": torch.tensor(0.07)})
    assert main(["convert-albef", *args, "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err
    assert not (tmp_path / "out.pt").exists()


def test_a_tokenizer_of_another_vocabulary_is_refused_before_building(tmp_path):
    state = albef_state("ve")
    for key in ("text_encoder.embeddings.word_embeddings.weight",
                "text_encoder_m.embeddings.word_embeddings.weight"):
        state[key] = torch.zeros(S.vocab + 1, S.width)
    with pytest.raises(ConfigError, match=rf"text.tokenizer: 'builtin' has {S.vocab} entries but "
                                          rf"the ALBEF checkpoint's word embeddings have {S.vocab + 1}"):
        convert(tmp_path, "ve", state)


@pytest.mark.parametrize("command", [["convert-albef"], []], ids=["convert-albef", "codis"])
def test_the_help_shows_the_example_in_plain_text(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = capsys.readouterr().out
    assert "codis convert-albef ALBEF_4M.pth albef_4m.pt" in text
    assert not any(markup in text for markup in (":func:", ":mod:", ":class:", "``"))


def test_report_dict_is_json(tmp_path):
    conversion, _ = convert(tmp_path, "vqa")
    record = json.loads(json.dumps(conversion.to_dict()))
    assert record["kind"] == "vqa" and "visual_encoder_m.pos_embed" in record["unplaced"]
    assert "momentum" in record["unplaced"]["text_decoder_m.cls.predictions.bias"]
