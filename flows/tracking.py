"""MLflow for the flows: one parent run per reproduction, one child run per stage, the registry.

Everything goes through ``mlflow.MlflowClient`` with explicit run ids: the parent's id is
handed to each stage, which tags its child run ``mlflow.parentRunId``; nothing relies on MLflow's
thread-local "active run", so stages may run in other threads or processes. Layout:

* experiment ``codis-<recipe>`` (recipe ``tracking.experiment``); artifacts of a local
  ``sqlite:///`` store go to ``<runs>/mlartifacts``, never to ``./mlruns``;
* parent run ``<recipe>-<run id>``: tags ``codis.kind=reproduction``, ``codis.recipe``,
  ``codis.run_dir``; the resolved recipe as ``recipe.yaml``; summary metrics
  ``<variant>/<metric>`` (e.g. ``codis/retrieval.demo.zs.r_mean``);
* child runs ``<stage>[<label>]``: tags ``codis.stage``, ``codis.stage_key``, ``codis.stage_dir``,
  ``codis.cached`` (``true`` when the stage was found done; its metrics are then copied from
  the stage marker and ``codis.source_run_id`` names the run that computed it), ``codis.variant``
  / ``codis.task`` / ``codis.dataset`` where they apply; parameters flattened with dots; metrics
  with consistent names (``pretrain.loss`` per step, ``retrieval.demo.zs.txt_r1``,
  ``vqa.demo.accuracy``); manifests and markers as artifacts; system metrics
  (``system/...``) while the stage runs, when psutil is installed;
* registered models: the pretrained checkpoints (``<recipe>-pretrained``) and finetuned ones
  (``<recipe>-<task>-<dataset>``). A version comes from the run that trained its checkpoint:
  ``Tracker.register_checkpoint`` logs into that run an MLflow model (``model/``, the
  ``pytorch`` flavour, which also serves ``pyfunc``) and the raw ``checkpoint/model.pt`` (what
  ``codis.model.load_model`` or the task's loader reads), and the version's source is
  ``runs:/<run>/model``. A checkpoint trained with tracking off or recorded in another store gets
  a small run ``model[<label>]`` instead. Aliases: ``candidate`` on every new version,
  ``champion`` on a version whose score beats the current champion's by more than a margin
  (tags ``codis.score`` / ``codis.score_name``).

  The model is pickled (MLflow's ``pickle`` serialisation): it is the whole codis module, with
  its encoders, tokenizer and inference methods, which the ``pt2`` format (one traced forward)
  cannot hold. MLflow 3 refuses to unpickle unless told to, and unpickling needs ``codis``
  importable; with the tracking URI in ``MLFLOW_TRACKING_URI``::

      MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true python
      >>> import mlflow
      >>> model = mlflow.pytorch.load_model("models:/demo-pretrained@champion")

Links into the MLflow UI (``Tracker.run_url``, ``Tracker.experiment_url``) start from the
tracking URI when it is a server (``http(s)://``), else from ``CODIS_MLFLOW_UI_URL``: a local
store has no address of its own, but ``scripts/ui.sh`` serves ``runs/mlflow.db`` at
http://127.0.0.1:5000, so ``CODIS_MLFLOW_UI_URL=http://127.0.0.1:5000`` gives CLI runs their links
(``scripts/env.sh`` sets it, and ``CODIS_MLFLOW_UI_STORE`` to the store that UI serves: runs
recorded in another store get no link rather than one into the wrong runs).
Experiments carry a description (``EXPERIMENT_DESCRIPTION``). MLflow's system-metrics
monitor logs only warnings: its INFO lines (four per stage) are silenced.

Concurrent reproductions may share one store and one MLflow database:

* a local ``sqlite:///`` database is created (MLflow's schema migrations) and the experiment
  looked up or created under an exclusive ``flock`` on ``<db>.lock`` beside it, so two first
  runs in a fresh folder do not both migrate it; creating an experiment or a registered model
  that a concurrent run just created is not an error;
* registering a version is serialised per model by a ``flock`` on a file in ``<db>.locks/``
  (local database): the check for a version carrying the stage's ``codis.stage_key``, the new
  version and its aliases happen as one step, so a checkpoint is registered once, ``candidate``
  only moves to a newer version and ``champion`` only to a score better by the margin. Against
  a tracking server (no shared lock) the new version is checked afterwards: of the versions
  with the same stage key the lowest number is kept and a duplicate just created is deleted
  again, with its ``model[<label>]`` run if it made one (aliases are then best effort: two
  registrations at the same instant may each miss the other's).

Run states: ``FINISHED``; ``FAILED`` when the stage or the reproduction raised an error;
``KILLED`` when it was stopped from outside (Ctrl-C, SIGTERM, Prefect cancelling it: every
``BaseException`` that is not an ``Exception``). Ctrl-C and SIGTERM wait until the
MLflow call under way has returned (``signals_deferred``): one raised inside a SQLite write
would leave the database locked and the run impossible to end. A process killed outright (``kill
-9``, a lost machine) cannot end its runs, so every run carries the tags ``codis.host`` and
``codis.pid`` of the process that created it, and ``Tracker.end_stale_runs`` (called when a
reproduction starts) ends the experiment's runs still ``RUNNING`` whose process on this host is
gone, or is no longer the Python process that created them, as ``KILLED`` with the tag
``codis.ended_by=cleanup``. (Host names must therefore differ between machines sharing one
database, as they do between hosts and Kubernetes pods.)
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import signal
import socket
import tempfile
import threading
from contextlib import contextmanager, nullcontext
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Mapping

from codis.processes import file_lock

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

PARAM_LIMIT = 6000  # MLflow's maximum parameter value length
CANDIDATE, CHAMPION = "candidate", "champion"
STAGE_KEY, HOST, PID, ENDED_BY = "codis.stage_key", "codis.host", "codis.pid", "codis.ended_by"
ALREADY_EXISTS, DOES_NOT_EXIST = "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"
UI_URL_ENV = "CODIS_MLFLOW_UI_URL"
UI_STORE_ENV = "CODIS_MLFLOW_UI_STORE"
NOTE = "mlflow.note.content"  # the tag MLflow shows as an experiment's or a run's description
EXPERIMENT_DESCRIPTION = """\
Runs of codis-pipeline, the CODIS / ALBEF reproduction.

* A reproduction (`python -m flows.reproduce`, or the Prefect deployment `reproduce`) is one
  parent run `<recipe>-<run id>`, with a child run `<stage>[<label>]` for each stage that ran:
  its parameters, step-wise training metrics and evaluation results. The parent carries every
  variant's final metrics as `<variant>/<metric>`; `python -m flows.compare` tables them.
* A stage started on its own (a stage deployment) is a run without a parent.
* Registered models (Models page) point at the run that trained each checkpoint.

MLflow 3 opens in GenAI mode: switch to **Model training** to see these runs.
"""
"""What every experiment of the flows says about itself (MLflow's experiment description)."""


def _same_store(first: str, second: str) -> bool:
    """Whether two tracking URIs name one store (sqlite files compared by resolved path)."""
    files = sqlite_file(first), sqlite_file(second)
    if files[0] is not None and files[1] is not None:
        return files[0].resolve() == files[1].resolve()
    return first.rstrip("/") == second.rstrip("/")


def default_tracking_uri(runs_root: str | Path) -> str:
    """``sqlite:///<runs>/mlflow.db`` (absolute, so the working directory does not matter)."""
    return f"sqlite:///{(Path(runs_root) / 'mlflow.db').resolve()}"


def resolve_tracking_uri(tracking_uri: str | None, runs_root: str | Path) -> str:
    """The MLflow tracking URI of a run: ``tracking_uri`` if given, else ``MLFLOW_TRACKING_URI``,
    else ``default_tracking_uri`` under ``runs_root``."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(runs_root)


def default_artifact_location(runs_root: str | Path, experiment: str) -> str:
    return (Path(runs_root) / "mlartifacts" / experiment).resolve().as_uri()


def sqlite_file(uri: str | None) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``sqlite:////abs/path`` or a relative
    ``sqlite:///path``), else None (a server, an in-memory database)."""
    if not uri or not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def ending_status(error: BaseException) -> str:
    """The state of a run that ``error`` ended: ``FAILED`` for an error of the code, ``KILLED``
    when the run was stopped from outside (KeyboardInterrupt, SystemExit, Prefect's
    TerminationSignal: BaseExceptions that are not Exceptions)."""
    return "FAILED" if isinstance(error, Exception) else "KILLED"


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM held back until the block ends, then delivered to their handlers.

    An exception that a signal handler raises in the middle of an MLflow call on a SQLite store
    leaves that call's transaction open: the database stays locked for every later write of the
    process, and the interrupted run could not even be ended (measured: "database is locked" after
    the 20 s busy timeout). Python runs signal handlers in the main thread only, so other threads
    need nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous: dict[int, Any] = {}
    for number in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(number)
        if handler is not None:  # None: set outside Python, and not restorable from here
            previous[number] = signal.signal(number, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in caught:
            signal.raise_signal(number)


class _Deferring:
    """An MlflowClient whose calls each run under ``signals_deferred``."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._client, name)
        if not callable(value):
            return value

        @functools.wraps(value)
        def call(*args: Any, **kwargs: Any) -> Any:
            with signals_deferred():
                return value(*args, **kwargs)

        return call


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from /proc; None without it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the name in parentheses may hold spaces
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def process_alive(pid: int, since_ms: int | None = None) -> bool:
    """Whether ``pid`` is still the live Python process of this user that started before
    ``since_ms`` (a run's start time): a pid that the system handed to another process since
    (a shell, a later python) is not the run's process."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: not the one that created our run
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():
        return True  # no procfs (macOS): the signal check is all there is
    try:
        command = (proc / "cmdline").read_bytes().lower()  # empty for a zombie
    except OSError:
        return False
    if b"python" not in command:
        return False
    started = _process_start(pid)
    # btime has a resolution of one second, hence the margin.
    return started is None or since_ms is None or started <= since_ms / 1000 + 2


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested parameters as ``{"a.b.c": "value"}`` strings within MLflow's length limit."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple, bool)) or value is None \
                else str(value)
            flat[name] = text if len(text) <= PARAM_LIMIT else text[:PARAM_LIMIT - 3] + "..."
    return flat


def checkpoint_loader(task: str | None = None) -> Callable[[Path], nn.Module]:
    """What rebuilds a checkpoint as a module for ``Tracker.register_checkpoint``: the
    task's loader (``TaskInfo.loader``) for a finetuned checkpoint of ``task``,
    ``codis.model.load_model`` for a pretrained one (``task`` None)."""
    import codis.model
    from codis.tasks import TASKS

    if task is None:
        return codis.model.load_model
    info = TASKS[task]
    return getattr(info.module(), info.loader)


def model_requirements() -> list[str]:
    """The pip requirements recorded with an MLflow model of a codis checkpoint: the model
    library's own dependencies (codis-pipeline without extras; codis itself must be importable
    to unpickle it) and the pickler MLflow used. Given explicitly, so that MLflow does not infer
    them by loading the model again in a subprocess."""
    own = [r for r in metadata.requires("codis-pipeline") or [] if "extra ==" not in r]
    return [*own, f"cloudpickle=={metadata.version('cloudpickle')}"]


def system_metrics_available() -> bool:
    """MLflow's system metrics need psutil (not among this project's pinned dependencies)."""
    return importlib.util.find_spec("psutil") is not None


class RunHandle:
    """Logging into one MLflow run by id (a no-op handle when tracking is off)."""

    def __init__(self, client: Any | None, run_id: str | None) -> None:
        self.client, self.run_id = client, run_id
        self.logged: set[str] = set()  # metric names logged so far (final values skip them)

    @property
    def enabled(self) -> bool:
        return self.client is not None and self.run_id is not None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.logged.update(metrics)
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        batch = [Metric(key, float(value), now, step or 0) for key, value in metrics.items()
                 if isinstance(value, (int, float)) and math.isfinite(float(value))]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled or not params:
            return
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        for key, value in tags.items():
            if value is not None:
                self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Any, name: str) -> None:
        if self.enabled:
            self.client.log_dict(self.run_id, data, name)

    def log_text(self, text: str, name: str) -> None:
        if self.enabled:
            self.client.log_text(self.run_id, text, name)


class Tracker:
    """The MLflow side of one reproduction (or of one stage flow run on its own).

    ``uri`` None turns tracking off: every handle is a no-op and nothing is registered.
    ``description``: the experiment's, set when it is created (or found without one)."""

    def __init__(self, uri: str | None, experiment: str, *, artifact_location: str | None = None,
                 system_metrics: bool = True,
                 description: str = EXPERIMENT_DESCRIPTION) -> None:
        self.uri, self.experiment = uri, experiment
        self.system_metrics = system_metrics and system_metrics_available()
        if self.system_metrics:
            # Four INFO lines per stage ("Started monitoring system metrics." ...) otherwise.
            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        self.client: Any = None
        self.experiment_id: str | None = None
        self.database: Path | None = None
        if uri is None:
            return
        from mlflow import MlflowClient

        self.database = sqlite_file(uri)
        # The first client of a fresh database runs MLflow's migrations: two at once fail
        # ("table ... already exists"), hence one at a time.
        with self._lock(self.database.with_name(self.database.name + ".lock")
                        if self.database else None), signals_deferred():
            self.client = _Deferring(MlflowClient(tracking_uri=uri, registry_uri=uri))
            # Only a local store gets an explicit artifact folder; a server decides its own.
            local = uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri
            self.experiment_id = self._experiment(experiment,
                                                  artifact_location if local else None,
                                                  description)

    @staticmethod
    def _lock(path: Path | None) -> ContextManager[None]:
        return file_lock(path) if path is not None else nullcontext()

    def _experiment(self, name: str, artifact_location: str | None, description: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(name, artifact_location=artifact_location,
                                                     tags={NOTE: description})
            except MlflowException as error:  # created meanwhile by a concurrent run (on a server)
                if error.error_code != ALREADY_EXISTS:
                    raise
            found = self.client.get_experiment_by_name(name)
        if NOTE not in found.tags:  # created before experiments were described
            self.client.set_experiment_tag(found.experiment_id, NOTE, description)
        return found.experiment_id

    @property
    def enabled(self) -> bool:
        return self.client is not None

    # ---- links into the MLflow UI ---------------------------------------------------------------
    def ui_url(self) -> str | None:
        """The address of the MLflow UI showing this store: the tracking URI when it is a
        server, else ``CODIS_MLFLOW_UI_URL`` (``scripts/ui.sh`` serves the local store at
        http://127.0.0.1:5000) provided that ``CODIS_MLFLOW_UI_STORE``, the store that UI
        serves, is unset or this one, else None."""
        if not self.enabled:
            return None
        if self.uri.startswith(("http://", "https://")):
            return self.uri.rstrip("/")
        served = os.environ.get(UI_STORE_ENV, "")
        if served and not _same_store(served, self.uri):
            return None  # that UI shows another store: a link would open the wrong runs
        return os.environ.get(UI_URL_ENV, "").rstrip("/") or None

    def experiment_url(self) -> str | None:
        """The page of this tracker's experiment (its runs), or None without a UI address."""
        base = self.ui_url()
        return f"{base}/#/experiments/{self.experiment_id}/runs" if base else None

    def run_url(self, run_id: str | None) -> str | None:
        """The page of run ``run_id`` (of any experiment in this store), or None without a UI
        address or without that run."""
        base = self.ui_url()
        if base is None or not run_id:
            return None
        run = self._run(run_id)
        if run is None:
            return None
        return f"{base}/#/experiments/{run.info.experiment_id}/runs/{run_id}"

    def _run(self, run_id: str) -> Any | None:
        """Run ``run_id`` if this store holds it (and it is not deleted), else None."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as error:
            if error.error_code != DOES_NOT_EXIST:
                raise
            return None
        return run if run.info.lifecycle_stage == "active" else None

    # ---- runs -----------------------------------------------------------------------------------
    def start_run(self, name: str, *, parent: str | None = None,
                  tags: Mapping[str, Any] | None = None) -> RunHandle:
        if not self.enabled:
            return RunHandle(None, None)
        all_tags = {HOST: socket.gethostname(), PID: str(os.getpid()),
                    **{k: str(v) for k, v in (tags or {}).items() if v is not None}}
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return RunHandle(self.client, run.info.run_id)

    def end_run(self, handle: RunHandle, status: str = "FINISHED") -> None:
        if handle.enabled:
            self.client.set_terminated(handle.run_id, status)

    def end_after(self, handle: RunHandle, error: BaseException) -> None:
        """End ``handle`` as ``error`` ended it (``ending_status``), while ``error``
        propagates: a failure to record that is logged, never raised over ``error``."""
        try:
            self.end_run(handle, ending_status(error))
        except Exception as failure:  # noqa: BLE001 - the original error matters more
            log.warning("could not end MLflow run %s: %s", handle.run_id, failure)

    def end_stale_runs(self) -> list[str]:
        """End as ``KILLED`` (tag ``codis.ended_by=cleanup``) the runs of the experiment still
        ``RUNNING`` whose creating process on this host (tags ``codis.host``/``codis.pid``) is
        gone (``process_alive``): what ``kill -9`` leaves. Returns their ids."""
        if not self.enabled:
            return []
        ended: list[str] = []
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], max_results=1000, page_token=token,
                filter_string=f"attributes.status = 'RUNNING' and "
                              f"tags.`{HOST}` = '{socket.gethostname()}'")
            for run in page:
                try:
                    pid = int(run.data.tags.get(PID, ""))
                except ValueError:
                    continue
                if process_alive(pid, run.info.start_time):
                    continue
                self.client.set_tag(run.info.run_id, ENDED_BY, "cleanup")
                self.client.set_terminated(run.info.run_id, "KILLED")
                ended.append(run.info.run_id)
            token = page.token
            if not token:
                break
        if ended:
            log.info("ended %d MLflow run(s) left RUNNING by dead processes", len(ended))
        return ended

    @contextmanager
    def stage_run(self, name: str, *, parent: str | None, tags: Mapping[str, Any],
                  params: Mapping[str, Any] | None = None) -> Iterator[RunHandle]:
        """A child run around one stage: FINISHED on success, FAILED on an error, KILLED when
        interrupted (``ending_status``), with system metrics sampled meanwhile where psutil
        is installed."""
        handle, monitor = RunHandle(None, None), None
        try:
            with signals_deferred():  # an interrupt right after the run exists still ends it
                handle = self.start_run(name, parent=parent, tags=tags)
            handle.log_params(params or {})
            if handle.enabled and self.system_metrics:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                monitor = SystemMetricsMonitor(handle.run_id, tracking_uri=self.uri)
                monitor.start()
            yield handle
        except BaseException as error:
            self.end_after(handle, error)
            raise
        finally:
            if monitor is not None:
                monitor.finish()
        self.end_run(handle, "FINISHED")

    # ---- registry -------------------------------------------------------------------------------
    def register_checkpoint(self, model_name: str, checkpoint: str | Path, *, stage_key: str,
                            load: Callable[[Path], nn.Module], source_run_id: str | None,
                            label: str, parent: str | None = None,
                            score_name: str | None = None, score: float | None = None,
                            margin: float = 0.0, tags: Mapping[str, Any] | None = None,
                            ) -> dict[str, Any]:
        """Register ``checkpoint`` as a new version of ``model_name`` with the ``candidate``
        alias, and ``champion`` when ``score`` beats the current champion's by more than
        ``margin`` (higher is better; a champion without a score always loses).

        ``source_run_id``: the run that trained the checkpoint. ``load(checkpoint)`` builds the
        module (``checkpoint_loader``), logged there in eval mode as the MLflow model
        ``model/`` beside the raw ``checkpoint/model.pt``; the version's source is that model.
        Without such a run in this store (None, or recorded elsewhere), a run ``model[<label>]``
        under ``parent`` holds them instead. The result names the run as ``run_id``.

        Idempotent by ``stage_key``: a version already registered for it is returned unchanged,
        also when a concurrent run registers the same checkpoint (see the module docstring)."""
        if not self.enabled:
            return {"registered": False, "reason": "tracking is off"}
        self._ensure_registered_model(model_name)
        with self._lock(self._registry_lock(model_name)):
            found = self._version_for(model_name, stage_key)
            if found is not None:
                return self._existing(found, "already registered")
            trained_in = source_run_id if source_run_id and self._run(source_run_id) else None
            if trained_in is not None:
                self._log_model(trained_in, checkpoint, load)
                run_id = trained_in
            else:
                run_id = self._model_run(label, parent, checkpoint, source_run_id, load)
            version_tags = {STAGE_KEY: stage_key, **{k: str(v) for k, v in (tags or {}).items()}}
            if score is not None:
                version_tags.update({"codis.score": repr(float(score)),
                                     "codis.score_name": score_name or ""})
            version = self.client.create_model_version(
                model_name, source=f"runs:/{run_id}/model", run_id=run_id, tags=version_tags)
            kept = self._version_for(model_name, stage_key) or version
            if int(kept.version) != int(version.version):
                # A concurrent run (on a server: no lock) registered the same key first.
                self.client.delete_model_version(model_name, version.version)
                if trained_in is None:
                    self.client.delete_run(run_id)
                return self._existing(kept, "registered concurrently")
            aliases = []
            if self._newer_than(model_name, CANDIDATE, int(version.version)):
                self.client.set_registered_model_alias(model_name, CANDIDATE, version.version)
                aliases.append(CANDIDATE)
            if score is not None and self._beats_champion(model_name, float(score), margin):
                self.client.set_registered_model_alias(model_name, CHAMPION, version.version)
                aliases.append(CHAMPION)
        return {"registered": True, "model": model_name, "version": int(version.version),
                "aliases": aliases, "run_id": run_id}

    def _model_run(self, label: str, parent: str | None, checkpoint: str | Path,
                   trained_in: str | None, load: Callable[[Path], nn.Module]) -> str:
        """A finished run ``model[<label>]`` holding the model of a checkpoint whose training
        run is not in this store (``codis.source_run_id``: its id elsewhere, if any)."""
        handle = self.start_run(f"model[{label}]", parent=parent, tags={
            "codis.stage": "model", "codis.checkpoint": str(checkpoint),
            "codis.source_run_id": trained_in})
        try:
            self._log_model(handle.run_id, checkpoint, load)
        except BaseException as error:
            self.end_after(handle, error)
            raise
        self.end_run(handle)
        return handle.run_id

    def _log_model(self, run_id: str, checkpoint: str | Path,
                   load: Callable[[Path], nn.Module]) -> None:
        """Log into run ``run_id`` (finished or not) the MLflow model ``model/`` of
        ``load(checkpoint)`` and the checkpoint file as ``checkpoint/model.pt``."""
        import mlflow.pytorch
        from mlflow.models import Model

        module = load(Path(checkpoint)).eval()
        with tempfile.TemporaryDirectory() as folder:
            staged = Path(folder)
            with _quiet("mlflow.pytorch"):  # its warning on pickling: see the module docstring
                mlflow.pytorch.save_model(
                    module, staged / "model", serialization_format="pickle",
                    mlflow_model=Model(run_id=run_id, artifact_path="model"),
                    pip_requirements=model_requirements())
            (staged / "checkpoint").mkdir()
            # A link, not a copy: artifact stores read the file it points to.
            (staged / "checkpoint" / "model.pt").symlink_to(Path(checkpoint).resolve())
            self.client.log_artifacts(run_id, folder)

    def _registry_lock(self, model_name: str) -> Path | None:
        """The lock serialising registrations of ``model_name`` in a local database."""
        if self.database is None:
            return None
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", model_name)[:80]
        digest = hashlib.sha256(model_name.encode()).hexdigest()[:8]
        return self.database.with_name(self.database.name + ".locks") / f"{safe}-{digest}.lock"

    def _ensure_registered_model(self, model_name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(model_name)
            return
        except MlflowException as error:
            if error.error_code != DOES_NOT_EXIST:
                raise
        try:
            self.client.create_registered_model(
                model_name, description="codis-pipeline checkpoints (model.pt for "
                                        "codis.model.load_model or the task's loader)")
        except MlflowException as error:  # a concurrent run created it meanwhile
            if error.error_code != ALREADY_EXISTS:
                raise

    def _version_for(self, model_name: str, stage_key: str) -> Any | None:
        """The lowest version of ``model_name`` registered for ``stage_key``, or None."""
        same = [v for v in self.client.search_model_versions(f"name='{model_name}'")
                if v.tags.get(STAGE_KEY) == stage_key]
        return min(same, key=lambda v: int(v.version)) if same else None

    def _existing(self, version: Any, reason: str) -> dict[str, Any]:
        # Versions from a search carry no aliases; a version read on its own does.
        version = self.client.get_model_version(version.name, version.version)
        return {"registered": False, "model": version.name, "version": int(version.version),
                "aliases": sorted(version.aliases), "reason": reason}

    def _newer_than(self, model_name: str, alias: str, version: int) -> bool:
        """Whether ``version`` is newer than the one ``alias`` names (True without one)."""
        from mlflow.exceptions import MlflowException

        try:
            held = self.client.get_model_version_by_alias(model_name, alias)
        except MlflowException:
            return True
        return version > int(held.version)

    def _beats_champion(self, model_name: str, score: float, margin: float) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            champion = self.client.get_model_version_by_alias(model_name, CHAMPION)
        except MlflowException:
            return True  # no champion yet
        held = champion.tags.get("codis.score")
        return held is None or score > float(held) + margin

    def download_checkpoint(self, model_name: str, alias: str, destination: str | Path) -> Path:
        """The ``model.pt`` of ``model_name@alias`` (its run's ``checkpoint/``), downloaded
        under ``destination``."""
        import mlflow

        version = self.client.get_model_version_by_alias(model_name, alias)
        return Path(mlflow.artifacts.download_artifacts(
            run_id=version.run_id, artifact_path="checkpoint/model.pt",
            dst_path=str(destination), tracking_uri=self.uri))


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Logger ``logger`` reports errors only within the block."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)
