"""The process that torchrun starts for pretraining on several processes or nodes.

What it trains is given one of two ways:

* ``--config run.yaml``: a run config as the pretrain stage writes it (the flow's own torchrun
  launch, :func:`flows.launch.torchrun_command`); the same as ``codis pretrain --config``.
* ``--recipe <recipe.yaml> --variant <name> --shards <folder>... --output <dir>``: the run config
  that the pretrain stage of that recipe builds for that variant
  (:func:`flows.launch.pretrain_run_config`, with ``--set`` / ``--steps-scale`` as
  ``python -m flows.reproduce`` takes them), for pretraining outside the flow: by hand on several
  nodes, or as the Kubernetes job of ``infra/k8s/pretrain-torchrun-job.yaml``. ``--shards``: the
  shard folders of the recipe's ``pretrain_data`` (its download / shard stages' ``shards/``
  folders, in the recipe's order; one argument may list several, comma-separated, as the
  Kubernetes job's ``SHARDS`` does); ``--vision-weights``: the vision_init stage's weights file, which
  a recipe with ``vision_init`` needs. The recipe's ``pretrain.nodes`` x ``pretrain.gpus_per_node``
  must be the processes torchrun started (the learning rate is scaled to that global batch): each
  process checks it, and everything else, before training starts, and a bad value ends every
  process with one line naming it (exit status 2).

``--metrics metrics.jsonl``: rank 0 appends one JSON line per logged step (``{"step": ..., "loss":
..., ...}``), which the pretrain stage follows and sends to MLflow and the Prefect log. Nothing is
added to codis; only the callback that its :func:`codis.train.pretrain` accepts is filled in (codis
calls it on rank 0 only).

    python -m torch.distributed.run --nproc-per-node=8 --standalone \\
        -m flows.pretrain_entry --config run.yaml --metrics metrics.jsonl
    torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=node0:29500 \\
        --rdzv-id=codis-4m-01 -m flows.pretrain_entry --recipe pipelines/codis-4m.yaml \\
        --variant codis --shards /data/shards/cc3m /data/shards/sbu --output /data/pretrain/codis \\
        --set pretrain.nodes=2 --set pretrain.rdzv_endpoint=node0:29500
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import codis  # noqa: F401  - the torchvision shim first
from codis import train as codis_train
from flows.launch import pretrain_run_config
from flows.recipe import load_recipe


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


class EntryError(ValueError):
    """A bad argument or recipe value, found before training starts; the message names it."""


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.pretrain_entry",
        description="codis pretraining under torchrun, from a run config or from a recipe")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="run config (run.yaml) written by the pretrain stage")
    source.add_argument("--recipe", help="recipe file (pipelines/*.yaml): pretrain its --variant")
    parser.add_argument("--variant", help="with --recipe: the variant to pretrain")
    parser.add_argument("--shards", nargs="+", metavar="FOLDER",
                        help="with --recipe: the shard folders of the recipe's pretrain_data, in "
                             "its order (also comma-separated, as one argument)")
    parser.add_argument("--output", help="with --recipe: the run's folder (model.pt, run.yaml, "
                                         "checkpoints/); a rerun resumes from it")
    parser.add_argument("--vision-weights", default=None,
                        help="with --recipe: the vision_init stage's weights (vision.safetensors)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="PATH=VALUE", help="with --recipe: override a recipe field "
                                                   "(repeatable), e.g. pretrain.nodes=2")
    parser.add_argument("--steps-scale", type=float, default=None,
                        help="with --recipe: multiply every training step count")
    parser.add_argument("--metrics", default=None, help="JSONL file that rank 0 appends metrics to")
    parser.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _processes(environ: dict[str, str]) -> tuple[int, int]:
    """``(nodes, processes per node)`` that torchrun started (1, 1 without torchrun)."""
    world = int(environ.get("WORLD_SIZE", "1"))
    local = int(environ.get("LOCAL_WORLD_SIZE", str(world)))
    return world // max(local, 1), local


def recipe_run_config(args: argparse.Namespace,
                      environ: dict[str, str] | None = None) -> codis_train.PretrainConfig:
    """The :class:`codis.train.PretrainConfig` that ``--recipe`` asks for; :class:`EntryError`
    (or the recipe's :class:`flows.recipe.RecipeError`) names a bad argument or field."""
    missing = [f"--{name}" for name in ("variant", "shards", "output") if not getattr(args, name)]
    if missing:
        raise EntryError(f"--recipe needs {', '.join(missing)}")
    recipe = load_recipe(args.recipe, args.overrides, args.steps_scale)
    if args.variant not in recipe.variants:
        raise EntryError(f"--variant: {args.variant!r} is not a variant of {args.recipe} "
                         f"(variants: {', '.join(recipe.variants)})")
    spec = recipe.pretrain
    nodes, per_node = _processes(dict(os.environ if environ is None else environ))
    if (spec.nodes, spec.gpus_per_node) != (nodes, per_node):
        raise EntryError(
            f"pretrain.nodes x pretrain.gpus_per_node: the recipe says {spec.nodes} x "
            f"{spec.gpus_per_node}, torchrun started {nodes} x {per_node} processes; the learning "
            f"rate is scaled to the recipe's global batch, so make them agree (--set "
            f"pretrain.nodes={nodes} --set pretrain.gpus_per_node={per_node}"
            + (", and pretrain.rdzv_endpoint for several nodes)" if nodes > 1 else ")"))
    if recipe.vision_init is not None and args.vision_weights is None:
        raise EntryError(f"--vision-weights: {args.recipe} initialises the ViT in its vision_init "
                         "stage; pass that stage's vision.safetensors (or --set vision_init=null "
                         "to pretrain from the preset's ViT)")
    if args.vision_weights is not None and not Path(args.vision_weights).is_file():
        raise EntryError(f"--vision-weights: no file at {args.vision_weights}")
    shards = [folder for value in args.shards for folder in value.split(",") if folder]
    for folder in shards:
        if not Path(folder).is_dir():
            raise EntryError(f"--shards: no shard folder at {folder}")
    try:
        return pretrain_run_config(spec, args.variant, recipe.variants[args.variant], shards,
                                   args.output, recipe.steps_scale, args.vision_weights)
    except (OSError, ValueError) as error:
        raise EntryError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.recipe is not None:
        try:
            config = recipe_run_config(args)
        except ValueError as error:  # EntryError, the recipe's RecipeError
            print(f"error: {error}", file=sys.stderr)
            return 2
    else:
        config = codis_train.PretrainConfig.load(args.config)
    callback = JsonlAppender(args.metrics) if args.metrics else None
    final = codis_train.pretrain(config, resume=not args.no_resume, callback=callback,
                     progress=not args.no_progress)
    print(final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
