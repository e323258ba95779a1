"""The pretraining engine: ALBEF's optimisation recipe around :class:`codis.model.CodisModel`.

AdamW (no decay on biases and norms, via timm), linear warm-up then cosine decay, the distillation
weight alpha ramped up over the first epoch, gradient accumulation and clipping, bf16 autocast on
CUDA, optional ``torch.compile``, DDP under ``torchrun`` (gloo on CPU, NCCL on GPUs). Checkpoints
hold everything needed to continue bit for bit on CPU: students, teachers, queues, codebook,
optimiser, RNG states and the data position. Callers observe progress through ``callback``
(the flows log it to MLflow; this module imports neither MLflow nor Prefect).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch
import torch.distributed as dist
import yaml
from timm.optim import create_optimizer_v2
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from codis.config import ConfigError, ModelConfig, from_dict, preset
from codis.loaders import SkipCounter, pretrain_loader, shard_urls
from codis.model import CodisModel, save_model

MetricsCallback = Callable[[int, dict[str, float]], None]
TRAIN_STATE_FORMAT = 1


@dataclass(frozen=True)
class OptimConfig:
    """ALBEF's pretraining optimiser: AdamW lr 1e-4, weight decay 0.02, warm-up from 1e-5 over the
    first 2,000 steps (its 20 warm-up "epochs" of 100 steps), cosine decay to 1e-5."""

    lr: float = 1e-4
    weight_decay: float = 0.02
    warmup_lr: float = 1e-5
    warmup_steps: int = 2000
    min_lr: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("lr", "warmup_lr", "min_lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"optim.{name}: must be a positive number, got {value!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay: must be >= 0, got {self.weight_decay}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps: must be an integer >= 0, got {self.warmup_steps!r}")


@dataclass(frozen=True)
class DataConfig:
    """Pretraining shards: folders written by the shard or download stage, files, or brace patterns.

    ``hflip``: ALBEF flips images at random; a dataset whose captions say "left" and "right" (the
    demo world) should not. ``resample`` draws shards with replacement (an endless stream, for
    multi-node runs whose ranks must never run dry at different times)."""

    shards: tuple[str, ...] = ()
    num_workers: int = 2
    shuffle_buffer: int = 1000
    hflip: bool = True
    resample: bool = False

    def __post_init__(self) -> None:
        if not self.shards:
            raise ConfigError("data.shards: at least one shard folder, file or pattern is needed")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ConfigError(f"data.num_workers: must be an integer >= 0, got {self.num_workers!r}")


@dataclass(frozen=True)
class TrainConfig:
    """``batch_size`` is per process and micro-batch; the global batch is batch_size x
    grad_accumulation x world size. ``alpha_warmup_steps``: ALBEF ramps alpha over one epoch."""

    steps: int = 1000
    batch_size: int = 64
    grad_accumulation: int = 1
    alpha_warmup_steps: int = 1000
    clip_grad_norm: float = 0.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    seed: int = 42
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accumulation", "checkpoint_every",
                     "keep_checkpoints", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"train.{name}: must be an integer >= 1, got {value!r}")
        if not isinstance(self.alpha_warmup_steps, int) or self.alpha_warmup_steps < 0:
            raise ConfigError(f"train.alpha_warmup_steps: must be an integer >= 0, "
                              f"got {self.alpha_warmup_steps!r}")
        if self.clip_grad_norm < 0:
            raise ConfigError(f"train.clip_grad_norm: must be >= 0 (0 = off), got {self.clip_grad_norm}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision: must be auto, fp32 or bf16, got {self.precision!r}")


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
            data["model"] = _merge(base, changes)
        return from_dict(cls, data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        _atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
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


def _merge(base: dict, changes: dict) -> dict:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# ---- schedules -----------------------------------------------------------------------------------
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


# ---- distributed set-up --------------------------------------------------------------------------
@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime() -> Runtime:
    """Join the process group that ``torchrun`` describes in the environment (if any) and pick the
    device: this rank's GPU under NCCL, else the CPU under gloo."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Runtime(device=device, rank=rank, world_size=world_size, local_rank=local_rank)


# ---- checkpoints ---------------------------------------------------------------------------------
def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(text)
    os.replace(temporary, path)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CHECKPOINT_NAME = re.compile(r"step-(\d+)\.pt$")


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The training-state checkpoint with the highest step in ``directory`` (None if there is none)."""
    directory = Path(directory)
    found = [(int(m.group(1)), p) for p in directory.glob("step-*.pt")
             if (m := CHECKPOINT_NAME.search(p.name))]
    return max(found)[1] if found else None


def save_train_state(path: Path, model: CodisModel, optimizer: torch.optim.Optimizer, step: int,
                     position: dict[str, int], config: PretrainConfig, runtime: Runtime) -> None:
    """Everything needed to continue: weights (students, teachers, queues, codebook), optimiser,
    step, data position, and every rank's RNG states (gathered to rank 0)."""
    rng = _rng_state()
    if runtime.world_size > 1:
        states: list[Any] = [None] * runtime.world_size
        dist.all_gather_object(states, rng)
        rng = states
    else:
        rng = [rng]
    if not runtime.is_main:
        return
    payload = {"format": TRAIN_STATE_FORMAT, "step": step, "position": position,
               "config": config.to_dict(), "model": model.state_dict(),
               "optimizer": optimizer.state_dict(), "rng": rng}
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _prune_checkpoints(directory: Path, keep: int) -> None:
    found = sorted((int(m.group(1)), p) for p in directory.glob("step-*.pt")
                   if (m := CHECKPOINT_NAME.search(p.name)))
    for _, path in found[:-keep]:
        path.unlink(missing_ok=True)


# ---- the loop ------------------------------------------------------------------------------------
class _Batches:
    """Endless batches over epochs of the pretraining shards, remembering (epoch, batch) so that
    a resumed run continues with exactly the next batch. Under DDP every rank moves to the next
    epoch as soon as any rank runs out, so no rank waits for a gradient that never comes."""

    def __init__(self, config: PretrainConfig, tokenizer, runtime: Runtime, epoch: int = 0,
                 batch: int = 0) -> None:
        self.config, self.tokenizer, self.runtime = config, tokenizer, runtime
        self.urls = shard_urls(list(config.data.shards) if len(config.data.shards) > 1
                               else config.data.shards[0], ("pretrain", "retrieval_train"))
        self.skips = SkipCounter()
        self.epoch, self.batch = epoch, batch
        self._iterator = self._open(skip=batch)

    def _open(self, skip: int) -> Iterator[dict]:
        data, model = self.config.data, self.config.model
        loader = pretrain_loader(
            self.urls, tokenizer=self.tokenizer, image_size=model.vision.image_size,
            batch_size=self.config.train.batch_size, max_length=model.text.max_length,
            num_workers=data.num_workers, resample=data.resample, seed=self.config.train.seed,
            shuffle_buffer=data.shuffle_buffer, hflip=data.hflip, epoch=self.epoch,
            skips=self.skips)
        iterator = iter(loader)
        for _ in range(skip):
            next(iterator)
        return iterator

    def _everyone_has(self, has_batch: bool) -> bool:
        if self.runtime.world_size == 1:
            return has_batch
        flag = torch.tensor([1.0 if has_batch else 0.0], device=self.runtime.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def next(self) -> dict:
        for _ in range(2):
            batch = next(self._iterator, None)
            if self._everyone_has(batch is not None):
                self.batch += 1
                return batch
            self.epoch, self.batch = self.epoch + 1, 0
            self._iterator = self._open(skip=0)
        raise RuntimeError(f"data.shards: an epoch yielded no full batch of "
                           f"{self.config.train.batch_size} on some rank; use fewer processes, a "
                           f"smaller batch or more data")

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}


def pretrain(config: PretrainConfig, *, resume: bool = True, callback: MetricsCallback | None = None,
             progress: bool = True, stop_after: int | None = None) -> Path:
    """Run (or continue) pretraining; returns the final model checkpoint (``model.pt``).

    With ``resume`` the latest ``checkpoints/step-*.pt`` under ``output_dir`` is continued and
    the result equals an uninterrupted run. ``stop_after`` ends the run early after that many
    steps of this call (the flows' "run a slice" option and the tests use it)."""
    runtime = init_runtime()
    run_dir = Path(config.output_dir)
    checkpoints = run_dir / "checkpoints"
    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "run.yaml")
    train = config.train

    torch.manual_seed(train.seed + runtime.rank)
    random.seed(train.seed + runtime.rank)
    np.random.seed(train.seed + runtime.rank)
    model = CodisModel(config.model).to(runtime.device)
    optimizer = create_optimizer_v2(model, "adamw", lr=config.optim.lr,
                                    weight_decay=config.optim.weight_decay)
    step, position, rng = 0, {"epoch": 0, "batch": 0}, None
    state_path = latest_checkpoint(checkpoints) if resume else None
    if state_path is not None:
        state = torch.load(state_path, map_location=runtime.device, weights_only=False)
        _check_resumable(state, config, state_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, position, rng = state["step"], state["position"], state["rng"]
    # Data first (skipping consumed batches draws from the RNG), then the saved RNG states.
    batches = _Batches(config, model.tokenizer, runtime, **position)
    if rng is not None:
        _set_rng_state(rng[runtime.rank] if len(rng) == runtime.world_size else rng[0])

    trained = model
    if runtime.world_size > 1:
        trained = DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
            broadcast_buffers=False)  # queues are filled identically on every rank by all-gather
    if train.compile:
        trained = torch.compile(trained)
    autocast = _autocast(train.precision, runtime.device)
    parameters = [p for p in model.parameters() if p.requires_grad]

    bar = tqdm(total=train.steps, initial=step, disable=not (progress and runtime.is_main),
               desc="pretrain", unit="step", dynamic_ncols=True)
    started, samples, last_parts = time.perf_counter(), 0, {}
    end = train.steps if stop_after is None else min(train.steps, step + stop_after)
    model.train()
    while step < end:
        lr = learning_rate(step, train.steps, config.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        alpha = distillation_alpha(step, config.model.alpha, train.alpha_warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        parts_sum: dict[str, float] = {}
        for micro in range(train.grad_accumulation):
            batch = batches.next()
            images = batch["image"].to(runtime.device, non_blocking=True)
            ids = batch["input_ids"].to(runtime.device)
            mask = batch["attention_mask"].to(runtime.device)
            sync = (micro == train.grad_accumulation - 1 or runtime.world_size == 1)
            with (nullcontext() if sync else trained.no_sync()), autocast:
                output = trained(images, ids, mask, alpha=alpha)
                (output.loss / train.grad_accumulation).backward()
            for name, value in [("loss", output.loss.detach()), *output.parts.items()]:
                parts_sum[name] = parts_sum.get(name, 0.0) + float(value) / train.grad_accumulation
            samples += images.shape[0] * runtime.world_size
        if train.clip_grad_norm > 0:
            parts_sum["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(parameters,
                                                                          train.clip_grad_norm))
        optimizer.step()
        step += 1
        last_parts = {**parts_sum, "lr": lr, "alpha": alpha, "temperature": float(model.temp.detach()),
                      "skipped_samples": float(batches.skips.count)}
        if step % train.log_every == 0 or step == end:
            elapsed = time.perf_counter() - started
            last_parts["samples_per_s"] = samples / max(elapsed, 1e-9)
            if callback is not None and runtime.is_main:
                callback(step, dict(last_parts))
            bar.set_postfix({k: f"{last_parts[k]:.3g}" for k in ("loss", "ica", "itm", "mlm", "code")
                             if k in last_parts} | {"samples/s": f"{last_parts['samples_per_s']:.0f}"})
        bar.update(1)
        if step % train.checkpoint_every == 0 or step == end:
            save_train_state(checkpoints / f"step-{step:08d}.pt", model, optimizer, step,
                             batches.position, config, runtime)
            if runtime.is_main:
                _prune_checkpoints(checkpoints, train.keep_checkpoints)
    bar.close()
    final = run_dir / "model.pt"
    if runtime.is_main and step >= train.steps:
        save_model(model, final, extra={"step": step, "metrics": last_parts})
        _atomic_write_text(run_dir / "metrics.json", json.dumps({"step": step, **last_parts}, indent=2))
    if runtime.world_size > 1:
        dist.barrier()
    return final


def _check_resumable(state: dict, config: PretrainConfig, path: Path) -> None:
    if state.get("format") != TRAIN_STATE_FORMAT:
        raise ValueError(f"{path}: unknown training-state format {state.get('format')!r}")
    saved = PretrainConfig.from_dict(state["config"])
    for name in ("model", "data", "optim"):
        if getattr(saved, name) != getattr(config, name):
            raise ConfigError(f"{path}: written by a run with a different `{name}` section; "
                              f"resume with the same run config or start a new output_dir")
    changed = [f.name for f in dataclasses.fields(TrainConfig)
               if f.name not in ("steps", "checkpoint_every", "keep_checkpoints", "log_every")
               and getattr(saved.train, f.name) != getattr(config.train, f.name)]
    if changed:
        raise ConfigError(f"{path}: train.{changed[0]} differs from the interrupted run's")


def _autocast(precision: str, device: torch.device):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
