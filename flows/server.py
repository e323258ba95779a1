"""The Prefect API that a reproduction started from the command line talks to.

Left to itself, Prefect 3 starts a temporary API server for a flow run that has no
``PREFECT_API_URL`` (``prefect.server.api.server.SubprocessASGIServer``): it waits 20 s for it
(``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``), too little on a busy machine, and stops
it only from an ``atexit`` hook, so every ``kill -9`` of a run left a ~200 MB server listening
for good. :func:`prefect_api`, which ``python -m flows.reproduce`` (and so ``scripts/demo.sh``)
runs under, does instead:

* ``PREFECT_API_URL`` set (the server of ``scripts/ui.sh``, the Compose stack): its ``/health``
  must answer within ``PREFECT_API_REQUEST_TIMEOUT`` seconds (Prefect's own request timeout,
  default 60) before anything starts. An API that accepts connections but never answers would
  otherwise hang the run for minutes without a word: Prefect's client retries each request five
  times, each with that timeout.
* unset: a local server owned by this process (:class:`LocalServer`): ``uvicorn`` serving
  Prefect's API app in its ephemeral mode (no UI, no background services), on a free loopback
  port, its database ``$PREFECT_HOME/prefect.db`` (``scripts/env.sh`` sets ``PREFECT_HOME`` to
  the repository's ``.cache/prefect``; :mod:`flows` defaults it there too). The run waits up to
  ``CODIS_PREFECT_STARTUP_TIMEOUT`` seconds (default 300) for its ``/api/health``. The server
  runs in its own process group, which is stopped when the run ends, also by an exception or by
  SIGTERM turned into one; and the kernel kills it when its parent dies in any way, SIGKILL
  included (``PR_SET_PDEATHSIG``).

A persistent server that ``scripts/ui.sh`` started is not picked up behind the user's back (a
run would land in whichever server happens to be up): ``PREFECT_API_URL=http://127.0.0.1:4200/api``
sends a run there. Local servers of concurrent runs share ``$PREFECT_HOME`` (and with it the
database of the ``ui.sh`` server, which shows their runs): their start-ups, which create and
migrate the database, take turns under a lock file in it.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from codis.processes import die_with_parent, file_lock

STARTUP_TIMEOUT_VARIABLE = "CODIS_PREFECT_STARTUP_TIMEOUT"
DEFAULT_STARTUP_TIMEOUT = 300.0
REQUEST_TIMEOUT_SETTING = "PREFECT_API_REQUEST_TIMEOUT"


class PrefectApiError(RuntimeError):
    """No usable Prefect API; the message names the URL and the setting to change."""


def startup_timeout() -> float:
    """Seconds to wait for a local server's health (``CODIS_PREFECT_STARTUP_TIMEOUT``)."""
    value = os.environ.get(STARTUP_TIMEOUT_VARIABLE, "").strip()
    if not value:
        return DEFAULT_STARTUP_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise PrefectApiError(f"{STARTUP_TIMEOUT_VARIABLE}: a positive number of seconds, "
                              f"got {value!r}")
    return seconds


def free_port() -> int:
    """A loopback port that nothing listens on (a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_api(url: str, timeout: float) -> None:
    """Fail, naming ``url`` and the setting, unless the API's ``/health`` answers within
    ``timeout`` seconds. Any HTTP answer counts (an API behind authentication may refuse it);
    what fails is silence and a refused connection."""
    health = url.rstrip("/") + "/health"
    try:
        httpx.get(health, timeout=timeout)
    except httpx.TimeoutException:
        raise PrefectApiError(
            f"the Prefect API at {url} (PREFECT_API_URL) did not answer {health} within "
            f"{timeout:g} s ({REQUEST_TIMEOUT_SETTING}). Check that server, raise "
            f"{REQUEST_TIMEOUT_SETTING}, or unset PREFECT_API_URL to let the run start a local "
            "server of its own") from None
    except httpx.HTTPError as error:
        raise PrefectApiError(
            f"the Prefect API at {url} (PREFECT_API_URL) cannot be reached "
            f"({type(error).__name__}: {error}). Start it (bash scripts/ui.sh) or unset "
            "PREFECT_API_URL to let the run start a local server of its own") from None


class LocalServer:
    """A Prefect API server that this process owns (see the module docstring).

    Start it from the main thread: the kernel's parent-death signal follows the thread that
    started the child, not the process."""

    def __init__(self, home: str | Path, timeout: float | None = None) -> None:
        self.home = Path(home)
        self.timeout = startup_timeout() if timeout is None else timeout
        self.process: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def log(self) -> Path:
        return self.home / "local-servers" / f"{self.port}.log"

    def start(self) -> str:
        """Start the server and wait for its health; returns its API URL."""
        self.home.mkdir(parents=True, exist_ok=True)
        with file_lock(self.home / ".local-server.lock"):
            for _ in range(3):  # another process may take the free port before uvicorn binds it
                self.port = free_port()
                self._spawn()
                if self._wait_healthy():
                    return self.url
        raise PrefectApiError(f"the local Prefect server found no free port to bind "
                              f"(last attempt's log: {self.log})")

    def _spawn(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        # What SubprocessASGIServer runs: the API app in ephemeral mode (no UI, no background
        # services), configured by environment variables as Prefect does it.
        env = {**os.environ, "PREFECT_HOME": str(self.home), "PREFECT_UI_ENABLED": "false",
               "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        env.pop("PREFECT_API_URL", None)
        command = [sys.executable, "-m", "uvicorn", "--factory",
                   "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                   "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, preexec_fn=die_with_parent())

    def _wait_healthy(self) -> bool:
        """True once healthy; False if it exited because its port was taken."""
        assert self.process is not None
        deadline = time.monotonic() + self.timeout
        while True:
            code = self.process.poll()
            if code is not None:
                self.process = None
                text = self.log.read_text(encoding="utf-8", errors="replace")
                if "address already in use" in text.lower():
                    return False
                tail = "\n".join(text.splitlines()[-30:])
                raise PrefectApiError(f"the local Prefect server exited with code {code} while "
                                      f"starting; the last lines of {self.log}:\n{tail}")
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop(keep_log=True)
                raise PrefectApiError(
                    f"the local Prefect server on {self.url} did not answer /health within "
                    f"{self.timeout:g} s (log: {self.log}). On a busy machine raise "
                    f"{STARTUP_TIMEOUT_VARIABLE} (seconds), or set PREFECT_API_URL to a running "
                    "server")
            try:
                if httpx.get(f"{self.url}/health", timeout=min(5.0, max(left, 0.1)),
                             trust_env=False).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.25)

    def stop(self, keep_log: bool = False) -> None:
        """Stop the server's process group: SIGTERM, SIGKILL after 10 s."""
        process, self.process = self.process, None
        if process is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    pass
                try:
                    process.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
            process.wait()
        if not keep_log and self.port is not None:
            self.log.unlink(missing_ok=True)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


@dataclass
class Api:
    """The API a run uses: its URL and, when this process started it, the local server."""

    url: str
    server: LocalServer | None = None

    def describe(self) -> str:
        if self.server is None:
            return f"{self.url} (PREFECT_API_URL)"
        return (f"{self.url} (a local server for this run: pid {self.server.pid}, database in "
                f"{self.server.home})")


def _drain_prefect_workers(timeout: float = 30.0) -> None:
    """Send the logs and events Prefect still holds before their server goes away (they would
    otherwise be sent, and fail, at interpreter exit)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout)
        except Exception:  # noqa: BLE001 - a failed flush must not hide the run's outcome
            pass


def _use_api_url(url: str | None) -> None:
    """Make ``url`` Prefect's API for this process, its threads and its children."""
    import prefect.context

    if url is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = url
    # Prefect read its settings at import; threads without a settings context of their own
    # (its log and event workers) fall back to this global one.
    prefect.context.refresh_global_settings_context()


OWNED_SERVER_VARIABLE = "CODIS_PREFECT_OWNED_SERVER"
"""Set while the API is a local server that this process owns (and stops when it ends)."""


def prefect_run_tags() -> dict[str, str]:
    """MLflow tags linking to the current Prefect flow run (``prefect.flow_run_id`` and
    ``prefect.flow_run_url``) when its server outlives this process; none for a run's own
    server, whose runs are gone once it stops, or outside a flow run."""
    from prefect.runtime import flow_run
    from prefect.settings import get_current_settings

    if os.environ.get(OWNED_SERVER_VARIABLE) or not flow_run.id:
        return {}
    tags = {"prefect.flow_run_id": flow_run.id}
    ui_url = get_current_settings().ui_url
    if ui_url:
        tags["prefect.flow_run_url"] = f"{ui_url.rstrip('/')}/runs/flow-run/{flow_run.id}"
    return tags


@contextmanager
def prefect_api() -> Iterator[Api]:
    """The Prefect API for one run: ``PREFECT_API_URL`` checked, or a local server started and,
    when the block ends in any way, stopped (see the module docstring)."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    settings = get_current_settings()
    if settings.api.url:
        check_api(settings.api.url, settings.api.request_timeout)
        yield Api(settings.api.url)
        return
    server = LocalServer(settings.home)
    url = server.start()
    previous = os.environ.get("PREFECT_API_URL")
    try:
        _use_api_url(url)
        os.environ[OWNED_SERVER_VARIABLE] = "1"
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield Api(url, server)
            finally:
                _drain_prefect_workers()
    finally:
        os.environ.pop(OWNED_SERVER_VARIABLE, None)
        server.stop()
        _use_api_url(previous)
