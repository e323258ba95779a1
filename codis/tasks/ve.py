"""SNLI-VE finetuning and evaluation (ALBEF's model_ve.py and VE.py), and the classifier plumbing
that NLVR² (:mod:`codis.tasks.nlvr`) reuses.

A classifier is the pretrained ViT, the BERT text layers and the fusion layers with an MLP
(Linear-ReLU-Linear, ALBEF's ``cls_head``) on the fused [CLS]. Finetuning follows ALBEF: the
cross-entropy is mixed with the predictions of an EMA copy of the model (momentum distillation,
weight alpha), under AdamW with a short warm-up and cosine decay, in the shared loop
:func:`codis.train.fit`. Evaluation reports the student's accuracy in percent (ALBEF evaluates the
student, not the EMA model).

SNLI-VE: (image, hypothesis) -> 3 classes with ALBEF's ids (:data:`codis.data.loaders.VE_LABEL_IDS`:
entailment 2, neutral 1, contradiction 0).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from transformers import BertConfig, PreTrainedTokenizerBase

from codis.config import ConfigError, ModelConfig, check_bool
from codis.ema import MomentumTeachers
from codis.losses import classification_loss
from codis.encoders import TextFusionEncoder, additive_mask, build_image_encoder, set_image_size
from codis.checkpoint import Checkpoint, read_checkpoint, save_checkpoint
from codis.metrics import accuracy
from codis.data.loaders import (IN_MEMORY_BYTES, VE_LABEL_IDS, ExampleCache, SkipCounter,
                                shard_urls, task_loader)
from codis.model import load_model
from codis.tasks.base import TaskConfig, check_config, preset_config, training_loader
from codis.tasks.evaluation import predict_all
from codis.text import text_tokenizer
from codis.train import (MetricsCallback, OptimConfig, Runtime, TrainConfig, distillation_alpha, fit,
                         init_runtime, seed_everything)

TASK = "ve"
NUM_CLASSES = len(VE_LABEL_IDS)


# ---- configuration -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassifierConfig(TaskConfig):
    """A classification task's recipe: :class:`~codis.tasks.base.TaskConfig`'s fields, with the
    image size always set. (The demo sets ``augment`` false: crops cut the small objects that
    statements name out of 64 px scenes.)

    ``freeze_vision``: train with the pretrained ViT fixed (no gradients, batch norm and dropout
    in eval mode), only the text, fusion and head learning; ALBEF finetunes everything (False).
    The ViT's backward is then skipped and, without ``augment``, its forward runs once per
    training image (:class:`ImageTokenCache`); the demo's NLVR² and SNLI-VE take it (finding 14)."""

    freeze_vision: bool = False

    task: ClassVar[str] = "classifier"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_int("image_size", 1)
        check_bool(self.freeze_vision, self.field_name("freeze_vision"))


@dataclass(frozen=True)
class VEConfig(ClassifierConfig):
    """ALBEF's SNLI-VE.yaml: 384 px, batch 32, lr 2e-5, 5 epochs, distillation alpha 0.4 without
    warm-up, flips (ALBEF's train transform)."""

    task: ClassVar[str] = "ve"


PRESETS: dict[str, VEConfig] = {
    # ALBEF does not cut the hypotheses (padding "longest"): 512 is BERT's position limit.
    "ve": VEConfig(max_length=512),
    # The tiny model's 64 px images, lr 1e-4 for a model trained briefly from scratch, a faster EMA
    # (0.99) so the teacher follows within a short run, no flips (the demo world's hypotheses talk
    # about left and right).
    "demo": VEConfig(image_size=64, batch_size=16, lr=1e-4, epochs=5, momentum=0.99, hflip=False,
                     num_workers=0),
}


def config(preset: str = "ve", **changes: Any) -> VEConfig:
    """A preset (``ve``: the paper's setting; ``demo``: the tiny CPU model) with fields replaced."""
    return preset_config(PRESETS, TASK, preset, changes)


# ---- pure pieces ---------------------------------------------------------------------------------
def mlp_head(width: int, classes: int) -> nn.Sequential:
    """ALBEF's ``cls_head``: Linear(width, width) - ReLU - Linear(width, classes)."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes))


def fuse(layers: Iterable[nn.Module], text_hidden: torch.Tensor, attention_mask: torch.Tensor,
         images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Fusion layers over the text states; layer i cross-attends to ``images[i % len(images)]``
    (ALBEF's xbert rule for a list of images: one image per layer, taken in turn)."""
    self_mask = additive_mask(attention_mask, text_hidden.dtype)
    hidden = text_hidden
    for index, layer in enumerate(layers):
        hidden = layer(hidden, self_mask, images[index % len(images)])
    return hidden


# ---- models --------------------------------------------------------------------------------------
class FusionClassifier(nn.Module):
    """ViT + BERT text layers + fusion layers + head on the fused [CLS].

    ``forward(images, input_ids, attention_mask)`` takes a sequence of image batches (one for
    SNLI-VE, two for NLVR²), encodes them in one ViT pass (as ALBEF) and returns class logits.
    """

    def __init__(self, visual_encoder: nn.Module, text: nn.Module, fusion: nn.ModuleList,
                 head: nn.Module) -> None:
        super().__init__()
        self.visual_encoder = visual_encoder
        self.text = text
        self.fusion = fusion
        self.head = head
        self.vision_frozen = False

    def freeze_vision(self) -> FusionClassifier:
        """Fix the ViT: no gradients, and kept in eval mode by :meth:`train`."""
        self.vision_frozen = True
        self.visual_encoder.requires_grad_(False)
        return self.train(self.training)

    def train(self, mode: bool = True) -> FusionClassifier:
        super().train(mode)
        if self.vision_frozen:
            self.visual_encoder.eval()
        return self

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.vision_frozen):
            return self.visual_encoder.forward_features(images)

    def classify(self, image_tokens: Sequence[torch.Tensor], input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> torch.Tensor:
        text = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(fuse(self.fusion, text, attention_mask, image_tokens)[:, 0])

    def forward(self, images: Sequence[torch.Tensor], input_ids: torch.Tensor,
                attention_mask: torch.Tensor, image_tokens: torch.Tensor | None = None,
                ) -> torch.Tensor:
        """Class logits; ``image_tokens``, when given, are the ViT's tokens of
        ``torch.cat(images)`` (a fixed ViT's, from :class:`ImageTokenCache`)."""
        if image_tokens is None:
            image_tokens = self.image_tokens(torch.cat(list(images)))
        return self.classify(image_tokens.split(images[0].shape[0]), input_ids, attention_mask)


class ImageTokenCache:
    """A fixed ViT's tokens of each training image, kept from one epoch to the next.

    Without ``augment`` a training image is the same tensor in every epoch, and a frozen ViT
    (``freeze_vision``) maps it to the same tokens, so the ViT need see each image once per run
    rather than once per epoch. ``cache(images, batch)`` gives the tokens of ``torch.cat(images)``
    (:meth:`FusionClassifier.forward`'s ``image_tokens``), running the ViT on the images it does
    not hold yet. Tokens are kept, keyed by shard, sample key and image slot, while they fit
    ``max_bytes``; the rest are computed at every step. A held image's tokens were computed in
    another batch, so they equal a fresh pass up to float rounding.
    """

    def __init__(self, classifier: FusionClassifier, max_bytes: int = IN_MEMORY_BYTES) -> None:
        if not classifier.vision_frozen:
            raise ValueError("ImageTokenCache: the classifier's ViT is not frozen, so its tokens "
                             "change as it trains")
        self.classifier = classifier
        self.max_bytes = max_bytes
        self.bytes = 0
        self._tokens: dict[tuple[str, str, int], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._tokens)

    def __call__(self, images: Sequence[torch.Tensor], batch: dict) -> torch.Tensor:
        identities = [(shard, key, slot) for slot in range(len(images))
                      for shard, key in zip(batch["shard"], batch["key"])]
        held = [self._tokens.get(identity) for identity in identities]
        missing = [i for i, tokens in enumerate(held) if tokens is None]
        if not missing:
            return torch.stack(held)
        pixels = torch.cat(list(images))
        everything = len(missing) == len(held)
        fresh = self.classifier.image_tokens(pixels if everything else pixels[missing])
        for i, tokens in zip(missing, fresh):
            held[i] = tokens
            self._keep(identities[i], tokens)
        return fresh if everything else torch.stack(held)

    def _keep(self, identity: tuple[str, str, int], tokens: torch.Tensor) -> None:
        size = tokens.numel() * tokens.element_size()
        if self.bytes + size <= self.max_bytes:
            self._tokens[identity] = tokens.clone()
            self.bytes += size


@dataclass
class ClassifierOutput:
    """A training step's loss, its named (detached) parts, and the student's logits (detached)."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    logits: torch.Tensor


class Distilled(nn.Module):
    """A student and, when ``momentum`` is given, its EMA teacher (ALBEF's momentum distillation).

    ``forward(*inputs, labels=, alpha=)`` returns the step's :class:`ClassifierOutput`; the teacher
    moves one EMA step per call, before it predicts, as in ALBEF.
    """

    def __init__(self, student: nn.Module, momentum: float | None) -> None:
        super().__init__()
        self.student = student
        self.momentum = momentum
        self.teacher = None
        if momentum is not None:
            self.teacher = copy.deepcopy(student).requires_grad_(False)
            self.momentum_teachers = MomentumTeachers([self.teacher], [self.student])

    def momentum_update(self) -> None:
        """teacher <- m * teacher + (1 - m) * student."""
        self.momentum_teachers.update(self.momentum)

    def forward(self, *inputs: Any, labels: torch.Tensor, alpha: float = 0.0,
                **features: torch.Tensor) -> ClassifierOutput:
        """``features``: further model inputs both share (a frozen ViT's ``image_tokens``)."""
        logits = self.student(*inputs, **features)
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                self.momentum_update()
                teacher_logits = self.teacher(*inputs, **features)
        loss, parts = classification_loss(logits, labels, teacher_logits,
                                          alpha if teacher_logits is not None else 0.0)
        parts["accuracy"] = 100.0 * (logits.argmax(-1) == labels).float().mean()
        return ClassifierOutput(loss, {k: v.detach() for k, v in parts.items()}, logits.detach())


# ---- pretrained weights and task checkpoints ----------------------------------------------------
@dataclass
class Backbone:
    """The pretrained parts a task model is built from, and what rebuilding it needs."""

    visual_encoder: nn.Module
    text: nn.Module  # BertModel: embeddings + text-only layers
    fusion: nn.ModuleList  # BertLayers with cross-attention
    tokenizer: PreTrainedTokenizerBase
    model_config: ModelConfig
    text_architecture: dict[str, Any]
    vision_proj: nn.Module | None = None  # only from a pretraining checkpoint

    @property
    def width(self) -> int:
        return self.text.config.hidden_size


def check_image_size(config: ClassifierConfig, model_config: ModelConfig, name: str = "image_size",
                     ) -> None:
    size, patch = getattr(config, name), model_config.vision.patch_size
    if size % patch:
        raise ConfigError(f"{config.task}.{name}: {size} is not a multiple of the model's patch "
                          f"size {patch}")


def pretrained_backbone(path: str | Path, config: ClassifierConfig, image_size_field: str = "image_size",
                        ) -> Backbone:
    """The encoders of a pretraining checkpoint (:func:`codis.model.load_model`), with the ViT
    resized to ``config.<image_size_field>``."""
    model = load_model(path)
    check_image_size(config, model.config, image_size_field)
    set_image_size(model.visual_encoder, getattr(config, image_size_field))
    return Backbone(model.visual_encoder, model.text_encoder.bert, model.text_encoder.fusion,
                    model.tokenizer, model.config, model.text_encoder.architecture(),
                    model.vision_proj)


def empty_backbone(model_config: ModelConfig, text_architecture: dict[str, Any],
                   image_size: int) -> Backbone:
    """Encoders of a checkpoint's architecture with untrained weights (a task checkpoint's weights
    replace them), without fetching anything."""
    vision = dataclasses.replace(model_config.vision, image_size=image_size, pretrained=None)
    text = TextFusionEncoder(BertConfig.from_dict(text_architecture), model_config.text.text_layers,
                             model_config.text.fusion_layers)
    tokenizer = text_tokenizer(model_config.text)
    return Backbone(build_image_encoder(vision), text.bert, text.fusion, tokenizer, model_config,
                    text_architecture)


def save_task_checkpoint(path: str | Path, task: str, task_config: TaskConfig,
                         backbone: Backbone, state_dict: dict[str, torch.Tensor],
                         extra: dict[str, Any] | None = None) -> Path:
    """Write a classifier's task checkpoint (:mod:`codis.checkpoint`, kind ``task``) atomically."""
    return save_checkpoint(path, Checkpoint(
        kind=task, model_config=backbone.model_config.to_dict(), task_config=task_config.to_dict(),
        text_architecture=backbone.text_architecture, state_dict=state_dict, extra=extra or {}))


def attach(model: nn.Module, backbone: Backbone, config: ClassifierConfig) -> nn.Module:
    """What evaluation needs besides the weights: tokenizer and configs; eval mode."""
    model.tokenizer = backbone.tokenizer
    model.model_config = backbone.model_config
    model.task_config = config
    return model.eval()


def eval_config(saved: ClassifierConfig, given: ClassifierConfig | None) -> ClassifierConfig:
    """``given`` if it fits the checkpoint (same task and image size), else a ConfigError."""
    if given is None:
        return saved
    if type(given) is not type(saved):
        raise ConfigError(f"{saved.task}: expected a {type(saved).__name__}, got {type(given).__name__}")
    if given.image_size != saved.image_size:
        raise ConfigError(f"{saved.task}.image_size: the checkpoint was finetuned at "
                          f"{saved.image_size} px, the config asks for {given.image_size}")
    return given


def local_shards(shards: str | Path | list[str], kinds: tuple[str, ...]) -> list[str]:
    """:func:`codis.data.loaders.shard_urls`, and a FileNotFoundError now for a local shard that is not
    there (the loader would only find out, and skip it, once training has started)."""
    urls = shard_urls(shards, kinds)
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"shards: {len(missing)} shard file(s) missing; first: {missing[0]}")
    return urls


# ---- the shared finetune / evaluate scaffolding ----------------------------------------------------
Inputs = Callable[[dict], tuple]


def finetune_classifier(kind: str,
                        initial_model: Callable[[], tuple[FusionClassifier, Backbone]],
                        inputs: Inputs, pretrained: str | Path, train_shards: str | list[str],
                        output_dir: str | Path, config: ClassifierConfig, *, train: TrainConfig,
                        optim: OptimConfig, callback: MetricsCallback | None, progress: bool,
                        resume: bool, stop_after: int | None) -> Path:
    """Finetune a classifier on ``kind`` shards: ``initial_model()`` builds the student and its
    backbone (its ViT fixed when ``config.freeze_vision``); :func:`codis.train.fit` trains it (with
    its EMA teacher when ``config.distill``), and the student is saved as ``output_dir/model.pt``
    once all ``train.steps`` are done."""
    urls = local_shards(train_shards, (kind,))
    runtime = init_runtime()
    seed_everything(train.seed + runtime.rank)
    student, backbone = initial_model()
    tokens = None
    if config.freeze_vision:
        student.freeze_vision()
        tokens = None if config.augment else ImageTokenCache(student)
    skips, cache = SkipCounter(), ExampleCache()
    output_dir = Path(output_dir)
    if runtime.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    model = Distilled(student, config.momentum if config.distill else None).to(runtime.device)

    def open_epoch(epoch: int):
        return training_loader(urls, kind, config, train, tokenizer=backbone.tokenizer,
                               image_size=config.image_size,
                               max_length=config.text_max_length(backbone.model_config),
                               epoch=epoch, skips=skips, cache=cache)

    # config.alpha_warmup says whether alpha ramps (ALBEF's per-task warm_up), train how long
    ramp = train.alpha_warmup_steps if config.alpha_warmup else 0

    def step_loss(trained: nn.Module, batch: dict, step: int) -> ClassifierOutput:
        alpha = distillation_alpha(step, config.alpha, ramp) if config.distill else 0.0
        model_inputs = inputs(batch)
        features = {} if tokens is None else {"image_tokens": tokens(model_inputs[0], batch)}
        output = trained(*model_inputs, labels=batch["label"], alpha=alpha, **features)
        output.parts["alpha"] = torch.tensor(alpha)
        return output

    run_config = run_config_for(config, train, optim, pretrained, urls)
    step = fit(model, step_loss, open_epoch, run_config=run_config, train=train, optim=optim,
               output_dir=output_dir, runtime=runtime, callback=callback, progress=progress,
               resume=resume, stop_after=stop_after, desc=config.task, skipped=lambda: skips.count)
    final = output_dir / "model.pt"
    if runtime.is_main and step >= train.steps:
        save_task_checkpoint(final, config.task, config, backbone, student.state_dict(),
                             extra={"step": step, "pretrained": run_config["pretrained"]})
    if runtime.world_size > 1:
        dist.barrier()
    return final


def load_classifier(path: str | Path, config_type: type[ClassifierConfig],
                    fusion: Callable[[nn.ModuleList], nn.ModuleList] = lambda layers: layers,
                    ) -> FusionClassifier:
    """A finetuned classifier of ``config_type``'s task in eval mode, with ``tokenizer``,
    ``model_config`` and ``task_config`` attributes; ``fusion`` rebuilds the fusion layers as
    the task arranged them (NLVR²'s pairs)."""
    checkpoint = read_checkpoint(path, (config_type.task,))
    config = config_type.from_dict(checkpoint.task_config)
    backbone = empty_backbone(ModelConfig.from_dict(checkpoint.model_config),
                              checkpoint.text_architecture, config.image_size)
    classes = checkpoint.state_dict["head.2.weight"].shape[0]
    model = FusionClassifier(backbone.visual_encoder, backbone.text, fusion(backbone.fusion),
                             mlp_head(backbone.width, classes))
    model.load_state_dict(checkpoint.state_dict)
    return attach(model, backbone, config)


def run_config_for(config: ClassifierConfig, train: TrainConfig, optim: OptimConfig,
                   pretrained: str | Path, shards: list[str], task: str | None = None,
                   ) -> dict[str, Any]:
    """What a resumed run must share with the one that wrote the checkpoint."""
    return {"task": task or config.task, "task_config": config.to_dict(),
            "train": dataclasses.asdict(train), "optim": dataclasses.asdict(optim),
            "pretrained": str(Path(pretrained).resolve()), "shards": list(shards)}


def evaluate_classifier(model: nn.Module, batches: Iterable[dict], inputs: Inputs, *,
                        runtime: Runtime | None = None, precision: str = "auto",
                        progress: bool = True, desc: str = "eval") -> dict[str, float]:
    """Accuracy (percent) of ``model`` in eval mode on ``runtime``'s device (default: this
    process's, :func:`codis.train.init_runtime`). ``batches`` are this rank's share of the set
    (a loader built with the runtime's ``rank`` and ``world_size``); the predictions of all ranks
    are gathered by sample key, so every rank returns the accuracy on the whole set."""
    runtime = runtime or init_runtime()
    model.to(runtime.device).eval()

    def predictions(batch: dict) -> Iterable[tuple[str, tuple[int, int]]]:
        batch = {k: v.to(runtime.device) if isinstance(v, torch.Tensor) else v
                 for k, v in batch.items()}
        predicted = model(*inputs(batch)).argmax(-1).tolist()
        return zip(batch["key"], zip(predicted, batch["label"].tolist()))

    found = predict_all(batches, predictions, runtime, precision=precision, progress=progress,
                        desc=desc)
    if not found:
        raise ValueError("evaluation read no examples")
    predicted, labels = zip(*found.values())
    return {"accuracy": accuracy(list(predicted), list(labels))}


def evaluate_checkpoint(kind: str, load: Callable[[str | Path], FusionClassifier], inputs: Inputs,
                        checkpoint: str | Path, shards: str | list[str],
                        config: ClassifierConfig | None, *, batch_size: int, progress: bool,
                        device: str | torch.device | None) -> dict[str, float]:
    """``{"accuracy": percent}`` of a finetuned classifier (``load(checkpoint)``) on ``kind``
    shards. ``config`` defaults to the checkpoint's; its image size must be the checkpoint's. Under
    ``torchrun`` every rank calls it, classifies its share and returns the accuracy of all;
    ``config.eval_precision`` "auto": bf16 autocast on GPUs, fp32 on the CPU."""
    urls = local_shards(shards, (kind,))
    runtime = init_runtime(device)
    model = load(checkpoint)
    config = eval_config(model.task_config, config)
    loader = task_loader(urls, kind, image_size=config.image_size, batch_size=batch_size,
                         tokenizer=model.tokenizer, max_words=config.max_words,
                         max_length=config.text_max_length(model.model_config),
                         num_workers=config.num_workers, rank=runtime.rank,
                         world_size=runtime.world_size)
    return evaluate_classifier(model, loader, inputs, runtime=runtime,
                               precision=config.eval_precision, progress=progress,
                               desc=f"{kind} eval")


# ---- SNLI-VE -------------------------------------------------------------------------------------
def _ve_inputs(batch: dict) -> tuple:
    return [batch["image"]], batch["input_ids"], batch["attention_mask"]


def finetune(pretrained: str | Path, train_shards: str | list[str], output_dir: str | Path,
             config: VEConfig, *, train: TrainConfig, optim: OptimConfig,
             callback: MetricsCallback | None = None, progress: bool = True, resume: bool = True,
             stop_after: int | None = None) -> Path:
    """Finetune a pretraining checkpoint on SNLI-VE shards (write_shards kind "ve"); returns the
    task checkpoint ``output_dir/model.pt``. Resumes from ``output_dir/checkpoints``."""
    check_config(config, VEConfig)

    def initial_model() -> tuple[FusionClassifier, Backbone]:
        backbone = pretrained_backbone(pretrained, config)
        return FusionClassifier(backbone.visual_encoder, backbone.text, backbone.fusion,
                                mlp_head(backbone.width, NUM_CLASSES)), backbone

    return finetune_classifier(TASK, initial_model, _ve_inputs, pretrained, train_shards,
                               output_dir, config, train=train, optim=optim, callback=callback,
                               progress=progress, resume=resume, stop_after=stop_after)


def load_ve_model(path: str | Path) -> FusionClassifier:
    """A finetuned SNLI-VE model in eval mode, with ``tokenizer``, ``model_config`` and
    ``task_config`` attributes."""
    return load_classifier(path, VEConfig)


def evaluate(checkpoint: str | Path, shards: str | list[str], config: VEConfig | None = None, *,
             batch_size: int = 64, progress: bool = True,
             device: str | torch.device | None = None) -> dict[str, float]:
    """``{"accuracy": percent}`` of a finetuned checkpoint on SNLI-VE shards (dev or test); see
    :func:`evaluate_checkpoint`."""
    return evaluate_checkpoint(TASK, load_ve_model, _ve_inputs, checkpoint, shards, config,
                               batch_size=batch_size, progress=progress, device=device)
