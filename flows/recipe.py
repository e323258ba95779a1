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

Paths in a recipe: ``demo://rel/path`` is a file of the generated demo world; ``${VAR}`` is
replaced by an environment variable (an unset one is an error naming the field); other relative
paths are relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag,
                      ValidationError, create_model, field_validator, model_validator)

import codis  # noqa: F401  - the torchvision shim first
from codis.config import PRESETS, ConfigError, ModelConfig, VisionConfig, merge_dicts
from codis.data.demo_world import DemoWorldConfig
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
                   "optim", "callback", "progress", "resume", "stop_after", "checkpoint", "shards"}

Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=64)]
"""Names used in stage labels, MLflow metric names and registered model names."""


class RecipeError(ValueError):
    """A recipe is invalid; the message names the file and the field."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- data ----------------------------------------------------------------------------------------
class UrlSource(_Spec):
    """An image-text URL list (parquet / csv / tsv, e.g. CC3M, SBU) downloaded by img2dataset.

    ``url_list`` under ``demo://`` holds paths relative to the demo world, which the download
    stage serves over loopback HTTP. ``base_url`` prefixes urls without a scheme. ``download``:
    codis's :class:`~codis.data.download.DownloadConfig` (img2dataset's distributor, processes,
    threads, image size ...); the distributor, process and thread counts change only speed, so
    they are not part of the stage key."""

    name: Name
    url_list: str
    base_url: str | None = None
    download: DownloadConfig = DownloadConfig()


class AnnotationSource(_Spec):
    """Annotation file(s) in ALBEF's format (a JSON list of records) whose image paths are relative
    to ``image_root``; written to webdataset shards by :func:`codis.data.shards.write_shards`. Several
    files are concatenated in order (e.g. ALBEF's VQA training set: vqa_train + vqa_val)."""

    name: Name | None = None
    annotations: list[str] = Field(min_length=1)
    image_root: str
    samples_per_shard: int = Field(default=1000, gt=0)

    @field_validator("annotations", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


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
    that ``comparison.md`` shows (empty: pretraining loss and each task's headline metrics).
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
    ``champion`` alias (default: the first zero-shot retrieval task's r_mean; higher is better)."""

    experiment: str | None = None
    pretrained_model: str | None = None
    register_finetuned: bool = True
    champion_metric: str | None = None
    log_system_metrics: bool = True


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
    retries: int = Field(default=0, ge=0)
    steps_scale: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        if self.demo_world is None:
            for where, value in _path_fields(self):
                if value.startswith(DEMO_SCHEME):
                    raise ValueError(f"{where}: {value!r} refers to the demo world, but the recipe "
                                     "has no demo_world section")
        for name, variant in self.variants.items():
            where = f"variants.{name}"
            model_config(variant, where=f"{where}.model")
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
            if not (task.finetune or task.zero_shot):
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
    """Apply ``dotted.path=value`` (value parsed as YAML; list items by index) to a raw recipe."""
    if "=" not in override:
        raise RecipeError(f"override {override!r}: expected dotted.path=value")
    path, _, text = override.partition("=")
    keys = path.strip().split(".")
    if not all(keys):
        raise RecipeError(f"override {override!r}: empty name in {path!r}")
    value = yaml.safe_load(text)
    node: Any = data
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        where = ".".join(keys[:depth + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise RecipeError(f"override {override!r}: {where}: no list item {key}")
            if last:
                node[int(key)] = value
            else:
                node = node[int(key)]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise RecipeError(f"override {override!r}: {'.'.join(keys[:depth])} is not a mapping")


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


def describe_validation_error(error: ValidationError) -> str:
    return "\n".join(_join(_location(item["loc"]), item["msg"]) for item in error.errors())


def parse_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a raw recipe mapping; a bad field raises :class:`RecipeError` naming it."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(f"{source}: invalid recipe\n{describe_validation_error(error)}") from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                steps_scale: float | None = None) -> Recipe:
    """Read, override and validate a recipe file. ``overrides``: ``dotted.path=value`` strings
    (e.g. ``pretrain.train.steps=20``); ``steps_scale`` multiplies every training step count."""
    data = _read_yaml(Path(path))
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
        _WRAPPERS[cls] = create_model(f"_{cls.__name__}Fields", __config__=ConfigDict(extra="forbid"),
                                      value=(cls, ...))
    try:
        return _WRAPPERS[cls].model_validate({"value": data}).value
    except ValidationError as error:
        details = "; ".join(_join(".".join([where, *map(str, e["loc"][1:])]), e["msg"])
                            for e in error.errors())
        raise ValueError(details) from None


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
    """The :class:`~codis.train.PretrainConfig` (``run.yaml``) of one variant over ``shards``."""
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


def task_schedule(spec: TaskSpec, train_samples: int, steps_scale: float = 1.0,
                  ) -> tuple[TrainConfig, OptimConfig]:
    """The finetuning schedule: :func:`codis.train.schedules.task_schedule` of the task config over
    ``train_samples`` on one process (``grad_accumulation`` micro-batches per step stand for ALBEF's
    GPUs), with the recipe's ``train`` / ``optim`` changes and ``steps_scale``."""
    return _schedule(task_config(spec), train_samples, spec.grad_accumulation, spec.train, spec.optim,
                     steps_scale, spec.label)


def text_assignment_schedule(spec: TaskSpec, pretrain_samples: int, steps_scale: float = 1.0,
                             ) -> tuple[TrainConfig, OptimConfig]:
    """The NLVR² TA step's schedule over ``pretrain_samples`` pairs, with the recipe's changes."""
    assert spec.text_assignment is not None
    ta = spec.text_assignment
    return _schedule(task_config(spec).text_assignment(), pretrain_samples, 1, ta.train, ta.optim,
                     steps_scale, f"{spec.label}.text_assignment")


def _check_schedule_changes(train: dict[str, Any], optim: dict[str, Any], where: str) -> None:
    """Names and values of a task's ``train`` / ``optim`` changes, checked as the schedule applies
    them (before any stage runs)."""
    try:
        schedules.with_changes(TrainConfig(), OptimConfig(), train, optim)
    except ConfigError as error:
        raise ValueError(f"{where}.{error}") from None


def _schedule(config: TaskConfig, samples: int, grad_accumulation: int, train: dict[str, Any],
              optim: dict[str, Any], steps_scale: float, where: str) -> tuple[TrainConfig, OptimConfig]:
    try:
        return schedules.task_schedule(config, samples, grad_accumulation=grad_accumulation,
                                       train_changes=train, optim_changes=optim,
                                       steps_scale=steps_scale)
    except ConfigError as error:
        raise ValueError(f"{where}.{error}") from None


def metric_name(spec: TaskSpec, metric: str, zero_shot: bool = False) -> str:
    """``<task>.<name>.<metric>``, zero-shot ``<task>.<name>.zs.<metric>`` (e.g.
    ``retrieval.demo.zs.txt_r1``, ``vqa.demo.accuracy``)."""
    return f"{spec.task}.{spec.name}.{'zs.' if zero_shot else ''}{metric}"


# ---- paths ---------------------------------------------------------------------------------------
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _path_fields(recipe: Recipe) -> list[tuple[str, str]]:
    """Every path-valued field of a recipe as (field name, value)."""
    found: list[tuple[str, str]] = []

    def source(where: str, item: UrlSource | AnnotationSource) -> None:
        if isinstance(item, UrlSource):
            found.append((f"{where}.url_list", item.url_list))
        else:
            found.extend((f"{where}.annotations.{i}", a) for i, a in enumerate(item.annotations))
            found.append((f"{where}.image_root", item.image_root))

    for index, item in enumerate(recipe.pretrain_data):
        source(f"pretrain_data.{index}", item)
    if recipe.vision_init is not None:
        init = recipe.vision_init
        found.append(("vision_init.annotations", init.annotations))
        if init.eval_annotations is not None:
            found.append(("vision_init.eval_annotations", init.eval_annotations))
        found.append(("vision_init.image_root", init.image_root))
    for index, task in enumerate(recipe.tasks):
        for part, item in enumerate(task.train_data):
            source(f"tasks.{index}.train_data.{part}", item)
        source(f"tasks.{index}.eval_data", task.eval_data)
        for key, value in task.evaluate_args.items():
            if is_path_argument(value):
                found.append((f"tasks.{index}.evaluate_args.{key}", value))
    return found


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
    for where, value in _path_fields(recipe):
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

