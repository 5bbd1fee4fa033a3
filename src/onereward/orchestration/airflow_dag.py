"""The Airflow 3 retraining DAG, built from the graph.

The first task, `plan`, computes every stage's keyed input and output URIs once (`onereward plan`; the
curate key holds a fingerprint of its source, so this runs at run time, not at parse time) and pushes them
to XCom; every stage task reads its URIs from there. Outputs are keyed by their inputs and parameters, so a
run whose inputs did not change finds them cached, on every runner.

`local` mode runs each task in the worker process (dag.test() runs the tiny pipeline); `kubernetes` mode runs
each as a KubernetesPodOperator in the project image, GPU stages on the GPU node pool. Only URIs travel
between tasks (XCom), never data. Nothing here touches the network or imports torch at parse time.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta
from typing import Any

from onereward.config import Settings
from onereward.orchestration import contract
from onereward.pipeline import GRAPH, Graph, Resources, RetryPolicy, Stage

NEW_DATA_ASSET = "s3://onereward-data/manifests/images.parquet"
PLAN_TASK = "plan"
PLAN_RESOURCES = Resources(cpu="500m", memory="2Gi")
PLAN_RETRY = RetryPolicy()
ARTIFACT_ROOT_VARIABLE = "onereward_artifact_root"
XCOM_FILE = "/airflow/xcom/return.json"


def retry_args(policy: RetryPolicy) -> dict[str, Any]:
    return {"retries": policy.retries, "retry_delay": timedelta(seconds=policy.backoff_seconds),
            "retry_exponential_backoff": policy.backoff_factor,
            "max_retry_delay": timedelta(seconds=policy.max_backoff_seconds)}


def timeout_args(resources: Resources) -> dict[str, Any]:
    return {"execution_timeout": timedelta(seconds=resources.timeout_s)} if resources.timeout_s else {}


def _root_override(settings: Settings) -> str:
    """`artifact_root=` the Airflow Variable when set, else the profile's (an empty value means the default)."""
    default = json.dumps(settings.artifact_root or "")
    return f"artifact_root={{{{ var.value.get('{ARTIFACT_ROOT_VARIABLE}', {default}) }}}}"


def _planned(stage: str, side: str, name: str) -> str:
    return f"{{{{ ti.xcom_pull(task_ids='{PLAN_TASK}')['{stage}']['{side}']['{name}'] }}}}"


def _plan_callable(graph: Graph, config: str, overrides: list[str]):
    def plan(root_override: str, **_: Any) -> dict[str, dict]:
        from onereward.orchestration.entry import plan_uris

        return plan_uris(config, [*overrides, root_override], graph)

    return plan


def _stage_callable(stage_name: str, config: str, overrides: list[str]):
    def run(**context: Any) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowSkipException

        from onereward.orchestration.entry import run_stage
        from onereward.stages import StageNotImplemented

        step = context["ti"].xcom_pull(task_ids=PLAN_TASK)[stage_name]
        try:
            result = run_stage(stage_name, config, overrides, step["inputs"], step["outputs"])
        except StageNotImplemented as e:  # later stages land in their own issues
            raise AirflowSkipException(str(e)) from e
        print(json.dumps(result, default=str))
        return {k: result[k] for k in ("status", "key", "outputs")}

    run.__name__ = f"run_{stage_name}"
    return run


def _pod_operator(task_id: str, args: list[str], resources: Resources, retry: RetryPolicy, settings: Settings,
                  image: str, namespace: str, *, xcom: bool = False, cmds: tuple[str, ...] = ("onereward",)):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    res = settings.resources
    gpu = resources.gpu
    requirements = k8s.V1ResourceRequirements(
        requests={"cpu": resources.cpu, "memory": resources.memory},
        limits={"memory": resources.memory, **({res.gpu_type: str(gpu)} if gpu else {})},
    )
    volumes, mounts = [], []
    if resources.shm:
        volumes.append(k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(
            medium="Memory", size_limit=resources.shm)))
        mounts.append(k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"))
    return KubernetesPodOperator(
        task_id=task_id,
        name=f"onereward-{task_id.replace('_', '-')}",
        namespace=namespace,
        image=image,
        cmds=list(cmds),
        arguments=args,
        container_resources=requirements,
        node_selector=contract.node_selector(res, bool(gpu)),
        tolerations=[k8s.V1Toleration(**contract.gpu_toleration(res))] if gpu else [],
        volumes=volumes,
        volume_mounts=mounts,
        env_from=[
            k8s.V1EnvFromSource(config_map_ref=k8s.V1ConfigMapEnvSource(name=contract.PIPELINE_CONFIGMAP)),
            k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=contract.S3_SECRET)),
            k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=contract.MLFLOW_CLIENT_SECRET, optional=True)),
        ],
        service_account_name=contract.SERVICE_ACCOUNT,
        # in-cluster credentials unless a kubeconfig is named (Airflow outside the cluster, tests)
        in_cluster=not os.environ.get("KUBECONFIG"),
        config_file=os.environ.get("KUBECONFIG"),
        do_xcom_push=xcom,
        get_logs=True,
        on_finish_action="delete_succeeded_pod",
        **retry_args(retry),
        **timeout_args(resources),
    )


def _stage_args(stage: Stage, config: str, overrides: list[str]) -> list[str]:
    args = ["stage", stage.name, "--config", config, "--set-json", json.dumps(overrides)]
    for name in stage.inputs:
        args += ["--in", f"{name}={_planned(stage.name, 'inputs', name)}"]
    for o in stage.outputs:
        args += ["--out", f"{o.name}={_planned(stage.name, 'outputs', o.name)}"]
    return args


def build_dag(graph: Graph = GRAPH, *, dag_id: str = "onereward_retraining", mode: str | None = None,
              config: str | None = None, overrides: list[str] | None = None, schedule: str | None = None):
    from airflow.sdk import DAG, Asset, AssetOrTimeSchedule, CronTriggerTimetable

    from onereward.config import load_config

    mode = mode or os.environ.get("ONEREWARD_DAG_MODE", "local")
    config = config or os.environ.get("ONEREWARD_CONFIG", "tiny")
    overrides = overrides if overrides is not None else json.loads(os.environ.get("ONEREWARD_OVERRIDES", "[]"))
    cron = schedule or os.environ.get("ONEREWARD_SCHEDULE", "0 3 * * 1")
    new_data = Asset(os.environ.get("ONEREWARD_NEW_DATA_ASSET", NEW_DATA_ASSET))
    image = os.environ.get("ONEREWARD_IMAGE", "ghcr.io/onereward/onereward:0.1.0")
    gpu_image = os.environ.get("ONEREWARD_GPU_IMAGE", "ghcr.io/onereward/onereward:0.1.0-gpu")
    namespace = os.environ.get("ONEREWARD_NAMESPACE", "onereward")
    settings = load_config(config, overrides)  # parsed once; pydantic + YAML only, no network
    graph = graph.with_resources(settings.resources.gpus, settings.resources.timeouts,
                                 settings.resources.cpu_processes)
    root_override = _root_override(settings)
    dag = DAG(
        dag_id=dag_id,
        schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=[new_data]),
        start_date=datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=1,
        tags=["onereward", mode],
        doc_md=__doc__,
    )
    with dag:
        if mode == "kubernetes":
            plan = _pod_operator(PLAN_TASK, ["plan", "--config", config, "--set-json", json.dumps(overrides),
                                             "--set", root_override, "--outputs-file", XCOM_FILE],
                                 PLAN_RESOURCES, PLAN_RETRY, settings, image, namespace, xcom=True)
        else:
            from airflow.providers.standard.operators.python import PythonOperator

            plan = PythonOperator(task_id=PLAN_TASK, python_callable=_plan_callable(graph, config, overrides),
                                  op_kwargs={"root_override": root_override}, **retry_args(PLAN_RETRY))
        tasks: dict[str, Any] = {}
        for s in graph:
            if mode == "kubernetes":
                op = _pod_operator(s.name, _stage_args(s, config, overrides), s.resources, s.retry, settings,
                                   gpu_image if s.resources.gpu else image, namespace,
                                   cmds=tuple(contract.entrypoint(s)))
            else:
                op = PythonOperator(task_id=s.name, python_callable=_stage_callable(s.name, config, overrides),
                                    **retry_args(s.retry), **timeout_args(s.resources))
            plan >> op
            for u in graph.upstream(s):
                tasks[u.name] >> op
            tasks[s.name] = op
    return dag
