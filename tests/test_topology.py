"""The production topology of infra/ started for real, and its documented multi-node pretraining
command run (tests/test_infra.py checks the files statically).

* A PostgreSQL server started here from the system's packages (``scripts/setup.sh`` installs them),
  its databases and roles made by the stack's own ``infra/postgres/init-databases.sh``; the Prefect
  server, the MLflow server and a CPU worker started with the commands and environment of
  ``infra/docker-compose.yml`` (interpolated from ``infra/.env.example`` with fresh passwords),
  only the addresses changed to this machine's; ``prefect deploy`` of the reproduce deployment of
  ``prefect.yaml`` onto the worker's pool; a small reproduction triggered through it runs to
  Completed; its pretrained model is in MLflow's registry, and the checkpoint downloaded through
  the registry is the one the run trained. MLflow's artifacts go to its proxied store in a local
  folder: the stack's MinIO (S3) needs Docker, which this machine does not have.
* ``infra/README.md``'s multi-node ``torchrun`` command, run as two "nodes" of one CPU process each
  (gloo) meeting at a c10d rendezvous on 127.0.0.1.

Every process is started in a session of its own and ended by its process group, also when the test
fails."""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from flows import pretrain_entry
from stack import (INFRA, PREFECT, as_argv, assert_flow_run_completed, clean_env,
                   documented_torchrun, env_items, free_port, interpolate, run_cli, start, stop,
                   wait_healthy)

COMPOSE = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
INSTALL_HINT = ("bash scripts/setup.sh installs it when run as root where apt-get exists; else "
                "install the PostgreSQL server package (Debian/Ubuntu: apt-get install -y "
                "postgresql) or put the bin/ folder holding initdb and postgres on PATH")

# The smallest reproduction: a tiny demo world, one variant pretrained for two steps, one
# zero-shot retrieval evaluation, the registration and the report.
TOPOLOGY_RECIPE = {
    "name": "topology",
    "description": "the smallest reproduction, through the production topology",
    "demo_world": {"seed": 5, "image_size": 32, "pretrain_images": 8,
                   "retrieval_images": {"train": 2, "val": 1, "test": 4},
                   "vqa_images": {"train": 1, "val": 1, "test": 1},
                   "nlvr_pairs": {"train": 1, "dev": 1, "test": 1},
                   "ve_images": {"train": 1, "dev": 1, "test": 1},
                   "classification_images": {"train": 2, "val": 1},
                   "dead_urls": 0, "non_image_urls": 0},
    "pretrain_data": [{"name": "pairs", "annotations": "demo://pretrain/captions.json",
                       "image_root": "demo://", "samples_per_shard": 8}],
    "variants": {"codis": {"preset": "tiny", "model": {"mode": "codis"}}},
    "pretrain": {"train": {"steps": 2, "batch_size": 4, "log_every": 1, "checkpoint_every": 2},
                 "data": {"num_workers": 0, "shuffle_buffer": 8}},
    "tasks": [{"task": "retrieval", "name": "demo", "preset": "demo", "zero_shot": True,
               "finetune": False,
               "eval_data": {"annotations": "demo://retrieval/test.json", "image_root": "demo://"}}],
    "tracking": {"experiment": "codis-topology", "pretrained_model": "topology-pretrained",
                 "log_system_metrics": False},
}


# ----------------------------------------------------------------------------- PostgreSQL

def postgres_bindir() -> Path:
    """The bin folder of the newest PostgreSQL server installed; the test fails (CI must have it)
    naming how to install one."""
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    found.sort(key=lambda bindir: int(bindir.parent.name) if bindir.parent.name.isdigit() else 0)
    if found:
        return found[-1]
    on_path = shutil.which("initdb")
    if on_path and shutil.which("postgres", path=str(Path(on_path).parent)):
        return Path(on_path).parent
    pytest.fail(f"PostgreSQL's server (initdb, postgres) is not installed: {INSTALL_HINT}")


class Postgres:
    """A PostgreSQL cluster of its own in a temporary folder, listening on 127.0.0.1:``port`` and
    on a socket in its folder. The server refuses to run as root: under root it runs as the
    ``postgres`` account (Debian's packages create it), from a folder owned by that account."""

    def __init__(self, bindir: Path, folder: Path, launched: Callable[[subprocess.Popen, int], None],
                 log: Path) -> None:
        self.bindir, self.folder, self.port = bindir, folder, free_port()
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail(f"running as root, but there is no `postgres` account to run the "
                            f"server as: {INSTALL_HINT}")
            os.chown(folder, account.pw_uid, account.pw_gid)
            self.prefix = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}",
                           "--init-groups"]
        data = folder / "data"
        done = subprocess.run([*self.prefix, str(bindir / "initdb"), "-D", str(data), "-U",
                               "postgres", "-E", "UTF8", "--auth-local=trust",
                               "--auth-host=scram-sha-256", "--no-instructions"],
                              capture_output=True, text=True, timeout=300, cwd=folder)
        assert done.returncode == 0, f"initdb failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        # SIGINT: PostgreSQL's fast shutdown (ends the sessions, then stops).
        server = start([*self.prefix, str(bindir / "postgres"), "-D", str(data), "-p",
                        str(self.port), "-k", str(folder), "-c", "listen_addresses=127.0.0.1"],
                       clean_env(), log, cwd=folder)
        launched(server, signal.SIGINT)
        deadline = time.monotonic() + 120
        while subprocess.run([str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p",
                              str(self.port)], timeout=30).returncode != 0:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)

    def create_databases(self, passwords: dict[str, str]) -> None:
        """The stack's own init script, as the postgres image runs it on first start."""
        env = {**clean_env(), **passwords, "POSTGRES_USER": "postgres", "PGHOST": str(self.folder),
               "PGPORT": str(self.port), "PATH": f"{self.bindir}{os.pathsep}{os.environ['PATH']}"}
        done = subprocess.run(["sh", str(INFRA / "postgres" / "init-databases.sh")], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"init-databases.sh failed:\n{done.stdout}{done.stderr}"

    def query(self, database: str, password: str, sql: str, *params: object) -> list[tuple]:
        """Rows of ``sql`` in ``database``, logged in over TCP as its role (named as the database)."""
        import psycopg2

        with psycopg2.connect(host="127.0.0.1", port=self.port, dbname=database, user=database,
                              password=password, connect_timeout=30) as connection:
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchall()


# ----------------------------------------------------------------------------- the compose stack

def stack_values() -> dict[str, str]:
    """infra/.env.example as a user fills it in: a fresh password for every empty value."""
    values = {}
    for line in (INFRA / ".env.example").read_text().splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and not name.startswith("#"):
            values[name] = value or secrets.token_hex(12)
    return values


def compose_service(name: str, values: dict[str, str], addresses: dict[str, str],
                    options: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Command and environment of the compose service ``name`` as it runs on this machine:
    interpolated from ``values``, the stack's ``host:port`` addresses replaced by ``addresses``,
    the values of the command's ``options`` replaced, its program taken from this interpreter's
    environment. The container's paths (HF_HOME on the data volume) are left out."""
    service = COMPOSE["services"][name]
    argv = [interpolate(part, values) for part in as_argv(service["command"])]
    argv[0] = str(Path(sys.executable).parent / argv[0])
    for flag, value in options.items():
        argv[argv.index(flag) + 1] = value
    environment = {}
    for key, value in env_items(service).items():
        value = interpolate(value, values)
        for stack_address, local in addresses.items():
            value = value.replace(stack_address, local)
        environment[key] = value
    environment.pop("HF_HOME", None)
    return argv, environment


@pytest.fixture
def launched() -> Callable[[subprocess.Popen, int], None]:
    """``launched(process, signal)``: ``process`` (started in a session of its own) is ended with
    ``signal`` by its process group when the test ends, last started first, also on failure."""
    processes: list[tuple[subprocess.Popen, int]] = []
    yield lambda process, sig: processes.append((process, sig))
    for process, sig in reversed(processes):
        stop(process, sig)
    assert all(process.poll() is not None for process, _ in processes)


@pytest.fixture
def postgres_folder(tmp_path: Path) -> Path:
    """The cluster's folder: in tmp_path, or, under root, in the system's temporary folder (the
    `postgres` account cannot enter pytest's root-only folders), removed afterwards."""
    if os.geteuid() != 0:
        folder = tmp_path / "postgres"
        folder.mkdir()
        yield folder
        return
    folder = Path(tempfile.mkdtemp(prefix="codis-topology-pg-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_reproduction_runs_through_the_production_topology(
        tmp_path: Path, launched: Callable[[subprocess.Popen, int], None],
        postgres_folder: Path) -> None:
    from mlflow import MlflowClient

    from codis.model import load_model
    from flows.tracking import Tracker

    bindir = postgres_bindir()
    values = stack_values()
    postgres = Postgres(bindir, postgres_folder, launched, tmp_path / "postgres.log")
    postgres.create_databases({name: values[name]
                               for name in ("PREFECT_DB_PASSWORD", "MLFLOW_DB_PASSWORD")})
    prefect_port, mlflow_port = free_port(), free_port()
    api, tracking = f"http://127.0.0.1:{prefect_port}/api", f"http://127.0.0.1:{mlflow_port}"
    addresses = {"postgres:5432": f"127.0.0.1:{postgres.port}",
                 "prefect-server:4200": f"127.0.0.1:{prefect_port}",
                 "mlflow:5000": f"127.0.0.1:{mlflow_port}"}
    base = clean_env(PREFECT_HOME=str(tmp_path / "prefect"))

    argv, env = compose_service("prefect-server", values, addresses,
                                {"--host": "127.0.0.1", "--port": str(prefect_port)})
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://prefect:")
    log = tmp_path / "prefect-server.log"
    server = start(argv, {**base, **env}, log)
    launched(server, signal.SIGTERM)
    artifacts = tmp_path / "mlflow-artifacts"
    argv, env = compose_service("mlflow", values, addresses,
                                {"--host": "127.0.0.1", "--port": str(mlflow_port),
                                 "--artifacts-destination": str(artifacts)})
    assert "--backend-store-uri" not in argv and values["MLFLOW_DB_PASSWORD"] not in " ".join(argv)
    mlflow_log = tmp_path / "mlflow.log"
    mlflow = start(argv, {**base, **env}, mlflow_log)
    launched(mlflow, signal.SIGTERM)
    wait_healthy(f"{api}/health", server, log, limit=300)
    wait_healthy(f"{tracking}/health", mlflow, mlflow_log, limit=300)

    # The CPU worker as the stack runs it (it creates its process pool on start), once: after one
    # flow run it exits. Its health server gets a free port instead of the container's 8080.
    worker_argv, env = compose_service("prefect-worker-cpu", values, addresses, {})
    pool = worker_argv[worker_argv.index("--pool") + 1]
    assert env["PREFECT_API_URL"] == api and env["MLFLOW_TRACKING_URI"] == tracking
    worker_env = {**base, **env, "PREFECT_WORKER_WEBSERVER_PORT": str(free_port())}
    run_cli([PREFECT, "work-pool", "create", pool, "--type", "process"], worker_env, 300)
    out = run_cli([PREFECT, "--no-prompt", "deploy", "--name", "reproduce/reproduce", "--pool", pool],
                  worker_env, 300)
    assert "reproduce/reproduce" in out

    recipe = tmp_path / "topology.yaml"
    recipe.write_text(yaml.safe_dump(TOPOLOGY_RECIPE, sort_keys=False))
    runs = tmp_path / "runs"
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}):
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("reproduce/reproduce")
            assert deployment.work_pool_name == pool
            flow_run = client.create_flow_run_from_deployment(deployment.id, parameters={
                "recipe_file": str(recipe), "runs_root": str(runs), "progress": False})

    worker_log = tmp_path / "worker.log"
    worker = start([*worker_argv, "--run-once"], worker_env, worker_log)
    launched(worker, signal.SIGKILL)  # a worker busy with a run ignores SIGTERM
    worker.wait(timeout=900)
    assert_flow_run_completed(api, flow_run.id, worker_log)

    # Prefect's and MLflow's records are in PostgreSQL.
    assert postgres.query("prefect", values["PREFECT_DB_PASSWORD"],
                          "SELECT state_type FROM flow_run WHERE id = %s",
                          str(flow_run.id)) == [("COMPLETED",)]
    assert ("topology-pretrained",) in postgres.query(
        "mlflow", values["MLFLOW_DB_PASSWORD"], "SELECT name FROM registered_models")

    # The registered model, found and loaded back through the MLflow server alone.
    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    version = client.get_model_version_by_alias("topology-pretrained", "candidate")
    summary = json.loads(next(runs.glob("topology-*/reproduction.json")).read_text())
    record = summary["variants"]["codis"]
    assert int(version.version) == record["registered"]["pretrained"]["version"]
    assert version.tags["codis.variant"] == "codis"
    pretrain = record["pretrain"]
    downloaded = Tracker(tracking, "codis-topology").download_checkpoint(
        "topology-pretrained", "candidate", tmp_path / "download")
    model = load_model(downloaded)
    trained = load_model(Path(pretrain["path"]) / "model.pt")
    assert model.config == trained.config
    weights, reference = model.state_dict(), trained.state_dict()
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[name], reference[name]) for name in reference)
    # ... uploaded through the server into its proxied artifact store.
    assert list(artifacts.rglob("model.pt")), f"no model.pt under {artifacts}"


# ----------------------------------------------------------------------------- multi-node torchrun

def test_pretrain_entry_refuses_a_process_layout_unlike_the_recipes(
        shards: Callable[[str, str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Before any training: torchrun's 2 x 1 processes against the recipe's 1 x 1 (the learning
    rate would be scaled to the wrong global batch), and a recipe whose ViT comes from its
    vision_init stage without that stage's weights."""
    output = tmp_path / "out"
    base = ["--recipe", "pipelines/demo.yaml", "--variant", "codis", "--shards",
            str(shards("pretrain", "train")), "--output", str(output)]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert pretrain_entry.main([*base, "--set", "vision_init=null"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: pretrain.nodes x pretrain.gpus_per_node:")
    assert "--set pretrain.nodes=2" in error and len(error.strip().splitlines()) == 1
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert pretrain_entry.main(base) == 2
    assert capsys.readouterr().err.startswith("error: --vision-weights:")
    assert not output.exists()


@pytest.mark.slow
def test_documented_multi_node_command_runs_on_two_cpu_nodes(
        shards: Callable[[str, str], Path], tmp_path: Path,
        launched: Callable[[subprocess.Popen, int], None]) -> None:
    from torch.distributed.run import get_args_parser

    from codis.model import load_model
    from codis.train import PretrainConfig
    from flows.launch import pretrain_run_config
    from flows.recipe import load_recipe

    documented = get_args_parser().parse_args(documented_torchrun()[1:])
    endpoint = f"127.0.0.1:{free_port()}"
    output = tmp_path / "pretrain"
    fill = {"<node0>:29500": endpoint, "<recipe.yaml>": "pipelines/demo.yaml",
            "<variant>": "codis", "<shard-folders>": str(shards("pretrain", "train")),
            "<output-folder>": str(output)}
    arguments = []
    for argument in documented.training_script_args:
        for placeholder, value in fill.items():
            argument = argument.replace(placeholder, value)
        arguments.append(argument)
    assert "<" not in " ".join(arguments), arguments
    # One CPU process per node; the demo recipe for two steps, without its vision_init stage.
    overrides = ["pretrain.gpus_per_node=1", "vision_init=null", "pretrain.train.steps=2",
                 "pretrain.train.batch_size=4", "pretrain.train.checkpoint_every=1"]
    arguments += [part for item in overrides for part in ("--set", item)] + ["--no-progress"]

    nodes = []
    for rank in range(int(documented.nnodes)):
        command = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={documented.nnodes}",
                   "--nproc-per-node=1", f"--node-rank={rank}",
                   f"--rdzv-backend={documented.rdzv_backend}", f"--rdzv-endpoint={endpoint}",
                   "--rdzv-id=topology", "-m", documented.training_script, *arguments]
        log = tmp_path / f"node{rank}.log"
        nodes.append((start(command, clean_env(), log), log))
        launched(nodes[-1][0], signal.SIGTERM)
    deadline = time.monotonic() + 600
    for process, log in nodes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            pass
        assert process.returncode == 0, f"{log.name}: exit {process.returncode}\n" \
                                        f"{log.read_text()[-4000:]}"

    assert (output / "model.pt").is_file()
    load_model(output / "model.pt")
    # The run trained the config that the recipe's pretrain stage builds (global batch 2 x 4).
    spec = load_recipe("pipelines/demo.yaml", pretrain_entry.parser().parse_args(arguments).overrides)
    expected = pretrain_run_config(spec.pretrain, "codis", spec.variants["codis"],
                                   [shards("pretrain", "train")], output, spec.steps_scale)
    assert PretrainConfig.load(output / "run.yaml") == expected
    assert (spec.pretrain.nodes, spec.pretrain.gpus_per_node) == (2, 1)
