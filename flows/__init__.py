"""Prefect flows and MLflow tracking around the ``codis`` library.

The flows are thin: every Prefect task calls one ``codis`` (or MLflow) function and passes paths,
never tensors. What a reproduction runs is described by a recipe (``pipelines/*.yaml``,
:mod:`flows.recipe`); what it has already done is recorded on disk by content-keyed stage folders
(:mod:`flows.store`), so a re-run skips finished work with or without a Prefect server.

Modules, each importing only those before it: :mod:`flows.recipe` (schema, mapping onto codis
configs, the shipped recipes), :mod:`flows.store` (stage keys and completion markers),
:mod:`flows.tracking` (MLflow runs, model registry), :mod:`flows.fingerprint` (the code part of
stage keys), :mod:`flows.launch` (torchrun command lines, running and following a subprocess),
:mod:`flows.server` (the Prefect API of a command-line run: the one named by ``PREFECT_API_URL``,
checked, or a local server it owns; links to Prefect runs), :mod:`flows.stages` (one function
and one Prefect task per stage), :mod:`flows.plan` (the stages of a recipe, each run or reused
when first needed), :mod:`flows.deployments` (one deployable flow per stage, addressed by recipe,
variant and task, for ``prefect.yaml``), :mod:`flows.compare` (side-by-side tables of MLflow
runs), :mod:`flows.reproduce` (the parent flow and its CLI); and :mod:`flows.pretrain_entry`, the
process that torchrun starts for pretraining.

Importing :mod:`flows` from a source checkout points ``PREFECT_HOME`` (Prefect's settings and its
local database) at the checkout's ``.cache/prefect`` unless it is set already, as
``scripts/env.sh`` does: Prefect reads it once, at its own import, and would otherwise keep its
state in ``~/.prefect``, shared by every project on the machine.
"""

import os as _os

# Prefect's server sends anonymous usage data unless told not to; on a machine without internet
# that shows up as errors and, under the test harness, as "database is locked". Only a default:
# an explicit setting wins.
_os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "pyproject.toml")) and "PREFECT_HOME" not in _os.environ:
    # Not when installed as a package. Prefect creates its home without parents, so .cache first.
    _os.environ["PREFECT_HOME"] = _os.path.join(_checkout, ".cache", "prefect")
    try:
        _os.makedirs(_os.environ["PREFECT_HOME"], mode=0o700, exist_ok=True)
    except OSError:  # a read-only checkout: Prefect warns and runs without its home
        pass
