"""Prefect flows and MLflow tracking around the ``codis`` library.

The flows are thin: every Prefect task calls one ``codis`` (or MLflow) function and passes paths,
never tensors. What a reproduction runs is described by a recipe (``pipelines/*.yaml``,
:mod:`flows.recipe`); what it has already done is recorded on disk by content-keyed stage folders
(:mod:`flows.store`), so a re-run skips finished work with or without a Prefect server.

Modules: :mod:`flows.recipe` (schema, mapping onto codis configs, learning-rate scaling, the
torchrun command), :mod:`flows.store` (stage keys and completion markers), :mod:`flows.tracking`
(MLflow runs, model registry), :mod:`flows.stages` (one Prefect task and one deployable flow per
stage), :mod:`flows.reproduce` (the parent flow and its CLI), :mod:`flows.compare` (side-by-side
tables of MLflow runs), :mod:`flows.pretrain_entry` (the process that torchrun starts).
"""

import os as _os

# Prefect's server sends anonymous usage data unless told not to; on a machine without internet
# that shows up as errors and, under the test harness, as "database is locked". Only a default:
# an explicit setting wins.
_os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
