"""deploy/kubernetes/: every manifest validates against Kubernetes' own JSON schemas (offline,
strict: an unknown field is an error), and the manifests say what the fleet needs: probes on
the ports the servers listen on, a GPU per replica, a headless Service the router resolves,
Prometheus annotations, a kustomization that lists every file, and command lines that
`tokenmill` parses."""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import socket
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

K8S_DIR = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
# The schemas of this Kubernetes release (bundled in kubernetes-validate) are the reference.
K8S_VERSION = "1.33.0"


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


@functools.cache
def documents() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(file name, object) for every YAML document of every manifest."""
    out = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                out.append((path.name, doc))
    return tuple(out)


def objects(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in documents() if doc.get("kind") == kind]


def one(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects(kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name!r}, found {len(found)}"
    return found[0]


def replica_set() -> dict[str, Any]:
    return one("StatefulSet", "tokenmill-replica")


def router() -> dict[str, Any]:
    return one("Deployment", "tokenmill-router")


def headless_service() -> dict[str, Any]:
    return one("Service", "tokenmill-replicas")


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{workload['metadata']['name']}: expected one container"
    return containers[0]


def flag_value(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, f"expected {flag} once in {args}"
    return args[args.index(flag) + 1]


def resolve_port(c: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (a number or a container port's name) as a number."""
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == port]
    assert named, f"container {c['name']} has no port named {port!r}"
    return named[0]


def listen_port(c: dict[str, Any]) -> int:
    """The port the container's command line makes the server listen on (--port)."""
    port = int(flag_value(c["args"], "--port"))
    assert port in [p["containerPort"] for p in c["ports"]], f"{c['name']}: --port {port} is not a container port"
    return port


def workloads() -> list[dict[str, Any]]:
    return [replica_set(), router()]


# -- the schemas --------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network fails: the schemas must come from the package."""
    def refuse(*args, **kwargs):
        raise AssertionError("the validator tried to use the network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def validate(doc: dict[str, Any]) -> str:
    return kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name,doc", documents(),
                         ids=[f"{name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
                              for name, doc in documents()])
def test_manifest_validates_against_kubernetes_schema(name, doc, no_network):
    assert validate(doc) == "1.33"


def test_expected_objects_are_there():
    kinds = sorted((doc["kind"], doc["metadata"]["name"]) for _, doc in documents())
    assert kinds == [("Deployment", "tokenmill-router"), ("Namespace", "tokenmill"),
                     ("PersistentVolumeClaim", "tokenmill-models"), ("Secret", "tokenmill-api-keys"),
                     ("Service", "tokenmill-replicas"), ("Service", "tokenmill-router"),
                     ("StatefulSet", "tokenmill-replica")]


def _typo_field(doc):
    c = container(doc)
    c["readinesProbe"] = c.pop("readinessProbe")


def _typo_nested(doc):
    container(doc)["livenessProbe"]["httpGet"]["paht"] = "/health"


def _wrong_type(doc):
    doc["spec"]["replicas"] = "three"


def _missing_required(doc):
    del container(doc)["name"]


def _annotation_not_a_string(doc):
    doc["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] = 8000


@pytest.mark.parametrize("breakage", [_typo_field, _typo_nested, _wrong_type, _missing_required,
                                      _annotation_not_a_string])
def test_validator_rejects_a_broken_copy(breakage, no_network):
    broken = copy.deepcopy(replica_set())
    validate(broken)  # the intact copy passes...
    breakage(broken)
    with pytest.raises(kubernetes_validate.ValidationError):  # ...and the broken one does not
        validate(broken)


# -- kustomization ----------------------------------------------------------------------------


def test_kustomization_lists_every_manifest():
    k = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text(encoding="utf-8"))
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    assert len(k["resources"]) == len(set(k["resources"]))
    assert sorted(k["resources"]) == [p.name for p in manifest_files()]
    # Every container's image is one `kustomize edit set image NAME=...` overrides.
    image_names = {i["name"] for i in k["images"]}
    for w in workloads():
        image = container(w)["image"]
        assert image == "tokenmill:latest"
        assert image.split(":")[0] in image_names


# -- what the fleet needs -----------------------------------------------------------------------


def test_one_namespace_for_everything():
    (ns,) = objects("Namespace")
    for _, doc in documents():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == ns["metadata"]["name"] == "tokenmill", doc["metadata"]


@pytest.mark.parametrize("workload", workloads(), ids=lambda w: w["metadata"]["name"])
def test_pod_template_probes_health_on_the_listen_port(workload):
    c = container(workload)
    port = listen_port(c)
    assert flag_value(c["args"], "--host") == "0.0.0.0"  # reachable from the kubelet and the Services
    ready = c["readinessProbe"]["httpGet"]
    assert ready["path"] == "/health" and resolve_port(c, ready["port"]) == port
    live = c["livenessProbe"]["httpGet"]
    assert resolve_port(c, live["port"]) == port
    if workload["kind"] == "StatefulSet":
        assert live["path"] == "/health"
    else:
        # The router's /health is 503 while no replica is healthy; restarting it would not help.
        assert live["path"] in ("/health", "/metrics")
    # Lenient liveness: a busy server gets at least a minute before it is restarted.
    lp = c["livenessProbe"]
    assert lp.get("periodSeconds", 10) * lp.get("failureThreshold", 3) >= 60


def test_replicas_have_a_startup_probe_long_enough_to_load_a_model():
    c = container(replica_set())
    sp = c["startupProbe"]
    assert sp["httpGet"]["path"] == "/health" and resolve_port(c, sp["httpGet"]["port"]) == listen_port(c)
    assert sp.get("periodSeconds", 10) * sp.get("failureThreshold", 3) >= 600


def test_replicas_ask_for_a_gpu():
    c = container(replica_set())
    assert flag_value(c["args"], "--device") == "cuda"
    res = c["resources"]
    assert str(res["limits"]["nvidia.com/gpu"]) == "1"
    assert "cpu" in res["requests"] and "memory" in res["requests"]
    assert replica_set()["spec"]["replicas"] == 3
    r = container(router())["resources"]
    assert "nvidia.com/gpu" not in r.get("limits", {}) and "cpu" in r["requests"] and "memory" in r["requests"]


def test_headless_service_selects_the_replica_pods_only():
    svc = headless_service()["spec"]
    assert svc["clusterIP"] == "None"
    assert svc.get("publishNotReadyAddresses", False) is False  # only ready pods are in the DNS answer
    selector = svc["selector"].items()
    assert selector <= replica_set()["spec"]["template"]["metadata"]["labels"].items()
    assert selector <= replica_set()["spec"]["selector"]["matchLabels"].items()
    assert not selector <= router()["spec"]["template"]["metadata"]["labels"].items()
    assert replica_set()["spec"]["serviceName"] == headless_service()["metadata"]["name"]
    (port,) = svc["ports"]
    c = container(replica_set())
    assert resolve_port(c, port.get("targetPort", port["port"])) == listen_port(c)


def test_router_resolves_the_headless_service():
    svc = headless_service()
    (port,) = svc["spec"]["ports"]
    expected = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:{port['port']}"
    assert expected == "tokenmill-replicas.tokenmill.svc.cluster.local:8000"
    assert flag_value(container(router())["args"], "--replicas-dns") == expected
    assert flag_value(container(router())["args"], "--policy") == "cache-aware"


def test_router_service_reaches_the_router():
    svc = one("Service", "tokenmill-router")["spec"]
    assert svc.get("type", "ClusterIP") == "ClusterIP"
    assert svc["selector"].items() <= router()["spec"]["template"]["metadata"]["labels"].items()
    assert not svc["selector"].items() <= replica_set()["spec"]["template"]["metadata"]["labels"].items()
    (port,) = svc["ports"]
    c = container(router())
    assert port["port"] == 80 and resolve_port(c, port["targetPort"]) == listen_port(c) == 8080


@pytest.mark.parametrize("workload", workloads(), ids=lambda w: w["metadata"]["name"])
def test_prometheus_annotations(workload):
    ann = workload["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/port"] == str(listen_port(container(workload)))
    assert ann["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("workload", workloads(), ids=lambda w: w["metadata"]["name"])
def test_volumes_and_files_exist(workload):
    spec = workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    c = container(workload)
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    for m in mounts.values():
        assert m["name"] in volumes, f"mount of unknown volume {m['name']!r}"
    for v in volumes.values():
        if "secret" in v:
            one("Secret", v["secret"]["secretName"])
        if "persistentVolumeClaim" in v:
            one("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])
    # --api-keys-file is a key of the Secret mounted at its folder.
    path = Path(flag_value(c["args"], "--api-keys-file"))
    secret_volume = volumes[mounts[str(path.parent)]["name"]]["secret"]
    assert path.name in one("Secret", secret_volume["secretName"])["stringData"]
    if workload["kind"] == "StatefulSet":  # the model folder is on the models volume
        model = Path(c["args"][1])
        assert mounts[str(model.parent)]["readOnly"] is True
        assert "persistentVolumeClaim" in volumes[mounts[str(model.parent)]["name"]]


# -- the command lines, parsed by tokenmill's own parser ----------------------------------------


@pytest.fixture(scope="module")
def tokenmill_parser() -> argparse.ArgumentParser:
    from tokenmill.cli import build_parser  # imports torch: only these tests pay for it

    return build_parser()


def parse(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"`tokenmill {' '.join(args)}` does not parse: {err.getvalue().strip()}")


def test_replica_command_line_parses(tokenmill_parser):
    c = container(replica_set())
    assert c["command"] == ["tokenmill"]
    ns = parse(tokenmill_parser, c["args"])
    assert ns.command == "serve" and ns.model == "/models/demo" and ns.served_model_name == ["demo"]
    assert (ns.host, ns.port, ns.device) == ("0.0.0.0", 8000, "cuda")
    assert ns.api_keys_file == "/etc/tokenmill/keys.json"


def test_example_api_keys_file_loads(tmp_path):
    from tokenmill.server.api_keys import KeyStore

    keys = tmp_path / "keys.json"
    keys.write_text(one("Secret", "tokenmill-api-keys")["stringData"]["keys.json"], encoding="utf-8")
    assert len(KeyStore.from_config(None, str(keys))) == 1


def test_router_command_line_parses(tokenmill_parser):
    c = container(router())
    assert c["command"] == ["tokenmill"]
    ns = parse(tokenmill_parser, c["args"])
    assert (ns.command, ns.policy, ns.host, ns.port) == ("router", "cache-aware", "0.0.0.0", 8080)
    assert ns.replicas_dns == ["tokenmill-replicas.tokenmill.svc.cluster.local:8000"]
    assert ns.api_keys_file == "/etc/tokenmill/keys.json"
    from tokenmill.router.discovery import DnsTarget

    target = DnsTarget.parse(ns.replicas_dns[0])
    assert (target.host, target.port) == ("tokenmill-replicas.tokenmill.svc.cluster.local", 8000)
