"""The training engine: ALBEF's optimisation loop, shared by pretraining and every task.

Fused AdamW (no decay on biases and norms, via timm), linear warm-up then cosine decay, the
distillation weight alpha ramped up over the first epoch, gradient accumulation and clipping, bf16
autocast on CUDA, optional ``torch.compile`` (regional or whole-model), DDP under ``torchrun`` (gloo
on CPU, NCCL on GPUs). Checkpoints hold everything needed to continue bit for bit on CPU: students,
teachers, queues, codebook, optimiser, RNG states and the data position. Callers observe progress
through ``callback`` (the flows log it to MLflow; this module imports neither MLflow nor Prefect).

Between a batch's arrival and the optimiser step the loop asks nothing of the device: metrics stay
on it until a logged step, which reads them all in one transfer.
"""

from __future__ import annotations

import os
import random
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from timm.models.vision_transformer import Block
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers.models.bert.modeling_bert import BertLayer

from codis.config import ConfigError
from codis.data.loaders import ShardLoader, ShardLoaderIterator
from codis.files import atomic_torch_save
from codis.model import PretrainOutput
from codis.train.schedules import OptimConfig, TrainConfig, learning_rate
from codis.transforms import normalize_on_device

MetricsCallback = Callable[[int, dict[str, float]], None]
TRAIN_STATE_FORMAT = 2


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


def init_runtime(device: str | torch.device | None = None) -> Runtime:
    """Join the process group that ``torchrun`` describes in the environment (if any) and pick the
    device: ``device`` if given (a bare "cuda" is this rank's GPU), else this rank's GPU if there
    is one, else the CPU. The group uses NCCL on GPUs and gloo on the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Runtime(device=device, rank=rank, world_size=world_size, local_rank=local_rank)


# ---- checkpoints ---------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    # numpy's key array travels as a tensor, so the state file loads with weights_only=True
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng.cpu() for rng in state["cuda"]])


CHECKPOINT_NAME = re.compile(r"step-(\d+)\.pt$")


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The training-state checkpoint with the highest step in ``directory`` (None if there is none)."""
    directory = Path(directory)
    found = [(int(m.group(1)), p) for p in directory.glob("step-*.pt")
             if (m := CHECKPOINT_NAME.search(p.name))]
    return max(found)[1] if found else None


def save_train_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                     position: dict[str, int], run_config: dict[str, Any], runtime: Runtime) -> None:
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
               "world_size": runtime.world_size, "config": run_config, "model": model.state_dict(),
               "optimizer": optimizer.state_dict(), "rng": rng}
    atomic_torch_save(payload, path)


def _prune_checkpoints(directory: Path, keep: int) -> None:
    found = sorted((int(m.group(1)), p) for p in directory.glob("step-*.pt")
                   if (m := CHECKPOINT_NAME.search(p.name)))
    for _, path in found[:-keep]:
        path.unlink(missing_ok=True)


# ---- the loop ------------------------------------------------------------------------------------
class EpochBatches:
    """Endless batches over epochs, remembering where they are so that a resumed run continues
    with exactly the next batch. ``open_epoch(epoch)`` builds the loader of one epoch (seeded by
    the epoch). A :class:`~codis.data.loaders.ShardLoader` resumes from each rank's stream position
    (``streams``), dropping the samples it had consumed before decoding them; another loader, or a
    position saved without streams (older checkpoints), replays the epoch's first ``batch``
    batches. Under DDP every rank moves to the next epoch as soon as any rank runs out, so no rank
    waits for a gradient that never comes."""

    def __init__(self, open_epoch: Callable[[int], Any], runtime: Runtime, epoch: int = 0,
                 batch: int = 0, streams: list[dict[str, Any]] | None = None) -> None:
        self.open_epoch, self.runtime = open_epoch, runtime
        self.epoch, self.batch = epoch, batch
        stream = streams[runtime.rank] if streams and len(streams) == runtime.world_size else None
        self._iterator = self._open(skip=batch, stream=stream)

    def _open(self, skip: int, stream: dict[str, Any] | None = None) -> Iterator[dict]:
        loader = self.open_epoch(self.epoch)
        if stream is not None and isinstance(loader, ShardLoader):
            return loader.resume(stream)
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
        raise RuntimeError("an epoch yielded no full batch on some rank: use fewer processes, "
                           "a smaller batch or more data")

    def position(self) -> dict[str, Any]:
        """The position to save: epoch, batch and, where the loader keeps one, every rank's stream
        position (gathered to every rank: under DDP, call it on all ranks at once)."""
        position: dict[str, Any] = {"epoch": self.epoch, "batch": self.batch}
        stream = (self._iterator.position if isinstance(self._iterator, ShardLoaderIterator)
                  else None)
        if stream is not None:
            streams: list[Any] = [stream]
            if self.runtime.world_size > 1:
                streams = [None] * self.runtime.world_size
                dist.all_gather_object(streams, stream)
            position["streams"] = streams
        return position


StepLoss = Callable[[torch.nn.Module, dict, int], PretrainOutput]


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, timm's grouping: no weight decay for biases and tensors
    of fewer than two dimensions, except the 0-d parameters a module lists in ``decayed_scalars()``
    (ALBEF's grouping decays its raw temperature, see :meth:`codis.model.CodisModel.decayed_scalars`).

    Fused (one kernel over every tensor) where all parameters are on the CPU or CUDA: on CUDA it
    replaces the ~850 ops of foreach AdamW at the ``base`` shape; on the CPU, for ``tiny`` (400K
    parameters in 116 tensors), a step took 1.1 ms against 7.4 ms foreach (one thread; 26 vs 68 ms
    on the loaded 2-core machine), with weights within 1.5e-8 of the single-tensor AdamW."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = bool(trainable) and all(p.device.type in ("cpu", "cuda") for p in trainable)
    decayed = {id(p) for module in model.modules() if hasattr(module, "decayed_scalars")
               for p in module.decayed_scalars() if p.requires_grad}
    vision = ({id(p) for name, p in model.named_parameters() if _in_image_encoder(name)}
              if optim.vision_lr_scale != 1.0 else set())
    if not decayed and not vision:
        return create_optimizer_v2(model, "adamw", lr=optim.lr, weight_decay=optim.weight_decay,
                                   fused=fused)

    def groups(module: torch.nn.Module) -> list[dict[str, Any]]:
        grouped = param_groups_weight_decay(module, weight_decay=optim.weight_decay)
        for group in grouped:
            group["params"] = [p for p in group["params"] if id(p) not in decayed]
        grouped.append({"params": [p for p in module.parameters() if id(p) in decayed],
                        "weight_decay": optim.weight_decay})
        split = []  # each group once outside and once inside the image encoder
        for group in grouped:
            for in_vision in (False, True):
                params = [p for p in group["params"] if (id(p) in vision) == in_vision]
                scale = {"lr_scale": optim.vision_lr_scale} if in_vision else {}
                split.append({**group, "params": params, **scale})
        return [group for group in split if group["params"]]

    return create_optimizer_v2(model, "adamw", lr=optim.lr, weight_decay=optim.weight_decay,
                               param_group_fn=groups, fused=fused)


def _in_image_encoder(name: str) -> bool:
    return "visual_encoder" in name.split(".")


# The layers a model repeats: timm's ViT block and the BERT layer (text encoder, fusion encoder,
# and the task models' answer decoder and NLVR merge layers), in students and teachers alike.
COMPILED_REGIONS = (Block, BertLayer)


def compile_regions(model: torch.nn.Module) -> int:
    """``.compile()`` every layer of a :data:`COMPILED_REGIONS` type inside ``model``; returns how
    many. Each layer is a graph without breaks; the data-dependent code between layers (queues,
    OT, MLM masking) stays eager. The layers stay compiled after :func:`fit` returns; parameter
    names do not change, so checkpoints are those of an eager run."""
    regions = [module for module in model.modules() if isinstance(module, COMPILED_REGIONS)]
    for region in regions:
        region.compile()
    return len(regions)


def fit(model: torch.nn.Module, step_loss: StepLoss, open_epoch: Callable[[int], Any], *,
        run_config: dict[str, Any], train: TrainConfig, optim: OptimConfig, output_dir: str | Path,
        runtime: Runtime, callback: MetricsCallback | None = None, progress: bool = True,
        resume: bool = True, stop_after: int | None = None, desc: str = "train",
        skipped: Callable[[], int] = lambda: 0) -> int:
    """The optimisation loop shared by pretraining and every finetuning task.

    ``step_loss(model, batch, step)`` returns an object with ``loss`` and ``parts`` (the model is
    the DDP / compiled wrapper when there is one). Resumes from the latest
    ``output_dir/checkpoints/step-*.pt`` (written by a run of the same ``run_config`` and world
    size), saves every ``train.checkpoint_every`` steps and at the end. Returns the number of
    steps done.

    Every ``train.log_every`` steps and at the last one, ``callback(step, metrics)`` (main rank
    only) gets that step's loss and parts averaged over its micro-batches, ``grad_norm`` (before
    clipping, when clipping), ``lr``, ``skipped_samples`` and ``samples_per_s``, as floats.
    """
    checkpoints = Path(output_dir) / "checkpoints"
    optimizer = build_optimizer(model, optim)
    step, position, rng = 0, {"epoch": 0, "batch": 0}, None
    state_path = latest_checkpoint(checkpoints) if resume else None
    if state_path is not None:
        state = torch.load(state_path, map_location=runtime.device, weights_only=True)
        _check_resumable(state, run_config, state_path, runtime.world_size)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, position, rng = state["step"], state["position"], state["rng"]
    # Data first (skipping consumed batches may draw from the RNG), then the saved RNG states.
    batches = EpochBatches(open_epoch, runtime, **position)
    if rng is not None:
        _set_rng_state(rng[runtime.rank] if len(rng) == runtime.world_size else rng[0])

    if train.compile == "regional":
        compile_regions(model)
    trained = model
    if runtime.world_size > 1:
        # Buffers are not broadcast: the queues are filled identically on every rank by all-gather.
        # Gradients live in the all-reduce buckets (no second copy). The graph is static (every
        # trainable parameter gets a gradient at every step), but DDP's static graph fails on a
        # first backward inside no_sync, so it is declared only without accumulation
        # (pytorch/pytorch#143580: an internal assert in torch 2.13).
        trained = DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
            broadcast_buffers=False, gradient_as_bucket_view=True,
            static_graph=train.grad_accumulation == 1)
    if train.compile == "full":
        trained = torch.compile(trained)
    precision = autocast(train.precision, runtime.device)
    parameters = [p for p in model.parameters() if p.requires_grad]

    bar = tqdm(total=train.steps, initial=step, disable=not (progress and runtime.is_main),
               desc=desc, unit="step", dynamic_ncols=True)
    started, samples = time.perf_counter(), 0
    end = train.steps if stop_after is None else min(train.steps, step + stop_after)
    model.train()
    while step < end:
        lr = learning_rate(step, train.steps, optim)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        optimizer.zero_grad(set_to_none=True)
        logged = runtime.is_main and ((step + 1) % train.log_every == 0 or step + 1 == end)
        totals: dict[str, torch.Tensor] = {}  # on the device, read once when logged
        for micro in range(train.grad_accumulation):
            batch = _to_device(batches.next(), runtime.device)
            sync = micro == train.grad_accumulation - 1 or runtime.world_size == 1
            with (nullcontext() if sync else trained.no_sync()), precision:
                output = step_loss(trained, batch, step)
                (output.loss / train.grad_accumulation).backward()
            if logged:
                _accumulate(totals, {"loss": output.loss, **output.parts},
                            train.grad_accumulation, runtime.device)
            samples += _batch_size(batch) * runtime.world_size
        if train.clip_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, train.clip_grad_norm)
            if logged:
                totals["grad_norm"] = grad_norm.detach().double()
        optimizer.step()
        step += 1
        if logged:
            metrics = _read(totals)
            metrics.update(lr=lr, skipped_samples=float(skipped()),
                           samples_per_s=samples / max(time.perf_counter() - started, 1e-9))
            if callback is not None:
                callback(step, dict(metrics))
            bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss", "ica", "itm", "mlm", "code")
                             if k in metrics} | {"samples/s": f"{metrics['samples_per_s']:.0f}"})
        bar.update(1)
        if step % train.checkpoint_every == 0 or step == end:
            save_train_state(checkpoints / f"step-{step:08d}.pt", model, optimizer, step,
                             batches.position(), run_config, runtime)
            if runtime.is_main:
                _prune_checkpoints(checkpoints, train.keep_checkpoints)
    bar.close()
    return step


def _accumulate(totals: dict[str, torch.Tensor], values: dict[str, Any], micro_steps: int,
                device: torch.device) -> None:
    """Add ``values / micro_steps`` to ``totals`` on ``device`` without reading them. In float64,
    as the host sum of ``float(value) / micro_steps`` it replaces, so the logged numbers are the
    same. A CPU part of a CUDA step (a Python number made a tensor) is copied without waiting."""
    for name, value in values.items():
        value = torch.as_tensor(value, dtype=torch.float64).detach().to(device, non_blocking=True)
        share = value.reshape(()) / micro_steps
        totals[name] = totals[name] + share if name in totals else share


def _read(totals: dict[str, torch.Tensor]) -> dict[str, float]:
    """The totals as floats, in one device-to-host transfer (one sync)."""
    return dict(zip(totals, torch.stack(list(totals.values())).tolist())) if totals else {}


# The batch keys that hold images (one per sample; NLVR's two per sample): uint8 ones are made
# floats and normalised after the copy, on the device.
IMAGE_KEYS = ("image", "images", "image0", "image1")


def _to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on ``device``. A uint8 image batch travels as bytes (a quarter of
    float32) and becomes normalised floats on the device (:func:`codis.transforms.normalize_on_device`).
    On CUDA the copy is from pinned memory, so it does not hold the host up."""
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            if device.type == "cuda" and value.device.type == "cpu" and not value.is_pinned():
                value = value.pin_memory()
            value = value.to(device, non_blocking=True)
            if key in IMAGE_KEYS and value.dtype == torch.uint8:
                value = normalize_on_device(value)
        moved[key] = value
    return moved


def _batch_size(batch: dict) -> int:
    return next(len(v) for v in batch.values() if isinstance(v, (torch.Tensor, list)))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


_RESUMABLE_CHANGES = {"steps", "checkpoint_every", "keep_checkpoints", "log_every", "compile"}


def _check_resumable(state: dict, run_config: dict[str, Any], path: Path, world_size: int) -> None:
    """A checkpoint may only be continued by the run that wrote it, in as many processes (each
    rank's data split and RNG state depend on the world size). The total steps, the checkpoint /
    logging cadence and how the model is compiled may change. States written before the world
    size was saved are accepted at any world size."""
    if state.get("format") != TRAIN_STATE_FORMAT:
        raise ValueError(f"{path}: unknown training-state format {state.get('format')!r}")
    saved_world = state.get("world_size", world_size)
    if saved_world != world_size:
        raise ConfigError(f"{path}: written by a run of world size {saved_world} (processes); "
                          f"this one has world size {world_size}: resume with {saved_world} "
                          f"processes or start a new output_dir")
    saved = state["config"]
    for section in sorted(set(saved) | set(run_config)):
        a, b = saved.get(section), run_config.get(section)
        if section == "train" and isinstance(a, dict) and isinstance(b, dict):
            a = {k: v for k, v in a.items() if k not in _RESUMABLE_CHANGES}
            b = {k: v for k, v in b.items() if k not in _RESUMABLE_CHANGES}
        if a != b:
            raise ConfigError(f"{path}: written by a run with a different `{section}` section; "
                              f"resume with the same run config or start a new output_dir")


def autocast(precision: str, device: torch.device):
    """bf16 autocast for ``precision`` "bf16", or "auto" on CUDA; no autocast otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
