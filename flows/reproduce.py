"""The parent flow: a whole reproduction from a recipe, and its command line.

    python -m flows.reproduce --recipe pipelines/demo.yaml
    python -m flows.reproduce --recipe pipelines/demo.yaml --steps-scale 0.1 --set demo_world.pretrain_images=100
    python -m flows.reproduce --recipe quick    # every stage in about a minute (numbers are noise)

Order: validate the recipe and its inputs (nothing starts before that) -> data (demo world,
downloads, shards of every source and task split) -> for each variant: pretrain (or import the
checkpoint the variant names, e.g. a converted ALBEF release) -> zero-shot
retrieval -> [analyze: codebook usage, retrieval examples, Grad-CAM, if ``report.analysis``]
-> register (``candidate``; ``champion`` if it beats the current one on the recipe's champion
metric by its margin) -> for each task: [NLVR² text assignment] -> finetune -> evaluate ->
register (a ``transfer_from`` task: evaluate the model finetuned on the task it names) -> report
comparing the variants. The stages come from a :class:`flows.plan.Plan` of the
recipe, which the single-stage deployments (:mod:`flows.deployments`) share. With the recipe's
``parallel_variants`` above 1, that many variants go through their stages at once, each in a
thread of this flow run, their training stages as subprocesses sharing the CPU threads
(:func:`for_each_variant`).

MLflow: a parent run per reproduction and a child run per stage that ran; a stage reused from the
store has no run here, and the parent's description (``mlflow.note.content``) lists every stage
with a link to the run that computed it.

Everything content-keyed lives in ``<runs>/store`` (see :mod:`flows.store`): re-running a
finished reproduction re-runs nothing; changing one stage's parameters re-runs that stage and
what depends on it; after a failure, running the same command again continues from the failed
stage. What belongs to this run only goes to ``<runs>/<recipe>-<run id>/``: the resolved recipe,
``reproduction.json`` (every stage's key and folder, the MLflow ids), ``comparison.md`` and copies
of the report.
"""

from __future__ import annotations

import argparse
import contextvars
import logging
import math
import os
import queue
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml
from prefect import flow
from tqdm import tqdm

from codis.cli import DEBUG_ENV, error_message
from codis.files import atomic_write_json, atomic_write_text
from flows import launch, stages
from flows import recipe as recipes
from flows.compare import DEFAULT_METRICS, comparison_table, select_metrics
from flows.plan import Plan, recipe_context
from flows.server import PrefectApiError, prefect_api, prefect_run_tags
from flows.stages import publish_link, run_logger


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def _run_name() -> str:
    """``reproduce[<recipe>]``: the recipe file's name when one is given (the CLI's custom
    recipes), else the chosen recipe's."""
    from prefect.runtime import flow_run

    parameters = flow_run.parameters
    recipe = parameters.get("recipe_file") or parameters.get("recipe") or "demo"
    return f"reproduce[{Path(recipe).stem}]"


@flow(name="reproduce", flow_run_name=_run_name)
def reproduce(recipe: recipes.RecipeName = "demo", overrides: tuple[str, ...] = (),
              steps_scale: float = 0.0, recipe_file: str = "", runs_root: str = "runs",
              run_dir: str = "", run_id: str = "", tracking_uri: str = "", track: bool = True,
              progress: bool = True) -> dict[str, Any]:
    """Reproduce a recipe end to end: data, vision init, pretraining, evaluations, finetuning,
    registration and the report. Stages already done in the store are reused.

    Args:
        recipe: The recipe to reproduce, one of pipelines/*.yaml.
        overrides: Changes to the recipe, one per item, as dotted.path=value (the value is
            YAML), e.g. ``pretrain.train.steps=20`` or ``tasks.vqa.config.k_test=64`` (a task
            by its name or list index). Only the stages a change touches run again.
        steps_scale: Multiply every training step count (e.g. 0.1 for a shorter run); 0 keeps
            the recipe's steps_scale.
        recipe_file: A recipe file outside ``pipelines/`` (a path on the worker); replaces
            recipe.
        runs_root: Folder holding ``store/``, the run folders and the default MLflow store.
        run_dir: This run's folder; empty for ``<runs_root>/<recipe>-<run id>``.
        run_id: This run's id; empty for date-time-random.
        tracking_uri: MLflow tracking URI; empty for ``$MLFLOW_TRACKING_URI``, else
            ``sqlite:///<runs_root>/mlflow.db``.
        track: Record the run in MLflow.
        progress: Show progress bars in the log.
    """
    recipe = recipe_file or recipe
    started = time.time()
    spec = recipes.load_recipe(recipe, overrides or [], steps_scale or None)
    recipes.check_inputs(spec)
    logger = run_logger()
    run_id = run_id or new_run_id()
    root = Path(runs_root).resolve()
    folder = Path(run_dir).resolve() if run_dir else root / f"{spec.name}-{run_id}"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "recipe.yaml", yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))

    ctx = recipe_context(spec, root, tracking_uri=tracking_uri, track=track, progress=progress,
                         run_dir=folder)
    tracker = ctx.tracker
    tracker.end_stale_runs()  # what earlier runs killed with -9 left RUNNING
    recipe_file = str(recipes.recipe_path(recipe).resolve())
    parent = tracker.start_run(f"{spec.name}-{run_id}", tags={
        "codis.kind": "reproduction", "codis.recipe": spec.name, "codis.run_dir": str(folder),
        "codis.recipe_file": recipe_file, **prefect_run_tags()})
    parent.log_params({"recipe": spec.name, "variants": sorted(spec.variants),
                       "tasks": [t.label for t in spec.tasks], "steps_scale": spec.steps_scale,
                       "overrides": list(overrides or []), "run_dir": str(folder)})
    parent.log_artifact(folder / "recipe.yaml")
    ctx.parent_run_id = parent.run_id
    parent_url = tracker.run_url(parent.run_id) if parent.enabled else None
    if parent_url:
        logger.info("MLflow: %s", parent_url)
        publish_link("reproduction-mlflow", parent_url, f"{spec.name}-{run_id} in MLflow")
    from prefect.runtime import flow_run

    summary: dict[str, Any] = {"recipe": spec.name, "recipe_file": recipe_file,
                               "run_id": run_id, "run_dir": str(folder), "store": str(ctx.store.root),
                               "status": "running", "started": started,
                               "mlflow": {"tracking_uri": tracker.uri, "experiment": spec.experiment,
                                          "parent_run_id": parent.run_id},
                               "overrides": list(overrides or []),
                               "prefect_flow_run_id": flow_run.id, "stages": []}
    try:
        _reproduce(Plan(spec, ctx, summary), summary, parent)
    except BaseException as error:
        summary["status"] = "failed"
        _write_summary(folder, summary)
        _describe_stages(parent, summary, tracker)
        tracker.end_after(parent, error)  # FAILED, or KILLED when interrupted
        raise
    summary["status"] = "completed"
    summary["finished"] = time.time()
    _write_summary(folder, summary)
    _describe_stages(parent, summary, tracker)
    parent.log_artifact(folder / "reproduction.json")
    parent.log_artifact(folder / "comparison.md")
    parent.log_artifact(summary["report"]["html"], "report")
    parent.log_artifact(summary["report"]["markdown"], "report")
    tracker.end_run(parent, "FINISHED")
    logger.info("report: %s", summary["report"]["html"])
    return summary


def _write_summary(folder: Path, summary: dict[str, Any]) -> None:
    atomic_write_json(folder / "reproduction.json", summary)


def _describe_stages(parent: Any, summary: dict[str, Any], tracker: Any) -> None:
    """The parent run's description (MLflow's note): every stage of the run, whether it ran or
    was reused, and a link to the MLflow run that computed it (a reused stage has no child run
    under this parent)."""
    lines = [f"Reproduction of recipe **{summary['recipe']}** ({summary['status']}), run folder "
             f"`{summary['run_dir']}`.", "", "| Stage | In this run | Computed by |",
             "|---|---|---|"]
    for item in summary["stages"]:
        source = item.get("mlflow_run_id")
        url = tracker.run_url(source) if source else None
        link = f"[{source[:8]}]({url})" if url else (f"`{source}`" if source else "not tracked")
        lines.append(f"| {item['label']} | {'reused' if item['cached'] else 'ran'} | {link} |")
    parent.set_tags({"mlflow.note.content": "\n".join(lines)})


def _reproduce(plan: Plan, summary: dict[str, Any], parent: Any) -> None:
    spec = plan.spec
    # Data first (every source and task split), then the vision initialisation, so that a bad
    # file or a failed download shows before any training.
    plan.pretrain_shards()
    for task in spec.tasks:
        if task.finetune:
            plan.train_shards(task.label)
        plan.eval_shards(task.label)
    plan.vision_weights()

    summary["variants"] = {name: {"evaluations": [], "registered": {}} for name in spec.variants}

    def variant(name: str) -> None:
        record = summary["variants"][name]
        pre = plan.pretrained(name)
        record["pretrain"] = {"stage": pre.stage, "key": pre.key, "path": pre.path}
        for index, task in enumerate(spec.tasks):
            if task.zero_shot:
                result = plan.evaluation(name, task.label, zero_shot=True)
                record["evaluations"].append({"task": index, "zero_shot": True, "key": result.key})
        analysis = plan.analysis(name)
        if analysis is not None:
            record["analysis"] = {"key": analysis.key}
        record["registered"]["pretrained"] = plan.register_pretrained(name)
        for index, task in enumerate(spec.tasks):
            if not (task.finetune or task.transfer_from is not None):
                continue
            result = plan.evaluation(name, task.label)
            record["evaluations"].append({"task": index, "zero_shot": False, "key": result.key})
            if spec.tracking.register_finetuned and task.finetune:
                record["registered"][task.label] = plan.register_finetuned(name, task.label)
        metrics = {**pre.metrics, **{k: v for _, _, r in plan.evaluations.get(name, [])
                                     for k, v in r.metrics.items()}}
        record["metrics"] = metrics
        parent.log_metrics({f"{name}/{k}": v for k, v in metrics.items()})

    for_each_variant(plan, variant)

    # ---- report ----------------------------------------------------------------------------------
    report = plan.report()
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


def for_each_variant(plan: Plan, work: Callable[[str], None]) -> None:
    """``work(name)`` for every variant of the plan's recipe: one after another, or
    ``parallel_variants`` at a time, each in a thread that carries this flow run's context (its
    stages are tasks of this flow run) while every training stage runs as a subprocess with an
    equal share of the CPU threads (``StageContext.training_threads``) and, on a machine with
    GPUs, of the GPUs (``stages.TRAINING_GPUS``, one share per variant running; its
    evaluations run on the first GPU of its share). The first
    failure, or an interrupt, stops the training subprocesses still running
    (``StageContext.stop``) and is raised once every thread has ended; what finished stays in the
    store. A recipe whose pretraining uses several processes, or a machine with GPUs but fewer
    than the variants at once, runs its variants in turn (with a warning): they would share
    GPUs."""
    names = list(plan.spec.variants)
    at_once = min(plan.spec.parallel_variants, len(names))
    processes = plan.spec.pretrain.nodes * plan.spec.pretrain.gpus_per_node
    gpus = launch.visible_gpus() if at_once > 1 and processes == 1 else []
    shared = (f"each pretraining uses {processes} processes (GPUs)" if processes > 1 else
              f"{len(gpus)} GPU(s) for {at_once} variants at once" if 0 < len(gpus) < at_once
              else None)  # e.g. the demo recipe pretrained with torchrun on 2 GPUs
    if at_once > 1 and shared:
        run_logger().warning("parallel_variants: %d ignored, the variants run in turn: %s, which "
                             "they would share", at_once, shared)
        at_once = 1
    if at_once == 1:
        for name in names:
            work(name)
        return
    ctx = plan.ctx
    ctx.training_threads = max(1, launch.cpu_threads() // at_once)
    run_logger().info("%d variants at a time, each training stage in a subprocess with %d CPU "
                      "thread(s)", at_once, ctx.training_threads)
    share = len(gpus) // at_once
    free_gpus: queue.SimpleQueue[str | None] = queue.SimpleQueue()
    for slot in range(at_once):
        free_gpus.put(",".join(gpus[slot * share:(slot + 1) * share]) if gpus else None)

    def on_free_gpus(name: str) -> None:  # in the variant's own copy of the context
        assigned = free_gpus.get()
        stages.TRAINING_GPUS.set(assigned)
        try:
            work(name)
        finally:
            free_gpus.put(assigned)

    pool = ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="variant")
    futures = [pool.submit(contextvars.copy_context().run, on_free_gpus, name) for name in names]

    def errors() -> list[BaseException]:
        return [f.exception() for f in futures if f.done() and not f.cancelled() and f.exception()]
    try:
        wait(futures, return_when=FIRST_EXCEPTION)
        if errors():
            ctx.stop.set()
    except BaseException:
        ctx.stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        ctx.training_threads = None
    raised = errors()
    first = next((e for e in raised if not isinstance(e, launch.Stopped)), raised[0] if raised else None)
    if first is not None:
        raise first


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


class AboveBars(logging.Handler):
    """Hands each record to a console handler with the terminal's progress bars cleared first and
    redrawn after, so that a log line never lands across a half-drawn bar."""

    def __init__(self, inner: logging.Handler) -> None:
        super().__init__(inner.level)
        self.inner = inner

    def emit(self, record: logging.LogRecord) -> None:
        with tqdm.external_write_mode(file=sys.stderr):
            self.inner.handle(record)


@contextmanager
def log_lines_above_bars() -> Iterator[None]:
    """Meanwhile, the console handlers of the root logger (Prefect's) and of MLflow's logger
    write through :class:`AboveBars`."""
    swapped = []
    for logger in (logging.getLogger(), logging.getLogger("mlflow")):
        for index, handler in enumerate(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.handlers[index] = AboveBars(handler)
                swapped.append((logger, index, handler))
    try:
        yield
    finally:
        for logger, index, handler in swapped:
            logger.handlers[index] = handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.reproduce",
        description="Reproduce a recipe (pipelines/*.yaml) with Prefect and MLflow. Without a "
                    "PREFECT_API_URL the run starts a local Prefect server of its own, which ends "
                    "with it (CODIS_PREFECT_STARTUP_TIMEOUT: seconds to wait for it, default "
                    "300); with one, that API must answer within PREFECT_API_REQUEST_TIMEOUT.")
    parser.add_argument("--recipe", default="pipelines/demo.yaml",
                        help="recipe: a file, or the name of one in pipelines/ (e.g. quick)")
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
    with sigterm_as_exit(), log_lines_above_bars():
        try:
            with prefect_api() as api:  # checked, or a local server stopped when this ends
                print(f"Prefect API: {api.describe()}", flush=True)
                shipped = recipes.shipped_name(recipes.recipe_path(args.recipe))
                summary = reproduce(recipe=shipped or "demo",
                                    recipe_file="" if shipped else args.recipe,
                                    overrides=args.overrides, steps_scale=args.steps_scale or 0.0,
                                    runs_root=args.runs_root, run_dir=args.run_dir or "",
                                    run_id=args.run_id or "", tracking_uri=args.tracking_uri or "",
                                    track=not args.no_tracking, progress=not args.no_progress)
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
