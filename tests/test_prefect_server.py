"""A real local Prefect server: `prefect deploy` of one stage from prefect.yaml, a run triggered
through the API as the UI does, picked up by `prefect worker start --run-once` on the codis-local
process pool, and its result found in the store and in MLflow. Every process is ended by PID.
Waits are generous and nothing is timed: the test must pass on a loaded machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

import flows  # noqa: F401  - PREFECT_SERVER_ANALYTICS_ENABLED before prefect is imported
from stack import (PREFECT, assert_flow_run_completed, free_port, run_cli, start, stop,
                   wait_healthy)

pytestmark = pytest.mark.slow

TINY_WORLD = {"seed": 5, "image_size": 32, "pretrain_images": 4,
              "retrieval_images": {"train": 2, "val": 1, "test": 2},
              "vqa_images": {"train": 2, "val": 2, "test": 1},
              "nlvr_pairs": {"train": 2, "dev": 2, "test": 2},
              "ve_images": {"train": 2, "dev": 2, "test": 2}}


@pytest.mark.timeout(1200)
def test_deployment_runs_on_a_worker_and_lands_in_mlflow(tmp_path: Path) -> None:
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1")
    client_env = {**env, "PREFECT_API_URL": api}
    store = tmp_path / "runs" / "store"
    tracking = f"sqlite:///{tmp_path}/runs/mlflow.db"
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    processes: list[tuple[subprocess.Popen, int]] = []
    try:
        with open(server_log, "wb") as log:
            server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1",
                                       "--port", str(port)], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        processes.append((server, signal.SIGTERM))
        wait_healthy(f"{api}/health", server, server_log, limit=300)

        run_cli([PREFECT, "work-pool", "create", "codis-local", "--type", "process"], client_env, 180)
        out = run_cli([PREFECT, "--no-prompt", "deploy", "--name", "generate_demo/local"],
                      client_env, 300)
        assert "generate_demo/local" in out

        # Trigger it as the UI's "Run" button does: a flow run created from the deployment.
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        parameters = {"world": TINY_WORLD,
                      "options": {"store": str(store), "tracking_uri": tracking,
                                  "experiment": "server-test", "progress": False}}
        with temporary_settings(updates={PREFECT_API_URL: api}):
            with get_client(sync_client=True) as client:
                deployment = client.read_deployment_by_name("generate_demo/local")
                assert deployment.work_pool_name == "codis-local"
                assert "world" in deployment.parameter_openapi_schema["properties"]
                flow_run = client.create_flow_run_from_deployment(deployment.id,
                                                                  parameters=parameters)

        # Worker SIGTERM is ignored by a long-running worker; --run-once exits by itself.
        worker = start([PREFECT, "worker", "start", "--pool", "codis-local", "--run-once"],
                       client_env, worker_log)
        processes.append((worker, signal.SIGKILL))
        worker.wait(timeout=480)
        assert_flow_run_completed(api, flow_run.id, worker_log)
    finally:
        for process, sig in reversed(processes):
            stop(process, sig)
    assert all(process.poll() is not None for process, _ in processes)

    markers = list(store.glob("generate_demo/*/_stage.json"))
    assert len(markers) == 1
    marker = json.loads(markers[0].read_text())
    assert marker["params"]["config"]["pretrain_images"] == 4
    world = markers[0].parent / "world"
    assert (world / "manifest.json").is_file() and (world / "retrieval" / "test.json").is_file()
    assert marker["provenance"]["prefect_flow_run_id"] == str(flow_run.id)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name("server-test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in runs] == ["generate_demo[demo]"]
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["codis.stage_key"] == markers[0].parent.name
    assert runs[0].data.metrics["demo_world.pretrain_pairs"] == 8.0  # 4 images x 2 captions
