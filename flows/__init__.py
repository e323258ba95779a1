"""Prefect flows and MLflow tracking around the ``codis`` library.

The flows are thin: every Prefect task calls one ``codis`` (or MLflow) function and passes paths,
never tensors. What a reproduction runs is described by a recipe (``pipelines/*.yaml``,
:mod:`flows.recipe`); what it has already done is recorded on disk by content-keyed stage folders
(:mod:`flows.store`), so a re-run skips finished work with or without a Prefect server.

Modules, each importing only those before it: :mod:`flows.recipe` (schema, mapping onto codis
configs), :mod:`flows.store` (stage keys and completion markers), :mod:`flows.tracking` (MLflow
runs, model registry), :mod:`flows.fingerprint` (the code part of stage keys),
:mod:`flows.launch` (torchrun command lines, running and following a subprocess),
:mod:`flows.stages` (one function and one Prefect task per stage), :mod:`flows.deployments` (one
deployable flow per stage, for ``prefect.yaml``), :mod:`flows.compare` (side-by-side tables of
MLflow runs), :mod:`flows.reproduce` (the parent flow and its CLI); and
:mod:`flows.pretrain_entry`, the process that torchrun starts for pretraining.
"""

import os as _os

# Prefect's server sends anonymous usage data unless told not to; on a machine without internet
# that shows up as errors and, under the test harness, as "database is locked". Only a default:
# an explicit setting wins.
_os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
