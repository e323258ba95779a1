"""One deployable Prefect flow per stage, with typed parameters (``prefect.yaml`` deploys them).

Each flow builds a :class:`~flows.stages.StageContext` from its :class:`StageOptions` and runs
one stage task of :mod:`flows.stages`, so a stage started from the Prefect UI lands in the same
content-keyed store, with the same key, as the same stage inside a reproduction. Parameters are
pydantic models and codis's dataclasses: the UI's run form shows their fields and validates them
before a run is created.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

import codis  # noqa: F401  - the torchvision shim before anything imports timm
from codis.data.demo_world import DemoWorldConfig
from flows import recipe as recipes
from flows.recipe import (AnalysisSpec, AnnotationSource, PretrainSpec, TaskSpec, UrlSource,
                          VariantSpec, VisionInitSpec)
from flows.stages import (StageContext, analyze_task, download_task, evaluate_task,
                          finetune_task, generate_demo_task, pretrain_task, register_task,
                          report_from_summary, shard_task, vision_init_task)
from flows.store import Store
from flows.tracking import Tracker, default_artifact_location, resolve_tracking_uri

QUICK_WORLD = DemoWorldConfig(
    pretrain_images=200, retrieval_images={"train": 60, "val": 20, "test": 40},
    vqa_images={"train": 60, "val": 30, "test": 10}, nlvr_pairs={"train": 80, "dev": 30, "test": 30},
    ve_images={"train": 60, "dev": 30, "test": 30})
"""The generate_demo flow's default: a world small enough to render in seconds when the flow is
started from the UI to try it out (a reproduction's world comes from its recipe)."""


class StageOptions(BaseModel):
    """Where a stage writes and records (shown as a group in the Prefect UI's run form).

    ``store``: the shared stage store. ``tracking_uri``: MLflow; empty uses ``MLFLOW_TRACKING_URI``,
    else ``sqlite:///<store's parent>/mlflow.db``. ``track: false`` turns MLflow off.
    ``parent_run_id``: an MLflow run to attach this stage's run to. ``keep_training_state``: keep
    a finished training stage's ``checkpoints/`` (resumable state; a recipe's
    ``store.keep_training_state``)."""

    model_config = ConfigDict(extra="forbid")

    store: str = "runs/store"
    tracking_uri: str | None = None
    track: bool = True
    experiment: str = "codis-stages"
    parent_run_id: str | None = None
    progress: bool = True
    keep_training_state: bool = False


def make_context(options: StageOptions) -> StageContext:
    store = Store(options.store)
    runs_root = store.root.parent
    tracker = Tracker(resolve_tracking_uri(options.tracking_uri, runs_root) if options.track else None,
                      options.experiment,
                      artifact_location=default_artifact_location(runs_root, options.experiment))
    return StageContext(store=store, tracker=tracker, parent_run_id=options.parent_run_id,
                        progress=options.progress,
                        keep_training_state=options.keep_training_state)


@flow(name="generate_demo")
def generate_demo(world: DemoWorldConfig = QUICK_WORLD,
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
             zero_shot: bool = False, processes: Annotated[int, Field(ge=1)] = 1,
             options: StageOptions = StageOptions()) -> dict[str, Any]:
    """Evaluate a checkpoint on one task's evaluation shards; ``processes`` > 1 runs the
    evaluation under torchrun (one process per GPU)."""
    return evaluate_task(make_context(options), task_spec, checkpoint, eval_shards, world,
                         zero_shot, processes=processes).to_dict()


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
    return report_from_summary(make_context(options), summary).to_dict()
