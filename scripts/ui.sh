#!/usr/bin/env bash
# The local UI stack on loopback: a Prefect server (http://127.0.0.1:4200), an MLflow server
# (http://127.0.0.1:5000, one worker, SQLite store runs/mlflow.db, artifacts in runs/mlartifacts),
# the deployments of prefect.yaml on the `codis-local` process pool, and a worker for that pool.
#
#   bash scripts/ui.sh           start what is not running yet, deploy, print the URLs
#   bash scripts/ui.sh status    what is running
#   bash scripts/ui.sh stop      stop what this script started, by PID
#
# Each service runs in its own session (setsid), so stopping it ends its children too (the
# worker's flow runs, MLflow's server worker). A Prefect worker ignores SIGTERM, so it gets
# SIGKILL; the servers get SIGTERM and, after 20 s, SIGKILL. PIDs and logs: runs/ui/.
# Ports: PREFECT_PORT, MLFLOW_PORT. A port that something this script did not start already holds
# is refused before anything starts (that server would receive the deployments and the runs).
# Prefect's database: $PREFECT_HOME (default .cache/prefect).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
[ -f scripts/env.sh ] && source scripts/env.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_HOME=${PREFECT_HOME:-$root/.cache/prefect}
prefect_port=${PREFECT_PORT:-4200}
mlflow_port=${MLFLOW_PORT:-5000}
state=$root/runs/ui
bin=$root/.venv/bin
prefect_api=http://127.0.0.1:$prefect_port/api
mlflow_url=http://127.0.0.1:$mlflow_port

alive() { [ -f "$state/$1.pid" ] && kill -0 "$(cat "$state/$1.pid")" 2>/dev/null; }

listening() {  # listening PORT: something accepts connections on 127.0.0.1:PORT
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

check_port() {  # check_port NAME PORT VARIABLE: refuse a port held by what this script did not start
  local name=$1 port=$2 variable=$3
  if ! alive "$name" && listening "$port"; then
    echo "port $port (127.0.0.1) is already in use by a process that scripts/ui.sh did not start;" \
      "not starting $name. Stop that process or choose a free port: $variable=<port> bash scripts/ui.sh" >&2
    exit 1
  fi
}

# start NAME CMD...: run CMD in a new session (its PID is its process group), log to runs/ui/NAME.log
start() {
  local name=$1; shift
  if alive "$name"; then echo "$name: already running (pid $(cat "$state/$name.pid"))"; return; fi
  setsid "$@" >"$state/$name.log" 2>&1 </dev/null &
  echo $! >"$state/$name.pid"
  echo "$name: started (pid $!, log runs/ui/$name.log)"
}

wait_http() {  # wait_http NAME URL SECONDS
  local name=$1 url=$2 limit=$3 waited=0
  until curl -fsS -o /dev/null "$url" 2>/dev/null; do
    if ! alive "$name"; then echo "$name exited; last lines of runs/ui/$name.log:" >&2; tail -n 30 "$state/$name.log" >&2; exit 1; fi
    if [ "$waited" -ge "$limit" ]; then echo "$name: not healthy after ${limit}s ($url)" >&2; exit 1; fi
    sleep 1; waited=$((waited + 1))
  done
}

stop_one() {  # stop_one NAME SIGNAL
  local name=$1 signal=$2 pid
  if ! alive "$name"; then rm -f "$state/$name.pid"; return; fi
  pid=$(cat "$state/$name.pid")
  kill "-$signal" -- "-$pid" 2>/dev/null || kill "-$signal" "$pid" 2>/dev/null || true
  for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$state/$name.pid"
  echo "$name: stopped (pid $pid)"
}

case "${1:-start}" in
  stop)
    stop_one worker KILL
    stop_one mlflow TERM
    stop_one prefect-server TERM
    ;;
  status)
    for name in prefect-server mlflow worker; do
      if alive "$name"; then echo "$name: running (pid $(cat "$state/$name.pid"))"; else echo "$name: not running"; fi
    done
    ;;
  start)
    check_port prefect-server "$prefect_port" PREFECT_PORT
    check_port mlflow "$mlflow_port" MLFLOW_PORT
    mkdir -p "$state" "$PREFECT_HOME" "$root/runs/mlartifacts"
    start prefect-server "$bin/prefect" server start --host 127.0.0.1 --port "$prefect_port"
    start mlflow "$bin/mlflow" server --host 127.0.0.1 --port "$mlflow_port" --workers 1 \
      --backend-store-uri "sqlite:///$root/runs/mlflow.db" \
      --serve-artifacts --artifacts-destination "$root/runs/mlartifacts"
    wait_http prefect-server "$prefect_api/health" 120
    wait_http mlflow "$mlflow_url/health" 120
    export PREFECT_API_URL=$prefect_api
    if ! "$bin/prefect" work-pool inspect codis-local >/dev/null 2>&1; then
      "$bin/prefect" work-pool create codis-local --type process >/dev/null
      echo "work pool codis-local: created"
    fi
    echo "deploying prefect.yaml ..."
    "$bin/prefect" --no-prompt deploy --all >"$state/deploy.log" 2>&1 \
      || { tail -n 30 "$state/deploy.log" >&2; echo "prefect deploy failed (runs/ui/deploy.log)" >&2; exit 1; }
    # Flow runs started by the worker record to the MLflow server.
    start worker env PREFECT_API_URL="$prefect_api" MLFLOW_TRACKING_URI="$mlflow_url" \
      "$bin/prefect" worker start --pool codis-local --type process
    cat <<EOF

Prefect UI:  http://127.0.0.1:$prefect_port   (deployments: reproduce and one per stage)
MLflow UI:   $mlflow_url

Run the demo from the Prefect UI (Deployments > reproduce > Run), or:
  PREFECT_API_URL=$prefect_api $bin/prefect deployment run reproduce/reproduce
A single stage, e.g. the VQA evaluation of the CODIS variant of the quick recipe:
  PREFECT_API_URL=$prefect_api $bin/prefect deployment run evaluate/evaluate -p recipe=quick -p task=vqa
Runs started with python -m flows.reproduce record to runs/mlflow.db, which this MLflow server shows,
and to the Prefect database in \$PREFECT_HOME ($PREFECT_HOME), which this Prefect server reads;
with PREFECT_API_URL=$prefect_api they run against this server instead of a local one of their own.
Stop everything: bash scripts/ui.sh stop
EOF
    ;;
  *)
    echo "usage: bash scripts/ui.sh [start|status|stop]" >&2
    exit 2
    ;;
esac
