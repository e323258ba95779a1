#!/usr/bin/env bash
# Set up (idempotent) and run the demo reproduction end to end: the generated demo world,
# img2dataset over loopback, webdataset shards, CODIS and ALBEF pretraining (tiny preset, CPU),
# zero-shot and finetuned retrieval, VQA, NLVR2, SNLI-VE, the report. Local Prefect (a server the run
# starts and stops), local MLflow (SQLite under runs/). Extra arguments go to `python -m flows.reproduce`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
source scripts/env.sh
exec .venv/bin/python -m flows.reproduce --recipe pipelines/demo.yaml "$@"
