"""One deployable Prefect flow per stage, addressed the way a user thinks of it (``prefect.yaml``
deploys them): a recipe of ``pipelines/``, a variant and a task, and optional overrides.

"Evaluate VQA of the CODIS variant with k_test 64" is the evaluate flow with ``task="vqa"`` and
``overrides=["tasks.vqa.config.k_test=64"]``: everything else comes from the recipe. Each flow asks
a Plan (flows/plan.py) for its one stage; the stages upstream of it are found done in the store,
or run first when missing, with the same keys as inside a reproduction of that recipe. Raw paths
(a checkpoint to evaluate) remain possible in the ``options`` group.

Every parameter is described in the flow's ``Args:`` section, which Prefect shows in the run form;
the common ones have defaults that mean "as the recipe says" ("", 0), so the form never asks
for a type before a value.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Callable

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

import codis  # noqa: F401  - the torchvision shim before anything imports timm
from flows import recipe as recipes
from flows.plan import Plan, load_plan

StepsScale = Annotated[float, Field(ge=0)]


class StageOptions(BaseModel):
    """Where the stage writes and records. The defaults are those of a reproduction, so the
    stage reuses what reproductions left in the store."""

    # Descriptions as Field arguments: attribute docstrings, which pydantic reads from the
    # class's source, went missing from the schemas that `prefect deploy --all` sent.
    model_config = ConfigDict(extra="forbid")

    recipe_file: str = Field("", description="A recipe file outside ``pipelines/`` (a path on "
                             "the worker); replaces recipe.")
    runs_root: str = Field("runs", description="Folder holding ``store/`` and the default "
                           "MLflow store (a path on the worker).")
    store: str = Field("", description="The stage store; empty for ``<runs_root>/store``.")
    tracking_uri: str = Field("", description="MLflow tracking URI; empty for "
                              "``$MLFLOW_TRACKING_URI``, else ``sqlite:///<runs_root>/mlflow.db``.")
    track: bool = Field(True, description="Record the stages that run in MLflow (the recipe's "
                        "experiment).")
    progress: bool = Field(True, description="Show progress bars in the log.")


class EvaluateOptions(StageOptions):
    """Where the evaluation writes and records, and optionally which checkpoint it reads."""

    checkpoint: str = Field("", description=(
        "Evaluate this checkpoint instead of the variant's own: a ``model.pt`` path on the "
        "worker, or a registered MLflow model as ``models:/<name>@<alias>`` (e.g. "
        "``models:/demo-pretrained@champion``). Empty: the variant's pretrained model "
        "(zero-shot) or its model finetuned on the task."))


def stage_plan(recipe: str, overrides: list[str] | tuple[str, ...], steps_scale: float,
               options: StageOptions) -> Plan:
    """The Plan of ``recipe`` (a name in pipelines/; ``options.recipe_file`` instead, if given)
    with ``overrides`` and ``steps_scale`` (0: the recipe's), writing to the options' store.
    Stages run on their own record to the recipe's MLflow experiment, without a parent run."""
    return load_plan(options.recipe_file or recipe, overrides, steps_scale,
                     runs_root=options.runs_root, store=options.store,
                     tracking_uri=options.tracking_uri, track=options.track,
                     progress=options.progress)


def run_name(stage: str) -> Callable[[], str]:
    """Flow run names from the run's parameters: ``<stage>[<recipe> <task>/<variant>]``, e.g.
    ``evaluate[demo vqa/codis]``, with only the parameters the stage has."""
    def name() -> str:
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        # A run holds the parameters it was given; the flow's defaults fill in the others.
        defaults = {key: parameter.default for key, parameter
                    in inspect.signature(context.flow.fn).parameters.items()}
        parameters = {**defaults, **context.parameters}
        recipe_file = getattr(parameters.get("options"), "recipe_file", "")
        recipe = Path(recipe_file).stem if recipe_file else str(parameters.get("recipe", ""))
        subject = "/".join(str(parameters[key]) for key in ("task", "variant")
                           if parameters.get(key))
        if parameters.get("zero_shot"):
            subject += " zero-shot"
        return f"{stage}[{' '.join(filter(None, (recipe, subject)))}]"
    return name


def section(value: Any, recipe: str, name: str) -> Any:
    """``value``, which a Plan gives as None when the recipe has no section ``name``."""
    if value is None:
        raise recipes.RecipeError(f"recipe {recipe} has no {name} section")
    return value


@flow(name="generate_demo", flow_run_name=run_name("generate_demo"))
def generate_demo(recipe: recipes.RecipeName = "demo", overrides: tuple[str, ...] = (),
                  options: StageOptions = StageOptions()) -> dict[str, Any]:
    """Generate the recipe's demo world: images and ALBEF-format annotations.

    Args:
        recipe: The recipe, one of ``pipelines/*.yaml``; its ``demo_world`` section says what
            the world holds.
        overrides: Changes to the recipe, one per item, as ``dotted.path=value`` (the value is
            YAML), e.g. ``demo_world.pretrain_images=100``.
        options: Where the world is written and recorded.
    """
    plan = stage_plan(recipe, overrides, 0, options)
    return section(plan.world(), recipe, "demo_world").to_dict()


@flow(name="download", flow_run_name=run_name("download"))
def download(recipe: recipes.RecipeName = "demo", overrides: tuple[str, ...] = (),
             options: StageOptions = StageOptions()) -> dict[str, Any]:
    """Prepare the recipe's pretraining data: URL lists downloaded with img2dataset, annotation
    files written as shards.

    Args:
        recipe: The recipe, one of ``pipelines/*.yaml``; its ``pretrain_data`` section lists
            the sources.
        overrides: Changes to the recipe, one per item, as ``dotted.path=value`` (the value is
            YAML), e.g. ``pretrain_data.demo-web.download.thread_count=4`` (a source by its
            name or list index).
        options: Where the shards are written and recorded.
    """
    plan = stage_plan(recipe, overrides, 0, options)
    return {"shards": plan.pretrain_shards()}


@flow(name="shard", flow_run_name=run_name("shard"))
def shard(recipe: recipes.RecipeName = "demo", task: str = "retrieval",
          overrides: tuple[str, ...] = (), options: StageOptions = StageOptions(),
          ) -> dict[str, Any]:
    """Write one task's training and evaluation data as webdataset shards.

    Args:
        recipe: The recipe, one of ``pipelines/*.yaml``.
        task: The recipe's task: retrieval, vqa, nlvr or ve, or a label such as ``vqa.demo``
            when the recipe has that task on several datasets.
        overrides: Changes to the recipe, one per item, as ``dotted.path=value`` (the value is
            YAML), e.g. ``tasks.vqa.eval_data.samples_per_shard=200`` (a task by its name or
            list index).
        options: Where the shards are written and recorded.
    """
    plan = stage_plan(recipe, overrides, 0, options)
    return {"train": plan.train_shards(task), "eval": plan.eval_shards(task)}


@flow(name="vision_init", flow_run_name=run_name("vision_init"))
def vision_init(recipe: recipes.RecipeName = "demo", overrides: tuple[str, ...] = (),
                steps_scale: StepsScale = 0.0, options: StageOptions = StageOptions(),
                ) -> dict[str, Any]:
    """Train the variants' ViT on labelled images (the recipe's ``vision_init``); its weights
    start every variant's pretraining.

    Args:
        recipe: The recipe, one of ``pipelines/*.yaml``.
        overrides: Changes to the recipe, one per item, as ``dotted.path=value`` (the value is
            YAML), e.g. ``vision_init.train.steps=500``.
        steps_scale: Multiply every training step count (e.g. 0.1 for a shorter run); 0 keeps
            the recipe's ``steps_scale``.
        options: Where the weights are written and recorded.
    """
    plan = stage_plan(recipe, overrides, steps_scale, options)
    return {"weights": section(plan.vision_weights(), recipe, "vision_init")}


@flow(name="pretrain", flow_run_name=run_name("pretrain"))
def pretrain(recipe: recipes.RecipeName = "demo", variant: str = "codis",
             overrides: tuple[str, ...] = (), steps_scale: StepsScale = 0.0,
             options: StageOptions = StageOptions()) -> dict[str, Any]:
    """Pretrain one variant of the recipe (in this process, or under torchrun for several GPUs),
    after its data and vision initialisation.

    Args:
        recipe: The recipe, one of ``pipelines/*.yaml``.
        variant: The recipe's variant to pretrain, e.g. codis or albef.
        overrides: Changes to the recipe, one per item, as ``dotted.path=value`` (the value is
            YAML), e.g. ``pretrain.train.steps=600`` or
            ``variants.codis.model.codebook.size=64``.
        steps_scale: Multiply every training step count (e.g. 0.1 for a shorter run); 0 keeps
            the recipe's ``steps_scale``.
        options: Where the model is written and recorded.
    """
    plan = stage_plan(recipe, overrides, steps_scale, options)
    return plan.pretrained(variant).to_dict()


@flow(name="finetune", flow_run_name=run_name("finetune"))
def finetune(recipe: recipes.RecipeName = "demo", variant: str = "codis",
             task: str = "retrieval", overrides: tuple[str, ...] = (),
             steps_scale: StepsScale = 0.0, options: StageOptions = StageOptions(),
             ) -> dict[str, Any]:
    """Finetune one variant's pretrained model on one task of the recipe (after NLVR²'s text
    assignment), pretraining it first if the store does not have it.

    Args:
        recipe: The recipe, one of ``pipelines/*.yaml``.
        variant: The recipe's variant whose pretrained model is finetuned, e.g. codis or albef.
        task: The recipe's task: retrieval, vqa, nlvr or ve, or a label such as ``vqa.demo``
            when the recipe has that task on several datasets.
        overrides: Changes to the recipe, one per item, as ``dotted.path=value`` (the value is
            YAML), e.g. ``tasks.vqa.train.steps=200`` (a task by its name or list index).
        steps_scale: Multiply every training step count (e.g. 0.1 for a shorter run); 0 keeps
            the recipe's ``steps_scale``.
        options: Where the model is written and recorded.
    """
    plan = stage_plan(recipe, overrides, steps_scale, options)
    return plan.finetuned(variant, task).to_dict()


@flow(name="evaluate", flow_run_name=run_name("evaluate"))
def evaluate(recipe: recipes.RecipeName = "demo", variant: str = "codis",
             task: str = "retrieval", zero_shot: bool = False, overrides: tuple[str, ...] = (),
             steps_scale: StepsScale = 0.0, options: EvaluateOptions = EvaluateOptions(),
             ) -> dict[str, Any]:
    """Evaluate one variant on one task of the recipe: its finetuned model, or its pretrained
    one zero-shot. The models it needs are taken from the store, or trained first.

    Args:
        recipe: The recipe, one of ``pipelines/*.yaml``.
        variant: The recipe's variant to evaluate, e.g. codis or albef.
        task: The recipe's task: retrieval, vqa, nlvr or ve, or a label such as ``vqa.demo``
            when the recipe has that task on several datasets.
        zero_shot: Evaluate the pretrained model, without finetuning (retrieval only).
        overrides: Changes to the recipe, one per item, as ``dotted.path=value`` (the value is
            YAML), e.g. ``tasks.vqa.config.k_test=64`` (a task by its name or list index).
        steps_scale: Multiply every training step count of the stages it needs (e.g. 0.1 for
            a shorter run); 0 keeps the recipe's ``steps_scale``.
        options: Where the evaluation is written and recorded, and optionally a checkpoint to
            evaluate instead of the variant's own.
    """
    plan = stage_plan(recipe, overrides, steps_scale, options)
    return plan.evaluation(variant, task, zero_shot, options.checkpoint or None).to_dict()


@flow(name="analyze", flow_run_name=run_name("analyze"))
def analyze(recipe: recipes.RecipeName = "demo", variant: str = "codis",
            overrides: tuple[str, ...] = (), steps_scale: StepsScale = 0.0,
            options: StageOptions = StageOptions()) -> dict[str, Any]:
    """Codebook usage, retrieval examples and word-level Grad-CAM of one variant's pretrained
    model: the report's qualitative sections (the recipe's ``report.analysis``).

    Args:
        recipe: The recipe, one of ``pipelines/*.yaml``.
        variant: The recipe's variant to analyse, e.g. codis or albef.
        overrides: Changes to the recipe, one per item, as ``dotted.path=value`` (the value is
            YAML), e.g. ``report.analysis.examples=5``.
        steps_scale: Multiply every training step count of the stages it needs (e.g. 0.1 for
            a shorter run); 0 keeps the recipe's ``steps_scale``.
        options: Where the figures are written and recorded.
    """
    plan = stage_plan(recipe, overrides, steps_scale, options)
    return section(plan.analysis(variant), recipe, "report.analysis").to_dict()


@flow(name="register", flow_run_name=run_name("register"))
def register(recipe: recipes.RecipeName = "demo", variant: str = "codis", task: str = "",
             overrides: tuple[str, ...] = (), steps_scale: StepsScale = 0.0,
             options: StageOptions = StageOptions()) -> dict[str, Any]:
    """Register one variant's model in the MLflow model registry as candidate, and as champion
    when it beats the current champion by the recipe's margin.

    Args:
        recipe: The recipe, one of ``pipelines/*.yaml``.
        variant: The recipe's variant to register, e.g. codis or albef.
        task: Empty: the pretrained model (scored by its zero-shot evaluation). A task
            (retrieval, vqa, nlvr or ve, or a label such as ``vqa.demo``): the model finetuned
            on it.
        overrides: Changes to the recipe, one per item, as ``dotted.path=value`` (the value is
            YAML), e.g. ``tracking.champion_margin=1.0``.
        steps_scale: Multiply every training step count of the stages it needs (e.g. 0.1 for
            a shorter run); 0 keeps the recipe's ``steps_scale``.
        options: Where the stages it needs are written, and the MLflow that registers.
    """
    plan = stage_plan(recipe, overrides, steps_scale, options)
    return plan.register_finetuned(variant, task) if task else plan.register_pretrained(variant)


@flow(name="report", flow_run_name=run_name("report"))
def report(recipe: recipes.RecipeName = "demo", overrides: tuple[str, ...] = (),
           steps_scale: StepsScale = 0.0, options: StageOptions = StageOptions(),
           ) -> dict[str, Any]:
    """The recipe's report comparing its variants; every stage it needs is taken from the store,
    or run first.

    Args:
        recipe: The recipe, one of ``pipelines/*.yaml``.
        overrides: Changes to the recipe, one per item, as ``dotted.path=value`` (the value is
            YAML), e.g. ``report.title=Demo``.
        steps_scale: Multiply every training step count of the stages it needs (e.g. 0.1 for
            a shorter run); 0 keeps the recipe's ``steps_scale``.
        options: Where the report is written and recorded.
    """
    plan = stage_plan(recipe, overrides, steps_scale, options)
    return plan.report().to_dict()
