"""The parent flow: a whole reproduction from a recipe, and its command line.

    python -m flows.reproduce --recipe pipelines/demo.yaml
    python -m flows.reproduce --recipe pipelines/demo.yaml --steps-scale 0.1 --set demo_world.pretrain_images=100

Order: validate the recipe and its inputs (nothing starts before that) -> data (demo world,
downloads, shards of every source and task split) -> for each variant: pretrain -> zero-shot
retrieval -> [analyze: codebook usage, retrieval examples, Grad-CAM, if ``report.analysis``]
-> register (``candidate``; ``champion`` if it beats the current one on the recipe's champion
metric) -> for each task: [NLVR² text assignment] -> finetune -> evaluate -> register ->
report comparing the variants.

Everything content-keyed lives in ``<runs>/store`` (see :mod:`flows.store`): re-running a
finished reproduction re-runs nothing; changing one stage's parameters re-runs that stage and
what depends on it; after a failure, running the same command again continues from the failed
stage. What belongs to this run only goes to ``<runs>/<recipe>-<run id>/``: the resolved recipe,
``reproduction.json`` (every stage's key and folder, the MLflow ids), ``comparison.md`` and copies
of the report.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml
from prefect import flow

from codis.cli import DEBUG_ENV, error_message
from codis.files import atomic_write_json, atomic_write_text
from codis.tasks import TASKS
from flows import recipe as recipes
from flows.compare import DEFAULT_METRICS, comparison_table, select_metrics
from flows.launch import evaluation_processes
from flows.recipe import Recipe, TaskSpec, UrlSource
from flows.server import PrefectApiError, prefect_api
from flows.stages import (StageContext, analyze_task, download_task, evaluate_task,
                          finetune_task, generate_demo_task, pretrain_task, register_task,
                          report_task, run_logger, shard_task, stage_label, text_assignment_task,
                          vision_init_task)
from flows.store import StageResult, Store
from flows.tracking import Tracker, default_artifact_location, resolve_tracking_uri


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def headline_metric(spec: TaskSpec) -> str:
    """The metric that ranks finetuned models of a task (``champion`` alias)."""
    return TASKS[spec.task].headline_metric


@flow(name="reproduce")
def reproduce(recipe: str = "pipelines/demo.yaml", overrides: list[str] | None = None,
              steps_scale: float | None = None, runs_root: str = "runs", run_dir: str | None = None,
              run_id: str | None = None, tracking_uri: str | None = None, track: bool = True,
              progress: bool = True) -> dict[str, Any]:
    """Reproduce a recipe end to end (see the module docstring).

    ``overrides``: ``dotted.path=value`` changes of the recipe (e.g.
    ``pretrain.train.steps=20``); ``steps_scale`` multiplies every training step count.
    ``runs_root``: holds ``store/``, the run folders and, by default, MLflow's ``mlflow.db`` and
    ``mlartifacts/``. ``tracking_uri`` empty: ``MLFLOW_TRACKING_URI``, else that sqlite file."""
    spec = recipes.load_recipe(recipe, overrides or [], steps_scale)
    recipes.check_inputs(spec)
    logger = run_logger()
    run_id = run_id or new_run_id()
    root = Path(runs_root).resolve()
    folder = Path(run_dir).resolve() if run_dir else root / f"{spec.name}-{run_id}"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "recipe.yaml", yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))

    uri = resolve_tracking_uri(tracking_uri, root) if track else None
    tracker = Tracker(uri, spec.experiment,
                      artifact_location=default_artifact_location(root, spec.experiment),
                      system_metrics=spec.tracking.log_system_metrics)
    tracker.end_stale_runs()  # what earlier runs killed with -9 left RUNNING
    from prefect.runtime import flow_run

    parent = tracker.start_run(f"{spec.name}-{run_id}", tags={
        "codis.kind": "reproduction", "codis.recipe": spec.name, "codis.run_dir": str(folder),
        "codis.recipe_file": str(Path(recipe).resolve()), "prefect.flow_run_id": flow_run.id})
    parent.log_params({"recipe": spec.name, "variants": sorted(spec.variants),
                       "tasks": [t.label for t in spec.tasks], "steps_scale": spec.steps_scale,
                       "overrides": list(overrides or []), "run_dir": str(folder)})
    parent.log_artifact(folder / "recipe.yaml")
    ctx = StageContext(store=Store(root / "store"), tracker=tracker, parent_run_id=parent.run_id,
                       run_dir=folder, progress=progress,
                       keep_training_state=spec.store.keep_training_state)
    summary: dict[str, Any] = {"recipe": spec.name, "recipe_file": str(Path(recipe).resolve()),
                               "run_id": run_id, "run_dir": str(folder), "store": str(ctx.store.root),
                               "status": "running", "started": time.time(),
                               "mlflow": {"tracking_uri": uri, "experiment": spec.experiment,
                                          "parent_run_id": parent.run_id},
                               "prefect_flow_run_id": flow_run.id, "stages": []}
    try:
        _reproduce(spec, ctx, summary, parent)
    except BaseException as error:
        summary["status"] = "failed"
        _write_summary(folder, summary)
        tracker.end_after(parent, error)  # FAILED, or KILLED when interrupted
        raise
    summary["status"] = "completed"
    summary["finished"] = time.time()
    _write_summary(folder, summary)
    parent.log_artifact(folder / "reproduction.json")
    parent.log_artifact(folder / "comparison.md")
    tracker.end_run(parent, "FINISHED")
    logger.info("report: %s", summary["report"]["html"])
    return summary


def _write_summary(folder: Path, summary: dict[str, Any]) -> None:
    atomic_write_json(folder / "reproduction.json", summary)


def _record(summary: dict[str, Any], result: StageResult) -> StageResult:
    summary["stages"].append({"label": stage_label(result), **result.to_dict()})
    return result


def _reproduce(spec: Recipe, ctx: StageContext, summary: dict[str, Any], parent: Any) -> None:
    def retried(stage_task: Any) -> Any:
        return stage_task.with_options(retries=spec.retries) if spec.retries else stage_task

    # ---- data ------------------------------------------------------------------------------------
    world = None
    if spec.demo_world is not None:
        world = _record(summary, retried(generate_demo_task)(ctx, spec.demo_world))
    world_dir = str(world.file("world")) if world is not None else None
    data_stages: list[StageResult] = []
    pretrain_folders: list[str] = []
    for index, source in enumerate(spec.pretrain_data):
        if isinstance(source, UrlSource):
            result = retried(download_task)(ctx, source, world_dir)
        else:
            result = retried(shard_task)(ctx, source, "pretrain", world_dir,
                                         label=source.name or f"pretrain-{index}")
        data_stages.append(_record(summary, result))
        pretrain_folders.append(str(result.file("shards")))
    train_folders: dict[str, list[str]] = {}
    eval_folders: dict[str, str] = {}
    for spec_task in spec.tasks:
        train_kind, eval_kind = recipes.SHARD_KINDS[spec_task.task]
        if spec_task.finetune:
            parts = []
            for index, part in enumerate(spec_task.train_data):
                result = retried(shard_task)(ctx, part, train_kind, world_dir,
                                             label=f"{spec_task.label}.train{index}")
                data_stages.append(_record(summary, result))
                parts.append(str(result.file("shards")))
            train_folders[spec_task.label] = parts
        result = retried(shard_task)(ctx, spec_task.eval_data, eval_kind, world_dir,
                                     label=f"{spec_task.label}.eval")
        data_stages.append(_record(summary, result))
        eval_folders[spec_task.label] = str(result.file("shards"))

    vision_weights = None
    if spec.vision_init is not None:
        init = _record(summary, retried(vision_init_task)(
            ctx, spec.vision_init, recipes.vision_init_config(spec), world_dir, spec.steps_scale))
        summary["vision_init"] = {"key": init.key, "path": init.path}
        vision_weights = str(init.file("weights"))

    # ---- variants --------------------------------------------------------------------------------
    processes = evaluation_processes(spec.pretrain)
    pretrained: dict[str, StageResult] = {}
    evaluations: dict[str, list[tuple[TaskSpec, bool, StageResult]]] = {}
    analyses: dict[str, StageResult] = {}
    analysis_task = spec.analysis_task if spec.report.analysis is not None else None
    summary["variants"] = {}
    for name, variant in spec.variants.items():
        record: dict[str, Any] = {"evaluations": [], "registered": {}}
        summary["variants"][name] = record
        pre = _record(summary, retried(pretrain_task)(ctx, name, variant, spec.pretrain,
                                                      pretrain_folders, spec.steps_scale,
                                                      vision_weights))
        pretrained[name] = pre
        record["pretrain"] = {"stage": pre.stage, "key": pre.key, "path": pre.path}
        checkpoint = str(pre.file("model"))
        found: list[tuple[TaskSpec, bool, StageResult]] = []
        for index, spec_task in enumerate(spec.tasks):
            if spec_task.zero_shot:
                result = _record(summary, retried(evaluate_task)(
                    ctx, spec_task, checkpoint, eval_folders[spec_task.label], world_dir, True, name,
                    processes=processes))
                found.append((spec_task, True, result))
                record["evaluations"].append({"task": index, "zero_shot": True, "key": result.key})
        if analysis_task is not None:
            analyses[name] = _record(summary, retried(analyze_task)(
                ctx, analysis_task, checkpoint, eval_folders[analysis_task.label],
                spec.report.analysis, name))
            record["analysis"] = {"key": analyses[name].key}
        metrics = {k: v for _, _, r in found for k, v in r.metrics.items()}
        champion = spec.champion_metric
        record["registered"]["pretrained"] = retried(register_task)(
            ctx, spec.pretrained_model_name, checkpoint, label=name, score_name=champion,
            score=metrics.get(champion) if champion else None,
            tags={"codis.variant": name, "codis.recipe": spec.name,
                  "codis.mode": recipes.model_config(variant).mode})
        for index, spec_task in enumerate(spec.tasks):
            if not spec_task.finetune:
                continue
            start = checkpoint
            if spec_task.text_assignment is not None:
                ta = _record(summary, retried(text_assignment_task)(
                    ctx, spec_task, checkpoint, pretrain_folders, spec.steps_scale, name))
                start = str(ta.file("model"))
            tuned = _record(summary, retried(finetune_task)(
                ctx, spec_task, start, train_folders[spec_task.label], world_dir, spec.steps_scale,
                name))
            result = _record(summary, retried(evaluate_task)(
                ctx, spec_task, str(tuned.file("model")), eval_folders[spec_task.label], world_dir,
                False, name, processes=processes))
            found.append((spec_task, False, result))
            record["evaluations"].append({"task": index, "zero_shot": False, "key": result.key})
            if spec.tracking.register_finetuned:
                score_name = recipes.metric_name(spec_task, headline_metric(spec_task))
                record["registered"][spec_task.label] = retried(register_task)(
                    ctx, spec.finetuned_model_name(spec_task), str(tuned.file("model")),
                    label=f"{spec_task.label}/{name}", score_name=score_name,
                    score=result.metrics.get(score_name),
                    tags={"codis.variant": name, "codis.recipe": spec.name,
                          "codis.task": spec_task.task})
        evaluations[name] = found
        metrics = {**pre.metrics, **{k: v for _, _, r in found for k, v in r.metrics.items()}}
        record["metrics"] = metrics
        parent.log_metrics({f"{name}/{k}": v for k, v in metrics.items()})

    # ---- report ----------------------------------------------------------------------------------
    report = _record(summary, retried(report_task)(ctx, spec, pretrained, evaluations, world,
                                                   data_stages, analyses))
    folder = Path(summary["run_dir"])
    copies = folder / "report"
    if copies.exists():
        shutil.rmtree(copies)
    shutil.copytree(report.path, copies, ignore=shutil.ignore_patterns("_stage*.json"))
    summary["report"] = {"markdown": str(copies / report.outputs["markdown"]),
                         "html": str(copies / report.outputs["html"]),
                         "stage": report.path}
    rows = {name: record["metrics"] for name, record in summary["variants"].items()}
    table = comparison_table(rows, select_metrics(rows, spec.report.metrics or DEFAULT_METRICS),
                             baseline=spec.report.baseline_variant)
    title = spec.report.title or f"{spec.name}: variants side by side"
    atomic_write_text(folder / "comparison.md", f"# {title}\n\n{table}\n")
    summary["comparison"] = str(folder / "comparison.md")


# ---- command line --------------------------------------------------------------------------------
@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit(143) meanwhile, so that cleanup runs (``finally`` blocks, MLflow
    runs ending KILLED) instead of the process just vanishing. While the flow runs, Prefect turns
    SIGTERM into its own TerminationSignal first, then passes it on to this handler."""
    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.reproduce",
        description="Reproduce a recipe (pipelines/*.yaml) with Prefect and MLflow. Without a "
                    "PREFECT_API_URL the run starts a local Prefect server of its own, which ends "
                    "with it (CODIS_PREFECT_STARTUP_TIMEOUT: seconds to wait for it, default "
                    "300); with one, that API must answer within PREFECT_API_REQUEST_TIMEOUT.")
    parser.add_argument("--recipe", default="pipelines/demo.yaml", help="recipe file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                        help="override a recipe field, e.g. --set pretrain.train.steps=20 (repeatable)")
    parser.add_argument("--steps-scale", type=float, default=None,
                        help="multiply every training step count (e.g. 0.1 for a quick run)")
    parser.add_argument("--runs-root", default="runs",
                        help="holds store/, the run folders and the default MLflow store (default: runs)")
    parser.add_argument("--run-dir", default=None,
                        help="this run's folder (default: <runs-root>/<recipe>-<run id>)")
    parser.add_argument("--run-id", default=None, help="run id (default: date-time-random)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                             "sqlite:///<runs-root>/mlflow.db)")
    parser.add_argument("--no-tracking", action="store_true", help="do not record in MLflow")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--validate", action="store_true",
                        help="only validate the recipe and its inputs, then exit")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of a bad-input error (also: {DEBUG_ENV}=1)")
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if args.steps_scale is not None and not (math.isfinite(args.steps_scale) and args.steps_scale > 0):
        print(f"error: --steps-scale: must be a finite number > 0, got {args.steps_scale}",
              file=sys.stderr)
        return 2
    try:
        spec = recipes.load_recipe(args.recipe, args.overrides, args.steps_scale)
        recipes.check_inputs(spec)
    except (ValueError, FileNotFoundError) as error:  # RecipeError is a ValueError
        if debug:
            raise
        print(f"error: {error_message(error)}", file=sys.stderr)
        return 2
    if args.validate:
        print(f"{args.recipe}: valid ({len(spec.variants)} variants, {len(spec.tasks)} tasks)")
        return 0
    with sigterm_as_exit():
        try:
            with prefect_api() as api:  # checked, or a local server stopped when this ends
                print(f"Prefect API: {api.describe()}", flush=True)
                summary = reproduce(recipe=args.recipe, overrides=args.overrides,
                                    steps_scale=args.steps_scale, runs_root=args.runs_root,
                                    run_dir=args.run_dir, run_id=args.run_id,
                                    tracking_uri=args.tracking_uri, track=not args.no_tracking,
                                    progress=not args.no_progress)
        except PrefectApiError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        except (ValueError, FileNotFoundError, NotADirectoryError) as error:
            # bad input found by a stage (a record, a checkpoint, a batch the data cannot fill)
            if debug:
                raise
            print(f"error: {error_message(error)}", file=sys.stderr)
            return 2
    print()
    print(f"report:      {summary['report']['html']}")
    print(f"             {summary['report']['markdown']}")
    print(f"comparison:  {summary['comparison']}")
    print(f"run folder:  {summary['run_dir']}  (reproduction.json lists every stage)")
    uri = summary["mlflow"]["tracking_uri"]
    if uri:
        print(f"MLflow:      parent run {summary['mlflow']['parent_run_id']} in experiment "
              f"{summary['mlflow']['experiment']!r}")
        print(f"             mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000 "
              "--workers 1   (or: bash scripts/ui.sh)")
    print("Prefect UI:  bash scripts/ui.sh  (it shows the runs recorded in $PREFECT_HOME; "
          "with PREFECT_API_URL=http://127.0.0.1:4200/api runs go to its server)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
