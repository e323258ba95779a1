"""The process that torchrun starts for multi-process pretraining.

``codis pretrain --config run.yaml`` plus ``--metrics metrics.jsonl``: rank 0 appends one JSON line
per logged step (``{"step": ..., "loss": ..., ...}``), which the pretrain stage follows and sends to
MLflow and the Prefect log. Nothing is added to codis; only the callback that its
:func:`codis.train.pretrain` accepts is filled in (codis calls it on rank 0 only).

    python -m torch.distributed.run --nproc-per-node=8 --standalone \\
        -m flows.pretrain_entry --config run.yaml --metrics metrics.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import codis  # noqa: F401  - the torchvision shim first


class JsonlAppender:
    """A :data:`codis.train.MetricsCallback` appending ``{"step": ..., **metrics}`` lines, flushed
    at once so a follower sees each line as soon as it is written."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
            handle.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pretrain_entry",
                                     description="codis pretraining with a metrics file (for torchrun)")
    parser.add_argument("--config", required=True, help="run config (run.yaml) written by the flow")
    parser.add_argument("--metrics", default=None, help="JSONL file that rank 0 appends metrics to")
    parser.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from codis.train import PretrainConfig, pretrain

    config = PretrainConfig.load(args.config)
    callback = JsonlAppender(args.metrics) if args.metrics else None
    final = pretrain(config, resume=not args.no_resume, callback=callback,
                     progress=not args.no_progress)
    print(final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
