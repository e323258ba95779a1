"""flows.tracking on a local SQLite store: registry operations that are idempotent and tolerate a
concurrent run, run states after errors and interruptions, runs left RUNNING by killed
processes ended by the next reproduction, links into the MLflow UI; and flows.compare reading
reproductions back. (Real codis checkpoints in the registry: test_registry.py.)"""

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from random import Random

import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from flows.compare import main as compare
from flows.tracking import (CANDIDATE, CHAMPION, ENDED_BY, EXPERIMENT_DESCRIPTION, HOST, NOTE,
                            PID, UI_STORE_ENV, UI_URL_ENV, Tracker, process_alive, signals_deferred,
                            sqlite_file)


@pytest.fixture
def python_signal_handlers():
    """Ctrl-C and SIGTERM handled as in a fresh interpreter for the test: a test run earlier in the
    same pytest process (an in-process Prefect flow) may have left other handlers installed."""
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for number, handler in previous.items():
        if handler is not None:
            signal.signal(number, handler)


@pytest.fixture
def tracker(tmp_path: Path) -> Tracker:
    return Tracker(f"sqlite:///{tmp_path}/mlflow.db", "tracking-test",
                   artifact_location=(tmp_path / "mlartifacts").as_uri(), system_metrics=False)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    path.write_bytes(b"weights")
    return path


def linear(path: Path) -> torch.nn.Module:
    """The 'loader' of the fake checkpoints: any module will do for the registry's logic."""
    return torch.nn.Linear(2, 1)


def register(tracker: Tracker, checkpoint: Path, key: str, score: float | None = None, *,
             margin: float = 0.0, source_run_id: str | None = "train") -> dict:
    """Register ``checkpoint`` as trained by a fresh run ("train"), or by ``source_run_id``."""
    if source_run_id == "train":
        with tracker.stage_run(f"train[{key}]", parent=None, tags={}) as run:
            pass
        source_run_id = run.run_id
    return tracker.register_checkpoint("m", checkpoint, stage_key=key, load=linear,
                                       source_run_id=source_run_id, label=key,
                                       score_name="s" if score is not None else None,
                                       score=score, margin=margin)


def versions(tracker: Tracker) -> dict[int, str]:
    return {int(v.version): v.tags["codis.stage_key"]
            for v in tracker.client.search_model_versions("name='m'")}


def alias(tracker: Tracker, name: str) -> int:
    return int(tracker.client.get_model_version_by_alias("m", name).version)


def status(tracker: Tracker, run_id: str) -> str:
    return tracker.client.get_run(run_id).info.status


@pytest.mark.parametrize("uri, expected", [
    ("sqlite:////abs/runs/mlflow.db", "/abs/runs/mlflow.db"),
    ("sqlite:///runs/mlflow.db?timeout=30", "runs/mlflow.db"),
    ("sqlite:///:memory:", None),
    ("http://127.0.0.1:5000", None),
    (None, None),
])
def test_sqlite_file(uri, expected) -> None:
    assert sqlite_file(uri) == (Path(expected) if expected else None)


# ---- registry ------------------------------------------------------------------------------------
def test_registering_a_stage_key_twice_returns_the_existing_version(tracker, checkpoint) -> None:
    first = register(tracker, checkpoint, "k1", score=0.5)
    assert first == {"registered": True, "model": "m", "version": 1,
                     "aliases": [CANDIDATE, CHAMPION], "run_id": first["run_id"]}
    again = register(tracker, checkpoint, "k1", score=0.9)
    assert again["registered"] is False and again["version"] == 1
    assert again["reason"] == "already registered"
    assert sorted(again["aliases"]) == [CANDIDATE, CHAMPION]
    worse = register(tracker, checkpoint, "k2", score=0.4)
    assert worse == {"registered": True, "model": "m", "version": 2, "aliases": [CANDIDATE],
                     "run_id": worse["run_id"]}
    assert versions(tracker) == {1: "k1", 2: "k2"}
    assert alias(tracker, CANDIDATE) == 2 and alias(tracker, CHAMPION) == 1
    better = register(tracker, checkpoint, "k3", score=0.7)
    assert better["aliases"] == [CANDIDATE, CHAMPION]
    assert alias(tracker, CANDIDATE) == 3 and alias(tracker, CHAMPION) == 3


def test_champion_moves_only_on_a_margin(tracker, checkpoint) -> None:
    register(tracker, checkpoint, "k1", score=0.50)
    assert register(tracker, checkpoint, "k2", score=0.55, margin=0.1)["aliases"] == [CANDIDATE]
    assert register(tracker, checkpoint, "k3", score=0.60, margin=0.1)["aliases"] == [CANDIDATE]
    assert alias(tracker, CHAMPION) == 1  # 0.60 is not more than 0.50 + 0.1
    assert register(tracker, checkpoint, "k4", score=0.61, margin=0.1)["aliases"] \
        == [CANDIDATE, CHAMPION]
    assert alias(tracker, CHAMPION) == 4 and alias(tracker, CANDIDATE) == 4
    scores = {int(v.version): v.tags["codis.score"]
              for v in tracker.client.search_model_versions("name='m'")}
    assert scores == {1: "0.5", 2: "0.55", 3: "0.6", 4: "0.61"}


def test_a_version_comes_from_the_run_that_trained_it(tracker, checkpoint) -> None:
    info = register(tracker, checkpoint, "k1")
    version = tracker.client.get_model_version("m", "1")
    assert version.run_id == info["run_id"] and version.source == f"runs:/{info['run_id']}/model"
    assert tracker.client.get_run(info["run_id"]).info.run_name == "train[k1]"
    logged = [a.path for a in tracker.client.list_artifacts(info["run_id"], "checkpoint")]
    assert logged == ["checkpoint/model.pt"]
    assert {a.path for a in tracker.client.list_artifacts(info["run_id"], "model")} \
        >= {"model/MLmodel", "model/data"}


@pytest.mark.parametrize("source_run_id", [None, "0" * 32])
def test_a_checkpoint_trained_elsewhere_gets_a_run_of_its_own(tracker, checkpoint,
                                                              source_run_id) -> None:
    """Trained with tracking off (no run id) or recorded in another store (an id unknown here)."""
    parent = tracker.start_run("reproduction")
    info = tracker.register_checkpoint("m", checkpoint, stage_key="k1", load=linear,
                                       source_run_id=source_run_id, label="codis",
                                       parent=parent.run_id)
    run = tracker.client.get_run(info["run_id"])
    assert run.info.run_name == "model[codis]" and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.data.tags.get("codis.source_run_id") == source_run_id
    assert tracker.client.get_model_version("m", "1").run_id == info["run_id"]
    assert tracker.download_checkpoint("m", CANDIDATE, checkpoint.parent / "download") \
        .read_bytes() == b"weights"


def test_a_model_or_experiment_created_meanwhile_is_not_an_error(tracker, checkpoint,
                                                                 monkeypatch, tmp_path) -> None:
    """The first look finds nothing, as for a run that looked just before a concurrent run
    created the model (the experiment); creating it then fails with "already exists"."""
    register(tracker, checkpoint, "k1")

    def missing(name):
        raise MlflowException(f"Registered Model with name={name} not found",
                              RESOURCE_DOES_NOT_EXIST)

    monkeypatch.setattr(tracker.client, "get_registered_model",
                        first_call(missing, tracker.client.get_registered_model))
    assert register(tracker, checkpoint, "k2")["version"] == 2
    monkeypatch.setattr(MlflowClient, "get_experiment_by_name",
                        first_call(lambda self, name: None, MlflowClient.get_experiment_by_name))
    again = Tracker(tracker.uri, "tracking-test", system_metrics=False)
    assert again.experiment_id == tracker.experiment_id


def first_call(instead, then):
    """A function that calls ``instead`` the first time, ``then`` afterwards."""
    calls = []

    def wrapper(*args):
        calls.append(args)
        return (instead if len(calls) == 1 else then)(*args)

    return wrapper


def test_a_duplicate_created_by_a_concurrent_registration_is_deleted(tracker, checkpoint,
                                                                     monkeypatch) -> None:
    """What a tracking server (no shared lock) sees when two runs register one key at once:
    both checked before either created a version. The lower version wins."""
    register(tracker, checkpoint, "k1", score=0.5)
    monkeypatch.setattr(tracker, "_version_for",
                        first_call(lambda model, key: None, tracker._version_for))
    info = register(tracker, checkpoint, "k1", score=0.9)
    assert info["registered"] is False and info["version"] == 1
    assert info["reason"] == "registered concurrently"
    assert versions(tracker) == {1: "k1"}  # version 2, the duplicate, is gone
    assert alias(tracker, CANDIDATE) == 1 and alias(tracker, CHAMPION) == 1


# ---- run states ----------------------------------------------------------------------------------
@pytest.mark.parametrize("error, expected", [
    (ValueError("bad"), "FAILED"),
    (KeyboardInterrupt(), "KILLED"),
    (SystemExit(143), "KILLED"),
])
def test_a_stage_run_ends_failed_on_an_error_and_killed_when_interrupted(tracker, error,
                                                                          expected) -> None:
    with pytest.raises(type(error)):
        with tracker.stage_run("stage", parent=None, tags={"codis.stage": "x"}) as run:
            raise error
    assert status(tracker, run.run_id) == expected
    with tracker.stage_run("stage", parent=None, tags={}) as ok:
        pass
    assert status(tracker, ok.run_id) == "FINISHED"


@pytest.mark.usefixtures("python_signal_handlers")
def test_an_interrupt_during_an_mlflow_write_lets_the_write_finish(tracker) -> None:
    """Ctrl-C landing inside a SQLite write is raised after it: the metric is kept, the run
    ends KILLED."""
    import sqlalchemy

    fired = []

    def interrupt(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("INSERT INTO METRICS") and not fired:
            fired.append(statement)
            os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode: mid-transaction

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            with tracker.stage_run("stage", parent=None, tags={}) as run:
                run.log_metrics({"loss": 1.0}, step=1)
                pytest.fail("the interrupt should have been raised by now")
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", interrupt)
    assert fired
    assert status(tracker, run.run_id) == "KILLED"
    assert [m.value for m in tracker.client.get_metric_history(run.run_id, "loss")] == [1.0]


@pytest.mark.usefixtures("python_signal_handlers")
def test_interrupts_at_random_moments_always_end_the_run_killed(tracker) -> None:
    """A stage logging metrics step after step, as pretraining does, interrupted at random
    moments. Before writes deferred signals, some interrupts left a SQLite transaction open: the
    database stayed locked and the run could not be ended (RUNNING after a 20 s wait)."""
    random = Random(0)
    for attempt in range(40):
        timer = threading.Timer(random.uniform(0.01, 0.15), os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            with tracker.stage_run(f"stage{attempt}", parent=None, tags={}) as run:
                for step in range(1, 100_000):
                    run.log_metrics({"loss": 1.0 / step}, step=step)
        timer.join()
    runs = tracker.client.search_runs([tracker.experiment_id], max_results=100)
    # (A signal that beats the run's creation, on a loaded machine, leaves no run: fewer than 40.)
    assert runs and {r.info.status for r in runs} == {"KILLED"}


@pytest.mark.usefixtures("python_signal_handlers")
def test_signals_are_deferred_to_the_end_of_the_block() -> None:
    done = []
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            done.append("after the signal")
    assert done == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_runs_record_their_host_and_process(tracker) -> None:
    run = tracker.start_run("r")
    tags = tracker.client.get_run(run.run_id).data.tags
    assert tags[HOST] == socket.gethostname() and tags[PID] == str(os.getpid())


def test_runs_left_running_by_dead_processes_end_killed(tracker) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid names no process now
    python = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    shell = subprocess.Popen(["sleep", "120"])
    try:
        time.sleep(0.2)  # the python child has exec'd
        here = socket.gethostname()
        runs = {
            "dead": tracker.start_run("dead", tags={PID: dead.pid}),
            "not python": tracker.start_run("not python", tags={PID: shell.pid}),
            "alive": tracker.start_run("alive", tags={PID: python.pid}),
            "this process": tracker.start_run("this process"),
            "other host": tracker.start_run("other host", tags={PID: dead.pid, HOST: here + "-x"}),
            "finished": tracker.start_run("finished", tags={PID: dead.pid}),
        }
        tracker.end_run(runs["finished"])
        # A run begun an hour ago by a pid that a later python process holds now.
        reused = tracker.client.create_run(
            tracker.experiment_id, start_time=int((time.time() - 3600) * 1000),
            tags={HOST: here, PID: str(python.pid)}).info.run_id
        assert process_alive(python.pid) and not process_alive(dead.pid)

        ended = tracker.end_stale_runs()

        expected = {"dead", "not python"}
        assert set(ended) == {runs[n].run_id for n in expected} | {reused}
        for name, run in runs.items():
            info = tracker.client.get_run(run.run_id)
            want = "KILLED" if name in expected else "FINISHED" if name == "finished" else "RUNNING"
            assert info.info.status == want, name
            assert (info.data.tags.get(ENDED_BY) == "cleanup") == (name in expected), name
        assert status(tracker, reused) == "KILLED"
        assert tracker.end_stale_runs() == []
    finally:
        for child in (python, shell):
            child.kill()
            child.wait()


def test_tracking_off_is_a_no_op(checkpoint, monkeypatch) -> None:
    monkeypatch.setenv(UI_URL_ENV, "http://127.0.0.1:5000")
    off = Tracker(None, "x")
    assert off.end_stale_runs() == []
    with off.stage_run("s", parent=None, tags={}) as run:
        assert off.register_checkpoint("m", checkpoint, stage_key="k", load=linear,
                                       source_run_id=run.run_id, label="s")["registered"] is False
    assert off.run_url("0" * 32) is None and off.experiment_url() is None


# ---- what the MLflow UI shows --------------------------------------------------------------------
def test_links_into_the_ui_need_a_server_or_its_address(tracker, monkeypatch) -> None:
    run = tracker.start_run("r")
    monkeypatch.delenv(UI_URL_ENV, raising=False)
    monkeypatch.delenv(UI_STORE_ENV, raising=False)
    assert tracker.run_url(run.run_id) is None and tracker.experiment_url() is None
    monkeypatch.setenv(UI_URL_ENV, "http://127.0.0.1:5000/")
    experiment = tracker.experiment_id
    assert tracker.run_url(run.run_id) == \
        f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run.run_id}"
    assert tracker.experiment_url() == f"http://127.0.0.1:5000/#/experiments/{experiment}/runs"
    assert tracker.run_url("0" * 32) is None  # no such run
    # A UI serving another store (ui.sh serves runs/mlflow.db): no link into the wrong runs.
    monkeypatch.setenv(UI_STORE_ENV, f"sqlite:///{tracker.database.parent}/other/mlflow.db")
    assert tracker.run_url(run.run_id) is None
    monkeypatch.setenv(UI_STORE_ENV, f"sqlite:///{tracker.database.parent}/./{tracker.database.name}")
    assert tracker.run_url(run.run_id).startswith("http://127.0.0.1:5000/#/experiments/")
    monkeypatch.setattr(tracker, "uri", "https://mlflow.example.org/")  # a server: its own address
    assert tracker.run_url(run.run_id).startswith("https://mlflow.example.org/#/experiments/")


def test_experiments_are_described(tracker) -> None:
    assert tracker.client.get_experiment(tracker.experiment_id).tags[NOTE] == EXPERIMENT_DESCRIPTION
    older = tracker.client.create_experiment("made-before-descriptions")
    Tracker(tracker.uri, "made-before-descriptions", system_metrics=False)
    assert tracker.client.get_experiment(older).tags[NOTE] == EXPERIMENT_DESCRIPTION


def test_system_metrics_are_sampled_without_info_lines(tmp_path) -> None:
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "system-metrics", system_metrics=True)
    assert tracker.system_metrics
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append
    monitor_log = logging.getLogger("mlflow.system_metrics")
    monitor_log.addHandler(handler)
    try:
        with tracker.stage_run("stage", parent=None, tags={}):
            pass
    finally:
        monitor_log.removeHandler(handler)
    assert [r.getMessage() for r in seen if r.levelno < logging.WARNING] == []
    assert logging.getLogger("mlflow").getEffectiveLevel() <= logging.INFO  # the rest untouched


# ---- flows.compare -------------------------------------------------------------------------------
def reproduction(tracker: Tracker, run_dir: Path | None, steps_scale: float,
                 metrics: dict[str, float]) -> str:
    """A finished parent run as flows.reproduce records it."""
    run = tracker.start_run("demo-run", tags={"codis.kind": "reproduction", "codis.recipe": "demo",
                                              "codis.run_dir": run_dir})
    run.log_params({"recipe": "demo", "steps_scale": steps_scale, "overrides": [],
                    "run_dir": str(run_dir)})
    run.log_metrics(metrics)
    tracker.end_run(run)
    return run.run_id


def test_compare_labels_every_row_by_run_and_shows_how_the_runs_differ(tracker, tmp_path,
                                                                       capsys) -> None:
    metrics = {"codis/pretrain.loss": 24.0, "codis/pretrain.itm": 0.6,
               "albef/pretrain.loss": 11.0, "albef/pretrain.itm": 0.7,
               "codis/retrieval.demo.zs.r_mean": 5.0, "albef/retrieval.demo.zs.r_mean": 4.0}
    first = reproduction(tracker, tmp_path / "first", 0.02, metrics)
    second = reproduction(tracker, tmp_path / "second", 1.0, metrics)
    (tmp_path / "first").mkdir()
    assert compare(["--runs", first, second, "--tracking-uri", tracker.uri]) == 0
    out = capsys.readouterr().out
    labels = [f"demo/{v} ({r[:8]})" for r in (first, second) for v in ("codis", "albef")]
    assert "| metric | " + " | ".join(labels) + " |" in out
    assert "pretrain.loss" not in out and "| pretrain.itm |" in out
    assert "| steps_scale | 0.02 | 1.0 |" in out and "| recipe |" not in out
    written = tmp_path / "first" / f"comparison-{first[:8]}-{second[:8]}.md"
    assert written.read_text().count("| steps_scale |") == 1
    assert written.with_suffix(".csv").is_file()
    # One reproduction: rows named by variant alone, written beside it as well.
    assert compare(["--runs", first, "--tracking-uri", tracker.uri]) == 0
    assert "| metric | codis | albef |" in capsys.readouterr().out
    assert (tmp_path / "first" / f"comparison-{first[:8]}.md").is_file()
