# Environment shared by the demo and the tests: nothing reaches a model or data hub at run time,
# no telemetry, Prefect's state (settings, database) in the repository's .cache/prefect and
# MLflow's under runs/ (the CLI's default tracking store), unless set already.
_codis_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE=disabled
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export TOKENIZERS_PARALLELISM=false
export PREFECT_HOME=${PREFECT_HOME:-$_codis_root/.cache/prefect}
mkdir -p "$PREFECT_HOME" 2>/dev/null || true  # Prefect creates its home without parents
# python -m flows.reproduce starts a local Prefect server of its own when PREFECT_API_URL is
# unset (flows/server.py) and waits this long for it; a loaded machine needs far more than the
# few seconds an idle one does.
export CODIS_PREFECT_STARTUP_TIMEOUT=${CODIS_PREFECT_STARTUP_TIMEOUT:-300}
# Prefect's own temporary server, still started by flows called from Python without an API
# (not by the CLI), gets 20 s by default; too little on a busy machine.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-180}
# Where links to MLflow runs point (the Prefect log, link artifacts, the parent run's stage table)
# for a local sqlite store: the MLflow UI that scripts/ui.sh serves, for the store it serves
# (runs/mlflow.db; runs recorded elsewhere, e.g. --runs-root /tmp/x, get no link).
export CODIS_MLFLOW_UI_URL=${CODIS_MLFLOW_UI_URL:-http://127.0.0.1:${MLFLOW_PORT:-5000}}
export CODIS_MLFLOW_UI_STORE=${CODIS_MLFLOW_UI_STORE:-sqlite:///$_codis_root/runs/mlflow.db}
unset _codis_root
