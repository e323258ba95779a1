"""The deployments of prefect.yaml as the Prefect UI sees them: ``prefect deploy --all`` against a
real local server (one for the module), then every deployment read back through Prefect's API.
Their run forms are built from these parameter schemas, so what is checked here is what a user
gets: a distinct name per deployment, a description on every field, a recipe chosen from
``pipelines/``, nothing to fill in before a run, no field that needs a type picked first, one
``zero_shot``. Every process is ended by PID; waits are generous and nothing is timed. Without a
server: what a user fills in reaches the recipe as meant."""

from __future__ import annotations

import inspect
import re
import signal
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

import flows  # noqa: F401  - PREFECT_SERVER_ANALYTICS_ENABLED before prefect is imported
from flows import deployments as stage_flows
from flows.recipe import RecipeError
from stack import PREFECT, REPO, clean_env, free_port, run_cli, start, stop, wait_healthy

# The parameters every run form shows first, which must take a value without a type click.
COMMON = ("recipe", "variant", "task", "zero_shot", "overrides", "steps_scale")
SPHINX_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc):`")


def stage_arguments(stage_flow: Any, given: dict[str, Any]) -> dict[str, Any]:
    """The arguments a run of ``stage_flow`` gets from a form with ``given`` filled in: validated
    as Prefect validates them, the flow's defaults for the rest."""
    bound = inspect.signature(stage_flow.fn).bind(**stage_flow.validate_parameters(given))
    bound.apply_defaults()
    return dict(bound.arguments)


def test_evaluate_vqa_of_codis_with_k_test_64_is_task_and_one_override(tmp_path: Path) -> None:
    arguments = stage_arguments(stage_flows.evaluate, {
        "task": "vqa", "overrides": ["tasks.vqa.config.k_test=64"],
        "options": {"runs_root": str(tmp_path), "track": False}})
    assert (arguments["recipe"], arguments["variant"], arguments["zero_shot"]) == (
        "demo", "codis", False)
    plan = stage_flows.stage_plan(arguments["recipe"], arguments["overrides"],
                                  arguments["steps_scale"], arguments["options"])
    assert plan.spec.name == "demo" and "codis" in plan.spec.variants
    assert plan.task(arguments["task"]).config["k_test"] == 64
    assert plan.spec.steps_scale == 1.0  # 0 in the form: the recipe's own
    assert not list(tmp_path.rglob("_stage.json"))  # a plan runs nothing until asked


def test_a_recipe_file_outside_pipelines_replaces_the_choice(tmp_path: Path) -> None:
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(f"extends: {REPO / 'pipelines' / 'quick.yaml'}\nname: mine\n")
    arguments = stage_arguments(stage_flows.pretrain, {
        "variant": "albef", "steps_scale": 0.5,
        "options": {"recipe_file": str(recipe), "runs_root": str(tmp_path), "track": False}})
    plan = stage_flows.stage_plan(arguments["recipe"], arguments["overrides"],
                                  arguments["steps_scale"], arguments["options"])
    assert (plan.spec.name, plan.spec.steps_scale) == ("mine", 0.5)
    with pytest.raises(RecipeError, match="variant 'nope' is not in recipe mine"):
        plan.pretrained("nope")


def test_a_form_refuses_a_recipe_that_is_not_shipped() -> None:
    with pytest.raises(Exception, match="recipe"):
        stage_flows.evaluate.validate_parameters({"recipe": "pipelines/demo.yaml"})


@pytest.fixture(scope="module")
def deployments(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Every deployment of prefect.yaml, deployed to a fresh local server: ``<flow>/<name>`` ->
    the API's deployment."""
    folder = tmp_path_factory.mktemp("deployments")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = clean_env(PREFECT_HOME=str(folder / "prefect"))
    log = folder / "server.log"
    server = start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                   env, log)
    try:
        wait_healthy(f"{api}/health", server, log, limit=300)
        client_env = {**env, "PREFECT_API_URL": api}
        run_cli([PREFECT, "work-pool", "create", "codis-local", "--type", "process"], client_env,
                180)
        run_cli([PREFECT, "--no-prompt", "deploy", "--all"], client_env, 900)

        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: api}):
            with get_client(sync_client=True) as client:
                found = client.read_deployments()
                flow_names = {d.flow_id: client.read_flow(d.flow_id).name for d in found}
        yield {f"{flow_names[d.flow_id]}/{d.name}": d for d in found}
    finally:
        stop(server, signal.SIGTERM)


def fields(schema: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, property)`` for every field of a parameter schema, those of the nested models
    (pydantic models, shown as groups of fields) included."""
    yield from schema["properties"].items()
    for model, definition in schema.get("definitions", {}).items():
        for name, prop in definition.get("properties", {}).items():
            yield f"{model}.{name}", prop


class TestDeployedForms:
    """The run forms of the deployments on a real server."""

    pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

    def test_each_deployment_is_named_after_its_flow(self, deployments) -> None:
        configured = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
        names = [d.name for d in deployments.values()]
        assert len(names) == len(configured) and len(set(names)) == len(names), names
        assert set(names) == {d["entrypoint"].rsplit(":", 1)[1] for d in configured}
        for name, deployment in deployments.items():
            flow_name, deployment_name = name.split("/")
            assert deployment_name == flow_name, name
            assert deployment.work_pool_name == "codis-local"
            assert deployment.description, name

    def test_every_field_of_every_form_is_described(self, deployments) -> None:
        for name, deployment in deployments.items():
            schema = deployment.parameter_openapi_schema
            for where, prop in fields(schema):
                description = prop.get("description", "")
                assert description.strip(), f"{name}: {where} has no description"
                assert not SPHINX_ROLE.search(description), f"{name}: {where}: {description}"
            for model, definition in schema.get("definitions", {}).items():
                assert definition.get("description", "").strip(), f"{name}: {model}"
            if "overrides" in schema["properties"]:
                assert "dotted.path=value" in schema["properties"]["overrides"]["description"]

    def test_every_form_offers_the_shipped_recipes_with_demo_chosen(self, deployments) -> None:
        shipped = sorted(path.stem for path in (REPO / "pipelines").glob("*.yaml"))
        assert "demo" in shipped and "quick" in shipped
        for name, deployment in deployments.items():
            recipe = deployment.parameter_openapi_schema["properties"]["recipe"]
            assert sorted(recipe["enum"]) == shipped, name
            assert recipe["default"] == "demo", name
            assert deployment.parameters.get("recipe") == "demo", name

    def test_a_run_needs_no_field_filled_in_and_no_type_picked(self, deployments) -> None:
        for name, deployment in deployments.items():
            schema = deployment.parameter_openapi_schema
            assert not schema.get("required"), f"{name}: required {schema.get('required')}"
            for field in COMMON:
                prop = schema["properties"].get(field)
                if prop is not None:
                    # A union with None is the UI's type switch ('Property is type "None"').
                    assert "anyOf" not in prop and prop.get("type") != "null", f"{name}: {field}"
                    assert "default" in prop, f"{name}: {field}"

    def test_stage_forms_take_variant_and_task_not_specs_or_paths(self, deployments) -> None:
        stages = {name.split("/")[0]: d.parameter_openapi_schema["properties"]
                  for name, d in deployments.items() if name != "reproduce/reproduce"}
        assert set(stages) == {"generate_demo", "download", "shard", "vision_init", "pretrain",
                               "finetune", "evaluate", "analyze", "register", "report"}
        with_variant = {name for name, props in stages.items() if "variant" in props}
        with_task = {name for name, props in stages.items() if "task" in props}
        assert with_variant == {"pretrain", "finetune", "evaluate", "analyze", "register"}
        assert with_task == {"shard", "finetune", "evaluate", "register"}
        for name in with_variant:
            assert stages[name]["variant"]["default"] == "codis", name
        for name, props in stages.items():
            assert "options" in props, name
            assert not {"task_spec", "settings", "shards", "world", "checkpoint"} & set(props), name

    def test_evaluate_has_one_zero_shot_and_a_checkpoint_option(self, deployments) -> None:
        schema = deployments["evaluate/evaluate"].parameter_openapi_schema
        zero_shots = [where for where, _ in fields(schema)
                      if where.rsplit(".", 1)[-1] == "zero_shot"]
        assert zero_shots == ["zero_shot"]
        assert schema["properties"]["zero_shot"]["default"] is False
        options = schema["definitions"][schema["properties"]["options"]["$ref"].rsplit("/", 1)[1]]
        assert set(options["properties"]) == {"recipe_file", "runs_root", "store",
                                              "tracking_uri", "track", "progress", "checkpoint"}
        checkpoint = options["properties"]["checkpoint"]
        assert checkpoint["default"] == ""
        assert "models:/<name>@<alias>" in checkpoint["description"]
