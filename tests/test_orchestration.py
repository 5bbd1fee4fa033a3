"""KFP v2 and Airflow 3 built from the one pipeline graph."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from sizes import WHOLE_GRAPH

from onereward.config import ConfigError, load_config
from onereward.orchestration import contract
from onereward.pipeline import GRAPH, PENDING, Graph, Output, Resources, Stage

ROOT = Path(__file__).resolve().parents[1]


def _compile(tmp_path, graph=GRAPH, overrides=()):
    from onereward.orchestration.kfp_pipeline import compile_pipeline

    out = tmp_path / "pipeline.yaml"
    compile_pipeline(str(out), load_config("flux", list(overrides)), "img:cpu", "img:gpu", graph)
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
        assert kex["secretAsEnv"][0]["secretName"] == contract.S3_SECRET
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


def test_a_data_parallel_stage_on_several_gpus_runs_one_process_per_gpu(tmp_path, kubeconfig):
    """rl_finetune given 4 GPUs by the config (`resources.gpus`): its KFP task and its Airflow pod ask for 4 GPUs
    and start `accelerate launch` with 4 processes; every other stage, and rl_finetune on one GPU (the profile as
    shipped), runs `onereward` itself. A count for a CPU stage, or more than one for a one-process stage, is
    refused by name."""
    from onereward.orchestration.airflow_dag import build_dag

    four = ["resources.gpus={rl_finetune: 4}"]
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "4", "-m", "onereward"]
    assert contract.entrypoint(GRAPH.get("rl_finetune")) == ["onereward"]
    spec, _ = _compile(tmp_path, overrides=four)
    for s in GRAPH:
        task = f"exec-{s.name.replace('_', '-')}"
        ex = spec["deploymentSpec"]["executors"][task]["container"]
        assert ex["command"] == (launch if s.name == "rl_finetune" else ["onereward"]), s.name
        if s.name == "rl_finetune":
            assert ex["resources"]["accelerator"]["resourceCount"] == "4"
    dag = build_dag(mode="kubernetes", config="flux", overrides=four, dag_id="dp_check")
    rl = dag.get_task("rl_finetune").build_pod_request_obj().spec.containers[0]
    assert rl.command == launch and rl.args[:2] == ["stage", "rl_finetune"]
    assert rl.resources.limits["nvidia.com/gpu"] == "4"
    assert dag.get_task("distill").build_pod_request_obj().spec.containers[0].command == ["onereward"]
    for gpus, message in (("{curate: 1}", "stage 'curate' runs on the CPU node pool"),
                          ("{evaluate: 2}", "stage 'evaluate' runs in one process and would use one of 2 GPUs"),
                          ("{judge: 1}", "unknown stage 'judge'")):
        with pytest.raises(ConfigError, match=message):
            build_dag(mode="kubernetes", config="flux", overrides=[f"resources.gpus={gpus}"], dag_id="bad")


def test_a_stage_deadline_from_the_config_reaches_its_kfp_task_and_airflow_task(tmp_path, kubeconfig):
    """`resources.timeouts` (stage -> seconds): a hung data-parallel process would otherwise hold its GPU node
    until someone looks. The stage named gets the deadline on both orchestrators, the others none; an unknown
    stage is refused by name."""
    from datetime import timedelta

    from onereward.orchestration.airflow_dag import build_dag

    two_hours = ["resources.timeouts={rl_finetune: 7200}"]
    _, platform = _compile(tmp_path, overrides=two_hours)
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert {name for name, ex in k8s.items() if "activeDeadlineSeconds" in ex} == {"exec-rl-finetune"}
    assert int(k8s["exec-rl-finetune"]["activeDeadlineSeconds"]) == 7200
    for mode in ("kubernetes", "local"):
        dag = build_dag(mode=mode, config="flux", overrides=two_hours, dag_id=f"deadline_{mode}")
        assert {t.task_id: t.execution_timeout for t in dag.tasks if t.execution_timeout} == \
            {"rl_finetune": timedelta(hours=2)}, mode
    with pytest.raises(ConfigError, match="resources.timeouts.judge: unknown stage 'judge'"):
        build_dag(mode="kubernetes", config="flux", overrides=["resources.timeouts={judge: 60}"], dag_id="bad")


def test_kfp_caching_is_off_exactly_for_fingerprinted_stages_and_retries_follow_the_graph(tmp_path):
    spec, _ = _compile(tmp_path)
    tasks = spec["root"]["dag"]["tasks"]
    fingerprinted = {s.name for s in GRAPH if s.fingerprint is not None}
    assert "curate" in fingerprinted
    assert {s.name for s in GRAPH if not tasks[s.name.replace("_", "-")]["cachingOptions"].get("enableCache")} \
        == fingerprinted
    for s in GRAPH:
        assert tasks[s.name.replace("_", "-")]["retryPolicy"] == {
            "maxRetryCount": s.retry.retries, "backoffDuration": f"{s.retry.backoff_seconds}s",
            "backoffFactor": s.retry.backoff_factor, "backoffMaxDuration": f"{s.retry.max_backoff_seconds}s"}


def test_kfp_local_runs_every_stage(tmp_path, home):
    from onereward import storage
    from onereward.orchestration.kfp_pipeline import run_local

    run_local(WHOLE_GRAPH, "tiny", str(tmp_path / "kfp-root"), GRAPH)
    [manifest] = (tmp_path / "kfp-root").glob("*/generate-candidates/candidates/_MANIFEST.json")
    cands = storage.Artifact(str(manifest.parent)).read_table()
    assert cands.num_rows == 8 * 2
    [prefs] = (tmp_path / "kfp-root").glob("*/label-preferences/preferences/_MANIFEST.json")
    assert storage.Artifact(str(prefs.parent)).read_table().num_rows > 0
    for task, output in (("train-reward", "reward_model"), ("train-audit-reward", "audit_model"),
                         ("rl-finetune", "policy"), ("distill", "student")):
        [judge] = (tmp_path / "kfp-root").glob(f"*/{task}/{output}/_MANIFEST.json")
        assert storage.Artifact(str(judge.parent)).read_json("registry.json")["version"].isdigit()
    [ev] = (tmp_path / "kfp-root").glob("*/evaluate/evaluation/_MANIFEST.json")
    assert b"verdict: PASSED" in storage.Artifact(str(ev.parent)).read_bytes("report.html")
    [pr] = (tmp_path / "kfp-root").glob("*/promote/promotion/_MANIFEST.json")
    assert storage.Artifact(str(pr.parent)).read_json("promotion.json")["promoted"] is True


def _dagbag():
    from airflow.models import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


def _assert_retry_policy(task, policy):
    assert (task.retries, task.retry_delay.total_seconds(), task.retry_exponential_backoff,
            task.max_retry_delay.total_seconds()) == (policy.retries, policy.backoff_seconds, policy.backoff_factor,
                                                      policy.max_backoff_seconds), task.task_id


def test_dagbag_has_no_import_errors(monkeypatch):
    from onereward.orchestration.airflow_dag import PLAN_RETRY, PLAN_TASK

    monkeypatch.setenv("ONEREWARD_DAG_MODE", "local")
    bag = _dagbag()
    assert bag.import_errors == {}
    dag = bag.dags["onereward_retraining"]
    assert [t.task_id for t in dag.topological_sort()] == [PLAN_TASK, *GRAPH.names]
    assert dag.get_task(PLAN_TASK).upstream_task_ids == set()
    for s in GRAPH:  # every stage reads its URIs from the plan
        task = dag.get_task(s.name)
        assert task.upstream_task_ids == {PLAN_TASK, *(u.name for u in GRAPH.upstream(s))}
        _assert_retry_policy(task, s.retry)
    _assert_retry_policy(dag.get_task(PLAN_TASK), PLAN_RETRY)
    assert dag.get_task("pretrain_base").upstream_task_ids == {PLAN_TASK, "synthesize_masks"}


def _jinja(text: str, plan: dict, variables: dict[str, str]) -> str:
    """Render an Airflow template with a stand-in for `ti` (the plan task's XCom) and `var`."""
    import jinja2

    ti = SimpleNamespace(xcom_pull=lambda task_ids: plan if task_ids == "plan" else None)
    var = SimpleNamespace(value=SimpleNamespace(get=lambda key, default=None: variables.get(key, default)))
    return jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(text).render(ti=ti, var=var)


def _pairs(args: list[str], flag: str) -> dict[str, str]:
    return dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == flag)


@pytest.fixture
def kubeconfig(monkeypatch, tmp_path):
    """A kube-config naming a cluster nobody answers at: the pod builder reads one, the tests call no cluster."""
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "x"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(path))
    return path


def test_kubernetes_mode_builds_gpu_pod_specs(kubeconfig):
    from onereward.orchestration.airflow_dag import PLAN_RETRY, build_dag

    dag = build_dag(mode="kubernetes", config="flux", overrides=["seed=3"], dag_id="k8s_check")
    gpu = dag.get_task("pretrain_base").build_pod_request_obj()
    c = gpu.spec.containers[0]
    assert gpu.spec.node_selector == {"node-pool": "gpu-h100"}
    assert gpu.spec.tolerations[0].key == "nvidia.com/gpu"
    assert c.resources.limits["nvidia.com/gpu"] == "1"
    assert c.args[:2] == ["stage", "pretrain_base"] and "conditions" in " ".join(c.args)
    cpu = dag.get_task("curate").build_pod_request_obj()
    assert cpu.spec.node_selector == {"node-pool": "cpu-pool"} and not cpu.spec.tolerations
    assert "nvidia.com/gpu" not in (cpu.spec.containers[0].resources.limits or {})

    # the plan pod runs first and pushes {stage: {inputs, outputs}}; the Variable overrides the root
    plan_task = dag.get_task("plan")
    assert [t.task_id for t in dag.topological_sort()][0] == "plan" and plan_task.do_xcom_push
    args = plan_task.build_pod_request_obj().spec.containers[0].args
    assert args[:5] == ["plan", "--config", "flux", "--set-json", '["seed=3"]']
    assert args[args.index("--outputs-file") + 1] == "/airflow/xcom/return.json"
    root = args[args.index("--set") + 1]
    assert _jinja(root, {}, {}) == "artifact_root=s3://onereward-artifacts/pipeline"
    assert _jinja(root, {}, {"onereward_artifact_root": "s3://other/x"}) == "artifact_root=s3://other/x"
    _assert_retry_policy(plan_task, PLAN_RETRY)

    # every stage pod takes its --in/--out URIs from the plan's XCom: nothing per-run
    plan = {s.name: {"inputs": {n: f"in://{s.name}/{n}" for n in s.inputs},
                     "outputs": {o.name: f"out://{s.name}/{o.name}" for o in s.outputs}} for s in GRAPH}
    for s in GRAPH:
        task = dag.get_task(s.name)
        args = task.build_pod_request_obj().spec.containers[0].args
        assert "run_id" not in " ".join(args) and "--outputs-file" not in args
        assert args[:6] == ["stage", s.name, "--config", "flux", "--set-json", '["seed=3"]']
        rendered = [_jinja(a, plan, {}) for a in args]
        assert _pairs(rendered, "--in") == plan[s.name]["inputs"]
        assert _pairs(rendered, "--out") == plan[s.name]["outputs"]
        assert "plan" in task.upstream_task_ids
        _assert_retry_policy(task, s.retry)


def test_plan_subcommand_writes_the_runners_plan(home, tmp_path, capsys):
    from onereward.cli import main
    from onereward.runner import plan

    out = tmp_path / "xcom" / "return.json"
    assert main(["plan", "--config", "tiny", "--set-json", json.dumps(WHOLE_GRAPH), "--set", "artifact_root=",
                 "--outputs-file", str(out)]) == 0
    written = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == written
    expected = plan(load_config("tiny", WHOLE_GRAPH))
    assert list(written) == [p.stage.name for p in expected]
    for p in expected:
        assert written[p.stage.name] == {"key": p.key, "inputs": p.inputs, "outputs": p.outputs}
    assert written["curate"]["outputs"]["curated"].startswith(str(home / "artifacts"))

    # the Airflow Variable's override of the root (a later --set wins over --set-json)
    assert main(["plan", "--config", "tiny", "--set-json", json.dumps(WHOLE_GRAPH), "--set",
                 f"artifact_root={tmp_path / 'elsewhere'}"]) == 0
    moved = json.loads(capsys.readouterr().out)
    assert moved["curate"]["key"] == written["curate"]["key"]
    assert moved["curate"]["outputs"]["curated"] == str(tmp_path / "elsewhere" / "curate" / written["curate"]["key"]
                                                        / "curated")


def test_dag_test_runs_every_stage(airflow_db, home, monkeypatch):
    monkeypatch.setenv("ONEREWARD_DAG_MODE", "local")
    monkeypatch.setenv("ONEREWARD_OVERRIDES", json.dumps(WHOLE_GRAPH))
    dag = _dagbag().dags["onereward_retraining"]
    from onereward import storage
    from onereward.runner import plan

    planned = {p.stage.name: p for p in plan(load_config("tiny", WHOLE_GRAPH))}
    for attempt in ("first", "second"):  # the second run of the DAG reuses every output of the first
        run = dag.test()
        tis = {ti.task_id: ti for ti in run.get_task_instances()}
        states = {k: str(ti.state) for k, ti in tis.items()}
        assert states["plan"].endswith("success"), states
        for s in GRAPH:
            assert states[s.name].endswith("success"), states
            result = tis[s.name].xcom_pull(task_ids=s.name)
            assert result["outputs"] == planned[s.name].outputs and result["key"] == planned[s.name].key
            assert result["status"] == ("done" if attempt == "first" else "cached"), (attempt, s.name, result)
    assert storage.Artifact(planned["generate_candidates"].outputs["candidates"]).exists()


def test_graph_is_the_single_source(tmp_path, monkeypatch):
    extra = Stage(name="audit_candidates", func=PENDING, inputs=("candidates",),
                  outputs=(Output("audit", "Metrics"),), params=("seed",), resources=Resources(gpu=1))
    graph = GRAPH.with_stage(extra)
    spec, platform = _compile(tmp_path, graph)
    assert "audit-candidates" in spec["root"]["dag"]["tasks"]
    assert "audit-candidates" in spec["root"]["dag"]["tasks"]["audit-candidates"]["componentRef"]["name"]
    assert "exec-audit-candidates" in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    from onereward.orchestration.airflow_dag import build_dag

    dag = build_dag(graph, mode="local", dag_id="copy_check")
    assert dag.get_task("audit_candidates").upstream_task_ids == {"plan", "generate_candidates"}
    with pytest.raises(ValueError, match="no earlier stage produces"):
        Graph((extra,))


def test_cli_graph_lists_every_stage(capsys):
    from onereward.cli import main

    assert main(["graph", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [s["stage"] for s in listed] == GRAPH.names
    assert {"name": "base_model", "kind": "Model"} in listed[2]["outputs"]
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_git_commit_prefers_the_images_build_argument(monkeypatch):
    from onereward import tracking

    monkeypatch.setenv("ONEREWARD_GIT_COMMIT", "0123abc")  # an image holds no .git; its build argument tells
    assert tracking.git_commit() == "0123abc"
    monkeypatch.setenv("ONEREWARD_GIT_COMMIT", "")  # built without it: the checkout's HEAD, or "unknown"
    assert tracking.git_commit() != "0123abc"
