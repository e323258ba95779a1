"""Supervised initialisation of the image encoder: the stand-in for DeiT's ImageNet weights.

ALBEF and CODIS start their ViT from DeiT, trained on ImageNet-1k labels; the ``base`` preset
loads those weights from the hub (``vision.pretrained``). Where no hub can be reached (the demo)
the same role is played by a ViT trained here on a labelled image set of the same world, and the
weights file it writes is what ``vision.pretrained`` then names. Trained from scratch by the
image-text objectives alone, the tiny ViT never learns shape (docs/findings/tiny-preset.md, finding 7).

Annotations are ALBEF-style JSON lists of ``{"image": <path under image_root>, "labels": [...]}``
(multi-label, as image-level object categories); the objective is binary cross-entropy per label
on the max-pooled patch tokens, so that each object's own tokens, which the fusion encoder's
cross-attention reads, carry what it is.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torch.utils.data import DataLoader, Dataset

from codis.config import ConfigError, VisionConfig
from codis.data.loaders import IN_MEMORY_BYTES
from codis.encoders import build_image_encoder
from codis.files import atomic_write_bytes, atomic_write_json
from codis.model import PretrainOutput
from codis.train import (MetricsCallback, OptimConfig, TrainConfig, fit, init_runtime,
                         seed_everything)
from codis.transforms import eval_transform

WEIGHTS = "vision.safetensors"


@dataclass(frozen=True)
class LabelledImages:
    """Images (absolute paths) and their multi-hot targets over ``labels``."""

    paths: list[Path]
    targets: torch.Tensor  # (N, len(labels)) float 0/1
    labels: list[str]


def read_labelled_images(annotations: str | Path, image_root: str | Path,
                         labels: list[str] | None = None) -> LabelledImages:
    """Read and check an annotation file before any training: every record needs an ``image``
    that exists under ``image_root`` and a list of string ``labels``. ``labels`` fixes the label
    vocabulary (an evaluation set uses the training set's); by default it is the file's own."""
    path, root = Path(annotations), Path(image_root)
    if not path.is_file():
        raise FileNotFoundError(f"annotations: no file at {path}")
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list) or not records:
        raise ConfigError(f"{path}: expected a non-empty JSON list of {{image, labels}} records")
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise ConfigError(f"{path}: record {index}: needs an 'image' path (string)")
        names = record.get("labels")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{path}: record {index}: 'labels' must be a list of strings")
    vocabulary = sorted({n for r in records for n in r["labels"]}) if labels is None else labels
    unknown = sorted({n for r in records for n in r["labels"]} - set(vocabulary))
    if unknown:
        raise ConfigError(f"{path}: labels not in the training set's: {', '.join(unknown[:5])}")
    paths = [root / r["image"] for r in records]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: {len(missing)} image(s) missing under {root}, e.g. "
                                f"{missing[0]}")
    column = {name: i for i, name in enumerate(vocabulary)}
    targets = torch.zeros(len(records), len(vocabulary))
    for row, record in enumerate(records):
        targets[row, [column[n] for n in record["labels"]]] = 1.0
    return LabelledImages(paths, targets, list(vocabulary))


class _ImageSet(Dataset):
    """The images, transformed for the ViT, and their targets; ``in_memory`` decodes every image
    once up front (the same tensors as decoding each on demand)."""

    def __init__(self, data: LabelledImages, image_size: int, in_memory: bool = False) -> None:
        self.data, self.transform = data, eval_transform(image_size)
        self.decoded = (torch.stack([self._read(index) for index in range(len(data.paths))])
                        if in_memory else None)

    def __len__(self) -> int:
        return len(self.data.paths)

    def _read(self, index: int) -> torch.Tensor:
        with Image.open(self.data.paths[index]) as image:
            return self.transform(image.convert("RGB"))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pixels = self._read(index) if self.decoded is None else self.decoded[index]
        return {"image": pixels, "target": self.data.targets[index]}


def fits_in_memory(images: int, image_size: int) -> bool:
    """Whether ``images`` float32 images of ``image_size`` pixels square fit :data:`IN_MEMORY_BYTES`:
    then they are decoded once and held, since training reads each image once per epoch (24 times
    in the demo's 3000 steps) and the decoding took about a quarter of a step there."""
    return images * 3 * image_size * image_size * 4 <= IN_MEMORY_BYTES


class LabelClassifier(nn.Module):
    """The ViT with a linear multi-label head on its max-pooled patch tokens."""

    def __init__(self, vision: VisionConfig, labels: int) -> None:
        super().__init__()
        self.visual_encoder = build_image_encoder(vision)
        self.head = nn.Linear(vision.width, labels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual_encoder.forward_features(images)[:, 1:].amax(dim=1))


def multilabel_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over images and labels (independent label presence)."""
    return F.binary_cross_entropy_with_logits(logits, targets)


def balanced_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per label, percent: the mean of recall on images with it and on images without it
    (labels absent from every image, or present in all, count their one defined side)."""
    predicted, truth = logits > 0, targets > 0.5
    recall = (predicted & truth).sum(0) / truth.sum(0).clamp(min=1)
    specificity = (~predicted & ~truth).sum(0) / (~truth).sum(0).clamp(min=1)
    sides = (truth.sum(0) > 0).float() + ((~truth).sum(0) > 0).float()
    return 100.0 * (recall * (truth.sum(0) > 0) + specificity * ((~truth).sum(0) > 0)) / sides


@torch.no_grad()
def evaluate_labels(model: LabelClassifier, data: LabelledImages, image_size: int,
                    batch_size: int = 256) -> dict[str, float]:
    """Balanced accuracy per label and their mean (``balanced_accuracy``), in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    logits = torch.cat([model(batch["image"].to(device)).cpu() for batch in
                        DataLoader(_ImageSet(data, image_size), batch_size=batch_size)])
    per_label = balanced_accuracy(logits, data.targets)
    return {"balanced_accuracy": float(per_label.mean()),
            **{f"balanced_accuracy.{name}": float(v) for name, v in zip(data.labels, per_label)}}


def pretrain_vision(vision: VisionConfig, train_annotations: str | Path, image_root: str | Path,
                    output_dir: str | Path, *, train: TrainConfig, optim: OptimConfig,
                    eval_annotations: str | Path | None = None,
                    callback: MetricsCallback | None = None, progress: bool = True,
                    resume: bool = True, stop_after: int | None = None,
                    in_memory: bool | None = None) -> Path:
    """Train ``vision`` (from scratch) on a labelled image set; returns ``output_dir/`` +
    :data:`WEIGHTS`, the ViT's weights, loadable as ``VisionConfig.pretrained`` of a model with
    the same architecture. With ``eval_annotations`` the held-out balanced accuracy is written to
    ``output_dir/metrics.json``. Resumes from ``output_dir/checkpoints`` like every training run.
    ``in_memory``: decode every image once and train from memory (the same batches); by default
    when the transformed images fit :data:`IN_MEMORY_BYTES`."""
    if vision.pretrained is not None:
        raise ConfigError("vision.pretrained: the initialisation trains from scratch; leave it unset")
    data = read_labelled_images(train_annotations, image_root)
    held_out = (None if eval_annotations is None
                else read_labelled_images(eval_annotations, image_root, data.labels))
    out = Path(output_dir)
    runtime = init_runtime()
    if runtime.world_size > 1:
        raise ConfigError("pretrain_vision runs in one process (a short stage); use no torchrun")
    seed_everything(train.seed)
    model = LabelClassifier(vision, len(data.labels)).to(runtime.device)
    if in_memory is None:
        in_memory = fits_in_memory(len(data.paths), vision.image_size)
    images = _ImageSet(data, vision.image_size, in_memory=in_memory)

    def open_epoch(epoch: int) -> DataLoader:
        order = torch.Generator().manual_seed(train.seed * 1_000_003 + epoch)
        return DataLoader(images, batch_size=train.batch_size, shuffle=True, drop_last=True,
                          generator=order)

    def step_loss(trained: nn.Module, batch: dict, step: int) -> PretrainOutput:
        logits = trained(batch["image"])
        return PretrainOutput(multilabel_bce(logits, batch["target"]), {})

    run_config = {"vision": dataclasses.asdict(vision), "labels": data.labels,
                  "train": dataclasses.asdict(train), "optim": dataclasses.asdict(optim)}
    step = fit(model, step_loss, open_epoch, run_config=run_config, train=train, optim=optim,
               output_dir=out, runtime=runtime, callback=callback, progress=progress,
               resume=resume, stop_after=stop_after, desc="vision init")
    weights = out / WEIGHTS
    if step < train.steps:
        return weights
    metrics: dict[str, Any] = {"steps": step, "labels": data.labels, "train_images": len(data.paths)}
    if held_out is not None:
        metrics.update(eval_images=len(held_out.paths),
                       **evaluate_labels(model, held_out, vision.image_size))
    atomic_write_json(out / "metrics.json", metrics)
    state = {k: v.detach().cpu().contiguous() for k, v in model.visual_encoder.state_dict().items()}
    atomic_write_bytes(weights, safetensors_bytes(state))
    return weights
