"""The stages of one recipe, each one run, or found done in the store, when it is first needed.

A :class:`Plan` answers "the pretrained CODIS checkpoint", "the finetuned VQA model of ALBEF", "the
zero-shot retrieval evaluation" for a recipe by calling the stage tasks of :mod:`flows.stages` that
lead to it, in order: a reproduction (:mod:`flows.reproduce`) asks for every stage, a stage
deployment (:mod:`flows.deployments`) for one. Stages found done in the store come back at once
(and create no MLflow run); missing ones upstream run first. Each stage is asked for at most once per
plan; every result is recorded in order in ``summary["stages"]`` (the run's ``reproduction.json``),
which the report's wall-time table reads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

from codis.data.manifest import shard_samples
from codis.tasks import TASKS
from flows import recipe as recipes
from flows.launch import evaluation_processes
from flows.recipe import Recipe, TaskSpec, UrlSource
from flows.stages import (StageContext, analyze_task, download_task, evaluate_task,
                          finetune_task, generate_demo_task, import_checkpoint_task,
                          pretrain_task, register_task,
                          report_task, shard_task, source_run_id, stage_label,
                          text_assignment_task, vision_init_task)
from flows.store import StageResult, Store
from flows.tracking import Tracker, default_artifact_location, resolve_tracking_uri

MODEL_ALIAS = "models:/"
"""Prefix of a checkpoint given as a registered MLflow model (``models:/<name>@<alias>``)."""


class Plan:
    """The stages of ``spec``, written to ``ctx``'s store and recorded in ``ctx``'s MLflow."""

    def __init__(self, spec: Recipe, ctx: StageContext, summary: dict[str, Any] | None = None,
                 ) -> None:
        self.spec, self.ctx = spec, ctx
        self.summary = summary if summary is not None else {"stages": [], "started": time.time()}
        self.summary.setdefault("stages", [])
        self._memo: dict[tuple[Any, ...], Any] = {}
        # Variants may run in threads (parallel_variants): a stage two of them ask for is computed
        # once, the second waiting for it; different stages do not wait for each other.
        self._locks: dict[tuple[Any, ...], threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self.evaluations: dict[str, list[tuple[TaskSpec, bool, StageResult]]] = {}
        self.analyses: dict[str, StageResult] = {}

    # ---- bookkeeping -----------------------------------------------------------------------------
    def _once(self, key: tuple[Any, ...], compute: Callable[[], Any]) -> Any:
        with self._locks_lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._memo:
                self._memo[key] = compute()
        return self._memo[key]

    def _run(self, stage_task: Any, *args: Any, **kwargs: Any) -> StageResult:
        """Run a stage task (with the recipe's retries) and record its result."""
        if self.spec.retries:
            stage_task = stage_task.with_options(retries=self.spec.retries)
        result = stage_task(*args, **kwargs)
        if isinstance(result, StageResult):
            self.summary["stages"].append({"label": stage_label(result), **result.to_dict(),
                                           "duration_s": result.marker.get("duration_s"),
                                           "mlflow_run_id": source_run_id(result)})
        return result

    def task(self, name: str) -> TaskSpec:
        """A task of the recipe by label (``vqa.demo``), task (``vqa``) or dataset name, when
        only one task has it."""
        found = [t for t in self.spec.tasks if name in (t.label, t.task, t.name)]
        if len(found) == 1:
            return found[0]
        labels = ", ".join(t.label for t in self.spec.tasks) or "none"
        problem = "names several tasks" if found else "is not a task"
        raise recipes.RecipeError(f"task {name!r} {problem} of recipe {self.spec.name} "
                                  f"(tasks: {labels})")

    def variant(self, name: str) -> str:
        if name not in self.spec.variants:
            raise recipes.RecipeError(f"variant {name!r} is not in recipe {self.spec.name} "
                                      f"(variants: {', '.join(self.spec.variants)})")
        return name

    # ---- data ------------------------------------------------------------------------------------
    def world(self) -> StageResult | None:
        if self.spec.demo_world is None:
            return None
        return self._once(("world",), lambda: self._run(generate_demo_task, self.ctx,
                                                        self.spec.demo_world))

    def world_dir(self) -> str | None:
        world = self.world()
        return str(world.file("world")) if world is not None else None

    def pretrain_shards(self) -> list[str]:
        """The shard folders of every pretraining source (downloaded or written)."""
        def compute() -> list[str]:
            folders = []
            for index, source in enumerate(self.spec.pretrain_data):
                if isinstance(source, UrlSource):
                    result = self._run(download_task, self.ctx, source, self.world_dir())
                else:
                    result = self._run(shard_task, self.ctx, source, "pretrain", self.world_dir(),
                                       label=source.name or f"pretrain-{index}")
                folders.append(str(result.file("shards")))
            return folders
        return self._once(("pretrain_shards",), compute)

    def train_shards(self, task: str) -> list[str]:
        spec = self.task(task)

        def compute() -> list[str]:
            kind = TASKS[spec.task].train_kind
            folders = []
            for index, part in enumerate(spec.train_data):
                result = self._run(shard_task, self.ctx, part, kind, self.world_dir(),
                                   label=f"{spec.label}.train{index}")
                folders.append(str(result.file("shards")))
            return folders
        return self._once(("train_shards", spec.label), compute)

    def eval_shards(self, task: str) -> str:
        spec = self.task(task)

        def compute() -> str:
            result = self._run(shard_task, self.ctx, spec.eval_data, TASKS[spec.task].eval_kind,
                               self.world_dir(), label=f"{spec.label}.eval")
            return str(result.file("shards"))
        return self._once(("eval_shards", spec.label), compute)

    def vision_weights(self) -> str | None:
        if self.spec.vision_init is None:
            return None

        def compute() -> str:
            init = self._run(vision_init_task, self.ctx, self.spec.vision_init,
                             recipes.vision_init_config(self.spec), self.world_dir(),
                             self.spec.steps_scale)
            self.summary["vision_init"] = {"key": init.key, "path": init.path}
            return str(init.file("weights"))
        return self._once(("vision_init",), compute)

    # ---- models ----------------------------------------------------------------------------------
    def pretrained(self, variant: str) -> StageResult:
        """``variant``'s pretrained model: pretrained here, or imported from the checkpoint the
        variant names (``checkpoint``: ours, or a released ALBEF one converted)."""
        name = self.variant(variant)
        spec = self.spec.variants[name]
        if spec.checkpoint is not None:
            return self._once(("pretrain", name), lambda: self._run(
                import_checkpoint_task, self.ctx, name, spec))
        return self._once(("pretrain", name), lambda: self._run(
            pretrain_task, self.ctx, name, spec, self.spec.pretrain,
            self.pretrain_shards(), self.spec.steps_scale, self.vision_weights()))

    def finetuned(self, variant: str, task: str) -> StageResult:
        """The finetuned model of ``variant`` on ``task`` (after NLVR²'s text assignment)."""
        name, spec = self.variant(variant), self.task(task)
        if not spec.finetune:
            raise recipes.RecipeError(f"task {spec.label} of recipe {self.spec.name} has "
                                      "finetune: false")

        def compute() -> StageResult:
            start = str(self.pretrained(name).file("model"))
            if spec.text_assignment is not None:
                ta = self._run(text_assignment_task, self.ctx, spec, start, self.pretrain_shards(),
                               self.spec.steps_scale, name)
                start = str(ta.file("model"))
            return self._run(finetune_task, self.ctx, spec, start, self.train_shards(spec.label),
                             self.world_dir(), self.spec.steps_scale, name)
        return self._once(("finetune", name, spec.label), compute)

    def checkpoint(self, variant: str, task: str, zero_shot: bool) -> str:
        """What an evaluation of ``task`` reads: the pretrained model (zero-shot), the model
        finetuned on the task (or, with ``transfer_from``, on the task it names)."""
        if zero_shot:
            return str(self.pretrained(variant).file("model"))
        spec = self.task(task)
        source = self.spec.transfer_source(spec) if spec.transfer_from is not None else spec
        return str(self.finetuned(variant, source.label).file("model"))

    def evaluation(self, variant: str, task: str, zero_shot: bool = False,
                   checkpoint: str | None = None) -> StageResult:
        """``variant``'s evaluation on ``task`` (zero-shot: its pretrained model). ``checkpoint``:
        evaluate this file, or registered model ``models:/<name>@<alias>``, instead."""
        name, spec = self.variant(variant), self.task(task)
        if zero_shot and not spec.task == "retrieval":
            raise recipes.RecipeError(f"zero_shot: only retrieval has a zero-shot evaluation, "
                                      f"not {spec.label}")

        def compute() -> StageResult:
            path = (self.resolve_checkpoint(checkpoint) if checkpoint
                    else self.checkpoint(name, spec.label, zero_shot))
            result = self._run(evaluate_task, self.ctx, spec, path, self.eval_shards(spec.label),
                               self.world_dir(), zero_shot, name,
                               processes=evaluation_processes(self.spec.pretrain))
            if not checkpoint:
                self.evaluations.setdefault(name, []).append((spec, zero_shot, result))
            return result
        return self._once(("evaluate", name, spec.label, zero_shot, checkpoint or ""), compute)

    def resolve_checkpoint(self, checkpoint: str) -> str:
        """A checkpoint path as is; ``models:/<name>@<alias>`` downloaded from MLflow's registry
        into the store's ``registry/`` folder."""
        if not checkpoint.startswith(MODEL_ALIAS):
            if not Path(checkpoint).is_file():
                raise FileNotFoundError(f"checkpoint: no file at {checkpoint}")
            return checkpoint
        name, _, alias = checkpoint[len(MODEL_ALIAS):].partition("@")
        if not (name and alias):
            raise recipes.RecipeError(f"checkpoint: {checkpoint!r}: expected "
                                      "models:/<registered model>@<alias>")
        if not self.ctx.tracker.enabled:
            raise recipes.RecipeError(f"checkpoint: {checkpoint} needs MLflow tracking")
        destination = self.ctx.store.root / "registry" / name / alias
        return str(self.ctx.tracker.download_checkpoint(name, alias, destination))

    def analysis(self, variant: str) -> StageResult | None:
        """Codebook usage, retrieval examples and Grad-CAM of ``variant`` (``report.analysis``)."""
        name = self.variant(variant)
        task = self.spec.analysis_task
        if self.spec.report.analysis is None or task is None:
            return None

        def compute() -> StageResult:
            result = self._run(analyze_task, self.ctx, task,
                               str(self.pretrained(name).file("model")),
                               self.eval_shards(task.label), self.spec.report.analysis, name)
            self.analyses[name] = result
            return result
        return self._once(("analyze", name), compute)

    # ---- registry --------------------------------------------------------------------------------
    def register_pretrained(self, variant: str) -> dict[str, Any]:
        """Register ``variant``'s pretrained checkpoint (``candidate``; ``champion`` when its
        zero-shot score beats the current champion's by the recipe's margin)."""
        name = self.variant(variant)
        metric = self.spec.champion_metric
        score, samples = None, None
        if metric:
            for spec in self.spec.tasks:
                if spec.zero_shot and metric.startswith(f"{spec.label}.zs."):
                    evaluation = self.evaluation(name, spec.label, zero_shot=True)
                    score = evaluation.metrics.get(metric)
                    samples = shard_samples([self.eval_shards(spec.label)])
        return self._register(self.spec.pretrained_model_name, self.pretrained(name), name,
                              metric, score, samples,
                              {"codis.mode": recipes.model_config(self.spec.variants[name]).mode})

    def register_finetuned(self, variant: str, task: str) -> dict[str, Any]:
        name, spec = self.variant(variant), self.task(task)
        metric = recipes.metric_name(spec, TASKS[spec.task].headline_metric)
        evaluation = self.evaluation(name, spec.label)
        return self._register(self.spec.finetuned_model_name(spec), self.finetuned(name, spec.label),
                              f"{spec.label}/{name}", metric, evaluation.metrics.get(metric),
                              shard_samples([self.eval_shards(spec.label)]),
                              {"codis.task": spec.task})

    def _register(self, model_name: str, trained: StageResult, label: str, metric: str | None,
                  score: float | None, samples: int | None, tags: dict[str, Any]) -> dict[str, Any]:
        margin = (recipes.champion_margin(self.spec, score, samples) if score is not None else 0.0)
        return self._run(register_task, self.ctx, model_name, trained, label=label,
                         score_name=metric, score=score, margin=margin,
                         tags={"codis.variant": label.rsplit("/", 1)[-1],
                               "codis.recipe": self.spec.name, **tags})

    # ---- report ----------------------------------------------------------------------------------
    def report(self) -> StageResult:
        """The report of every variant: each is pretrained, evaluated (and analysed) first."""
        def compute() -> StageResult:
            for name in self.spec.variants:
                for spec in self.spec.tasks:
                    if spec.zero_shot:
                        self.evaluation(name, spec.label, zero_shot=True)
                    if spec.finetune or spec.transfer_from is not None:
                        self.evaluation(name, spec.label)
                self.analysis(name)
            return self._run(report_task, self.ctx, self.spec,
                             {name: self.pretrained(name) for name in self.spec.variants},
                             self.evaluations, self.world(), self.analyses,
                             timeline=self.summary)
        return self._once(("report",), compute)


def recipe_context(spec: Recipe, runs_root: str | Path = "runs", *, store: str | Path = "",
                   tracking_uri: str = "", track: bool = True, progress: bool = True,
                   parent_run_id: str | None = None, run_dir: Path | None = None) -> StageContext:
    """Where the stages of ``spec`` write (``store``; empty: ``<runs_root>/store``) and record
    (the recipe's MLflow experiment in ``tracking_uri``; empty: ``MLFLOW_TRACKING_URI``, else
    ``sqlite:///<runs_root>/mlflow.db``)."""
    root = Path(runs_root).resolve()
    uri = resolve_tracking_uri(tracking_uri or None, root) if track else None
    tracker = Tracker(uri, spec.experiment,
                      artifact_location=default_artifact_location(root, spec.experiment),
                      system_metrics=spec.tracking.log_system_metrics)
    return StageContext(store=Store(store or root / "store"), tracker=tracker,
                        parent_run_id=parent_run_id,
                        run_dir=run_dir, progress=progress,
                        keep_training_state=spec.store.keep_training_state)


def load_plan(recipe: str, overrides: Sequence[str] = (), steps_scale: float = 0.0, *,
              runs_root: str | Path = "runs", store: str | Path = "", tracking_uri: str = "",
              track: bool = True, progress: bool = True) -> Plan:
    """The plan of a recipe (a name in ``pipelines/`` or a file) with ``overrides``
    (``dotted.path=value``) and ``steps_scale`` (0: the recipe's), validated with its inputs
    before anything runs: what a stage deployment runs one stage of."""
    started = time.time()
    spec = recipes.load_recipe(recipe, list(overrides), steps_scale or None)
    recipes.check_inputs(spec)
    return Plan(spec, recipe_context(spec, runs_root, store=store, tracking_uri=tracking_uri,
                                     track=track, progress=progress),
                {"stages": [], "started": started, "overrides": list(overrides),
                 "recipe_file": str(recipes.recipe_path(recipe).resolve())})
