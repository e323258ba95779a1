"""Pretraining: a :class:`PretrainConfig` (``run.yaml``) run through :func:`codis.train.engine.fit`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from codis.config import ConfigError, ModelConfig, from_dict, merge_dicts, preset
from codis.data.loaders import SkipCounter, pretrain_loader, shard_urls
from codis.files import atomic_write_text
from codis.model import CodisModel, save_model
from codis.train.engine import MetricsCallback, fit, init_runtime, seed_everything
from codis.train.schedules import OptimConfig, TrainConfig, distillation_alpha


@dataclass(frozen=True)
class DataConfig:
    """Pretraining shards: folders written by the shard or download stage, files, or brace patterns.

    ``hflip``: ALBEF flips images at random; a dataset whose captions say "left" and "right" (the
    demo world) should not. ``crop_min_scale``: the smallest random crop (ALBEF 0.2); captions that
    describe every object and its position want crops that keep them. ``resample`` draws shards
    with replacement (an endless stream, for multi-node runs whose ranks must never run dry at
    different times)."""

    shards: tuple[str, ...] = ()
    num_workers: int = 2
    shuffle_buffer: int = 1000
    hflip: bool = True
    crop_min_scale: float = 0.2
    resample: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.crop_min_scale, (int, float)) or not 0.0 < self.crop_min_scale <= 1.0:
            raise ConfigError(f"data.crop_min_scale: must be in (0, 1], got {self.crop_min_scale!r}")
        if not self.shards:
            raise ConfigError("data.shards: at least one shard folder, file or pattern is needed")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ConfigError(f"data.num_workers: must be an integer >= 0, got {self.num_workers!r}")


@dataclass(frozen=True)
class PretrainConfig:
    """A whole pretraining run, as written to ``run.yaml`` and read by ``codis pretrain --config``."""

    output_dir: str
    data: DataConfig
    model: ModelConfig = field(default_factory=lambda: preset("tiny"))
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PretrainConfig":
        """Also accepts ``model: {preset: tiny, mode: albef, ...}``: a preset with top-level changes."""
        data = dict(data)
        model = data.get("model")
        if isinstance(model, dict) and "preset" in model:
            changes = {k: v for k, v in model.items() if k != "preset"}
            base = preset(model["preset"]).to_dict()
            data["model"] = merge_dicts(base, changes)
        return from_dict(cls, data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PretrainConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no run config at {path}")
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        try:
            return cls.from_dict(data)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from error


def pretrain(config: PretrainConfig, *, resume: bool = True, callback: MetricsCallback | None = None,
             progress: bool = True, stop_after: int | None = None) -> Path:
    """Run (or continue) pretraining; returns the final model checkpoint (``model.pt``).

    With ``resume`` the latest ``checkpoints/step-*.pt`` under ``output_dir`` is continued and
    the result equals an uninterrupted run. ``stop_after`` ends this call after that many steps
    (a resumable slice; the tests use it)."""
    runtime = init_runtime()
    run_dir = Path(config.output_dir)
    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "run.yaml")
    seed_everything(config.train.seed + runtime.rank)
    model = CodisModel(config.model).to(runtime.device)
    urls = shard_urls(list(config.data.shards) if len(config.data.shards) > 1
                      else config.data.shards[0], ("pretrain", "retrieval_train"))
    skips = SkipCounter()

    def open_epoch(epoch: int):
        data, model_config = config.data, config.model
        return pretrain_loader(
            urls, tokenizer=model.tokenizer, image_size=model_config.vision.image_size,
            batch_size=config.train.batch_size, max_length=model_config.text.max_length,
            num_workers=data.num_workers, resample=data.resample, seed=config.train.seed,
            shuffle_buffer=data.shuffle_buffer, hflip=data.hflip,
            crop_min_scale=data.crop_min_scale, epoch=epoch, skips=skips,
            mlm_probability=model_config.mlm_probability)

    def step_loss(trained: torch.nn.Module, batch: dict, step: int):
        alpha = distillation_alpha(step, config.model.alpha, config.train.alpha_warmup_steps)
        # The MLM masks come with the batch, drawn by the loader (no host sync in the step)
        output = trained(batch["image"], batch["input_ids"], batch["attention_mask"], alpha=alpha,
                         hard_negatives=step >= config.train.itm_uniform_negative_steps,
                         mlm_inputs=(batch["mlm_ids"], batch["mlm_labels"],
                                     batch["mlm_positions"]))
        output.parts.update(alpha=torch.tensor(alpha), temperature=model.temperature.detach())
        return output

    step = fit(model, step_loss, open_epoch, run_config=config.to_dict(), train=config.train,
               optim=config.optim, output_dir=run_dir, runtime=runtime, callback=callback,
               progress=progress, resume=resume, stop_after=stop_after, desc="pretrain",
               skipped=lambda: skips.count)
    final = run_dir / "model.pt"
    if runtime.is_main and step >= config.train.steps:
        save_model(model, final, extra={"step": step, "run": config.to_dict()})
    if runtime.world_size > 1:
        dist.barrier()
    return final
