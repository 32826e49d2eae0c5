"""The Helm chart in deploy/helm/mertools: rendered offline with helm-python-sdk (Helm's Go SDK as a shared library:
no helm binary, no cluster, no network), every built-in manifest validated against the Kubernetes 1.30 OpenAPI
schemas (kubernetes-validate, strict: unknown fields fail), the ServiceMonitor (a CRD the validator has no schema
for) checked by hand, Helm's lint run, and bad values shown to fail the render through values.schema.json."""

from __future__ import annotations

import base64
import hashlib
import json
import posixpath
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (the test extra) is needed to render the Helm chart")
kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (the test extra) is needed to check manifests")
yaml = pytest.importorskip("yaml", reason="PyYAML (a dependency of kubernetes-validate) parses the rendered manifests")

from helm_python.chart import Chart, lint  # noqa: E402

CHART = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "mertools"
KUBE_VERSION = "1.30"
RELEASE, NAMESPACE = "demo", "llm"
FULLNAME = f"{RELEASE}-mertools"
# the config keys the chart sets itself (from layout.*, cacheMb, server.*) and refuses in `config:`
CHART_OWNED_KEYS = {"layout", "cache_mb", "host", "port"}

FULL_CONFIG = {
    "model_name": "mixtral", "api_keys": ["k1", "k2"], "max_concurrency": 4, "max_queue": 0, "prefetch": "markov",
    "prefill_chunk": 128, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "max_tokens": 2048, "log_level": "debug",
    "threads": 8, "kv_type": "q8_0", "io": "direct", "kernels": "exact", "draft": "ngram", "draft_tokens": 6,
    "history": "/var/lib/mertools/history.bin", "prefetch_depth": 4, "ui": False,
}

VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "hostpath": {"layout": {"source": "hostPath", "hostPath": {"path": "/mnt/models"}, "path": "mixtral-q4_0"},
                 "nodeSelector": {"mertools/layouts": "yes"},
                 "tolerations": [{"key": "llm", "operator": "Exists", "effect": "NoSchedule"}],
                 "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                     {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}}},
    "pvc": {"layout": {"source": "pvc", "pvc": {"claimName": "models"}, "path": "qwen3/q4_k_m/", "mountPath": "/models"}},
    "servicemonitor": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}},
    "servicemonitor-with-key": {"serviceMonitor": {"enabled": True}, "apiKey": {"value": "s3cret"}},
    "servicemonitor-existing-secret": {"serviceMonitor": {"enabled": True, "interval": "15s"},
                                       "apiKey": {"existingSecret": "llm-keys", "existingSecretKey": "token"}},
    "api-key-created": {"apiKey": {"value": "s3cret"}},
    "existing-secret": {"apiKey": {"existingSecret": "llm-keys", "existingSecretKey": "token"}},
    "custom-resources": {"cacheMb": 30000, "denseMb": 5120, "headroomMb": 3000, "cpu": {"request": "8", "limit": "8"},
                         "config": {"threads": 8, "max_concurrency": 16}, "tmpSizeLimit": "", "cacheSizeLimit": ""},
    "big-numbers": {"cacheMb": 1_000_000, "denseMb": 250_000, "headroomMb": 64_000},
    "full-config": {"config": FULL_CONFIG, "watchConfigSeconds": 0.5, "configMountPath": "/config/",
                    "server": {"port": 9000, "extraArgs": ["--approx-topk-tau", "0.05"]}, "service": {"port": 80},
                    "extraVolumes": [{"name": "state", "emptyDir": {}}],
                    "extraVolumeMounts": [{"name": "state", "mountPath": "/var/lib/mertools"}],
                    "extraEnv": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
                    "podAnnotations": {"team": "llm"}, "podLabels": {"tier": "inference"}},
    "no-watch": {"watchConfigSeconds": 0},
    "names": {"fullnameOverride": "llm", "image": {"repository": "registry.example/mertools", "tag": "1.2.3",
                                                   "pullPolicy": "Always"}},
}


@dataclass
class Rendered:
    values: dict[str, Any]  # the merged values the chart rendered with
    docs: list[dict[str, Any]]
    notes: str
    raw: dict[str, str] = field(repr=False)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, got {len(found)}"
        return found[0]

    @property
    def pod(self) -> dict[str, Any]:
        return self.one("Deployment")["spec"]["template"]

    @property
    def container(self) -> dict[str, Any]:
        containers = self.pod["spec"]["containers"]
        assert len(containers) == 1
        return containers[0]

    def volume(self, name: str) -> dict[str, Any]:
        (vol,) = [v for v in self.pod["spec"]["volumes"] if v["name"] == name]
        return vol

    def mount_at(self, path: str) -> dict[str, Any]:
        (mount,) = [m for m in self.container["volumeMounts"] if m["mountPath"].rstrip("/") == path.rstrip("/")]
        return mount

    def arg_after(self, flag: str) -> str:
        args = self.container["args"]
        assert args.count(flag) == 1, f"{flag} should be given once in {args}"
        return args[args.index(flag) + 1]

    def config_toml(self) -> dict[str, Any]:
        return tomllib.loads(self.one("ConfigMap")["data"]["config.toml"])


@pytest.fixture(scope="module")
def chart():
    with Chart.load(CHART) as c:
        yield c


def render(chart: Chart, values: dict[str, Any] | None = None) -> Rendered:
    raw = chart.render(values=values or {}, name=RELEASE, namespace=NAMESPACE)
    docs = [d for name, text in raw.items() if name.endswith((".yaml", ".yml")) for d in yaml.safe_load_all(text) if d]
    notes = next((text for name, text in raw.items() if name.endswith("NOTES.txt")), "")
    return Rendered(chart.merge_values(values or {}), docs, notes, raw)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def rendered(request, chart) -> Rendered:
    return render(chart, VARIANTS[request.param])


# --------------------------------------------------------------------------------------------------- manifests


def test_every_manifest_validates(rendered):
    kinds = sorted(d["kind"] for d in rendered.docs)
    for doc in rendered.docs:
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            continue  # a CRD: test_servicemonitor checks it
        try:
            assert kv.validate(doc, KUBE_VERSION, strict=True) == KUBE_VERSION
        except kv.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} does not validate against Kubernetes {KUBE_VERSION}: "
                        f"{'.'.join(map(str, e.path))}: {e.message}")
        assert doc["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    assert {"ConfigMap", "Deployment", "Service"} <= set(kinds)
    for text in rendered.raw.values():
        assert "<no value>" not in text


def test_validator_is_strict():
    """The validation above would catch a misplaced field (it is not a schema that accepts anything)."""
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"selector": {}, "template": {"spec": {"containers": [{"name": "a", "readinessprobe": {}}]}}}}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, KUBE_VERSION, strict=True)


def test_memory_is_cache_plus_dense_plus_headroom(rendered):
    v = rendered.values
    want = f"{v['cacheMb'] + v['denseMb'] + v['headroomMb']}Mi"
    resources = rendered.container["resources"]
    assert resources["requests"]["memory"] == want
    assert resources["limits"]["memory"] == want
    assert resources["requests"]["cpu"] == str(v["cpu"]["request"])
    if v["cpu"]["limit"]:
        assert resources["limits"]["cpu"] == str(v["cpu"]["limit"])
    else:
        assert "cpu" not in resources["limits"]


def test_config_toml(rendered):
    v = rendered.values
    cfg = rendered.config_toml()
    assert cfg["cache_mb"] == v["cacheMb"] and isinstance(cfg["cache_mb"], int)
    for key, value in v["config"].items():
        assert cfg[key] == value, key
        assert type(cfg[key]) is type(value) or isinstance(value, float), f"{key}: {cfg[key]!r} for {value!r}"
    assert set(cfg) == set(v["config"]) | {"cache_mb"}


def test_layout_volume_is_read_only(rendered):
    v = rendered.values["layout"]
    mount = rendered.mount_at(v["mountPath"])
    assert mount["readOnly"] is True and "subPath" not in mount
    vol = rendered.volume(mount["name"])
    if v["source"] == "pvc":
        assert vol["persistentVolumeClaim"] == {"claimName": v["pvc"]["claimName"], "readOnly": True}
    else:
        assert vol["hostPath"]["path"] == v["hostPath"]["path"]
        assert vol["hostPath"]["type"] == "Directory"
    args = rendered.container["args"]
    assert args[0] == "serve" and rendered.container["command"] == ["mertools"]
    assert args[1] == posixpath.join(v["mountPath"], v["path"]).rstrip("/")


def test_probes_hit_health_on_the_container_port(rendered):
    c = rendered.container
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": rendered.values["server"]["port"]}
    assert rendered.arg_after("--port") == str(rendered.values["server"]["port"])
    assert rendered.arg_after("--host") == "0.0.0.0"
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = c[kind]["httpGet"]
        assert probe["path"] == "/health"
        assert ports.get(probe["port"], probe["port"]) == rendered.values["server"]["port"]
    # a model takes minutes to load: the startup probe (which holds back liveness) allows at least 10 of them
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_no_config_checksum_on_the_pod_template(rendered):
    """A config change must reach the running server through the mounted file (--watch-config), not roll the pods."""
    annotations = rendered.pod["metadata"].get("annotations") or {}
    data = rendered.one("ConfigMap")["data"]
    digests = {hashlib.sha256(s.encode()).hexdigest() for s in (data["config.toml"], json.dumps(data),
                                                                 yaml.safe_dump(rendered.one("ConfigMap")))}
    for key, value in annotations.items():
        assert "checksum" not in key.lower() and "config" not in key.lower(), key
        assert str(value) not in digests


def test_config_is_mounted_as_a_directory_and_watched(rendered):
    config_path = rendered.arg_after("--config")
    directory, filename = posixpath.split(config_path)
    configmap = rendered.one("ConfigMap")
    assert filename in configmap["data"]
    mount = rendered.mount_at(directory)
    assert "subPath" not in mount, "a subPath mount is never updated by kubelet"
    assert mount["readOnly"] is True
    assert rendered.volume(mount["name"])["configMap"]["name"] == configmap["metadata"]["name"]
    watch = rendered.values["watchConfigSeconds"]
    if watch:
        assert float(rendered.arg_after("--watch-config")) == watch
    else:
        assert "--watch-config" not in rendered.container["args"]
    # settings the command line gives are pinned (a reload cannot change them): only these, plus extraArgs
    extra = rendered.values["server"]["extraArgs"]
    flags = [a for a in rendered.container["args"] if a.startswith("--") and a not in extra]
    assert flags == ["--host", "--port", "--config", *(["--watch-config"] if watch else [])]


def test_selectors_match_the_pods(rendered):
    pod_labels = rendered.pod["metadata"]["labels"]
    deployment = rendered.one("Deployment")
    service = rendered.one("Service")
    for selector in (deployment["spec"]["selector"]["matchLabels"], service["spec"]["selector"]):
        assert selector and selector.items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http" and port["name"] == "http"
    assert port["port"] == rendered.values["service"]["port"]


def _key_ref(rendered: Rendered) -> dict[str, str] | None:
    env = {e["name"]: e for e in rendered.container.get("env", [])}
    if "MERTOOLS_API_KEY" not in env:
        return None
    assert "value" not in env["MERTOOLS_API_KEY"], "the API key must come from a Secret"
    return env["MERTOOLS_API_KEY"]["valueFrom"]["secretKeyRef"]


def test_api_key_from_a_secret(rendered):
    key = rendered.values["apiKey"]
    ref = _key_ref(rendered)
    secrets = rendered.of_kind("Secret")
    if key["existingSecret"]:
        assert ref == {"name": key["existingSecret"], "key": key["existingSecretKey"]}
        assert secrets == []
    elif key["value"]:
        (secret,) = secrets
        assert ref == {"name": secret["metadata"]["name"], "key": "api-key"}
        assert base64.b64decode(secret["data"]["api-key"]).decode() == key["value"]
        assert key["value"] not in json.dumps([d for d in rendered.docs if d["kind"] != "Secret"])
    else:
        assert ref is None and secrets == []
        assert "no API key" in rendered.notes


def test_servicemonitor(rendered):
    monitors = rendered.of_kind("ServiceMonitor")
    if not rendered.values["serviceMonitor"]["enabled"]:
        assert monitors == []
        return
    (sm,) = monitors
    service = rendered.one("Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["name"] and set(sm) == {"apiVersion", "kind", "metadata", "spec"}
    assert sm["metadata"]["labels"].items() >= rendered.values["serviceMonitor"]["labels"].items()
    selector = sm["spec"]["selector"]
    assert set(selector) == {"matchLabels"}
    assert selector["matchLabels"] and selector["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == rendered.values["serviceMonitor"]["interval"]
    ref = _key_ref(rendered)
    if ref is None:
        assert "authorization" not in endpoint and "bearerTokenSecret" not in endpoint
    else:  # /metrics needs the key: the same Secret and key the server reads
        assert endpoint["authorization"] == {"type": "Bearer", "credentials": {"name": ref["name"], "key": ref["key"]}}


def test_security_context(rendered):
    pod_sc = rendered.pod["spec"]["securityContext"]
    sc = rendered.container["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == 10001
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert rendered.pod["spec"]["automountServiceAccountToken"] is False
    # the writable places a read-only root needs: /tmp and numba's cache, each an emptyDir
    env = {e["name"]: e.get("value") for e in rendered.container["env"]}
    for path in ("/tmp", env["NUMBA_CACHE_DIR"]):
        assert "emptyDir" in rendered.volume(rendered.mount_at(path)["name"]), path


def test_numba_cache_is_seeded_from_the_image(rendered):
    """The init container copies the image's own NUMBA_CACHE_DIR (hidden by the emptyDir in the server's container)
    into that emptyDir, with the same image and the server's security context."""
    init = {c["name"]: c for c in rendered.pod["spec"].get("initContainers", [])}
    seed = init["seed-numba-cache"]
    assert seed["image"] == rendered.container["image"] and seed["securityContext"] == rendered.container["securityContext"]
    env = {e["name"]: e.get("value") for e in rendered.container["env"]}
    (mount,) = seed["volumeMounts"]
    assert mount["name"] == rendered.mount_at(env["NUMBA_CACHE_DIR"])["name"]
    assert "NUMBA_CACHE_DIR" not in {e["name"] for e in seed.get("env", [])}  # the image's own path: what it compiled
    assert seed["command"][:2] == ["sh", "-c"] and f'/. {mount["mountPath"]}/' in seed["command"][2]


def test_passthrough_and_image(rendered):
    v = rendered.values
    spec = rendered.pod["spec"]
    for key in ("nodeSelector", "tolerations", "affinity"):
        assert spec.get(key, type(v[key])()) == v[key], key
    tag = v["image"]["tag"] or "0.1.0"
    assert rendered.container["image"] == f"{v['image']['repository']}:{tag}"
    assert rendered.container["imagePullPolicy"] == v["image"]["pullPolicy"]
    for arg in v["server"]["extraArgs"]:
        assert arg in rendered.container["args"]
    assert rendered.pod["metadata"]["labels"].items() >= v["podLabels"].items()


def test_names(chart):
    r = render(chart, VARIANTS["names"])
    assert {d["metadata"]["name"] for d in r.docs} == {"llm", "llm-config"}
    r = render(chart, {"apiKey": {"value": "x"}})
    assert {(d["kind"], d["metadata"]["name"]) for d in r.docs} == {
        ("Deployment", FULLNAME), ("Service", FULLNAME), ("ConfigMap", f"{FULLNAME}-config"),
        ("Secret", f"{FULLNAME}-api-key")}


def test_config_reads_back_through_the_servers_parser(chart, tmp_path):
    """The rendered config.toml is what `mertools serve --config` accepts (its checks want true integers, not
    the floats Helm's values become), and the schema's `config` keys are the server's file keys."""
    server_config = pytest.importorskip("mertools.server.config", reason="the server's settings file parser")
    r = render(chart, VARIANTS["full-config"])
    path = tmp_path / "config.toml"
    path.write_text(r.one("ConfigMap")["data"]["config.toml"], encoding="utf-8")
    settings = server_config.read_settings(path)
    assert settings["cache_mb"] == r.values["cacheMb"]
    assert settings["max_concurrency"] == FULL_CONFIG["max_concurrency"]
    assert settings["kv_dtype"] == FULL_CONFIG["kv_type"]
    assert settings["api_keys"] == tuple(FULL_CONFIG["api_keys"])
    assert len(settings) == len(FULL_CONFIG) + 1
    schema_keys = set(chart.schema["properties"]["config"]["properties"])
    assert schema_keys == set(FULL_CONFIG)
    assert schema_keys | CHART_OWNED_KEYS == set(server_config.FILE_KEYS)


# ------------------------------------------------------------------------------------------------- bad values

BAD_VALUES = {
    "negative cacheMb": ({"cacheMb": -1}, "/cacheMb"),
    "zero cacheMb": ({"cacheMb": 0}, "/cacheMb"),
    "fractional denseMb": ({"denseMb": 10.5}, "/denseMb"),
    "negative headroomMb": ({"headroomMb": -5}, "/headroomMb"),
    "unknown prefetch": ({"config": {"prefetch": "oracle"}}, "/config/prefetch"),
    "cache_mb in config": ({"config": {"cache_mb": 100}}, "cache_mb"),
    "layout in config": ({"config": {"layout": "/elsewhere"}}, "layout"),
    "unknown config key": ({"config": {"max_concurency": 4}}, "max_concurency"),
    "zero max_concurrency": ({"config": {"max_concurrency": 0}}, "/config/max_concurrency"),
    "fractional max_queue": ({"config": {"max_queue": 1.5}}, "/config/max_queue"),
    "bad kv_type": ({"config": {"kv_type": "int4"}}, "/config/kv_type"),
    "top_p above 1": ({"config": {"top_p": 1.5}}, "/config/top_p"),
    "bad log_level": ({"config": {"log_level": "verbose"}}, "/config/log_level"),
    "unknown top-level key": ({"cachMb": 100}, "cachMb"),
    "unknown layout source": ({"layout": {"source": "nfs"}}, "/layout/source"),
    "hostPath without a path": ({"layout": {"source": "hostPath", "hostPath": {"path": ""}}}, "/layout/hostPath/path"),
    "pvc without a claim": ({"layout": {"pvc": {"claimName": ""}}}, "/layout/pvc/claimName"),
    "layout path escaping the volume": ({"layout": {"path": "../etc"}}, "/layout/path"),
    "both api key sources": ({"apiKey": {"existingSecret": "s", "value": "v"}}, "/apiKey"),
    "negative watch": ({"watchConfigSeconds": -1}, "/watchConfigSeconds"),
    "bad pullPolicy": ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    "bad port": ({"server": {"port": 70000}}, "/server/port"),
    "bad scrape interval": ({"serviceMonitor": {"interval": "often"}}, "/serviceMonitor/interval"),
    "probe httpGet override": ({"probes": {"liveness": {"httpGet": {"path": "/"}}}}, "httpGet"),
}


@pytest.mark.parametrize("values, where", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_fail_the_render(chart, values, where):
    with pytest.raises(helm.HelmValuesError) as info:
        chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
    message = str(info.value)
    assert "schema" in message and where in message, message


# ------------------------------------------------------------------------------------------------------- lint


@pytest.mark.parametrize("variant", ["defaults", "hostpath", "servicemonitor-with-key", "full-config"])
def test_helm_lint(variant):
    report = lint(CHART, VARIANTS[variant], strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}.0")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2: warning, 3: error
    assert problems == [], problems


def test_helm_lint_reports_bad_values():
    report = lint(CHART, {"cacheMb": -1}, namespace=NAMESPACE)
    errors = report["errors"] + [m["error"] for m in report["messages"] if m["severity"] == 3]
    assert any("cacheMb" in e for e in errors), report
