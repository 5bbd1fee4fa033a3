"""KFP v2 and Airflow 3 built from the one pipeline graph."""

import json
import os
from pathlib import Path

import pytest
import yaml

from onereward.config import load_config
from onereward.pipeline import GRAPH, Graph, Output, Resources, Stage

ROOT = Path(__file__).resolve().parents[1]
TINY = ["curate.sources=[{kind: procedural, count: 48}]", "masks.heldout_fraction=0.25",
        "masks.mix_tolerance=0.3", "pretrain.steps=8", "pretrain.batch_size=8", "pretrain.eval_conditions=4",
        "candidates.max_conditions=4", "candidates.per_condition=2", "candidates.steps=[2]",
        "candidates.guidance=[1.0]"]
IMPLEMENTED = Graph(GRAPH.stages[:4])


def _compile(tmp_path, graph=GRAPH):
    from onereward.orchestration.kfp_pipeline import compile_pipeline

    out = tmp_path / "pipeline.yaml"
    compile_pipeline(str(out), load_config("flux"), "img:cpu", "img:gpu", graph)
    docs = list(yaml.safe_load_all(out.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


def test_kfp_compiles_one_task_per_stage_with_gpu_settings(tmp_path):
    spec, platform = _compile(tmp_path)
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {s.name.replace("_", "-") for s in GRAPH}
    execs = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for s in GRAPH:
        ex = execs[f"exec-{s.name.replace('_', '-')}"]["container"]
        assert ex["args"][:2] == ["stage", s.name] and ex["command"] == ["onereward"]
        kex = k8s[f"exec-{s.name.replace('_', '-')}"]
        assert kex["secretAsEnv"][0]["secretName"] == "onereward-s3"
        if s.resources.gpu:
            assert ex["image"] == "img:gpu" and ex["resources"]["accelerator"]["resourceCount"] == "1"
            assert kex["nodeSelector"]["labels"] == {"node-pool": "gpu-h100"}
            assert kex["tolerations"][0]["key"] == "nvidia.com/gpu"
            assert kex["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
        else:
            assert ex["image"] == "img:cpu" and "accelerator" not in ex.get("resources", {})
            assert kex["nodeSelector"]["labels"] == {"node-pool": "cpu-pool"}
    # artifacts flow by name: generate_candidates reads the base model produced by pretrain_base
    gc = tasks["generate-candidates"]["inputs"]["artifacts"]["base_model"]["taskOutputArtifact"]
    assert gc == {"outputArtifactKey": "base_model", "producerTask": "pretrain-base"}
    assert spec["root"]["inputDefinitions"]["parameters"]["config"]["defaultValue"] == "configs/flux.yaml"


def test_kfp_local_runs_implemented_stages(tmp_path, home):
    from onereward import storage
    from onereward.orchestration.kfp_pipeline import run_local

    run_local(TINY, "tiny", str(tmp_path / "kfp-root"), IMPLEMENTED)
    [manifest] = (tmp_path / "kfp-root").glob("*/generate-candidates/candidates/_MANIFEST.json")
    cands = storage.Artifact(str(manifest.parent)).read_table()
    assert cands.num_rows == 4 * 2


def _dagbag():
    from airflow.models import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


def test_dagbag_has_no_import_errors(monkeypatch):
    monkeypatch.setenv("ONEREWARD_DAG_MODE", "local")
    bag = _dagbag()
    assert bag.import_errors == {}
    dag = bag.dags["onereward_retraining"]
    assert [t.task_id for t in dag.topological_sort()] == GRAPH.names
    assert all(t.retries >= 2 for t in dag.tasks)
    assert dag.get_task("pretrain_base").upstream_task_ids == {"synthesize_masks"}


def test_kubernetes_mode_builds_gpu_pod_specs(monkeypatch, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "x"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    from onereward.orchestration.airflow_dag import build_dag

    dag = build_dag(mode="kubernetes", config="flux", overrides=[], dag_id="k8s_check")
    gpu = dag.get_task("pretrain_base").build_pod_request_obj()
    c = gpu.spec.containers[0]
    assert gpu.spec.node_selector == {"node-pool": "gpu-h100"}
    assert gpu.spec.tolerations[0].key == "nvidia.com/gpu"
    assert c.resources.limits["nvidia.com/gpu"] == "1"
    assert c.args[:2] == ["stage", "pretrain_base"] and "conditions" in " ".join(c.args)
    cpu = dag.get_task("curate").build_pod_request_obj()
    assert cpu.spec.node_selector == {"node-pool": "cpu-pool"} and not cpu.spec.tolerations
    assert "nvidia.com/gpu" not in (cpu.spec.containers[0].resources.limits or {})


def test_dag_test_runs_implemented_stages(airflow_db, home, monkeypatch):
    monkeypatch.setenv("ONEREWARD_DAG_MODE", "local")
    monkeypatch.setenv("ONEREWARD_OVERRIDES", json.dumps(TINY))
    dag = _dagbag().dags["onereward_retraining"]
    run = dag.test()
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    for s in IMPLEMENTED:
        assert states[s.name].endswith("success"), states
    assert states["label_preferences"].endswith("skipped"), states
    from onereward import storage
    from onereward.runner import plan

    final = next(p for p in plan(load_config("tiny", TINY)) if p.stage.name == "generate_candidates")
    assert storage.Artifact(final.outputs["candidates"]).exists()


def test_graph_is_the_single_source(tmp_path, monkeypatch):
    extra = Stage("audit_candidates", "onereward.stages.pending:not_implemented", ("candidates",),
                  (Output("audit", "Metrics"),), ("seed",), Resources(gpu=1))
    graph = GRAPH.with_stage(extra)
    spec, platform = _compile(tmp_path, graph)
    assert "audit-candidates" in spec["root"]["dag"]["tasks"]
    assert "audit-candidates" in spec["root"]["dag"]["tasks"]["audit-candidates"]["componentRef"]["name"]
    assert "exec-audit-candidates" in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    from onereward.orchestration.airflow_dag import build_dag

    dag = build_dag(graph, mode="local", dag_id="copy_check")
    assert dag.get_task("audit_candidates").upstream_task_ids == {"generate_candidates"}
    with pytest.raises(ValueError, match="no earlier stage produces"):
        Graph((extra,))


def test_cli_graph_lists_every_stage(capsys):
    from onereward.cli import main

    assert main(["graph", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [s["stage"] for s in listed] == GRAPH.names
    assert {"name": "base_model", "kind": "Model"} in listed[2]["outputs"]
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
