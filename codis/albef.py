"""ALBEF's released checkpoints (salesforce/ALBEF) as state dicts of this package's models.

ALBEF's scripts save ``{"model": state_dict, "optimizer": ..., "lr_scheduler": ..., "config": ...,
"epoch": ...}``; :func:`read_albef_state` takes the model's state dict out of such a file. Each of
ALBEF's model classes lays its tensors out in its own way; :func:`detect_kind` tells them apart and
:func:`convert_state` maps one onto the state dict of the model of ours that holds the same network:

============  ==========================================  ========================================
kind          ALBEF files (model class)                   ours (checkpoint kind)
============  ==========================================  ========================================
pretrain      ALBEF.pth (14M), ALBEF_4M.pth               CodisModel in mode "albef" ("pretrain")
              (models/model_pretrain.py)
retrieval     mscoco.pth, flickr30k.pth; refcoco.pth,     CodisModel ("retrieval")
              the grounding model, has the same layout
              (models/model_retrieval.py)
vqa           vqa.pth (models/model_vqa.py)               codis.tasks.vqa.VQAModel ("vqa")
nlvr_ta       pretrain_model_nlvr.pth, after the          NLVR²'s TextAssignmentModel ("nlvr_ta")
              text-assignment step (model_pretrain_nlvr)
nlvr          none released (models/model_nlvr.py)        FusionClassifier, paired layers ("nlvr")
ve            none released (models/model_ve.py)          FusionClassifier ("ve")
============  ==========================================  ========================================

The rules, for the students and the momentum copies (``*_m``) alike:

- ViT: ALBEF's own VisionTransformer names its tensors as timm's does (``patch_embed.proj``,
  ``cls_token``, ``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
  ``norm``); ``pos_embed`` is resampled (bicubic, as ALBEF's ``interpolate_pos_embed``) when the
  target image size differs.
- BERT: ALBEF runs one BERT whose layers from ``fusion_layer`` on also cross-attend to the image;
  ours holds the layers below it in ``bert.encoder.layer.N`` and the rest in ``fusion.(N - F)``.
  ``embeddings`` stay; ``cls.predictions`` (the MLM head, and VQA's answer decoder's LM head) go to
  ``mlm_head.predictions`` / ``lm_head.predictions``. Finetuned ALBEF models drop the ``bert.``
  prefix of the pretrained one; both are read.
- ``temp`` goes to ``temp`` (a raw temperature) or, as log(temp), to ``log_temp``.
- The queues ``image_queue`` / ``text_queue`` (embed_dim x size) are transposed into ours (size x
  embed_dim), ``queue_ptr`` is our pointer, and our queue counts itself full: ALBEF's always is
  (random features at first, then teacher features).

What our model has and the ALBEF file does not is filled in three ways, each listed in the
:class:`Conversion`: a tensor tied to a placed one (BERT's MLM decoder is the word embedding) is
that tensor; our queue's sample ids are -1 ("no sample": ALBEF's pretraining queue has none, and its
retrieval ``idx_queue`` holds indices into ALBEF's annotation files, which never equal our image
keys); and the MLM head of the question / text encoder of the retrieval and VQA models, which
ALBEF's finetuned models do not have and those tasks never read, keeps the target model's initial
values. Anything else missing is an error that names the keys.

What the ALBEF file has and our model does not is listed with the reason (:attr:`Conversion.unplaced`):
BERT's constant ``position_ids`` buffer; the momentum copies in VQA, NLVR² and SNLI-VE files (our
task checkpoints hold the students; finetuning from one starts its teacher as a copy of the student,
as ALBEF's ``copy_params`` does); the retrieval ``idx_queue``; the text projection and temperature
that ALBEF's text-assignment model carries but never uses.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from codis.config import ConfigError, ModelConfig

ALBEF_KINDS = ("pretrain", "retrieval", "vqa", "nlvr_ta", "nlvr", "ve")
"""The ALBEF model layouts :func:`convert_state` reads, named by the checkpoint kind they become."""
ALBEF_LAYER_NORM_EPS = 1e-12
"""ALBEF's configs/config_bert.json (BERT's)."""


class ConversionError(ValueError):
    """An ALBEF checkpoint cannot be converted; the message names the file or the keys."""


# ---- reading --------------------------------------------------------------------------------------
def read_albef_state(path: str | Path, allow_pickle: bool = False) -> dict[str, Tensor]:
    """The model state dict of an ALBEF checkpoint file (its ``model`` entry, or the file itself when
    it is a bare state dict; a ``module.`` prefix of a DDP-wrapped model is dropped).

    The file is read with ``weights_only=True`` (no code runs) and memory-mapped, so the optimiser
    state beside the weights costs no memory. ``allow_pickle`` reads a file whose objects need code
    to load: only for a file from a trusted source."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ALBEF checkpoint at {path}")
    if not zipfile.is_zipfile(path):
        raise ConversionError(f"{path}: not a torch checkpoint file (torch.save writes a zip archive)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        raise ConversionError(
            f"{path}: a torch file whose objects need code to load"
            + (f" (it holds a {found.group(1)})" if found else "")
            + "; if it comes from a source you trust, pass --allow-pickle") from None
    except Exception as error:  # a damaged archive
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConversionError(f"{path}: an unreadable torch file ({type(error).__name__}: {first})") from None
    if isinstance(payload, dict) and "format" in payload and "kind" in payload:
        raise ConversionError(f"{path}: a codis checkpoint (kind {payload['kind']!r}) already, not "
                              "one of ALBEF's")
    state = payload.get("model", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        keys = ", ".join(sorted(map(str, payload))[:8]) if isinstance(payload, dict) else ""
        raise ConversionError(f"{path}: no ALBEF model state dict in it (expected a 'model' entry of "
                              f"tensors{'; keys: ' + keys if keys else ''})")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def detect_kind(state: Mapping[str, Tensor]) -> str:
    """Which ALBEF model class wrote ``state`` (one of :data:`ALBEF_KINDS`), from its keys."""
    if any(k.startswith("text_decoder.") for k in state):
        return "vqa"
    if "ta_head.weight" in state:
        return "nlvr_ta"
    classes = state["cls_head.2.weight"].shape[0] if "cls_head.2.weight" in state else None
    if classes in (2, 3):  # NLVR²'s true / false, SNLI-VE's three labels
        return "nlvr" if classes == 2 else "ve"
    if "itm_head.weight" in state and "image_queue" in state:
        if any(k.startswith("text_encoder.cls.") for k in state):
            return "pretrain"
        if "idx_queue" in state:
            return "retrieval"
    raise ConversionError(
        "cannot tell which ALBEF model wrote this state dict (keys: "
        + ", ".join(sorted(state)[:6]) + ", ...); known layouts: " + ", ".join(ALBEF_KINDS))


# ---- the shape of the source ---------------------------------------------------------------------
@dataclass(frozen=True)
class AlbefShape:
    """The sizes of an ALBEF model, read from its tensors' shapes (heads are not in them)."""

    image_size: int
    patch_size: int
    vision_width: int
    vision_depth: int
    mlp_ratio: float
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    text_layers: int  # ALBEF's fusion_layer: the layers below it read text only
    fusion_layers: int  # our fusion layers (NLVR²'s pairs count once)
    embed_dim: int | None  # None: no projections (VQA, NLVR², SNLI-VE)
    queue_size: int | None


def _text_prefix(state: Mapping[str, Tensor]) -> str:
    for prefix in ("text_encoder.bert.", "text_encoder."):
        if f"{prefix}embeddings.word_embeddings.weight" in state:
            return prefix
    raise ConversionError("no text encoder (text_encoder.[bert.]embeddings.word_embeddings.weight)")


def _need(state: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in state:
        raise ConversionError(f"{key}: missing from the ALBEF state dict")
    return state[key]


def albef_shape(state: Mapping[str, Tensor], kind: str) -> AlbefShape:
    """The sizes of the model that wrote ``state`` (an ALBEF model of ``kind``)."""
    pos_embed = _need(state, "visual_encoder.pos_embed")
    patch = _need(state, "visual_encoder.patch_embed.proj.weight")
    width, patch_size = pos_embed.shape[-1], patch.shape[-1]
    grid = math.isqrt(pos_embed.shape[1] - 1)
    if grid * grid != pos_embed.shape[1] - 1:
        raise ConversionError(f"visual_encoder.pos_embed: {pos_embed.shape[1] - 1} patch positions "
                              "are no square grid")
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"visual_encoder\.blocks\.(\d+)\.", k))}
    text = _text_prefix(state)
    layers: dict[int, bool] = {}  # layer index -> has cross-attention
    for key in state:
        if m := re.match(re.escape(text) + r"encoder\.layer\.(\d+)\.", key):
            index = int(m.group(1))
            layers[index] = layers.get(index, False) or ".crossattention." in key
    if not layers or sorted(layers) != list(range(len(layers))):
        raise ConversionError(f"{text}encoder.layer.*: expected layers 0..N-1, found "
                              f"{sorted(layers)}")
    fused = [index for index, cross in layers.items() if cross]
    if not fused or fused != list(range(min(fused), len(layers))):
        raise ConversionError(f"{text}encoder.layer.*: expected cross-attention in the last layers "
                              f"only, found it in layers {fused}")
    start = min(fused)
    fusion = len(layers) - start
    if kind in ("nlvr", "nlvr_ta"):  # each fusion layer became two, one per image
        if fusion % 2:
            raise ConversionError(f"{text}encoder.layer.*: NLVR² pairs its fusion layers, but there "
                                  f"are {fusion}")
        fusion //= 2
    words = state[f"{text}embeddings.word_embeddings.weight"]
    proj = state.get("vision_proj.weight")
    queue = state.get("image_queue")
    return AlbefShape(
        image_size=grid * patch_size, patch_size=patch_size, vision_width=width,
        vision_depth=len(blocks),
        mlp_ratio=_need(state, "visual_encoder.blocks.0.mlp.fc1.weight").shape[0] / width,
        vocab_size=words.shape[0], hidden_size=words.shape[1],
        intermediate_size=_need(state, f"{text}encoder.layer.0.intermediate.dense.weight").shape[0],
        max_position_embeddings=_need(state, f"{text}embeddings.position_embeddings.weight").shape[0],
        type_vocab_size=_need(state, f"{text}embeddings.token_type_embeddings.weight").shape[0],
        text_layers=start, fusion_layers=fusion,
        embed_dim=None if proj is None else proj.shape[0],
        queue_size=None if queue is None else queue.shape[1])


def albef_model_config(shape: AlbefShape, base: ModelConfig, image_size: int | None = None,
                       ) -> ModelConfig:
    """``base`` with the sizes of ``shape`` (the image size ``image_size`` when given, else the
    checkpoint's) and ALBEF's semantics: mode ``albef``, a raw temperature, a queue that starts full,
    per-rank negatives and text without a final [SEP]. The numbers of attention heads, which the
    tensors do not tell, are ``base``'s."""
    vision = dataclasses.replace(
        base.vision, pretrained=None, stem="patch", image_size=image_size or shape.image_size,
        patch_size=shape.patch_size, width=shape.vision_width, depth=shape.vision_depth,
        mlp_ratio=shape.mlp_ratio)
    text = dataclasses.replace(
        base.text, hidden_size=shape.hidden_size, text_layers=shape.text_layers,
        fusion_layers=shape.fusion_layers, intermediate_size=shape.intermediate_size,
        append_sep=False)
    return base.replace(
        vision=vision, text=text, mode="albef", temperature_parameter="raw", queue_init="random",
        negatives="per_rank", embed_dim=shape.embed_dim or base.embed_dim,
        queue_size=shape.queue_size or base.queue_size)


def albef_text_architecture(shape: AlbefShape, config: ModelConfig) -> dict[str, Any]:
    """The BERT config (as checkpoints store it) of the text and fusion layers of ``shape``:
    ALBEF's config_bert.json with the checkpoint's sizes and ``config``'s heads and dropout."""
    from transformers import BertConfig  # on use: the CLI imports this module at start-up

    return BertConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
        num_hidden_layers=config.text.text_layers + config.text.fusion_layers,
        num_attention_heads=config.text.heads, intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.max_position_embeddings,
        type_vocab_size=shape.type_vocab_size, layer_norm_eps=ALBEF_LAYER_NORM_EPS,
        hidden_dropout_prob=config.text.dropout, attention_probs_dropout_prob=config.text.dropout,
        initializer_range=config.text.init_std, pad_token_id=0).to_dict()


# ---- key mapping ----------------------------------------------------------------------------------
def _bert_key(rest: str, fusion_start: int, text: str, fusion: str, head: str | None) -> str | None:
    """Our key for ``rest``, a key of ALBEF's BERT below its module (``bert.`` removed): embeddings
    under ``text``, layer N below ``fusion_start`` as ``text`` encoder.layer.N, the others as
    ``fusion`` (N - fusion_start), the MLM / LM head under ``head``."""
    if rest.startswith("embeddings."):
        return text + rest
    if m := re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", rest):
        index = int(m.group(1))
        if index < fusion_start:
            return f"{text}encoder.layer.{index}.{m.group(2)}"
        return f"{fusion}{index - fusion_start}.{m.group(2)}"
    if head is not None and rest.startswith("cls.predictions."):
        return head + rest[len("cls."):]
    return None


def _strip_bert(rest: str) -> str:
    return rest[len("bert."):] if rest.startswith("bert.") else rest


MOMENTUM_UNPLACED = ("momentum (EMA) copy: our {kind} checkpoints hold the students only; "
                     "finetuning from one starts its teacher as a copy of the student, as ALBEF's "
                     "copy_params does")
UNPLACED = {
    "position_ids": "a constant buffer (0, 1, 2, ...) that our BERT builds itself",
    "idx_queue": "ALBEF's queued dataset indices are no image keys of ours "
                 "(codis.tasks.retrieval.image_key); our queue's ids are -1 (no sample)",
    "ta_unused": "ALBEF's text-assignment model carries it but its loss never reads it; ours has "
                 "no place for it",
}


def map_key(key: str, kind: str, fusion_start: int) -> str | None:
    """Our state-dict key for ALBEF's ``key`` in a model of ``kind`` (None: no place for it).
    The queues and the temperature are special-cased in :func:`convert_state`."""
    if kind in ("pretrain", "retrieval"):
        if re.fullmatch(r"(visual_encoder|vision_proj|text_proj)(_m)?\..+", key):
            return key
        if key.startswith("itm_head."):
            return key
        if m := re.fullmatch(r"text_encoder(_m)?\.(.+)", key):
            ours = f"text_encoder{m.group(1) or ''}."
            return _bert_key(_strip_bert(m.group(2)), fusion_start, ours + "bert.", ours + "fusion.",
                             ours + "mlm_head.")
        return None
    if key.split(".", 1)[0].endswith("_m"):
        return None  # momentum copies of a task model: see MOMENTUM_UNPLACED
    if kind == "vqa":
        if key.startswith("visual_encoder."):
            return key
        if key.startswith("text_encoder."):
            return _bert_key(_strip_bert(key[len("text_encoder."):]), fusion_start,
                             "text_encoder.bert.", "text_encoder.fusion.", None)
        if key.startswith("text_decoder."):  # all of its layers cross-attend (fusion_layer 0)
            return _bert_key(_strip_bert(key[len("text_decoder."):]), 0, "decoder.",
                             "decoder.layers.", "decoder.lm_head.")
        return None
    network = "network." if kind == "nlvr_ta" else ""
    if key.startswith("visual_encoder."):
        return network + key
    if key.startswith("text_encoder."):
        return _bert_key(_strip_bert(key[len("text_encoder."):]), fusion_start, network + "text.",
                         network + "fusion.", None)
    if kind in ("nlvr", "ve") and key.startswith("cls_head."):
        return "head." + key[len("cls_head."):]
    if kind == "nlvr_ta" and key.startswith("ta_head."):
        return "network.head." + key[len("ta_head."):]
    if kind == "nlvr_ta" and key.startswith("vision_proj."):
        return key
    return None


def _unplaced_reason(key: str, kind: str, ours: str | None) -> str:
    if key.endswith("position_ids"):
        return UNPLACED["position_ids"]
    if key == "idx_queue":
        return UNPLACED["idx_queue"]
    if kind == "nlvr_ta" and (key == "temp" or key.startswith("text_proj.")):
        return UNPLACED["ta_unused"]
    if ours is None and kind not in ("pretrain", "retrieval") and key.split(".", 1)[0].endswith("_m"):
        return MOMENTUM_UNPLACED.format(kind=kind)
    if ours is not None:
        return f"would be {ours}, which our {kind} model does not have"
    return f"no counterpart in our {kind} model"


# Tensors of ours that the ALBEF file of a kind lacks and the kind's task never reads: they keep the
# target model's initial values (the MLM head of a text encoder that ALBEF's BertModel lacks).
UNREAD = {
    "retrieval": re.compile(r"text_encoder(_m)?\.mlm_head\.predictions\.(transform\..+|bias)"),
    "vqa": re.compile(r"text_encoder\.mlm_head\.predictions\.(transform\..+|bias)"),
}
UNREAD_REASON = ("not in ALBEF's {kind} model (its BertModel has no MLM head) and never read by our "
                 "{kind} task: the target model's initial value")


@dataclass
class Conversion:
    """A converted state dict and where each of its tensors came from.

    ``placed``: our key -> ALBEF's key; ``transformed``: our key -> what was done to the ALBEF
    tensor (transposed, resampled, log, cast); ``derived``: our key -> how it was filled without an
    ALBEF tensor of its own; ``unplaced``: ALBEF key -> why it has no place in ours."""

    kind: str
    state_dict: dict[str, Tensor]
    placed: dict[str, str] = field(default_factory=dict)
    transformed: dict[str, str] = field(default_factory=dict)
    derived: dict[str, str] = field(default_factory=dict)
    unplaced: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """A few lines: counts, then the unplaced ALBEF keys and the derived tensors by reason."""
        lines = [f"ALBEF {self.kind} model: {len(self.placed)} tensors placed, "
                 f"{len(self.derived)} derived, {len(self.unplaced)} ALBEF keys unplaced"]
        lines += [f"  transformed {key}: {how}" for key, how in self.transformed.items()]
        for title, table in (("unplaced", self.unplaced), ("derived", self.derived)):
            by_reason: dict[str, list[str]] = {}
            for key, reason in table.items():
                by_reason.setdefault(reason, []).append(key)
            for reason, keys in by_reason.items():
                more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
                lines.append(f"  {title} {keys[0]}{more}: {reason}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The whole record (every key), for a JSON report."""
        return {"kind": self.kind, "placed": self.placed, "transformed": self.transformed,
                "derived": self.derived, "unplaced": self.unplaced}


def resample_pos_embed(pos_embed: Tensor, grid: int) -> Tensor:
    """(1, 1 + g0^2, D) ViT position embeddings -> (1, 1 + grid^2, D): the [CLS] position kept, the
    patch grid resampled bicubically without antialiasing, as ALBEF's ``interpolate_pos_embed``."""
    from timm.layers import resample_abs_pos_embed  # on use: the CLI imports this module at start-up

    old = math.isqrt(pos_embed.shape[1] - 1)
    return resample_abs_pos_embed(pos_embed.float(), new_size=[grid, grid], old_size=[old, old],
                                  num_prefix_tokens=1, interpolation="bicubic", antialias=False)


def _tie_groups(target: Mapping[str, Tensor]) -> list[list[str]]:
    """Keys of ``target`` (a built model's state dict) that share one tensor (tied weights)."""
    groups: dict[tuple[int, int], list[str]] = {}
    for key, value in target.items():
        if value.device.type != "meta" and value.numel():
            groups.setdefault((value.untyped_storage().data_ptr(), value.storage_offset()), []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]


def convert_state(source: Mapping[str, Tensor], kind: str, target: Mapping[str, Tensor],
                  fusion_start: int) -> Conversion:
    """Map an ALBEF state dict of ``kind`` onto ``target``, the state dict of the model of ours
    that is to hold it (built at the sizes of :func:`albef_shape`; its keys, shapes, dtypes and tied
    tensors say what must be filled). Every key of ``target`` is filled or this raises
    ConversionError naming the keys left; every key of ``source`` is placed or listed in
    ``unplaced``. ``fusion_start``: ALBEF's first layer with cross-attention."""
    if kind not in ALBEF_KINDS:
        raise ConversionError(f"kind: must be one of {', '.join(ALBEF_KINDS)}, got {kind!r}")
    out = Conversion(kind=kind, state_dict={})
    mismatched = []

    def put(ours: str, theirs: str, value: Tensor, how: str | None = None) -> None:
        want = target[ours]
        if value.dtype != want.dtype:
            how = f"{how}, cast" if how else f"cast from {value.dtype} to {want.dtype}"
            value = value.to(want.dtype)
        if value.shape != want.shape:
            mismatched.append(f"{theirs} {tuple(value.shape)} -> {ours} {tuple(want.shape)}")
            return
        out.state_dict[ours] = value
        out.placed[ours] = theirs
        if how:
            out.transformed[ours] = how

    for key, value in source.items():
        if key in ("image_queue", "text_queue") and kind in ("pretrain", "retrieval"):
            put(f"queue.{key.split('_')[0]}", key, value.T.contiguous(), "transposed")
        elif key == "queue_ptr" and kind in ("pretrain", "retrieval"):
            put("queue.pointer", key, value.reshape(()))
        elif key == "temp" and kind in ("pretrain", "retrieval"):
            if "temp" in target:
                put("temp", key, value)
            else:
                put("log_temp", key, value.log(), "log")
        else:
            ours = map_key(key, kind, fusion_start)
            if ours is None or ours not in target:
                out.unplaced[key] = _unplaced_reason(key, kind, ours)
            elif ours.endswith("pos_embed") and value.shape != target[ours].shape:
                grid = math.isqrt(target[ours].shape[1] - 1)
                old = math.isqrt(value.shape[1] - 1)
                put(ours, key, resample_pos_embed(value, grid), f"resampled from {old}x{old} "
                    f"to {grid}x{grid} patches")
            else:
                put(ours, key, value)
    if mismatched:
        raise ConversionError(f"{len(mismatched)} ALBEF tensor(s) do not fit ours: "
                              + "; ".join(mismatched[:5]))

    unread = UNREAD.get(kind)
    for key in target:
        if key not in out.state_dict and unread is not None and unread.fullmatch(key):
            out.state_dict[key] = target[key].detach().clone()
            out.derived[key] = UNREAD_REASON.format(kind=kind)
    for keys in _tie_groups(target):
        filled = [k for k in keys if k in out.state_dict]
        for other in filled[1:]:
            if not torch.equal(out.state_dict[filled[0]], out.state_dict[other]):
                raise ConversionError(f"{filled[0]} and {other} are one tensor in our model but "
                                      "differ in the ALBEF file")
        for key in keys:
            if key not in out.state_dict and filled:
                out.state_dict[key] = out.state_dict[filled[0]]
                out.derived[key] = f"tied to {filled[0]}"
    if "queue.ids" in target and "queue.ids" not in out.state_dict:
        out.state_dict["queue.ids"] = torch.full_like(target["queue.ids"], -1)
        out.derived["queue.ids"] = ("-1 (no sample) for every entry: ALBEF queues no sample ids our "
                                    "image keys could match")
    if "queue.filled" in target and "queue.filled" not in out.state_dict:
        out.state_dict["queue.filled"] = torch.tensor(target["queue.image"].shape[0],
                                                      dtype=target["queue.filled"].dtype)
        out.derived["queue.filled"] = "the queue's size: ALBEF's queue is always full"

    missing = [key for key in target if key not in out.state_dict]
    if missing:
        raise ConversionError(f"{len(missing)} tensor(s) of our {kind} model have no source in the "
                              f"ALBEF file: {', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''}")
    out.state_dict = {key: out.state_dict[key] for key in target}  # the target's order
    return out


# ---- the pretrained checkpoint, to a given model config -------------------------------------------
def check_tokenizer(config: ModelConfig, vocab_size: int) -> None:
    """The tokenizer a model of ``config`` loads exists and has ``vocab_size`` entries (the
    checkpoint's word embeddings), or a ConfigError naming ``text.tokenizer``: checked before any
    model is built."""
    from codis.text import text_tokenizer  # on use: the CLI imports this module at start-up

    name = config.text.tokenizer or config.text.pretrained
    hint = ("name a local tokenizer folder, e.g. --set "
            "'{\"text\": {\"tokenizer\": \"/path/to/bert-base-uncased\"}}'")
    try:
        tokenizer = text_tokenizer(config.text)
    except OSError as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"text.tokenizer: cannot load {name!r} ({first}); {hint}") from None
    if len(tokenizer) != vocab_size:
        # offline, a hub name that is not cached loads as a vocabulary of special tokens only
        raise ConfigError(f"text.tokenizer: {name!r} has {len(tokenizer)} entries but the ALBEF "
                          f"checkpoint's word embeddings have {vocab_size}; {hint}")


def _size_differences(shape: AlbefShape, config: ModelConfig) -> list[str]:
    """``"<field>: checkpoint <a>, config <b>"`` for each size of ``config`` that ``shape`` contradicts."""
    sizes = {"vision.patch_size": (shape.patch_size, config.vision.patch_size),
             "vision.width": (shape.vision_width, config.vision.width),
             "vision.depth": (shape.vision_depth, config.vision.depth),
             "vision.mlp_ratio": (shape.mlp_ratio, config.vision.mlp_ratio),
             "text.hidden_size": (shape.hidden_size, config.text.hidden_size),
             "text.text_layers": (shape.text_layers, config.text.text_layers),
             "text.fusion_layers": (shape.fusion_layers, config.text.fusion_layers),
             "text.intermediate_size": (shape.intermediate_size, config.text.intermediate_size),
             "embed_dim": (shape.embed_dim, config.embed_dim),
             "queue_size": (shape.queue_size, config.queue_size)}
    return [f"{name}: checkpoint {a}, config {b}" for name, (a, b) in sizes.items() if a != b]


def convert_albef_checkpoint(source: str | Path, output: str | Path, config: ModelConfig, *,
                             allow_pickle: bool = False) -> Conversion:
    """ALBEF's released pretrained checkpoint ``source`` (ALBEF.pth, ALBEF_4M.pth) written to
    ``output`` as a ``"pretrain"`` checkpoint of exactly ``config`` (what a recipe's
    ``import_checkpoint`` stage needs); returns where every tensor went.

    ``config``'s sizes must be the file's (a ConfigError names each that is not); its image size
    may differ (the position embeddings are resampled) and its mode must have no codebook. The
    rest of ``config`` is kept as given: ``base`` with mode ``albef`` has ALBEF's semantics. For
    ALBEF's finetuned checkpoints, or sizes read from the file, use ``codis convert-albef``
    (:func:`codis.tasks.albef.convert_albef`)."""
    from codis.model import CodisModel, save_model  # on use, as above

    if config.codebook_features != "off":
        raise ConfigError(f"mode: ALBEF's checkpoints have no codebook; mode {config.mode!r} needs "
                          "one (use albef or albef_intra)")
    state = read_albef_state(source, allow_pickle=allow_pickle)
    try:
        kind = detect_kind(state)
    except ConversionError as error:
        raise ConversionError(f"{source}: {error}") from None
    if kind != "pretrain":
        raise ConversionError(f"{source}: holds an ALBEF {kind} model, not a pretrained one "
                              "(`codis convert-albef` converts ALBEF's finetuned checkpoints)")
    shape = albef_shape(state, kind)
    differences = _size_differences(shape, config)
    if differences:
        raise ConfigError(f"{source}: the ALBEF checkpoint does not fit the model config: "
                          + "; ".join(differences))
    check_tokenizer(config, shape.vocab_size)
    model = CodisModel(config, text_architecture=albef_text_architecture(shape, config))
    conversion = convert_state(state, kind, model.state_dict(), shape.text_layers)
    model.load_state_dict(conversion.state_dict)
    save_model(model, output, extra={"albef_checkpoint": str(source), "albef_kind": kind})
    return conversion
