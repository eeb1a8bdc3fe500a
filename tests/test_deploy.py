"""Deployment artefacts: compose.yaml, deploy/kubernetes/, deploy/prometheus/prometheus-compose.yml,
deploy/firewall/docker-user.sh, deploy/seccomp/, the Containerfile. Offline and fast: no image is
pulled or built; one test starts a container of the fetcher image (the pinned seccomp profile).
tests/test_compose.py runs the compose stack for real.

* compose.yaml is validated by a real Compose implementation (`docker compose` v2 if the plugin
  exists, else Debian's `docker-compose` v1), plus structural checks.
* Core Kubernetes kinds are validated against the Kubernetes OpenAPI schemas bundled in the PyPI
  package `kubernetes-validate` (strict: unknown fields fail). CRDs (KEDA ScaledObject and
  TriggerAuthentication, Prometheus Operator PodMonitor) have no bundled schema: they are checked
  against the small JSON schemas below, written from the CRDs' documented required fields.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import tomllib
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import pytest

from safeurl_worker.config import parse_lanes
from safeurl_worker.consumer import lane_stream

yaml = pytest.importorskip("yaml", reason="PyYAML missing: pip install -e '.[dev]'")
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema missing: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
K8S = ROOT / "deploy" / "kubernetes"
PROM = ROOT / "deploy" / "prometheus" / "prometheus-compose.yml"
FIREWALL = ROOT / "deploy" / "firewall" / "docker-user.sh"
K8S_VERSION = "1.29.0"
CRD_KINDS = {("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication"),
             ("monitoring.coreos.com/v1", "PodMonitor")}


# --------------------------------------------------------------------------- helpers

def settings_env_names() -> set[str]:
    """Every environment name the worker reads, from Settings (or config.py's text if the
    package does not import at the moment)."""
    try:
        from safeurl_worker.config import Settings
        return {name.upper() for name in Settings.model_fields}
    except Exception:  # pragma: no cover - another module mid-edit
        text = (ROOT / "safeurl_worker" / "config.py").read_text()
        body = text.split("class Settings", 1)[1].split("@field_validator", 1)[0]
        return {m.upper() for m in re.findall(r"^    ([a-z_][a-z0-9_]*)\s*:", body, re.M)}


def shutdown_grace_default() -> float:
    try:
        from safeurl_worker.config import Settings
        return float(Settings.model_fields["shutdown_grace_s"].default)
    except Exception:  # pragma: no cover
        text = (ROOT / "safeurl_worker" / "config.py").read_text()
        m = re.search(r"shutdown_grace_s:.*?default=([0-9.]+)", text)
        assert m, "shutdown_grace_s default not found in config.py"
        return float(m.group(1))


def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path, doc))
    return out


def k8s_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in k8s_docs() if d["kind"] == kind]


def _defaults(value: Any) -> Any:
    """`${NAME:-default}` -> default throughout: compose.yaml as it runs with no variable set."""
    if isinstance(value, str):
        return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)
    if isinstance(value, dict):
        return {k: _defaults(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_defaults(v) for v in value]
    return value


def compose() -> dict[str, Any]:
    data: dict[str, Any] = _defaults(yaml.safe_load(COMPOSE.read_text()))
    return data


def compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 timeout=20).returncode == 0:
        return [docker, "compose"]
    v1 = shutil.which("docker-compose")
    return [v1] if v1 else None


def deployment() -> dict[str, Any]:
    (dep,) = k8s_kind("Deployment")
    return dep


# --------------------------------------------------------------------------- compose

def test_compose_validates_with_a_compose_implementation() -> None:
    cli = compose_cli()
    if cli is None:
        pytest.skip("no Compose implementation: neither the `docker compose` plugin nor "
                    "`docker-compose` is installed (Debian: apt-get install docker-compose)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    out = subprocess.run([*cli, "-f", str(COMPOSE), "--project-directory", str(ROOT),
                          "-p", "safeurl", "config"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert set(resolved["services"]) >= {"redis", "postgres", "migrate", "worker",
                                         "fetcher-image", "prometheus"}
    # The fetch network keeps its exact name despite the project prefix.
    assert resolved["networks"]["fetch"]["name"] == "safeurl-fetch"


def test_compose_rejects_a_broken_file(tmp_path: Path) -> None:
    """The validator above is a real one: an unknown key fails."""
    cli = compose_cli()
    if cli is None:
        pytest.skip("no Compose implementation installed (apt-get install docker-compose)")
    bad = tmp_path / "compose.yaml"
    bad.write_text(COMPOSE.read_text().replace("stop_grace_period:", "stop_grace_perod:", 1))
    out = subprocess.run([*cli, "-f", str(bad), "--project-directory", str(ROOT),
                          "-p", "safeurl", "config", "-q"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0


def test_compose_worker_is_scalable_and_wired() -> None:
    c = compose()
    w = c["services"]["worker"]
    assert "container_name" not in w
    assert "ports" not in w, "a fixed host port would break --scale worker=N"
    env = w["environment"]
    assert "WORKER_ID" not in env, "WORKER_ID must default to <hostname>-<pid> per replica"
    assert env["FETCHER_NETWORK"] == c["networks"]["fetch"]["name"] == "safeurl-fetch"
    assert env["METRICS_PORT"] == "9400"
    assert "/var/run/docker.sock:/var/run/docker.sock" in w["volumes"]
    assert "group_add" not in w, "the entrypoint finds the socket's group; no DOCKER_GID"
    deps = w["depends_on"]
    assert deps["redis"]["condition"] == deps["postgres"]["condition"] == "service_healthy"
    assert deps["migrate"]["condition"] == "service_completed_successfully"
    assert deps["fetcher-image"]["condition"] == "service_completed_successfully"
    grace = float(w["stop_grace_period"].rstrip("s"))
    assert grace > float(env["SHUTDOWN_GRACE_S"]) >= shutdown_grace_default() - 0.001
    assert "healthz" in " ".join(w["healthcheck"]["test"])


def test_compose_fetch_network_is_separate_from_redis_and_postgres() -> None:
    c = compose()
    svc = c["services"]
    for name in ("redis", "postgres"):
        assert "fetch" not in svc[name]["networks"]
        assert "ports" not in svc[name], f"{name} must not be published on the host"
    assert "fetch" not in svc["worker"]["networks"], "the worker needs no fetch network"
    assert svc["fetcher-image"]["networks"] == ["fetch"]
    assert svc["fetcher-image"]["build"]["target"] == "fetcher"
    assert svc["migrate"]["command"] == ["migrate"]
    assert c["networks"]["backend"]["internal"] is True
    assert "--appendonly" in svc["redis"]["command"]
    fetch = c["networks"]["fetch"]
    opts = fetch["driver_opts"]
    # The firewall script and docs/sandbox.md name this bridge.
    assert opts["com.docker.network.bridge.name"] == "br-safeurl"
    assert opts["com.docker.network.bridge.enable_icc"] == "false"
    assert fetch["internal"] == "false", "fetchers need the internet; only tests make it internal"
    assert "br-safeurl" in FIREWALL.read_text()
    for name in ("redis", "postgres", "prometheus"):
        assert "healthcheck" in svc[name]


def test_compose_images_are_variables_with_public_defaults() -> None:
    raw = yaml.safe_load(COMPOSE.read_text())["services"]
    for service, var in (("redis", "REDIS_IMAGE"), ("postgres", "POSTGRES_IMAGE"),
                         ("prometheus", "PROMETHEUS_IMAGE"), ("worker", "WORKER_IMAGE"),
                         ("migrate", "WORKER_IMAGE"), ("fetcher-image", "FETCHER_IMAGE")):
        assert raw[service]["image"].startswith("${" + var + ":-"), service
    for service in ("worker", "migrate", "fetcher-image"):
        build = raw[service]["build"]
        assert build["dockerfile"] == "Containerfile" and build["context"] == "."
        assert set(build["args"]) == {"BASE_IMAGE", "WHEELHOUSE", "PIP_OFFLINE", "VERSION",
                                      "REVISION", "CREATED"}


def test_compose_worker_gets_the_socket_group_and_drops_root() -> None:
    """Starts as root with SETUID/SETGID only; the entrypoint adds the socket's group and drops
    to 10001 (run for real in tests/test_compose.py)."""
    w = compose()["services"]["worker"]
    assert w["user"] == "0:0"
    assert w["cap_drop"] == ["ALL"] and sorted(w["cap_add"]) == ["SETGID", "SETUID"]
    assert "no-new-privileges:true" in w["security_opt"] and w["read_only"] is True
    entry = (ROOT / "deploy" / "images" / "worker-entrypoint.sh").read_text()
    assert 'stat -c %g "$socket"' in entry
    assert "setpriv --reuid=10001 --regid=10001" in entry
    assert "init" not in w, "tini is the image's PID 1"
    text = (ROOT / "Containerfile").read_text()
    assert 'ENTRYPOINT ["tini", "--", "safeurl-entrypoint"]' in text


def test_prometheus_compose_scrapes_every_worker_replica() -> None:
    cfg = yaml.safe_load(PROM.read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "safeurl-worker"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["worker"] and sd["port"] == 9400 and sd["type"] == "A"
    prom = compose()["services"]["prometheus"]
    assert any("prometheus-compose.yml" in a for a in prom["command"])
    assert set(prom["networks"]) & set(compose()["services"]["worker"]["networks"])


# --------------------------------------------------------------------------- kubernetes

def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files
    assert kust["namespace"] == "safeurl"


def test_core_manifests_match_kubernetes_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate",
                             reason="kubernetes-validate missing: pip install -e '.[dev]'")
    checked = 0
    for path, doc in k8s_docs():
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{path.name} {doc['kind']}: {exc}")
        checked += 1
    assert checked >= 8


def test_schema_validator_catches_a_bad_field() -> None:
    kv = pytest.importorskip("kubernetes_validate",
                             reason="kubernetes-validate missing: pip install -e '.[dev]'")
    dep = json.loads(json.dumps(deployment()))
    dep["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, K8S_VERSION, strict=True)


_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"},
                                                                  "labels": _STR_MAP}}
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "ScaledObject": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"metadata": _META, "spec": {
            "type": "object", "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"],
                                   "properties": {"name": {"type": "string"}}},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"],
                    "properties": {"type": {"type": "string"},
                                   "metadata": _STR_MAP,  # KEDA metadata values are strings
                                   "authenticationRef": {"type": "object",
                                                         "required": ["name"]}}}}}}}},
    "TriggerAuthentication": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"metadata": _META, "spec": {
            "type": "object", "properties": {"secretTargetRef": {
                "type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["parameter", "name", "key"],
                    "additionalProperties": False,
                    "properties": {k: {"type": "string"}
                                   for k in ("parameter", "name", "key")}}}}}}},
    "PodMonitor": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"metadata": _META, "spec": {
            "type": "object", "required": ["selector", "podMetricsEndpoints"],
            "properties": {"selector": {"type": "object"}, "podMetricsEndpoints": {
                "type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["port"],
                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                   "interval": {"type": "string",
                                                "pattern": "^[0-9]+(ms|s|m|h)$"}}}}}}}},
}


def test_crd_manifests_match_their_schemas() -> None:
    seen = set()
    for path, doc in k8s_docs():
        key = (doc["apiVersion"], doc["kind"])
        if key not in CRD_KINDS:
            continue
        try:
            jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
        except jsonschema.ValidationError as exc:
            pytest.fail(f"{path.name} {doc['kind']}: {exc.message}")
        seen.add(key)
    assert seen == CRD_KINDS


def test_keda_scales_on_the_backlog_and_on_the_running_scans() -> None:
    (so,) = k8s_kind("ScaledObject")
    triggers = so["spec"]["triggers"]
    (cm,) = k8s_kind("ConfigMap")
    streams = [lane_stream(cm["data"]["SCAN_STREAM"], lane)
               for lane in parse_lanes(cm["data"]["LANES"])]
    redis_triggers = [t for t in triggers if t["type"] == "redis-streams"]
    # Each lane: a trigger on its backlog and one on its running scans.
    lag = {t["metadata"]["stream"]: t["metadata"] for t in redis_triggers
           if "lagCount" in t["metadata"]}
    pending = {t["metadata"]["stream"]: t["metadata"] for t in redis_triggers
               if "pendingEntriesCount" in t["metadata"]}
    assert sorted(lag) == sorted(pending) == sorted(streams)
    assert len(redis_triggers) == 2 * len(streams)
    for md in lag.values():
        assert md["consumerGroup"] == cm["data"].get("SCAN_GROUP", "scan-workers")
        assert int(md["lagCount"]) >= 1 and int(md["activationLagCount"]) >= 0
        assert "pendingEntriesCount" not in md
    # Running work keeps its pods: one replica per WORKER_CONCURRENCY pending entries.
    for md in pending.values():
        assert int(md["pendingEntriesCount"]) == int(cm["data"]["WORKER_CONCURRENCY"])
        assert "lagCount" not in md and "streamLength" not in md
    # Tenant queues cannot be listed: the workers' own stream-wide gauges, max per stream
    # (every replica reports the same value), summed over all queues.
    prom = {t["metadata"]["query"]: t["metadata"] for t in triggers if t["type"] == "prometheus"}
    assert set(prom) == {f"sum(max by (stream) ({m}))"
                         for m in ("safeurl_stream_lag", "safeurl_stream_pending")}
    assert int(prom["sum(max by (stream) (safeurl_stream_pending))"]["threshold"]) == \
        int(cm["data"]["WORKER_CONCURRENCY"])
    assert 1 <= so["spec"]["minReplicaCount"] < so["spec"]["maxReplicaCount"]
    assert so["spec"]["scaleTargetRef"]["name"] == deployment()["metadata"]["name"]
    (ta,) = k8s_kind("TriggerAuthentication")
    assert {t["authenticationRef"]["name"] for t in redis_triggers} == {ta["metadata"]["name"]}
    (ref,) = ta["spec"]["secretTargetRef"]
    (secret,) = k8s_kind("Secret")
    assert ref["parameter"] == "password" and ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]


def _service_namespace(host: str) -> str:
    """`name.namespace.svc[.cluster.local]` -> namespace."""
    parts = host.split(".")
    assert len(parts) >= 3 and parts[2] == "svc", f"not a cluster service name: {host}"
    return parts[1]


def test_the_cluster_manifests_agree_with_each_other() -> None:
    """The relations a reading of the files found broken: where Redis and PostgreSQL live, who
    may reach them, where KEDA finds Redis, and whether scale-in lets a scan finish."""
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    workers_ns = kust["namespace"]
    (ns,) = k8s_kind("Namespace")
    assert ns["metadata"]["name"] == workers_ns
    (cm,) = k8s_kind("ConfigMap")
    (secret,) = k8s_kind("Secret")
    redis_ns = _service_namespace(cm["data"]["REDIS_HOST"])
    pg_host = urllib.parse.urlsplit(secret["stringData"]["DATABASE_URL"]).hostname or ""
    pg_ns = _service_namespace(pg_host)
    # "Keep nothing else in it": the data services are not in the workers' namespace...
    assert workers_ns not in {redis_ns, pg_ns}
    # ...and the egress policy admits them in the namespace they are in (a bare podSelector
    # would only match pods of the policy's own namespace).
    (np,) = k8s_kind("NetworkPolicy")
    peers = {}
    for rule in np["spec"]["egress"]:
        for peer in rule["to"]:
            app = peer.get("podSelector", {}).get("matchLabels", {}).get(
                "app.kubernetes.io/name")
            ns_name = peer.get("namespaceSelector", {}).get("matchLabels", {}).get(
                "kubernetes.io/metadata.name")
            peers[app] = (ns_name, [p["port"] for p in rule["ports"]])
    assert peers["redis"] == (redis_ns, [int(cm["data"]["REDIS_PORT"])])
    assert peers["postgres"] == (pg_ns, [urllib.parse.urlsplit(
        secret["stringData"]["DATABASE_URL"]).port or 5432])
    # KEDA reads the Redis address and TLS choice from the worker's own environment: one place.
    (so,) = k8s_kind("ScaledObject")
    env_from = {e["configMapRef"]["name"] for e in _worker()["envFrom"] if "configMapRef" in e}
    assert cm["metadata"]["name"] in env_from
    for trig in so["spec"]["triggers"]:
        md = trig["metadata"]
        if trig["type"] != "redis-streams":
            continue
        assert "address" not in md and "host" not in md, "the Redis address is in the configmap"
        assert md["hostFromEnv"] == "REDIS_HOST" and md["portFromEnv"] == "REDIS_PORT"
        assert md["enableTLS"] == cm["data"]["REDIS_TLS"]
    # Scale-in and drains let a scan finish: grace > shutdown grace > the longest scan.
    pod = deployment()["spec"]["template"]["spec"]
    longest_scan_s = int(cm["data"]["CONTAINER_TIMEOUT_MS"]) / 1000
    assert pod["terminationGracePeriodSeconds"] > float(cm["data"]["SHUTDOWN_GRACE_S"]) \
        > longest_scan_s


def _worker() -> dict[str, Any]:
    (worker,) = [c for c in deployment()["spec"]["template"]["spec"]["containers"]
                 if c["name"] == "worker"]
    return worker


def test_deployment_probes_grace_and_security() -> None:
    dep = deployment()
    pod = dep["spec"]["template"]["spec"]
    assert "replicas" not in dep["spec"], "KEDA owns the replica count"
    (cm,) = k8s_kind("ConfigMap")
    grace_env = float(cm["data"]["SHUTDOWN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > max(grace_env, shutdown_grace_default())
    (worker,) = [c for c in pod["containers"] if c["name"] == "worker"]
    assert worker["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert worker["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert worker["ports"][0]["containerPort"] == int(cm["data"]["METRICS_PORT"]) == 9400
    for c in [*pod["containers"], *pod["initContainers"]]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert {"requests", "limits"} <= set(c["resources"])
    assert worker["securityContext"]["runAsNonRoot"] is True
    # Only the proxy sees the node's socket; the worker talks to the proxy's socket.
    host = {v["name"] for v in pod["volumes"] if "hostPath" in v}
    for c in [*pod["containers"], *pod["initContainers"]]:
        mounts = {m["name"] for m in c.get("volumeMounts", [])}
        if c["name"] == "docker-proxy":
            assert c["restartPolicy"] == "Always"  # native sidecar: outlives the worker's drain
            (m,) = [m for m in c["volumeMounts"] if m["name"] in host]
            assert m["readOnly"] is True
        else:
            assert not mounts & host, f"{c['name']} must not mount the node's Docker socket"
    (proxy,) = [c for c in pod["initContainers"] if c["name"] == "docker-proxy"]
    endpoint = next(a.split("=", 1)[1] for a in proxy["args"]
                    if a.startswith("-proxysocketendpoint="))
    assert cm["data"]["DOCKER_SOCKET_PATH"] == endpoint
    assert "WORKER_ID" not in cm["data"]


def test_socket_proxy_allowlist_admits_only_what_the_runner_needs() -> None:
    (proxy,) = [c for c in deployment()["spec"]["template"]["spec"]["initContainers"]
                if c["name"] == "docker-proxy"]
    rules = {}
    for a in proxy["args"]:
        m = re.match(r"-allow(GET|HEAD|POST|DELETE|PUT|PATCH)=(.*)", a)
        if m:
            rules[m.group(1)] = re.compile("^" + m.group(2) + "$")  # as the proxy compiles it
    cid = uuid.uuid4().hex
    allowed = [("GET", "/version"), ("GET", "/_ping"), ("HEAD", "/_ping"),
               ("GET", "/v1.41/containers/json"), ("POST", "/v1.41/containers/create"),
               ("POST", f"/v1.41/containers/{cid}/start"),
               ("POST", f"/v1.41/containers/{cid}/wait"),
               ("POST", f"/v1.41/containers/{cid}/kill"), ("GET", f"/v1.41/containers/{cid}/logs"),
               ("GET", f"/v1.41/containers/{cid}/json"), ("DELETE", f"/v1.41/containers/{cid}"),
               ("GET", "/v1.41/images/safeurl-fetcher:latest/json"),
               # the stdin form (attach, rename, `die` events) and the FETCHER_NETWORK check
               ("POST", f"/v1.41/containers/{cid}/attach"),
               ("POST", f"/v1.41/containers/{cid}/rename"), ("GET", "/v1.41/events"),
               ("GET", "/v1.41/networks/safeurl-fetch")]
    denied = [("POST", f"/v1.41/containers/{cid}/exec"), ("POST", "/v1.41/exec/abc/start"),
              ("POST", "/v1.41/images/create"), ("POST", "/v1.41/build"),
              ("POST", "/v1.41/volumes/create"), ("POST", "/v1.41/networks/create"),
              ("GET", "/v1.41/info"), ("DELETE", "/v1.41/images/safeurl-fetcher:latest"),
              ("POST", f"/v1.41/containers/{cid}/archive"),
              ("PUT", f"/v1.41/containers/{cid}/archive"),
              ("POST", "/v1.41/swarm/init"), ("GET", f"/v1.41/containers/{cid}/export"),
              ("DELETE", "/v1.41/networks/safeurl-fetch"), ("GET", "/v1.41/networks"),
              ("POST", "/v1.41/networks/safeurl-fetch/connect")]
    for method, path in allowed:
        assert method in rules and rules[method].match(path), (method, path)
    for method, path in denied:
        assert not (method in rules and rules[method].match(path)), (method, path)


def test_networkpolicy_limits_ingress_and_egress() -> None:
    (np,) = k8s_kind("NetworkPolicy")
    spec = np["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    (ing,) = spec["ingress"]
    assert [p["port"] for p in ing["ports"]] == [9400]
    ports = sorted({p["port"] for rule in spec["egress"] for p in rule["ports"]})
    assert ports == [53, 5432, 6379]


def test_env_names_are_real_settings() -> None:
    names = settings_env_names()
    assert {"REDIS_HOST", "DATABASE_URL", "SHUTDOWN_GRACE_S"} <= names
    used: dict[str, set[str]] = {}
    (cm,) = k8s_kind("ConfigMap")
    used["configmap.yaml"] = set(cm["data"])
    (secret,) = k8s_kind("Secret")
    used["secret.yaml"] = set(secret["stringData"])
    svc = compose()["services"]
    for name in ("worker", "migrate"):
        used[f"compose {name}"] = set(svc[name]["environment"])
    for where, env in used.items():
        unknown = env - names
        assert not unknown, f"{where}: not Settings fields: {sorted(unknown)}"
    pod = deployment()["spec"]["template"]["spec"]
    for c in [*pod["containers"], *pod["initContainers"]]:
        for e in c.get("env", []):
            assert e["name"] in names, f"{c['name']}: {e['name']}"


def test_secret_values_are_placeholders() -> None:
    (secret,) = k8s_kind("Secret")
    for key, value in secret["stringData"].items():
        assert "REPLACE-ME" in value, f"{key} looks like a real secret"


# --------------------------------------------------------------------------- firewall

def test_firewall_script_prints_the_rules() -> None:
    out = subprocess.run(["bash", str(FIREWALL), "print"], capture_output=True, text=True,
                         timeout=20, env={**os.environ, "SAFEURL_FETCH_IPV6": "1"})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "fc00::/7"):
        assert f"-d {net} -j DROP" in text
    assert "-I DOCKER-USER 1 -i br-safeurl -j SAFEURL-FETCH" in text
    assert "-I INPUT 1 -i br-safeurl -j DROP" in text


def test_firewall_script_applies_in_a_scratch_network_namespace() -> None:
    """Really runs iptables, inside a network namespace made for the test (the host's rules are
    never touched); apply twice (idempotent), then remove."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("iptables"):
        pytest.skip("needs root, iproute2 and iptables (scripts/services.sh installs iptables)")
    ns = f"safeurl-fw-{uuid.uuid4().hex[:8]}"
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    try:
        def in_ns(*args: str) -> str:
            out = subprocess.run(["ip", "netns", "exec", ns, *args], capture_output=True,
                                 text=True, timeout=30,
                                 env={**os.environ, "SAFEURL_FETCH_IPV6": "0"})
            assert out.returncode == 0, out.stderr
            return out.stdout
        in_ns("bash", str(FIREWALL), "apply")
        in_ns("bash", str(FIREWALL), "apply")
        rules = in_ns("iptables", "-S")
        assert rules.count("-A DOCKER-USER -i br-safeurl -j SAFEURL-FETCH") == 1
        assert rules.count("-A INPUT -i br-safeurl -j DROP") == 1
        assert "-A SAFEURL-FETCH -d 169.254.0.0/16 -j DROP" in rules
        in_ns("bash", str(FIREWALL), "remove")
        assert "SAFEURL-FETCH" not in in_ns("iptables", "-S")
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# --------------------------------------------------------------------------- seccomp

# The one source: the package ships it (FETCHER_SECCOMP_PROFILE unset means this file); deploy/
# links to it for `docker run --security-opt seccomp=...` and the Containerfile.
SECCOMP = ROOT / "safeurl_worker" / "data" / "seccomp-default.json"
DEPLOY_SECCOMP = ROOT / "deploy" / "seccomp" / "default.json"


def test_seccomp_profile_has_one_source_shipped_in_the_package() -> None:
    assert DEPLOY_SECCOMP.is_symlink() and DEPLOY_SECCOMP.resolve() == SECCOMP.resolve()
    assert not SECCOMP.is_symlink()  # a real file, so the wheel carries its bytes
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["safeurl_worker"]
    assert any(fnmatch.fnmatch("data/seccomp-default.json", g) for g in package_data)


def test_seccomp_profile_is_the_pinned_engine_default() -> None:
    """The file is the one deploy/seccomp/README.md names (checksum), and a whitelist."""
    digest = hashlib.sha256(SECCOMP.read_bytes()).hexdigest()
    assert digest in (DEPLOY_SECCOMP.parent / "README.md").read_text()
    profile = json.loads(SECCOMP.read_text())
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    allowed = {n for rule in profile["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW"
               for n in rule["names"]}
    assert {"read", "write", "connect", "execve"} <= allowed
    # Reachable only with capabilities the sandbox drops (CAP_SYS_ADMIN, ...), never by default.
    unconditional = {n for rule in profile["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW"
                     and not rule.get("includes") and not rule.get("excludes")
                     for n in rule["names"]}
    assert not {"mount", "unshare", "setns", "bpf", "ptrace", "kexec_load"} & unconditional
    assert "/etc/safeurl/seccomp/default.json" in (ROOT / "Containerfile").read_text()


@pytest.mark.integration
def test_seccomp_profile_is_enforced_by_this_engine() -> None:
    """Docker accepts the pinned profile, and under it a sandbox-like container cannot make a
    user namespace, which it can with no profile at all: the filter is really applied."""
    image = os.environ.get("FETCHER_IMAGE", "safeurl-fetcher:latest")
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True,
                      timeout=30).returncode != 0:
        pytest.skip(f"{image} not built (scripts/build-images.sh)")
    code = ("import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); "
            "r = libc.unshare(0x10000000); print(r, os.strerror(ctypes.get_errno()))")

    def unshare(profile: str) -> str:
        out = subprocess.run(
            ["docker", "run", "--rm", "--network", "none", "--cap-drop", "ALL",
             "--security-opt", "no-new-privileges", "--security-opt", f"seccomp={profile}",
             "--entrypoint", "python3", image, "-c", code],
            capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert unshare(str(SECCOMP)).startswith("-1 ")
    unconfined = unshare("unconfined")
    if not unconfined.startswith("0 "):
        pytest.skip(f"user namespaces are off on this kernel ({unconfined}): nothing to compare")


def test_local_scripts_make_the_same_isolated_fetch_network() -> None:
    """scripts/services.sh creates safeurl-fetch with compose.yaml's options (so Compose reuses
    it) and applies the firewall to its bridge."""
    script = (ROOT / "scripts" / "services.sh").read_text()
    fetch = compose()["networks"]["fetch"]
    assert f"network create --driver {fetch['driver']}" in script
    for key, value in fetch["driver_opts"].items():
        assert f"--opt {key}={value}" in script, key
    assert f" {fetch['name']} >/dev/null" in script
    assert "deploy/firewall/docker-user.sh\" apply" in script
    assert re.search(r"^\s*all\) .*fetch_network", script, re.M)
