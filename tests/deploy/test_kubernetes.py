"""deploy/kubernetes/, checked without a cluster.

Manifests are only exercised when someone applies them, so what can be checked offline is
checked here: every object validates against the Kubernetes API schemas (kubernetes-validate
bundles them; strict, so a misspelt field fails), for the oldest version the manifests need
(1.28: the pod-index label gives each rank its number) and the newest the validator knows;
every container runs a real `pagedserve` subcommand with flags that its `--help` lists; the
Secrets referenced are the ones kustomization.yaml generates, with the keys referenced, and
the CURVE folders they become load as the scheduler and its clients load them; every
Service selects pods that exist, on ports they expose; the addresses in the flags are those
Services; a replica's ranks form one tensor-parallel group; requests are set from the
model's size. Then (slow) the containers' own commands run as real processes on loopback
with their Secrets as the pods mount them, and serve.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from pagedserve.services.cli import build_parser
from pagedserve.services.launcher import pagedserve_command
from pagedserve.shared.zmq_security import curve_client, curve_server, generate_curve_keys

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "deploy" / "kubernetes"
# The oldest Kubernetes the manifests need (the `apps.kubernetes.io/pod-index` label), and
# the newest the installed validator has schemas for.
KUBERNETES_VERSIONS = ["1.28", kubernetes_validate.latest_version()]
POD_KINDS = ("Deployment", "StatefulSet")
# `$(NAME)` in a container's args: Kubernetes substitutes the container's env var NAME.
ENV_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
# The host memory an executor needs besides its weights (Python, torch, the CUDA runtime):
# 0.9 GiB measured on CPU without a KV cache (`pagedserve up`'s executor: 1.9 GiB RSS
# with its 1 GiB KV cache), plus room for the CUDA context.
EXECUTOR_RUNTIME_BYTES = 3 << 29  # 1.5 GiB


# ------------------------------------------------------------------------------ loading


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    return yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())


@pytest.fixture(scope="module")
def objects(kustomization: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object of the files kustomization.yaml lists, in order."""
    loaded: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        loaded += [doc for doc in yaml.safe_load_all((MANIFESTS / name).read_text()) if doc is not None]
    return loaded


@pytest.fixture(scope="module")
def key_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `pagedserve keys deploy/kubernetes/keys` writes, in a temporary folder."""
    folder = tmp_path_factory.mktemp("keys")
    assert generate_curve_keys(folder)
    return folder


@pytest.fixture(scope="module")
def generated_secrets(kustomization: dict[str, Any], key_folder: Path) -> dict[str, dict[str, Any]]:
    """The Secrets kustomization.yaml's secretGenerator makes, built the way kustomize
    builds them (data keys from `key=path` file entries, or the keys of an env file), from
    freshly generated CURVE keys and the example API-key file."""
    import base64

    secrets: dict[str, dict[str, Any]] = {}
    for generator in kustomization["secretGenerator"]:
        data: dict[str, str] = {}
        for entry in generator.get("files", []):
            key, _, path = entry.partition("=")
            source = key_folder / Path(path).name if path.startswith("keys/") else MANIFESTS / path
            data[key] = base64.b64encode(source.read_bytes()).decode()
        for env_file in generator.get("envs", []):
            example = MANIFESTS / f"{env_file}.example"  # the real one is the user's, never committed
            for line in example.read_text().splitlines():
                if line.strip() and not line.startswith("#"):
                    key, _, value = line.partition("=")
                    data[key] = base64.b64encode(value.encode()).decode()
        secrets[generator["name"]] = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": generator["name"]}, "data": data}
    return secrets


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] in POD_KINDS]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def pagedserve_containers(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every container that runs the pagedserve image."""
    return [
        (workload, container)
        for workload in workloads(objects)
        for container in pod_spec(workload)["containers"]
        if container["image"].split(":")[0].rsplit("/", 1)[-1] == "pagedserve"
    ]


def pod_indices(workload: dict[str, Any]) -> range:
    return range(workload["spec"]["replicas"]) if workload["kind"] == "StatefulSet" else range(1)


def expanded_args(container: dict[str, Any], pod_index: int) -> list[str]:
    """The container's args as Kubernetes hands them to the process: `$(NAME)` replaced by
    the env var NAME, the pod-index label being the pod's ordinal."""
    values: dict[str, str] = {}
    for env in container.get("env", []):
        if "value" in env:
            values[env["name"]] = env["value"]
        elif env["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.labels['apps.kubernetes.io/pod-index']":
            values[env["name"]] = str(pod_index)

    def substitute(match: re.Match[str]) -> str:
        assert match.group(1) in values, f"{container['name']}: $({match.group(1)}) names no env var it can expand"
        return values[match.group(1)]
    return [ENV_REFERENCE.sub(substitute, arg) for arg in container["args"]]


def parse_pagedserve(argv: list[str]) -> argparse.Namespace:
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"`pagedserve {' '.join(argv)}` is rejected by the CLI (exit {exit_.code}); see stderr")


class Command:
    """A container's `pagedserve` argv, accepted by the CLI, read by flag name (the flags
    are the interface the manifests depend on, not the parser's attribute names)."""

    def __init__(self, argv: list[str]) -> None:
        self.subcommand = parse_pagedserve(argv).command
        self.argv = argv

    def get(self, name: str) -> str | None:
        return self.argv[self.argv.index(name) + 1] if name in self.argv else None

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        assert value is not None, f"{name} missing from `pagedserve {' '.join(self.argv)}`"
        return value


def commands(objects: list[dict[str, Any]], component: str) -> list[Command]:
    """The command of every pod (per ordinal) of the workloads of one component."""
    return [
        Command(expanded_args(container, index))
        for workload, container in pagedserve_containers(objects)
        if workload["metadata"]["labels"]["app.kubernetes.io/component"] == component
        for index in pod_indices(workload)
    ]


def port_of(address: str) -> int:
    port = urlparse(address).port
    assert port is not None, f"no port in {address}"
    return port


def service_port(service: dict[str, Any], port: int) -> dict[str, Any]:
    found = [p for p in service["spec"]["ports"] if p["port"] == port]
    assert found, f"Service {service['metadata']['name']} has no port {port}"
    return found[0]


def selected_workloads(objects: list[dict[str, Any]], selector: dict[str, str]) -> list[dict[str, Any]]:
    return [w for w in workloads(objects) if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]


def container_port(workload: dict[str, Any], name_or_number: str | int) -> int:
    for container in pod_spec(workload)["containers"]:
        for port in container.get("ports", []):
            if name_or_number in (port.get("name"), port["containerPort"]):
                return int(port["containerPort"])
    raise AssertionError(f"{workload['metadata']['name']} exposes no port {name_or_number!r}")


# ------------------------------------------------------------------- the Kubernetes schemas


def test_kustomization_lists_every_manifest(kustomization: dict[str, Any]) -> None:
    manifests = {path.name for path in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(manifests)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_matches_the_kubernetes_schemas(objects: list[dict[str, Any]], generated_secrets: dict[str, dict[str, Any]], version: str) -> None:
    assert {obj["kind"] for obj in objects} >= {"Deployment", "StatefulSet", "Service", "HorizontalPodAutoscaler"}
    for obj in [*objects, *generated_secrets.values()]:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']} (Kubernetes {version}): {error.message} at {list(error.path)}")


def test_the_validator_rejects_what_the_api_server_would(objects: list[dict[str, Any]]) -> None:
    """The validation above can fail: a misspelt field and a wrong type are caught."""
    statefulset = next(obj for obj in objects if obj["kind"] == "StatefulSet")
    misspelt = yaml.safe_load(yaml.safe_dump(statefulset))
    misspelt["spec"]["replica"] = misspelt["spec"].pop("replicas")
    wrong_type = yaml.safe_load(yaml.safe_dump(statefulset))
    wrong_type["spec"]["replicas"] = "two"
    for broken in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


# ------------------------------------------------------------------- the service commands


@pytest.fixture(scope="module")
def help_flags() -> dict[str, set[str]]:
    """The flags `pagedserve <subcommand> --help` lists, from the real CLI."""
    flags = {}
    for subcommand in ("scheduler", "executor", "gateway"):
        result = subprocess.run([*pagedserve_command(), subcommand, "--help"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        flags[subcommand] = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", result.stdout))
    return flags


def test_every_container_runs_a_pagedserve_subcommand_with_listed_flags(objects: list[dict[str, Any]], help_flags: dict[str, set[str]]) -> None:
    containers = pagedserve_containers(objects)
    assert {w["metadata"]["labels"]["app.kubernetes.io/component"] for w, _ in containers} == {"scheduler", "executor", "gateway"}
    for workload, container in containers:
        component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        assert container["command"] == ["pagedserve"], "the image's entrypoint, spelt out"
        for index in pod_indices(workload):
            argv = expanded_args(container, index)
            assert Command(argv).subcommand == component == argv[0]
            # Exact spellings: argparse would also take an abbreviation the help never lists.
            unlisted = [arg.split("=")[0] for arg in argv if arg.startswith("--") and arg.split("=")[0] not in help_flags[component]]
            assert unlisted == [], f"{workload['metadata']['name']}: `pagedserve {component} --help` lists no {unlisted}"


def test_addresses_are_the_services(objects: list[dict[str, Any]]) -> None:
    """Gateways and executors reach the scheduler, and everyone Redis, through Services
    whose ports lead to the ports the processes bind."""
    services = by_kind(objects, "Service")
    statefulsets = by_kind(objects, "StatefulSet")

    def target(address: str) -> tuple[dict[str, Any], int]:
        """The workload and container port a `scheme://service:port` address leads to."""
        host = urlparse(address).hostname
        assert host in services, f"{address}: no Service {host}"
        port = service_port(services[host], port_of(address))
        [workload] = selected_workloads(objects, services[host]["spec"]["selector"])
        return workload, container_port(workload, port.get("targetPort", port["port"]))

    [gateway] = commands(objects, "gateway")
    schedulers = {command["--replica-id"]: command for command in commands(objects, "scheduler")}
    executors = commands(objects, "executor")
    assert schedulers and executors
    for address in gateway["--scheduler-address"].split(","):
        workload, port = target(address)
        [scheduler] = commands([workload], "scheduler")
        assert port == port_of(scheduler["--gateway-address"])
        assert scheduler["--advertise-address"] == address, "Redis registers the address the gateways are given"
    for executor in executors:
        workload, port = target(executor["--scheduler-address"])
        [scheduler] = commands([workload], "scheduler")
        assert port == port_of(scheduler["--executor-address"])
    for command in [gateway, *schedulers.values()]:
        workload, port = target(command["--redis-url"])
        assert workload["metadata"]["name"] == "redis" and port == 6379
    for replica_id, scheduler in schedulers.items():
        assert urlparse(scheduler["--gateway-address"]).hostname == urlparse(scheduler["--executor-address"]).hostname == "0.0.0.0"
        advertised = urlparse(scheduler["--advertise-address"]).hostname
        assert statefulsets[advertised]["metadata"]["labels"]["pagedserve/replica"] == replica_id


def test_each_replica_is_one_tensor_parallel_group_of_its_pods(objects: list[dict[str, Any]]) -> None:
    """Ranks 0..T-1 are the StatefulSet's T pods (their ordinals); they share the executor
    id and the rendezvous, which is rank 0's pod by its stable name through a headless
    Service that publishes it before it is ready."""
    services = by_kind(objects, "Service")
    executor_sets = [w for w in workloads(objects) if w["metadata"]["labels"]["app.kubernetes.io/component"] == "executor"]
    assert executor_sets
    for statefulset in executor_sets:
        assert statefulset["kind"] == "StatefulSet" and statefulset["spec"]["podManagementPolicy"] == "Parallel"
        ranks = commands([statefulset], "executor")
        size = statefulset["spec"]["replicas"]
        assert [(int(r["--rank"]), int(r["--tensor-parallel-size"])) for r in ranks] == [(rank, size) for rank in range(size)]
        assert len({r["--executor-id"] for r in ranks}) == 1 and len({r["--dist-init-address"] for r in ranks}) == 1
        headless = services[statefulset["spec"]["serviceName"]]
        assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
        assert selected_workloads(objects, headless["spec"]["selector"]) == [statefulset]
        rendezvous = ranks[0]["--dist-init-address"]
        assert urlparse(rendezvous).hostname == f"{statefulset['metadata']['name']}-0.{headless['metadata']['name']}"
        assert container_port(statefulset, port_of(rendezvous)) == port_of(rendezvous)
        service_port(headless, port_of(rendezvous))
        # A GPU per rank, as the compose file's tensor-parallel ranks have.
        [container] = pod_spec(statefulset)["containers"]
        assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    schedulers = [w for w in workloads(objects) if w["metadata"]["labels"]["app.kubernetes.io/component"] == "scheduler"]
    assert all(w["kind"] == "StatefulSet" and w["spec"]["replicas"] == 1 for w in schedulers), "one scheduler per replica"
    assert len(schedulers) == len(executor_sets)


# ------------------------------------------------------------------------- the Secrets


def secret_references(objects: list[dict[str, Any]]) -> list[tuple[str, str, str | None]]:
    """(workload, Secret name, key or None) for every Secret a pod uses."""
    found = []
    for workload in workloads(objects):
        name = workload["metadata"]["name"]
        for volume in pod_spec(workload).get("volumes", []):
            if "secret" in volume:
                found.append((name, volume["secret"]["secretName"], None))
        for container in pod_spec(workload)["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    found.append((name, ref["name"], ref["key"]))
            found += [(name, ref["secretRef"]["name"], None) for ref in container.get("envFrom", []) if "secretRef" in ref]
    return found


def test_secrets_referenced_exist_with_their_keys(objects: list[dict[str, Any]], generated_secrets: dict[str, dict[str, Any]]) -> None:
    references = secret_references(objects)
    assert {secret for _, secret, _ in references} == set(generated_secrets), "every Secret is used, every one used exists"
    for workload, secret, key in references:
        if key is not None:
            assert key in generated_secrets[secret]["data"], f"{workload}: Secret {secret} has no key {key}"
    # Bearer tokens by environment only: argv shows in `ps` and in the pod spec.
    for workload, container in pagedserve_containers(objects):
        assert not {"--api-key", "--admin-key"} & set(container["args"]), workload["metadata"]["name"]


def test_curve_keys_are_mounted_per_role_and_load(objects: list[dict[str, Any]], generated_secrets: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    """Each pagedserve container reads --zmq-curve-keys from a read-only Secret volume: the
    scheduler's holds its keypair and the clients' public key (and no other public key: each
    one there is an admitted client), the clients' their keypair and the scheduler's public
    key, never its secret. Laid out as the volumes will be, each folder loads."""
    import base64

    for workload, container in pagedserve_containers(objects):
        component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        directory = Command(expanded_args(container, 0))["--zmq-curve-keys"]
        [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == directory]
        assert mount["readOnly"] is True
        [volume] = [v for v in pod_spec(workload)["volumes"] if v["name"] == mount["name"]]
        secret = generated_secrets[volume["secret"]["secretName"]]
        folder = tmp_path / workload["metadata"]["name"]
        folder.mkdir()
        for name, data in secret["data"].items():
            (folder / name).write_bytes(base64.b64decode(data))
        if component == "scheduler":
            assert sorted(secret["data"]) == ["client.key", "server.key_secret"]
            endpoint = curve_server(folder)
            assert endpoint.server_key is None
        else:
            assert sorted(secret["data"]) == ["client.key_secret", "server.key"]
            endpoint = curve_client(folder)
            assert endpoint.server_key is not None
        # The unprivileged user reads the files through its group (fsGroup), nobody else.
        assert pod_spec(workload)["securityContext"]["fsGroup"] == pod_spec(workload)["securityContext"]["runAsUser"]
        assert volume["secret"]["defaultMode"] & 0o007 == 0 and volume["secret"]["defaultMode"] & 0o040
    # The two folders pair up: the clients trust the server key the scheduler holds.
    scheduler_folder = next(p for p in tmp_path.iterdir() if (p / "server.key_secret").exists())
    client_folder = next(p for p in tmp_path.iterdir() if (p / "client.key_secret").exists())
    assert curve_client(client_folder).server_key == curve_server(scheduler_folder).public_key


# -------------------------------------------------------------------- Services and pods


def test_every_service_selects_pods_on_ports_they_expose(objects: list[dict[str, Any]]) -> None:
    for name, service in by_kind(objects, "Service").items():
        selected = selected_workloads(objects, service["spec"]["selector"])
        assert len(selected) == 1, f"Service {name} selects {[w['metadata']['name'] for w in selected]}"
        for port in service["spec"]["ports"]:
            container_port(selected[0], port.get("targetPort", port["port"]))
    for workload in workloads(objects):
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()
        assert len(selected_workloads(objects, selector)) == 1, f"{workload['metadata']['name']}'s selector is not its own"
        if workload["kind"] == "StatefulSet":
            assert workload["spec"]["serviceName"] in by_kind(objects, "Service")


def test_gateways_are_ready_for_a_horizontal_autoscaler(objects: list[dict[str, Any]]) -> None:
    [gateway] = [w for w in workloads(objects) if w["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"]
    assert gateway["kind"] == "Deployment"
    [container] = pod_spec(gateway)["containers"]
    port = int(Command(container["args"])["--port"])
    assert container_port(gateway, container["readinessProbe"]["httpGet"]["port"]) == port
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/metrics"  # see gateway.yaml: never restarted for its backends
    assert container_port(gateway, container["livenessProbe"]["httpGet"]["port"]) == port
    [hpa] = by_kind(objects, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": gateway["metadata"]["name"]}
    metrics = [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    # Utilisation is a share of the request: every metric the HPA reads is requested.
    assert metrics and all(metric in container["resources"]["requests"] for metric in metrics)
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    [budget] = by_kind(objects, "PodDisruptionBudget").values()
    assert selected_workloads(objects, budget["spec"]["selector"]["matchLabels"]) == [gateway]
    assert budget["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a drain can always proceed"


# ------------------------------------------------------------------------------ sizing


def memory_bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "K": 10**3, "M": 10**6, "G": 10**9}
    match = re.fullmatch(r"(\d+)([KMGT]i?)?", str(quantity))
    assert match, quantity
    return int(match.group(1)) * units.get(match.group(2) or "", 1)


def test_every_container_requests_cpu_and_memory_within_its_limit(objects: list[dict[str, Any]]) -> None:
    for workload in workloads(objects):
        for container in pod_spec(workload)["containers"]:
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), container["name"]
            assert memory_bytes(resources["requests"]["memory"]) <= memory_bytes(resources["limits"]["memory"]), container["name"]


def test_executor_memory_covers_the_model(objects: list[dict[str, Any]]) -> None:
    """Host memory per rank: the runtime, plus the rank's share of the weights held densely
    in float32 while they load (a GGUF is dequantized on load before the device copy)."""
    import gguf

    from pagedserve.shared.model_source import default_model_source

    source = default_model_source()
    assert source.gguf_file is not None
    num_params = sum(int(tensor.n_elements) for tensor in gguf.GGUFReader(Path(source.directory) / source.gguf_file).tensors)
    for statefulset in [w for w in workloads(objects) if w["metadata"]["labels"]["app.kubernetes.io/component"] == "executor"]:
        rank_0 = commands([statefulset], "executor")[0]
        assert rank_0.get("--model") is None, "the embedded model, which the image ships"
        [container] = pod_spec(statefulset)["containers"]
        need = EXECUTOR_RUNTIME_BYTES + 4 * num_params // int(rank_0["--tensor-parallel-size"])
        request = memory_bytes(container["resources"]["requests"]["memory"])
        assert request >= need, f"{statefulset['metadata']['name']}: {request / 2**30:.2f} GiB requested, {need / 2**30:.2f} GiB needed"


# ------------------------------------------------------ the manifests' commands, running


@pytest.mark.slow
def test_the_manifests_commands_serve_with_their_secrets(objects: list[dict[str, Any]], generated_secrets: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    """Every container's own command as real processes on loopback: each `host:port`
    address becomes 127.0.0.1 and one free port per port number (the Services forward
    each port to the same number), and each CURVE folder holds what its role's Secret
    holds, so the split of keys per role is exercised by real handshakes. With no executor
    yet, the gateway answers its liveness path (it is not restarted) and fails its
    readiness path (it leaves the Service); once rank 0 joins, it serves a completion
    behind the API key from the Secret."""
    import base64
    import os

    import httpx

    from pagedserve.services.launcher import free_port, redis_server_binary
    from tests.cluster import ServiceProcess, port_open, wait_until

    ports: dict[str, str] = {}

    def loopback_port(port: str) -> str:
        return ports.setdefault(port, str(free_port()))

    def on_loopback(argv: list[str], keys: Path | None) -> list[str]:
        out = []
        for previous, arg in zip(["", *argv], argv):
            if previous == "--host":
                arg = "127.0.0.1"
            elif previous == "--port":
                arg = loopback_port(arg)
            elif previous == "--zmq-curve-keys" and keys is not None:
                arg = str(keys)
            else:
                arg = re.sub(r"^(tcp|redis)://[^:/]+:(\d+)", lambda m: f"{m[1]}://127.0.0.1:{loopback_port(m[2])}", arg)
            out.append(arg)
        return out

    def secret_folder(workload: dict[str, Any]) -> Path:
        volume = next(v for v in pod_spec(workload)["volumes"] if "secret" in v)
        folder = tmp_path / workload["metadata"]["name"]
        folder.mkdir()
        for name, data in generated_secrets[volume["secret"]["secretName"]]["data"].items():
            (folder / name).write_bytes(base64.b64decode(data))
        return folder

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("REDIS_URL", None)
    started: list[ServiceProcess] = []

    def start(workload: dict[str, Any], container: dict[str, Any], argv: list[str]) -> ServiceProcess:
        container_env = dict(env)
        for variable in container.get("env", []):
            ref = variable.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                container_env[variable["name"]] = base64.b64decode(generated_secrets[ref["name"]]["data"][ref["key"]]).decode()
        process = ServiceProcess(workload["metadata"]["name"], argv, tmp_path / f"{workload['metadata']['name']}.log", container_env)
        process.start()
        started.append(process)
        return process

    def role(component: str) -> tuple[dict[str, Any], dict[str, Any]]:
        [found] = [(w, c) for w in workloads(objects) for c in pod_spec(w)["containers"]
                   if w["metadata"]["labels"]["app.kubernetes.io/component"] == component]
        return found

    try:
        redis, redis_container = role("redis")
        redis_port = loopback_port(str(redis_container["ports"][0]["containerPort"]))
        start(redis, redis_container, [redis_server_binary(), "--port", redis_port, "--bind", "127.0.0.1", *redis_container["args"]])
        wait_until(lambda: port_open(int(redis_port)), 30, "redis-server")
        scheduler, scheduler_container = role("scheduler")
        start(scheduler, scheduler_container, [*pagedserve_command(), *on_loopback(scheduler_container["args"], secret_folder(scheduler))])
        gateway, gateway_container = role("gateway")
        gateway_process = start(gateway, gateway_container, [*pagedserve_command(), *on_loopback(gateway_container["args"], secret_folder(gateway))])
        base_url = f"http://127.0.0.1:{loopback_port(Command(gateway_container['args'])['--port'])}"

        def status(path: str, **kwargs: Any) -> int | None:
            for process in started:
                if not process.alive():
                    raise RuntimeError(f"{process.name} exited:\n{process.log()}")
            try:
                return httpx.get(f"{base_url}{path}", timeout=10, **kwargs).status_code
            except httpx.HTTPError:
                return None

        liveness = gateway_container["livenessProbe"]["httpGet"]["path"]
        readiness = gateway_container["readinessProbe"]["httpGet"]["path"]
        wait_until(lambda: status(liveness) is not None, 180, "the gateway to listen")
        assert status(liveness) == 200, "not restarted while its backends are away"
        assert status(readiness) == 503, "out of the Service while no replica can generate"

        executor, executor_container = role("executor")
        # CPU here: the KV cache is given in bytes, as the CPU notes of the docs say.
        argv = on_loopback(expanded_args(executor_container, 0), secret_folder(executor))
        start(executor, executor_container, [*pagedserve_command(), *argv, "--kv-cache-memory", str(128 << 20)])
        wait_until(lambda: status(readiness) == 200, 300, "the gateway to turn ready", interval_s=0.25)

        api_key = gateway_process.env["PAGEDSERVE_API_KEY"]
        body = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
        assert httpx.post(f"{base_url}/v1/completions", json=body, timeout=120).status_code == 401
        response = httpx.post(f"{base_url}/v1/completions", json=body, headers={"Authorization": f"Bearer {api_key}"}, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] >= 1
    finally:
        for process in reversed(started):
            process.stop()
