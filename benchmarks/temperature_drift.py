"""How far the contrastive temperature drifts when it is learnt raw (ALBEF's ``temp``) or in log
space (this project's ``log_temp``), side by side on the same model, batch and optimiser.

The measurement behind ``docs/findings/tiny-preset.md`` finding 9: the ``tiny`` preset in the albef
mode, one fixed batch repeated, AdamW at the demo's learning rate through the training loop's
optimiser (``codis.train.engine.build_optimizer``, which decays the raw parameter as ALBEF does).

    python benchmarks/temperature_drift.py --steps 91 --lr 1e-3
"""

from __future__ import annotations

import argparse
import platform

import torch

import codis  # noqa: F401
from pretrain_step import make_batch  # this folder: run as python benchmarks/temperature_drift.py
from codis.config import preset
from codis.model import CodisModel
from codis.train.engine import build_optimizer
from codis.train.schedules import OptimConfig


def drift(parameter: str, steps: int, lr: float, batch_size: int, report: set[int]) -> dict[int, float]:
    """tau after each step in ``report`` of ``steps`` AdamW steps, temperature learnt as ``parameter``."""
    torch.manual_seed(0)
    config = preset("tiny", mode="albef", temperature_parameter=parameter)
    model = CodisModel(config).train()
    optimizer = build_optimizer(model, OptimConfig(lr=lr, weight_decay=0.02))
    images, ids, mask = make_batch(config, batch_size, torch.device("cpu"))
    found = {0: model.temperature.item()}
    for step in range(1, steps + 1):
        loss = model(images, ids, mask).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in report:
            found[step] = model.temperature.item()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=91)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    report = {s for s in (1, 11, 41, args.steps) if s <= args.steps}
    raw = drift("raw", args.steps, args.lr, args.batch_size, report)
    log = drift("log", args.steps, args.lr, args.batch_size, report)
    print(f"tiny, mode albef, batch {args.batch_size} repeated, AdamW lr {args.lr:g}, weight decay "
          f"0.02; torch {torch.__version__}, {platform.machine()}")
    print(f"{'step':>6} {'raw temp':>10} {'log_temp':>10}")
    for step in sorted(raw):
        print(f"{step:>6} {raw[step]:>10.4f} {log[step]:>10.4f}")
    first_raw, first_log = raw[0] - raw[min(report)], log[0] - log[min(report)]
    print(f"first step: the raw parameter moves tau {abs(first_raw) / abs(first_log):.1f}x as far "
          "as the log one")


if __name__ == "__main__":
    main()
