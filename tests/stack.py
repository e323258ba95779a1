"""Helpers for the tests that start the production stack's pieces as real processes
(tests/test_prefect_server.py, tests/test_topology.py) and for the checks of infra/'s compose file
(tests/test_infra.py): processes in their own session ended by PID and process group, health
waits, Compose's variable interpolation, and the commands that infra/ documents."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
PREFECT = str(Path(sys.executable).parent / "prefect")


# ----------------------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(argv: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen:
    """``argv`` in a session of its own (so :func:`stop` ends its children too), output to ``log``."""
    with open(log, "ab") as handle:
        return subprocess.Popen(argv, env=env, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def stop(process: subprocess.Popen, sig: int) -> None:
    """End ``process`` and its session (it was started with start_new_session) by its PID."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_healthy(url: str, process: subprocess.Popen, log: Path, limit: float = 90.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {limit} s:\n{log.read_text()[-3000:]}")


def assert_flow_run_completed(api: str, flow_run_id: Any, log: Path) -> None:
    """The flow run ``flow_run_id`` ended Completed on the Prefect API ``api``; otherwise the
    assertion shows its state and the end of the worker's ``log``."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}):
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
    assert state is not None and state.is_completed(), \
        f"flow run state {state}:\n{log.read_text()[-6000:]}"


def run_cli(args: list[str], env: dict[str, str], timeout: float) -> str:
    done = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without Prefect and MLflow settings (a test names its own servers), with
    telemetry and hub access off, one torch thread per process, and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    return env


# ----------------------------------------------------------------------------- compose file

class Unset(Exception):
    """A ${VAR:?} reference met an unset or empty variable."""


# Compose interpolation: ${VAR}, ${VAR:-default}, ${VAR:?message}; $$ escapes a literal $.
COMPOSE_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation of one string: what `docker compose` does before parsing values."""
    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1), match.group(2), match.group(3)
        value = env.get(name, "")
        if op == ":?" and not value:
            raise Unset(name)
        if op == ":-" and not value:
            return arg
        return value
    return COMPOSE_VAR.sub(sub, text)


def env_items(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def as_argv(command: Any) -> list[str]:
    return [str(part) for part in command] if isinstance(command, list) else command.split()


# ----------------------------------------------------------------------------- documented commands

def documented_torchrun() -> list[str]:
    """The multi-node pretraining command of infra/README.md (its ``torchrun --nnodes`` code
    block), as an argument list with the placeholders (``<node0>``, ...) left in."""
    text = (INFRA / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        command = block.replace("\\\n", " ")
        if command.lstrip().startswith("torchrun --nnodes"):
            return shlex.split(command)
    raise AssertionError("infra/README.md has no `torchrun --nnodes` code block")
