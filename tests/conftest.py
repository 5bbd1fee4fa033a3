"""Shared fixtures: an isolated ONEREWARD_HOME per test, small settings, and real servers on loopback
(moto_server for S3, `mlflow server` for tracking) started as subprocesses."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)
# make test runs two pytest-xdist workers on two cores: a torch of two threads in each oversubscribes them
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Airflow reads its configuration at import: point it at a throwaway home and this repo's dags folder.
_AIRFLOW_HOME = tempfile.mkdtemp(prefix="airflow-home-")
atexit.register(shutil.rmtree, _AIRFLOW_HOME, ignore_errors=True)  # one a pytest session piled up in /tmp
os.environ.update({
    "AIRFLOW_HOME": _AIRFLOW_HOME,
    "AIRFLOW__CORE__DAGS_FOLDER": str(Path(__file__).resolve().parents[1] / "dags"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__PARALLELISM": "4",
    "AIRFLOW__API__HOST": "127.0.0.1",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_AIRFLOW_HOME}/airflow.db",
    "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
})

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "home"
    monkeypatch.setenv("ONEREWARD_HOME", str(h))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return h


@pytest.fixture(autouse=True)
def _tracking_uri_as_it_was():
    """mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI (MLflow 3): put it back after each test, or the store
    of one test's home becomes the next test's."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    from homes import restore_env

    restore_env("MLFLOW_TRACKING_URI", before)


@pytest.fixture(scope="session")
def upstream_home(tmp_path_factory) -> Path:
    """Conditions, base and both judges at the reduced sizes of tests/sizes.py (UPSTREAM), trained once a session
    for the modules that start from them; each takes its own copy (`copy_home`), so registries stay apart. Under
    pytest-xdist the workers share one: the first to ask trains it under a file lock, the others wait and read it."""
    from filelock import FileLock
    from homes import in_home
    from sizes import UPSTREAM

    from onereward.config import load_config
    from onereward.runner import run_pipeline

    def train(home: Path) -> Path:
        shutil.rmtree(home, ignore_errors=True)  # what a worker that failed here left
        with in_home(home):
            run_pipeline(load_config("tiny", UPSTREAM), until="train_audit_reward")
        return home

    # a pytest-xdist worker's basetemp lies in the session's folder, which every worker shares
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "upstream"
    root.mkdir(exist_ok=True)
    with FileLock(str(root / "lock")):
        if not (root / "trained").exists():
            train(root / "home")
            (root / "trained").touch()
    return root / "home"


SMALL = [
    "curate.sources=[{kind: procedural, count: 48}]",
    "masks.conditions_per_image=2",
    "masks.heldout_fraction=0.25",
    "masks.mix_tolerance=0.3",
]


@pytest.fixture
def small_settings(home):
    from onereward.config import load_config

    def make(*overrides: str):
        return load_config("tiny", [*SMALL, *overrides])

    return make


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto_server) on loopback; yields its endpoint."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint, 30)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_server)
    name = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` with a sqlite backend on loopback; yields its URI."""
    d = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}", "--artifacts-destination", str(d / "artifacts"),
         "--workers", "1"],
        stdout=open(d / "server.log", "wb"), stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", 90)
        yield uri
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.fixture(scope="session")
def helm_render():
    """Render charts/onereward with Helm's own library (helm-python-sdk), release `onereward` in namespace
    `ml`: a function of the values (merged over values.yaml) to {template path: [manifest, ...]}."""
    import helm_python
    import yaml

    chart = helm_python.Chart.load(ROOT / "charts" / "onereward")

    def render(values: dict | None = None) -> dict[str, list[dict]]:
        out = chart.render(values or {}, name="onereward", namespace="ml")
        return {path: [d for d in yaml.safe_load_all(text) if d] for path, text in out.items()}

    yield render
    chart.close()


@pytest.fixture(scope="session")
def airflow_db():
    """A migrated Airflow metadata DB (sqlite) for dag.test()."""
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], check=True, capture_output=True, timeout=300)
    return os.environ["AIRFLOW_HOME"]


@pytest.fixture(scope="session")
def flux_base(tmp_path_factory) -> Path:
    """A FluxFill checkpoint at toy width (components built from configs), laid out as
    `FluxFillPipeline.save_pretrained` writes the real one: the flux profile's base for CPU tests."""
    from onereward.models.flux import FluxFillGenerator

    path = tmp_path_factory.mktemp("flux") / "FLUX.1-Fill-toy"
    FluxFillGenerator.build_toy(32, ("fill red circle", "extend", "remove blue square", "")).save(path)
    return path


@pytest.fixture(scope="session")
def judge_bases(tmp_path_factory) -> dict[str, Path]:
    """Qwen2.5-VL and Qwen2-VL checkpoints at toy width with a byte-level BPE tokenizer trained locally, laid out
    as `save_pretrained` writes the real ones: the flux profile's judges (training and audit) for CPU tests."""
    from onereward.config import TASKS, load_config
    from onereward.models.judge import ARCHS, write_toy_checkpoint

    criteria = load_config("flux").labels.criteria
    cells = [(t, c) for t in TASKS for c in getattr(criteria, t)]
    prompts = ["fill red circle", "extend", "remove blue square", 'text "A7"', ""]
    root = tmp_path_factory.mktemp("judges")
    return {arch: write_toy_checkpoint(root / arch, arch, cells, prompts) for arch in ARCHS}
