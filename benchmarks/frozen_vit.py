"""NLVR² finetuning with the ViT trained (ALBEF) against the ViT kept fixed (``freeze_vision``).

    python benchmarks/frozen_vit.py [--pairs 1000] [--epochs 8] [--rounds 2]

Generates a demo world whose NLVR² training split has ``--pairs`` statements, shards it as the
demo recipe does (500 pairs a shard), saves a randomly initialised ``tiny`` model with the conv
stem (the demo's ViT), then runs :func:`codis.tasks.nlvr.finetune` as the demo recipe's NLVR²
does (64 px, batch 16, no augmentation, no distillation, one torch thread) for ``--epochs``
epochs: once with the ViT trained, once with ``freeze_vision`` (no ViT backward, and the ViT's
tokens of each training image computed once, by :class:`codis.tasks.ve.ImageTokenCache`),
alternating for ``--rounds`` rounds. Each time includes the stage's start (loading the model,
opening the shards) and its checkpoint. What a fixed ViT does to accuracy is measured on the
demo's own run: docs/findings/tiny-preset.md, finding 14.
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
from codis.model import CodisModel, save_model
from codis.tasks import nlvr
from codis.train import task_schedule
# this folder's modules: run as python benchmarks/frozen_vit.py
from example_cache import nlvr_training_shards
from two_way import alternating_medians, print_two_way_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    tiny = preset("tiny")
    model_config = tiny.replace(vision=dataclasses.replace(tiny.vision, stem="conv"))
    with tempfile.TemporaryDirectory() as tmp:
        shards = nlvr_training_shards(Path(tmp), args.pairs)
        torch.manual_seed(0)
        pretrained = save_model(CodisModel(model_config), Path(tmp) / "pretrained.pt")
        configs = {frozen: nlvr.config("demo", augment=False, distill=False, epochs=args.epochs,
                                       freeze_vision=frozen) for frozen in (False, True)}
        train, optim = task_schedule(configs[False], args.pairs)  # freezing leaves it as it is

        def finetune(round_: int, frozen: bool) -> float:
            start = time.perf_counter()
            nlvr.finetune(pretrained, str(shards), Path(tmp) / f"run-{round_}-{frozen}",
                          configs[frozen], train=train, optim=optim, progress=False)
            return time.perf_counter() - start

        trained, fixed = alternating_medians(args.rounds, finetune)
    print(f"{args.pairs} NLVR² pairs at 64 px, {args.epochs} epochs: {train.steps} steps of "
          f"{train.batch_size} pairs, tiny conv-stem model, {os.cpu_count()} CPUs, 1 torch thread, "
          f"median of {args.rounds} alternating rounds")
    print()
    print_two_way_table("NLVR² finetuning", "ms per step", lambda s: 1000 * s / train.steps,
                        ("ViT trained", trained), ("ViT fixed, tokens cached", fixed))


if __name__ == "__main__":
    main()
