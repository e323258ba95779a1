"""The config every downstream task shares: ALBEF's task YAMLs, typed.

ALBEF gives every task YAML the same keys (``image_res``, ``batch_size_train``, ``alpha``,
``distill``, ``warm_up``, ``optimizer``, ``schedular``); :class:`TaskConfig` holds them once, each
task module derives its config from it and adds only what is its own (retrieval's ``k_test``,
VQA's answer length, NLVR²'s text-assignment step). The schedule a config trains with is
:func:`codis.train.schedules.task_schedule`: the same function for every task, from the CLI and
from the flows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping, TypeVar

from transformers import PreTrainedTokenizerBase

from codis.config import (ConfigError, ModelConfig, check_bool, check_choice, check_int, check_number,
                          check_positive, from_dict)
from codis.data.loaders import ExampleCache, ShardLoader, SkipCounter, task_loader
from codis.train import TrainConfig

Config = TypeVar("Config", bound="TaskConfig")


@dataclass(frozen=True)
class TaskConfig:
    """A task's finetuning recipe (defaults: ALBEF's SNLI-VE.yaml, the plainest of its tasks).

    ``image_size``: the finetuning resolution (the ViT's position embeddings are resampled; ALBEF
    pretrains at 256 and finetunes at 384); None keeps the pretrained model's. ``batch_size`` is per
    process. The schedule is ``epochs`` passes over the training set: AdamW (``weight_decay``), a
    linear warm-up from ``warmup_lr`` over ``warmup_steps`` (at most one epoch), then a cosine from
    ``lr`` to ``min_lr``. ``distill``: momentum distillation with weight ``alpha`` against an EMA
    teacher of momentum ``momentum``; ``alpha_warmup`` (ALBEF's ``warm_up``) ramps alpha from 0 over
    the first epoch. ``hflip``: random horizontal flips (off for data whose text says left and
    right); ``augment``: ALBEF's random crops and RandAugment (false: the evaluation transform,
    and with ``num_workers`` 0 each training image is decoded once per run, not once per epoch).
    ``max_words``: ALBEF's ``pre_caption`` cut of the text. ``max_length``: the token limit of the
    task's texts ([CLS] included), at training and evaluation; None uses the pretrained model's
    ``text.max_length`` (see :meth:`text_max_length`). ``num_workers``: data-loading processes;
    ``shuffle_buffer``: samples shuffled in memory while finetuning. ``eval_precision``: autocast
    of the evaluation ("auto": bf16 on GPUs, fp32 on the CPU as ALBEF evaluates).
    """

    image_size: int | None = 384
    batch_size: int = 32
    epochs: int = 5
    lr: float = 2e-5
    min_lr: float = 1e-6
    warmup_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.02
    distill: bool = True
    alpha: float = 0.4
    alpha_warmup: bool = False
    momentum: float = 0.995
    hflip: bool = True
    augment: bool = True
    max_words: int = 30
    max_length: int | None = None
    num_workers: int = 2
    shuffle_buffer: int = 1000
    eval_precision: Literal["auto", "fp32", "bf16"] = "auto"

    task: ClassVar[str] = "task"

    def __post_init__(self) -> None:
        if self.image_size is not None:
            self.check_int("image_size", 1)
        for name in ("batch_size", "epochs", "max_words"):
            self.check_int(name, 1)
        if self.max_length is not None:  # [CLS], [SEP] and a word
            self.check_int("max_length", 3)
        for name in ("warmup_steps", "num_workers", "shuffle_buffer"):
            self.check_int(name, 0)
        for name in ("lr", "min_lr", "warmup_lr"):
            check_positive(getattr(self, name), self.field_name(name))
        check_number(self.weight_decay, self.field_name("weight_decay"), 0.0)
        check_number(self.alpha, self.field_name("alpha"), 0.0, 1.0)
        if self.momentum is not None:  # None: a task that keeps the pretrained model's
            check_number(self.momentum, self.field_name("momentum"), 0.0, 1.0, high_open=True)
        for name in ("distill", "alpha_warmup", "hflip", "augment"):
            check_bool(getattr(self, name), self.field_name(name))
        check_choice(self.eval_precision, self.field_name("eval_precision"), ("auto", "fp32", "bf16"))

    def text_max_length(self, model_config: ModelConfig) -> int:
        """The token limit the task's texts are cut at: ``max_length``, else the model's."""
        return model_config.text.max_length if self.max_length is None else self.max_length

    def field_name(self, name: str) -> str:
        """``<task>.<field>``, as errors name a field."""
        return f"{self.task}.{name}"

    def check_int(self, name: str, minimum: int) -> None:
        check_int(getattr(self, name), self.field_name(name), minimum)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[Config], data: Mapping[str, Any]) -> Config:
        """Build from a mapping (a checkpoint's, a YAML file's); unknown keys name themselves."""
        return from_dict(cls, dict(data), prefix=f"{cls.task}.")

    def replace(self: Config, **changes: Any) -> Config:
        """A copy with ``changes``; an unknown field raises ConfigError naming it."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"{self.field_name(unknown[0])}: unknown field of {type(self).__name__} "
                              f"(known: {', '.join(f.name for f in dataclasses.fields(self))})")
        return dataclasses.replace(self, **changes)


def check_config(config: Any, config_type: type[TaskConfig]) -> None:
    """A task function was given its own task's config: else ConfigError ``<task>.config: ...``."""
    if not isinstance(config, config_type):
        raise ConfigError(f"{config_type.task}.config: expected a {config_type.__name__}, "
                          f"got {type(config).__name__}")


def preset_config(presets: Mapping[str, Config], task: str, name: str, changes: Mapping[str, Any],
                  ) -> Config:
    """``presets[name]`` with ``changes``; an unknown preset or field raises ConfigError naming it."""
    if name not in presets:
        raise ConfigError(f"{task}.preset: unknown preset {name!r} (known: {', '.join(presets)})")
    return presets[name].replace(**changes) if changes else presets[name]


def training_loader(urls: list[str], kind: str, config: TaskConfig, train: TrainConfig, *,
                    tokenizer: PreTrainedTokenizerBase, image_size: int, max_length: int,
                    epoch: int, skips: SkipCounter, cache: ExampleCache) -> ShardLoader:
    """One epoch of a task's training shards, read as its config says: ALBEF's training transform
    (``hflip``, ``augment``), ``max_words``, ``num_workers``, a ``shuffle_buffer`` shuffle seeded
    by the schedule's seed and the epoch, full batches of ``train.batch_size``. ``skips`` and
    ``cache`` are the run's, shared by its epochs (the cache serves only a loader without
    ``augment`` that reads in the training process: see :class:`ExampleCache`)."""
    return task_loader(urls, kind, train=True, tokenizer=tokenizer, image_size=image_size,
                       batch_size=train.batch_size, max_words=config.max_words,
                       max_length=max_length, num_workers=config.num_workers, seed=train.seed,
                       epoch=epoch, shuffle_buffer=config.shuffle_buffer, hflip=config.hflip,
                       augment=config.augment, skips=skips, cache=cache)
