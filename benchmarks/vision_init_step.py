"""The ViT initialisation with its images held in memory against decoded for every batch.

    python benchmarks/vision_init_step.py [--images 1024] [--steps 200] [--rounds 2]

Generates a demo world whose classification split has ``--images`` labelled scenes at the demo's
64 px, then runs ``codis.train.vision_init.pretrain_vision`` as the demo recipe does (conv stem,
batch 64, one process with every CPU thread) for ``--steps`` steps, ``in_memory`` False and True
alternating for ``--rounds`` rounds, each from scratch in a fresh folder. The held run's time
includes decoding every image once. Both write the same weights (tests/test_vision_init.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import torch

import codis  # noqa: F401  - torchvision compat shim first
from codis.config import preset
from codis.data.demo_world import DemoWorldConfig, generate_demo_world
from codis.train import OptimConfig, TrainConfig
from codis.train.vision_init import pretrain_vision
from two_way import alternating_medians, print_two_way_table  # this folder: run as python benchmarks/vision_init_step.py

ONE = {"train": 1, "val": 1, "test": 1}  # the other splits at their smallest
ONE_DEV = {"train": 1, "dev": 1, "test": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    vision = dataclasses.replace(preset("tiny").vision, stem="conv")
    train = TrainConfig(steps=args.steps, batch_size=64, checkpoint_every=args.steps, log_every=50)
    optim = OptimConfig(lr=1e-3, weight_decay=0.05, warmup_lr=1e-5, warmup_steps=20, min_lr=1e-5)
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        generate_demo_world(world, DemoWorldConfig(
            pretrain_images=2, retrieval_images=ONE, vqa_images=ONE,
            nlvr_pairs=ONE_DEV, ve_images=ONE_DEV,
            classification_images={"train": args.images, "val": 1}), progress=False)

        def pretrain(round_: int, in_memory: bool) -> float:
            start = time.perf_counter()
            pretrain_vision(vision, world / "classification/train.json", world,
                            Path(tmp) / f"run-{round_}-{in_memory}", train=train, optim=optim,
                            progress=False, in_memory=in_memory)
            return time.perf_counter() - start

        streamed, held = alternating_medians(args.rounds, pretrain)
    print(f"{args.images} scenes at 64 px, {args.steps} steps of 64 "
          f"({args.steps * 64 / args.images:.1f} epochs), {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads, median of {args.rounds} alternating rounds")
    print()
    print_two_way_table("images", "steps/s", lambda seconds: args.steps / seconds,
                        ("decoded for every batch", streamed), ("held in memory", held), digits=2)


if __name__ == "__main__":
    main()
