#!/bin/sh
# Creates the two databases of the stack in the one PostgreSQL instance: `prefect` (Prefect server)
# and `mlflow` (MLflow backend store), each owned by its own login role.
#
# The postgres image runs this from /docker-entrypoint-initdb.d/ once, on the first start with an
# empty data volume; changing a password in infra/.env later does not change it here (use
# `ALTER ROLE ... PASSWORD` or `docker compose down -v` to start over).
#
# Passwords arrive as environment variables and are passed to psql as variables, so psql quotes
# them (:'name') and they never appear in this file or on a command line.
set -eu

: "${PREFECT_DB_PASSWORD:?PREFECT_DB_PASSWORD is not set}"
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v prefect_password="$PREFECT_DB_PASSWORD" \
    -v mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE DATABASE prefect OWNER prefect;
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
-- Prefect's migrations create pg_trgm themselves; doing it here as the superuser means the
-- prefect role needs no extension privileges.
\connect prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
SQL
