"""rl_finetune on reduced sizes: the ground-truth guards, registration with lineage, early stopping of a
deliberately high learning rate, and resuming after SIGKILL to the unkilled run's result. The judges and the base
are trained by the real upstream stages (a few steps each); MLflow is the sqlite store under ONEREWARD_HOME."""

import os
import subprocess

import numpy as np
import pytest
import torch
from homes import copy_home
from resume import (
    assert_same_weights,
    data_parallel,
    kill_after_checkpoint,
    rerun_to_the_end,
    run_data_parallel,
    stage_command,
)
from sizes import RL, UPSTREAM, flux_toy

from onereward import storage
from onereward.config import load_config
from onereward.pipeline import GRAPH
from onereward.runner import execute_stage, plan
from onereward.stages.label_preferences import Ground
from onereward.stages.pretrain_base import load_conditions
from onereward.stages.rl_finetune import Conditions, NoImprovement, bootstrap_low, drift, noise_seeds, residue, score


@pytest.fixture(scope="module")
def upstream(upstream_home, tmp_path_factory):
    """Conditions, base and both judges (the session's), in this module's own ONEREWARD_HOME."""
    return copy_home(upstream_home, tmp_path_factory.mktemp("rl") / "home")


@pytest.fixture
def rl_home(upstream, monkeypatch):
    monkeypatch.setenv("ONEREWARD_HOME", str(upstream))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return upstream


def _step(overrides):
    s = load_config("tiny", [*UPSTREAM, *overrides])
    return s, next(p for p in plan(s) if p.stage.name == "rl_finetune")


def _ground() -> Ground:
    size = 8
    image = torch.zeros(1, 3, size, size)
    mask = torch.zeros(1, 1, size, size)
    mask[..., 2:6, 2:6] = 1
    target = image.clone()
    image[..., 3:5, 3:5] = 0.8  # the object to remove
    return Ground(image, mask, target, mask, None)


def test_ground_truth_measures_and_guards():
    g = _ground()
    assert float(residue(g.image, g)) == pytest.approx(1.0) and float(residue(g.target, g)) == 0.0
    half = g.target + 0.5 * (g.image - g.target)
    assert float(residue(half, g)) == pytest.approx(0.5)

    base = {"fill": {"bg_psnr": 30.0, "mse_mask": 0.04, "measure": 0.1},
            "removal": {"bg_psnr": 32.0, "mse_mask": 0.03, "measure": 0.2}}
    rc = load_config("tiny").rl
    within = {"fill": {"bg_psnr": 29.2, "mse_mask": 0.043, "measure": 0.09},
              "removal": {"bg_psnr": 32.5, "mse_mask": 0.02, "measure": 0.1}}
    assert drift(within, base, rc) == []
    assert score(within, base) == pytest.approx((0.9 + 0.5) / 2)
    off = {"fill": {"bg_psnr": 28.9, "mse_mask": 0.04, "measure": 0.05},
           "removal": {"bg_psnr": 32.0, "mse_mask": 0.034, "measure": 0.2}}
    reasons = drift(off, base, rc)
    assert len(reasons) == 2 and reasons[0].startswith("fill: background PSNR") and "removal: in-mask" in reasons[1]

    assert bootstrap_low(np.ones(40), 200, 0) == 1.0
    low = bootstrap_low(np.array([1.0, 0.0] * 20), 500, 0)
    assert 0.3 < low < 0.5
    # noise depends on the step alone, so a resumed run draws what the unkilled run drew
    assert noise_seeds(0, 5, 3, 1) == noise_seeds(0, 5, 3, 1) != noise_seeds(0, 6, 3, 1)


def test_registers_the_policy_with_lineage_and_metrics(rl_home, tmp_path):
    import mlflow

    s, step = _step([*RL, "rl.reference=ema"])
    out = str(tmp_path / "policy")
    outcome = execute_stage(step.stage, s, step.inputs, {"policy": out})
    m = outcome.metrics
    tasks = [t for t in ("fill", "extend", "removal", "text") if f"heldout.{t}.bg_psnr" in m]
    assert tasks, m
    for t in tasks:
        for k in ("bg_psnr", "mse_mask", "measure"):
            assert np.isfinite(m[f"heldout.{t}.{k}"]) and np.isfinite(m[f"base.heldout.{t}.{k}"])
        assert 0 <= m[f"audit.{t}.win_rate_low"] <= m[f"audit.{t}.win_rate"] <= 1
    art = storage.Artifact(out)
    assert {"heldout_metrics.json", "validation.json", "registry.json"} <= set(art.files())
    assert any(f.endswith(".safetensors") for f in art.files("model/"))
    validation = art.read_json("validation.json")
    assert [e["step"] for e in validation["evals"]] == [2, 4, 6, 8]
    # a policy that kept step 0 holds exactly the base's weights (rl_finetune then samples the audit rows once)
    from onereward.models.generator import load_generator

    base = load_generator(storage.Artifact(step.inputs["base_model"]).local_dir() / "model").weights_digest()
    assert (load_generator(art.local_dir() / "model").weights_digest() == base) == (m["best_step"] == 0), m["best_step"]

    client = mlflow.MlflowClient()
    mv = client.get_model_version_by_alias("onereward-generator", "rl-candidate")
    assert str(mv.version) == art.read_json("registry.json")["version"]
    for name in ("base_model", "reward_model", "audit_model"):
        reg = storage.Artifact(step.inputs[name]).read_json("registry.json")
        assert mv.tags[f"{name}.version"] == reg["version"] and mv.tags[f"{name}.name"] == reg["name"]
    assert mv.tags["reference"] == "ema" and mv.tags["improved"] in ("true", "false")
    run = client.search_runs([client.get_experiment_by_name("onereward").experiment_id],
                             "tags.stage = 'rl_finetune'")[0]
    assert "train.reward" in run.data.metrics and "val.score" in run.data.metrics


def test_a_deliberately_high_learning_rate_is_stopped_and_not_registered(rl_home, tmp_path):
    import mlflow

    before = {a for v in mlflow.MlflowClient().search_model_versions("name='onereward-generator'")
              for a in v.aliases}
    s, step = _step([*RL, "rl.steps=40", "rl.lr=0.02", "rl.require_improvement=true"])
    out = str(tmp_path / "policy")
    with pytest.raises(NoImprovement, match=r"stopped at step \d+: \w+: (background PSNR|in-mask error)") as err:
        execute_stage(step.stage, s, step.inputs, {"policy": out})
    assert err.value.metrics["early_stopped"] == 1.0 and err.value.metrics["stopped_at"] < 40
    assert not storage.Artifact(out).exists()
    after = {a for v in mlflow.MlflowClient().search_model_versions("name='onereward-generator'") for a in v.aliases}
    assert after == before  # rl-candidate did not move


def _flux_step(overrides, flux_base, tmp_path):
    """The flux profile at toy width on the tiny upstream's conditions and judges: its pretrain_base registers
    the external base (a pointer to its URI), which rl_finetune trains a LoRA adapter on."""
    flux = flux_toy(flux_base)
    s = load_config("tiny", [*UPSTREAM, *overrides, *flux])
    _, tiny = _step(overrides)
    base_out = str(tmp_path / "base_model")
    execute_stage(GRAPH.get("pretrain_base"), s, {"conditions": tiny.inputs["conditions"]}, {"base_model": base_out})
    return s, [*overrides, *flux], {**tiny.inputs, "base_model": base_out}


@pytest.mark.parametrize("profile, processes", [("tiny", 1), ("flux", 1), ("tiny", 2)])
def test_resumes_after_sigkill_to_the_unkilled_result(profile, processes, rl_home, flux_base, tmp_path):
    """Two processes (torchrun, data parallel): each goes on with its own draws, from the RNG states the main
    process checkpointed for all of them."""
    overrides = [*RL, "rl.steps=12", "rl.checkpoint_every=3"]  # between validations (every 2): their rewards kept
    if profile == "flux":
        s, overrides, inputs = _flux_step(overrides, flux_base, tmp_path)
    else:
        s, step = _step(overrides)
        inputs = step.inputs
    stage = GRAPH.get("rl_finetune")

    def command(out: str) -> list[str]:
        cmd = stage_command("rl_finetune", inputs, {"policy": out}, [*UPSTREAM, *overrides])
        return data_parallel(cmd, processes) if processes > 1 else cmd

    out = str(tmp_path / "killed" / "policy")
    ckpt = f"{out}.scratch/checkpoint"
    env = {**os.environ, "ONEREWARD_HOME": str(rl_home)} | ({"OMP_NUM_THREADS": "1"} if processes > 1 else {})
    killed_at, _ = kill_after_checkpoint(command(out), env, ckpt)
    assert killed_at < 12 and not storage.Artifact(out).exists()
    rerun_to_the_end(command(out), env, killed_at, "rl_finetune")
    resumed = storage.Artifact(out)
    assert resumed.exists() and not storage.Artifact(ckpt).exists()

    unkilled = str(tmp_path / "unkilled" / "policy")
    if processes > 1:
        done = subprocess.run(command(unkilled), env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    else:
        execute_stage(stage, s, inputs, {"policy": unkilled})
    assert resumed.read_json("validation.json") == storage.Artifact(unkilled).read_json("validation.json")
    assert_same_weights(resumed, storage.Artifact(unkilled), "model/")
    # the logged training curves (10-step means) too: the checkpoint keeps the steps since the last point
    import mlflow

    from onereward import tracking

    tracking.setup("onereward")  # this home's store (with two processes no run was made in this process)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("onereward").experiment_id

    def curve(uri: str) -> list[tuple[int, float]]:
        run = client.search_runs([exp], f"tags.`output.policy` = '{uri}' and attributes.status = 'FINISHED'")[0]
        return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train.reward")]

    got, want = curve(out), curve(unkilled)
    assert [st for st, _ in got] == [st for st, _ in want] == [10, 12]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-4)


def test_a_run_killed_as_one_process_resumes_as_two(rl_home, tmp_path):
    """A node pool that comes back with more GPUs: the checkpoint of one process is resumed by two (torchrun), the
    main process going on with its own draws (from its half of the pool now) and the new one seeded afresh, to the
    configured number of steps."""
    overrides = [*RL, "rl.steps=12", "rl.checkpoint_every=3"]
    _, step = _step(overrides)
    cmd = stage_command("rl_finetune", step.inputs, {"policy": str(tmp_path / "policy")}, [*UPSTREAM, *overrides])
    ckpt = f"{tmp_path / 'policy'}.scratch/checkpoint"
    env = {**os.environ, "ONEREWARD_HOME": str(rl_home), "OMP_NUM_THREADS": "1"}
    killed_at, _ = kill_after_checkpoint(cmd, env, ckpt)
    assert killed_at < 12
    said = rerun_to_the_end(data_parallel(cmd, 2), env, killed_at, "rl_finetune")
    assert "rl_finetune: 2 processes resume the checkpoint of 1; the 1 new draw afresh" in said, said[-2000:]
    resumed = storage.Artifact(str(tmp_path / "policy"))
    evals = resumed.read_json("validation.json")["evals"]
    assert [e["step"] for e in evals][-1] == 12, evals
    assert not storage.Artifact(ckpt).exists()


def test_flux_trains_a_lora_adapter_against_the_judge_on_one_copy_of_the_base(rl_home, flux_base, tmp_path):
    """The flux profile's rl_finetune at toy width on CPU: a LoRA adapter trained on one copy of the network (the
    policy, the reference and the base are its weights swapped in), saved alone beside the base's URI."""
    from safetensors.torch import load_file

    from onereward.models.generator import load_generator
    from onereward.stages.rl_finetune import WeightsView, trainable_state

    s, _, inputs = _flux_step([*RL, "rl.reference=ema"], flux_base, tmp_path)
    out = str(tmp_path / "policy")
    m = execute_stage(GRAPH.get("rl_finetune"), s, inputs, {"policy": out}).metrics
    assert m["steps_run"] == 8 or m["early_stopped"] == 1.0, m
    assert all(np.isfinite(m[f"heldout.{t}.bg_psnr"]) for t in ("fill", "extend", "removal", "text"))

    art = storage.Artifact(out)
    assert sorted(art.files("model/")) == ["model/adapter.safetensors", "model/generator.json"]
    meta = art.read_json("model/generator.json")
    assert meta["base_uri"] == str(flux_base) and meta["lora_rank"] == 4 and meta["image_size"] == 32
    adapter = load_file(str(art.local_dir() / "model" / "adapter.safetensors"))
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    trained = any(v.abs().sum() > 0 for k, v in adapter.items() if ".lora_B." in k)
    assert trained == (m["best_step"] > 0), m["best_step"]  # B starts at 0: the adapter starts as the base

    base_dir = storage.Artifact(inputs["base_model"]).local_dir() / "model"
    policy, base = load_generator(art.local_dir() / "model"), load_generator(base_dir)
    assert base.weights_digest() == load_generator(base_dir).weights_digest()  # every load starts alike
    assert (policy.weights_digest() == base.weights_digest()) == (m["best_step"] == 0)
    frozen = {k: v for k, v in base.pipe.transformer.state_dict().items() if "lora" not in k}
    assert all(torch.equal(v, policy.pipe.transformer.state_dict()[k]) for k, v in frozen.items())
    # the base's weights swapped into the policy sample what the base samples, and are swapped out again
    g = torch.Generator().manual_seed(0)
    x, masks = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1, torch.zeros(4, 1, 32, 32)
    masks[..., 8:24, 8:24] = 1
    own = trainable_state(policy)
    view = WeightsView(policy, trainable_state(base))
    assert torch.equal(view.sample(x, masks, ["extend"] * 4, steps=2, seed=1),
                       base.sample(x, masks, ["extend"] * 4, steps=2, seed=1))
    assert all(torch.equal(v, trainable_state(policy)[k]) for k, v in own.items())


def test_two_processes_train_one_policy_data_parallel(rl_home, tmp_path):
    """`torchrun --standalone --nproc_per_node 2` (what `accelerate launch` starts on a GPU node), gloo on the
    CPU: both processes train, one MLflow run and one registered version come out. Each process draws from its own
    half of the train pool, and the gradients are averaged, so the logged gradient norms are not a single process's;
    the stage itself fails if the processes end with different weights."""
    import mlflow

    s, step = _step(RL)
    out = str(tmp_path / "dp" / "policy")
    cmd = data_parallel(stage_command("rl_finetune", step.inputs, {"policy": out}, [*UPSTREAM, *RL]), 2)
    env = {**os.environ, "ONEREWARD_HOME": str(rl_home), "OMP_NUM_THREADS": "1"}
    run_data_parallel(cmd, env)
    art = storage.Artifact(out)
    assert art.exists() and art.read_json("validation.json")["evals"]

    single = str(tmp_path / "single" / "policy")
    execute_stage(step.stage, s, step.inputs, {"policy": single})
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("onereward").experiment_id

    def grad_norms(uri: str) -> list[float]:
        runs = client.search_runs([exp], f"tags.`output.policy` = '{uri}'")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED", runs
        return [m.value for m in client.get_metric_history(runs[0].info.run_id, "train.grad_norm")]

    two, one = grad_norms(out), grad_norms(single)
    assert len(two) == len(one) and two != pytest.approx(one, rel=1e-6), (two, one)
    versions = {str(v.version) for v in client.search_model_versions("name='onereward-generator'")}
    assert art.read_json("registry.json")["version"] in versions


def test_a_training_pool_decoded_as_drawn_gives_what_the_decoded_one_gives(rl_home):
    """rl_finetune keeps its train conditions as PNGs and decodes a draw at a time (flux's would take hundreds of
    GB decoded): each draw is the rows the decoded pool gives, bit for bit."""
    s, step = _step(RL)
    rows = load_conditions(storage.Artifact(step.inputs["conditions"]), "train")[:40]
    decoded, lazy = Conditions.of(rows), Conditions.of(rows, decoded=False)
    assert lazy.batch is None and lazy.by_task == decoded.by_task
    for idx in ([0], [3, 1, 3, 39], list(range(0, 40, 7))):
        a, b = decoded.take(idx), lazy.take(idx)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)
