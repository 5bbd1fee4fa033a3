"""The flux profile's generator side through the whole graph, at toy width on CPU: FluxFill components built from
configs (models/flux.py) stand in for FLUX.1 Fill [dev]; pretrain_base registers it by URI, generate_candidates
samples it, rl_finetune and distill train LoRA adapters on it, evaluate and promote judge and promote the student.
The judges are pretrained Qwen2.5-VL / Qwen2-VL checkpoints at toy width (conftest's `judge_bases`) trained through
LoRA adapters. The local runner; MLflow is the sqlite store under ONEREWARD_HOME."""

from sizes import WHOLE_GRAPH, flux_judges, flux_toy

from onereward import storage
from onereward.config import load_config
from onereward.runner import run_pipeline


def test_the_flux_profile_at_toy_width_runs_the_whole_graph(home, flux_base, judge_bases):
    import mlflow

    s = load_config("tiny", [*WHOLE_GRAPH, *flux_toy(flux_base), *flux_judges(judge_bases)])
    result = run_pipeline(s)
    done = {o.stage: o for o in result.outcomes}
    assert result.stopped_at is None and all(o.status == "done" for o in done.values()), done
    base = storage.Artifact(done["pretrain_base"].outputs["base_model"])
    assert base.read_json("model/generator.json")["base_uri"] == str(flux_base)
    assert not [f for f in base.files("model/") if f.endswith(".safetensors")]  # a pointer, no weights
    for stage, output in (("rl_finetune", "policy"), ("distill", "student")):
        art = storage.Artifact(done[stage].outputs[output])
        assert sorted(art.files("model/")) == ["model/adapter.safetensors", "model/generator.json"], stage
    for stage, output, arch in (("train_reward", "reward_model", "qwen2_5_vl"),
                                ("train_audit_reward", "audit_model", "qwen2_vl")):
        art = storage.Artifact(done[stage].outputs[output])
        assert sorted(art.files("judge/")) == ["judge/adapter.safetensors", "judge/judge.json"], stage
        assert art.read_json("judge/judge.json")["source"]["base_uri"] == str(judge_bases[arch])
    # the registered judge serves: the pyfunc loads the base from its URI, the adapter from the model's artifacts,
    # and scores as the stage's own folder does
    import pandas as pd

    from onereward.models.registry import judge_example
    from onereward.serving_judge import JudgeModel

    example = pd.concat([judge_example(32)] * 2, ignore_index=True)
    example.loc[1, "task"], example.loc[1, "criterion"], example.loc[1, "prompt"] = "text", "text_correctness", "A7"
    served = mlflow.pyfunc.load_model("models:/onereward-reward-model@training").predict(example)["p_a_better"]
    local = JudgeModel()
    local.load_context(type("Context", (), {"artifacts": {"judge": str(storage.Artifact(
        done["train_reward"].outputs["reward_model"]).local_dir() / "judge")}})())
    assert served.tolist() == local.predict(None, example)["p_a_better"].tolist()
    assert len(set(served.round(6))) == 2  # the two queries are told apart
    promotion = storage.Artifact(done["promote"].outputs["promotion"]).read_json("promotion.json")
    assert promotion["promoted"] is True
    champion = mlflow.MlflowClient().get_model_version_by_alias("onereward-generator", "champion")
    assert champion.tags.get("teacher.version") == str(
        storage.Artifact(done["rl_finetune"].outputs["policy"]).read_json("registry.json")["version"])
