"""The Airflow 3 retraining DAG, built from the graph.

`local` mode runs each stage in the worker process (dag.test() runs the tiny pipeline);
`kubernetes` mode runs each stage as a KubernetesPodOperator in the project image, GPU stages on the GPU
node pool. Only URIs travel between tasks (XCom), never data. Nothing here touches the network or
imports torch at parse time.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta
from typing import Any

from onereward.config import Settings
from onereward.pipeline import GRAPH, Graph, Stage

NEW_DATA_ASSET = "s3://onereward-data/manifests/images.parquet"


def _stage_callable(stage_name: str, upstream: list[str], config: str, overrides: list[str]):
    def run(**context: Any) -> dict[str, str]:
        from airflow.sdk.exceptions import AirflowSkipException

        from onereward.config import load_config
        from onereward.orchestration.entry import run_stage
        from onereward.runner import plan
        from onereward.stages import StageNotImplemented

        ti = context["ti"]
        inputs: dict[str, str] = {}
        for up in upstream:
            inputs.update(ti.xcom_pull(task_ids=up) or {})
        step = next(p for p in plan(load_config(config, overrides)) if p.stage.name == stage_name)
        try:
            result = run_stage(stage_name, config, overrides, {k: inputs[k] for k in step.stage.inputs},
                               step.outputs)
        except StageNotImplemented as e:  # later stages land in their own issues
            raise AirflowSkipException(str(e)) from e
        print(json.dumps(result, default=str))
        return result["outputs"]

    run.__name__ = f"run_{stage_name}"
    return run


def _pod_operator(stage: Stage, graph: Graph, settings: Settings, config: str, overrides: list[str], image: str,
                  gpu_image: str, namespace: str):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    res = settings.resources
    root = settings.resolved_artifact_root()
    args = ["stage", stage.name, "--config", config, "--set-json", json.dumps(overrides),
            "--outputs-file", "/airflow/xcom/return.json"]
    for name in stage.inputs:
        up = graph.producer(name).name
        args += ["--in", f"{name}={{{{ ti.xcom_pull(task_ids='{up}')['{name}'] }}}}"]
    for o in stage.outputs:  # per-run prefix under the artifact root; keys make reruns idempotent
        args += ["--out", f"{o.name}={{{{ var.value.get('onereward_artifact_root', '{root}') }}}}"
                 f"/{{{{ run_id | replace(':', '_') | replace('+', '_') }}}}/{stage.name}/{o.name}"]
    gpu = stage.resources.gpu
    resources = k8s.V1ResourceRequirements(
        requests={"cpu": stage.resources.cpu, "memory": stage.resources.memory},
        limits={"memory": stage.resources.memory, **({res.gpu_type: str(gpu)} if gpu else {})},
    )
    volumes, mounts = [], []
    if stage.resources.shm:
        volumes.append(k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(
            medium="Memory", size_limit=stage.resources.shm)))
        mounts.append(k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"))
    return KubernetesPodOperator(
        task_id=stage.name,
        name=f"onereward-{stage.name.replace('_', '-')}",
        namespace=namespace,
        image=gpu_image if gpu else image,
        cmds=["onereward"],
        arguments=args,
        container_resources=resources,
        node_selector={"node-pool": res.gpu_node_pool if gpu else res.cpu_node_pool},
        tolerations=[k8s.V1Toleration(key=res.toleration_key, operator="Exists", effect="NoSchedule")]
        if gpu else [],
        volumes=volumes,
        volume_mounts=mounts,
        env_from=[k8s.V1EnvFromSource(config_map_ref=k8s.V1ConfigMapEnvSource(name="onereward-pipeline")),
                  k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name="onereward-s3")),
                  k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name="onereward-mlflow-client",
                                                                          optional=True))],
        service_account_name="onereward",
        # in-cluster credentials unless a kubeconfig is named (Airflow outside the cluster, tests)
        in_cluster=not os.environ.get("KUBECONFIG"),
        config_file=os.environ.get("KUBECONFIG"),
        do_xcom_push=True,  # --outputs-file: {output name: URI} for the downstream tasks' templates
        get_logs=True,
        on_finish_action="delete_succeeded_pod",
        retries=stage.retries,
    )


def build_dag(graph: Graph = GRAPH, *, dag_id: str = "onereward_retraining", mode: str | None = None,
              config: str | None = None, overrides: list[str] | None = None, schedule: str | None = None):
    from airflow.sdk import DAG, Asset, AssetOrTimeSchedule, CronTriggerTimetable

    from onereward.config import load_config

    mode = mode or os.environ.get("ONEREWARD_DAG_MODE", "local")
    config = config or os.environ.get("ONEREWARD_CONFIG", "tiny")
    overrides = overrides if overrides is not None else json.loads(os.environ.get("ONEREWARD_OVERRIDES", "[]"))
    cron = schedule or os.environ.get("ONEREWARD_SCHEDULE", "0 3 * * 1")
    new_data = Asset(os.environ.get("ONEREWARD_NEW_DATA_ASSET", NEW_DATA_ASSET))
    settings = load_config(config, overrides)  # parsed once; pydantic + YAML only, no network
    dag = DAG(
        dag_id=dag_id,
        schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=[new_data]),
        start_date=datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=1,
        default_args={"retries": 2, "retry_delay": timedelta(minutes=2)},
        tags=["onereward", mode],
        doc_md=__doc__,
    )
    with dag:
        tasks: dict[str, Any] = {}
        for s in graph:
            upstream = [u.name for u in graph.upstream(s)]
            if mode == "kubernetes":
                op = _pod_operator(s, graph, settings, config, overrides, os.environ.get("ONEREWARD_IMAGE",
                                   "ghcr.io/onereward/onereward:0.1.0"),
                                   os.environ.get("ONEREWARD_GPU_IMAGE", "ghcr.io/onereward/onereward:0.1.0-gpu"),
                                   os.environ.get("ONEREWARD_NAMESPACE", "onereward"))
            else:
                from airflow.providers.standard.operators.python import PythonOperator

                op = PythonOperator(task_id=s.name, python_callable=_stage_callable(s.name, upstream, config,
                                                                                     overrides),
                                    retries=max(2, s.retries))
            for u in upstream:
                tasks[u] >> op
            tasks[s.name] = op
    return dag
