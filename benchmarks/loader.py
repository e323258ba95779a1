"""Throughput of the pretraining loader against plain JPEG decoding.

    python benchmarks/loader.py [--images 512] [--batch-size 32]

Generates JPEGs (320x240, smooth gradients plus noise so they compress like photos) in a temporary
folder, shards them with write_shards, then measures in one run: the raw decode rate (Pillow
open + convert of the same files, one process) and the samples/s of pretrain_loader over a whole
epoch (worker start-up included) at 64 and 256 px with 0, 1 and 2 workers. Each rate is shown with
its ratio to the raw decode rate: what the augmentations, tokenisation and tar reading cost.

``--torch-threads`` (default 1, what DataLoader gives each worker) applies to the main process: on
a busy 2-core machine, two intra-op threads on the per-sample ToTensor/Normalize made in-process
loading at 256 px swing between about 13 and 250 samples/s from run to run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import codis  # noqa: F401  - torchvision compat shim first
import torch

from codis.data.loaders import pretrain_loader
from codis.data.shards import write_shards
from codis.text import load_tokenizer


def make_images(root: Path, count: int, seed: int = 0,
                sizes: tuple[tuple[int, int], ...] = ((320, 240),)) -> list[dict]:
    """``count`` photo-like JPEGs (smooth gradients plus noise, so they compress like photos),
    image i of size ``sizes[i % len(sizes)]`` (width, height), and their pretraining records."""
    rng = np.random.default_rng(seed)
    grids = {size: np.mgrid[0:size[1], 0:size[0]].astype(np.float32) for size in set(sizes)}
    records = []
    for i in range(count):
        yy, xx = grids[sizes[i % len(sizes)]]
        a, b, c = rng.uniform(0.005, 0.05, size=3)
        base = np.stack([128 + 100 * np.sin(a * xx + b * yy + k) for k in rng.uniform(0, 6, 3)], -1)
        pixels = np.clip(base + rng.normal(0, 12, size=base.shape) * c * 20, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i:05d}.jpg", quality=90)
        records.append({"image": f"{i:05d}.jpg", "caption": f"a synthetic picture number {i}"})
    return records


def raw_decode_rate(paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            image.convert("RGB")
    return len(paths) / (time.perf_counter() - start)


def loader_rate(shards: Path, tokenizer, image_size: int, num_workers: int, batch_size: int) -> float:
    loader = pretrain_loader(str(shards), tokenizer=tokenizer, image_size=image_size,
                             batch_size=batch_size, num_workers=num_workers, drop_last=False)
    start = time.perf_counter()
    seen = sum(len(batch["key"]) for batch in loader)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples-per-shard", type=int, default=64)
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)

    tokenizer = load_tokenizer("builtin")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        root.mkdir()
        records = make_images(root, args.images)
        mean_kb = sum((root / r["image"]).stat().st_size for r in records) / len(records) / 1024
        start = time.perf_counter()
        write_shards(records, root, Path(tmp) / "shards", kind="pretrain",
                     samples_per_shard=args.samples_per_shard, progress=False)
        shard_rate = len(records) / (time.perf_counter() - start)
        raw = raw_decode_rate([root / r["image"] for r in records])

        print(f"{args.images} JPEGs 320x240 (mean {mean_kb:.0f} KiB), "
              f"{-(-args.images // args.samples_per_shard)} shards, batch {args.batch_size}; "
              f"{os.cpu_count()} CPUs, main-process torch threads {torch.get_num_threads()}")
        print(f"write_shards: {shard_rate:.0f} samples/s")
        print()
        print("| pipeline | workers | samples/s | ratio to raw decode |")
        print("|---|---|---|---|")
        print(f"| raw decode (PIL open+convert) | 0 | {raw:.0f} | 1.00 |")
        for size in (64, 256):
            for workers in (0, 1, 2):
                rate = loader_rate(Path(tmp) / "shards", tokenizer, size, workers, args.batch_size)
                print(f"| pretrain_loader {size} px | {workers} | {rate:.0f} | {rate / raw:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
