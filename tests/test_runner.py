"""The local runner runs stages that do not depend on each other (the two judges) side by side in child
processes, as KFP and Airflow run them as parallel tasks: a toy graph of real stages, the sqlite MLflow store."""

import os

import mlflow
import pytest
import side_stages

from onereward import storage, tracking
from onereward.config import load_config
from onereward.pipeline import Graph, Output, Stage
from onereward.runner import StageFailed, plan, run_pipeline, side_by_side

TOY = ["resources.cpu_processes={}"]  # the tiny profile's names stages the toy graph does not have


def _graph(right: str = "right") -> Graph:
    return Graph((
        Stage(name="source", func="side_stages:source", outputs=(Output("seed"),), params=("seed",)),
        Stage(name="left", func="side_stages:left", inputs=("seed",), outputs=(Output("left_out"),), params=("seed",)),
        Stage(name="right", func=f"side_stages:{right}", inputs=("seed",), outputs=(Output("right_out"),),
              params=("seed",)),
        Stage(name="join", func="side_stages:join", inputs=("left_out", "right_out"), outputs=(Output("joined"),),
              params=("seed",)),
    ))


def _runs(run_id: str) -> dict[str, mlflow.entities.Run]:
    tracking.setup("onereward")
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("onereward").experiment_id
    runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{run_id}'")
    return {r.info.run_name: r for r in runs}


def test_the_plan_groups_only_stages_that_read_nothing_of_each_other():
    from onereward.pipeline import GRAPH

    groups = [[p.stage.name for p in g] for g in side_by_side(plan(load_config("tiny"), GRAPH), jobs=2)]
    assert ["train_reward", "train_audit_reward"] in groups
    assert all(len(g) == 1 for g in groups if g != ["train_reward", "train_audit_reward"])
    assert all(len(g) == 1 for g in side_by_side(plan(load_config("tiny"), GRAPH), jobs=1))
    # a stage run as several processes takes the cores alone
    alone = side_by_side(plan(load_config("tiny"), GRAPH), jobs=2, processes={"train_audit_reward": 2})
    assert all(len(g) == 1 for g in alone)


def _ranks_graph() -> Graph:
    return Graph((
        Stage(name="source", func="side_stages:source", outputs=(Output("seed"),), params=("seed",)),
        Stage(name="ranks", func="side_stages:ranks", inputs=("seed",), outputs=(Output("ranks_out"),),
              params=("seed",), data_parallel=True),
    ))


def test_a_data_parallel_stage_runs_as_processes_on_the_cores_under_one_run(home, capfd):
    """`resources.cpu_processes`: the local runner starts a data-parallel stage as that many processes (what
    torchrun would, gloo on the CPU), the cores shared out; the main one alone tracks and writes. `jobs=1` runs it
    in the runner's own process; a stage that is not data-parallel is refused by name."""
    from onereward import machine
    from onereward.config import ConfigError

    settings = load_config("tiny", ["resources.cpu_processes={ranks: 2}"])
    first = run_pipeline(settings, graph=_ranks_graph(), jobs=2)
    assert [(o.stage, o.status) for o in first.outcomes] == [("source", "done"), ("ranks", "done")]
    assert "2/2 ranks (2 data-parallel processes)" in capfd.readouterr().err
    out = next(o for o in first.outcomes if o.stage == "ranks").outputs["ranks_out"]
    seen = storage.Artifact(out).read_json("ranks.json")
    assert [(r["rank"], r["world"]) for r in seen] == [(0, 2), (1, 2)]
    assert len({r["pid"] for r in seen} | {os.getpid()}) == 3
    assert {r["threads"] for r in seen} == {max(1, machine.cores() // 2)}
    runs = _runs(first.run_id)
    assert set(runs) == {"source", "ranks"} and runs["ranks"].data.metrics["processes"] == 2  # one run

    alone = run_pipeline(settings, graph=_ranks_graph(), jobs=1, force=("ranks",))
    assert [o.status for o in alone.outcomes] == ["cached", "done"]
    assert [(r["rank"], r["world"], r["pid"]) for r in storage.Artifact(out).read_json("ranks.json")] == [
        (0, 1, os.getpid())]
    with pytest.raises(ConfigError, match="resources.cpu_processes.source: stage 'source' runs in one process"):
        run_pipeline(load_config("tiny", ["resources.cpu_processes={source: 2}"]), graph=_ranks_graph(), jobs=2)


def test_a_failing_data_parallel_process_fails_its_stage_with_each_process_error(home):
    """Process 1 of 2 fails before the collective its peer waits in: the peer is not left waiting, the stage fails
    with each process's error named, and nothing is committed."""
    settings = load_config("tiny", ["resources.cpu_processes={ranks: 2}", f"seed={side_stages.FAIL_RANK_1}"])
    with pytest.raises(StageFailed) as err:
        run_pipeline(settings, graph=_ranks_graph(), jobs=2)
    assert err.value.stage == "ranks"
    # process 0 is stopped by the runner, or fails first on its own as the collective's peer hangs up
    assert "process 1: ValueError: ranks: process 1: row 3, field 'mask' is empty" in str(err.value)
    assert "process 0: " in str(err.value)
    out = {p.stage.name: p.outputs for p in plan(settings, _ranks_graph())}
    assert not storage.Artifact(out["ranks"]["ranks_out"]).exists()
    client = mlflow.MlflowClient()
    ranks = client.search_runs([client.get_experiment_by_name("onereward").experiment_id], "run_name = 'ranks'")
    assert all(r.info.status != "FINISHED" for r in ranks), [r.info.status for r in ranks]


def test_independent_stages_run_side_by_side_nested_under_the_pipeline_run(home, capfd):
    settings = load_config("tiny", TOY)
    first = run_pipeline(settings, graph=_graph(), jobs=2)
    shown = capfd.readouterr().err.splitlines()
    assert "left  | started" in shown and "right | started" in shown  # prefixed by stage, the name shown once
    assert [(o.stage, o.status) for o in first.outcomes] == [(s, "done") for s in ("source", "left", "right",
                                                                                   "join")]
    out = {o.stage: o.outputs for o in first.outcomes}
    left, right = storage.Artifact(out["join"]["joined"]).read_json("both.json")
    assert len({left["pid"], right["pid"], os.getpid()}) == 3  # each in a process of its own
    assert left["start"] < right["end"] and right["start"] < left["end"], (left, right)  # at the same time
    runs = _runs(first.run_id)
    assert set(runs) == {"source", "left", "right", "join"}  # the children's runs nest like the others
    assert runs["right"].info.status == "FINISHED" and runs["right"].data.metrics["slept"] >= 2.0
    assert runs["left"].data.tags["pid"] == str(left["pid"])

    again = run_pipeline(settings, graph=_graph(), jobs=2)
    assert [o.status for o in again.outcomes] == ["cached"] * 4
    forced = run_pipeline(settings, graph=_graph(), jobs=1, force=("left",))
    assert [o.status for o in forced.outcomes] == ["cached", "done", "cached", "cached"]
    left = storage.Artifact(out["left"]["left_out"]).read_json("who.json")
    assert left["pid"] == os.getpid()  # jobs=1: everything in this process, one by one


def test_a_failing_sibling_fails_the_pipeline_by_name_and_writes_nothing(home):
    settings = load_config("tiny", TOY)
    with pytest.raises(StageFailed) as err:
        run_pipeline(settings, graph=_graph("right_fails"), jobs=2)
    assert err.value.stage == "right"
    assert "ValueError: right: row 3, field 'mask' is empty" in str(err.value)
    out = {p.stage.name: p.outputs for p in plan(settings, _graph("right_fails"))}
    assert storage.Artifact(out["left"]["left_out"]).exists()  # the sibling ran to the end and committed
    assert not storage.Artifact(out["right"]["right_out"]).exists()
    halves = list(home.rglob("half.json"))  # the failed stage's staged file was dropped, not left beside
    assert len(halves) == 1 and "/left/" in str(halves[0]), halves
    runs = _runs(_pipeline_id())
    assert runs["right"].info.status == "FAILED" and runs["left"].info.status == "FINISHED"
    assert "join" not in runs  # nothing after the failed group ran


def _pipeline_id() -> str:
    tracking.setup("onereward")
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("onereward").experiment_id
    return client.search_runs([exp], f"tags.`{tracking.KIND_TAG}` = 'pipeline'")[0].info.run_id


def test_a_stopped_runner_stops_its_children_and_their_runs_end_killed(home):
    """SIGTERM to the runner (Ctrl-C's sibling, what a scheduler sends) while two stages run side by side: both
    children unwind, their MLflow runs end KILLED and nothing they staged stays behind."""
    import subprocess
    import sys
    import time

    script = ("import signal, sys; from onereward.signals import exit_on_sigterm; "
              "signal.signal(signal.SIGTERM, exit_on_sigterm); sys.path.insert(0, sys.argv[1]); "
              "from test_runner import TOY, _graph; from onereward.config import load_config; "
              "from onereward.runner import run_pipeline; "
              "run_pipeline(load_config('tiny', TOY), graph=_graph(), jobs=2)")
    tracking.setup("onereward")  # the store exists before three processes use it
    proc = subprocess.Popen([sys.executable, "-c", script, os.path.dirname(__file__)],
                            env={**os.environ, "SIDE_STAGE_SLEEP": "60"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline, runs = time.time() + 120, {}
    while time.time() < deadline and not {"left", "right"} <= set(runs):  # both children's runs are open
        time.sleep(0.3)
        runs = {r.info.run_name: r for r in mlflow.MlflowClient().search_runs(
            [mlflow.get_experiment_by_name("onereward").experiment_id], "attributes.status = 'RUNNING'")}
    assert {"left", "right"} <= set(runs), proc.stderr.read() if proc.poll() is not None else runs
    proc.terminate()
    assert proc.wait(60) != 0
    client = mlflow.MlflowClient()
    assert {client.get_run(runs[n].info.run_id).info.status for n in ("left", "right")} == {"KILLED"}
    assert not list(home.rglob("half.json")) and not list(home.rglob(".staging-*"))


def test_only_a_data_parallel_stage_runs_as_a_worker_process(home, monkeypatch):
    """Launched as process 1 of 2 (accelerate / torchrun), a stage the graph does not declare data-parallel
    refuses before any work, writes nothing and starts no MLflow run; the training stages and generate_candidates
    are declared."""
    from onereward import distributed
    from onereward.pipeline import GRAPH
    from onereward.runner import execute_stage

    assert [s.name for s in GRAPH if s.data_parallel] == ["pretrain_base", "generate_candidates", "train_reward",
                                                          "train_audit_reward", "rl_finetune", "distill"]
    monkeypatch.setattr(distributed, "workers", lambda: distributed.Workers(rank=1, world=2))
    s = load_config("tiny")
    source = _graph().get("source")
    out = str(home / "artifacts" / "source")
    with pytest.raises(ValueError, match="runs in one process; this is process 1 of 2"):
        execute_stage(source, s, {}, {"seed": out})
    assert not storage.Artifact(out).exists()
    tracking.setup("onereward")
    client = mlflow.MlflowClient()
    assert not client.search_runs([client.get_experiment_by_name("onereward").experiment_id])
