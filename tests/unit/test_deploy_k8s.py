"""The Kubernetes manifests of deploy/k8s: each overlay builds, every object validates, and the wiring holds.

- ``kubectl kustomize`` renders each overlay (and production with the optional ClearML component); skipped with the
  reason when kubectl is absent.
- Every built-in object validates against the Kubernetes schemas (``kubernetes-validate``, strict: unknown fields
  fail); the KEDA objects against a JSON schema written below from KEDA's documentation of ScaledObject,
  TriggerAuthentication and the ``nats-jetstream`` scaler (KEDA_VERSION).
- Each runner pool's ScaledObject reads its pool's durable (``kiln_contracts.streams.runner_consumer(pool)``) on
  KILN_JOBS; Deployments have probes, run as non-root, request resources; no Secret carries data; every Secret a
  manifest references is one make_secrets.py makes or one the operator gives; every KILN_* setting is a real one.
- The NATS side for real: make_secrets.py's trust.conf included the way the chart's values include it, the
  provisioning Job's script run with the provisioner creds it wrote, and /jsz answering what KEDA's scaler looks for.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kiln_contracts import streams

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "production")
K8S_VERSION = "1.32"  # the schemas kubernetes-validate checks against (the kubectl of CI is 1.32)
KEDA_VERSION = "2.17"  # keda.sh/docs/2.17: reference/scaledobject-spec, concepts/authentication, scalers/nats-jetstream
KEDA_KINDS = ("ScaledObject", "TriggerAuthentication")
WEB = ROOT / "services" / "api" / "src" / "kiln_api" / "web"

# -- KEDA's documented fields (KEDA 2.17); metadata values are strings (the CRD's map[string]string) --------------
_STR = {"type": "string"}
_INT = {"type": "integer", "minimum": 0}
_META = {"type": "object", "required": ["name"], "properties": {
    "name": _STR, "namespace": _STR,
    "labels": {"type": "object", "additionalProperties": _STR},
    "annotations": {"type": "object", "additionalProperties": _STR}}}
NATS_JETSTREAM_METADATA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["stream", "consumer"],  # the endpoint and the account may come from a TriggerAuthentication
    "properties": {
        "natsServerMonitoringEndpoint": {"type": "string", "pattern": r"^[A-Za-z0-9.-]+(:[0-9]+)?$"},
        "account": _STR,
        "accountID": _STR,
        "stream": {"type": "string", "minLength": 1},
        "consumer": {"type": "string", "minLength": 1},
        "lagThreshold": {"type": "string", "pattern": "^[0-9]+$"},
        "activationLagThreshold": {"type": "string", "pattern": "^[0-9]+$"},
        "useHttps": {"enum": ["true", "false"]},
    },
}
NATS_JETSTREAM_AUTH_PARAMETERS = ("natsServerMonitoringEndpoint", "account")
SCALED_OBJECT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": f"KEDA {KEDA_VERSION} ScaledObject (keda.sh/v1alpha1), documented fields only",
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": _META,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                                   "properties": {"apiVersion": _STR, "kind": _STR, "name": _STR,
                                                  "envSourceContainerName": _STR}},
                "pollingInterval": _INT, "cooldownPeriod": _INT, "initialCooldownPeriod": _INT,
                "idleReplicaCount": _INT, "minReplicaCount": _INT, "maxReplicaCount": _INT,
                "fallback": {"type": "object", "additionalProperties": False,
                             "required": ["failureThreshold", "replicas"],
                             "properties": {"failureThreshold": _INT, "replicas": _INT,
                                            "behavior": {"enum": ["static", "currentReplicas",
                                                                  "currentReplicasIfHigher",
                                                                  "currentReplicasIfLower"]}}},
                "advanced": {"type": "object", "additionalProperties": False, "properties": {
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                    "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False,
                                                      "properties": {"name": _STR, "behavior": {"type": "object"}}},
                    "scalingModifiers": {"type": "object", "additionalProperties": False,
                                         "required": ["target", "formula"],
                                         "properties": {"target": _STR, "activationTarget": _STR,
                                                        "metricType": {"enum": ["AverageValue", "Value"]},
                                                        "formula": _STR}}}},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["type", "metadata"],
                    "properties": {
                        "type": _STR, "name": _STR, "useCachedMetrics": {"type": "boolean"},
                        "metadata": {"type": "object", "additionalProperties": _STR},
                        "authenticationRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                                              "properties": {"name": _STR, "kind": {
                                                  "enum": ["TriggerAuthentication",
                                                           "ClusterTriggerAuthentication"]}}},
                        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                    },
                    "if": {"properties": {"type": {"const": "nats-jetstream"}}},
                    "then": {"properties": {"metadata": NATS_JETSTREAM_METADATA}},
                }},
            },
        },
    },
}
_REF = {"type": "object", "additionalProperties": False, "required": ["parameter", "name", "key"],
        "properties": {"parameter": _STR, "name": _STR, "key": _STR}}
TRIGGER_AUTHENTICATION_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": f"KEDA {KEDA_VERSION} TriggerAuthentication (keda.sh/v1alpha1), documented fields only",
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "TriggerAuthentication"},
        "metadata": _META,
        "spec": {"type": "object", "additionalProperties": False, "minProperties": 1, "properties": {
            "podIdentity": {"type": "object"},
            "secretTargetRef": {"type": "array", "minItems": 1, "items": _REF},
            "env": {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                               "required": ["parameter", "name"],
                                               "properties": {"parameter": _STR, "name": _STR,
                                                              "containerName": _STR}}},
            "hashiCorpVault": {"type": "object"}, "azureKeyVault": {"type": "object"},
            "awsSecretManager": {"type": "object"}, "gcpSecretManager": {"type": "object"},
        }},
    },
}


# -- rendering ---------------------------------------------------------------------------------------------------
def kustomize(folder: Path, *extra: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the overlays cannot be rendered here (CI has it)")
    done = subprocess.run([kubectl, "kustomize", str(folder), *extra], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {folder}: {done.stderr}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    out = {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}
    # the optional ClearML component in production, where docs/deploy.md says to add it (before nats-tls)
    copy = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, copy)
    prod = copy / "overlays" / "production" / "kustomization.yaml"
    text = prod.read_text()
    assert "components:\n  - ../../components/nats-tls\n" in text
    prod.write_text(text.replace("components:\n", "components:\n  - ../../components/clearml-forwarder\n"))
    out["production+clearml"] = kustomize(copy / "overlays" / "production")
    return out


def each(rendered: dict[str, list[dict[str, Any]]], kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(name, o) for name, objs in rendered.items() for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_specs(rendered: dict[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [(name, o, o["spec"]["template"]["spec"]) for name, objs in rendered.items() for o in objs
            if o["kind"] in ("Deployment", "Job")]


def config_env(objs: list[dict[str, Any]], spec: dict[str, Any]) -> dict[str, str]:
    """What a pod's first container gets from its ConfigMaps and literal env values."""
    env: dict[str, str] = {}
    container = spec["containers"][0]
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= one(objs, "ConfigMap", source["configMapRef"]["name"])["data"]
    env |= {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return env


def _load(path: Path):  # noqa: ANN202 - a module loaded from a file
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


# -- tests -------------------------------------------------------------------------------------------------------
def test_each_overlay_builds(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, objs in rendered.items():
        kinds = {o["kind"] for o in objs}
        assert {"Deployment", "Service", "ConfigMap", "Job", "ScaledObject", "NetworkPolicy"} <= kinds, name
        assert all(o["metadata"].get("namespace") == "kiln" for o in objs if o["kind"] != "Namespace"), name
        names = [(o["kind"], o["metadata"]["name"]) for o in objs]
        assert len(names) == len(set(names)), name
    # every overlay points the placeholder image names at real images (base names them kiln-services, kiln-runner)
    for name, objs in rendered.items():
        images = {c["image"] for _, _, spec in pod_specs({name: objs}) for c in spec["containers"]}
        assert all("/" in i and ":" in i for i in images), (name, images)
    prod = {c["image"] for _, _, spec in pod_specs({"production": rendered["production"]}) for c in spec["containers"]}
    assert any(i.endswith("-cuda") for i in prod) and not any(i.startswith("localhost/") for i in prod), prod
    assert {o["metadata"]["name"] for _, o in each(rendered, "PodDisruptionBudget")} >= {
        "kiln-api", "kiln-notifier", "kiln-metrics-writer"}
    for _, pdb in each(rendered, "PodDisruptionBudget"):
        assert any(o["kind"] == "Deployment" and o["spec"]["selector"]["matchLabels"].items()
                   <= pdb["spec"]["selector"]["matchLabels"].items() for o in rendered["production"])


def test_every_object_validates_against_the_kubernetes_schemas(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (requirements-dev.txt)")
    checked = 0
    for name, objs in rendered.items():
        for obj in objs:
            if obj["kind"] in KEDA_KINDS:
                continue
            try:
                kv.validate(obj, K8S_VERSION, strict=True)
            except kv.ValidationError as exc:
                pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']}: {exc}")
            checked += 1
    assert checked > 40


def test_the_keda_objects_validate_against_the_documented_fields(
        rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    schemas = {"ScaledObject": SCALED_OBJECT_SCHEMA, "TriggerAuthentication": TRIGGER_AUTHENTICATION_SCHEMA}
    for kind, schema in schemas.items():  # written out, as a reviewer can read and diff them against the docs
        (tmp_path / f"keda-{KEDA_VERSION}-{kind}.schema.json").write_text(json.dumps(schema, indent=2))
        jsonschema.Draft202012Validator.check_schema(schema)
    for name, objs in rendered.items():
        found = [o for o in objs if o["kind"] in KEDA_KINDS]
        assert {o["kind"] for o in found} == set(KEDA_KINDS), name
        for obj in found:
            schema = json.loads((tmp_path / f"keda-{KEDA_VERSION}-{obj['kind']}.schema.json").read_text())
            errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                      for e in jsonschema.Draft202012Validator(schema).iter_errors(obj)]
            assert not errors, f"{name}: {obj['kind']}/{obj['metadata']['name']}: {errors}"
    # the schema is strict enough to catch what the CRD would refuse
    bad = json.loads(json.dumps(one(rendered["dev"], "ScaledObject", "kiln-runner-default")))
    bad["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 1  # not a string
    bad["spec"]["triggers"][0]["metadata"]["consumerName"] = "x"  # not a field of the scaler
    messages = [e.message for e in jsonschema.Draft202012Validator(SCALED_OBJECT_SCHEMA).iter_errors(bad)]
    assert any("not of type 'string'" in m for m in messages) and any("consumerName" in m for m in messages)


def test_each_runner_pool_scales_on_its_own_durable(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, objs in rendered.items():
        runners = [o for o in objs if o["kind"] == "Deployment"
                   and o["metadata"]["labels"].get("app.kubernetes.io/component") == "runner"]
        scaled = {o["spec"]["scaleTargetRef"]["name"]: o for o in objs if o["kind"] == "ScaledObject"}
        assert runners and set(scaled) == {r["metadata"]["name"] for r in runners}, name
        pools = set()
        for dep in runners:
            spec = dep["spec"]["template"]["spec"]
            pool = config_env(objs, spec)["KILN_RUNNER_POOL"]
            pools.add(pool)
            assert dep["metadata"]["labels"]["kiln/pool"] == pool
            assert dep["spec"]["template"]["metadata"]["labels"]["kiln/pool"] == pool
            assert "replicas" not in dep["spec"], f"{name}: KEDA owns the replicas of {dep['metadata']['name']}"
            so = scaled[dep["metadata"]["name"]]
            assert so["spec"].get("minReplicaCount") == 0, "scale to zero when the pool is idle"
            assert so["spec"]["maxReplicaCount"] >= 1
            (trigger,) = so["spec"]["triggers"]
            meta = trigger["metadata"]
            assert trigger["type"] == "nats-jetstream"
            assert meta["stream"] == streams.JOBS.name == "KILN_JOBS"
            assert meta["consumer"] == streams.runner_consumer(pool).durable_name, (name, pool)
            slots = int(config_env(objs, spec).get("KILN_RUNNER_SLOTS", "1"))
            assert int(meta["lagThreshold"]) == slots, "one queued start command per free slot of a runner"
            # the scaler's endpoint and account: in the metadata or from its TriggerAuthentication
            given = set(meta)
            if "authenticationRef" in trigger:
                ta = one(objs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
                params = [r["parameter"] for r in ta["spec"].get("secretTargetRef", [])]
                assert set(params) <= set(NATS_JETSTREAM_AUTH_PARAMETERS), params
                given |= set(params)
            assert {"natsServerMonitoringEndpoint", "account"} <= given, (name, given)
            # a drained runner finishes its jobs within the pod's grace period
            grace = float(config_env(objs, spec)["KILN_RUNNER_SHUTDOWN_GRACE_S"])
            assert spec["terminationGracePeriodSeconds"] >= grace + 20 + 5 + 10, (name, grace)
        provision = one(objs, "Job", "kiln-provision")["spec"]["template"]["spec"]
        assert set(config_env(objs, provision)["KILN_PROVISION_POOLS"].split(",")) == pools, name


def test_production_runners_ask_for_a_gpu(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for dep in rendered["production"]:
        if dep["kind"] == "Deployment" and dep["metadata"]["labels"].get("app.kubernetes.io/component") == "runner":
            resources = dep["spec"]["template"]["spec"]["containers"][0]["resources"]
            assert int(resources["requests"]["nvidia.com/gpu"]) == int(resources["limits"]["nvidia.com/gpu"]) >= 1
            env = config_env(rendered["production"], dep["spec"]["template"]["spec"])
            assert len(json.loads(env["KILN_RUNNER_GPUS"])) == int(env["KILN_RUNNER_SLOTS"])
    for name in ("kiln-api", "kiln-notifier", "kiln-metrics-writer"):
        assert one(rendered["production"], "Deployment", name)["spec"]["replicas"] == 2
        assert one(rendered["dev"], "Deployment", name)["spec"]["replicas"] == 1


def test_every_workload_has_probes_runs_as_non_root_and_requests_resources(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    seen = set()
    for name, obj, spec in pod_specs(rendered):
        where = f"{name}: {obj['kind']}/{obj['metadata']['name']}"
        seen.add(obj["metadata"]["name"])
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) > 0, where
        assert spec.get("automountServiceAccountToken") is False, where
        # a Service named kiln-api would otherwise inject KILN_API_PORT=tcp://..., which the API reads as its port
        assert spec.get("enableServiceLinks") is False, where
        for c in spec["containers"]:
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False and sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert {"cpu", "memory"} <= set(c.get("resources", {}).get("requests", {})), where
            assert "memory" in c["resources"].get("limits", {}), where
            if obj["kind"] == "Deployment":
                ports = {p["name"] for p in c.get("ports", [])}
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    assert probe in c, f"{where}: no {probe}"
                    assert c[probe]["httpGet"]["port"] in ports, f"{where}: {probe} on an unknown port"
                assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", where
                assert c["livenessProbe"]["httpGet"]["path"] == "/livez", where
    assert {"kiln-api", "kiln-notifier", "kiln-metrics-writer", "kiln-runner-default", "kiln-clearml-forwarder",
            "kiln-migrate", "kiln-provision"} <= seen


def test_no_secret_carries_data_and_every_referenced_secret_is_made(
        rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    tool = _load(K8S / "tools" / "make_secrets.py")
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    made = tool.make(tmp_path / "secrets", ("default",), ca)
    keys = {name: set(files) for (kind, name), files in made.items() if kind == "Secret"}
    for name, objs in rendered.items():
        for obj in objs:
            if obj["kind"] == "Secret":
                assert not obj.get("data") and not obj.get("stringData"), f"{name}: Secret {obj['metadata']['name']}"
        refs: set[tuple[str, str | None]] = set()
        for _, obj, spec in pod_specs({name: objs}):
            for vol in spec.get("volumes", []):
                if "secret" in vol:
                    items = vol["secret"].get("items") or [None]
                    refs |= {(vol["secret"]["secretName"], i["key"] if i else None) for i in items}
            for c in spec["containers"]:
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        refs.add((ref["name"], ref["key"]))
                refs |= {(s["secretRef"]["name"], None) for s in c.get("envFrom", []) if "secretRef" in s}
        for obj in objs:
            if obj["kind"] == "TriggerAuthentication":
                refs |= {(r["name"], r["key"]) for r in obj["spec"].get("secretTargetRef", [])}
            if obj["kind"] == "Ingress":
                refs |= {(t["secretName"], None) for t in obj["spec"].get("tls", [])}
        for secret, key in sorted(refs, key=str):
            if secret in tool.GIVEN_SECRETS:
                continue
            assert secret in keys, f"{name}: Secret {secret} is referenced but neither made nor given"
            assert key is None or key in keys[secret], f"{name}: Secret {secret} has no key {key}"
    # what the mounted files are called is what the settings say
    prod = rendered["production"]
    api = one(prod, "Deployment", "kiln-api")["spec"]["template"]["spec"]
    assert config_env(prod, api)["KILN_API_TICKET_PRIVATE_KEY_FILE"] == "/etc/kiln/ticket/private.pem"
    assert (tmp_path / "secrets" / "k8s" / "kiln-nats-ca" / "bundle.crt").read_text().endswith(ca.read_text())


def _settings_fields() -> dict[str, set[str]]:
    from kiln_api.settings import Settings as Api
    from kiln_clearml_forwarder.settings import Settings as ClearML
    from kiln_metrics_writer.settings import Settings as Writer
    from kiln_notifier.settings import NotifierSettings
    from kiln_runner.settings import Settings as Runner

    classes = (Api, ClearML, Writer, NotifierSettings, Runner)
    return {str(cls.model_config["env_prefix"]): set(cls.model_fields) for cls in classes}


def test_every_setting_the_manifests_give_exists(rendered: dict[str, list[dict[str, Any]]]) -> None:
    fields = _settings_fields()
    provision = (ROOT / "deploy" / "images" / "provision.py").read_text()
    common = {"KILN_LOG_FORMAT", "KILN_LOG_LEVEL", "HOME", "SSL_CERT_FILE"}
    for name, obj, spec in pod_specs(rendered):
        objs = rendered[name]
        env = config_env(objs, spec) | {e["name"]: "" for c in spec["containers"] for e in c.get("env", [])}
        for key, value in env.items():
            if key in common or key == "KILN_DATABASE_URL":  # python -m kiln_store upgrade
                continue
            if key.startswith("KILN_PROVISION_"):
                assert key in provision, f"{name}: {key} is not read by provision.py"
                continue
            prefix = next((p for p in fields if key.startswith(p)), None)
            assert prefix, f"{name}: {obj['metadata']['name']}: {key} is no Kiln setting"
            assert key[len(prefix):].lower() in fields[prefix], f"{name}: {key} is not a field of its settings"
            if key.endswith("_HOST") and value == "0.0.0.0" and prefix in ("KILN_API_", "KILN_NOTIFIER_"):
                assert env.get(prefix + "AUTH", "on") not in ("off",), f"{name}: {prefix}HOST=0.0.0.0 without auth"
        for key in ("KILN_API_AUTH", "KILN_NOTIFIER_AUTH"):
            assert env.get(key) != "off", f"{name}: {key}=off"


def _routes(ingress: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(p["path"], p["pathType"], p["backend"]["service"]["name"])
            for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]


def _route(routes: list[tuple[str, str, str]], path: str) -> str | None:
    """The Service an Ingress sends ``path`` to: Exact first, then the longest element-wise Prefix."""
    for p, kind, svc in routes:
        if kind == "Exact" and p == path:
            return svc
    best = None
    for p, kind, svc in routes:
        parts = [x for x in p.split("/") if x]
        if kind == "Prefix" and [x for x in path.split("/") if x][:len(parts)] == parts:
            if best is None or len(parts) > best[0]:
                best = (len(parts), svc)
    return best[1] if best else None


def test_the_ingress_serves_the_page_the_api_and_the_websocket_only(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    routes = _routes(one(rendered["production"], "Ingress", "kiln"))
    assert _route(routes, "/api/v1/ws") == "kiln-notifier"
    assert _route(routes, "/api/v1/ws/jobs/j-1") == "kiln-notifier"
    assert _route(routes, "/api/v1/ws-tickets") == "kiln-api"
    assert _route(routes, "/api/v1/jobs") == "kiln-api"
    assert _route(routes, "/openapi.json") == "kiln-api"  # the page builds its form from it
    for entry in WEB.iterdir():
        path = "/" if entry.name == "index.html" else f"/{entry.name}"
        probe = f"{path}/x.js" if entry.is_dir() else path
        assert _route(routes, probe) == "kiln-api", f"the page's {entry.name} is not routed by the Ingress"
    for private in ("/metrics", "/livez", "/readyz", "/healthz"):
        assert _route(routes, private) is None, f"{private} must stay inside the cluster"
    api = one(rendered["production"], "Deployment", "kiln-api")["spec"]["template"]["spec"]
    env = config_env(rendered["production"], api)
    host = one(rendered["production"], "Ingress", "kiln")["spec"]["rules"][0]["host"]
    assert env["KILN_API_PUBLIC_URL"] == f"https://{host}" and env["KILN_API_NOTIFIER_URL"] == f"wss://{host}"
    notifier = one(rendered["production"], "Deployment", "kiln-notifier")["spec"]["template"]["spec"]
    assert f"https://{host}" in config_env(rendered["production"], notifier)["KILN_NOTIFIER_ALLOWED_ORIGINS"]


def test_the_nats_values_match_what_the_manifests_expect(rendered: dict[str, list[dict[str, Any]]]) -> None:
    values = yaml.safe_load((K8S / "nats" / "values.yaml").read_text())
    dev = yaml.safe_load((K8S / "nats" / "values-dev.yaml").read_text())
    cfg = values["config"]
    assert cfg["cluster"]["enabled"] and cfg["cluster"]["replicas"] == 3
    assert cfg["jetstream"]["enabled"] and cfg["jetstream"]["fileStore"]["enabled"]
    assert cfg["nats"]["tls"]["enabled"] and cfg["cluster"]["tls"]["enabled"]
    assert cfg["resolver"]["enabled"] and cfg["resolver"]["merge"]["type"] == "full"
    assert not dev["config"]["cluster"]["enabled"] and not dev["config"]["nats"]["tls"]["enabled"]
    # the trust ConfigMap make_secrets.py writes is mounted where the include looks for it
    (mount,) = [p["value"] for p in values["container"]["patch"] if p["path"] == "/volumeMounts/-"]
    (volume,) = [p["value"] for p in values["podTemplate"]["patch"] if p["path"] == "/spec/volumes/-"]
    assert volume["name"] == mount["name"] and volume["configMap"]["name"] == "kiln-nats-trust"
    include = Path("/etc/nats-config") / cfg["merge"]["$include"]
    assert include.resolve() == Path(mount["mountPath"]) / "trust.conf"
    fullname = values["fullnameOverride"]
    for name, objs in rendered.items():
        for _, _, spec in pod_specs({name: objs}):
            for key, value in config_env(objs, spec).items():
                if key.endswith("NATS_URL"):
                    assert value == f"nats://{fullname}:{cfg['nats']['port']}", (name, key, value)
        for so in (o for o in objs if o["kind"] == "ScaledObject"):
            endpoint = so["spec"]["triggers"][0]["metadata"]["natsServerMonitoringEndpoint"]
            assert endpoint == f"{fullname}-headless.kiln.svc.cluster.local:{cfg['monitor']['port']}"
    prod = rendered["production"]
    provision = one(prod, "Job", "kiln-provision")["spec"]["template"]["spec"]
    assert int(config_env(prod, provision)["KILN_PROVISION_REPLICAS"]) == cfg["cluster"]["replicas"]
    # TLS on in production (every NATS client gets the CA, the optional forwarder too), off in dev like its values
    for name in ("production", "production+clearml"):
        for _, obj, spec in pod_specs({name: rendered[name]}):
            env = config_env(rendered[name], spec)
            if any(k.endswith("NATS_URL") for k in env):
                assert any(v["name"] == "nats-ca" for v in spec["volumes"]), f"{name}: {obj['metadata']['name']}"
                assert env["SSL_CERT_FILE"] == "/etc/kiln/nats-ca/bundle.crt"
    for _, obj, spec in pod_specs({"dev": rendered["dev"]}):
        assert "SSL_CERT_FILE" not in config_env(rendered["dev"], spec), obj["metadata"]["name"]


def test_the_provisioning_job_and_the_keda_view_on_a_real_server(tmp_path: Path) -> None:
    """make_secrets.py's trust.conf included as the chart's values include it; provision.py with the provisioner
    creds it wrote; /jsz answering, for the account id in kiln-nats-account, the stream and consumer KEDA asks for."""
    from kiln_testing import free_port, nats_server_bin, stop_process, wait_for_port

    try:
        binary = nats_server_bin()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"no nats-server binary: {exc}")
    tool = _load(K8S / "tools" / "make_secrets.py")
    made = tool.make(tmp_path / "secrets", ("default", "gpu"))
    conf_dir, trust_dir = tmp_path / "nats-config", tmp_path / "kiln-trust"
    conf_dir.mkdir()
    trust_dir.mkdir()
    shutil.copy(made["ConfigMap", "kiln-nats-trust"]["trust.conf"], trust_dir / "trust.conf")
    port, monitor = free_port(), free_port()
    (conf_dir / "nats.conf").write_text("\n".join([
        f"port: {port}", "host: 127.0.0.1", f"http: 127.0.0.1:{monitor}",
        f'jetstream {{ store_dir: "{tmp_path / "js"}" }}',
        f'resolver {{ type: full, dir: "{tmp_path / "resolver"}", allow_delete: false }}',
        f"include {yaml.safe_load((K8S / 'nats' / 'values.yaml').read_text())['config']['merge']['$include']}",
        ""]))
    checked = subprocess.run([binary, "-t", "-c", str(conf_dir / "nats.conf")], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr + checked.stdout
    log = tmp_path / "nats.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, "-c", str(conf_dir / "nats.conf")], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc, log)
        env = {"PATH": "/usr/bin:/bin", "KILN_PROVISION_NATS_URL": f"nats://127.0.0.1:{port}",
               "KILN_PROVISION_NATS_CREDS_FILE": str(made["Secret", "kiln-nats-provisioner"]["nats.creds"]),
               "KILN_PROVISION_POOLS": "default,gpu", "KILN_PROVISION_WAIT_S": "10"}
        done = subprocess.run([sys.executable, str(ROOT / "deploy" / "images" / "provision.py")], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr + done.stdout
        account = made["Secret", "kiln-nats-account"]["account"].read_text()
        url = f"http://127.0.0.1:{monitor}/jsz?acc={account}&consumers=true&config=true"
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - the test's own server
            jsz = json.loads(resp.read())
        (detail,) = [a for a in jsz["account_details"] if a.get("id") == account or a.get("name") == account]
        jobs = next(s for s in detail["stream_detail"] if s["name"] == streams.JOBS.name)
        consumers = {c["name"] for c in jobs.get("consumer_detail", [])}
        assert {streams.runner_consumer(p).durable_name for p in ("default", "gpu")} <= consumers, consumers
        # a second run (an upgrade) only updates
        again = subprocess.run([sys.executable, str(ROOT / "deploy" / "images" / "provision.py")], env=env,
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stderr
    finally:
        stop_process(proc)
