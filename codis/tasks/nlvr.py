"""NLVR² finetuning and evaluation (ALBEF's model_nlvr.py, NLVR.py) and its text-assignment (TA)
pre-step (ALBEF's model_pretrain_nlvr.py, Pretrain_nlvr.py).

Two images per statement. ALBEF (Sec. 5, Fig. 3b) extends the multimodal encoder so that each of
its layers becomes two consecutive transformer blocks (self-attention, cross-attention,
feed-forward), both initialised from the pretrained layer; the first block of a pair cross-attends
to the first image and the second block to the second image, and the two cross-attentions share
their key and value projections. We build exactly that from the pretrained fusion layers
(:func:`pair_fusion`): ALBEF's released code does the same (its 6 fusion layers become 12, layer
6 + 2i and 7 + 2i copied from pretrained layer 6 + i, key/value of each pair tied, and layer k
reading image (k - 6) mod 2). The other reading - one cross-attention per image inside a layer,
outputs concatenated and merged by a linear layer - is not ALBEF's and would add an untrained
merge layer. Because the order of the blocks tells the images apart, swapping the images changes
the prediction, as it must for statements about "the left image".

TA: before finetuning, ALBEF trains this two-image model for one epoch on the pretraining pairs:
given a text and two images, say whether the text belongs to the first image (label 0), the
second (1) or neither (2), with a linear head on the fused [CLS]. The other images are drawn from
the same batch with probabilities softmax(image-image similarity / 0.07), self excluded, as in
ALBEF (hard partners, so the task is not solved by a glance).

Finetuning: the MLP head (2 classes; label 1 = "True") with ALBEF's momentum-distilled
cross-entropy. ALBEF's released NLVR² recipe keeps its random horizontal flip; we turn flips off
(``NLVRConfig.hflip = False``) because a mirrored image makes statements about left and right
false.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from codis.checkpoint import read_checkpoint
from codis.config import ConfigError, ModelConfig, check_positive
from codis.data.loaders import SkipCounter, pretrain_loader
from codis.encoders import set_image_size
from codis.tasks.base import TaskConfig, check_config, preset_config
from codis.tasks.ve import (Backbone, ClassifierConfig, ClassifierOutput, FusionClassifier,
                            check_image_size, empty_backbone, evaluate_checkpoint,
                            finetune_classifier, load_classifier, local_shards,
                            mlp_head, pretrained_backbone, run_config_for, save_task_checkpoint)
from codis.train import (MetricsCallback, OptimConfig, TrainConfig, fit, init_runtime,
                         seed_everything)

TASK = "nlvr"
TA_TASK = "nlvr_ta"
NUM_CLASSES = 2
TA_LABELS = {"first": 0, "second": 1, "neither": 2}
"""Text-assignment classes (ALBEF model_pretrain_nlvr.py)."""
TA_TEMPERATURE = 0.07
"""ALBEF's fixed temperature of the image-image similarity that draws the TA partner images."""


@dataclass(frozen=True)
class TextAssignmentConfig(TaskConfig):
    """The TA pre-step's recipe, as :meth:`NLVRConfig.text_assignment` builds it."""

    task: ClassVar[str] = "nlvr.text_assignment"


@dataclass(frozen=True)
class NLVRConfig(ClassifierConfig):
    """ALBEF's NLVR.yaml: 384 px, batch 16, lr 2e-5, 10 epochs, distillation alpha 0.4 ramped over
    the first epoch (``warm_up: True``); flips off (see the module docstring). The ``ta_*`` fields
    are NLVR_pretrain.yaml: 256 px, batch 64, lr 2e-5 with cosine to 1e-5, 1 epoch."""

    batch_size: int = 16
    epochs: int = 10
    alpha_warmup: bool = True
    hflip: bool = False
    ta_image_size: int = 256
    ta_batch_size: int = 64
    ta_lr: float = 2e-5
    ta_min_lr: float = 1e-5
    ta_epochs: int = 1

    task: ClassVar[str] = "nlvr"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("ta_image_size", "ta_batch_size", "ta_epochs"):
            self.check_int(name, 1)
        for name in ("ta_lr", "ta_min_lr"):
            check_positive(getattr(self, name), self.field_name(name))
        if self.ta_batch_size < 3:
            raise ConfigError(f"nlvr.ta_batch_size: text assignment draws two other images of the "
                              f"batch per text, so it needs at least 3, got {self.ta_batch_size}")

    def text_assignment(self) -> TextAssignmentConfig:
        """The TA step's recipe (its schedule: :func:`codis.train.schedules.task_schedule`)."""
        return TextAssignmentConfig(
            image_size=self.ta_image_size, batch_size=self.ta_batch_size, epochs=self.ta_epochs,
            lr=self.ta_lr, min_lr=self.ta_min_lr, warmup_lr=self.warmup_lr,
            warmup_steps=self.warmup_steps, weight_decay=self.weight_decay, distill=False,
            alpha_warmup=False, hflip=self.hflip, max_words=self.max_words,
            num_workers=self.num_workers)


PRESETS: dict[str, NLVRConfig] = {
    # ALBEF does not cut the statements (padding "longest"): 512 is BERT's position limit.
    "nlvr": NLVRConfig(max_length=512),
    # The tiny model's 64 px images for TA and finetuning, lr 1e-4 for a model trained briefly from
    # scratch, and a faster EMA (0.99) so the teacher follows within a short run.
    "demo": NLVRConfig(image_size=64, batch_size=16, lr=1e-4, epochs=10, momentum=0.99,
                       ta_image_size=64, ta_batch_size=16, ta_lr=1e-4, ta_min_lr=1e-5,
                       num_workers=0),
}


def config(preset: str = "nlvr", **changes: Any) -> NLVRConfig:
    """A preset (``nlvr``: the paper's setting; ``demo``: the tiny CPU model) with fields replaced."""
    return preset_config(PRESETS, TASK, preset, changes)


# ---- the two-image fusion encoder -----------------------------------------------------------------
def pair_fusion(layers: Sequence[nn.Module]) -> nn.ModuleList:
    """ALBEF's NLVR² multimodal encoder from pretrained fusion layers: each layer becomes two
    consecutive copies of itself (for the first and the second image, see :func:`codis.tasks.ve.fuse`),
    whose cross-attentions share one key and one value projection."""
    blocks = []
    for layer in layers:
        first, second = copy.deepcopy(layer), copy.deepcopy(layer)
        second.crossattention.self.key = first.crossattention.self.key
        second.crossattention.self.value = first.crossattention.self.value
        blocks += [first, second]
    return nn.ModuleList(blocks)


def _nlvr_inputs(batch: dict) -> tuple:
    return [batch["image0"], batch["image1"]], batch["input_ids"], batch["attention_mask"]


# ---- text assignment -----------------------------------------------------------------------------
def text_assignment_pairs(similarity: torch.Tensor, generator: torch.Generator | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image pairs and 3-way labels for a batch's texts (ALBEF model_pretrain_nlvr.py).

    Each text b (whose own image is b) gets, with probability 1/3 each: (b, other) label 0, (other,
    b) label 1, or (other, another) label 2, where the others are distinct images of the batch
    drawn from softmax(similarity[b]) with b itself excluded. Returns (first, second, labels), each
    (B,) long; first/second index the batch's images.
    """
    batch = similarity.shape[0]
    if similarity.shape != (batch, batch):
        raise ValueError(f"similarity must be a square (B, B) matrix, got {tuple(similarity.shape)}")
    if batch < 3:
        raise ValueError(f"text assignment needs a batch of at least 3 images, got {batch}")
    self_pair = torch.eye(batch, dtype=torch.bool, device=similarity.device)
    weights = F.softmax(similarity.detach().float().masked_fill(self_pair, float("-inf")), dim=1)
    others = torch.multinomial(weights, 2, generator=generator)  # distinct, never b itself
    labels = torch.randint(0, 3, (batch,), generator=generator, device=weights.device)
    own = torch.arange(batch, device=similarity.device)
    first = torch.where(labels == TA_LABELS["first"], own, others[:, 0])
    second = torch.where(labels == TA_LABELS["first"], others[:, 0],
                         torch.where(labels == TA_LABELS["second"], own, others[:, 1]))
    return first, second, labels


class TextAssignmentModel(nn.Module):
    """The two-image model with ALBEF's TA head (Linear(width, 3)); ``vision_proj`` (pretrained,
    frozen) only scores image similarity for drawing partner images."""

    def __init__(self, network: FusionClassifier, vision_proj: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.vision_proj = vision_proj.requires_grad_(False)

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> ClassifierOutput:
        tokens = self.network.image_tokens(image)
        with torch.no_grad():
            features = F.normalize(self.vision_proj(tokens[:, 0]).float(), dim=-1)
            first, second, labels = text_assignment_pairs(features @ features.T / TA_TEMPERATURE)
        logits = self.network.classify([tokens[first], tokens[second]], input_ids, attention_mask)
        loss = F.cross_entropy(logits, labels)
        parts = {"ta": loss.detach(),
                 "accuracy": 100.0 * (logits.argmax(-1) == labels).float().mean().detach()}
        return ClassifierOutput(loss, parts, logits.detach())


def text_assignment(pretrained: str | Path, pretrain_shards: str | list[str], output_dir: str | Path,
                    config: NLVRConfig, *, train: TrainConfig, optim: OptimConfig,
                    callback: MetricsCallback | None = None, progress: bool = True,
                    resume: bool = True, stop_after: int | None = None) -> Path:
    """ALBEF's TA pre-step on pretraining shards at ``config.ta_image_size``; returns the TA
    checkpoint ``output_dir/model.pt``, from which :func:`finetune` starts. Resumable like every
    run of :func:`codis.train.fit`. Its schedule: ``task_schedule(config.text_assignment(), ...)``."""
    check_config(config, NLVRConfig)
    if train.batch_size < 3:
        raise ConfigError(f"train.batch_size: text assignment draws two other images of the batch "
                          f"per text, so it needs at least 3, got {train.batch_size}")
    urls = local_shards(pretrain_shards, ("pretrain", "retrieval_train"))
    runtime = init_runtime()
    seed_everything(train.seed + runtime.rank)
    backbone = pretrained_backbone(pretrained, config, "ta_image_size")
    network = FusionClassifier(backbone.visual_encoder, backbone.text, pair_fusion(backbone.fusion),
                               nn.Linear(backbone.width, len(TA_LABELS)))
    model = TextAssignmentModel(network, backbone.vision_proj).to(runtime.device)
    output_dir = Path(output_dir)
    if runtime.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    skips = SkipCounter()

    def open_epoch(epoch: int):
        return pretrain_loader(urls, tokenizer=backbone.tokenizer, image_size=config.ta_image_size,
                               batch_size=train.batch_size, max_words=config.max_words,
                               num_workers=config.num_workers, seed=train.seed, hflip=config.hflip,
                               epoch=epoch, max_length=backbone.model_config.text.max_length,
                               skips=skips)

    def step_loss(trained: nn.Module, batch: dict, step: int) -> ClassifierOutput:
        return trained(batch["image"], batch["input_ids"], batch["attention_mask"])

    run_config = run_config_for(config, train, optim, pretrained, urls, task=TA_TASK)
    step = fit(model, step_loss, open_epoch, run_config=run_config, train=train, optim=optim,
               output_dir=output_dir, runtime=runtime, callback=callback, progress=progress,
               resume=resume, stop_after=stop_after, desc="nlvr-ta", skipped=lambda: skips.count)
    final = output_dir / "model.pt"
    if runtime.is_main and step >= train.steps:
        save_task_checkpoint(final, TA_TASK, config, backbone, model.state_dict(),
                             extra={"step": step, "pretrained": run_config["pretrained"]})
    if runtime.world_size > 1:
        dist.barrier()
    return final


# ---- finetuning and evaluation -------------------------------------------------------------------
def initial_nlvr_model(pretrained: str | Path, config: NLVRConfig,
                       ) -> tuple[FusionClassifier, Backbone]:
    """The model :func:`finetune` starts from, with a fresh 2-class MLP head, and its backbone.

    ``pretrained`` is a TA checkpoint (ALBEF's route) or a pretraining checkpoint, whose fusion
    layers are then paired here without the TA step. The ViT is resized to ``config.image_size``.
    """
    checkpoint = read_checkpoint(pretrained, ("pretrain", TA_TASK))
    if checkpoint.kind == "pretrain":
        backbone = pretrained_backbone(pretrained, config)
        fusion = pair_fusion(backbone.fusion)
    else:
        saved = NLVRConfig.from_dict(checkpoint.task_config)
        model_config = ModelConfig.from_dict(checkpoint.model_config)
        check_image_size(config, model_config)
        backbone = empty_backbone(model_config, checkpoint.text_architecture, saved.ta_image_size)
        fusion = pair_fusion(backbone.fusion)
        ta = FusionClassifier(backbone.visual_encoder, backbone.text, fusion,
                              nn.Linear(backbone.width, len(TA_LABELS)))
        prefix = "network."
        ta.load_state_dict({k[len(prefix):]: v for k, v in checkpoint.state_dict.items()
                            if k.startswith(prefix)})
        set_image_size(backbone.visual_encoder, config.image_size)
    model = FusionClassifier(backbone.visual_encoder, backbone.text, fusion,
                             mlp_head(backbone.width, NUM_CLASSES))
    return model, backbone


def finetune(pretrained: str | Path, train_shards: str | list[str], output_dir: str | Path,
             config: NLVRConfig, *, train: TrainConfig, optim: OptimConfig,
             callback: MetricsCallback | None = None, progress: bool = True, resume: bool = True,
             stop_after: int | None = None) -> Path:
    """Finetune on NLVR² shards (write_shards kind "nlvr") from a TA or pretraining checkpoint;
    returns the task checkpoint ``output_dir/model.pt``."""
    check_config(config, NLVRConfig)
    return finetune_classifier(TASK, lambda: initial_nlvr_model(pretrained, config), _nlvr_inputs,
                               pretrained, train_shards, output_dir, config, train=train,
                               optim=optim, callback=callback, progress=progress, resume=resume,
                               stop_after=stop_after)


def load_nlvr_model(path: str | Path) -> FusionClassifier:
    """A finetuned NLVR² model in eval mode, with ``tokenizer``, ``model_config`` and
    ``task_config`` attributes."""
    return load_classifier(path, NLVRConfig, pair_fusion)


def evaluate(checkpoint: str | Path, shards: str | list[str], config: NLVRConfig | None = None, *,
             batch_size: int = 64, progress: bool = True,
             device: str | torch.device | None = None) -> dict[str, float]:
    """``{"accuracy": percent}`` of a finetuned checkpoint on NLVR² shards (dev or test); see
    :func:`codis.tasks.ve.evaluate_checkpoint`."""
    return evaluate_checkpoint(TASK, load_nlvr_model, _nlvr_inputs, checkpoint, shards, config,
                               batch_size=batch_size, progress=progress, device=device)
