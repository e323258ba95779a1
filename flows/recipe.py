"""Reproduction recipes: the schema of ``pipelines/*.yaml`` and its mapping onto codis's configs.

A recipe says what to reproduce: the data (a generated demo world, URL lists for img2dataset,
annotation files in ALBEF's formats), the model variants to pretrain and compare (a preset plus
overrides), the pretraining settings (including nodes and GPUs), the downstream tasks, the report
and where MLflow records it all. ``pipelines/README.md`` documents the fields.

Validation happens in full before any work: the schema is pydantic with ``extra="forbid"``, and
codis's own frozen dataclasses (:class:`~codis.train.TrainConfig`, :class:`~codis.train.OptimConfig`,
:class:`~codis.data.download.DownloadConfig`, :class:`~codis.data.demo_world.DemoWorldConfig`) are embedded
as field types, so their fields are not repeated here and their ``__post_init__`` checks run at
load time. Overrides given as partial mappings (a variant's model changes, a task's train / optim
changes) are merged onto their base and validated the same way. Every error names the field.
Numbers are numbers: a bool where one is expected (``steps: true``, which pydantic would take as 1)
and NaN or infinity anywhere are refused. Batches are checked against the data they draw from: at
validation for demo world files (whose sizes follow from ``demo_world``), and before each training
stage from its shards' manifests (:func:`task_schedule`, :func:`pretrain_config`).

Paths in a recipe: ``demo://rel/path`` is a file of the generated demo world, and must be one that
the demo world generates and that fits its field (:func:`demo_world_files`; a typo is refused
listing the valid names); ``${VAR}`` is replaced by an environment variable (an unset one is an
error naming the field); other relative paths are relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import posixpath
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag,
                      ValidationError, ValidationInfo, create_model, field_validator,
                      model_validator)

import codis  # noqa: F401  - the torchvision shim first
from codis.config import PRESETS, ConfigError, ModelConfig, VisionConfig, merge_dicts
from codis.data.demo_world import DemoWorldConfig
from codis.data.demo_world.config import CAPTIONS_PER_RETRIEVAL_IMAGE
from codis.data.manifest import listed_samples
from codis.data.download import DownloadConfig
from codis.tasks import TASKS
from codis.tasks.base import TaskConfig
from codis.train import schedules
from codis.train import (DataConfig, OptimConfig, PretrainConfig, TrainConfig, global_batch,
                         scale_schedule, scaled_lr)

DEMO_SCHEME = "demo://"
SHARD_KINDS = {  # (train, eval) kinds of codis.data.shards.write_shards per task
    "retrieval": ("retrieval_train", "retrieval_eval"), "vqa": ("vqa", "vqa"),
    "nlvr": ("nlvr", "nlvr"), "ve": ("ve", "ve"),
}
# Arguments of the task functions that the flows set themselves; a recipe may not pass them.
_FLOW_ARGUMENTS = {"pretrained", "train_shards", "pretrain_shards", "output_dir", "config", "train",
                   "optim", "callback", "progress", "resume", "stop_after", "checkpoint", "shards",
                   "result_file"}

Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=64)]
"""Names used in stage labels, MLflow metric names and registered model names."""


class RecipeError(ValueError):
    """A recipe is invalid; the message names the file and the field."""


_FIELDS_ONLY = "fields_only"  # validation context: the fields' own checks, not Recipe._check


# No NaN or infinity anywhere (a NaN learning rate would train to NaN weights); bools given for
# numbers are refused by _bool_numbers (pydantic would take `steps: true` as 1).
_STRICTNESS = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Spec(BaseModel):
    model_config = ConfigDict(**_STRICTNESS, frozen=True)


# ---- data ----------------------------------------------------------------------------------------
class UrlSource(_Spec):
    """An image-text URL list (parquet / csv / tsv, e.g. CC3M, SBU) downloaded by img2dataset.

    ``url_list`` under ``demo://`` holds paths relative to the demo world, which the download
    stage serves over loopback HTTP. ``base_url`` prefixes urls without a scheme. ``download``:
    codis's :class:`~codis.data.download.DownloadConfig` (img2dataset's distributor, processes,
    threads, image size ...); the distributor, process and thread counts change only speed, so
    they are not part of the stage key. ``download.min_success_rate`` (default 0.5) is the
    fraction of rows that must become samples, else the stage fails (not complete) and its re-run
    retries the shards that fell short."""

    name: Name
    url_list: str
    base_url: str | None = None
    download: DownloadConfig = DownloadConfig()


class AnnotationSource(_Spec):
    """Annotation file(s) in ALBEF's format (a JSON list of records) whose image paths are relative
    to ``image_root``; written to webdataset shards by :func:`codis.data.shards.write_shards`. Several
    files are concatenated in order (e.g. ALBEF's VQA training set: vqa_train + vqa_val).

    ``image_roots`` (dataset name -> folder): the root of each record that has a ``dataset`` field,
    as ALBEF's VQA picks ``vqa_root`` or ``vg_root``, so that vqa_train.json and vg_qa.json can be
    one source; ``image_root`` is then needed only for records without the field.
    ``image_prefix``: the absolute prefix of the image paths in ALBEF's released pretraining files
    (``/export/share/datasets/vision/coco/images/``), replaced by the image root."""

    name: Name | None = None
    annotations: list[str] = Field(min_length=1)
    image_root: str | None = None
    image_roots: dict[Name, str] = {}
    image_prefix: str | None = Field(default=None, min_length=1)
    samples_per_shard: int = Field(default=1000, gt=0)

    @field_validator("annotations", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _some_root(self) -> "AnnotationSource":
        if self.image_root is None and not self.image_roots:
            raise ValueError("image_root: required unless image_roots gives the records' roots")
        return self


def _source_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "urls" if "url_list" in value else "annotations"
    return "urls" if isinstance(value, UrlSource) else "annotations"


PretrainSource = Annotated[Union[Annotated[UrlSource, Tag("urls")],
                                 Annotated[AnnotationSource, Tag("annotations")]],
                           Discriminator(_source_kind)]


# ---- model variants and pretraining --------------------------------------------------------------
class VariantSpec(_Spec):
    """A model to pretrain: a codis preset plus nested overrides of :class:`~codis.config.ModelConfig`
    (``mode``, ``codebook: {size: ...}``, ``loss_weights: {code: ...}``), and optional overrides of
    the recipe's pretraining ``train`` / ``optim`` for this variant. ``paper``: the method name
    of the paper's tables (:mod:`codis.report.paper`) that this variant reproduces, for the report."""

    preset: Literal["tiny", "small", "base"]
    model: dict[str, Any] = {}
    train: dict[str, Any] = {}
    optim: dict[str, Any] = {}
    paper: str | None = None
    description: str = ""
    checkpoint: str | None = None
    """A pretrained checkpoint to start from instead of pretraining (``import_checkpoint`` stage):
    one of ours, or with ``checkpoint_format: albef`` a checkpoint released by ALBEF's authors,
    converted by :func:`codis.albef.convert_albef_checkpoint` to ``preset`` + ``model``."""
    checkpoint_format: Literal["codis", "albef"] = "codis"


class PretrainDataSpec(_Spec):
    """:class:`codis.train.DataConfig` without ``shards`` (the flow fills those in)."""

    num_workers: int = Field(default=2, ge=0)
    shuffle_buffer: int = Field(default=1000, ge=0)
    hflip: bool = True
    crop_min_scale: float = Field(default=0.2, gt=0.0, le=1.0)
    resample: bool = False


class PretrainSpec(_Spec):
    """Pretraining settings shared by the variants.

    ``optim.lr`` is the learning rate at a global batch of ``reference_batch``; the run uses it
    scaled linearly to its actual global batch, batch_size x grad_accumulation x nodes x
    gpus_per_node (:func:`scaled_lr`); ``reference_batch`` None uses ``optim.lr`` unscaled.
    ``launcher``: ``inprocess`` runs :func:`codis.train.pretrain` inside the flow (one process),
    ``torchrun`` starts :func:`flows.launch.torchrun_command` as a subprocess, ``auto`` picks
    in-process for one process and torchrun otherwise. With ``nodes`` > 1 every node runs the same torchrun
    command (c10d rendezvous at ``rdzv_endpoint``); the flow starts the local one.
    """

    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    data: PretrainDataSpec = PretrainDataSpec()
    reference_batch: int | None = Field(default=None, gt=0)
    nodes: int = Field(default=1, ge=1)
    gpus_per_node: int = Field(default=1, ge=1)
    launcher: Literal["auto", "inprocess", "torchrun"] = "auto"
    rdzv_endpoint: str | None = None
    max_restarts: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check_launch(self) -> "PretrainSpec":
        if self.nodes > 1 and not self.rdzv_endpoint:
            raise ValueError("pretrain.rdzv_endpoint: required when nodes > 1 (host:port of node 0)")
        if self.launcher == "inprocess" and self.nodes * self.gpus_per_node > 1:
            raise ValueError("pretrain.launcher: 'inprocess' runs one process; "
                             f"nodes x gpus_per_node = {self.nodes * self.gpus_per_node} needs torchrun")
        return self


class VisionInitSpec(_Spec):
    """The image encoder's supervised initialisation (:func:`codis.train.vision_init.pretrain_vision`),
    run once before pretraining: every variant's ViT starts from its weights, as ALBEF's and
    CODIS's start from DeiT's ImageNet weights, for recipes that cannot load those from the hub
    (the demo). ``annotations`` / ``eval_annotations``: ``{image, labels}`` JSON lists under
    ``image_root``. The ViT is the variants' (they must agree, without ``vision.pretrained``)."""

    annotations: str
    eval_annotations: str | None = None
    image_root: str
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()


# ---- downstream tasks ----------------------------------------------------------------------------
class TextAssignmentSpec(_Spec):
    """ALBEF's NLVR² text-assignment pre-step on the pretraining data: changes to the schedule
    that :meth:`codis.tasks.nlvr.NLVRConfig.text_assignment` gives (the task config's ``ta_*``
    fields)."""

    train: dict[str, Any] = {}
    optim: dict[str, Any] = {}


class TaskSpec(_Spec):
    """One downstream task on one dataset.

    ``name`` labels the dataset (and split) in metric names: ``<task>.<name>.<metric>``, and
    ``retrieval.<name>.zs.<metric>`` for zero-shot. ``preset`` and ``config`` build the task config
    (``codis.tasks.<task>.config(preset)`` with ``config``'s fields replaced). The training
    schedule is :func:`codis.train.schedules.task_schedule` of that config over the number of
    training samples (ALBEF's epochs, batch, lr; the same as ``codis finetune``), then ``train`` /
    ``optim`` replace fields of it. ``evaluate_args`` are further keyword arguments of
    ``codis.tasks.<task>.evaluate`` (strings under ``demo://`` become paths). ``zero_shot`` (retrieval only) also evaluates the pretrained model;
    ``finetune: false`` skips finetuning (zero-shot-only ablations). Finetuning runs in one
    process; ``grad_accumulation`` reaches ALBEF's 8-GPU global batch on one device (the schedule
    then counts an epoch in steps of batch x grad_accumulation samples)."""

    task: Literal[tuple(TASKS)]  # type: ignore[valid-type]  # the names of codis.tasks.TASKS
    name: Name
    preset: str
    config: dict[str, Any] = {}
    train_data: list[AnnotationSource] = []
    eval_data: AnnotationSource
    zero_shot: bool = False
    finetune: bool = True
    grad_accumulation: int = Field(default=1, ge=1)
    train: dict[str, Any] = {}
    optim: dict[str, Any] = {}
    evaluate_args: dict[str, Any] = {}
    text_assignment: TextAssignmentSpec | None = None
    transfer_from: Name | None = None
    """The name of another task of the same kind in the recipe: this task evaluates that task's
    finetuned model on its own ``eval_data``, without finetuning on this dataset (with
    ``finetune: false``). The paper's Flickr30K "zero-shot" rows are this protocol: ALBEF's
    COCO-finetuned model evaluated on Flickr30K (``name: flickr-from-coco, transfer_from: coco``)."""

    @property
    def label(self) -> str:
        return f"{self.task}.{self.name}"


class AnalysisSpec(_Spec):
    """The ``analyze`` stage of every variant (:func:`codis.report.analysis.analyze_checkpoint`) on the
    evaluation shards of the recipe's first retrieval task: codebook usage, ``examples`` caption
    queries with their ``top_k`` images by ITC similarity, and a Grad-CAM figure of up to
    ``gradcam_words`` words of each query on its own image: the query's words in
    ``gradcam_vocabulary`` first (a dataset's object and colour names, lower case), else its most
    image-specific words."""

    examples: int = Field(default=3, ge=1, le=50)
    top_k: int = Field(default=5, ge=1, le=20)
    gradcam_words: int = Field(default=3, ge=1, le=10)
    gradcam_vocabulary: list[Annotated[str, StringConstraints(pattern=r"^[a-z0-9'-]+$")]] | None = None


class ReportSpec(_Spec):
    """``title``: heading of the run's ``comparison.md``. ``baseline_variant``: the variant the
    others are compared with (difference columns). ``metrics``: glob patterns of the metric names
    that ``comparison.md`` shows (empty: the loss terms both modes share and each task's headline metrics).
    ``analysis``: the report's codebook, retrieval-example and Grad-CAM sections
    (:class:`AnalysisSpec`; ``{}`` for its defaults, null or absent: not run)."""

    title: str | None = None
    baseline_variant: str | None = None
    metrics: list[str] = []
    analysis: AnalysisSpec | None = None


class TrackingSpec(_Spec):
    """MLflow: the experiment (default ``codis-<recipe name>``), the registered model of the
    pretrained checkpoints (default ``<recipe name>-pretrained``), whether finetuned models are
    registered too (``<recipe name>-<task>-<dataset name>``), the metric that decides the
    ``champion`` alias (default: the first zero-shot retrieval task's r_mean; higher is better),
    and the margin by which a new version must beat the champion to take the alias
    (``champion_margin``, in the metric's units; default: two binomial standard errors of the
    score over the evaluation's sample count, its run-to-run spread; :func:`champion_margin`)."""

    experiment: str | None = None
    pretrained_model: str | None = None
    register_finetuned: bool = True
    champion_metric: str | None = None
    champion_margin: float | None = Field(default=None, ge=0)
    log_system_metrics: bool = True


class StoreSpec(_Spec):
    """The stage store. ``keep_training_state``: keep a finished training stage's resumable
    training state (``checkpoints/step-*.pt``: weights, optimiser, RNG states; most of a small
    run's store) after its marker is written. Not part of any stage key."""

    keep_training_state: bool = Field(
        default=False,
        description="keep the training-state checkpoints (checkpoints/step-*.pt) of finished "
                    "vision_init, pretrain, text_assignment and finetune stages; they only serve "
                    "to resume an interrupted stage")


class Recipe(_Spec):
    """A whole reproduction; see ``pipelines/README.md``."""

    name: Name
    description: str = ""
    demo_world: DemoWorldConfig | None = None
    pretrain_data: list[PretrainSource] = Field(min_length=1)
    variants: dict[Name, VariantSpec] = Field(min_length=1)
    vision_init: VisionInitSpec | None = None
    pretrain: PretrainSpec = PretrainSpec()
    tasks: list[TaskSpec] = []
    report: ReportSpec = ReportSpec()
    tracking: TrackingSpec = TrackingSpec()
    store: StoreSpec = StoreSpec()
    retries: int = Field(default=0, ge=0)
    steps_scale: float = Field(default=1.0, gt=0)
    parallel_variants: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "Recipe":
        if info.context and info.context.get(_FIELDS_ONLY):
            return self
        if self.demo_world is None:
            for where, value, _ in _path_fields(self):
                if value.startswith(DEMO_SCHEME):
                    raise ValueError(f"{where}: {value!r} refers to the demo world, but the recipe "
                                     "has no demo_world section")
        else:
            _check_demo_paths(self)
        for name, variant in self.variants.items():
            where = f"variants.{name}"
            model_config(variant, where=f"{where}.model")
            if variant.checkpoint_format != "codis" and variant.checkpoint is None:
                raise ValueError(f"{where}.checkpoint_format: {variant.checkpoint_format!r} needs "
                                 f"{where}.checkpoint (the file to convert)")
            pretrain_train_config(self.pretrain, variant, self.steps_scale, where)
            pretrain_optim_config(self.pretrain, variant, self.steps_scale, where)
        if self.vision_init is not None:
            vision_init_config(self)
        seen: set[str] = set()
        for index, task in enumerate(self.tasks):
            where = f"tasks.{index}"
            if task.label in seen:
                raise ValueError(f"{where}.name: {task.label} appears twice")
            seen.add(task.label)
            if task.zero_shot and task.task != "retrieval":
                raise ValueError(f"{where}.zero_shot: only retrieval has a zero-shot evaluation")
            if task.text_assignment is not None and task.task != "nlvr":
                raise ValueError(f"{where}.text_assignment: only nlvr has the text-assignment step")
            if task.transfer_from is not None:
                _check_transfer(self, task, where)
            elif not (task.finetune or task.zero_shot):
                raise ValueError(f"{where}.finetune: false with zero_shot false leaves nothing to do")
            if task.finetune and not task.train_data:
                raise ValueError(f"{where}.train_data: finetuning needs at least one training source")
            task_config(task, where=where)
            _check_schedule_changes(task.train, task.optim, where)
            _check_arguments(TASKS[task.task].module().evaluate, task.evaluate_args,
                             f"{where}.evaluate_args")
            if task.text_assignment is not None:
                ta = task.text_assignment
                _check_schedule_changes(ta.train, ta.optim, f"{where}.text_assignment")
        if self.report.analysis is not None and self.analysis_task is None:
            raise ValueError("report.analysis: needs a retrieval task (the analysis runs on its "
                             "eval_data)")
        if self.report.baseline_variant and self.report.baseline_variant not in self.variants:
            raise ValueError(f"report.baseline_variant: {self.report.baseline_variant!r} is not a "
                             f"variant (variants: {', '.join(self.variants)})")
        if self.demo_world is not None:
            _check_demo_sizes(self)
        return self

    # derived names ------------------------------------------------------------------------------
    @property
    def experiment(self) -> str:
        return self.tracking.experiment or f"codis-{self.name}"

    @property
    def pretrained_model_name(self) -> str:
        return self.tracking.pretrained_model or f"{self.name}-pretrained"

    def finetuned_model_name(self, task: TaskSpec) -> str:
        return f"{self.name}-{task.task}-{task.name}"

    def transfer_source(self, task: TaskSpec) -> TaskSpec | None:
        """The task whose finetuned model ``task`` evaluates (its ``transfer_from``): the other
        task of the same kind with that name; None if there is none."""
        return next((t for t in self.tasks if t.task == task.task and t.name == task.transfer_from
                     and t is not task), None)

    @property
    def analysis_task(self) -> TaskSpec | None:
        """The task whose evaluation shards ``report.analysis`` reads: the first retrieval task."""
        return next((task for task in self.tasks if task.task == "retrieval"), None)

    @property
    def champion_metric(self) -> str | None:
        """The metric of the pretrained model that decides the ``champion`` alias."""
        if self.tracking.champion_metric:
            return self.tracking.champion_metric
        for task in self.tasks:
            if task.zero_shot:
                return metric_name(task, "r_mean", zero_shot=True)
        return None


def _check_transfer(recipe: Recipe, task: TaskSpec, where: str) -> None:
    """``transfer_from`` names another finetuned task of the same kind; the task itself is not
    finetuned (its evaluation reads the other task's model)."""
    source = recipe.transfer_source(task)
    if source is None:
        choices = ", ".join(t.name for t in recipe.tasks
                            if t.task == task.task and t is not task) or "none"
        raise ValueError(f"{where}.transfer_from: {task.transfer_from!r} is not another {task.task} "
                         f"task of the recipe ({task.task} tasks: {choices})")
    if not source.finetune:
        raise ValueError(f"{where}.transfer_from: task {source.label} has finetune: false, so "
                         "there is no finetuned model to transfer")
    if source.transfer_from is not None:
        raise ValueError(f"{where}.transfer_from: task {source.label} transfers itself; name "
                         "the task that finetunes")
    if task.finetune:
        raise ValueError(f"{where}.finetune: must be false with transfer_from (the task evaluates "
                         f"the model finetuned on {task.transfer_from})")


# ---- loading -------------------------------------------------------------------------------------
def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe file, resolving ``extends: other.yaml`` (relative to the file): the parent's
    top-level sections are kept unless this file gives them, in which case this file's replace
    them whole (no deep merge: what a section holds is always visible in one file)."""
    path = path.resolve()
    if path in chain:
        raise RecipeError(f"{path}: `extends` loops back to itself ({' -> '.join(map(str, chain))})")
    if not path.is_file():
        raise RecipeError(f"{chain[-1] if chain else 'recipe'}: no recipe file at {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError(f"{path}: extends: expected a file name, got {parent!r}")
    return {**_read_yaml(path.parent / parent, chain + (path,)), **data}


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply ``dotted.path=value`` (value parsed as YAML) to a raw recipe. A list item is named
    by its index or, for lists of mappings, by the ``task`` or ``name`` that only it has:
    ``tasks.vqa.config.k_test=64``, ``pretrain_data.demo-web.download.thread_count=4``."""
    if "=" not in override:
        raise RecipeError(f"--set {override!r}: expected dotted.path=value")
    path, _, text = override.partition("=")
    keys = path.strip().split(".")
    if not all(keys):
        raise RecipeError(f"--set {override!r}: empty name in {path!r}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        problem = " ".join(str(getattr(error, "problem", None) or error).split())
        raise RecipeError(f"--set {override!r}: the value {text!r} is not valid YAML "
                          f"({problem})") from None
    node: Any = data
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        where = ".".join(keys[:depth + 1])
        if isinstance(node, list):
            index = _list_item(node, key, f"--set {override!r}: {where}")
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise RecipeError(f"--set {override!r}: {'.'.join(keys[:depth])} is not a mapping")


def _list_item(items: list[Any], key: str, where: str) -> int:
    """The index of ``key`` in ``items``: an index, or the one mapping whose ``task`` or ``name``
    is ``key``."""
    if key.isdigit():
        if int(key) < len(items):
            return int(key)
        raise RecipeError(f"{where}: no list item {key} (the list has {len(items)})")
    found = [i for i, item in enumerate(items)
             if isinstance(item, dict) and key in (item.get("task"), item.get("name"))]
    if len(found) == 1:
        return found[0]
    names = sorted({str(item.get(field)) for item in items if isinstance(item, dict)
                    for field in ("task", "name") if item.get(field) is not None})
    problem = "names several items" if found else "names no item"
    raise RecipeError(f"{where}: {key!r} {problem}; use an index (0-{len(items) - 1})"
                      + (f" or one of: {', '.join(names)}" if names else ""))


def _join(where: str, message: str) -> str:
    """``where: message``, merging a codis message that names the field from its own dataclass
    (``pretrain.train`` + ``train.steps: ...`` -> ``pretrain.train.steps: ...``)."""
    message = message.removeprefix("Value error, ")
    if not where:
        return message
    head, _, last = where.rpartition(".")
    if message.startswith(f"{last}."):
        return f"{head}.{message}" if head else message
    named = re.match(r"([A-Z]\w*)\.(\w+): ", message)  # e.g. "DownloadConfig.thread_count: ..."
    if named:
        return f"{where}.{named.group(2)}: {message[named.end():]}"
    return f"{where}: {message}"


def _location(loc: tuple) -> str:
    parts = list(loc)
    if len(parts) > 2 and parts[0] == "pretrain_data" and parts[2] in ("urls", "annotations"):
        del parts[2]  # the union's tag, not a field
    return ".".join(str(part) for part in parts)


def _message(item: dict[str, Any]) -> str:
    if item["type"] == "finite_number":  # pydantic's message leaves out the value
        return f"must be a finite number, got {item['input']!r}"
    return item["msg"]


def describe_validation_error(error: ValidationError) -> str:
    return "\n".join(_join(_location(item["loc"]), _message(item)) for item in error.errors())


def parse_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a raw recipe mapping; a bad field raises :class:`RecipeError` naming it."""
    try:
        # each field first: a bool taken for a number must not surface as a later check's error
        fields = Recipe.model_validate(data, context={_FIELDS_ONLY: True})
        found = _bool_numbers(data, fields, "")
        if found:
            raise RecipeError(_invalid(source, found))
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(_invalid(source, describe_validation_error(error).split("\n"))) from None


def _invalid(source: str, problems: list[str]) -> str:
    """``<file>: invalid recipe: <problem>`` on one line, or one problem per line."""
    if len(problems) == 1:
        return f"{source}: invalid recipe: {problems[0]}"
    return f"{source}: invalid recipe\n" + "\n".join(problems)


PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
"""The recipes of the checkout, offered by name in the Prefect run forms."""


def shipped_recipes() -> tuple[str, ...]:
    """The names of ``pipelines/*.yaml`` (``demo`` for ``pipelines/demo.yaml``)."""
    return tuple(sorted(path.stem for path in PIPELINES.glob("*.yaml")))


RecipeName = Literal[shipped_recipes()] if shipped_recipes() else str  # type: ignore[valid-type]
"""A choice among the shipped recipes (a dropdown in the Prefect UI)."""


def recipe_path(recipe: str | Path) -> Path:
    """A recipe by name (``demo``: ``pipelines/demo.yaml``) or by file path."""
    text = str(recipe)
    if "/" not in text and not text.endswith((".yaml", ".yml")):
        return PIPELINES / f"{text}.yaml"
    return Path(text)


def shipped_name(path: str | Path) -> str | None:
    """The name of a recipe file if it is one of :func:`shipped_recipes`, else None."""
    path = Path(path).resolve()
    return path.stem if path.parent == PIPELINES and path.suffix == ".yaml" else None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                steps_scale: float | None = None) -> Recipe:
    """Read, override and validate a recipe file. ``overrides``: ``dotted.path=value`` strings
    (e.g. ``pretrain.train.steps=20``); ``steps_scale`` multiplies every training step count."""
    data = _read_yaml(recipe_path(path))
    for override in overrides:
        apply_override(data, override)
    if steps_scale is not None:
        data["steps_scale"] = steps_scale
    return parse_recipe(data, str(path))


# ---- mapping onto codis configs ------------------------------------------------------------------
_WRAPPERS: dict[type, type[BaseModel]] = {}


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Validate ``data`` as dataclass ``cls``. Through a pydantic model with ``extra="forbid"``:
    stdlib dataclasses take their extra-field policy from the enclosing model, so an unknown key
    at any depth (``codebook.sizee``) is an error, as it is inside :class:`Recipe`."""
    if cls not in _WRAPPERS:
        _WRAPPERS[cls] = create_model(f"_{cls.__name__}Fields", __config__=_STRICTNESS,
                                      value=(cls, ...))
    try:
        value = _WRAPPERS[cls].model_validate({"value": data}).value
    except ValidationError as error:
        details = "; ".join(_join(".".join([where, *map(str, e["loc"][1:])]), _message(e))
                            for e in error.errors())
        raise ValueError(details) from None
    _check_no_bool_numbers(data, value, where)
    return value


def _bool_numbers(raw: Any, value: Any, where: str) -> list[str]:
    """``<field>: must be a number, got True`` for each field where ``raw`` (the YAML) holds a bool
    that validation turned into a number; found by walking the raw data beside what it became."""
    if isinstance(raw, bool):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            kind = "an integer" if isinstance(value, int) else "a number"
            return [f"{where}: must be {kind}, got {raw}"]
        return []
    prefix = f"{where}." if where else ""
    found: list[str] = []
    if isinstance(raw, dict):
        for key, item in raw.items():
            if isinstance(value, dict):
                if key in value:
                    found += _bool_numbers(item, value[key], f"{prefix}{key}")
            elif isinstance(key, str) and hasattr(value, key):  # a model or a dataclass
                found += _bool_numbers(item, getattr(value, key), f"{prefix}{key}")
    elif isinstance(raw, list) and isinstance(value, (list, tuple)) and len(raw) == len(value):
        for index, (item, converted) in enumerate(zip(raw, value)):
            found += _bool_numbers(item, converted, f"{prefix}{index}")
    return found


def _check_no_bool_numbers(raw: Any, value: Any, where: str) -> None:
    found = _bool_numbers(raw, value, where)
    if found:
        raise ValueError("; ".join(found))


def _check_overrides(cls: type, changes: dict[str, Any], where: str) -> None:
    """Field names and types of partial overrides of dataclass ``cls`` (values checked on merge)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(sorted(fields))})")
    _build(cls, merge_dicts(dataclasses.asdict(cls()), changes), where)


def _check_arguments(function: Any, arguments: dict[str, Any], where: str) -> None:
    parameters = inspect.signature(function).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    for key in arguments:
        if key in _FLOW_ARGUMENTS:
            raise ValueError(f"{where}.{key}: set by the flow, not by a recipe")
        if key not in parameters and not open_ended:
            known = sorted(set(parameters) - _FLOW_ARGUMENTS)
            raise ValueError(f"{where}.{key}: not an argument of {function.__module__}."
                             f"{function.__name__} (known: {', '.join(known) or 'none'})")


def model_config(variant: VariantSpec, where: str = "model") -> ModelConfig:
    """The variant's :class:`ModelConfig`: its preset with ``model`` merged in (nested fields)."""
    return _build(ModelConfig, merge_dicts(PRESETS[variant.preset]().to_dict(), variant.model), where)


def build_vision_config(data: dict[str, Any], where: str = "vision") -> VisionConfig:
    """A :class:`VisionConfig` from its fields (a flow parameter), errors naming the field."""
    return _build(VisionConfig, data, where)


def vision_init_config(recipe: Recipe) -> VisionConfig:
    """The ViT that ``recipe.vision_init`` trains: the variants' vision config, which must be one
    and have no ``pretrained`` weights of its own (the initialisation provides them)."""
    configs = {name: model_config(variant, f"variants.{name}.model").vision
               for name, variant in recipe.variants.items()}
    for name, vision in configs.items():
        if vision.pretrained is not None:
            raise ValueError(f"variants.{name}.model.vision.pretrained: {vision.pretrained!r} is set, "
                             "but vision_init provides the ViT's weights; remove one of the two")
    first, *others = configs.items()
    for name, vision in others:
        if vision != first[1]:
            raise ValueError(f"vision_init: variants {first[0]} and {name} have different ViTs "
                             "(model.vision); one initialisation serves one architecture")
    return first[1]


def pretrain_train_config(spec: PretrainSpec, variant: VariantSpec, steps_scale: float = 1.0,
                          where: str = "variant") -> TrainConfig:
    """The pretraining TrainConfig: ``spec.train`` with the variant's overrides, then
    ``steps_scale``."""
    _check_overrides(TrainConfig, variant.train, f"{where}.train")
    train = _build(TrainConfig, merge_dicts(dataclasses.asdict(spec.train), variant.train), f"{where}.train")
    return scale_schedule(train, spec.optim, steps_scale)[0]


def pretrain_optim_config(spec: PretrainSpec, variant: VariantSpec, steps_scale: float = 1.0,
                          where: str = "variant") -> OptimConfig:
    """The pretraining OptimConfig: ``spec.optim`` with the variant's overrides, ``lr`` scaled to
    the global batch (:func:`scaled_lr`), warm-up steps scaled by ``steps_scale``."""
    _check_overrides(OptimConfig, variant.optim, f"{where}.optim")
    optim = _build(OptimConfig, merge_dicts(dataclasses.asdict(spec.optim), variant.optim), f"{where}.optim")
    train = _build(TrainConfig, merge_dicts(dataclasses.asdict(spec.train), variant.train), f"{where}.train")
    batch = global_batch(train, spec.nodes, spec.gpus_per_node)
    optim = dataclasses.replace(optim, lr=scaled_lr(optim.lr, spec.reference_batch, batch))
    return scale_schedule(train, optim, steps_scale)[1]


def pretrain_config(spec: PretrainSpec, variant: VariantSpec, shards: list[str] | list[Path],
                    output_dir: str | Path, steps_scale: float = 1.0, where: str = "variant",
                    ) -> PretrainConfig:
    """The :class:`~codis.train.PretrainConfig` (``run.yaml``) of one variant over ``shards``.
    When ``shards`` are whole shard folders, their manifests' sample and shard counts are checked
    against the batch and the processes first (:func:`check_pretrain_data`)."""
    listed = listed_samples(list(shards))
    if listed is not None:
        check_pretrain_data(spec, variant, listed[0], listed[1], where=where)
    data = spec.data
    return PretrainConfig(
        output_dir=str(output_dir),
        data=DataConfig(shards=tuple(str(s) for s in shards), num_workers=data.num_workers,
                        shuffle_buffer=data.shuffle_buffer, hflip=data.hflip,
                        crop_min_scale=data.crop_min_scale, resample=data.resample),
        model=model_config(variant, f"{where}.model"),
        train=pretrain_train_config(spec, variant, steps_scale, where),
        optim=pretrain_optim_config(spec, variant, steps_scale, where))


# ---- tasks ---------------------------------------------------------------------------------------
def task_config(spec: TaskSpec, where: str = "task") -> TaskConfig:
    """The task's preset (:data:`codis.tasks.TASKS`) with the recipe's ``config`` fields replaced;
    errors name the recipe field."""
    module = TASKS[spec.task].module()
    try:
        return module.config(spec.preset, **spec.config)
    except ConfigError as error:
        field, _, message = str(error).partition(": ")
        name = field.rpartition(".")[2]
        raise ValueError(f"{where}.{'preset' if name == 'preset' else 'config.' + name}: {message}") from None


def task_schedule(spec: TaskSpec, train_samples: int, steps_scale: float = 1.0, *,
                  where: str | None = None, source: str = "the training shards' manifests",
                  ) -> tuple[TrainConfig, OptimConfig]:
    """The finetuning schedule: :func:`codis.train.schedules.task_schedule` of the task config over
    ``train_samples`` on one process (``grad_accumulation`` micro-batches per step stand for ALBEF's
    GPUs), with the recipe's ``train`` / ``optim`` changes and ``steps_scale``. A batch that the
    samples cannot fill raises ValueError naming the recipe field (under ``where``, default
    ``tasks[<task>.<name>]``) and ``source``, where the sample count came from."""
    where = where or f"tasks[{spec.label}]"
    return _schedule(task_config(spec), train_samples, spec.grad_accumulation, spec.train, spec.optim,
                     steps_scale, f"{where}.config.", where, source)


def text_assignment_schedule(spec: TaskSpec, pretrain_samples: int, steps_scale: float = 1.0, *,
                             where: str | None = None,
                             source: str = "the pretraining shards' manifests",
                             ) -> tuple[TrainConfig, OptimConfig]:
    """The NLVR² TA step's schedule over ``pretrain_samples`` pairs, with the recipe's changes
    (errors as :func:`task_schedule`'s; the TA batch is the task config's ``ta_batch_size``)."""
    assert spec.text_assignment is not None
    ta = spec.text_assignment
    where = where or f"tasks[{spec.label}]"
    return _schedule(task_config(spec).text_assignment(), pretrain_samples, 1, ta.train, ta.optim,
                     steps_scale, f"{where}.config.ta_", f"{where}.text_assignment", source)


def check_batch_fits(samples: int, batch: int, field: str, source: str, detail: str = "") -> None:
    """A batch of ``batch`` samples fits in ``samples``: an epoch of full batches is not empty (the
    loaders drop a partial last batch, so a larger batch fails only once training starts)."""
    if batch > samples:
        raise ValueError(f"{field}: a batch of {batch}{detail} is more than the {samples} samples of "
                         f"{source}; no epoch would hold one full batch")


def check_pretrain_data(spec: PretrainSpec, variant: VariantSpec, samples: int,
                        shards: int | None = None, *, where: str = "variant",
                        source: str = "the pretraining shards' manifests") -> None:
    """Unless ``data.resample``: the pretraining data fills a global batch (batch_size x
    grad_accumulation x processes) and gives every process at least one of its ``shards``
    (processes read whole shards). Necessary conditions, not sufficient ones: each DataLoader
    worker batches its own shards. Errors name the recipe field and the sample or shard count."""
    train = _build(TrainConfig, merge_dicts(dataclasses.asdict(spec.train), variant.train),
                   f"{where}.train")
    if spec.data.resample:  # shards drawn with replacement: the stream never runs dry
        return
    processes = spec.nodes * spec.gpus_per_node
    batch = global_batch(train, spec.nodes, spec.gpus_per_node)
    field = f"{where}.train.batch_size" if "batch_size" in variant.train else "pretrain.train.batch_size"
    detail = ("" if batch == train.batch_size else f" ({train.batch_size} x {train.grad_accumulation} "
              f"accumulation step(s) x {processes} process(es))")
    check_batch_fits(samples, batch, field, source, detail)
    if shards is not None and shards < processes:
        raise ValueError(f"pretrain.gpus_per_node: {processes} processes (nodes x gpus_per_node) "
                         f"but {shards} shard(s) in {source}; every process reads whole shards, so "
                         "use fewer processes, smaller shards or pretrain.data.resample: true")


def _check_schedule_changes(train: dict[str, Any], optim: dict[str, Any], where: str) -> None:
    """Names and values of a task's ``train`` / ``optim`` changes, checked as the schedule applies
    them (before any stage runs)."""
    try:
        schedules.with_changes(TrainConfig(), OptimConfig(), train, optim)
    except ConfigError as error:
        raise ValueError(f"{where}.{error}") from None
    # codis's checks let NaN through some float fields; these refuse it (and bools) by name
    _build(TrainConfig, merge_dicts(dataclasses.asdict(TrainConfig()), train), f"{where}.train")
    _build(OptimConfig, merge_dicts(dataclasses.asdict(OptimConfig()), optim), f"{where}.optim")


def _schedule(config: TaskConfig, samples: int, grad_accumulation: int, train: dict[str, Any],
              optim: dict[str, Any], steps_scale: float, config_field: str, where: str, source: str,
              ) -> tuple[TrainConfig, OptimConfig]:
    """``config_field``: the prefix of the task config's fields in the recipe (``tasks.1.config.``);
    ``where``: the section holding the ``train`` / ``optim`` changes."""
    try:
        schedule = schedules.task_schedule(config, samples, grad_accumulation=grad_accumulation,
                                           train_changes=train, optim_changes=optim,
                                           steps_scale=steps_scale)
    except ConfigError as error:
        field, _, message = str(error).partition(": ")
        if field.startswith(f"{config.task}."):  # the task config's field, e.g. vqa.batch_size
            name = f"{config_field}{field[len(config.task) + 1:]}"
            if field.endswith(".batch_size") and config.batch_size <= samples:  # accumulation's fault
                name = (f"{where}.train.grad_accumulation" if "grad_accumulation" in train
                        else f"{where}.grad_accumulation")
            raise ValueError(f"{name}: {message} (counted in {source})") from None
        raise ValueError(f"{where}.{error}") from None
    # the train changes may have replaced the batch that the schedule was computed for
    step_batch = schedule[0].batch_size * schedule[0].grad_accumulation
    field = next((f"{where}.train.{name}" for name in ("batch_size", "grad_accumulation")
                  if name in train), f"{config_field}batch_size")
    detail = "" if step_batch == schedule[0].batch_size else (
        f" ({schedule[0].batch_size} x {schedule[0].grad_accumulation} accumulation step(s))")
    check_batch_fits(samples, step_batch, field, source, detail)
    return schedule


def metric_name(spec: TaskSpec, metric: str, zero_shot: bool = False) -> str:
    """``<task>.<name>.<metric>``, zero-shot ``<task>.<name>.zs.<metric>`` (e.g.
    ``retrieval.demo.zs.txt_r1``, ``vqa.demo.accuracy``)."""
    return f"{spec.task}.{spec.name}.{'zs.' if zero_shot else ''}{metric}"


def champion_margin(recipe: Recipe, score: float, samples: int | None) -> float:
    """How far a score (percent) must beat the ``champion``'s to take the alias: the recipe's
    ``tracking.champion_margin``, else two binomial standard errors of ``score`` over the
    ``samples`` evaluated (0 when their number is unknown)."""
    if recipe.tracking.champion_margin is not None:
        return recipe.tracking.champion_margin
    if not samples:
        return 0.0
    p = min(max(score / 100.0, 0.0), 1.0)
    return 200.0 * math.sqrt(p * (1.0 - p) / samples)


# ---- paths ---------------------------------------------------------------------------------------
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _path_fields(recipe: Recipe) -> list[tuple[str, str, str]]:
    """Every path-valued field of a recipe as (field name, value, role). The role says what the
    file is for: ``url_list``, ``image_root``, ``argument`` (a task's evaluate_args), ``pretrain``
    or ``labelled`` (vision_init) annotations, ``checkpoint`` (a variant's starting checkpoint), or a
    task's name for its annotations."""
    found: list[tuple[str, str, str]] = []

    def source(where: str, item: UrlSource | AnnotationSource, role: str) -> None:
        if isinstance(item, UrlSource):
            found.append((f"{where}.url_list", item.url_list, "url_list"))
        else:
            found.extend((f"{where}.annotations.{i}", a, role) for i, a in enumerate(item.annotations))
            if item.image_root is not None:
                found.append((f"{where}.image_root", item.image_root, "image_root"))
            found.extend((f"{where}.image_roots.{name}", root, "image_root")
                          for name, root in item.image_roots.items())

    for name, variant in recipe.variants.items():
        if variant.checkpoint is not None:
            found.append((f"variants.{name}.checkpoint", variant.checkpoint, "checkpoint"))
    for index, item in enumerate(recipe.pretrain_data):
        source(f"pretrain_data.{index}", item, "pretrain")
    if recipe.vision_init is not None:
        init = recipe.vision_init
        found.append(("vision_init.annotations", init.annotations, "labelled"))
        if init.eval_annotations is not None:
            found.append(("vision_init.eval_annotations", init.eval_annotations, "labelled"))
        found.append(("vision_init.image_root", init.image_root, "image_root"))
    for index, task in enumerate(recipe.tasks):
        for part, item in enumerate(task.train_data):
            source(f"tasks.{index}.train_data.{part}", item, task.task)
        source(f"tasks.{index}.eval_data", task.eval_data, task.task)
        for key, value in task.evaluate_args.items():
            if is_path_argument(value):
                found.append((f"tasks.{index}.evaluate_args.{key}", value, "argument"))
    return found


# ---- the demo world's files ----------------------------------------------------------------------
# The split files that codis.data.demo_world.generate_demo_world writes per folder, from the
# DemoWorldConfig field that sizes them. tests/test_recipes.py holds demo_world_files to a
# generated world's manifest, so the two cannot drift apart.
_DEMO_SPLIT_FILES = {"retrieval": "retrieval_images", "vqa": "vqa_images", "nlvr": "nlvr_pairs",
                     "ve": "ve_images", "classification": "classification_images"}
_DEMO_URL_LIST = "pretrain/urls.parquet"  # the one url list codis.data.download.download_demo serves


def demo_world_files(world: DemoWorldConfig) -> dict[str, int | None]:
    """The files of a demo world of ``world``'s sizes (paths under ``demo://``) and the samples each
    holds: records of an annotation file, pairs that download from the url list (its dead and
    non-image rows fail by design); None for files that hold no samples."""
    per_item = {"retrieval": CAPTIONS_PER_RETRIEVAL_IMAGE, "vqa": world.questions_per_image,
                "ve": world.hypotheses_per_image}
    pairs = world.pretrain_images * world.captions_per_pretrain_image
    files: dict[str, int | None] = {"pretrain/captions.json": pairs, _DEMO_URL_LIST: pairs}
    for folder, field in _DEMO_SPLIT_FILES.items():
        for split, count in getattr(world, field).items():
            # retrieval: one record per caption for train, one per image (all captions) else
            rows = count if folder == "retrieval" and split != "train" else count * per_item.get(folder, 1)
            files[f"{folder}/{split}.json"] = rows
    files.update({"vqa/answer_list.json": None, "meta/scenes.json": None,
                  "meta/vqa_question_types.json": None, "manifest.json": None})
    return files


def _demo_name(value: str) -> str:
    """The path under the demo world of a ``demo://`` value ("" for the world's root)."""
    name = posixpath.normpath(value[len(DEMO_SCHEME):] or ".")
    return "" if name == "." else name


def _demo_choices(files: dict[str, int | None], role: str) -> list[str]:
    """The demo world's paths that fit a path field of ``role`` (see :func:`_path_fields`): the
    served url list, the root as image root, a task's own folder, any annotation file for
    pretraining pairs or labelled images, any file for a task argument."""
    if role == "url_list":
        return [_DEMO_URL_LIST]
    if role == "image_root":
        return [""]  # annotation files name their images relative to the world's root
    if role == "argument":
        return list(files)
    records = [name for name, rows in files.items() if rows is not None and name.endswith(".json")]
    if role in TASKS:  # a task reads its own folder's layout (retrieval/, vqa/, ...)
        return [name for name in records if name.startswith(f"{role}/")]
    return records  # pretraining pairs or labelled images: any file whose records fit


def _check_demo_paths(recipe: Recipe) -> None:
    """Every ``demo://`` path names a file that the demo world generates and that fits its field
    (a VQA task reads vqa/ files; only pretrain/urls.parquet is served for download)."""
    assert recipe.demo_world is not None
    files = demo_world_files(recipe.demo_world)
    for where, value, role in _path_fields(recipe):
        if not value.startswith(DEMO_SCHEME):
            continue
        choices = _demo_choices(files, role)
        if _demo_name(value) in choices:
            continue
        valid = ", ".join(DEMO_SCHEME + name for name in choices)
        if role == "image_root":
            raise ValueError(f"{where}: {value!r}: the demo world's annotation files name their "
                             f"images relative to its root; valid here: {valid}")
        known = "the demo world generates" if _demo_name(value) not in files else "fits here"
        raise ValueError(f"{where}: {value!r} is not a file that {known}; valid here: {valid}")


def _demo_samples(recipe: Recipe, sources: list[Any]) -> tuple[int, str] | None:
    """The samples that ``sources`` (url lists, annotation sources or file names) hold when every
    file is one of the demo world, and a description of those files."""
    assert recipe.demo_world is not None
    files = demo_world_files(recipe.demo_world)
    names = [path for item in sources for path in (
        [item] if isinstance(item, str) else
        [item.url_list] if isinstance(item, UrlSource) else item.annotations)]
    if not names or not all(name.startswith(DEMO_SCHEME) for name in names):
        return None
    rows = [files.get(_demo_name(name)) for name in names]
    if any(count is None for count in rows):
        return None
    return sum(rows), f"demo_world ({', '.join(names)})"


def _check_demo_sizes(recipe: Recipe) -> None:
    """Batches against the sizes of the demo world's files, before anything is generated: a batch
    (or a global batch over processes) that the data cannot fill fails here, naming its field."""
    pretrain = _demo_samples(recipe, recipe.pretrain_data)
    if pretrain is not None:
        for name, variant in recipe.variants.items():
            check_pretrain_data(recipe.pretrain, variant, pretrain[0], where=f"variants.{name}",
                                source=pretrain[1])
    if recipe.vision_init is not None:
        init = recipe.vision_init
        found = _demo_samples(recipe, [init.annotations])
        if found is not None:
            check_batch_fits(found[0], init.train.batch_size, "vision_init.train.batch_size", found[1])
    for index, task in enumerate(recipe.tasks):
        where = f"tasks.{index}"
        found = _demo_samples(recipe, task.train_data) if task.finetune else None
        if found is not None:
            task_schedule(task, found[0], recipe.steps_scale, where=where, source=found[1])
        if task.text_assignment is not None and pretrain is not None:
            text_assignment_schedule(task, pretrain[0], recipe.steps_scale, where=where,
                                     source=pretrain[1])


def resolve_path(value: str, world: str | Path | None, where: str = "path") -> Path:
    """A recipe path as an absolute path: ``demo://x`` under the demo world folder ``world``,
    ``${VAR}`` from the environment, relative paths from the working directory."""
    if value.startswith(DEMO_SCHEME):
        if world is None:
            raise ValueError(f"{where}: {value!r} needs the demo world, which was not generated")
        return (Path(world) / value[len(DEMO_SCHEME):]).resolve()

    def variable(match: re.Match) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ValueError(f"{where}: environment variable {name} is not set (in {value!r})")
        return os.environ[name]

    return Path(_ENV.sub(variable, value)).expanduser().resolve()


def is_path_argument(value: Any) -> bool:
    """Task arguments that name files: ``demo://...`` or containing ``${VAR}``."""
    return isinstance(value, str) and (value.startswith(DEMO_SCHEME) or bool(_ENV.search(value)))


def resolve_arguments(arguments: dict[str, Any], world: str | Path | None, where: str,
                      ) -> dict[str, Any]:
    """Task arguments with ``demo://`` and ``${VAR}`` strings turned into absolute paths."""
    return {key: str(resolve_path(value, world, f"{where}.{key}")) if is_path_argument(value)
            else value for key, value in arguments.items()}


def check_inputs(recipe: Recipe) -> None:
    """Every input outside the demo world exists (environment variables set, files and folders
    present): called before any work, so a typo fails in a second, not after hours."""
    problems = []
    for where, value, _ in _path_fields(recipe):
        if value.startswith(DEMO_SCHEME):
            continue
        try:
            path = resolve_path(value, None, where)
        except ValueError as error:
            problems.append(str(error))
            continue
        if not path.exists():
            problems.append(f"{where}: {path} does not exist")
    if problems:
        raise RecipeError(f"recipe {recipe.name}: missing inputs\n" + "\n".join(problems))

