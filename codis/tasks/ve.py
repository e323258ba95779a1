"""SNLI-VE finetuning and evaluation (ALBEF's model_ve.py and VE.py), and the classifier plumbing
that NLVR² (:mod:`codis.tasks.nlvr`) reuses.

A classifier is the pretrained ViT, the BERT text layers and the fusion layers with an MLP
(Linear-ReLU-Linear, ALBEF's ``cls_head``) on the fused [CLS]. Finetuning follows ALBEF: the
cross-entropy is mixed with the predictions of an EMA copy of the model (momentum distillation,
weight alpha), under AdamW with a short warm-up and cosine decay, in the shared loop
:func:`codis.train.fit`. Evaluation reports the student's accuracy in percent (ALBEF evaluates the
student, not the EMA model).

SNLI-VE: (image, hypothesis) -> 3 classes with ALBEF's ids (:data:`codis.data.loaders.VE_LABELS`:
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
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import BertConfig, PreTrainedTokenizerBase

from codis import losses
from codis.config import ConfigError, ModelConfig, from_dict
from codis.encoders import TextFusionEncoder, _extended_mask, build_image_encoder
from codis.files import atomic_torch_save
from codis.metrics import accuracy
from codis.data.loaders import VE_LABELS, SkipCounter, shard_urls, ve_loader
from codis.model import load_model
from codis.text import load_tokenizer
from codis.train import (MetricsCallback, OptimConfig, Runtime, TrainConfig, distillation_alpha, fit,
                         init_runtime, seed_everything)

TASK = "ve"
TASK_CHECKPOINT_FORMAT = 1
NUM_CLASSES = len(VE_LABELS)


# ---- configuration -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassifierConfig:
    """A classification task's finetuning recipe (the fields of ALBEF's task YAML).

    ``batch_size`` (per process), ``lr`` and ``epochs`` are the recipe's schedule; pass the config to
    :func:`training_configs` for the TrainConfig / OptimConfig that :func:`finetune` runs with.
    ``distill``: momentum distillation with weight ``alpha`` against an EMA teacher of momentum
    ``momentum``; ``alpha_warmup`` is ALBEF's ``warm_up`` (alpha ramped from 0 over the first epoch).
    ``hflip``: random horizontal flips of training images. ``augment``: ALBEF's random crops
    (scale >= 0.5) and RandAugment on training images; false trains on the evaluation transform
    (the demo: crops cut the small objects that statements name out of 64 px scenes).
    ``max_words``: ALBEF's pre_caption cut.
    """

    image_size: int = 384
    batch_size: int = 32
    lr: float = 2e-5
    epochs: int = 5
    distill: bool = True
    alpha: float = 0.4
    alpha_warmup: bool = False
    momentum: float = 0.995
    hflip: bool = True
    augment: bool = True
    max_words: int = 30

    task: ClassVar[str] = "classifier"

    def __post_init__(self) -> None:
        for name in ("image_size", "batch_size", "epochs", "max_words"):
            self._check_int(name)
        self._check_positive("lr")
        for name in ("distill", "alpha_warmup", "hflip", "augment"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{self.task}.{name}: must be true or false, got {getattr(self, name)!r}")
        if not _is_number(self.alpha) or not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"{self.task}.alpha: must be in [0, 1], got {self.alpha!r}")
        if not _is_number(self.momentum) or not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"{self.task}.momentum: must be in [0, 1), got {self.momentum!r}")

    def _check_int(self, name: str) -> None:
        value = getattr(self, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{self.task}.{name}: must be an integer >= 1, got {value!r}")

    def _check_positive(self, name: str) -> None:
        value = getattr(self, name)
        if not _is_number(value) or value <= 0:
            raise ConfigError(f"{self.task}.{name}: must be a positive number, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ClassifierConfig":
        """Build from a mapping (a checkpoint's, a YAML file's); unknown keys name themselves."""
        return from_dict(cls, data, prefix=f"{cls.task}.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class VEConfig(ClassifierConfig):
    """ALBEF's SNLI-VE.yaml: 384 px, batch 32, lr 2e-5, 5 epochs, distillation alpha 0.4 without
    warm-up, flips (ALBEF's train transform)."""

    task: ClassVar[str] = "ve"


def ve_config(name: str = "ve", **changes: Any) -> VEConfig:
    """``"ve"``: the paper's setting. ``"demo"``: the tiny model's 64 px images, lr 1e-4 for a model
    trained briefly from scratch, a faster EMA (0.99) so the teacher follows within a short run, and
    no flips (the demo world's hypotheses talk about left and right)."""
    presets = {
        "ve": VEConfig,
        "demo": lambda: VEConfig(image_size=64, batch_size=16, lr=1e-4, epochs=5, momentum=0.99,
                                 hflip=False),
    }
    if name not in presets:
        raise ConfigError(f"ve.preset: unknown preset {name!r} (known: {', '.join(presets)})")
    config = presets[name]()
    return dataclasses.replace(config, **changes) if changes else config


def schedule(*, samples: int, batch_size: int, epochs: int, lr: float, min_lr: float,
             alpha_warmup: bool, world_size: int = 1, seed: int = 42,
             ) -> tuple[TrainConfig, OptimConfig]:
    """ALBEF's finetuning schedule over ``samples`` examples: ``epochs`` passes of full batches of
    ``batch_size`` per process; AdamW (weight decay 0.02) with the lr rising from 1e-5 over the first
    100 steps (ALBEF's warm-up "epoch" of 100 iterations) and a cosine to ``min_lr``; alpha ramped
    over the first epoch when ``alpha_warmup``; a training checkpoint per epoch."""
    for name, value in (("samples", samples), ("world_size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    per_epoch = samples // (batch_size * world_size)
    if per_epoch < 1:
        raise ValueError(f"samples: {samples} examples do not fill one batch of {batch_size} "
                         f"per process x {world_size} processes")
    train = TrainConfig(steps=per_epoch * epochs, batch_size=batch_size,
                        alpha_warmup_steps=per_epoch if alpha_warmup else 0, seed=seed,
                        checkpoint_every=per_epoch, log_every=max(1, min(50, per_epoch)))
    optim = OptimConfig(lr=lr, weight_decay=0.02, warmup_lr=min(1e-5, lr),
                        warmup_steps=min(100, per_epoch), min_lr=min(min_lr, lr))
    return train, optim


def training_configs(config: ClassifierConfig, train_samples: int, *, world_size: int = 1,
                     seed: int = 42) -> tuple[TrainConfig, OptimConfig]:
    """The TrainConfig / OptimConfig of ``config``'s recipe on ``train_samples`` training examples
    (ALBEF's finetuning min_lr 1e-6); see :func:`schedule`."""
    return schedule(samples=train_samples, batch_size=config.batch_size, epochs=config.epochs,
                    lr=config.lr, min_lr=1e-6, alpha_warmup=config.alpha_warmup,
                    world_size=world_size, seed=seed)


# ---- pure pieces ---------------------------------------------------------------------------------
def mlp_head(width: int, classes: int) -> nn.Sequential:
    """ALBEF's ``cls_head``: Linear(width, width) - ReLU - Linear(width, classes)."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes))


def classification_loss(logits: torch.Tensor, labels: torch.Tensor,
                        teacher_logits: torch.Tensor | None = None, alpha: float = 0.0,
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ALBEF finetuning loss (1 - alpha) H(y, p) + alpha H(softmax(teacher), p) (model_ve/model_nlvr)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (B, classes), got {tuple(logits.shape)}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if teacher_logits is None and alpha > 0:
        raise ValueError(f"alpha={alpha} needs teacher_logits; pass alpha=0 when not distilling")
    ce = F.cross_entropy(logits, labels.long())
    if teacher_logits is None:
        return ce, {"ce": ce}
    if teacher_logits.shape != logits.shape:
        raise ValueError(f"teacher_logits must have the shape of logits {tuple(logits.shape)}, "
                         f"got {tuple(teacher_logits.shape)}")
    distill = losses.soft_cross_entropy(logits, F.softmax(teacher_logits.detach().float(), dim=-1))
    return (1.0 - alpha) * ce + alpha * distill, {"ce": ce, "distill": distill}


def fuse(layers: Iterable[nn.Module], text_hidden: torch.Tensor, attention_mask: torch.Tensor,
         images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Fusion layers over the text states; layer i cross-attends to ``images[i % len(images)]``
    (ALBEF's xbert rule for a list of images: one image per layer, taken in turn)."""
    self_mask = _extended_mask(attention_mask, text_hidden.dtype)
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

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual_encoder.forward_features(images)

    def classify(self, image_tokens: Sequence[torch.Tensor], input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> torch.Tensor:
        text = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(fuse(self.fusion, text, attention_mask, image_tokens)[:, 0])

    def forward(self, images: Sequence[torch.Tensor], input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.image_tokens(torch.cat(list(images)))
        return self.classify(tokens.split(images[0].shape[0]), input_ids, attention_mask)


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

    @torch.no_grad()
    def momentum_update(self) -> None:
        """teacher <- m * teacher + (1 - m) * student."""
        torch._foreach_lerp_(list(self.teacher.parameters()), list(self.student.parameters()),
                             1.0 - self.momentum)

    def forward(self, *inputs: Any, labels: torch.Tensor, alpha: float = 0.0) -> ClassifierOutput:
        logits = self.student(*inputs)
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                self.momentum_update()
                teacher_logits = self.teacher(*inputs)
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


def set_image_size(visual_encoder: nn.Module, size: int) -> None:
    """Resize the ViT's input (timm resamples the position embeddings, as ALBEF's
    ``interpolate_pos_embed`` does between pretraining at 256 and finetuning at 384 px)."""
    if tuple(visual_encoder.patch_embed.img_size) != (size, size):
        visual_encoder.set_input_size(img_size=(size, size))


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
    tokenizer = load_tokenizer(model_config.text.tokenizer or model_config.text.pretrained)
    return Backbone(build_image_encoder(vision), text.bert, text.fusion, tokenizer, model_config,
                    text_architecture)


def save_task_checkpoint(path: str | Path, task: str, task_config: ClassifierConfig,
                         backbone: Backbone, state_dict: dict[str, torch.Tensor],
                         extra: dict[str, Any] | None = None) -> Path:
    """Write a task checkpoint atomically (the layout of notes/TASKS.md)."""
    payload = {"format": TASK_CHECKPOINT_FORMAT, "task": task, "task_config": task_config.to_dict(),
               "model_config": backbone.model_config.to_dict(),
               "text_architecture": backbone.text_architecture, "state_dict": state_dict,
               "extra": extra or {}}
    return atomic_torch_save(payload, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    # mmap: the tensors are read only when used (peeking at the task of a large file stays cheap)
    payload = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: not a codis checkpoint")
    return payload


def read_task_checkpoint(path: str | Path, task: str) -> dict[str, Any]:
    """A task checkpoint's payload; one of another task (or a pretraining checkpoint) is refused."""
    payload = read_checkpoint(path)
    if "task" not in payload:
        raise ValueError(f"{path}: a pretraining checkpoint, not a {task!r} task checkpoint "
                         "(finetune it first)")
    if payload.get("format") != TASK_CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: unknown task checkpoint format {payload.get('format')!r}")
    if payload["task"] != task:
        raise ValueError(f"{path}: task is {payload['task']!r}, expected {task!r}")
    return payload


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


def expect_config(config: Any, cls: type) -> None:
    if not isinstance(config, cls):
        raise ConfigError(f"{cls.task}: expected a {cls.__name__}, got {type(config).__name__}")


# ---- the shared finetune / evaluate scaffolding ----------------------------------------------------
Inputs = Callable[[dict], tuple]


def finetune_classifier(student: nn.Module, backbone: Backbone, inputs: Inputs,
                        open_epoch: Callable[[int], Any], config: ClassifierConfig, *,
                        run_config: dict[str, Any], train: TrainConfig, optim: OptimConfig,
                        output_dir: str | Path, runtime: Runtime, skips: SkipCounter,
                        callback: MetricsCallback | None, progress: bool, resume: bool,
                        stop_after: int | None) -> Path:
    """Run :func:`codis.train.fit` on ``student`` (with its EMA teacher when ``config.distill``) and
    save the student as ``output_dir/model.pt`` once all ``train.steps`` are done."""
    output_dir = Path(output_dir)
    if runtime.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    model = Distilled(student, config.momentum if config.distill else None).to(runtime.device)

    # config.alpha_warmup says whether alpha ramps (ALBEF's per-task warm_up), train how long
    ramp = train.alpha_warmup_steps if config.alpha_warmup else 0

    def step_loss(trained: nn.Module, batch: dict, step: int) -> ClassifierOutput:
        alpha = distillation_alpha(step, config.alpha, ramp) if config.distill else 0.0
        output = trained(*inputs(batch), labels=batch["label"], alpha=alpha)
        output.parts["alpha"] = torch.tensor(alpha)
        return output

    step = fit(model, step_loss, open_epoch, run_config=run_config, train=train, optim=optim,
               output_dir=output_dir, runtime=runtime, callback=callback, progress=progress,
               resume=resume, stop_after=stop_after, desc=config.task, skipped=lambda: skips.count)
    final = output_dir / "model.pt"
    if runtime.is_main and step >= train.steps:
        save_task_checkpoint(final, config.task, config, backbone, student.state_dict(),
                             extra={"step": step, "pretrained": run_config.get("pretrained")})
    if runtime.world_size > 1:
        dist.barrier()
    return final


def run_config_for(config: ClassifierConfig, train: TrainConfig, optim: OptimConfig,
                   pretrained: str | Path, shards: list[str], task: str | None = None,
                   ) -> dict[str, Any]:
    """What a resumed run must share with the one that wrote the checkpoint."""
    return {"task": task or config.task, "task_config": config.to_dict(),
            "train": dataclasses.asdict(train), "optim": dataclasses.asdict(optim),
            "pretrained": str(Path(pretrained).resolve()), "shards": list(shards)}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def evaluate_classifier(model: nn.Module, batches: Iterable[dict], inputs: Inputs, *,
                        device: torch.device | None = None, progress: bool = True,
                        desc: str = "eval") -> dict[str, float]:
    """Accuracy (percent) of ``model`` over ``batches`` in eval mode (no dropout, fixed order)."""
    device = device or default_device()
    model.to(device).eval()
    predictions, labels = [], []
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        predictions.append(model(*inputs(batch)).argmax(-1).cpu())
        labels.append(batch["label"].cpu())
    if not predictions:
        raise ValueError("evaluation read no examples")
    return {"accuracy": accuracy(torch.cat(predictions), torch.cat(labels))}


# ---- SNLI-VE -------------------------------------------------------------------------------------
def _ve_inputs(batch: dict) -> tuple:
    return [batch["image"]], batch["input_ids"], batch["attention_mask"]


def finetune(pretrained: str | Path, train_shards: str | list[str], output_dir: str | Path,
             config: VEConfig | None = None, *, train: TrainConfig, optim: OptimConfig,
             callback: MetricsCallback | None = None, progress: bool = True, resume: bool = True,
             stop_after: int | None = None, num_workers: int = 0) -> Path:
    """Finetune a pretraining checkpoint on SNLI-VE shards (write_shards kind "ve"); returns the
    task checkpoint ``output_dir/model.pt``. Resumes from ``output_dir/checkpoints``."""
    config = VEConfig() if config is None else config
    expect_config(config, VEConfig)
    urls = local_shards(train_shards, ("ve",))
    runtime = init_runtime()
    seed_everything(train.seed + runtime.rank)
    backbone = pretrained_backbone(pretrained, config)
    student = FusionClassifier(backbone.visual_encoder, backbone.text, backbone.fusion,
                               mlp_head(backbone.width, NUM_CLASSES))
    skips = SkipCounter()

    def open_epoch(epoch: int):
        return ve_loader(urls, train=True, tokenizer=backbone.tokenizer, image_size=config.image_size,
                         batch_size=train.batch_size, max_words=config.max_words,
                         max_length=backbone.model_config.text.max_length, num_workers=num_workers,
                         seed=train.seed, epoch=epoch, hflip=config.hflip, augment=config.augment,
                         skips=skips)

    return finetune_classifier(
        student, backbone, _ve_inputs, open_epoch, config,
        run_config=run_config_for(config, train, optim, pretrained, urls), train=train, optim=optim,
        output_dir=output_dir, runtime=runtime, skips=skips, callback=callback, progress=progress,
        resume=resume, stop_after=stop_after)


def load_ve_model(path: str | Path) -> FusionClassifier:
    """A finetuned SNLI-VE model in eval mode, with ``tokenizer``, ``model_config`` and
    ``task_config`` attributes."""
    payload = read_task_checkpoint(path, TASK)
    config = VEConfig.from_dict(payload["task_config"])
    backbone = empty_backbone(ModelConfig.from_dict(payload["model_config"]),
                              payload["text_architecture"], config.image_size)
    model = FusionClassifier(backbone.visual_encoder, backbone.text, backbone.fusion,
                             mlp_head(backbone.width, NUM_CLASSES))
    model.load_state_dict(payload["state_dict"])
    return attach(model, backbone, config)


def evaluate(checkpoint: str | Path, shards: str | list[str], config: VEConfig | None = None, *,
             batch_size: int = 64, progress: bool = True, num_workers: int = 0) -> dict[str, float]:
    """``{"accuracy": percent}`` of a finetuned checkpoint on SNLI-VE shards (dev or test).
    ``config`` defaults to the checkpoint's; its image size must be the checkpoint's."""
    urls = local_shards(shards, ("ve",))
    model = load_ve_model(checkpoint)
    config = eval_config(model.task_config, config)
    loader = ve_loader(urls, image_size=config.image_size, batch_size=batch_size,
                       tokenizer=model.tokenizer, max_words=config.max_words,
                       max_length=model.model_config.text.max_length, num_workers=num_workers)
    return evaluate_classifier(model, loader, _ve_inputs, progress=progress, desc="ve eval")
