"""What a finetuning or text-assignment stage trains, from its ``job.json``: in the stage's own
process (:func:`run_job`), or in this process's when the flow trains several stages at once (a
recipe's ``parallel_variants`` above 1; :func:`flows.launch.finetune_command`).

The stage writes what to train as ``job.json`` in its folder and follows the metrics file that
this process appends to, one JSON line per logged step, exactly as it does for
:mod:`flows.pretrain_entry`::

    python -m flows.finetune_entry --job job.json --metrics metrics.jsonl

``job.json`` holds ``function`` (``finetune``, or ``text_assignment`` for NLVR²), ``task``,
``pretrained``, ``shards`` (a folder, a list of folders, or tar files), ``output_dir`` and the
task ``config``, ``train`` and ``optim`` sections as the stage built them (all fields, so that the
process trains what the stage was keyed with). It calls the same codis function the stage calls in
its own process; a rerun resumes from ``output_dir``'s checkpoints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import codis  # noqa: F401  - the torchvision shim first
from codis.config import from_dict
from codis.tasks import TASKS
from codis.train import OptimConfig, TrainConfig
from flows.pretrain_entry import JsonlAppender

FUNCTIONS = ("finetune", "text_assignment")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flows.finetune_entry",
                                     description="a finetuning stage's job, in its own process")
    parser.add_argument("--job", required=True, help="job.json written by the stage")
    parser.add_argument("--metrics", required=True, help="JSONL file to append metrics to")
    return parser


def run_job(job: dict, callback: Callable[[int, dict[str, float]], None] | None = None,
            progress: bool = False) -> Path:
    """Train what ``job`` (a parsed ``job.json``) describes, calling ``callback(step, metrics)``
    at each logged step; returns the written checkpoint. The stage calls it in its own process
    when it trains one stage at a time, :func:`main` in this one otherwise."""
    if job.get("function") not in FUNCTIONS:
        raise ValueError(f"job.function: must be one of {', '.join(FUNCTIONS)}, "
                         f"got {job.get('function')!r}")
    if job.get("task") not in TASKS:
        raise ValueError(f"job.task: must be one of {', '.join(TASKS)}, got {job.get('task')!r}")
    module = TASKS[job["task"]].module()
    config = type(module.config()).from_dict(job["config"])
    train = from_dict(TrainConfig, job["train"], prefix="train.")
    optim = from_dict(OptimConfig, job["optim"], prefix="optim.")
    return getattr(module, job["function"])(
        job["pretrained"], job["shards"], job["output_dir"], config, train=train, optim=optim,
        callback=callback, progress=progress)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    print(run_job(json.loads(Path(args.job).read_text(encoding="utf-8")),
                  callback=JsonlAppender(args.metrics)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
