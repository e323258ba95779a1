"""The stages of a reproduction: one function per stage, each building its parameters and calling
one codis (or MLflow) function on paths, and the Prefect task that wraps it.

Stages, the one call each makes, and what its folder holds:

* ``generate_demo``: :func:`codis.data.demo_world.generate_demo_world` -> ``world/`` (with its manifest)
* ``download``: :func:`codis.data.download.download` (``download_demo`` for the demo world) -> ``shards/``
* ``shard``: :func:`codis.data.shards.write_shards` -> ``shards/`` (tar files and manifest)
* ``vision_init``: :func:`codis.train.vision_init.pretrain_vision` -> ``vision.safetensors``
* ``pretrain``: :func:`codis.train.pretrain`, or torchrun -> ``model.pt``, ``run.yaml``, ``metrics.jsonl``
* ``text_assignment``: :func:`codis.tasks.nlvr.text_assignment` -> ``model.pt``, ``metrics.jsonl``
* ``finetune``: ``codis.tasks.<task>.finetune`` -> ``model.pt``, ``metrics.jsonl``
* ``evaluate``: ``codis.tasks.<task>.evaluate``, or ``codis evaluate`` under torchrun -> ``metrics.json``
* ``analyze``: :func:`codis.report.analysis.analyze_checkpoint` -> ``analysis.json``, ``gradcam_*.png``,
  ``images/`` (codebook usage, retrieval examples and Grad-CAM figures for the report)
* ``register``: :meth:`flows.tracking.Tracker.register_checkpoint` -> a model version in MLflow
* ``report``: :func:`codis.report.collect.report_from_stage_outputs` -> ``report.md``,
  ``report.html``, ``results.json``

Each stage runs through :func:`run_stage`: its key comes from its parameters, the source of the
codis modules it runs (:func:`flows.fingerprint.code_fingerprint`) and its inputs
(:mod:`flows.store`); a stage already complete in the store is skipped (its MLflow child run is
tagged ``codis.cached=true`` and carries the stored metrics), otherwise it runs in its folder and
its child run records parameters, live training metrics and the outputs' manifests. Once a
training stage (vision_init, pretrain, text_assignment, finetune) is complete, its resumable training state
goes (:func:`drop_training_state`) unless the recipe's ``store.keep_training_state`` keeps it.

Pretraining with one process runs in this process (the callback logs each ``log_every`` step to
MLflow, ``metrics.jsonl`` and the Prefect log); with more it runs
:func:`flows.launch.torchrun_command` as a subprocess, whose rank 0 appends to ``metrics.jsonl``
(:mod:`flows.pretrain_entry`), which the flow follows and logs the same way. Evaluation with more
than one process runs :func:`flows.launch.evaluate_command` likewise and reads back the
``metrics.json`` its rank 0 writes. When the flow trains several stages at once
(``StageContext.training_threads``, set by a recipe's ``parallel_variants``), every pretraining,
text-assignment and finetuning stage runs as a subprocess with its share of the CPU threads
(:mod:`flows.pretrain_entry`; :mod:`flows.finetune_entry`), followed the same way, on its
variant's share of the GPUs where there are GPUs (:data:`TRAINING_GPUS`). A finetuning or
text-assignment stage writes what it trains as ``job.json`` in its folder either way, and trains
it with the same :func:`flows.finetune_entry.run_job`. A subprocess's output goes to
``<stage>.log`` in the stage folder. The deployable flow of each stage is in
:mod:`flows.deployments`.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import logging
import re
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

import codis  # noqa: F401  - the torchvision shim before anything imports timm
from codis import albef as codis_albef
from codis import train as codis_train
from codis.config import ModelConfig, VisionConfig
from codis.data import demo_world as codis_demo_world
from codis.data import download as codis_download
from codis.data import shards as codis_shards
from codis.data.demo_world import DemoWorldConfig
from codis.data.manifest import MANIFEST, read_annotations, shard_files, shard_samples
from codis.files import atomic_write_json
from codis.model import load_model
from codis.tasks import TASKS
from codis.report import analysis as codis_analysis
from codis.report import RunScale, StageTime
from codis.report.collect import describe_machine, read_metrics_jsonl, report_from_stage_outputs
from codis.train import global_batch, scale_schedule
from codis.train import vision_init as codis_vision_init
from flows import finetune_entry, launch
from flows import recipe as recipes
from flows.fingerprint import code_fingerprint
from flows.recipe import (AnalysisSpec, AnnotationSource, PretrainSpec, Recipe, TaskSpec,
                          UrlSource, VariantSpec, VisionInitSpec)
from flows.server import prefect_run_tags
from flows.store import MARKER, StageOutput, StageResult, Store
from flows.tracking import Tracker, checkpoint_loader

_FALLBACK_LOG = logging.getLogger("flows")
# DownloadConfig fields that change only the speed of img2dataset, never the shards.
_SPEED_ONLY = ("processes_count", "thread_count", "distributor")


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow or task run, a plain logger elsewhere."""
    try:
        return get_run_logger()
    except MissingContextError:
        return _FALLBACK_LOG


def _prefect_ids() -> dict[str, str | None]:
    from prefect.runtime import flow_run, task_run

    return {"prefect_flow_run_id": flow_run.id, "prefect_task_run_id": task_run.id}


# ---- context -------------------------------------------------------------------------------------
@dataclass
class StageContext:
    """Where the stages of one flow run write (the store) and record (MLflow), and under which
    MLflow parent run.

    ``training_threads``: None trains in this process; a number runs each pretraining,
    text-assignment and finetuning stage as a subprocess with that many CPU threads, so that
    several can train at once (:func:`flows.reproduce.reproduce` with ``parallel_variants``).
    Setting ``stop`` ends those subprocesses (:class:`flows.launch.Stopped`)."""

    store: Store
    tracker: Tracker
    parent_run_id: str | None = None
    run_dir: Path | None = None
    progress: bool = True
    keep_training_state: bool = False
    training_threads: int | None = None
    stop: threading.Event = field(default_factory=threading.Event)


TRAINING_GPUS: contextvars.ContextVar[str | None] = contextvars.ContextVar("training_gpus",
                                                                          default=None)
"""The GPUs (``CUDA_VISIBLE_DEVICES``) of the training subprocesses started from this context:
set per variant by :func:`flows.reproduce.for_each_variant` when variants train side by side on
a machine with GPUs, so that each variant has its own. The stages that run in the flow's process
(evaluation, analysis) use the first of them."""


# ---- running one stage ---------------------------------------------------------------------------
Work = Callable[[Path, Any], StageOutput]


def run_stage(ctx: StageContext, stage: str, label: str, params: dict[str, Any],
              inputs: dict[str, Any], work: Work, *, tags: dict[str, Any] | None = None,
              verify: Sequence[str] = (), logged_params: dict[str, Any] | None = None,
              ) -> StageResult:
    """Run ``work(folder, mlflow_run)`` as stage ``stage`` unless it is complete in the store.

    A stage that runs gets an MLflow child run ``<stage>[<label>]`` under ``ctx.parent_run_id``
    (parameters: ``logged_params``, default ``params``; the stage's metrics; a link in the Prefect
    log and as a link artifact; the metrics as a Prefect table artifact). A stage found complete
    creates no run: the run that computed it is named in its marker (``provenance``), which the
    parent records. ``verify``: the stage's shard folders, checked against their manifests before
    a completed stage is reused (one that fails runs again: :meth:`flows.store.Store.lookup`)."""
    logger = run_logger()
    params = {**params, "code": code_fingerprint(stage, params.get("task"))}
    key, _ = ctx.store.prepare(stage, params, inputs)
    folder = ctx.store.folder(stage, key)
    name = f"{stage}[{label}]" if label else stage
    found = ctx.store.lookup(stage, key, verify=verify, log=logger.warning)
    if found is not None:
        source = source_run_id(found)
        url = ctx.tracker.run_url(source) if source else None
        logger.info("%s: already done, reused (%s%s)", name, folder,
                    f"; computed in MLflow run {url or source}" if source else "")
        return found
    run_tags = {"codis.stage": stage, "codis.stage_key": key, "codis.stage_dir": str(folder),
                **prefect_run_tags(), **(tags or {})}
    logged = {**(params if logged_params is None else logged_params), "code": params["code"]}
    with ctx.tracker.stage_run(name, parent=ctx.parent_run_id, tags=run_tags, params=logged) as run:
        url = ctx.tracker.run_url(run.run_id) if run.enabled else None
        logger.info("%s: running in %s%s", name, folder, f"; MLflow run {url}" if url else "")
        provenance = {"label": label, "mlflow_run_id": run.run_id,
                      "run_dir": str(ctx.run_dir) if ctx.run_dir else None, **_prefect_ids()}
        result = ctx.store.run(
            stage, params, inputs, lambda path: work(path, run), key=key, provenance=provenance,
            verify=verify,
            on_wait=lambda: logger.info("%s: the same stage is running elsewhere; waiting", name))
        if result.cached:  # finished by a concurrent run while this one waited for the lock
            run.set_tags({"codis.cached": "true", "codis.source_run_id": source_run_id(result)})
        # Training metrics went out step by step already; the rest (evaluations, counts) now.
        run.log_metrics({k: v for k, v in result.metrics.items() if k not in run.logged})
        run.log_artifact(Path(result.path) / MARKER, "stage")
        logger.info("%s: done in %.1f s", name, result.marker.get("duration_s", 0.0))
    publish_stage_artifacts(name, result, url)
    return result


def source_run_id(result: StageResult) -> str | None:
    """The MLflow run that computed a stage (``run_stage`` records it in the marker)."""
    return result.marker.get("provenance", {}).get("mlflow_run_id")


def _artifact_key(name: str) -> str:
    """A Prefect artifact key (lower-case letters, digits and dashes) from a stage name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def publish_stage_artifacts(name: str, result: StageResult, mlflow_url: str | None) -> None:
    """A finished stage in the Prefect UI's Artifacts tab: its metrics as a table and a link to
    its MLflow run (nothing outside a flow run)."""
    from prefect.artifacts import create_table_artifact

    if result.metrics:
        _in_flow_run(lambda: create_table_artifact(
            [{"metric": k, "value": round(v, 6)} for k, v in sorted(result.metrics.items())],
            key=f"{_artifact_key(name)}-metrics", description=f"{name}: metrics ({result.path})"))
    if mlflow_url:
        publish_link(f"{_artifact_key(name)}-mlflow", mlflow_url, f"{name} in MLflow")


def publish_link(key: str, url: str, text: str) -> None:
    """A link artifact of the current Prefect flow run (nothing outside one)."""
    from prefect.artifacts import create_link_artifact

    _in_flow_run(lambda: create_link_artifact(url, link_text=text, key=key, description=text))


def _in_flow_run(publish: Callable[[], Any]) -> None:
    """Run ``publish`` (an artifact) inside a flow or task run only: outside one (a script, a
    test calling a stage function) there is no run to attach it to."""
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is not None or TaskRunContext.get() is not None:
        publish()


class MetricsSink:
    """Training metrics of one stage: appended to ``metrics.jsonl``, logged to the MLflow run as
    ``<prefix>.<name>`` at their step, and to the Prefect log as a progress line."""

    def __init__(self, run: Any, prefix: str, label: str, total_steps: int,
                 jsonl: Path | None = None, renamed: dict[str, str] | None = None) -> None:
        self.run, self.prefix, self.label, self.total = run, prefix, label, total_steps
        self.jsonl = jsonl
        self.renamed = renamed or {}  # metric names in MLflow that differ from metrics.jsonl's
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
        self.run.log_metrics({self.name(k): v for k, v in metrics.items()}, step=step)
        shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("loss", "ica", "itm", "mlm", "code",
                                                             "accuracy", "lr") if k in metrics)
        self.logger.info("%s: step %d/%d  %s", self.label, step, self.total, shown)

    def name(self, metric: str) -> str:
        return f"{self.prefix}.{self.renamed.get(metric, metric)}"

    def final(self) -> dict[str, float]:
        return {self.name(k): v for k, v in self.last.items() if k != "step"}


# ---- shard folders ----------------------------------------------------------------------------
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
        run.log_artifact(out / MANIFEST, "manifest")
        totals = manifest["totals"]
        prefix = f"download.{source.name}"
        return StageOutput(outputs={"shards": "shards", "samples": int(totals["successes"])},
                           metrics={f"{prefix}.samples": float(totals["successes"]),
                                    f"{prefix}.rows": float(totals["count"]),
                                    f"{prefix}.success_rate": float(totals["success_rate"])})

    return run_stage(ctx, "download", source.name, params, {"url_list": url_list}, work,
                     tags={"codis.dataset": source.name}, verify=["shards"])


def shard_stage(ctx: StageContext, source: AnnotationSource, kind: str, world: str | None = None,
                label: str | None = None) -> StageResult:
    """Write ALBEF annotation file(s) and their images as webdataset shards of ``kind``."""
    label = label or source.name or kind
    files = [recipes.resolve_path(a, world, f"{label}.annotations.{i}")
             for i, a in enumerate(source.annotations)]
    image_root = (None if source.image_root is None else
                  recipes.resolve_path(source.image_root, world, f"{label}.image_root"))
    image_roots = {name: recipes.resolve_path(root, world, f"{label}.image_roots.{name}")
                   for name, root in source.image_roots.items()}
    params = {"kind": kind, "samples_per_shard": source.samples_per_shard,
              **({"image_prefix": source.image_prefix} if source.image_prefix else {})}

    def work(folder: Path, run: Any) -> StageOutput:
        out = folder / "shards"
        manifest = codis_shards.write_shards(
            read_annotations(files), image_root, out, kind=kind,
            samples_per_shard=source.samples_per_shard,
            source={"annotations": [str(p) for p in files]}, progress=ctx.progress,
            image_roots=image_roots or None, image_prefix=source.image_prefix)
        run.log_artifact(out / MANIFEST, "manifest")
        return StageOutput(outputs={"shards": "shards", "samples": int(manifest["num_samples"])},
                           metrics={f"shard.{label}.samples": float(manifest["num_samples"])})

    inputs = {"annotations": files, "image_root": image_root,
              **{f"image_roots.{name}": root for name, root in image_roots.items()}}
    return run_stage(ctx, "shard", label, params, inputs,
                     work, tags={"codis.dataset": label, "codis.kind": kind}, verify=["shards"])


def vision_init_stage(ctx: StageContext, spec: VisionInitSpec, vision: VisionConfig,
                      world: str | None = None, steps_scale: float = 1.0) -> StageResult:
    """Train the variants' ViT on labelled images (:func:`codis.train.vision_init.pretrain_vision`);
    its weights file initialises every variant's image encoder."""
    annotations = recipes.resolve_path(spec.annotations, world, "vision_init.annotations")
    held_out = (None if spec.eval_annotations is None else
                recipes.resolve_path(spec.eval_annotations, world, "vision_init.eval_annotations"))
    image_root = recipes.resolve_path(spec.image_root, world, "vision_init.image_root")
    train, optim = scale_schedule(spec.train, spec.optim, steps_scale)
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

    return drop_training_state(
        ctx, run_stage(ctx, "vision_init", "vision_init", params, inputs, work))


def pretrain_stage(ctx: StageContext, name: str, variant: VariantSpec, spec: PretrainSpec,
                   shards: Sequence[str], steps_scale: float = 1.0,
                   vision_weights: str | None = None) -> StageResult:
    """Pretrain one model variant on the tar files of ``shards`` (folders of shard stages);
    ``vision_weights`` (a vision_init stage's weights file) initialises its ViT."""
    tars = shard_files(shards)
    # The same function builds torchrun's run.yaml for multi-node runs (flows.pretrain_entry).
    config = launch.pretrain_run_config(spec, name, variant, shards, "<stage folder>", steps_scale,
                                        vision_weights)
    run_config = config.to_dict()
    run_config.pop("output_dir")
    run_config["data"].pop("shards")  # the inputs' identities stand for them in the key
    inputs: dict[str, Any] = {"shards": tars}
    if vision_weights is not None:  # likewise the vision_init stage's weights file
        run_config["model"]["vision"].pop("pretrained")
        inputs["vision_init"] = Path(vision_weights)
    world_size = spec.nodes * spec.gpus_per_node
    params = {"run": run_config, "world_size": world_size,
              "global_batch": global_batch(config.train, spec.nodes, spec.gpus_per_node),
              "reference_batch": spec.reference_batch}

    def work(folder: Path, run: Any) -> StageOutput:
        final_config = dataclasses.replace(config, output_dir=str(folder))
        run_yaml = final_config.save(folder / "run.yaml")
        run.log_artifact(run_yaml, "config")
        jsonl = folder / "metrics.jsonl"
        # The total loss sums different terms in different modes: not one comparable metric.
        sink = MetricsSink(run, "pretrain", f"pretrain[{name}]", final_config.train.steps,
                           renamed={"loss": f"loss_{config.model.mode}"})
        if launch.launcher(spec) == "inprocess" and ctx.training_threads is None:
            sink.jsonl = jsonl
            codis_train.pretrain(final_config, callback=sink, progress=ctx.progress)
        else:
            command = (launch.pretrain_command(run_yaml, jsonl)
                       if launch.launcher(spec) == "inprocess" else
                       launch.torchrun_command(spec, run_yaml, metrics=jsonl,
                                               rdzv_id=f"codis-{folder.name}"))
            launch.run_logged(command, folder, "pretrain", jsonl=jsonl, on_record=sink.record,
                              label=f"pretrain[{name}]", logger=run_logger(),
                              env=_thread_environment(ctx), stop=ctx.stop)
        model = folder / "model.pt"
        if not model.is_file():
            raise RuntimeError(f"pretraining finished without writing {model}")
        # The report describes the machine that trained: this one (torchrun runs on it too).
        return StageOutput(outputs={"model": "model.pt", "run_config": "run.yaml",
                                    "metrics": "metrics.jsonl"},
                           metrics=sink.final() or _final_from_jsonl(jsonl, sink),
                           info={"machine": describe_machine()})

    return drop_training_state(ctx, run_stage(
        ctx, "pretrain", name, params, inputs, work,
        tags={"codis.variant": name, "codis.mode": config.model.mode,
              "codis.launcher": launch.launcher(spec)},
        logged_params={"variant": name, **params,
                       "run": {**run_config, "model": used_model_params(config.model)}}))


def import_checkpoint_stage(ctx: StageContext, name: str, variant: VariantSpec) -> StageResult:
    """A variant's pretrained model from ``variant.checkpoint`` instead of pretraining: with
    ``checkpoint_format: albef`` a released ALBEF checkpoint converted to the variant's model
    config (:func:`codis.albef.convert_albef_checkpoint`, which also checks that every tensor is
    placed), else one of ours, checked to load as that config and copied. Downstream stages read
    it as they read a pretraining stage's ``model.pt``."""
    config = recipes.model_config(variant, where=f"variants.{name}.model")
    source = recipes.resolve_path(variant.checkpoint, None, f"variants.{name}.checkpoint")
    params = {"format": variant.checkpoint_format, "model": config.to_dict()}

    def work(folder: Path, run: Any) -> StageOutput:
        model = folder / "model.pt"
        info: dict[str, Any] = {"source": str(source)}
        if variant.checkpoint_format == "albef":
            report = codis_albef.convert_albef_checkpoint(source, model, config)
            info["conversion"] = report.to_dict()
            atomic_write_json(folder / "conversion.json", report.to_dict())
            run.log_artifact(folder / "conversion.json", "conversion")
        else:
            load_model(source, config)  # the architecture the recipe names, or ConfigError
            shutil.copyfile(source, model)
        (folder / "metrics.jsonl").write_text("", encoding="utf-8")  # no pretraining curve
        return StageOutput(outputs={"model": "model.pt", "metrics": "metrics.jsonl"}, info=info)

    return run_stage(ctx, "import_checkpoint", name, params, {"checkpoint": source}, work,
                     tags={"codis.variant": name, "codis.mode": config.mode},
                     logged_params={"variant": name, "format": variant.checkpoint_format,
                                    "checkpoint": str(source), "model": used_model_params(config)})


def used_model_params(model: ModelConfig) -> dict[str, Any]:
    """The model configuration without the fields its mode does not use (ALBEF's modes have no
    codebook), so that MLflow shows a mode only the parameters that act on it."""
    values = model.to_dict()
    if model.codebook_features == "off":
        values.pop("codebook")
        values["loss_weights"].pop("code")
    return values


TRAINING_STATE = "checkpoints"
"""Where :func:`codis.train.fit` keeps a stage's resumable training state (``step-*.pt``)."""


def drop_training_state(ctx: StageContext, result: StageResult) -> StageResult:
    """Delete a finished training stage's resumable state unless the recipe keeps it
    (``store.keep_training_state``). Called after the marker is written: a kill before it leaves
    the state for the re-run to resume from, a kill after it leaves files that the next run
    which uses the stage deletes (a cached stage included)."""
    if not ctx.keep_training_state:
        shutil.rmtree(Path(result.path) / TRAINING_STATE, ignore_errors=True)
    return result


def _thread_environment(ctx: StageContext) -> dict[str, str] | None:
    if ctx.training_threads is None:
        return None
    gpus = TRAINING_GPUS.get()
    return {**launch.thread_environment(ctx.training_threads),
            **({"CUDA_VISIBLE_DEVICES": gpus} if gpus is not None else {})}


def _variant_device() -> str | None:
    """The device of a stage that runs in the flow's process: its variant's first GPU, if any."""
    return launch.gpu_device(TRAINING_GPUS.get())


def _train_job(ctx: StageContext, folder: Path, sink: MetricsSink, job: dict[str, Any]) -> None:
    """Train a finetuning or text-assignment ``job`` (:mod:`flows.finetune_entry`; written to the
    stage folder as ``job.json``): in this process, or with ``ctx.training_threads`` set in its
    own process with that many CPU threads, following the metrics it appends to
    ``metrics.jsonl``."""
    job = {**job, "output_dir": str(folder)}
    job_file = folder / "job.json"
    atomic_write_json(job_file, job)
    if ctx.training_threads is None:
        finetune_entry.run_job(job, callback=sink, progress=ctx.progress)
        return
    jsonl = folder / "metrics.jsonl"
    launch.run_logged(launch.finetune_command(job_file, jsonl), folder, job["function"],
                      jsonl=jsonl, on_record=sink.record, label=sink.label, logger=run_logger(),
                      env=_thread_environment(ctx), stop=ctx.stop)


def _final_from_jsonl(path: Path, sink: MetricsSink) -> dict[str, float]:
    records = read_metrics_jsonl(path)
    return {sink.name(k): float(v) for k, v in records[-1][1].items()} if records else {}


def text_assignment_stage(ctx: StageContext, spec: TaskSpec, pretrained: str,
                          pretrain_shards: Sequence[str], steps_scale: float = 1.0,
                          variant: str | None = None) -> StageResult:
    """ALBEF's NLVR² text-assignment step on the pretraining shards."""
    assert spec.text_assignment is not None
    tars = shard_files(pretrain_shards)
    config = recipes.task_config(spec)
    train, optim = recipes.text_assignment_schedule(spec, shard_samples(pretrain_shards), steps_scale)
    params = {"task": spec.task, "config": dataclasses.asdict(config),
              "train": dataclasses.asdict(train), "optim": dataclasses.asdict(optim)}
    label = f"{spec.label}/{variant}" if variant else spec.label

    def work(folder: Path, run: Any) -> StageOutput:
        sink = MetricsSink(run, f"{spec.label}.ta", f"text_assignment[{label}]", train.steps,
                           folder / "metrics.jsonl")
        _train_job(ctx, folder, sink, {"function": "text_assignment", **params,
                                       "pretrained": pretrained, "shards": [str(t) for t in tars]})
        return StageOutput(outputs={"model": "model.pt", "metrics": "metrics.jsonl"},
                           metrics=sink.final())

    return drop_training_state(ctx, run_stage(
        ctx, "text_assignment", label, params, {"pretrained": pretrained, "shards": tars}, work,
        tags={"codis.task": spec.task, "codis.dataset": spec.name, "codis.variant": variant}))


def finetune_stage(ctx: StageContext, spec: TaskSpec, pretrained: str, train_shards: Sequence[str],
                   world: str | None = None, steps_scale: float = 1.0,
                   variant: str | None = None) -> StageResult:
    """Finetune a pretrained (or TA) checkpoint on one task's training shards."""
    config = recipes.task_config(spec)
    train, optim = recipes.task_schedule(spec, shard_samples(train_shards), steps_scale)
    params = {"task": spec.task, "config": dataclasses.asdict(config),
              "train": dataclasses.asdict(train), "optim": dataclasses.asdict(optim)}
    shards = shard_argument(train_shards)
    label = f"{spec.label}/{variant}" if variant else spec.label

    def work(folder: Path, run: Any) -> StageOutput:
        sink = MetricsSink(run, f"{spec.label}.train", f"finetune[{label}]", train.steps,
                           folder / "metrics.jsonl")
        _train_job(ctx, folder, sink, {"function": "finetune", **params,
                                       "pretrained": pretrained, "shards": shards})
        return StageOutput(outputs={"model": "model.pt", "metrics": "metrics.jsonl"},
                           metrics=sink.final())

    inputs = {"pretrained": pretrained, "shards": shard_files(train_shards)}
    return drop_training_state(ctx, run_stage(
        ctx, "finetune", label, params, inputs, work,
        tags={"codis.task": spec.task, "codis.dataset": spec.name, "codis.variant": variant}))


def evaluate_stage(ctx: StageContext, spec: TaskSpec, checkpoint: str, eval_shards: str,
                   world: str | None = None, zero_shot: bool = False,
                   variant: str | None = None, processes: int = 1) -> StageResult:
    """Evaluate a checkpoint on one task's evaluation shards (zero-shot: the pretrained one), in
    this process, or with ``processes`` > 1 under torchrun (``codis evaluate``). The process
    count is not part of the key: it changes how fast the metrics come, not what they are."""
    if processes < 1:
        raise ValueError(f"processes: must be at least 1, got {processes}")
    config = recipes.task_config(spec)
    args = recipes.resolve_arguments(spec.evaluate_args, world, f"{spec.label}.evaluate_args")
    path_args = {k: v for k, v in args.items() if recipes.is_path_argument(spec.evaluate_args[k])}
    params = {"task": spec.task, "config": dataclasses.asdict(config), "zero_shot": zero_shot,
              "args": {k: v for k, v in args.items() if k not in path_args}}
    label = f"{spec.label}{'.zs' if zero_shot else ''}/{variant}" if variant else spec.label

    def work(folder: Path, run: Any) -> StageOutput:
        metrics_file = folder / "metrics.json"
        # VQA writes its predictions as the evaluation server's result file: for a split without
        # answers (test-dev, test-std) that file is the result, the server scores it.
        task_args = ({**args, "result_file": str(folder / VQA_RESULT)} if spec.task == "vqa"
                     else args)
        if processes == 1:
            found = TASKS[spec.task].module().evaluate(
                checkpoint, eval_shards, config, progress=ctx.progress,
                device=_variant_device(), **task_args)
            atomic_write_json(metrics_file, found)
        else:
            command = launch.evaluate_command(
                spec.task, checkpoint, eval_shards, metrics_file, preset=spec.preset,
                config=dataclasses.asdict(config), options=task_args, processes=processes,
                progress=ctx.progress)
            launch.run_logged(command, folder, "evaluate", label=f"evaluate[{label}]",
                              logger=run_logger(), stop=ctx.stop)
            if not metrics_file.is_file():
                raise RuntimeError(f"evaluation finished without writing {metrics_file}")
            found = json.loads(metrics_file.read_text(encoding="utf-8"))
        outputs = {"metrics": "metrics.json"}
        if (folder / VQA_RESULT).is_file():
            outputs["result"] = VQA_RESULT
            run.log_artifact(folder / VQA_RESULT, "result")
        return StageOutput(outputs=outputs,
                           metrics={recipes.metric_name(spec, k, zero_shot): float(v)
                                    for k, v in found.items()})

    inputs = {"checkpoint": checkpoint, "shards": eval_shards,
              **{f"args.{k}": v for k, v in path_args.items()}}
    return run_stage(ctx, "evaluate", label, params, inputs, work,
                     tags={"codis.task": spec.task, "codis.dataset": spec.name,
                           "codis.variant": variant, "codis.zero_shot": str(zero_shot).lower(),
                           "codis.processes": processes})


VQA_RESULT = "vqa_result.json"
"""The evaluation server's result file (``[{question_id, answer}]``) that a VQA evaluation writes
into its stage folder: what a split without answers (test-dev) is scored from."""


def analyze_stage(ctx: StageContext, spec: TaskSpec, checkpoint: str, eval_shards: str,
                  settings: AnalysisSpec, variant: str | None = None) -> StageResult:
    """Codebook usage, retrieval examples and Grad-CAM figures of a pretrained checkpoint on a
    retrieval task's evaluation shards, read as that task's evaluation reads them."""
    config = recipes.task_config(spec)
    params = {"config": dataclasses.asdict(config), "analysis": settings.model_dump(mode="json")}
    label = f"{spec.label}/{variant}" if variant else spec.label

    def work(folder: Path, run: Any) -> StageOutput:
        found = codis_analysis.analyze_checkpoint(
            checkpoint, eval_shards, folder, config=config, examples=settings.examples,
            top_k=settings.top_k, gradcam_words=settings.gradcam_words,
            gradcam_vocabulary=settings.gradcam_vocabulary,
            device=_variant_device(), progress=ctx.progress)
        run.log_artifact(folder / codis_analysis.ANALYSIS_FILE, "analysis")
        metrics = {f"analysis.codebook.{source}.{name}": float(usage[name])
                   for source, usage in (found["codebook"] or {}).items()
                   for name in ("used", "entropy", "perplexity")}
        if found.get("itm_auc") is not None:
            metrics["analysis.itm_auc"] = float(found["itm_auc"])
        return StageOutput(outputs={"analysis": codis_analysis.ANALYSIS_FILE}, metrics=metrics)

    inputs = {"checkpoint": checkpoint, "shards": eval_shards}
    return run_stage(ctx, "analyze", label, params, inputs, work,
                     tags={"codis.task": spec.task, "codis.dataset": spec.name,
                           "codis.variant": variant})


def register_stage(ctx: StageContext, model_name: str, trained: StageResult, *, label: str,
                   score_name: str | None = None, score: float | None = None, margin: float = 0.0,
                   tags: dict[str, Any] | None = None) -> dict[str, Any]:
    """Register the ``model.pt`` of a training stage (pretrain or finetune) in the MLflow model
    registry, as an MLflow model logged in the run that trained it (``candidate``; ``champion``
    when ``score`` beats the current champion's by more than ``margin``).

    Not a store stage (its result lives in MLflow) and no run of its own: it is idempotent through
    the version tag ``codis.stage_key``, so a re-run registers nothing new."""
    checkpoint = str(trained.file("model"))
    key, _ = ctx.store.prepare("register", {"model": model_name, "score_name": score_name,
                                            "score": score}, {"checkpoint": checkpoint})
    logger = run_logger()
    if not ctx.tracker.enabled:
        logger.info("register[%s]: MLflow tracking is off; not registered", label)
        return {"registered": False, "reason": "tracking is off"}
    task = trained.marker.get("params", {}).get("task") if trained.stage != "pretrain" else None
    info = ctx.tracker.register_checkpoint(
        model_name, checkpoint, stage_key=key, load=checkpoint_loader(task),
        source_run_id=source_run_id(trained), label=label,
        parent=ctx.parent_run_id, score_name=score_name, score=score, margin=margin,
        tags={"codis.checkpoint": checkpoint, **(tags or {})})
    logger.info("register[%s]: %s version %s %s", label, model_name, info.get("version"),
                "aliases " + ", ".join(info.get("aliases", [])) if info.get("registered")
                else f"({info.get('reason')})")
    return info


def report_stage(ctx: StageContext, recipe: Recipe, pretrained: dict[str, StageResult],
                 evaluations: dict[str, list[tuple[TaskSpec, bool, StageResult]]],
                 world: StageResult | None = None,
                 analyses: dict[str, StageResult] | None = None,
                 timeline: dict[str, Any] | None = None) -> StageResult:
    """Build the Markdown/HTML report comparing the variants
    (:func:`codis.report.collect.report_from_stage_outputs`); ``analyses``: the variants' analyze
    stages (codebook, retrieval examples, Grad-CAM). ``timeline``: the run's record so far
    (``reproduction.json``: its start, its overrides, every stage it ran or reused), for the
    report's wall-time table and its statement of scale."""
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
    timeline = timeline or {}
    wall_times = [StageTime(item["label"], float(item.get("duration_s") or 0.0), bool(item["cached"]))
                  for item in timeline.get("stages", [])]
    started = timeline.get("started")
    scale = RunScale(steps_scale=recipe.steps_scale, overrides=tuple(timeline.get("overrides", [])),
                     world_size=recipe.pretrain.nodes * recipe.pretrain.gpus_per_node,
                     recipe_file=timeline.get("recipe_file"))

    # The report shows one dataset per task: the recipe's first.
    shown: dict[str, dict[str, str]] = {}
    for name, items in evaluations.items():
        for spec, zero_shot, result in items:
            shown.setdefault(name, {}).setdefault(report_task_key(spec, zero_shot),
                                                  str(result.file("metrics")))
    machine = next(iter(pretrained.values())).marker.get("info", {}).get("machine") \
        if pretrained else None

    def work(folder: Path, run: Any) -> StageOutput:
        atomic_write_json(folder / "results.json", report_results(recipe, pretrained, evaluations))
        written = report_from_stage_outputs(
            folder, recipe=recipe.name,
            pretrain_metrics={name: str(r.file("metrics")) for name, r in pretrained.items()},
            evaluations=shown, analyses={name: r.path for name, r in analyses.items()},
            world_manifest=world.file("manifest") if world is not None else None,
            machine=machine, wall_times=wall_times,
            run_seconds=time.time() - started if started else None, scale=scale,
            dataset=("the demo world (a generated toy dataset)" if recipe.demo_world is not None
                     else recipe.description or recipe.name),
            preset=", ".join(sorted({v.preset for v in recipe.variants.values()})))
        run.log_artifact(written["markdown"], "report")
        run.log_artifact(written["html"], "report")
        return StageOutput(outputs={"markdown": Path(written["markdown"]).name,
                                    "html": Path(written["html"]).name,
                                    "artifact": Path(written["artifact"]).name,
                                    "results": "results.json"})

    result = run_stage(ctx, "report", recipe.name, params, inputs, work)
    publish_report_artifact(result)
    return result


def publish_report_artifact(result: StageResult) -> None:
    """The report as a Prefect artifact of the flow run (the UI's Artifacts tab), also when the
    report stage was cached; the self-contained HTML stays in the stage folder and MLflow."""
    from prefect.artifacts import create_markdown_artifact

    # report_artifact.md: the report with its images inlined and its tables narrowed for
    # Prefect's artifact page (reports written before it existed have only report.md).
    name = "artifact" if "artifact" in result.outputs else "markdown"
    _in_flow_run(lambda: create_markdown_artifact(
        markdown=result.file(name).read_text(encoding="utf-8"), key="codis-report",
        description="the report of this run (the self-contained report.html is in MLflow and in "
                    "the run folder)"))


def stage_label(result: StageResult) -> str:
    """``<stage>[<label>]`` of a stage result (its label is kept in the marker's provenance)."""
    label = result.marker.get("provenance", {}).get("label")
    return f"{result.stage}[{label}]" if label else f"{result.stage}[{result.key}]"


def report_task_key(spec: TaskSpec, zero_shot: bool) -> str:
    """The report row (:data:`codis.tasks.TASKS` ``report_keys``) of an evaluation: a task with
    several rows reports zero-shot in the first, finetuned in the second and transfer from another
    dataset's finetuned model (``transfer_from``) in the third."""
    keys = TASKS[spec.task].report_keys
    if len(keys) == 1:
        return keys[0]
    return keys[0] if zero_shot else keys[2] if spec.transfer_from is not None else keys[1]


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
import_checkpoint_task = task(import_checkpoint_stage, name="import_checkpoint",
                              task_run_name="import_checkpoint[{name}]", **_TASK_OPTIONS)
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
