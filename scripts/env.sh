# Environment shared by the demo and the tests: nothing reaches a model or data hub at run time,
# no telemetry, Prefect and MLflow state kept inside the repository's .cache unless set already.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE=disabled
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export TOKENIZERS_PARALLELISM=false
# Prefect's ephemeral API server gets 20 s to start by default; on a busy machine that is too little
# (the demo and its end-to-end test died with "Timed out ... ephemeral Prefect API server").
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-180}
