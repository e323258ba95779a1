"""The stages of a reproduction: one Prefect task per stage, each calling one codis (or MLflow)
function on paths, and one deployable flow per stage with typed parameters.

Stages, the one call each makes, and what its folder holds:

* ``generate_demo``: :func:`codis.data.demo_world.generate_demo_world` -> ``world/`` (with its manifest)
* ``download``: :func:`codis.data.download.download` (``download_demo`` for the demo world) -> ``shards/``
* ``shard``: :func:`codis.data.shards.write_shards` -> ``shards/`` (tar files and manifest)
* ``pretrain``: :func:`codis.train.pretrain`, or torchrun -> ``model.pt``, ``run.yaml``, ``metrics.jsonl``
* ``text_assignment``: :func:`codis.tasks.nlvr.text_assignment` -> ``model.pt``, ``metrics.jsonl``
* ``finetune``: ``codis.<task>.finetune`` -> ``model.pt``, ``metrics.jsonl``
* ``evaluate``: ``codis.<task>.evaluate`` -> ``metrics.json``
* ``analyze``: :func:`codis.report.analysis.analyze_checkpoint` -> ``analysis.json``, ``gradcam_*.png``,
  ``images/`` (codebook usage, retrieval examples and Grad-CAM figures for the report)
* ``register``: :meth:`flows.tracking.Tracker.register_checkpoint` -> a model version in MLflow
* ``report``: :func:`codis.report.build_report` -> ``report.md``, ``report.html``, ``results.json``

Each stage runs through :func:`run_stage`: its key comes from its parameters, the source of the
codis modules it runs (:func:`code_fingerprint`) and its inputs (:mod:`flows.store`); a stage already complete in the store is skipped (its MLflow child run is
tagged ``codis.cached=true`` and carries the stored metrics), otherwise it runs in its folder and
its child run records parameters, live training metrics and the outputs' manifests.

Pretraining with one process runs in this process (the callback logs each ``log_every`` step to
MLflow, ``metrics.jsonl`` and the Prefect log); with more it runs
:func:`flows.recipe.torchrun_command` as a subprocess, whose rank 0 appends to ``metrics.jsonl``
(:mod:`flows.pretrain_entry`), which the flow follows and logs the same way. Output of the
subprocess goes to ``pretrain.log`` in the stage folder.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from pydantic import BaseModel, ConfigDict

import codis  # noqa: F401  - the torchvision shim before anything imports timm
from codis.data import demo_world as codis_demo_world
from codis.data import download as codis_download
from codis.data import shards as codis_shards
from codis import train as codis_train
from codis.train import vision_init as codis_vision_init
from codis.config import VisionConfig
from codis.data.demo_world import DemoWorldConfig
from codis.files import atomic_write_json
from flows import recipe as recipes
from flows.recipe import (AnalysisSpec, AnnotationSource, PretrainSpec, Recipe, TaskSpec,
                          UrlSource, VariantSpec, VisionInitSpec)
from flows.store import MARKER, StageOutput, StageResult, Store
from flows.tracking import Tracker, default_artifact_location, default_tracking_uri

_FALLBACK_LOG = logging.getLogger("flows")
# DownloadConfig fields that change only the speed of img2dataset, never the shards.
_SPEED_ONLY = ("processes_count", "thread_count", "distributor")
def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow or task run, a plain logger elsewhere."""
    try:
        return get_run_logger()
    except MissingContextError:
        return _FALLBACK_LOG


_STAGE_ROOTS = {"generate_demo": "codis.data.demo_world", "shard": "codis.data.shards",
                "pretrain": "codis.train", "vision_init": "codis.train.vision_init",
                "text_assignment": "codis.tasks.nlvr", "report": "codis.report",
                "analyze": "codis.report.analysis"}
# Data stages hash their own module only: editing codis/config.py must not re-shard COCO. The
# download stage hashes no codis code at all (re-downloading millions of images for an edit of
# codis/data/download.py would be absurd): img2dataset's version stands for what it writes.
_OWN_MODULE_ONLY = {"generate_demo", "shard"}
_SOURCE_CACHE: dict[str, tuple[str, tuple[str, ...]]] = {}


def _module_source(name: str) -> tuple[str, tuple[str, ...]] | None:
    """(sha256[:12] of the source, codis modules it imports) of a codis module, or None if
    ``name`` is not a module (e.g. a name imported from the ``codis`` package)."""
    if name not in _SOURCE_CACHE:
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:
            spec = None
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            return None
        source = Path(spec.origin).read_bytes()
        imported: list[str] = []
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                    (node.module == "codis" or node.module.startswith("codis.")):
                # "from codis import losses", "from codis.data import shards" name modules
                if importlib.util.find_spec(node.module).submodule_search_locations is not None:
                    imported += [f"{node.module}.{alias.name}" for alias in node.names]
                imported.append(node.module)
            elif isinstance(node, ast.Import):
                imported += [a.name for a in node.names if a.name.split(".")[0] == "codis"]
        _SOURCE_CACHE[name] = (hashlib.sha256(source).hexdigest()[:12], tuple(imported))
    return _SOURCE_CACHE[name]


def code_fingerprint(stage: str, task: str | None = None) -> dict[str, str]:
    """``{module: sha256[:12] of its source}`` for the codis module a training, evaluation or
    report stage calls and every codis module it imports, transitively (data stages: see
    ``_OWN_MODULE_ONLY``). Part of the stage's parameters: changed codis code re-runs the stages
    whose code changed (and what depends on them), and each marker records the code that
    produced its folder."""
    if stage == "download":
        from importlib.metadata import version

        return {"img2dataset": version("img2dataset")}
    root = f"codis.tasks.{task}" if stage in ("finetune", "evaluate") else _STAGE_ROOTS.get(stage)
    if root is None:
        return {}
    if stage in _OWN_MODULE_ONLY:
        return {root: _module_source(root)[0]}
    found: dict[str, str] = {}
    pending = [root, "codis"]
    while pending:
        name = pending.pop()
        if name in found:
            continue
        module = _module_source(name)
        if module is None:
            continue
        found[name], imports = module
        pending += imports
    return dict(sorted(found.items()))


def _prefect_ids() -> dict[str, str | None]:
    from prefect.runtime import flow_run, task_run

    return {"prefect_flow_run_id": flow_run.id, "prefect_task_run_id": task_run.id}


# ---- context -------------------------------------------------------------------------------------
@dataclass
class StageContext:
    """Where the stages of one flow run write (the store) and record (MLflow), and under which
    MLflow parent run."""

    store: Store
    tracker: Tracker
    parent_run_id: str | None = None
    run_dir: Path | None = None
    progress: bool = True


class StageOptions(BaseModel):
    """Where a stage writes and records (shown as a group in the Prefect UI's run form).

    ``store``: the shared stage store. ``tracking_uri``: MLflow; empty uses ``MLFLOW_TRACKING_URI``,
    else ``sqlite:///<store's parent>/mlflow.db``. ``track: false`` turns MLflow off.
    ``parent_run_id``: an MLflow run to attach this stage's run to."""

    model_config = ConfigDict(extra="forbid")

    store: str = "runs/store"
    tracking_uri: str | None = None
    track: bool = True
    experiment: str = "codis-stages"
    parent_run_id: str | None = None
    progress: bool = True


def resolve_tracking_uri(tracking_uri: str | None, runs_root: str | Path) -> str:
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(runs_root)


def make_context(options: StageOptions) -> StageContext:
    store = Store(options.store)
    runs_root = store.root.parent
    tracker = Tracker(resolve_tracking_uri(options.tracking_uri, runs_root) if options.track else None,
                      options.experiment,
                      artifact_location=default_artifact_location(runs_root, options.experiment))
    return StageContext(store=store, tracker=tracker, parent_run_id=options.parent_run_id,
                        progress=options.progress)


# ---- running one stage ---------------------------------------------------------------------------
Work = Callable[[Path, Any], StageOutput]


def run_stage(ctx: StageContext, stage: str, label: str, params: dict[str, Any],
              inputs: dict[str, Any], work: Work, *, tags: dict[str, Any] | None = None,
              ) -> StageResult:
    """Run ``work(folder, mlflow_run)`` as stage ``stage`` unless it is complete in the store; in
    both cases record an MLflow child run ``<stage>[<label>]`` under ``ctx.parent_run_id``."""
    logger = run_logger()
    params = {**params, "code": code_fingerprint(stage, params.get("task"))}
    key, _ = ctx.store.prepare(stage, params, inputs)
    folder = ctx.store.folder(stage, key)
    found = ctx.store.lookup(stage, key)
    name = f"{stage}[{label}]" if label else stage
    run_tags = {"codis.stage": stage, "codis.stage_key": key, "codis.stage_dir": str(folder),
                "codis.cached": "true" if found else "false", **(tags or {})}
    with ctx.tracker.stage_run(name, parent=ctx.parent_run_id, tags=run_tags, params=params) as run:
        if found is not None:
            logger.info("%s: already done, skipping (%s)", name, folder)
            run.set_tags({"codis.source_run_id": found.marker.get("provenance", {}).get("mlflow_run_id")})
            run.log_metrics(found.metrics)
            return found
        logger.info("%s: running in %s", name, folder)
        provenance = {"label": label, "mlflow_run_id": run.run_id,
                      "run_dir": str(ctx.run_dir) if ctx.run_dir else None, **_prefect_ids()}
        result = ctx.store.run(
            stage, params, inputs, lambda path: work(path, run), key=key, provenance=provenance,
            on_wait=lambda: logger.info("%s: the same stage is running elsewhere; waiting", name))
        if result.cached:  # finished by a concurrent run while this one waited for the lock
            run.set_tags({"codis.cached": "true"})
        # Training metrics went out step by step already; the rest (evaluations, counts) now.
        run.log_metrics({k: v for k, v in result.metrics.items() if k not in run.logged})
        run.log_artifact(Path(result.path) / MARKER, "stage")
        logger.info("%s: done in %.1f s", name, result.marker.get("duration_s", 0.0))
        return result


class MetricsSink:
    """Training metrics of one stage: appended to ``metrics.jsonl``, logged to the MLflow run as
    ``<prefix>.<name>`` at their step, and to the Prefect log as a progress line."""

    def __init__(self, run: Any, prefix: str, label: str, total_steps: int,
                 jsonl: Path | None = None) -> None:
        self.run, self.prefix, self.label, self.total = run, prefix, label, total_steps
        self.jsonl = jsonl
        self.last: dict[str, float] = {}
        self.logger = run_logger()

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        """The ``callback`` of codis's training functions."""
        if self.jsonl is not None:
            with open(self.jsonl, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step, **metrics}) + "\n")
        self.record(step, metrics)

    def record(self, step: int, metrics: dict[str, float]) -> None:
        self.last = {"step": float(step), **{k: float(v) for k, v in metrics.items()}}
        self.run.log_metrics({f"{self.prefix}.{k}": v for k, v in metrics.items()}, step=step)
        shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("loss", "ica", "itm", "mlm", "code",
                                                             "accuracy", "lr") if k in metrics)
        self.logger.info("%s: step %d/%d  %s", self.label, step, self.total, shown)

    def final(self) -> dict[str, float]:
        return {f"{self.prefix}.{k}": v for k, v in self.last.items() if k != "step"}


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, float]]]:
    """``(step, metrics)`` records of a ``metrics.jsonl``; a later record of a step replaces an
    earlier one (a resumed run repeats the steps after its last checkpoint)."""
    path = Path(path)
    if not path.is_file():
        return []
    records: dict[int, dict[str, float]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by a crash
        step = int(item.pop("step"))
        records[step] = item
    return sorted(records.items())


# ---- shard folders -------------------------------------------------------------------------------
def shard_listing(folder: str | Path) -> tuple[list[str], int]:
    """The tar files (in manifest order) and sample count of a folder written by
    :func:`codis.data.shards.write_shards` or :func:`codis.data.download.download`."""
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    names = [entry["name"] for entry in manifest["shards"]]
    samples = manifest["num_samples"] if "num_samples" in manifest else manifest["totals"]["successes"]
    return [str(folder / name) for name in names], int(samples)


def shard_files(folders: Sequence[str | Path]) -> list[str]:
    return [tar for folder in folders for tar in shard_listing(folder)[0]]


def shard_samples(folders: Sequence[str | Path]) -> int:
    return sum(shard_listing(folder)[1] for folder in folders)


def shard_argument(folders: Sequence[str | Path]) -> str | list[str]:
    """What the task functions get: one write_shards folder as is (its manifest's kind is then
    checked by codis), several as the list of their tar files."""
    return str(folders[0]) if len(folders) == 1 else shard_files(folders)


# ---- stage functions (plain Python; the Prefect tasks below wrap them) ---------------------------
def generate_demo_stage(ctx: StageContext, world: DemoWorldConfig, label: str = "demo",
                        ) -> StageResult:
    """Render the demo world (annotation files in ALBEF's formats, images, url list)."""
    params = {"config": world.to_dict(), "generator_version": codis_demo_world.GENERATOR_VERSION}

    def work(folder: Path, run: Any) -> StageOutput:
        manifest = codis_demo_world.generate_demo_world(folder / "world", world, progress=ctx.progress)
        run.log_artifact(folder / "world" / "manifest.json", "manifest")
        return StageOutput(outputs={"world": "world", "manifest": "world/manifest.json"},
                           metrics={"demo_world.images": float(sum(manifest["images"].values())),
                                    "demo_world.pretrain_pairs": float(manifest["pretrain_pairs"])})

    return run_stage(ctx, "generate_demo", label, params, {}, work)


def download_stage(ctx: StageContext, source: UrlSource, world: str | None = None) -> StageResult:
    """Download a URL list with img2dataset into webdataset shards (the demo's over loopback)."""
    url_list = recipes.resolve_path(source.url_list, world, f"{source.name}.url_list")
    demo = source.url_list.startswith(recipes.DEMO_SCHEME)
    config = source.download
    params = {"download": {k: v for k, v in config.to_dict().items() if k not in _SPEED_ONLY},
              "base_url": source.base_url, "served_from_demo_world": demo}

    def work(folder: Path, run: Any) -> StageOutput:
        out = folder / "shards"
        if demo:
            root = recipes.resolve_path(recipes.DEMO_SCHEME, world, f"{source.name}.url_list")
            manifest = codis_download.download_demo(root, out, config, progress=ctx.progress)
        else:
            manifest = codis_download.download(url_list, out, config, base_url=source.base_url,
                                               progress=ctx.progress)
        run.log_artifact(out / "manifest.json", "manifest")
        totals = manifest["totals"]
        prefix = f"download.{source.name}"
        return StageOutput(outputs={"shards": "shards", "samples": int(totals["successes"])},
                           metrics={f"{prefix}.samples": float(totals["successes"]),
                                    f"{prefix}.rows": float(totals["count"]),
                                    f"{prefix}.success_rate": float(totals["success_rate"])})

    return run_stage(ctx, "download", source.name, params, {"url_list": url_list}, work,
                     tags={"codis.dataset": source.name})


def shard_stage(ctx: StageContext, source: AnnotationSource, kind: str, world: str | None = None,
                label: str | None = None) -> StageResult:
    """Write ALBEF annotation file(s) and their images as webdataset shards of ``kind``."""
    label = label or source.name or kind
    files = [recipes.resolve_path(a, world, f"{label}.annotations.{i}")
             for i, a in enumerate(source.annotations)]
    image_root = recipes.resolve_path(source.image_root, world, f"{label}.image_root")
    params = {"kind": kind, "samples_per_shard": source.samples_per_shard}

    def work(folder: Path, run: Any) -> StageOutput:
        records: list[dict] = []
        for path in files:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise ValueError(f"{path}: an ALBEF annotation file is a JSON list of records")
            records += data
        out = folder / "shards"
        manifest = codis_shards.write_shards(
            records, image_root, out, kind=kind, samples_per_shard=source.samples_per_shard,
            source={"annotations": [str(p) for p in files]}, progress=ctx.progress)
        run.log_artifact(out / "manifest.json", "manifest")
        return StageOutput(outputs={"shards": "shards", "samples": int(manifest["num_samples"])},
                           metrics={f"shard.{label}.samples": float(manifest["num_samples"])})

    return run_stage(ctx, "shard", label, params, {"annotations": files, "image_root": image_root},
                     work, tags={"codis.dataset": label, "codis.kind": kind})


def _follow(process: subprocess.Popen, jsonl: Path, sink: MetricsSink, poll: float = 1.0) -> None:
    """Wait for ``process``, feeding each new line of ``jsonl`` to ``sink`` as it appears."""
    offset = jsonl.stat().st_size if jsonl.is_file() else 0  # earlier attempts were logged then
    pending = ""
    while True:
        finished = process.poll() is not None
        if jsonl.is_file():
            with open(jsonl, encoding="utf-8") as handle:
                handle.seek(offset)
                pending += handle.read()
                offset = handle.tell()
            *lines, pending = pending.split("\n")
            for line in lines:
                if line.strip():
                    item = json.loads(line)
                    sink.record(int(item.pop("step")), item)
        if finished:
            return
        time.sleep(poll)


def _tail(path: Path, lines: int = 30) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def vision_init_stage(ctx: StageContext, spec: VisionInitSpec, vision: VisionConfig,
                      world: str | None = None, steps_scale: float = 1.0) -> StageResult:
    """Train the variants' ViT on labelled images (:func:`codis.train.vision_init.pretrain_vision`);
    its weights file initialises every variant's image encoder."""
    annotations = recipes.resolve_path(spec.annotations, world, "vision_init.annotations")
    held_out = (None if spec.eval_annotations is None else
                recipes.resolve_path(spec.eval_annotations, world, "vision_init.eval_annotations"))
    image_root = recipes.resolve_path(spec.image_root, world, "vision_init.image_root")
    train, optim = recipes.scale_schedule(spec.train, spec.optim, steps_scale)
    params = {"vision": dataclasses.asdict(vision), "train": dataclasses.asdict(train),
              "optim": dataclasses.asdict(optim)}
    inputs = {"annotations": annotations, "image_root": image_root,
              **({"eval_annotations": held_out} if held_out is not None else {})}

    def work(folder: Path, run: Any) -> StageOutput:
        sink = MetricsSink(run, "vision_init", "vision_init", train.steps)
        sink.jsonl = folder / "metrics.jsonl"
        codis_vision_init.pretrain_vision(vision, annotations, image_root, folder, train=train,
                                          optim=optim, eval_annotations=held_out, callback=sink,
                                          progress=ctx.progress)
        scores = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        return StageOutput(
            outputs={"weights": codis_vision_init.WEIGHTS, "metrics": "metrics.json"},
            metrics={**sink.final(), **{f"vision_init.{k}": float(v) for k, v in scores.items()
                                        if k.startswith("balanced_accuracy")}})

    return run_stage(ctx, "vision_init", "vision_init", params, inputs, work)


def pretrain_stage(ctx: StageContext, name: str, variant: VariantSpec, spec: PretrainSpec,
                   shards: Sequence[str], steps_scale: float = 1.0,
                   vision_weights: str | None = None) -> StageResult:
    """Pretrain one model variant on the tar files of ``shards`` (folders of shard stages);
    ``vision_weights`` (a vision_init stage's weights file) initialises its ViT."""
    tars = shard_files(shards)
    config = recipes.pretrain_config(spec, variant, tars, "<stage folder>", steps_scale,
                                     where=f"variants.{name}")
    if vision_weights is not None:
        vision = dataclasses.replace(config.model.vision, pretrained=str(vision_weights))
        config = dataclasses.replace(config, model=config.model.replace(vision=vision))
    run_config = config.to_dict()
    run_config.pop("output_dir")
    run_config["data"].pop("shards")  # the inputs' identities stand for them in the key
    inputs: dict[str, Any] = {"shards": tars}
    if vision_weights is not None:  # likewise the vision_init stage's weights file
        run_config["model"]["vision"].pop("pretrained")
        inputs["vision_init"] = Path(vision_weights)
    world_size = spec.nodes * spec.gpus_per_node
    params = {"run": run_config, "world_size": world_size,
              "global_batch": recipes.global_batch(config.train, spec.nodes, spec.gpus_per_node),
              "reference_batch": spec.reference_batch}

    def work(folder: Path, run: Any) -> StageOutput:
        final_config = dataclasses.replace(config, output_dir=str(folder))
        run_yaml = final_config.save(folder / "run.yaml")
        run.log_artifact(run_yaml, "config")
        jsonl = folder / "metrics.jsonl"
        sink = MetricsSink(run, "pretrain", f"pretrain[{name}]", final_config.train.steps)
        if recipes.launcher(spec) == "inprocess":
            sink.jsonl = jsonl
            codis_train.pretrain(final_config, callback=sink, progress=ctx.progress)
        else:
            command = recipes.torchrun_command(spec, run_yaml, metrics=jsonl,
                                               rdzv_id=f"codis-{folder.name}")
            (folder / "command.txt").write_text(" ".join(command) + "\n", encoding="utf-8")
            run_logger().info("pretrain[%s]: %s", name, " ".join(command))
            log_path = folder / "pretrain.log"
            with open(log_path, "ab") as log_file:
                process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL)
                try:
                    _follow(process, jsonl, sink)
                except BaseException:
                    process.terminate()
                    process.wait()
                    raise
            if process.returncode != 0:
                raise RuntimeError(f"pretraining exited with status {process.returncode}; last "
                                   f"lines of {log_path}:\n{_tail(log_path)}")
        model = folder / "model.pt"
        if not model.is_file():
            raise RuntimeError(f"pretraining finished without writing {model}")
        return StageOutput(outputs={"model": "model.pt", "run_config": "run.yaml",
                                    "metrics": "metrics.jsonl"},
                           metrics=sink.final() or _final_from_jsonl(jsonl, "pretrain"))

    return run_stage(ctx, "pretrain", name, params, inputs, work,
                     tags={"codis.variant": name, "codis.mode": config.model.mode,
                           "codis.launcher": recipes.launcher(spec)})


def _final_from_jsonl(path: Path, prefix: str) -> dict[str, float]:
    records = read_jsonl(path)
    return {f"{prefix}.{k}": float(v) for k, v in records[-1][1].items()} if records else {}


def text_assignment_stage(ctx: StageContext, spec: TaskSpec, pretrained: str,
                          pretrain_shards: Sequence[str], steps_scale: float = 1.0,
                          variant: str | None = None) -> StageResult:
    """ALBEF's NLVR² text-assignment step on the pretraining shards."""
    assert spec.text_assignment is not None
    tars = shard_files(pretrain_shards)
    config = recipes.task_config(spec)
    train, optim = recipes.text_assignment_schedule(spec, shard_samples(pretrain_shards), steps_scale)
    args = spec.text_assignment.args
    params = {"task": spec.task, "config": dataclasses.asdict(config),
              "train": dataclasses.asdict(train), "optim": dataclasses.asdict(optim), "args": args}
    label = f"{spec.label}/{variant}" if variant else spec.label

    def work(folder: Path, run: Any) -> StageOutput:
        sink = MetricsSink(run, f"{spec.label}.ta", f"text_assignment[{label}]", train.steps,
                           folder / "metrics.jsonl")
        recipes.task_module("nlvr").text_assignment(
            pretrained, tars, folder, config, train=train, optim=optim, callback=sink,
            progress=ctx.progress, **args)
        return StageOutput(outputs={"model": "model.pt", "metrics": "metrics.jsonl"},
                           metrics=sink.final())

    return run_stage(ctx, "text_assignment", label, params,
                     {"pretrained": pretrained, "shards": tars}, work,
                     tags={"codis.task": spec.task, "codis.dataset": spec.name, "codis.variant": variant})


def finetune_stage(ctx: StageContext, spec: TaskSpec, pretrained: str, train_shards: Sequence[str],
                   world: str | None = None, steps_scale: float = 1.0,
                   variant: str | None = None) -> StageResult:
    """Finetune a pretrained (or TA) checkpoint on one task's training shards."""
    config = recipes.task_config(spec)
    train, optim = recipes.task_schedule(spec, shard_samples(train_shards), steps_scale)
    args = recipes.resolve_arguments(spec.finetune_args, world, f"{spec.label}.finetune_args")
    path_args = {k: v for k, v in args.items() if recipes.is_path_argument(spec.finetune_args[k])}
    params = {"task": spec.task, "config": dataclasses.asdict(config),
              "train": dataclasses.asdict(train), "optim": dataclasses.asdict(optim),
              "args": {k: v for k, v in args.items() if k not in path_args}}
    shards = shard_argument(train_shards)
    label = f"{spec.label}/{variant}" if variant else spec.label

    def work(folder: Path, run: Any) -> StageOutput:
        sink = MetricsSink(run, f"{spec.label}.train", f"finetune[{label}]", train.steps,
                           folder / "metrics.jsonl")
        recipes.task_module(spec.task).finetune(
            pretrained, shards, folder, config, train=train, optim=optim, callback=sink,
            progress=ctx.progress, **args)
        return StageOutput(outputs={"model": "model.pt", "metrics": "metrics.jsonl"},
                           metrics=sink.final())

    inputs = {"pretrained": pretrained, "shards": shard_files(train_shards),
              **{f"args.{k}": v for k, v in path_args.items()}}
    return run_stage(ctx, "finetune", label, params, inputs, work,
                     tags={"codis.task": spec.task, "codis.dataset": spec.name, "codis.variant": variant})


def evaluate_stage(ctx: StageContext, spec: TaskSpec, checkpoint: str, eval_shards: str,
                   world: str | None = None, zero_shot: bool = False,
                   variant: str | None = None) -> StageResult:
    """Evaluate a checkpoint on one task's evaluation shards (zero-shot: the pretrained one)."""
    config = recipes.task_config(spec)
    args = recipes.resolve_arguments(spec.evaluate_args, world, f"{spec.label}.evaluate_args")
    path_args = {k: v for k, v in args.items() if recipes.is_path_argument(spec.evaluate_args[k])}
    params = {"task": spec.task, "config": dataclasses.asdict(config), "zero_shot": zero_shot,
              "args": {k: v for k, v in args.items() if k not in path_args}}
    label = f"{spec.label}{'.zs' if zero_shot else ''}/{variant}" if variant else spec.label

    def work(folder: Path, run: Any) -> StageOutput:
        found = recipes.task_module(spec.task).evaluate(checkpoint, eval_shards, config,
                                                        progress=ctx.progress, **args)
        atomic_write_json(folder / "metrics.json", found)
        return StageOutput(outputs={"metrics": "metrics.json"},
                           metrics={recipes.metric_name(spec, k, zero_shot): float(v)
                                    for k, v in found.items()})

    inputs = {"checkpoint": checkpoint, "shards": eval_shards,
              **{f"args.{k}": v for k, v in path_args.items()}}
    return run_stage(ctx, "evaluate", label, params, inputs, work,
                     tags={"codis.task": spec.task, "codis.dataset": spec.name,
                           "codis.variant": variant, "codis.zero_shot": str(zero_shot).lower()})


def analyze_stage(ctx: StageContext, spec: TaskSpec, checkpoint: str, eval_shards: str,
                  settings: AnalysisSpec, variant: str | None = None) -> StageResult:
    """Codebook usage, retrieval examples and Grad-CAM figures of a pretrained checkpoint on a
    retrieval task's evaluation shards, read as that task's evaluation reads them."""
    config = recipes.task_config(spec)
    params = {"config": dataclasses.asdict(config), "analysis": settings.model_dump(mode="json")}
    label = f"{spec.label}/{variant}" if variant else spec.label

    def work(folder: Path, run: Any) -> StageOutput:
        from codis.report import analysis as codis_analysis

        found = codis_analysis.analyze_checkpoint(
            checkpoint, eval_shards, folder, config=config, examples=settings.examples,
            top_k=settings.top_k, gradcam_words=settings.gradcam_words, progress=ctx.progress)
        run.log_artifact(folder / codis_analysis.ANALYSIS_FILE, "analysis")
        metrics = {f"analysis.codebook.{source}.{name}": float(usage[name])
                   for source, usage in (found["codebook"] or {}).items()
                   for name in ("used", "entropy", "perplexity")}
        return StageOutput(outputs={"analysis": codis_analysis.ANALYSIS_FILE}, metrics=metrics)

    inputs = {"checkpoint": checkpoint, "shards": eval_shards}
    return run_stage(ctx, "analyze", label, params, inputs, work,
                     tags={"codis.task": spec.task, "codis.dataset": spec.name,
                           "codis.variant": variant})


def register_stage(ctx: StageContext, model_name: str, checkpoint: str, *, label: str,
                   score_name: str | None = None, score: float | None = None,
                   tags: dict[str, Any] | None = None) -> dict[str, Any]:
    """Register a checkpoint in the MLflow model registry (``candidate``, maybe ``champion``).

    Not a store stage (its result lives in MLflow): it is idempotent through the version tag
    ``codis.stage_key``, so a re-run registers nothing new."""
    key, ids = ctx.store.prepare("register", {"model": model_name, "score_name": score_name,
                                              "score": score}, {"checkpoint": checkpoint})
    logger = run_logger()
    if not ctx.tracker.enabled:
        logger.info("register[%s]: MLflow tracking is off; not registered", label)
        return {"registered": False, "reason": "tracking is off"}
    run_tags = {"codis.stage": "register", "codis.stage_key": key, "codis.checkpoint": checkpoint,
                **(tags or {})}
    with ctx.tracker.stage_run(f"register[{label}]", parent=ctx.parent_run_id, tags=run_tags,
                               params={"model": model_name, "score_name": score_name}) as run:
        info = ctx.tracker.register_checkpoint(run, model_name, checkpoint, stage_key=key,
                                               score_name=score_name, score=score, tags=tags)
        run.set_tags({"codis.cached": "false" if info.get("registered") else "true",
                      "codis.model_version": info.get("version")})
        if score is not None and score_name:
            run.log_metrics({score_name: score})
    logger.info("register[%s]: %s version %s %s", label, model_name, info.get("version"),
                "aliases " + ", ".join(info.get("aliases", [])) if info.get("registered")
                else f"({info.get('reason')})")
    return info


def report_stage(ctx: StageContext, recipe: Recipe, pretrained: dict[str, StageResult],
                 evaluations: dict[str, list[tuple[TaskSpec, bool, StageResult]]],
                 world: StageResult | None = None,
                 extra_stages: Sequence[StageResult] = (),
                 analyses: dict[str, StageResult] | None = None) -> StageResult:
    """Build the Markdown/HTML report comparing the variants (:func:`codis.report.build_report`);
    ``analyses``: the variants' analyze stages (codebook, retrieval examples, Grad-CAM)."""
    from codis.report import analysis as codis_analysis
    from codis import report as codis_report

    params = {"recipe": recipe.name, "report": recipe.report.model_dump(mode="json"),
              "variants": {name: {"preset": v.preset, "paper": v.paper}
                           for name, v in recipe.variants.items()}}
    inputs: dict[str, Any] = {f"pretrain.{name}": str(Path(r.path) / "metrics.jsonl")
                              for name, r in pretrained.items()}
    for name, items in evaluations.items():
        for spec, zero_shot, result in items:
            key = recipes.metric_name(spec, "metrics", zero_shot)
            inputs[f"evaluate.{name}.{key}"] = str(result.file("metrics"))
    analyses = analyses or {}
    for name, result in analyses.items():
        inputs[f"analysis.{name}"] = str(result.file("analysis"))
    if world is not None:
        inputs["world_manifest"] = str(world.file("manifest"))
    stages = [*([world] if world else []), *extra_stages, *pretrained.values(),
              *(r for items in evaluations.values() for _, _, r in items), *analyses.values()]

    def work(folder: Path, run: Any) -> StageOutput:
        results = report_results(recipe, pretrained, evaluations)
        atomic_write_json(folder / "results.json", results)
        variants = {}
        for name, result in pretrained.items():
            metrics: dict[str, dict[str, float]] = {}
            for spec, zero_shot, evaluation in evaluations.get(name, []):
                key = report_task_key(spec, zero_shot)
                if key not in metrics:  # the report shows one dataset per task: the recipe's first
                    metrics[key] = json.loads(evaluation.file("metrics").read_text(encoding="utf-8"))
            curve = [(step, {k: v for k, v in values.items() if k in ("loss", "ica", "itm", "mlm", "code")})
                     for step, values in read_jsonl(Path(result.path) / "metrics.jsonl")]
            analysis = codis_analysis.read_analysis(analyses[name].path) if name in analyses else {}
            variants[name] = codis_report.VariantResults(loss_curve=curve, metrics=metrics,
                                                         **analysis)
        baselines = {}
        if world is not None:
            manifest = json.loads(world.file("manifest").read_text(encoding="utf-8"))
            baselines = codis_report.trivial_baselines(manifest)
        wall_times = {stage_label(s): float(s.marker.get("duration_s", 0.0)) for s in stages}
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        inputs_ = codis_report.ReportInputs(
            variants=variants, recipe=recipe.name,
            machine=codis_report.MachineInfo.current(device), baselines=baselines,
            wall_times=wall_times,
            dataset=("the demo world (a generated toy dataset)" if recipe.demo_world is not None
                     else recipe.description or recipe.name),
            preset=", ".join(sorted({v.preset for v in recipe.variants.values()})))
        written = codis_report.build_report(inputs_, folder)
        run.log_artifact(written["markdown"], "report")
        run.log_artifact(written["html"], "report")
        return StageOutput(outputs={"markdown": Path(written["markdown"]).name,
                                    "html": Path(written["html"]).name, "results": "results.json"})

    result = run_stage(ctx, "report", recipe.name, params, inputs, work)
    publish_report_artifact(result)
    return result


def publish_report_artifact(result: StageResult) -> None:
    """The report as a Prefect artifact of the flow run (the UI's Artifacts tab), also when the
    report stage was cached; the self-contained HTML stays in the stage folder and MLflow."""
    from prefect.artifacts import create_markdown_artifact

    markdown = result.file("markdown").read_text(encoding="utf-8")
    try:
        create_markdown_artifact(markdown=markdown, key="codis-report",
                                 description=f"report of this reproduction; HTML: {result.file('html')}")
    except MissingContextError:  # called outside a flow run (tests, scripts)
        pass


def stage_label(result: StageResult) -> str:
    """``<stage>[<label>]`` of a stage result (its label is kept in the marker's provenance)."""
    label = result.marker.get("provenance", {}).get("label")
    return f"{result.stage}[{label}]" if label else f"{result.stage}[{result.key}]"


def report_task_key(spec: TaskSpec, zero_shot: bool) -> str:
    """The :data:`codis.report.TASKS` key of an evaluation."""
    if spec.task == "retrieval":
        return "retrieval_zero_shot" if zero_shot else "retrieval_finetuned"
    return spec.task


def report_results(recipe: Recipe, pretrained: dict[str, StageResult],
                   evaluations: dict[str, list[tuple[TaskSpec, bool, StageResult]]],
                   ) -> dict[str, Any]:
    """``results.json``: every variant's metrics under their MLflow names, and the stage folders."""
    out: dict[str, Any] = {"recipe": recipe.name, "variants": {}}
    for name, result in pretrained.items():
        metrics = dict(result.metrics)
        stages = {"pretrain": result.path}
        for spec, zero_shot, evaluation in evaluations.get(name, []):
            metrics.update(evaluation.metrics)
            stages[recipes.metric_name(spec, "evaluate", zero_shot)] = evaluation.path
        out["variants"][name] = {"preset": recipe.variants[name].preset,
                                 "paper": recipe.variants[name].paper,
                                 "mode": recipes.model_config(recipe.variants[name]).mode,
                                 "metrics": metrics, "stages": stages}
    return out


# ---- Prefect tasks -------------------------------------------------------------------------------
# NO_CACHE: whether a stage runs is decided by the store's markers (which work across processes and
# without a server); Prefect's own cache would hide a stage from MLflow and from the store.
_TASK_OPTIONS: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}

generate_demo_task = task(generate_demo_stage, name="generate_demo", task_run_name="generate_demo",
                          **_TASK_OPTIONS)
download_task = task(download_stage, name="download", task_run_name="download[{source.name}]",
                     **_TASK_OPTIONS)
shard_task = task(shard_stage, name="shard", task_run_name="shard[{label}]", **_TASK_OPTIONS)
vision_init_task = task(vision_init_stage, name="vision_init", task_run_name="vision_init",
                        **_TASK_OPTIONS)
pretrain_task = task(pretrain_stage, name="pretrain", task_run_name="pretrain[{name}]", **_TASK_OPTIONS)
text_assignment_task = task(text_assignment_stage, name="text_assignment",
                            task_run_name="text_assignment[{spec.name}/{variant}]", **_TASK_OPTIONS)
finetune_task = task(finetune_stage, name="finetune",
                     task_run_name="finetune[{spec.task}.{spec.name}/{variant}]", **_TASK_OPTIONS)


def _evaluate_run_name() -> str:
    from prefect.runtime import task_run

    p = task_run.parameters
    spec, variant = p["spec"], p.get("variant")
    return (f"evaluate[{spec.label}{'.zs' if p.get('zero_shot') else ''}"
            f"{'/' + variant if variant else ''}]")


evaluate_task = task(evaluate_stage, name="evaluate", task_run_name=_evaluate_run_name,
                     **_TASK_OPTIONS)
register_task = task(register_stage, name="register", task_run_name="register[{label}]",
                     **_TASK_OPTIONS)
analyze_task = task(analyze_stage, name="analyze", task_run_name="analyze[{spec.name}/{variant}]",
                    **_TASK_OPTIONS)
report_task = task(report_stage, name="report", task_run_name="report", **_TASK_OPTIONS)


# ---- one deployable flow per stage ---------------------------------------------------------------
_TINY_WORLD = DemoWorldConfig(
    pretrain_images=200, retrieval_images={"train": 60, "val": 20, "test": 40},
    vqa_images={"train": 60, "val": 30, "test": 10}, nlvr_pairs={"train": 80, "dev": 30, "test": 30},
    ve_images={"train": 60, "dev": 30, "test": 30})


@flow(name="generate_demo")
def generate_demo(world: DemoWorldConfig = _TINY_WORLD,
                  options: StageOptions = StageOptions()) -> dict[str, Any]:
    """Generate a demo world (images + ALBEF-format annotations) into the store."""
    return generate_demo_task(make_context(options), world).to_dict()


@flow(name="download")
def download(source: UrlSource, world: str | None = None,
             options: StageOptions = StageOptions()) -> dict[str, Any]:
    """Download a URL list with img2dataset. ``world``: the demo world folder, for ``demo://``
    url lists (the output of the generate_demo flow, ``.../world``)."""
    return download_task(make_context(options), source, world).to_dict()


@flow(name="shard")
def shard(source: AnnotationSource,
          kind: Literal["pretrain", "retrieval_train", "retrieval_eval", "vqa", "nlvr", "ve"],
          world: str | None = None, options: StageOptions = StageOptions()) -> dict[str, Any]:
    """Write ALBEF annotation files and their images as webdataset shards."""
    return shard_task(make_context(options), source, kind, world,
                      label=source.name or kind).to_dict()


@flow(name="vision_init")
def vision_init(settings: VisionInitSpec, vision: dict[str, Any], world: str | None = None,
                steps_scale: float = 1.0, options: StageOptions = StageOptions()) -> dict[str, Any]:
    """Train a ViT (``vision``: :class:`codis.config.VisionConfig` fields) on labelled images; its
    weights file is the ``vision_weights`` of the pretrain flow."""
    config = recipes.build_vision_config(vision)
    return vision_init_task(make_context(options), settings, config, world, steps_scale).to_dict()


@flow(name="pretrain")
def pretrain(variant: VariantSpec, settings: PretrainSpec, shards: list[str],
             name: str = "codis", steps_scale: float = 1.0, vision_weights: str | None = None,
             options: StageOptions = StageOptions()) -> dict[str, Any]:
    """Pretrain one model variant on shard folders (outputs of the download / shard flows);
    ``vision_weights``: the vision_init flow's weights file for its ViT."""
    return pretrain_task(make_context(options), name, variant, settings, shards,
                         steps_scale, vision_weights).to_dict()


@flow(name="register")
def register(model_name: str, checkpoint: str, score_name: str | None = None,
             score: float | None = None, options: StageOptions = StageOptions()) -> dict[str, Any]:
    """Register a checkpoint (``model.pt``) in MLflow with the candidate / champion aliases."""
    return register_task(make_context(options), model_name, checkpoint, label=model_name,
                         score_name=score_name, score=score)


@flow(name="finetune")
def finetune(task_spec: TaskSpec, pretrained: str, train_shards: list[str],
             world: str | None = None, steps_scale: float = 1.0,
             options: StageOptions = StageOptions()) -> dict[str, Any]:
    """Finetune a pretrained checkpoint on one task (retrieval / vqa / nlvr / ve)."""
    return finetune_task(make_context(options), task_spec, pretrained, train_shards, world,
                         steps_scale).to_dict()


@flow(name="evaluate")
def evaluate(task_spec: TaskSpec, checkpoint: str, eval_shards: str, world: str | None = None,
             zero_shot: bool = False, options: StageOptions = StageOptions()) -> dict[str, Any]:
    """Evaluate a checkpoint on one task's evaluation shards."""
    return evaluate_task(make_context(options), task_spec, checkpoint, eval_shards, world,
                         zero_shot).to_dict()


@flow(name="analyze")
def analyze(task_spec: TaskSpec, checkpoint: str, eval_shards: str,
            settings: AnalysisSpec = AnalysisSpec(), options: StageOptions = StageOptions(),
            ) -> dict[str, Any]:
    """Codebook usage, retrieval examples and Grad-CAM figures of a pretrained checkpoint on a
    retrieval task's evaluation shards (the report's qualitative sections)."""
    return analyze_task(make_context(options), task_spec, checkpoint, eval_shards,
                        settings).to_dict()


@flow(name="report")
def report(summary: str, options: StageOptions = StageOptions()) -> dict[str, Any]:
    """Rebuild the report of a reproduction from its ``reproduction.json``."""
    from flows.reproduce import report_from_summary

    return report_from_summary(make_context(options), summary).to_dict()


STAGE_FLOWS = (generate_demo, download, shard, vision_init, pretrain, register, finetune, evaluate,
               analyze, report)
