"""Kubernetes manifests: schema validation, Operator CRDs, and the wiring between objects."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_support import DEFAULT_PORT, DEPLOY

K8S = DEPLOY / "kubernetes"
MANIFESTS = sorted(K8S.rglob("*.yaml"))
# Native sidecars (init container with restartPolicy: Always) need 1.29; check the latest too.
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
OPERATOR_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def _all() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in MANIFESTS for doc in _docs(path)]


def _find(kind: str, folder: str | None = None) -> list[dict]:
    return [doc for path, doc in _all()
            if doc["kind"] == kind and (folder is None or path.parent.name == folder)]


# --- Prometheus Operator CRDs --------------------------------------------------------------
# kubernetes-validate ships only the built-in API schemas. These are hand-written subsets of
# the monitoring.coreos.com/v1 CRDs (field names and types from the Operator's API reference):
# unknown fields are rejected where we use them, so a typo cannot slip through.

_DURATION = {"type": "string",
             "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                        r"(([0-9]+)s)?(([0-9]+)ms)?)$"}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": _LABELS,
    "matchExpressions": {"type": "array", "items": {
        "type": "object", "required": ["key", "operator"], "additionalProperties": False,
        "properties": {"key": {"type": "string"},
                       "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                       "values": {"type": "array", "items": {"type": "string"}}}}}}}
_RELABEL = {"type": "array", "items": {"type": "object", "additionalProperties": False,
    "properties": {
        "sourceLabels": {"type": "array",
                         "items": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}},
        "separator": {"type": "string"}, "targetLabel": {"type": "string"},
        "regex": {"type": "string"}, "modulus": {"type": "integer"},
        "replacement": {"type": "string"},
        "action": {"enum": ["replace", "keep", "drop", "hashmod", "labelmap", "labeldrop",
                            "labelkeep", "lowercase", "uppercase", "keepequal", "dropequal"]}}}}
_ENDPOINT_COMMON = {
    "port": {"type": "string"}, "path": {"type": "string"},
    "scheme": {"enum": ["http", "https"]}, "interval": _DURATION, "scrapeTimeout": _DURATION,
    "honorLabels": {"type": "boolean"}, "relabelings": _RELABEL,
    "metricRelabelings": _RELABEL}
_META = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
    "labels": _LABELS, "annotations": _LABELS, "namespace": {"type": "string"}}}


def _crd(kind: str, spec: dict) -> dict:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
            "additionalProperties": False,
            "properties": {"apiVersion": {"const": "monitoring.coreos.com/v1"},
                           "kind": {"const": kind}, "metadata": _META, "spec": spec}}


CRD_SCHEMAS = {
    "PodMonitor": _crd("PodMonitor", {
        "type": "object", "required": ["selector", "podMetricsEndpoints"],
        "additionalProperties": False,
        "properties": {
            "selector": _SELECTOR, "jobLabel": {"type": "string"},
            "namespaceSelector": {"type": "object"},
            "podTargetLabels": {"type": "array", "items": {"type": "string"}},
            "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False,
                "properties": {**_ENDPOINT_COMMON, "portNumber": {"type": "integer"}}}}}}),
    "ServiceMonitor": _crd("ServiceMonitor", {
        "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
        "properties": {
            "selector": _SELECTOR, "jobLabel": {"type": "string"},
            "namespaceSelector": {"type": "object"},
            "targetLabels": {"type": "array", "items": {"type": "string"}},
            "endpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False,
                "properties": {**_ENDPOINT_COMMON, "targetPort": {}}}}}}),
    "PrometheusRule": _crd("PrometheusRule", {
        "type": "object", "required": ["groups"], "additionalProperties": False,
        "properties": {"groups": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "rules"], "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "minLength": 1}, "interval": _DURATION,
                "rules": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["expr"], "additionalProperties": False,
                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                    "properties": {
                        "alert": {"type": "string"}, "record": {"type": "string"},
                        "expr": {"type": ["string", "integer"]}, "for": _DURATION,
                        "keep_firing_for": _DURATION, "labels": _LABELS,
                        "annotations": _LABELS}}}}}}}}),
}


def validate_manifest(doc: dict, version: str) -> None:
    """Raise if ``doc`` is not a valid object (built-in schema or our CRD subset)."""
    if doc["kind"] in OPERATOR_KINDS:
        jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
    else:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_is_valid(path, version):
    docs = _docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), path
        validate_manifest(doc, version)


def test_validation_is_strict():
    """Negative controls: a misspelt field fails for built-in kinds and for CRDs alike."""
    deployment = copy.deepcopy(_find("StatefulSet")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFilesytem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_manifest(deployment, VERSIONS[-1])
    monitor = copy.deepcopy(_find("PodMonitor")[0])
    monitor["spec"]["podMetricsEndpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(monitor, VERSIONS[-1])
    rule = copy.deepcopy(_find("PrometheusRule")[0])
    rule["spec"]["groups"][0]["rules"][0]["for"] = "10 minutes"
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(rule, VERSIONS[-1])


def test_every_kind_in_the_tree_is_checked():
    kinds = {doc["kind"] for _, doc in _all()}
    assert {"Job", "StatefulSet", "Service", "ConfigMap", "PersistentVolumeClaim"} <= kinds
    assert kinds >= OPERATOR_KINDS


# --- wiring --------------------------------------------------------------------------------

def _pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def _exporter(pod: dict) -> dict:
    containers = pod.get("containers", []) + pod.get("initContainers", [])
    return next(c for c in containers if c["name"] == "bnexporter")


def _workloads() -> list[tuple[str, dict]]:
    return [("sidecar", _find("Job", "sidecar")[0]), ("central", _find("StatefulSet")[0])]


def _config(folder: str) -> dict:
    cm = _find("ConfigMap", folder)[0]
    return yaml.safe_load(cm["data"]["config.yaml"])


@pytest.mark.parametrize(("folder", "workload"), _workloads(), ids=["sidecar", "central"])
def test_exporter_container_is_locked_down(folder, workload):
    pod = _pod_spec(workload)
    c = _exporter(pod)
    sc = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["/checkpoints"]["readOnly"] is True
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]          # the only writable path
    assert volumes[mounts["/etc/bnexporter"]["name"]]["configMap"]["name"] == \
        _find("ConfigMap", folder)[0]["metadata"]["name"]
    assert c["args"][:3] == ["run", "--config", "/etc/bnexporter/config.yaml"]


@pytest.mark.parametrize(("folder", "workload"), _workloads(), ids=["sidecar", "central"])
def test_probes_and_port_match_the_config(folder, workload):
    c = _exporter(_pod_spec(workload))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": DEFAULT_PORT}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, probe
    config = _config(folder)
    host, _, port = config["listen"].rpartition(":")
    assert (host, int(port)) == ("0.0.0.0", DEFAULT_PORT)
    for model in config["models"]:
        assert model["path"].startswith("/checkpoints"), model


@pytest.mark.parametrize(("folder", "workload"), _workloads(), ids=["sidecar", "central"])
def test_resources_are_bounded(folder, workload):
    res = _exporter(_pod_spec(workload))["resources"]
    assert set(res) == {"requests", "limits"}

    def cpu(v: str) -> float:
        return float(v[:-1]) / 1000 if v.endswith("m") else float(v)

    def mem(v: str) -> int:
        m = re.fullmatch(r"(\d+)(Mi|Gi)", v)
        assert m, v
        return int(m[1]) * (1024 if m[2] == "Gi" else 1)

    assert cpu(res["requests"]["cpu"]) <= cpu(res["limits"]["cpu"]) <= 1
    assert mem(res["requests"]["memory"]) <= mem(res["limits"]["memory"]) <= 1024


def test_sidecar_is_a_native_sidecar_and_is_scraped():
    job = _find("Job", "sidecar")[0]
    pod = _pod_spec(job)
    assert _exporter(pod)["restartPolicy"] == "Always"           # does not block Job completion
    trainer = pod["containers"][0]
    assert {m["name"] for m in trainer["volumeMounts"]} & \
        {m["name"] for m in _exporter(pod)["volumeMounts"]} == {"checkpoints"}
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(DEFAULT_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"
    monitor = _find("PodMonitor", "sidecar")[0]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_central_service_and_servicemonitor_select_the_statefulset():
    sts = _find("StatefulSet")[0]
    service = _find("Service")[0]
    monitor = _find("ServiceMonitor")[0]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"     # one scrape endpoint per shard
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        service["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]


def test_central_shards_match_the_replica_count():
    """--shard $(POD_INDEX)/N: N must equal replicas, and POD_INDEX must be the pod's index."""
    sts = _find("StatefulSet")[0]
    c = _exporter(_pod_spec(sts))
    shard = c["args"][c["args"].index("--shard") + 1]
    index, _, count = shard.partition("/")
    assert index == "$(POD_INDEX)" and int(count) == sts["spec"]["replicas"]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['apps.kubernetes.io/pod-index']"
    assert "fsGroup" not in _pod_spec(sts)["securityContext"]   # no chown of the shared volume


def test_central_polls_a_shared_volume_one_folder_per_job():
    config = _config("central")
    assert config["watch"] == "poll"
    assert [m["path"] for m in config["models"]] == ["/checkpoints/{model}"]
    pvc = _find("PersistentVolumeClaim")[0]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = {v["name"]: v for v in _pod_spec(_find("StatefulSet")[0])["volumes"]}
    claim = volumes["checkpoints"]["persistentVolumeClaim"]
    assert claim == {"claimName": pvc["metadata"]["name"], "readOnly": True}
