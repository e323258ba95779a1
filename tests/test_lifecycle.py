"""No leaks and no hangs: the local Prefect server of a command-line run ends with it (also on
SIGKILL, also on a failure), an API that accepts connections but never answers fails the run at
once, naming the URL and the setting, ``scripts/ui.sh`` refuses a port that it does not own,
Prefect's state stays in the repository, and finished training stages drop their resumable
training state unless the recipe keeps it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import flows  # noqa: F401  - PREFECT_HOME and analytics defaults before prefect is imported
from flows import server as servers
from flows.recipe import PretrainSpec, VariantSpec
from flows.server import LocalServer, PrefectApiError, check_api, free_port, prefect_api
from flows.stages import TRAINING_STATE, StageContext, pretrain_stage
from flows.store import MARKER, Store
from flows.tracking import Tracker

REPO = Path(__file__).resolve().parents[1]


# ---- helpers -------------------------------------------------------------------------------------
def gone(pid: int) -> bool:
    """The process has exited (a zombie that its new parent has not reaped yet counts)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for(condition, limit: float = 60.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def uvicorn_children() -> list[int]:
    """Live child processes of this one that run uvicorn (a local Prefect server)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] not in "ZX" and b"uvicorn" in command:
            found.append(int(stat.parent.name))
    return found


class SilentServer:
    """A TCP server on loopback that accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(connection)

    def close(self) -> None:
        self.sock.close()
        for connection in self.held:
            connection.close()


@pytest.fixture
def silent_server():
    server = SilentServer()
    yield server
    server.close()


def cli_env(tmp_path: Path, **changes: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               OMP_NUM_THREADS="1", **changes)
    return env


# ---- Prefect's state -----------------------------------------------------------------------------
def test_prefect_home_defaults_inside_the_repository(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_HOME"}
    # sourced from outside the repository too
    shell = subprocess.run(["bash", "-c", f"source {REPO}/scripts/env.sh && echo $PREFECT_HOME"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert shell.stdout.strip() == str(REPO / ".cache" / "prefect")
    python = subprocess.run(
        [sys.executable, "-c", "import flows, prefect.settings as s; "
                               "print(s.get_current_settings().home)"],
        cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        check=True)
    assert python.stdout.strip() == str(REPO / ".cache" / "prefect")
    explicit = subprocess.run(["bash", "-c", "source scripts/env.sh && echo $PREFECT_HOME"],
                              cwd=REPO, env={**env, "PREFECT_HOME": str(tmp_path)},
                              capture_output=True, text=True, check=True)
    assert explicit.stdout.strip() == str(tmp_path)
    ignored = subprocess.run(["git", "check-ignore", "-q", ".cache/prefect/prefect.db"], cwd=REPO)
    assert ignored.returncode == 0, ".cache/ is not in .gitignore"


# ---- an API that is set but unusable -------------------------------------------------------------
def test_an_api_that_never_answers_fails_fast_naming_url_and_setting(silent_server) -> None:
    url = f"http://127.0.0.1:{silent_server.port}/api"
    with pytest.raises(PrefectApiError) as error:
        check_api(url, timeout=1.0)
    assert url in str(error.value) and "PREFECT_API_REQUEST_TIMEOUT" in str(error.value)


def test_an_api_that_is_down_fails_naming_url() -> None:
    url = f"http://127.0.0.1:{free_port()}/api"
    with pytest.raises(PrefectApiError, match="cannot be reached") as error:
        check_api(url, timeout=5.0)
    assert url in str(error.value) and "PREFECT_API_URL" in str(error.value)


@pytest.mark.slow
def test_the_cli_fails_before_any_work_against_a_silent_api(silent_server, tmp_path) -> None:
    url = f"http://127.0.0.1:{silent_server.port}/api"
    command = [sys.executable, "-m", "flows.reproduce", "--recipe", "pipelines/demo.yaml",
               "--runs-root", str(tmp_path / "runs"), "--no-progress"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=cli_env(tmp_path, PREFECT_API_URL=url, PREFECT_API_REQUEST_TIMEOUT="2"))
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert url in done.stderr and "PREFECT_API_REQUEST_TIMEOUT" in done.stderr
    assert "Traceback" not in done.stderr
    assert not list((tmp_path / "runs").glob("demo-*"))  # no run started


# ---- the local server ----------------------------------------------------------------------------
def test_a_bad_startup_timeout_is_named(monkeypatch) -> None:
    monkeypatch.setenv(servers.STARTUP_TIMEOUT_VARIABLE, "soon")
    with pytest.raises(PrefectApiError, match=servers.STARTUP_TIMEOUT_VARIABLE):
        servers.startup_timeout()
    monkeypatch.setenv(servers.STARTUP_TIMEOUT_VARIABLE, "-1")
    with pytest.raises(PrefectApiError, match=servers.STARTUP_TIMEOUT_VARIABLE):
        servers.startup_timeout()
    monkeypatch.delenv(servers.STARTUP_TIMEOUT_VARIABLE)
    assert servers.startup_timeout() == servers.DEFAULT_STARTUP_TIMEOUT


def test_a_server_too_slow_to_start_is_stopped_and_the_variable_named(tmp_path) -> None:
    server = LocalServer(tmp_path / "prefect", timeout=0.5)
    with pytest.raises(PrefectApiError, match=servers.STARTUP_TIMEOUT_VARIABLE):
        server.start()
    assert server.process is None and uvicorn_children() == []
    assert server.log.is_file()  # kept for the user to read


@pytest.mark.slow
def test_the_local_server_ends_with_a_failing_run(tmp_path, monkeypatch) -> None:
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, get_current_settings, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    home = tmp_path / "prefect"
    with temporary_settings(updates={PREFECT_HOME: str(home)}, restore_defaults={PREFECT_API_URL}):
        with pytest.raises(RuntimeError, match="a stage failed"):
            with prefect_api() as api:
                server = api.server
                assert server is not None and server.pid is not None
                pid, port = server.pid, server.port
                assert api.url == f"http://127.0.0.1:{port}/api" and listening(port)
                assert os.environ["PREFECT_API_URL"] == api.url
                assert get_current_settings().api.url == api.url
                assert os.getpgid(pid) == pid  # its own process group
                raise RuntimeError("a stage failed")
    assert gone(pid) and not listening(port)
    assert "PREFECT_API_URL" not in os.environ
    assert (home / "prefect.db").is_file()  # the database where PREFECT_HOME says
    assert not server.log.exists()


@pytest.mark.slow
def test_kill_9_of_a_run_leaves_no_prefect_server(tmp_path) -> None:
    runs = tmp_path / "runs"
    # A world large enough that its generation is still running when the run is killed.
    command = [sys.executable, "-m", "flows.reproduce", "--recipe", "pipelines/demo.yaml",
               "--runs-root", str(runs), "--no-progress", "--no-tracking",
               "--set", "demo_world.pretrain_images=50000"]
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        run = subprocess.Popen(command, cwd=REPO, env=cli_env(tmp_path), stdout=out,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        started = wait_for(lambda: run.poll() is not None
                           or any(runs.glob("store/generate_demo/*/_stage.started.json")), 300)
        assert started and run.poll() is None, log.read_text()[-3000:]
        line = next(line for line in log.read_text().splitlines()
                    if line.startswith("Prefect API:"))
        pid = int(line.split("pid ")[1].split(",")[0])
        port = int(line.split("127.0.0.1:")[1].split("/")[0])
        assert not gone(pid) and listening(port)
        run.kill()
        run.wait(timeout=60)
        assert wait_for(lambda: gone(pid), 60), f"the Prefect server (pid {pid}) outlived its run"
        assert wait_for(lambda: not listening(port), 30)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()


# ---- scripts/ui.sh -------------------------------------------------------------------------------
@pytest.mark.parametrize("taken", ["PREFECT_PORT", "MLFLOW_PORT"])
def test_ui_refuses_a_port_that_it_does_not_own(tmp_path, taken) -> None:
    # A copy of the scripts, so the check runs against its own runs/ui and not the repository's;
    # with the real .venv, so that a script that failed to refuse would really start servers.
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in ("ui.sh", "env.sh"):
        shutil.copy(REPO / "scripts" / name, root / "scripts" / name)
    (root / ".venv").symlink_to(REPO / ".venv")
    occupant = socket.socket()
    occupant.bind(("127.0.0.1", 0))
    occupant.listen(1)
    ports = {"PREFECT_PORT": str(free_port()), "MLFLOW_PORT": str(free_port()),
             taken: str(occupant.getsockname()[1])}
    try:
        done = subprocess.run(["bash", "scripts/ui.sh", "start"], cwd=root, capture_output=True,
                              text=True, timeout=120,
                              env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), **ports})
        state = root / "runs" / "ui"
        pids = [int(p.read_text()) for p in state.glob("*.pid")] if state.is_dir() else []
        assert done.returncode != 0
        assert f"port {ports[taken]}" in done.stderr and taken in done.stderr, done.stderr
        assert pids == []
        free = next(value for name, value in ports.items() if name != taken)
        assert not listening(int(free))
    finally:
        occupant.close()
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---- training state of finished stages -----------------------------------------------------------
VARIANT = VariantSpec(preset="tiny", model={"mode": "albef"})
PRETRAIN = PretrainSpec(train={"steps": 2, "batch_size": 4, "checkpoint_every": 1, "log_every": 1,
                               "keep_checkpoints": 2},
                        optim={"lr": 1e-3, "warmup_steps": 1}, reference_batch=4,
                        data={"num_workers": 0, "hflip": False})


def context(root: Path, keep: bool) -> StageContext:
    return StageContext(store=Store(root / "store"), tracker=Tracker(None, "lifecycle"),
                        progress=False, keep_training_state=keep)


def test_finished_training_stages_drop_their_training_state(shards, tmp_path, monkeypatch) -> None:
    import flows.stages

    data = [str(shards("pretrain", "train"))]
    # Killed after training, before the marker (here: an error there): the state stays and the
    # re-run resumes from it instead of training again.
    def broken() -> dict:
        raise RuntimeError("killed before the marker")

    monkeypatch.setattr(flows.stages, "describe_machine", broken)
    with pytest.raises(RuntimeError, match="before the marker"):
        pretrain_stage(context(tmp_path / "a", keep=False), "albef", VARIANT, PRETRAIN, data)
    folder = next((tmp_path / "a" / "store" / "pretrain").glob("[!.]*"))
    assert sorted(p.name for p in (folder / TRAINING_STATE).iterdir()) == \
        ["step-00000001.pt", "step-00000002.pt"]
    monkeypatch.undo()

    dropped = pretrain_stage(context(tmp_path / "a", keep=False), "albef", VARIANT, PRETRAIN, data)
    assert dropped.marker["resumed"] and Path(dropped.path) == folder
    assert (folder / MARKER).is_file() and dropped.file("model").is_file()
    assert not (folder / TRAINING_STATE).exists()

    kept = pretrain_stage(context(tmp_path / "b", keep=True), "albef", VARIANT, PRETRAIN, data)
    assert kept.key == dropped.key  # the setting is not part of the stage key
    assert sorted(p.name for p in (Path(kept.path) / TRAINING_STATE).iterdir()) == \
        ["step-00000001.pt", "step-00000002.pt"]
    # A later run that does not keep it drops it from the finished stage it re-uses.
    again = pretrain_stage(context(tmp_path / "b", keep=False), "albef", VARIANT, PRETRAIN, data)
    assert again.cached and not (Path(again.path) / TRAINING_STATE).exists()
    assert again.file("model").is_file()


def test_keep_training_state_is_a_recipe_field_outside_the_keys() -> None:
    from flows import recipe as recipes

    data = {"name": "t", "pretrain_data": [{"annotations": ["a.json"], "image_root": "."}],
            "variants": {"albef": {"preset": "tiny"}}}
    assert recipes.parse_recipe(data).store.keep_training_state is False
    spec = recipes.parse_recipe({**data, "store": {"keep_training_state": True}})
    assert spec.store.keep_training_state is True
    with pytest.raises(recipes.RecipeError, match="store.keep"):
        recipes.parse_recipe({**data, "store": {"keep": True}})
