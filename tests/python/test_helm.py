"""The Helm chart, checked the way a platform team would before accepting it, with the
real Helm v4 library (helm-python-sdk; no helm binary, no cluster): lint, render three
value sets, validate every object strictly against the Kubernetes 1.30 and newest
schemas, and assert the probes, security context, ports, secret wiring, the tenant
limits, stall detection, the CloudNativePG example and the refusals of values that
cannot work."""

from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "batchd"
KUBERNETES = ["1.30.0", kubernetes_validate.utils.latest_version()]

DEFAULT: dict = {}
HIGH_AVAILABILITY = {
    "replicaCount": 3,
    "database": {"existingSecret": "batchd-db", "existingSecretKey": "url"},
    "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 9},
    "podDisruptionBudget": {"enabled": True, "maxUnavailable": 1},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "networkPolicy": {
        "enabled": True,
        "allowedNamespaceSelectors": [{"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}],
    },
    "ingress": {
        "enabled": True,
        "className": "nginx",
        "host": "batchd.internal.example.com",
        "tls": [{"secretName": "batchd-tls", "hosts": ["batchd.internal.example.com"]}],
    },
    "otel": {"endpoint": "http://otel-collector.observability:4318", "resourceAttributes": "deployment.environment=prod"},
    "tenants": {"retentionTerminal": "30d", "maxActiveBatchesPerOwner": 100, "rateLimitPerKey": 20, "rateLimitBurst": 40},
    "batchd": {"stallAfter": "30m"},
}
MINIMAL = {
    "replicaCount": 1,
    "database": {"url": "sqlite:///data/batchd.db"},
    "serviceAccount": {"create": False},
    "spreadAcrossNodes": False,
}
# The documented way to run on a CloudNativePG cluster, read as `helm -f` reads it.
CLOUDNATIVEPG_EXAMPLE = CHART / "examples" / "cloudnativepg.yaml"
CLOUDNATIVEPG = helm.values_from_yaml(CLOUDNATIVEPG_EXAMPLE.read_text())

# The Prometheus Operator's ServiceMonitor is a CRD, not in the Kubernetes schemas:
# its fields that the chart uses, with the CRD's types, nothing else allowed.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "additionalProperties": False,
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                    "additionalProperties": False,
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                        },
                    },
                },
            },
        },
    },
}


def render(values: dict) -> dict[str, list[dict]]:
    """Every rendered object, by kind."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name="demo", namespace="batchd")
    objects: dict[str, list[dict]] = {}
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                objects.setdefault(document["kind"], []).append(document)
    return objects


def only(objects: dict, kind: str) -> dict:
    assert len(objects.get(kind, [])) == 1, f"one {kind}: {list(objects)}"
    return objects[kind][0]


def container(objects: dict) -> dict:
    return only(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def test_the_chart_lints_clean():
    report = helm.lint(CHART, strict=True, kube_version="v1.30.0")
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems


@pytest.mark.parametrize(
    "values", [DEFAULT, HIGH_AVAILABILITY, MINIMAL, CLOUDNATIVEPG], ids=["default", "ha", "minimal", "cloudnativepg"]
)
@pytest.mark.parametrize("kubernetes", KUBERNETES)
def test_every_rendered_object_is_valid_kubernetes(values, kubernetes):
    objects = render(values)
    assert objects, "something rendered"
    for kind, items in objects.items():
        for item in items:
            if kind == "ServiceMonitor":
                jsonschema.validate(item, SERVICE_MONITOR_SCHEMA)
            else:
                kubernetes_validate.validate(item, kubernetes, strict=True)


def test_each_value_set_renders_what_it_asks_for():
    default = render(DEFAULT)
    assert set(default) == {"ConfigMap", "Secret", "ServiceAccount", "Service", "Deployment", "PodDisruptionBudget", "Pod"}
    assert only(default, "Deployment")["spec"]["replicas"] == 2
    ha = render(HIGH_AVAILABILITY)
    for kind in ["HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor", "NetworkPolicy", "Ingress"]:
        assert kind in ha, kind
    assert "replicas" not in only(ha, "Deployment")["spec"], "the HPA owns the replica count"
    assert only(ha, "HorizontalPodAutoscaler")["spec"]["minReplicas"] == 3
    minimal = render(MINIMAL)
    assert "PodDisruptionBudget" not in minimal and "ServiceAccount" not in minimal
    assert only(minimal, "Deployment")["spec"]["strategy"]["type"] == "Recreate"


def test_probes_are_native_grpc_health_checks():
    c = container(render(DEFAULT))
    assert c["livenessProbe"]["grpc"] == {"port": 50051, "service": "liveness"}
    assert c["startupProbe"]["grpc"] == {"port": 50051, "service": "liveness"}
    assert c["readinessProbe"]["grpc"] == {"port": 50051, "service": ""}
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 60


def test_the_pod_runs_locked_down():
    deployment = only(render(DEFAULT), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    security = pod["containers"][0]["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    resources = pod["containers"][0]["resources"]
    assert resources["requests"] and resources["limits"]
    spread = pod["topologySpreadConstraints"][0]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_ports_and_service_carry_grpc_and_http():
    objects = render(DEFAULT)
    ports = {p["name"]: p["containerPort"] for p in container(objects)["ports"]}
    assert ports == {"grpc": 50051, "http": 8080}
    service = only(objects, "Service")["spec"]
    assert service["type"] == "ClusterIP"
    by_name = {p["name"]: p for p in service["ports"]}
    assert by_name["grpc"]["appProtocol"] == "grpc" and by_name["grpc"]["targetPort"] == "grpc"
    assert by_name["http"]["targetPort"] == "http"
    config = only(objects, "ConfigMap")["data"]
    assert config["BATCHD_GRPC_ADDR"] == "0.0.0.0:50051"
    assert config["BATCHD_HTTP_ADDR"] == "0.0.0.0:8080"


def test_configuration_comes_from_the_configmap_and_the_url_from_a_secret():
    objects = render(DEFAULT)
    c = container(objects)
    assert c["envFrom"] == [{"configMapRef": {"name": only(objects, "ConfigMap")["metadata"]["name"]}}]
    url = next(e for e in c["env"] if e["name"] == "BATCHD_DATABASE_URL")["valueFrom"]["secretKeyRef"]
    secret = only(objects, "Secret")
    assert url["name"] == secret["metadata"]["name"]
    assert url["key"] in secret["stringData"]
    assert not any(e.get("value", "").startswith("postgres") for e in c["env"]), "no URL in plain env"
    config = only(objects, "ConfigMap")["data"]
    assert "postgres" not in str(config), "the URL stays out of the ConfigMap"
    assert config["BATCHD_CREATE_FIRST_KEY"] == "false"

    # With an existing Secret, the chart makes none and points at that one.
    ha = render(HIGH_AVAILABILITY)
    assert "Secret" not in ha
    url = next(e for e in container(ha)["env"] if e["name"] == "BATCHD_DATABASE_URL")["valueFrom"]["secretKeyRef"]
    assert url == {"name": "batchd-db", "key": "url"}


def test_the_cloudnativepg_example_reads_the_url_from_the_operators_secret():
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(CLOUDNATIVEPG)
    report = helm.lint(CHART, CLOUDNATIVEPG, strict=True, kube_version="v1.30.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []

    objects = render(CLOUDNATIVEPG)
    assert "Secret" not in objects, "the operator's Secret is used, the chart makes none"
    env = container(objects)["env"]
    url = next(e for e in env if e["name"] == "BATCHD_DATABASE_URL")["valueFrom"]["secretKeyRef"]
    assert url == {"name": "mycluster-app", "key": "uri"}
    assert only(objects, "Deployment")["spec"]["replicas"] == 2
    assert "postgres" not in str(only(objects, "ConfigMap")["data"]), "no URL in the ConfigMap"


def test_the_cloudnativepg_example_shows_the_cluster_whose_secret_it_reads():
    # The Cluster manifest in the example's comment: from its apiVersion line to the
    # next bare "#", indented by "#   ".
    lines = CLOUDNATIVEPG_EXAMPLE.read_text().splitlines()
    start = lines.index("#   apiVersion: postgresql.cnpg.io/v1")
    end = lines.index("#", start)
    cluster = yaml.safe_load("\n".join(line.removeprefix("#   ") for line in lines[start:end]))
    assert cluster["kind"] == "Cluster"
    # CloudNativePG names the application user's Secret <cluster>-app.
    assert CLOUDNATIVEPG["database"]["existingSecret"] == f"{cluster['metadata']['name']}-app"
    assert f"{cluster['metadata']['name']}-rw" in "\n".join(lines[:start]), "the header names the -rw Service"


@pytest.mark.parametrize(
    "name, key",
    [("mycluster-app", "uri"), ("db.example-app", "DATABASE_URL"), ("a" * 253, "k" * 253), ("x", "fqdn-uri")],
    ids=["cloudnativepg", "dotted", "longest", "shortest"],
)
def test_any_kubernetes_secret_name_and_key_are_accepted(name, key):
    objects = render({"database": {"existingSecret": name, "existingSecretKey": key}})
    url = next(e for e in container(objects)["env"] if e["name"] == "BATCHD_DATABASE_URL")["valueFrom"]["secretKeyRef"]
    assert url == {"name": name, "key": key}


def test_a_configuration_change_rolls_the_pods():
    annotations = lambda values: only(render(values), "Deployment")["spec"]["template"]["metadata"]["annotations"]
    before = annotations(DEFAULT)
    assert set(before) >= {"checksum/config", "checksum/database"}
    after = annotations({"batchd": {"logLevel": "debug"}})
    assert after["checksum/config"] != before["checksum/config"]
    moved = annotations({"database": {"url": "postgres://batchd@db2:5432/batchd"}})
    assert moved["checksum/database"] != before["checksum/database"]


def test_shutdown_timing_fits_the_grace_period():
    values = {"batchd": {"shutdownDelaySeconds": 7, "shutdownTimeoutSeconds": 40}}
    objects = render(values)
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["containers"][0]["lifecycle"]["preStop"] == {"sleep": {"seconds": 7}}
    assert pod["terminationGracePeriodSeconds"] > 7 + 40
    config = only(objects, "ConfigMap")["data"]
    assert (config["BATCHD_SHUTDOWN_DELAY"], config["BATCHD_SHUTDOWN_TIMEOUT"]) == ("7s", "40s")


def test_opentelemetry_settings_become_the_standard_variables():
    objects = render(HIGH_AVAILABILITY)
    config = only(objects, "ConfigMap")["data"]
    assert config["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4318"
    assert config["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert config["OTEL_SERVICE_NAME"] == "demo-batchd"
    attributes = next(e for e in container(objects)["env"] if e["name"] == "OTEL_RESOURCE_ATTRIBUTES")
    assert attributes["value"].endswith(",deployment.environment=prod")
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in only(render(DEFAULT), "ConfigMap")["data"]


def test_the_console_is_served_only_when_asked():
    ingress_paths = lambda objects: [p["path"] for p in only(objects, "Ingress")["spec"]["rules"][0]["http"]["paths"]]
    default = render(DEFAULT)
    assert only(default, "ConfigMap")["data"]["BATCHD_CONSOLE"] == "false"
    assert ingress_paths(render(HIGH_AVAILABILITY)) == ["/v1"]
    asked = render({**HIGH_AVAILABILITY, "console": {"enabled": True}})
    assert only(asked, "ConfigMap")["data"]["BATCHD_CONSOLE"] == "true"
    assert ingress_paths(asked) == ["/v1", "/console"]


TENANT_VARIABLES = {
    "BATCHD_RETENTION_TERMINAL",
    "BATCHD_MAX_ACTIVE_BATCHES_PER_OWNER",
    "BATCHD_RATE_LIMIT_PER_KEY",
    "BATCHD_RATE_LIMIT_BURST",
}


def test_tenant_limits_are_off_unless_set():
    config = only(render(DEFAULT), "ConfigMap")["data"]
    assert TENANT_VARIABLES.isdisjoint(config), "batchd's own default (off) applies"
    off = {"retentionTerminal": None, "maxActiveBatchesPerOwner": 0, "rateLimitPerKey": 0, "rateLimitBurst": 0}
    assert TENANT_VARIABLES.isdisjoint(only(render({"tenants": off}), "ConfigMap")["data"])


def test_tenant_limits_reach_batchd_as_its_variables():
    objects = render(HIGH_AVAILABILITY)
    config = only(objects, "ConfigMap")["data"]
    assert {name: config[name] for name in TENANT_VARIABLES} == {
        "BATCHD_RETENTION_TERMINAL": "30d",
        "BATCHD_MAX_ACTIVE_BATCHES_PER_OWNER": "100",
        "BATCHD_RATE_LIMIT_PER_KEY": "20",
        "BATCHD_RATE_LIMIT_BURST": "40",
    }
    # The container takes its environment from this ConfigMap.
    assert {"configMapRef": {"name": only(objects, "ConfigMap")["metadata"]["name"]}} in container(objects)["envFrom"]

    # Fractional rates stay exact; large numbers are never printed as 1e+06.
    config = only(render({"tenants": {"retentionTerminal": "720h", "maxActiveBatchesPerOwner": 1000000, "rateLimitPerKey": 0.5}}), "ConfigMap")["data"]
    assert config["BATCHD_RETENTION_TERMINAL"] == "720h"
    assert config["BATCHD_MAX_ACTIVE_BATCHES_PER_OWNER"] == "1000000"
    assert config["BATCHD_RATE_LIMIT_PER_KEY"] == "0.5"
    assert "BATCHD_RATE_LIMIT_BURST" not in config, "0: batchd rounds the rate up"
    config = only(render({"tenants": {"rateLimitPerKey": 1000000, "rateLimitBurst": 1000000}}), "ConfigMap")["data"]
    assert (config["BATCHD_RATE_LIMIT_PER_KEY"], config["BATCHD_RATE_LIMIT_BURST"]) == ("1000000", "1000000")


def test_changing_a_tenant_limit_rolls_the_pods():
    checksum = lambda values: only(render(values), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert checksum({"tenants": {"rateLimitPerKey": 10}}) != checksum({"tenants": {"rateLimitPerKey": 20}})


def test_stall_detection_reaches_batchd_as_its_variable():
    stall_after = lambda values: only(render(values), "ConfigMap")["data"].get("BATCHD_STALL_AFTER")
    assert stall_after(DEFAULT) == "10m", "batchd's own default, written out"
    assert stall_after(HIGH_AVAILABILITY) == "30m"
    # 0 turns detection off, whether written as a string or (as --set does) a number.
    assert stall_after({"batchd": {"stallAfter": "0"}}) == "0"
    assert stall_after({"batchd": {"stallAfter": 0}}) == "0"
    assert stall_after({"batchd": {"stallAfter": None}}) is None, "null leaves batchd's default"
    checksum = lambda values: only(render(values), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert checksum({"batchd": {"stallAfter": "10m"}}) != checksum({"batchd": {"stallAfter": "1h"}})


def test_helm_test_checks_health_with_batchd_itself():
    pod = only(render(DEFAULT), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    args = pod["spec"]["containers"][0]["args"]
    assert args == ["health", "--server", "http://demo-batchd:50051"]


@pytest.mark.parametrize(
    "values, message",
    [
        ({"replicaCount": 3, "database": {"url": "sqlite:///data/batchd.db"}}, "SQLite, which only one process can use, but replicaCount is 3"),
        ({"replicaCount": 1, "database": {"url": "sqlite:///data/batchd.db"}, "autoscaling": {"enabled": True}}, "autoscaling.enabled would run several replicas"),
        ({"database": {"url": ""}}, "no database: set database.url"),
        ({"replicaCount": "three"}, "/replicaCount': got string, want integer"),
        ({"replicas": 3}, "additional properties 'replicas' not allowed"),
        ({"batchd": {"logFormat": "xml"}}, "/batchd/logFormat"),
        ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}, "autoscaling.maxReplicas (2) is below autoscaling.minReplicas (5)"),
        ({"tenants": {"retentionTerminal": "thirty days"}}, "/tenants/retentionTerminal': 'thirty days' does not match pattern"),
        ({"tenants": {"retentionTerminal": "30"}}, "/tenants/retentionTerminal': '30' does not match pattern"),
        ({"tenants": {"retentionTerminal": 30}}, "/tenants/retentionTerminal': got number, want null or string"),
        ({"tenants": {"maxActiveBatchesPerOwner": -1}}, "/tenants/maxActiveBatchesPerOwner': minimum: got -1, want 0"),
        ({"tenants": {"maxActiveBatchesPerOwner": 2.5}}, "/tenants/maxActiveBatchesPerOwner': got number, want integer"),
        ({"tenants": {"rateLimitPerKey": -0.5}}, "/tenants/rateLimitPerKey': minimum: got -0.5, want 0"),
        ({"tenants": {"rateLimitPerKey": "20/s"}}, "/tenants/rateLimitPerKey': got string, want number"),
        ({"tenants": {"rateLimitPerKey": 2000000}}, "/tenants/rateLimitPerKey': maximum:"),
        ({"tenants": {"rateLimitPerKey": 0.0005}}, "/tenants/rateLimitPerKey'"),
        ({"tenants": {"maxActiveBatchesPerOwner": 20000000}}, "/tenants/maxActiveBatchesPerOwner': maximum:"),
        ({"tenants": {"rateLimitBurst": -3}}, "/tenants/rateLimitBurst': minimum: got -3, want 0"),
        ({"tenants": {"rateLimit": 20}}, "additional properties 'rateLimit' not allowed"),
        ({"tenants": {"rateLimitBurst": 5}}, "tenants.rateLimitBurst is 5 but tenants.rateLimitPerKey is 0 (no rate limit)"),
        ({"batchd": {"stallAfter": "ten minutes"}}, "/batchd/stallAfter': 'ten minutes' does not match pattern"),
        ({"batchd": {"stallAfter": "10"}}, "/batchd/stallAfter': '10' does not match pattern"),
        ({"batchd": {"stallAfter": 10}}, "/batchd/stallAfter': value must be 0"),
        ({"batchd": {"stallAfter": False}}, "/batchd/stallAfter': got boolean, want string"),
        ({"database": {"existingSecret": "My_Secret"}}, "/database/existingSecret': 'My_Secret' does not match pattern"),
        ({"database": {"existingSecret": "-db"}}, "/database/existingSecret': '-db' does not match pattern"),
        ({"database": {"existingSecret": "a" * 254}}, "/database/existingSecret': maxLength: got 254, want 253"),
        ({"database": {"existingSecretKey": "a/b"}}, "/database/existingSecretKey': 'a/b' does not match pattern"),
        ({"database": {"existingSecretKey": ""}}, "/database/existingSecretKey': minLength: got 0, want 1"),
        ({"database": {"existingSecretKey": "k" * 254}}, "/database/existingSecretKey': maxLength: got 254, want 253"),
    ],
    ids=[
        "sqlite-replicas", "sqlite-hpa", "no-database", "wrong-type", "unknown-key", "bad-enum", "hpa-bounds",
        "retention-not-a-duration", "retention-no-unit", "retention-a-number", "quota-negative", "quota-fraction",
        "rate-negative", "rate-a-string", "rate-too-high", "rate-too-low", "quota-too-high", "burst-negative", "tenants-unknown-key", "burst-without-rate",
        "stall-not-a-duration", "stall-no-unit", "stall-a-number", "stall-a-boolean",
        "secret-name-not-dns", "secret-name-leading-dash", "secret-name-too-long",
        "secret-key-slash", "secret-key-empty", "secret-key-too-long",
    ],
)
def test_values_that_cannot_work_fail_with_a_clear_message(values, message):
    with pytest.raises(helm.HelmError) as error:
        render(values)
    assert message in str(error.value)
