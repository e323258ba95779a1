"""ALBEF's released checkpoints written as this package's checkpoints (``codis convert-albef``).

:mod:`codis.albef` reads an ALBEF file and maps its tensors; here the model of ours that each ALBEF
layout becomes is built at the checkpoint's sizes, the mapped state dict is loaded into it strictly,
and the task's own save function writes it, so that the file loads as any checkpoint of its kind:

- ``pretrain`` (ALBEF.pth, ALBEF_4M.pth): :func:`codis.model.save_model`; finetune it with any task.
- ``retrieval`` (mscoco.pth, flickr30k.pth): :func:`codis.tasks.retrieval.save_retrieval_model`;
  evaluate it, or finetune it further (ALBEF starts Flickr30K from its COCO model).
- ``vqa`` (vqa.pth): :func:`codis.tasks.vqa.save_vqa_model`, the students (ours keeps no teachers).
- ``nlvr_ta`` (pretrain_model_nlvr.pth): the text-assignment checkpoint NLVR² finetuning starts from.
- ``nlvr``, ``ve`` (ALBEF released none; its scripts write them): the classifiers' task checkpoints.

Sizes come from the tensors' shapes, the numbers of attention heads (which shapes do not tell) and
everything else from the ``base`` model config given (default: the ``base`` preset, whose heads
are ALBEF's 12); the semantics are ALBEF's whatever the preset (:func:`codis.albef.albef_model_config`).
ALBEF's Grounding.py model (refcoco.pth) has the retrieval layout and converts as one; we have no
grounding task to evaluate it with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from codis.albef import (ALBEF_KINDS, Conversion, ConversionError, albef_model_config, albef_shape,
                         albef_text_architecture, check_tokenizer, convert_state, detect_kind,
                         read_albef_state)
from codis.config import ConfigError, ModelConfig, preset
from codis.model import CodisModel, save_model
from codis.tasks import nlvr, retrieval, ve, vqa


def convert_albef(source: str | Path, output: str | Path, *, kind: str | None = None,
                  base: ModelConfig | None = None, image_size: int | None = None,
                  task_preset: str | None = None, allow_pickle: bool = False) -> Conversion:
    """Convert the ALBEF checkpoint ``source`` into our checkpoint ``output`` and say where every
    tensor went (:class:`codis.albef.Conversion`).

    ``kind`` (one of :data:`codis.albef.ALBEF_KINDS`) is detected from the keys when None; a given
    kind that contradicts the keys is an error. ``base``: the model config whose heads, text limits
    and hyper-parameters the converted model takes (default ``preset("base")``); ``image_size``
    resamples the ViT's position embeddings to another resolution (default: the checkpoint's);
    ``task_preset``: the task config preset stored with a task checkpoint (default: the paper's)."""
    if kind is not None and kind not in ALBEF_KINDS:
        raise ConfigError(f"kind: must be one of {', '.join(ALBEF_KINDS)}, got {kind!r}")
    if Path(output).resolve() == Path(source).resolve():
        raise ValueError(f"{output}: the output would overwrite the ALBEF checkpoint")
    if Path(output).is_dir():
        raise ValueError(f"{output}: is a folder; name the checkpoint file to write")
    state = read_albef_state(source, allow_pickle=allow_pickle)
    try:
        found = detect_kind(state)
    except ConversionError as error:
        if kind is None:
            raise ConversionError(f"{source}: {error}") from None
        found = kind
    if kind is not None and kind != found:
        raise ConversionError(f"{source}: holds an ALBEF {found} model, not {kind}")
    kind = found
    shape = albef_shape(state, kind)
    config = albef_model_config(shape, base or preset("base"), image_size)
    architecture = albef_text_architecture(shape, config)
    check_tokenizer(config, shape.vocab_size)
    size = config.vision.image_size
    extra = {"albef_checkpoint": str(source), "albef_kind": kind}

    if kind in ("pretrain", "retrieval"):
        model = CodisModel(config, text_architecture=architecture)
        conversion = _load(model, state, kind, shape.text_layers)
        if kind == "pretrain":
            save_model(model, output, extra=extra)
        else:
            task = retrieval.config(task_preset or "coco", image_size=size)
            retrieval.save_retrieval_model(model, output, task, extra=extra)
    elif kind == "vqa":
        task = vqa.config(task_preset or "vqa", image_size=size)
        model = vqa.VQAModel(config, architecture, task, teachers=False)
        conversion = _load(model, state, kind, shape.text_layers)
        vqa.save_vqa_model(model, output, extra=extra)
    else:
        if kind == "ve":
            task = ve.config(task_preset or "ve", image_size=size)
        elif kind == "nlvr":
            task = nlvr.config(task_preset or "nlvr", image_size=size)
        else:  # the TA step runs at its own resolution, finetuning at image_size
            task = nlvr.config(task_preset or "nlvr", ta_image_size=size)
        backbone = ve.empty_backbone(config, architecture, size)
        fusion = backbone.fusion if kind == "ve" else nlvr.pair_fusion(backbone.fusion)
        head = (ve.mlp_head(backbone.width, ve.NUM_CLASSES if kind == "ve" else nlvr.NUM_CLASSES)
                if kind != "nlvr_ta" else nn.Linear(backbone.width, len(nlvr.TA_LABELS)))
        model = ve.FusionClassifier(backbone.visual_encoder, backbone.text, fusion, head)
        if kind == "nlvr_ta":
            model = nlvr.TextAssignmentModel(
                model, nn.Linear(config.vision.width, config.embed_dim))
        conversion = _load(model, state, kind, shape.text_layers)
        task_name = nlvr.TA_TASK if kind == "nlvr_ta" else task.task
        ve.save_task_checkpoint(output, task_name, task, backbone, model.state_dict(), extra=extra)
    return conversion


def _load(model: nn.Module, state: dict[str, Any], kind: str, fusion_start: int) -> Conversion:
    conversion = convert_state(state, kind, model.state_dict(), fusion_start)
    model.load_state_dict(conversion.state_dict)
    return conversion
