"""The conv-stem ViT's forward and backward with its stem in channels-last memory against timm's.

    python benchmarks/conv_stem.py [--batch-size 32] [--steps 40] [--rounds 3] [--threads 1]

Builds the demo's image encoder (the ``tiny`` ViT with ``vision.stem: conv``: three stride-2
convolutions with batch norm, 64 px) and times ``--steps`` forward and backward passes of a
random batch through it: once with timm's ``ConvStem`` (contiguous NCHW tensors), once with
:class:`codis.encoders.ChannelsLastConvStem` (the same module computing in channels-last memory,
what codis builds), alternating for ``--rounds`` rounds on the same weights. Both give the same
tokens and gradients (tests/test_model.py). The demo's trainings run one thread each
(``--threads 1``); batch 32 is a pretraining or NLVR² batch's image count.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch

import codis  # noqa: F401  - torchvision compat shim first, then timm
from codis.config import preset
from codis.encoders import ChannelsLastConvStem, build_image_encoder
from timm.models.vision_transformer_hybrid import ConvStem
from two_way import alternating_medians, print_two_way_table  # this folder: run as python benchmarks/conv_stem.py


def time_steps(encoder: torch.nn.Module, images: torch.Tensor, steps: int) -> float:
    """Seconds for ``steps`` forward + backward passes, after two untimed ones."""
    for _ in range(2):
        encoder.forward_features(images).square().mean().backward()
    start = time.perf_counter()
    for _ in range(steps):
        encoder.forward_features(images).square().mean().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    vision = dataclasses.replace(preset("tiny").vision, stem="conv")
    encoder = build_image_encoder(vision)
    stem = encoder.patch_embed.backbone
    images = torch.randn(args.batch_size, 3, vision.image_size, vision.image_size)

    def passes(round_: int, channels_last: bool) -> float:
        # same parameters, only forward differs
        stem.__class__ = ChannelsLastConvStem if channels_last else ConvStem
        return time_steps(encoder, images, args.steps)

    nchw, channels_last = alternating_medians(args.rounds, passes)
    print(f"tiny ViT with conv stem at {vision.image_size} px, batch {args.batch_size}, "
          f"{args.steps} forward + backward passes, {os.cpu_count()} CPUs, {args.threads} torch "
          f"thread(s), median of {args.rounds} alternating rounds")
    print()
    print_two_way_table("stem", "ms per pass", lambda seconds: 1000 * seconds / args.steps,
                        ("timm ConvStem (NCHW)", nchw), ("channels-last", channels_last))


if __name__ == "__main__":
    main()
