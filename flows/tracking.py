"""MLflow for the flows: one parent run per reproduction, one child run per stage, the registry.

Everything goes through :class:`mlflow.MlflowClient` with explicit run ids: the parent's id is
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
  (``<recipe>-<task>-<dataset>``); a version's source is its run's ``checkpoint/`` artifact
  folder holding ``model.pt`` (what :func:`codis.model.load_model` reads). Aliases:
  ``candidate`` on every new version, ``champion`` on a version whose score beats the current
  champion's (tags ``codis.score`` / ``codis.score_name``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

log = logging.getLogger(__name__)

PARAM_LIMIT = 6000  # MLflow's maximum parameter value length
CANDIDATE, CHAMPION = "candidate", "champion"


def default_tracking_uri(runs_root: str | Path) -> str:
    """``sqlite:///<runs>/mlflow.db`` (absolute, so the working directory does not matter)."""
    return f"sqlite:///{(Path(runs_root) / 'mlflow.db').resolve()}"


def resolve_tracking_uri(tracking_uri: str | None, runs_root: str | Path) -> str:
    """The MLflow tracking URI of a run: ``tracking_uri`` if given, else ``MLFLOW_TRACKING_URI``,
    else :func:`default_tracking_uri` under ``runs_root``."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(runs_root)


def default_artifact_location(runs_root: str | Path, experiment: str) -> str:
    return (Path(runs_root) / "mlartifacts" / experiment).resolve().as_uri()


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

    ``uri`` None turns tracking off: every handle is a no-op and nothing is registered."""

    def __init__(self, uri: str | None, experiment: str, *, artifact_location: str | None = None,
                 system_metrics: bool = True) -> None:
        self.uri, self.experiment = uri, experiment
        self.system_metrics = system_metrics and system_metrics_available()
        self.client: Any = None
        self.experiment_id: str | None = None
        if uri is None:
            return
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            # Only a local store gets an explicit artifact folder; a tracking server decides its own.
            local = uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=artifact_location if local else None)

    @property
    def enabled(self) -> bool:
        return self.client is not None

    def start_run(self, name: str, *, parent: str | None = None,
                  tags: Mapping[str, Any] | None = None) -> RunHandle:
        if not self.enabled:
            return RunHandle(None, None)
        all_tags = {k: str(v) for k, v in (tags or {}).items() if v is not None}
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return RunHandle(self.client, run.info.run_id)

    def end_run(self, handle: RunHandle, status: str = "FINISHED") -> None:
        if handle.enabled:
            self.client.set_terminated(handle.run_id, status)

    @contextmanager
    def stage_run(self, name: str, *, parent: str | None, tags: Mapping[str, Any],
                  params: Mapping[str, Any] | None = None) -> Iterator[RunHandle]:
        """A child run around one stage: FINISHED on success, FAILED on an exception, with system
        metrics sampled meanwhile where psutil is installed."""
        handle = self.start_run(name, parent=parent, tags=tags)
        handle.log_params(params or {})
        monitor = None
        if handle.enabled and self.system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(handle.run_id, tracking_uri=self.uri)
            monitor.start()
        try:
            yield handle
        except BaseException:
            self.end_run(handle, "FAILED")
            raise
        finally:
            if monitor is not None:
                monitor.finish()
        self.end_run(handle, "FINISHED")

    # ---- registry -------------------------------------------------------------------------------
    def register_checkpoint(self, handle: RunHandle, model_name: str, checkpoint: str | Path, *,
                            stage_key: str, score_name: str | None = None,
                            score: float | None = None, tags: Mapping[str, Any] | None = None,
                            ) -> dict[str, Any]:
        """Register ``checkpoint`` (logged under the run's ``checkpoint/``) as a new version of
        ``model_name`` with the ``candidate`` alias, and ``champion`` when ``score`` beats the
        current champion's (higher is better; a champion without a score always loses).

        Idempotent by ``stage_key``: a version already registered for it is returned unchanged."""
        if not self.enabled or not handle.enabled:
            return {"registered": False, "reason": "tracking is off"}
        from mlflow.exceptions import MlflowException

        client = self.client
        try:
            client.get_registered_model(model_name)
        except MlflowException:
            client.create_registered_model(
                model_name, description="codis-pipeline checkpoints (model.pt for "
                                        "codis.model.load_model or the task's loader)")
        for version in client.search_model_versions(f"name='{model_name}'"):
            if version.tags.get("codis.stage_key") == stage_key:
                return {"registered": False, "model": model_name, "version": int(version.version),
                        "aliases": list(version.aliases), "reason": "already registered"}
        handle.log_artifact(checkpoint, "checkpoint")
        version_tags = {"codis.stage_key": stage_key, **{k: str(v) for k, v in (tags or {}).items()}}
        if score is not None:
            version_tags.update({"codis.score": repr(float(score)), "codis.score_name": score_name or ""})
        version = client.create_model_version(
            model_name, source=f"runs:/{handle.run_id}/checkpoint", run_id=handle.run_id,
            tags=version_tags)
        client.set_registered_model_alias(model_name, CANDIDATE, version.version)
        aliases = [CANDIDATE]
        if score is not None and self._beats_champion(model_name, float(score)):
            client.set_registered_model_alias(model_name, CHAMPION, version.version)
            aliases.append(CHAMPION)
        return {"registered": True, "model": model_name, "version": int(version.version),
                "aliases": aliases}

    def _beats_champion(self, model_name: str, score: float) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            champion = self.client.get_model_version_by_alias(model_name, CHAMPION)
        except MlflowException:
            return True  # no champion yet
        held = champion.tags.get("codis.score")
        return held is None or score > float(held)

    def download_checkpoint(self, model_name: str, alias: str, destination: str | Path) -> Path:
        """The ``model.pt`` of ``model_name@alias``, downloaded under ``destination``."""
        import mlflow

        version = self.client.get_model_version_by_alias(model_name, alias)
        uri = self.client.get_model_version_download_uri(model_name, version.version)
        folder = mlflow.artifacts.download_artifacts(uri, dst_path=str(destination),
                                                     tracking_uri=self.uri)
        return Path(folder) / "model.pt"
