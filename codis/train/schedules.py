"""Learning-rate and distillation schedules, and the configs they are built from.

``learning_rate`` is ALBEF's linear warm-up then cosine; ``distillation_alpha`` its alpha ramp.
``scale_schedule``, ``global_batch`` and ``scaled_lr`` are the policy a recipe applies to a
schedule (step scaling, the linear learning-rate rule).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Protocol

from codis.config import ConfigError, check_int, check_number, from_dict


@dataclass(frozen=True)
class OptimConfig:
    """ALBEF's pretraining optimiser: AdamW lr 1e-4, weight decay 0.02, warm-up from 1e-5 over the
    first 2,000 steps (its 20 warm-up "epochs" of 100 steps), cosine decay to 1e-5.

    ``vision_lr_scale`` multiplies the learning rate of the image encoder (every
    ``visual_encoder`` module's parameters) at every step; 1 (ALBEF: one rate for all) by
    default. Below 1 a trained ViT keeps more of what it knows while a text side trained from
    scratch needs a higher rate: at the demo's lr 1e-3, pretraining erased most of the shape
    knowledge of the demo's ViT initialisation (docs/findings/tiny-preset.md, finding 11)."""

    lr: float = 1e-4
    weight_decay: float = 0.02
    warmup_lr: float = 1e-5
    warmup_steps: int = 2000
    min_lr: float = 1e-5
    vision_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("lr", "warmup_lr", "min_lr", "vision_lr_scale"):
            check_number(getattr(self, name), f"optim.{name}", 0, low_open=True)
        check_number(self.weight_decay, "optim.weight_decay", 0)
        check_int(self.warmup_steps, "optim.warmup_steps", 0)


@dataclass(frozen=True)
class TrainConfig:
    """``batch_size`` is per process and micro-batch; the global batch is batch_size x
    grad_accumulation x world size. ``alpha_warmup_steps``: ALBEF ramps alpha over one epoch.
    ``itm_uniform_negative_steps``: ITM negatives drawn uniformly (not ALBEF's hard negatives) for
    the first steps; 0 (ALBEF) for pretrained encoders. A fusion encoder trained from scratch never
    learns ITM from hard negatives alone (docs/findings/tiny-preset.md, finding 6).

    ``compile``: "off" (eager), "regional" (``.compile()`` on every ViT block and BERT text / fusion
    layer, students, teachers and task models alike: graphs without breaks; see
    :func:`codis.train.engine.compile_regions`) or "full" (``torch.compile`` of the whole model,
    which breaks into several graphs at the step's data-dependent code, and gains little).
    ``false`` / ``true`` (a saved run config's form, and what YAML makes of a bare ``off`` /
    ``on``) read as "off" / "full". Off by default: every training process compiles anew (on the
    2-core CPU, ``tiny``'s first step took 24 s cold and 6 s with inductor's cache warm), and on
    that CPU the faster steps did not repay it (``benchmarks/parallel_training.py --compile``:
    0.96x in the demo's setting); on a GPU ``benchmarks/gpu_check.py`` section J measures it."""

    steps: int = 1000
    batch_size: int = 64
    grad_accumulation: int = 1
    alpha_warmup_steps: int = 1000
    itm_uniform_negative_steps: int = 0
    clip_grad_norm: float = 0.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # bool too: YAML reads a bare `off` as false (`--set pretrain.train.compile=off`)
    compile: str | bool = "off"  # "off", "regional" or "full"
    seed: int = 42
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accumulation", "checkpoint_every",
                     "keep_checkpoints", "log_every"):
            check_int(getattr(self, name), f"train.{name}", 1)
        for name in ("alpha_warmup_steps", "itm_uniform_negative_steps"):
            check_int(getattr(self, name), f"train.{name}", 0)
        check_number(self.clip_grad_norm, "train.clip_grad_norm (0 = off)", 0)
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision: must be auto, fp32 or bf16, got {self.precision!r}")
        if isinstance(self.compile, bool):  # the option's form before "regional" existed
            object.__setattr__(self, "compile", "full" if self.compile else "off")
        if self.compile not in ("off", "regional", "full"):
            raise ConfigError(f"train.compile: must be off, regional or full, got {self.compile!r}")


def learning_rate(step: int, total_steps: int, config: OptimConfig) -> float:
    """Linear warm-up from ``warmup_lr`` to ``lr``, then cosine from ``lr`` to ``min_lr``."""
    if step < config.warmup_steps:
        return config.warmup_lr + (config.lr - config.warmup_lr) * step / config.warmup_steps
    span = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def distillation_alpha(step: int, alpha: float, warmup_steps: int) -> float:
    """ALBEF's ramp: alpha * min(1, step / warmup_steps) (full alpha at once when warmup is 0)."""
    return alpha if warmup_steps == 0 else alpha * min(1.0, step / warmup_steps)



# scale_schedule's smallest log interval: a short run's log (one line per logged step, in the
# terminal, the Prefect log and MLflow) stays readable; a recipe's own smaller interval is kept.
LOG_EVERY_FLOOR = 10


def scale_schedule(train: TrainConfig, optim: OptimConfig, factor: float,
                   ) -> tuple[TrainConfig, OptimConfig]:
    """Multiply every step count of a schedule by ``factor`` (the recipe's ``steps_scale``): total
    steps, warm-ups, checkpoint and log intervals; each stays >= 1 (warm-ups >= 0). The log
    interval does not shrink below ``LOG_EVERY_FLOOR`` steps (nor below the schedule's own, if that
    is smaller), so that a quick run does not log every step; checkpoint and log intervals are
    at most the scaled ``steps``."""
    if factor == 1.0:
        return train, optim

    def scaled(value: int, least: int) -> int:
        return max(least, int(round(value * factor)))

    steps = scaled(train.steps, 1)
    train = dataclasses.replace(
        train, steps=steps, alpha_warmup_steps=scaled(train.alpha_warmup_steps, 0),
        itm_uniform_negative_steps=scaled(train.itm_uniform_negative_steps, 0),
        checkpoint_every=min(steps, scaled(train.checkpoint_every, 1)),
        log_every=min(steps, scaled(train.log_every, min(train.log_every, LOG_EVERY_FLOOR))))
    optim = dataclasses.replace(optim, warmup_steps=min(steps, scaled(optim.warmup_steps, 0)))
    return train, optim


def global_batch(train: TrainConfig, nodes: int = 1, gpus_per_node: int = 1) -> int:
    """Samples per optimiser step: batch_size (per process) x grad_accumulation x processes."""
    return train.batch_size * train.grad_accumulation * nodes * gpus_per_node


def scaled_lr(lr: float, reference_batch: int | None, batch: int) -> float:
    """The linear scaling rule (Goyal et al., 2017): ``lr`` was tuned for a global batch of
    ``reference_batch`` and is used at ``batch``, so it becomes lr x batch / reference_batch
    (ALBEF: 1e-4 at 512 -> 2e-4 at 1024 on 16 GPUs, salesforce/ALBEF#39). Warm-up and minimum
    learning rates are not scaled (salesforce/ALBEF#92). ``reference_batch`` None: unchanged."""
    if reference_batch is None:
        return lr
    if reference_batch <= 0 or batch <= 0:
        raise ValueError(f"batch sizes must be positive, got reference {reference_batch}, batch {batch}")
    return lr * batch / reference_batch


class TaskRecipe(Protocol):
    """The schedule fields of a task config (``codis.tasks.base.TaskConfig``)."""

    task: str
    batch_size: int
    epochs: int
    lr: float
    min_lr: float
    warmup_lr: float
    warmup_steps: int
    weight_decay: float
    alpha_warmup: bool


def task_schedule(config: TaskRecipe, train_samples: int, world_size: int = 1, *,
                  grad_accumulation: int = 1, train_changes: Mapping[str, Any] | None = None,
                  optim_changes: Mapping[str, Any] | None = None, steps_scale: float = 1.0,
                  ) -> tuple[TrainConfig, OptimConfig]:
    """The TrainConfig / OptimConfig that finetune a task config on ``train_samples`` examples over
    ``world_size`` processes: ALBEF's task schedule, for every task, from the CLI and the flows.

    An epoch is ``train_samples // (batch_size x world_size x grad_accumulation)`` optimiser steps
    (full batches only); ``epochs`` of them. AdamW with ``weight_decay``; a linear warm-up from
    ``warmup_lr`` to ``lr`` over ``warmup_steps`` (at most one epoch), then a cosine to ``min_lr``;
    alpha ramped over the first epoch when ``alpha_warmup``; a training checkpoint per epoch.
    ``train_changes`` / ``optim_changes`` then replace fields (a recipe's ``train:`` / ``optim:``
    sections; ``steps`` there replaces the length ``epochs`` gives), and ``steps_scale`` scales every
    step count (``scale_schedule``).
    """
    # accumulation set among the changes still makes the epoch
    grad_accumulation = (train_changes or {}).get("grad_accumulation", grad_accumulation)
    for name, value in (("train_samples", train_samples), ("world_size", world_size),
                        ("grad_accumulation", grad_accumulation)):
        check_int(value, name, 1)
    per_epoch = train_samples // (config.batch_size * world_size * grad_accumulation)
    if per_epoch < 1:
        raise ConfigError(f"{config.task}.batch_size: {train_samples} training samples do not fill "
                          f"one batch of {config.batch_size} x {world_size} process(es) x "
                          f"{grad_accumulation} accumulation step(s)")
    train = TrainConfig(steps=config.epochs * per_epoch, batch_size=config.batch_size,
                        grad_accumulation=grad_accumulation,
                        alpha_warmup_steps=per_epoch if config.alpha_warmup else 0,
                        checkpoint_every=per_epoch, log_every=min(50, per_epoch))
    optim = OptimConfig(lr=config.lr, weight_decay=config.weight_decay,
                        warmup_lr=min(config.warmup_lr, config.lr),
                        warmup_steps=min(config.warmup_steps, per_epoch),
                        min_lr=min(config.min_lr, config.lr))
    train, optim = with_changes(train, optim, train_changes, optim_changes)
    return scale_schedule(train, optim, steps_scale)


def with_changes(train: TrainConfig, optim: OptimConfig, train_changes: Mapping[str, Any] | None,
                 optim_changes: Mapping[str, Any] | None) -> tuple[TrainConfig, OptimConfig]:
    """``train`` / ``optim`` with fields replaced; an unknown or invalid field raises ConfigError
    naming it (``train.<field>`` / ``optim.<field>``)."""
    return (_replaced(train, train_changes or {}, "train"), _replaced(optim, optim_changes or {}, "optim"))


def _replaced(config: Any, changes: Mapping[str, Any], section: str) -> Any:
    if not changes:
        return config
    if not isinstance(changes, Mapping):
        raise ConfigError(f"{section}: expected a mapping of fields, got {type(changes).__name__}")
    return from_dict(type(config), {**dataclasses.asdict(config), **changes}, prefix=f"{section}.")
