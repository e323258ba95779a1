"""The demo recipe end to end at its smallest, on a busy machine: real codis, img2dataset,
webdataset, Prefect (the local server the CLI starts and stops, flows/server.py) and MLflow
(SQLite), every stage of `pipelines/demo.yaml` run for real while busy-loop processes load every
core that the other test workers leave (the README's commands must pass on a loaded machine: the
former ephemeral Prefect server timed out starting there). Afterwards no Prefect server is left
and no finished training stage keeps its training state."""

import json
import os
import signal
import socket
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
    "demo_world.classification_images": "{train: 64, val: 16}",
    "pretrain.train.batch_size": "8",
}


@pytest.fixture
def busy_cores():
    """One busy-loop process per core this test may use that no other test worker of this run
    keeps busy already (scripts/test.sh runs two), for as long as the test runs."""
    other_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) - 1
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL,
                              start_new_session=True)
             for _ in range(max(1, len(os.sched_getaffinity(0)) - other_workers))]
    yield len(loops)
    for loop in loops:
        try:
            os.killpg(loop.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        loop.wait()


def process_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_demo_recipe_runs_end_to_end_at_its_smallest_with_every_core_busy(tmp_path, busy_cores):
    command = [sys.executable, "-m", "flows.reproduce", "--recipe", "pipelines/demo.yaml",
               "--runs-root", str(tmp_path / "runs"), "--steps-scale", "0.01", "--no-progress"]
    for path, value in SMALL_WORLD.items():
        command += ["--set", f"{path}={value}"]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "OMP_NUM_THREADS": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    for name in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "CODIS_PREFECT_STARTUP_TIMEOUT",
                 "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"):
        env.pop(name, None)  # the defaults must hold on a busy machine
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1700)
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
    store = tmp_path / "runs" / "store"
    stages = {p.parent.parent.name for p in store.glob("*/*/_stage.json")}
    assert {"generate_demo", "download", "shard", "pretrain", "evaluate", "finetune",
            "text_assignment", "analyze", "report"} <= stages
    # The recipe does not keep training state: finished training stages hold none.
    trained = [p.parent for kind in ("pretrain", "finetune", "text_assignment")
               for p in store.glob(f"{kind}/*/_stage.json")]
    assert trained and not [folder for folder in trained if (folder / "checkpoints").exists()]

    # The run's own Prefect server recorded it under PREFECT_HOME and ended with it.
    line = next(line for line in done.stdout.splitlines() if line.startswith("Prefect API:"))
    assert "a local server for this run" in line, line
    pid = int(line.split("pid ")[1].split(",")[0])
    port = int(line.split("127.0.0.1:")[1].split("/")[0])
    assert process_gone(pid)
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0
    assert (tmp_path / "prefect" / "prefect.db").is_file()
