"""train_reward and train_audit_reward on constructed preferences: each judge learns a visible rule on
held-out conditions, is saved as safetensors and registered under its own name; a judge trained on too little
fails the sanity gate and is not registered."""

import io

import numpy as np
import pytest
from PIL import Image
from resume import (
    assert_same_metrics,
    assert_same_weights,
    data_parallel,
    kill_after_checkpoint,
    rerun_to_the_end,
    run_data_parallel,
    stage_command,
)

from onereward import storage
from onereward.config import load_config
from onereward.data import schema
from onereward.pipeline import GRAPH
from onereward.runner import execute_stage
from onereward.stages.train_reward import JudgeGateFailed

TASKS = {"fill": "alignment", "removal": "removal_quality"}
KIND_OF = ("target_vs_cand", "cand_vs_degraded", "cand_vs_cand")
GATED = "reward.gate_tasks=[fill, removal]"  # the tasks these preferences have
STAGES = {name: GRAPH.get(name) for name in ("train_reward", "train_audit_reward")}


def _png(level: float, rng: np.random.Generator) -> bytes:
    """A textured 32x32 image around a brightness level: the rule the judge must see is "brighter wins"."""
    arr = np.clip(level * 255 + rng.normal(0, 12, (32, 32, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _preferences(uri: str, conditions_uri: str, conditions: int, seed: int = 0) -> None:
    """Preferences as label_preferences writes them: the pairs, and their images and each condition's masked
    input in table "images" (in two shards of small row groups, as a large table is)."""
    from onereward.data.labelstudio import masked_input_png

    rng = np.random.default_rng(seed)
    rows, conds, images = [], [], []
    for c in range(conditions):
        task = list(TASKS)[c % 2]
        conds.append({"condition_id": f"c{c}", "image_id": f"i{c}", "task": task, "image": _png(0.5, rng),
                      "mask": _mask(), "prompt": "fill red" if task == "fill" else "remove red circle",
                      "target": None, "mask_coverage": 0.25, "split": "train", "params": "{}"})
        shown = masked_input_png(conds[-1]["image"], conds[-1]["mask"])
        images.append({"image_id": f"c{c}-context", "condition_id": f"c{c}", "image": shown})
        for k in range(3):
            hi, lo = rng.uniform(0.6, 0.9), rng.uniform(0.1, 0.4)
            rows.append({"pair_id": f"c{c}-{k}", "condition_id": f"c{c}", "task": task, "criterion": TASKS[task],
                         "kind": KIND_OF[k], "winner_id": f"c{c}-w{k}", "loser_id": f"c{c}-l{k}",
                         "labeller": "auto", "confidence": 0.9, "margin": float(hi - lo), "split": "train"})
            images += [{"image_id": f"c{c}-w{k}", "condition_id": f"c{c}", "image": _png(hi, rng)},
                       {"image_id": f"c{c}-l{k}", "condition_id": f"c{c}", "image": _png(lo, rng)}]
    with storage.writing(uri, key=f"prefs-{conditions}-{seed}") as w:
        w.write_table(schema.table(rows, schema.PREFERENCES))
        half = len(images) // 2
        for part in (images[:half], images[half:]):
            w.write_table(schema.table(part, schema.PAIR_IMAGES), "images", row_group_rows=8)
    with storage.writing(conditions_uri, key=f"conds-{conditions}-{seed}") as w:
        w.write_table(schema.table(conds, schema.CONDITIONS))


def _mask() -> bytes:
    arr = np.zeros((32, 32), np.uint8)
    arr[8:24, 8:24] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(("stage", "output", "name", "alias", "prefix"), [
    ("train_reward", "reward_model", "onereward-reward-model", "training", ""),
    ("train_audit_reward", "audit_model", "onereward-reward-model-audit", "audit", "audit."),
])
def test_judge_learns_a_visible_rule_on_held_out_conditions(home, tmp_path, stage, output, name, alias, prefix):
    prefs, conds, out = str(tmp_path / "prefs"), str(tmp_path / "conds"), str(tmp_path / "judge")
    _preferences(prefs, conds, 80)
    s = load_config("tiny", ["reward.steps=150", "reward.vision_warmup_steps=30", "reward.batch_size=16",
                             "reward.eval_every=1000", GATED])
    outcome = execute_stage(STAGES[stage], s, {"preferences": prefs, "conditions": conds}, {output: out})
    m = outcome.metrics
    assert m[f"{prefix}heldout.pairs"] >= 20 and m[f"{prefix}heldout.acc.mean"] >= 0.9, m  # other conditions
    assert m[f"{prefix}heldout.order_gap"] <= 0.2 and m[f"{prefix}sanity.fill.target_vs_base"] >= 0.7, m
    assert {f"{prefix}warmup.heldout.acc_kind.{k}" for k in KIND_OF} <= set(m), sorted(m)
    assert 0 <= m[f"{prefix}heldout.smoother_label"] <= 1 and 0 <= m[f"{prefix}heldout.smoother_pref"] <= 1, m
    art = storage.Artifact(out)
    assert art.files("judge/model/") and art.read_json("heldout_metrics.json") and "calibration.png" in art.files()
    # registered as a pyfunc scoring (image A, image B, task, criterion, prompt, masked input) -> P(A better)
    import mlflow

    from onereward import tracking
    from onereward.models.registry import judge_example

    tracking.setup("onereward")
    example = judge_example(32)  # image A dark (60), image B bright (190): the rule says B is better
    model = mlflow.pyfunc.load_model(f"models:/{name}@{alias}")
    p = model.predict(example)["p_a_better"]
    assert 0 < float(p[0]) < 0.3, p
    shape = mlflow.MlflowClient().get_model_version_by_alias(name, alias).tags
    assert shape["arch"] == ("qwen2_vl" if stage == "train_reward" else "qwen2_5_vl"), shape


def test_smoother_preference_counts_what_labels_and_judge_pick():
    """Two candidate pairs: the labels pick the flat image in the first and the textured one in the second; the
    judge agrees with the first label only, so it picked the flat (smoother) image twice."""
    import torch

    from onereward.models import tensors
    from onereward.stages.train_reward import smoother_preference

    rng = np.random.default_rng(0)
    flat = tensors.to_tensor([_png(0.5, np.random.default_rng(1))]).mean((2, 3), keepdim=True).expand(1, 3, 32, 32)
    textured = tensors.to_tensor([_png(0.5, rng)])
    from onereward.data.image_table import ImageTable
    from onereward.stages.train_reward import Pairs

    rows = [{"condition_id": "c", "kind": "cand_vs_cand", "task": "fill", "criterion": "alignment",
             "winner_id": w, "loser_id": lo} for w, lo in (("flat", "textured"), ("textured", "flat"))]
    rows.append(rows[1] | {"kind": "target_vs_cand"})
    images = ImageTable(["flat", "textured", "c-context"], decoded=torch.cat([flat, textured, textured]))
    pairs = Pairs.of(rows, images, {"c": "fill red"})
    got = smoother_preference(rows, np.array([0.8, 0.3, 0.9]), pairs, {"c": _mask()})
    assert got == {"heldout.smoother_label": 0.5, "heldout.smoother_pref": 1.0}
    assert smoother_preference(rows[2:], np.array([0.9]), pairs[2:], {"c": _mask()}) == {}


def test_judge_lr_warms_up_then_holds_or_decays_towards_zero_by_the_last_step():
    from onereward.stages.train_reward import _lr_at

    r = load_config("tiny", ["reward.steps=100", "reward.warmup_steps=10", "reward.lr=0.001",
                             "reward.lr_decay=constant"]).reward
    assert [_lr_at(i, r) for i in (0, 9, 10, 99)] == pytest.approx([1e-4, 1e-3, 1e-3, 1e-3])
    c = r.model_copy(update={"lr_decay": "cosine"})
    lrs = [_lr_at(i, c) for i in range(100)]
    assert lrs[:10] == pytest.approx([_lr_at(i, r) for i in range(10)])  # the warm-up is the same
    assert lrs[10] == pytest.approx(1e-3) and lrs[55] == pytest.approx(5e-4, rel=0.05) and lrs[99] < 1e-6
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_judges_hold_out_different_conditions():
    from onereward.stages.train_reward import _heldout

    s = load_config("tiny")
    r = s.reward
    held = [{c for c in map(str, range(500)) if _heldout(c, r.heldout_fraction, spec.split_seed)}
            for spec in (r.judge, r.audit)]
    assert 0.1 < len(held[0]) / 500 < 0.3 and len(held[0] & held[1]) < 0.5 * len(held[0])
    with pytest.raises(ValueError, match="differ from reward.judge in both arch and split_seed"):
        load_config("tiny", ["reward.audit.arch=qwen2_vl"])


def test_judge_trained_on_too_little_fails_the_gate_and_is_not_registered(home, tmp_path):
    prefs, conds, out = str(tmp_path / "prefs"), str(tmp_path / "conds"), str(tmp_path / "judge")
    _preferences(prefs, conds, 40, seed=1)
    s = load_config("tiny", ["reward.steps=2", "reward.vision_warmup_steps=2", "reward.batch_size=4", GATED])
    with pytest.raises(JudgeGateFailed, match=r"removal: P\(target_vs_base\)|fill: P\("):
        execute_stage(STAGES["train_reward"], s, {"preferences": prefs, "conditions": conds},
                      {"reward_model": out})
    assert not storage.Artifact(out).exists()
    import mlflow

    from onereward import tracking

    tracking.setup("onereward")
    assert not mlflow.MlflowClient().search_model_versions("name='onereward-reward-model'")


def test_vision_warm_up_fits_the_vision_tower_alone(home, tmp_path):
    """The Bradley-Terry warm-up learns the rule in the vision tower and leaves the language model as built."""
    import torch

    from onereward.data.image_table import ImageTable
    from onereward.models.judge import Judge
    from onereward.stages.train_reward import Pairs, warm_up_vision

    prefs, conds = str(tmp_path / "prefs"), str(tmp_path / "conds")
    _preferences(prefs, conds, 30)
    rows = storage.Artifact(prefs).read_table().to_pylist()
    train, held = [x for x in rows if int(x["condition_id"][1:]) < 20], [x for x in rows
                                                                        if int(x["condition_id"][1:]) >= 20]
    prompts = {c["condition_id"]: c["prompt"] for c in storage.Artifact(conds).read_table().to_pylist()}
    images = ImageTable.read(storage.Artifact(prefs))
    r = load_config("tiny", ["reward.vision_warmup_steps=60", "reward.batch_size=16"]).reward
    judge = Judge.build(sorted(TASKS.items()), list(prompts.values()), seed=0)
    before = {k: v.clone() for k, v in judge.model.state_dict().items()}
    m = warm_up_vision(judge, Pairs.of(train, images, prompts, r), r, 0, "test",
                       (held, Pairs.of(held, images, prompts)))
    assert m["warmup.bt_loss"] < 0.35, m  # ln 2 = 0.69 at chance
    # the vision score alone ranks the pairs of conditions it never saw, each kind on its own
    assert set(m) == {"warmup.bt_loss", "warmup.heldout.acc_cand.mean",
                      *(f"warmup.heldout.acc_kind.{k}" for k in KIND_OF)}, m
    assert all(v >= 0.9 for k, v in m.items() if ".heldout." in k), m
    after = judge.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".visual." in k or k.startswith("visual.") for k in changed), sorted(changed)[:5]
    r0 = load_config("tiny", ["reward.vision_warmup_steps=0"]).reward
    assert warm_up_vision(judge, Pairs.of(train, images, prompts, r0), r0, 0, "test") == {}



def test_a_table_read_lazily_gives_the_decoded_tables_pairs(tmp_path):
    """Images too many to decode (a limit of 0 bytes here; flux's) are read a row group at a time: every drawn batch
    and every held-out slice is the decoded table's, bit for bit."""
    import torch

    from onereward.data.image_table import ImageTable
    from onereward.stages.train_reward import Pairs, draw_batch

    prefs, conds = str(tmp_path / "prefs"), str(tmp_path / "conds")
    _preferences(prefs, conds, 12)
    art = storage.Artifact(prefs)
    rows = art.read_table().to_pylist()
    prompts = {c["condition_id"]: c["prompt"] for c in storage.Artifact(conds).read_table().to_pylist()}
    eager, lazy = ImageTable.read(art), ImageTable.read(art, limit_bytes=0)
    assert not eager.lazy and lazy.lazy and eager.ids == lazy.ids and len(eager) == 12 * 7
    r = load_config("tiny", ["reward.batch_size=16"]).reward
    decoded, read = Pairs.of(rows, eager, prompts, r), Pairs.of(rows, lazy, prompts, r)
    for seed in range(3):
        (w1, l1, q1), (w2, l2, q2) = (draw_batch(p, r, torch.Generator().manual_seed(seed)) for p in (decoded, read))
        assert torch.equal(w1, w2) and torch.equal(l1, l2) and torch.equal(q1.context, q2.context)
        assert q1.tasks == q2.tasks and q1.prompts == q2.prompts
    assert all(torch.equal(x, y) for x, y in zip(decoded[5:17].tensors()[:2], read[5:17].tensors()[:2], strict=True))
    with pytest.raises(ValueError, match="no image with id"):
        lazy.positions(["c0-w0", "nope"])


def test_batches_fill_each_kind_share_and_turn_a_pair_as_one():
    """Drawn batches follow reward.kind_share whatever the kinds' counts; an augmented pair's two images and its
    masked input are turned or mirrored the same way, and rows of augment_skip tasks are left as they are."""
    import torch

    from onereward.data.image_table import ImageTable
    from onereward.stages.train_reward import Pairs, draw_batch, sampling_weights, square_symmetry

    kinds = ["cand_vs_cand"] * 90 + ["cand_vs_degraded"] * 10
    n = len(kinds)
    tasks = ["text" if i % 2 else "fill" for i in range(n)]
    rows = [{"kind": k, "task": t, "criterion": "c", "condition_id": f"c{i}", "winner_id": f"w{i}",
             "loser_id": f"l{i}"} for i, (k, t) in enumerate(zip(kinds, tasks, strict=True))]
    r = load_config("tiny", ["reward.batch_size=2000", "reward.augment_skip=[text]"]).reward
    img = torch.rand(n, 3, 8, 8) * 2 - 1
    ids = [f"{side}{i}" for side in ("w", "l") for i in range(n)] + [f"c{i}-context" for i in range(n)]
    images = ImageTable(ids, decoded=torch.cat([img, -img, img * 0.5]))
    train = Pairs.of(rows, images, {f"c{i}": "p" for i in range(n)}, r)
    winner, loser, q = draw_batch(train, r, torch.Generator().manual_seed(0))
    assert torch.allclose(loser, -winner) and torch.allclose(q.context, winner * 0.5)
    # every drawn row is one of the 8 symmetries of a source row: find which
    variants = torch.stack([square_symmetry(img, torch.full((n,), k)) for k in range(8)])  # (8, n, 3, 8, 8)
    hits = (variants[:, :, None] - winner[None, None]).abs().flatten(3).amax(-1) < 1e-6  # (8, n, batch)
    sym, src = hits.nonzero()[:, 0], hits.nonzero()[:, 1]
    assert len(src) == len(winner)  # each drawn row matches exactly one (symmetry, source)
    picked_kind = np.array([kinds[i] for i in src.tolist()])
    assert abs((picked_kind == "cand_vs_degraded").mean() - 0.5) < 0.05  # 10 % of the rows, half the draws
    text = np.array([tasks[i] == "text" for i in src.tolist()])
    assert (sym[torch.from_numpy(text)] == 0).all()  # text rows are never turned
    assert 0.8 < (sym[torch.from_numpy(~text)] != 0).float().mean() < 0.95  # 7 of 8 symmetries turn a row
    with pytest.raises(ValueError, match="cand_vs_cand"):
        sampling_weights(rows, {"cand_vs_degraded": 1.0})


def test_to_tensor_decodes_repeated_images_once_and_keeps_row_order(monkeypatch):
    import torch

    from onereward.models import tensors

    rng = np.random.default_rng(5)
    a, b = _png(0.2, rng), _png(0.8, rng)
    rows = [a, b, a, a, b]
    decoded = []
    decode = tensors.from_png
    monkeypatch.setattr(tensors, "from_png", lambda png, mode: decoded.append(png) or decode(png, mode))
    x = tensors.to_tensor(rows)
    assert sorted(decoded) == sorted([a, b])  # five rows, two distinct images: two decodes
    single = {p: tensors.to_tensor([p])[0] for p in (a, b)}
    assert x.shape == (5, 3, 32, 32)
    assert all(torch.equal(x[i], single[p]) for i, p in enumerate(rows))


def test_judge_resumes_after_sigkill_in_either_phase_to_the_unkilled_judge(home, tmp_path):
    """Killed during the vision warm-up, then again during the pairwise phase, the same command resumes each time
    from the last checkpoint and ends with the judge and held-out metrics of a run never killed."""
    import os

    prefs, conds, out = str(tmp_path / "prefs"), str(tmp_path / "conds"), str(tmp_path / "killed" / "judge")
    _preferences(prefs, conds, 40)
    overrides = ["reward.steps=40", "reward.vision_warmup_steps=30", "reward.batch_size=8", "reward.eval_every=1000",
                 "reward.checkpoint_every=10", "reward.min_target_vs_base=0", "reward.min_base_vs_collapsed=0", GATED]
    inputs = {"preferences": prefs, "conditions": conds}
    cmd = stage_command("train_reward", inputs, {"reward_model": out}, overrides)
    env = {**os.environ, "ONEREWARD_HOME": str(home)}
    ckpt = f"{out}.scratch/checkpoint"
    warm, _ = kill_after_checkpoint(cmd, env, ckpt, at_least=10)  # in the 30-step warm-up
    pairwise, log = kill_after_checkpoint(cmd, env, ckpt, at_least=40)  # in the pairwise phase
    assert warm < 30 < pairwise < 70 and f"train_reward: resuming from checkpoint at step {warm}" in log, log[-2000:]
    assert not storage.Artifact(out).exists()
    rerun_to_the_end(cmd, env, pairwise, "train_reward")
    killed = storage.Artifact(out)
    assert killed.exists() and not storage.Artifact(ckpt).exists()

    unkilled = str(tmp_path / "unkilled" / "judge")
    execute_stage(STAGES["train_reward"], load_config("tiny", overrides), inputs, {"reward_model": unkilled})
    assert_same_weights(killed, storage.Artifact(unkilled), "judge/")
    assert_same_metrics(killed.read_json("heldout_metrics.json"),
                        storage.Artifact(unkilled).read_json("heldout_metrics.json"))


def test_two_processes_train_one_judge_data_parallel(home, tmp_path):
    """`torchrun --nproc_per_node 2` (what `accelerate launch` starts on a GPU node), gloo on the CPU, through the
    vision warm-up and the pairwise phase with checkpoints: one judge written and registered by the main process,
    different from a single process's (the second process's gradients are averaged in); killed after a
    checkpoint, the two processes resume it to the same judge as a run never killed."""
    import os

    from safetensors.torch import load_file

    prefs, conds = str(tmp_path / "prefs"), str(tmp_path / "conds")
    _preferences(prefs, conds, 24)
    overrides = ["reward.steps=12", "reward.vision_warmup_steps=6", "reward.batch_size=8", "reward.eval_every=1000",
                 "reward.checkpoint_every=4", "reward.min_target_vs_base=0", "reward.min_base_vs_collapsed=0", GATED]
    inputs = {"preferences": prefs, "conditions": conds}
    env = {**os.environ, "ONEREWARD_HOME": str(home), "OMP_NUM_THREADS": "1"}

    def command(out: str) -> list[str]:
        return data_parallel(stage_command("train_reward", inputs, {"reward_model": out}, overrides), 2)

    out = str(tmp_path / "dp" / "judge")
    stdout = run_data_parallel(command(out), env)
    assert "in each of 2 processes" in stdout
    dp = storage.Artifact(out)
    assert dp.exists() and dp.read_json("registry.json")["version"]

    single = str(tmp_path / "single" / "judge")
    execute_stage(STAGES["train_reward"], load_config("tiny", overrides), inputs, {"reward_model": single})
    weights = [load_file(storage.Artifact(u).local_dir() / "judge" / "model" / "model.safetensors")
               for u in (out, single)]
    assert any(not (weights[0][k] == weights[1][k]).all() for k in weights[0])
    # the two processes scored half the held-out pairs each: what one process scores with their judge
    from onereward.data.image_table import ImageTable
    from onereward.models.judge import Judge
    from onereward.stages.train_reward import Pairs, _heldout, evaluate_judge

    r = load_config("tiny", overrides).reward
    held = [x for x in storage.Artifact(prefs).read_table().to_pylist()
            if _heldout(x["condition_id"], r.heldout_fraction, r.judge.split_seed)]
    prompts = {c["condition_id"]: c["prompt"] for c in storage.Artifact(conds).read_table().to_pylist()}
    judge = Judge.load(dp.local_dir() / "judge")
    alone, _ = evaluate_judge(judge, held, Pairs.of(held, ImageTable.read(storage.Artifact(prefs)), prompts))
    got = dp.read_json("heldout_metrics.json")
    assert alone.keys() <= got.keys() and alone == pytest.approx({k: got[k] for k in alone}, abs=1e-6)

    killed = str(tmp_path / "killed" / "judge")
    at, _ = kill_after_checkpoint(command(killed), env, f"{killed}.scratch/checkpoint", at_least=8)  # pairwise
    assert at < 18
    rerun_to_the_end(command(killed), env, at, "train_reward")
    assert_same_weights(storage.Artifact(killed), dp, "judge/")
    assert_same_metrics(storage.Artifact(killed).read_json("heldout_metrics.json"),
                        dp.read_json("heldout_metrics.json"))
