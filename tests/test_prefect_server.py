"""A real local Prefect server and worker: a reproduction of the quick recipe, then `prefect deploy`
of the evaluate stage from prefect.yaml, a run triggered through the API as the UI's form does
(recipe, variant, task and one override, nothing else but where the runs live), picked up by
`prefect worker start --run-once` on the codis-local process pool. The stage must reuse every
upstream stage the reproduction left in the store and add only its own evaluation, in the store
and in MLflow. Every process is ended by PID. Waits are generous and nothing is timed: the test
must pass on a loaded machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import flows  # noqa: F401  - PREFECT_SERVER_ANALYTICS_ENABLED before prefect is imported
from stack import (PREFECT, REPO, assert_flow_run_completed, clean_env, free_port, run_cli,
                   start, stop, wait_healthy)

pytestmark = pytest.mark.slow

# Changes only the evaluation's parameters: every stage before it keeps its key.
OVERRIDE = "tasks.retrieval.evaluate_args.batch_size=4"


def stage_folders(store: Path) -> set[str]:
    """``<stage>/<key>`` of every completed stage in ``store``."""
    return {str(marker.parent.relative_to(store)) for marker in store.glob("*/*/_stage.json")}


@pytest.mark.timeout(3600)
def test_a_stage_deployment_from_recipe_variant_and_task_reuses_the_store(tmp_path: Path) -> None:
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    runs = tmp_path / "runs"
    # Links into the MLflow UI, as scripts/ui.sh would serve this test's store.
    env = clean_env(PREFECT_HOME=str(tmp_path / "prefect"),
                    CODIS_MLFLOW_UI_URL="http://127.0.0.1:5000",
                    CODIS_MLFLOW_UI_STORE=f"sqlite:///{runs}/mlflow.db")
    client_env = {**env, "PREFECT_API_URL": api}
    store = runs / "store"
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    processes: list[tuple[subprocess.Popen, int]] = []
    try:
        server = start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                       env, server_log)
        processes.append((server, signal.SIGTERM))
        wait_healthy(f"{api}/health", server, server_log, limit=300)

        reproduction = subprocess.run(
            [sys.executable, "-m", "flows.reproduce", "--recipe", "pipelines/quick.yaml",
             "--runs-root", str(runs), "--no-progress"],
            env=client_env, cwd=REPO, capture_output=True, text=True, timeout=2400,
            stdin=subprocess.DEVNULL)
        assert reproduction.returncode == 0, \
            reproduction.stdout[-3000:] + reproduction.stderr[-3000:]
        before = stage_folders(store)
        assert any(folder.startswith("pretrain/") for folder in before)
        assert_champion_loads_through_mlflow(runs, store)

        from mlflow import MlflowClient

        tracking = MlflowClient(tracking_uri=f"sqlite:///{runs}/mlflow.db")
        experiment = tracking.get_experiment_by_name("codis-quick")
        runs_before = {r.info.run_id for r in tracking.search_runs([experiment.experiment_id])}

        run_cli([PREFECT, "work-pool", "create", "codis-local", "--type", "process"], client_env,
                180)
        out = run_cli([PREFECT, "--no-prompt", "deploy", "--name", "evaluate/evaluate"],
                      client_env, 600)
        assert "evaluate/evaluate" in out

        # Trigger it as the UI's run form does: a flow run created from the deployment.
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        parameters = {"recipe": "quick", "variant": "codis", "task": "retrieval",
                      "overrides": [OVERRIDE],
                      "options": {"runs_root": str(runs), "progress": False}}
        with temporary_settings(updates={PREFECT_API_URL: api}):
            with get_client(sync_client=True) as client:
                deployment = client.read_deployment_by_name("evaluate/evaluate")
                assert deployment.work_pool_name == "codis-local"
                flow_run = client.create_flow_run_from_deployment(deployment.id,
                                                                  parameters=parameters)

        # Worker SIGTERM is ignored by a long-running worker; --run-once exits by itself.
        worker = start([PREFECT, "worker", "start", "--pool", "codis-local", "--run-once"],
                       client_env, worker_log)
        processes.append((worker, signal.SIGKILL))
        worker.wait(timeout=1200)
        assert_flow_run_completed(api, flow_run.id, worker_log)
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        with temporary_settings(updates={PREFECT_API_URL: api}):
            with get_client(sync_client=True) as client:
                assert client.read_flow_run(flow_run.id).name == "evaluate[quick retrieval/codis]"
                artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
    finally:
        for process, sig in reversed(processes):
            stop(process, sig)
    assert all(process.poll() is not None for process, _ in processes)

    added = stage_folders(store) - before
    assert len(added) == 1 and next(iter(added)).startswith("evaluate/"), added
    assert stage_folders(store) >= before
    marker = json.loads((store / next(iter(added)) / "_stage.json").read_text())
    assert marker["params"]["args"] == {"batch_size": 4} and not marker["params"]["zero_shot"]
    assert marker["provenance"]["prefect_flow_run_id"] == str(flow_run.id)
    # It evaluated the codis model that the reproduction finetuned, found in the store.
    checkpoint = Path(marker["input_paths"]["checkpoint"]).resolve()
    trained = checkpoint.parent.relative_to(store.resolve())
    assert trained.parts[0] == "finetune" and str(trained) in before
    assert json.loads((checkpoint.parent / "_stage.json").read_text())["provenance"]["label"] \
        == "retrieval.demo/codis"
    assert "retrieval.demo.r_mean" in marker["metrics"]

    # Reused stages create no MLflow run: the only new one is the evaluation's.
    new = [r for r in tracking.search_runs([experiment.experiment_id])
           if r.info.run_id not in runs_before]
    assert [r.info.run_name for r in new] == ["evaluate[retrieval.demo/codis]"]
    assert new[0].info.status == "FINISHED"
    assert new[0].data.tags["codis.stage_key"] == next(iter(added)).split("/")[1]
    # Linked both ways: the MLflow run names the flow run of this persistent server, and the
    # flow run shows the stage's metrics and a link to that MLflow run.
    assert new[0].data.tags["prefect.flow_run_id"] == str(flow_run.id)
    assert new[0].data.tags["prefect.flow_run_url"].endswith(f"/runs/flow-run/{flow_run.id}")
    tables = [a for a in artifacts if a.type == "table"]
    assert len(tables) == 1 and "retrieval.demo.r_mean" in json.dumps(tables[0].data)
    # Prefect stores a link artifact as Markdown: [text](url).
    assert any(a.type == "markdown" and f"/runs/{new[0].info.run_id})" in str(a.data)
               for a in artifacts), [(a.type, a.data) for a in artifacts]


def assert_champion_loads_through_mlflow(runs: Path, store: Path) -> None:
    """``models:/quick-pretrained@champion`` loads with MLflow alone: a codis model holding the
    weights of the pretraining run it names as its source."""
    import mlflow
    import torch
    from mlflow import MlflowClient

    from codis.model import CodisModel, load_model

    uri = f"sqlite:///{runs}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias("quick-pretrained", "champion")
    source = client.get_run(version.run_id)
    assert source.info.run_name.startswith("pretrain[")
    # What README.md tells a user to do: MLflow's opt-in to pickled models, the tracking URI.
    saved = {name: os.environ.get(name) for name in ("MLFLOW_ALLOW_PICKLE_DESERIALIZATION",
                                                     "MLFLOW_TRACKING_URI")}
    os.environ.update(MLFLOW_ALLOW_PICKLE_DESERIALIZATION="true", MLFLOW_TRACKING_URI=uri)
    try:
        model = mlflow.pytorch.load_model("models:/quick-pretrained@champion")
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    assert isinstance(model, CodisModel)
    trained = load_model(Path(source.data.tags["codis.stage_dir"]) / "model.pt")
    reference = trained.state_dict()
    assert all(torch.equal(value, reference[name]) for name, value in model.state_dict().items())
