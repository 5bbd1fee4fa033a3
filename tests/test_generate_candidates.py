"""generate_candidates in parts: a run killed after its first part resumes at the parts it had not kept, two
processes under torchrun share the parts, and both end with the table one uninterrupted process writes. Inputs are
the session's upstream conditions and base (tests/sizes.py); each run writes under the test's own folder."""

import os
import signal
import subprocess

import pytest
from resume import data_parallel, run_data_parallel, stage_command
from sizes import UPSTREAM

from onereward import storage
from onereward.config import load_config
from onereward.runner import plan

PARTS = [*UPSTREAM, "candidates.part_conditions=6"]  # 16 conditions: parts of 6, 6 and 4


@pytest.fixture
def step(upstream_home, tmp_path, monkeypatch):
    """The stage's planned inputs (the upstream home's artifacts); its runs track into a home of their own."""
    monkeypatch.setenv("ONEREWARD_HOME", str(upstream_home))
    planned = next(p for p in plan(load_config("tiny", PARTS)) if p.stage.name == "generate_candidates")
    monkeypatch.setenv("ONEREWARD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return planned


def _run(cmd: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout + done.stderr


def _one_process(step, tmp_path, env) -> storage.Artifact:
    """The stage run once, in one process, never killed."""
    out = str(tmp_path / "one" / "candidates")
    _run(stage_command("generate_candidates", step.inputs, {"candidates": out}, PARTS), env)
    return storage.Artifact(out)


def test_a_run_killed_after_a_part_resumes_at_the_parts_it_had_not_kept(step, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = str(tmp_path / "killed" / "candidates")
    cmd = stage_command("generate_candidates", step.inputs, {"candidates": out}, PARTS)
    # the stage's first commit is its first part: the fault point kills it right after that part's manifest
    first = subprocess.run(cmd, env={**env, storage.FAULT_ENV: "commit.after_manifest"}, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == -signal.SIGKILL, (first.stdout + first.stderr)[-2000:]
    assert storage.Artifact(f"{out}.scratch/part-00000").exists()
    assert not storage.Artifact(f"{out}.scratch/part-00001").exists() and not storage.Artifact(out).exists()

    said = _run(cmd, env)
    assert "1 of 3 parts kept by a killed run" in said and "part 1/3" not in said, said[-2000:]
    assert "part 2/3" in said and "part 3/3" in said
    resumed = storage.Artifact(out)
    assert resumed.exists() and not storage.exists(f"{out}.scratch")
    assert len(resumed.files("data-")) == 3  # a shard a part

    one = _one_process(step, tmp_path, env)
    table = resumed.read_table()
    assert table.num_rows == 16 * 2 and table.equals(one.read_table())
    for sheet in one.files("contact_sheets/"):
        assert resumed.read_bytes(sheet) == one.read_bytes(sheet), sheet


def test_two_processes_share_the_parts_and_write_one_processs_table(step, tmp_path):
    """`torchrun --nproc_per_node 2` (what `accelerate launch` starts on a GPU node), gloo on the CPU: process 0
    samples parts 1 and 3, process 1 part 2, and the main process alone writes them, in order."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = str(tmp_path / "dp" / "candidates")
    said = run_data_parallel(data_parallel(stage_command("generate_candidates", step.inputs, {"candidates": out},
                                                         PARTS), 2), env)
    assert "process 1: part 2/3" in said and "process 0: part 3/3" in said, said[-2000:]
    dp = storage.Artifact(out)
    assert dp.exists() and not storage.exists(f"{out}.scratch")
    assert dp.read_table().equals(_one_process(step, tmp_path, env).read_table())


def test_conditions_are_read_keeping_only_the_rows_asked_for(step):
    """read_conditions / load_conditions / validation_rows (every stage's readers of the conditions table) filter a
    shard at a time: what they return is what filtering the whole table in Python returns."""
    from onereward.config import TASKS
    from onereward.stages.pretrain_base import CONDITION_KEYS, load_conditions, read_conditions
    from onereward.stages.rl_finetune import validation_rows

    art = storage.Artifact(step.inputs["conditions"])
    everything = sorted(art.read_table().to_pylist(), key=lambda r: r["condition_id"])
    for split in ("train", "heldout"):
        want = [r for r in everything if r["split"] == split and r["target"]]
        assert want and load_conditions(art, split) == want
        some = {r["condition_id"] for r in want[::3]} | {everything[0]["condition_id"]}
        assert load_conditions(art, split, ids=some) == [r for r in want if r["condition_id"] in some]
        light = load_conditions(art, split, columns=CONDITION_KEYS)
        assert [r["condition_id"] for r in light] == [r["condition_id"] for r in want] and "image" not in light[0]
    assert read_conditions(art) == everything
    assert read_conditions(art, ids=[everything[1]["condition_id"]]) == [everything[1]]
    held = [r for r in everything if r["split"] == "heldout" and r["target"]]
    for per_task in (1, 3, 1000):  # rl_finetune, distill and evaluate's held-out sets: chosen on ids, then read
        assert validation_rows(art, per_task) == {t: [r for r in held if r["task"] == t][:per_task] for t in TASKS}
