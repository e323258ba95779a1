"""An unaugmented task's training loader with the run's example cache against decoding every epoch.

    python benchmarks/example_cache.py [--pairs 2000] [--epochs 4] [--rounds 2]

Generates a demo world whose NLVR² training split has ``--pairs`` statements (two 64 px scenes
each), shards it as the demo recipe does (500 pairs a shard), then reads ``--epochs`` epochs of
its training loader as the demo's NLVR² finetuning does (``augment`` off, batch 16, the builtin
tokenizer, one torch thread, in the training process): once decoding every epoch, once with one
:class:`codis.data.loaders.ExampleCache` for all the epochs (filled during the first), alternating
for ``--rounds`` rounds, each cache new. Both give the same batches
(tests/test_loaders.py, tests/test_ve.py).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import codis  # noqa: F401  - torchvision compat shim first
from codis.data.demo_world import DemoWorldConfig, generate_demo_world
from codis.data.loaders import ExampleCache, SkipCounter, nlvr_loader
from codis.data.shards import write_shards
from codis.text import load_tokenizer
from two_way import alternating_medians, print_two_way_table  # this folder: run as python benchmarks/example_cache.py
from vision_init_step import ONE, ONE_DEV

BATCH = 16


def nlvr_training_shards(folder: Path, pairs: int) -> Path:
    """A demo world in ``folder`` with ``pairs`` NLVR² training pairs (the other splits at their
    smallest), its training split sharded as the demo recipe does (500 pairs a shard). Also
    frozen_vit.py's data."""
    world, shards = folder / "world", folder / "shards"
    generate_demo_world(world, DemoWorldConfig(
        pretrain_images=2, retrieval_images=ONE, vqa_images=ONE, ve_images=ONE_DEV,
        nlvr_pairs={"train": pairs, "dev": 1, "test": 1},
        classification_images={"train": 1, "val": 1}), progress=False)
    write_shards(json.loads((world / "nlvr/train.json").read_text()), world, shards,
                 kind="nlvr", samples_per_shard=500, progress=False)
    return shards


def read_epochs(shards: Path, tokenizer, epochs: int, cache: ExampleCache | None) -> tuple[float, int]:
    """Seconds to read ``epochs`` epochs, and the batches read."""
    skips, batches = SkipCounter(), 0
    start = time.perf_counter()
    for epoch in range(epochs):
        for _ in nlvr_loader(str(shards), image_size=64, batch_size=BATCH, train=True,
                             tokenizer=tokenizer, augment=False, hflip=False, seed=0, epoch=epoch,
                             skips=skips, cache=cache):
            batches += 1
    return time.perf_counter() - start, batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    tokenizer = load_tokenizer("builtin")
    with tempfile.TemporaryDirectory() as tmp:
        shards = nlvr_training_shards(Path(tmp), args.pairs)
        batches = 0

        def read(round_: int, cached: bool) -> float:
            nonlocal batches
            elapsed, batches = read_epochs(shards, tokenizer, args.epochs,
                                           ExampleCache() if cached else None)
            return elapsed

        decoded, held = alternating_medians(args.rounds, read)
    print(f"{args.pairs} NLVR² pairs at 64 px, {args.epochs} epochs of {batches // args.epochs} "
          f"batches of {BATCH}, {os.cpu_count()} CPUs, 1 torch thread, median of {args.rounds} "
          "alternating rounds")
    print()
    print_two_way_table("examples", "ms per batch", lambda seconds: 1000 * seconds / batches,
                        ("decoded every epoch", decoded), ("cached after the first epoch", held))


if __name__ == "__main__":
    main()
