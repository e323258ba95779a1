"""The demo recipe end to end at its smallest: real codis, img2dataset, webdataset, Prefect
(temporary local API) and MLflow (SQLite), every stage of `pipelines/demo.yaml` run for real."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMALL_WORLD = {
    "demo_world.pretrain_images": "48",
    "demo_world.retrieval_images": "{train: 16, val: 4, test: 8}",
    "demo_world.vqa_images": "{train: 8, val: 6, test: 2}",
    "demo_world.nlvr_pairs": "{train: 20, dev: 6, test: 6}",
    "demo_world.ve_images": "{train: 8, dev: 6, test: 6}",
    "pretrain.train.batch_size": "8",
}


@pytest.mark.slow
def test_demo_recipe_runs_end_to_end_at_its_smallest(tmp_path):
    command = [sys.executable, "-m", "flows.reproduce", "--recipe", "pipelines/demo.yaml",
               "--runs-root", str(tmp_path / "runs"), "--steps-scale", "0.01", "--no-progress"]
    for path, value in SMALL_WORLD.items():
        command += ["--set", f"{path}={value}"]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "OMP_NUM_THREADS": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = next((tmp_path / "runs").glob("demo-*"))
    reproduction = json.loads((run_dir / "reproduction.json").read_text())
    assert reproduction["status"] == "completed", reproduction.get("status")
    html = (run_dir / "report" / "report.html").read_text()
    for needle in ("codis", "albef", "VQA", "NLVR", "SNLI-VE", "data:image/png;base64"):
        assert needle in html
    assert "report:" in done.stdout and str(run_dir) in done.stdout
    assert (tmp_path / "runs" / "mlflow.db").is_file()
    # Every stage of both variants completed with its marker in the content-keyed store.
    stages = {p.parent.parent.name for p in (tmp_path / "runs" / "store").glob("*/*/_stage.json")}
    assert {"generate_demo", "download", "shard", "pretrain", "evaluate", "finetune",
            "text_assignment", "analyze", "report"} <= stages
