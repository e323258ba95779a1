"""Two processes at once in one runs folder (issue #16): on a fresh folder both create MLflow's
database and experiment, both register the same checkpoints, and both complete, with one model
version per stage key and no run left RUNNING. And reproductions stopped from outside: SIGTERM
ends their MLflow runs KILLED, kill -9 leaves them to the next reproduction to end."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# Waits at a barrier (the test's "go" file) with everything imported, then opens a fresh database
# and registers one checkpoint under a key both processes share and one under a key of its own.
TRACKER_CHILD = r"""
import json, sys, time
from pathlib import Path
import mlflow  # noqa: F401  - imported before the barrier, so that both start together
import torch
from flows.tracking import Tracker

folder, name, score = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
(folder / f"ready-{name}").touch()
while not (folder / "go").exists():
    time.sleep(0.002)
tracker = Tracker(f"sqlite:///{folder}/mlflow.db", "concurrent",
                  artifact_location=(folder / "mlartifacts").as_uri(), system_metrics=False)
found = {}
for key, value in (("shared", 0.5), (name, score)):
    found[key] = tracker.register_checkpoint("m", folder / "model.pt", stage_key=key,
                                             load=lambda path: torch.nn.Linear(2, 1),
                                             source_run_id=None, label=key,
                                             score_name="s", score=value)
print(json.dumps(found))
"""


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, log: Path, timeout: float) -> str:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    output = log.read_text()
    assert process.returncode == 0, output[-4000:]
    return output


def test_two_trackers_on_a_fresh_database_register_each_key_once(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    (tmp_path / "model.pt").write_bytes(b"weights")
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI", None)
    children = {name: start([sys.executable, "-c", TRACKER_CHILD, str(tmp_path), name, score],
                            env, tmp_path / f"{name}.log")
                for name, score in (("a", "0.6"), ("b", "0.7"))}
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"ready-{n}").exists() for n in children):
        assert time.monotonic() < deadline and all(c.poll() is None for c in children.values()), \
            "\n".join((tmp_path / f"{n}.log").read_text() for n in children)
        time.sleep(0.05)
    (tmp_path / "go").touch()
    results = {name: json.loads(finish(child, tmp_path / f"{name}.log", 300).splitlines()[-1])
               for name, child in children.items()}

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = {int(v.version): v.tags["codis.stage_key"]
                for v in client.search_model_versions("name='m'")}
    assert sorted(versions.values()) == ["a", "b", "shared"]  # one version per key
    shared = [r["shared"] for r in results.values()]
    assert [r["registered"] for r in shared].count(True) == 1
    assert {r["version"] for r in shared} == {v for v, k in versions.items() if k == "shared"}
    assert int(client.get_model_version_by_alias("m", "candidate").version) == max(versions)
    champion = client.get_model_version_by_alias("m", "champion")
    assert champion.tags["codis.stage_key"] == "b"  # the best score, whatever the order
    experiment = client.get_experiment_by_name("concurrent")
    # Without a training run, each version's model lives in a run of its own: one per version
    # (the run of a duplicate that lost the race is deleted with it).
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(
        client.get_model_version("m", str(v)).run_id for v in versions)
    assert {r.info.status for r in runs} == {"FINISHED"}


def tiny_recipe(folder: Path) -> str:
    """One variant, one task, a world of a few images, one or two steps per training stage: every
    kind of stage and both registrations (pretrained, finetuned), as little compute as possible."""
    part = {"image_root": "demo://"}
    recipe = {
        "name": "twice",
        "demo_world": {"seed": 0, "image_size": 32, "pretrain_images": 16,
                       "retrieval_images": {"train": 8, "val": 2, "test": 8},
                       "vqa_images": {"train": 4, "val": 2, "test": 2},
                       "nlvr_pairs": {"train": 4, "dev": 2, "test": 2},
                       "ve_images": {"train": 4, "dev": 2, "test": 2},
                       "classification_images": {"train": 4, "val": 2},
                       "dead_urls": 0, "non_image_urls": 0},
        "pretrain_data": [{"name": "web", "url_list": "demo://pretrain/urls.parquet",
                           "download": {"image_size": 32, "samples_per_shard": 16,
                                        "processes_count": 1, "thread_count": 2}}],
        "variants": {"codis": {"preset": "tiny", "model": {"mode": "codis"}}},
        "pretrain": {"train": {"steps": 2, "batch_size": 4, "checkpoint_every": 1, "log_every": 1},
                     "optim": {"lr": 1e-3, "warmup_steps": 1}, "reference_batch": 4,
                     "data": {"num_workers": 0, "hflip": False}},
        "tasks": [{"task": "retrieval", "name": "t", "preset": "demo", "zero_shot": True,
                   "train_data": [{"annotations": "demo://retrieval/train.json", **part}],
                   "eval_data": {"annotations": "demo://retrieval/test.json", **part},
                   "train": {"steps": 1}}],
    }
    path = folder / "twice.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


def test_two_reproductions_at_once_both_complete(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    recipe, runs = tiny_recipe(tmp_path), tmp_path / "runs"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "OMP_NUM_THREADS": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    logs = {n: tmp_path / f"{n}.log" for n in ("first", "second")}
    children = {n: start([sys.executable, "-m", "flows.reproduce", "--recipe", recipe,
                          "--runs-root", str(runs), "--run-id", n, "--no-progress"], env, log)
                for n, log in logs.items()}
    for name, child in children.items():
        finish(child, logs[name], 900)

    for name in children:
        summary = json.loads((runs / f"twice-{name}" / "reproduction.json").read_text())
        assert summary["status"] == "completed", name
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for model in ("twice-pretrained", "twice-retrieval-t"):
        keys = [v.tags["codis.stage_key"] for v in client.search_model_versions(f"name='{model}'")]
        assert len(keys) == 1, (model, keys)  # registered by one run, found by the other
    experiment = client.get_experiment_by_name("codis-twice")
    runs_found = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs_found if r.data.tags.get("codis.kind") == "reproduction"]
    assert len(parents) == 2
    assert {r.info.status for r in runs_found} == {"FINISHED"}


def wait_for(log: Path, text: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while text not in (log.read_text() if log.exists() else ""):
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)


def test_interrupted_runs_end_killed(tmp_path: Path) -> None:
    """kill -9 of a whole reproduction leaves its MLflow runs RUNNING: the next reproduction
    ends them KILLED. SIGTERM ends the runs of the reproduction it stops KILLED at once."""
    from mlflow import MlflowClient

    recipe, runs = tiny_recipe(tmp_path), tmp_path / "runs"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "OMP_NUM_THREADS": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)

    def reproduce(name: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        command = [sys.executable, "-m", "flows.reproduce", "--recipe", recipe, "--runs-root",
                   str(runs), "--run-id", name, "--no-progress",
                   "--set", "pretrain.train.steps=100000"]
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"),
                                   stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(log, "pretrain[codis]: step ", process)  # a step done (1, or resumed)
        return process, log

    killed, _ = reproduce("killed")
    os.killpg(killed.pid, signal.SIGKILL)  # the process and its children, no cleanup at all
    killed.wait()
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("codis-twice").experiment_id

    def states(run_dir: str) -> dict[str, tuple[str, str | None]]:
        parent = client.search_runs([experiment], f"tags.`codis.run_dir` = '{run_dir}'")[0]
        children = client.search_runs(
            [experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        return {r.info.run_name: (r.info.status, r.data.tags.get("codis.ended_by"))
                for r in [parent, *children]}

    first = str(runs / "twice-killed")
    assert states(first)["pretrain[codis]"] == ("RUNNING", None)
    assert states(first)["twice-killed"] == ("RUNNING", None)

    stopped, log = reproduce("stopped")
    try:
        after = states(first)
        assert after["pretrain[codis]"] == ("KILLED", "cleanup")
        assert after["twice-killed"] == ("KILLED", "cleanup")
        assert after["download[web]"] == ("FINISHED", None)
        stopped.send_signal(signal.SIGTERM)
        assert stopped.wait(timeout=300) == 128 + signal.SIGTERM, log.read_text()[-4000:]
    finally:
        try:
            os.killpg(stopped.pid, signal.SIGKILL)  # whatever it left behind
        except ProcessLookupError:
            pass
        stopped.wait()
    second = states(str(runs / "twice-stopped"))
    why = f"{second}\n{log.read_text()[-4000:]}"
    assert second["pretrain[codis]"] == ("KILLED", None), why
    assert second["twice-stopped"] == ("KILLED", None), why
    assert {s for s, _ in second.values()} <= {"FINISHED", "KILLED"}, why
