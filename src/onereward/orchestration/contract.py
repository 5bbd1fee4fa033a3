"""The names the pipeline pods rely on, declared once. The Helm chart (charts/onereward, installed as release
`onereward`) renders them, the KFP builder and the Airflow pod builder reference them from here, and
tests/test_deploy_contract.py checks the compiled pipeline and the pods against the rendered chart."""

from __future__ import annotations

from onereward.config import Resources
from onereward.pipeline import Stage

SERVICE_ACCOUNT = "onereward"

S3_SECRET = "onereward-s3"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

# Optional: the chart renders it with empty keys, which MLflow treats as "no authentication".
MLFLOW_CLIENT_SECRET = "onereward-mlflow-client"
MLFLOW_CLIENT_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")

PIPELINE_CONFIGMAP = "onereward-pipeline"
PIPELINE_CONFIGMAP_KEYS = ("MLFLOW_TRACKING_URI", "AWS_DEFAULT_REGION")
# Published only when the chart's s3.endpointUrl is set (AWS S3 needs none), so mapped as optional.
# storage.py and boto3 (so MLflow's S3 artifact client too) read it.
PIPELINE_CONFIGMAP_OPTIONAL_KEYS = ("AWS_ENDPOINT_URL_S3",)

NODE_POOL_LABEL = "node-pool"  # the chart's gpuNodePool.nodeSelectorKey
GPU_TOLERATION_OPERATOR = "Exists"
GPU_TOLERATION_EFFECT = "NoSchedule"


def node_selector(resources: Resources, gpu: bool) -> dict[str, str]:
    return {NODE_POOL_LABEL: resources.gpu_node_pool if gpu else resources.cpu_node_pool}


def gpu_toleration(resources: Resources) -> dict[str, str]:
    return {"key": resources.toleration_key, "operator": GPU_TOLERATION_OPERATOR, "effect": GPU_TOLERATION_EFFECT}


def entrypoint(stage: Stage) -> list[str]:
    """The container command a stage's pod runs: `onereward`, or for a data-parallel stage given more than one
    GPU, one process per GPU of it under `accelerate launch` (onereward.distributed: the main process tracks and
    writes, the others train beside it)."""
    gpus = stage.resources.gpu
    if stage.data_parallel and gpus > 1:
        return ["accelerate", "launch", "--multi_gpu", "--num_processes", str(gpus), "-m", "onereward"]
    return ["onereward"]
