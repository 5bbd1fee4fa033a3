"""distill, evaluate and promote on reduced sizes: the gates as a pure function; the whole graph to a first champion
(and a second run all cached); a deliberately degraded challenger (the champion's weights plus noise) refused with
its reasons while `champion` does not move. The upstream stages train for real (a few steps each); MLflow is the
sqlite store under ONEREWARD_HOME."""

import time

import pytest
import torch
from homes import copy_home, in_home
from resume import (
    assert_same_metrics,
    assert_same_weights,
    data_parallel,
    kill_after_checkpoint,
    rerun_to_the_end,
    run_data_parallel,
    stage_command,
)
from sizes import DISTILL, EVALUATE, RL, UPSTREAM

from onereward import storage
from onereward.config import GateConfig, load_config
from onereward.runner import execute_stage, plan, run_pipeline
from onereward.stages.evaluate import GatesRefused, gates, quality_ratio, rise_intervals
from onereward.stages.promote import CHAMPION, alias_version

NAME = "onereward-generator"
SMALL = [*UPSTREAM, *RL, *DISTILL, *EVALUATE]
# a few distillation steps make no student worth crowning on its own: the first run loosens the ground-truth
# gates so the graph reaches promote; the refusal below runs with the profile's gates
FIRST = ["evaluate.gates.max_bg_psnr_drop=100", "evaluate.gates.max_mask_error_rise=100",
         "evaluate.gates.max_measure_rise=100", "evaluate.gates.min_student_quality=0"]


def test_adapters_on_one_flux_base_share_its_network_and_sample_as_each_loaded_alone(flux_base, tmp_path):
    """evaluate's contenders on flux (base, teacher, student, champion) are adapters on one FLUX: one network serves
    them all, each sampling what its folder loaded on its own samples; a tiny generator loads on its own."""
    from onereward.config import GeneratorConfig
    from onereward.models.flux import FluxFillGenerator, write_pointer
    from onereward.models.tiny_unet import TinyUNetGenerator
    from onereward.stages.evaluate import load_sharing

    write_pointer(tmp_path / "base", GeneratorConfig(kind="flux_fill", base_uri=str(flux_base), lora_rank=4,
                                                     dtype="float32"), 32)
    for i, name in enumerate(("teacher", "student")):
        gen = FluxFillGenerator.load(tmp_path / "base")
        torch.manual_seed(i)
        with torch.no_grad():
            for p in gen.parameters():  # the adapter's A and B: an adapter that moved away from the base
                p.add_(torch.randn_like(p) * 0.3)
        gen.save(tmp_path / name)
    TinyUNetGenerator.build(load_config("tiny").generator, ["fill red circle"], 32).save(tmp_path / "tiny")

    gens = load_sharing({n: tmp_path / n for n in ("base", "teacher", "student", "tiny")})
    assert len({id(gens[n].gen) for n in ("base", "teacher", "student")}) == 1
    assert isinstance(gens["tiny"], TinyUNetGenerator)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    masks = (torch.rand(2, 1, 32, 32, generator=g) > 0.5).float()
    samples = {}
    for n in ("base", "teacher", "student", "base"):  # the base again after the others were put in place
        alone = FluxFillGenerator.load(tmp_path / n)
        mine = gens[n].sample(images, masks, ["fill red circle", "extend"], steps=2, seed=0)
        assert torch.equal(mine, alone.sample(images, masks, ["fill red circle", "extend"], steps=2, seed=0)), n
        assert gens[n].weights_digest() == alone.weights_digest(), n
        samples[n] = mine
    assert not torch.equal(samples["teacher"], samples["student"])
    assert not torch.equal(samples["teacher"], samples["base"])


def _gt(bg=30.0, mse=0.04, measure=0.1):
    return {"bg_psnr": bg, "bg_ssim": 0.9, "mse_mask": mse, "measure": measure}


def test_gates_pass_within_tolerance_and_name_every_failure():
    g = GateConfig(win_rate_vs_base=False)
    base = {"fill": _gt(), "removal": _gt(32.0, 0.03, 0.2)}
    within = {"fill": _gt(29.6, 0.041, 0.1), "removal": _gt(32.2, 0.029, 0.19)}
    audit = {"fill": {"win_rate": 0.5, "win_rate_low": 0.3}, "removal": {"win_rate": 0.4, "win_rate_low": 0.2}}
    ok = gates(g, within, base, "base", audit, 0.97)
    assert ok.passed and all(r.startswith("ok: ") for r in ok.reasons)
    assert any("no champion yet" in r for r in ok.reasons)

    worse = {"fill": _gt(29.4, 0.041, 0.1), "removal": _gt(32.0, 0.03, 0.22)}
    bad = gates(g, worse, base, "base", audit, 0.9)
    failed = [r for r in bad.reasons if r.startswith("FAILED")]
    assert not bad.passed and len(failed) == 3, bad.reasons
    assert "fill: background PSNR" in failed[0] and "removal: measure" in failed[1] and "0.900" in failed[2]
    # against a champion the audit judge must prefer the challenger: lower bound above 0.5
    vs_champion = gates(g, within, base, "champion", audit, 0.97)
    assert not vs_champion.passed
    assert "fill: audit win rate vs champion 0.50, lower bound 0.30" in vs_champion.reasons[0]
    strict = gates(GateConfig(), within, base, "base", audit, 0.97)  # the default asks it against the base too
    assert not strict.passed
    # a challenger with the champion's weights and settings is refused for that first, whatever else holds
    same = gates(g, within, within, "champion", {t: {"win_rate": 0.5, "win_rate_low": 0.6} for t in within}, 0.97,
                 same_as_incumbent=True)
    assert not same.passed and same.reasons[0] == ("FAILED: the student is the champion: the same weights and "
                                                   "sampling settings, nothing new to promote"), same.reasons
    assert [r for r in same.reasons if r.startswith("FAILED")] == same.reasons[:1]
    # a task's own tolerance in place of the common one; the rise's interval is reported beside it
    by_task = GateConfig(win_rate_vs_base=False, max_measure_rise_by_task={"removal": 0.15})
    rises = {"removal": {"measure": (0.02, 0.24), "mse_mask": (-0.1, 0.05)}}
    loose = gates(by_task, {"fill": within["fill"], "removal": worse["removal"]}, base, "base", audit, 0.97, rises)
    assert loose.passed, loose.reasons
    assert "ok: removal: measure 0.2200 vs base 0.2000 (+10.0%, 95 % interval +2.0% to +24.0%; tolerance +15%)" in (
        loose.reasons), loose.reasons
    too_far = {"fill": _gt(29.6, 0.041, 0.106), "removal": _gt(32.0, 0.03, 0.232)}  # removal +16 %, fill +6 %
    refused = [r for r in gates(by_task, too_far, base, "base", audit, 0.97, rises).reasons if r.startswith("FAILED")]
    assert len(refused) == 2 and "fill: measure" in refused[0] and "tolerance +5%" in refused[0], refused
    assert "removal: measure" in refused[1] and "tolerance +15%" in refused[1], refused


def test_rise_intervals_resample_the_two_models_images_of_a_condition_together():
    import numpy as np

    from onereward.data.images import to_png
    from onereward.stages.rl_finetune import Conditions, ground_truth, ground_truth_per_image

    rng = np.random.default_rng(0)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    cond = Conditions.of([{"image": to_png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)), "mask": to_png(mask),
                           "target": to_png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)), "task": "removal",
                           "prompt": "remove red circle"} for _ in range(12)])
    g = torch.Generator().manual_seed(0)
    incumbent = cond.batch["targets"] + 0.3 * torch.randn(12, 3, 16, 16, generator=g)
    each = ground_truth_per_image(incumbent, cond, "removal")
    same = rise_intervals(each, each, 200, 0)
    assert same["mse_mask"] == (0.0, 0.0) and same["measure"] == (0.0, 0.0)
    worse = incumbent + 0.3 * torch.randn(12, 3, 16, 16, generator=g)
    iv = rise_intervals(ground_truth_per_image(worse, cond, "removal"), each, 500, 0)["mse_mask"]
    point = ground_truth(worse, cond, "removal")["mse_mask"] / ground_truth(incumbent, cond, "removal")["mse_mask"] - 1
    assert 0 < iv[0] < point < iv[1], (iv, point)


def test_quality_ratio_by_ground_truth_and_by_audit():
    teacher = {"fill": _gt(mse=0.04, measure=0.1)}
    assert quality_ratio(teacher, teacher, [0.6], [0.6]) == pytest.approx({"ground_truth": 1.0, "audit": 1.0})
    worse_gt = quality_ratio({"fill": _gt(mse=0.05, measure=0.1)}, teacher, [0.6], [0.6])
    assert worse_gt["ground_truth"] == pytest.approx((0.8 + 1.0) / 2)
    assert quality_ratio(teacher, teacher, [0.3, 0.5], [0.6, 0.6])["audit"] == pytest.approx(4 / 6)


@pytest.fixture(scope="module")
def crowned(upstream_home, tmp_path_factory):
    """The whole graph at reduced sizes, run to a first champion under one ONEREWARD_HOME; the stages up to the
    judges are the session's (cached: the same keys)."""
    home = copy_home(upstream_home, tmp_path_factory.mktemp("eval") / "home")
    with in_home(home):
        first = run_pipeline(load_config("tiny", [*SMALL, *FIRST]))
        second = run_pipeline(load_config("tiny", [*SMALL, *FIRST]))
    return home, first, second


@pytest.fixture
def registry(crowned, monkeypatch):
    import mlflow

    from onereward import tracking

    monkeypatch.setenv("ONEREWARD_HOME", str(crowned[0]))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.setup("onereward")
    mlflow.set_experiment("onereward")  # runs the test starts itself go where the stages' runs go
    return mlflow.MlflowClient()


def test_first_run_crowns_the_student_and_a_second_run_is_cached(crowned, registry):
    _, first, second = crowned
    # up to the judges the session's upstream (the same keys); the stages after them run here
    later = {"rl_finetune", "distill", "evaluate", "promote"}
    assert len(first.outcomes) == 11
    assert {o.stage: o.status for o in first.outcomes} == {
        o.stage: "done" if o.stage in later else "cached" for o in first.outcomes}
    assert [o.status for o in second.outcomes] == ["cached"] * 11
    outputs = {o.stage: o.outputs for o in first.outcomes}
    student = storage.Artifact(outputs["distill"]["student"]).read_json("registry.json")
    assert alias_version(registry, NAME, CHAMPION) == student["version"]
    assert alias_version(registry, NAME, "distilled-candidate") == student["version"]
    tags = registry.get_model_version(NAME, student["version"]).tags
    teacher = storage.Artifact(outputs["rl_finetune"]["policy"]).read_json("registry.json")
    assert tags["teacher.version"] == teacher["version"] and tags["sample_steps"] == "4"

    ev = storage.Artifact(outputs["evaluate"]["evaluation"])
    result = ev.read_json("evaluation.json")
    assert result["passed"] and result["champion"] is None and result["incumbent"] == "base"
    m = result["metrics"]
    for model in ("base", "teacher", "student", "student_1", "student_2"):
        for task in ("fill", "extend", "removal", "text"):
            for k in ("bg_psnr", "bg_ssim", "mse_mask", "measure"):
                assert f"{model}.heldout.{task}.{k}" in m
    assert m["gate.passed"] == 1.0 and m["student.speed_ratio"] > 1.0 and "student.quality_ratio" in m
    fill = {k: m[f"student.audit.fill.{k}"] for k in ("win_rate_low", "win_rate", "win_rate_high")}
    assert fill["win_rate_low"] <= fill["win_rate"] <= fill["win_rate_high"], fill
    page = ev.read_bytes("report.html").decode()
    assert "verdict: PASSED" in page and "<h2>removal</h2>" in page and "data:image/png;base64," in page
    promotion = storage.Artifact(outputs["promote"]["promotion"]).read_json("promotion.json")
    assert promotion["promoted"] is True
    assert open(promotion["report"]).read() == page  # the path it prints is the report's file


def test_a_degraded_challenger_is_refused_and_the_champion_stays(crowned, registry, tmp_path, capfd, recwarn):
    import mlflow

    from onereward.models.generator import load_generator
    from onereward.models.registry import register_generator

    champion = alias_version(registry, NAME, CHAMPION)
    s = load_config("tiny", SMALL)  # the profile's gates, now against a champion
    step = next(p for p in plan(s) if p.stage.name == "evaluate")
    student_uri = next(p for p in plan(s) if p.stage.name == "distill").outputs["student"]
    # the champion's weights plus noise, registered like a student
    gen = load_generator(storage.Artifact(student_uri).local_dir() / "model")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(torch.randn_like(p) * 0.5 * p.std().clamp_min(1e-3))
    degraded_uri = str(tmp_path / "degraded" / "student")
    with storage.writing(degraded_uri, key="degraded") as w:
        gen.save(w.dir / "model")
        with mlflow.start_run(run_name="degraded"):
            version = register_generator(w.dir / "model", NAME, "distilled-candidate", s.image_size,
                                         {"sample_steps": "4", "guidance": "1.0"})
        w.write_json("registry.json", {"name": NAME, "version": version, "alias": "distilled-candidate"})
    said = capfd.readouterr()
    assert f"degraded: registered {NAME} version {version}\n" in said.out
    assert f"degraded: {NAME}@distilled-candidate -> version {version}\n" in said.out
    assert "Created version" not in said.err and "input example" not in said.err  # MLflow's own lines, said once
    assert not [w for w in recwarn if "input example" in str(w.message)]  # pytest records warnings apart

    outputs = {"evaluation": str(tmp_path / "evaluation")}
    with pytest.raises(GatesRefused) as refused:
        execute_stage(step.stage, s, {**step.inputs, "student": degraded_uri}, outputs)
    message = str(refused.value)
    assert "FAILED: " in message and "vs champion" in message, message
    assert "background PSNR" in message or "mse_mask" in message, message
    assert alias_version(registry, NAME, CHAMPION) == champion  # did not move
    assert not storage.Artifact(outputs["evaluation"]).exists()  # nothing half-written


def test_the_champions_own_student_again_is_refused_as_nothing_new(crowned, registry, tmp_path):
    """evaluate asked again about the student that is already the champion (a rerun whose changes did not reach the
    student) is refused for that, by name, before the audit judge's coin flip between two equal images."""
    champion = alias_version(registry, NAME, CHAMPION)
    s = load_config("tiny", SMALL)
    step = next(p for p in plan(s) if p.stage.name == "evaluate")
    outputs = {"evaluation": str(tmp_path / "evaluation")}
    with pytest.raises(GatesRefused) as refused:
        execute_stage(step.stage, s, step.inputs, outputs)
    assert "FAILED: the student is the champion: the same weights and sampling settings" in str(refused.value)
    assert alias_version(registry, NAME, CHAMPION) == champion
    assert not storage.Artifact(outputs["evaluation"]).exists()


def _post(url: str, frame: dict) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, json.dumps({"dataframe_split": frame}).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_champion_serves_an_image_per_task_and_refuses_malformed_requests(crowned, registry, tmp_path):
    """`mlflow models serve` on loopback, the champion by alias, one request per task, then malformed ones."""
    import base64
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    import numpy as np

    from onereward.data.images import from_png, to_png

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(tmp_path / "serve.log", "w")
    # what `onereward serve` runs: this environment's mlflow, the project's tracking store
    proc = subprocess.Popen([sys.executable, "-m", "onereward", "serve", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "mlflow models serve did not answer /ping within 180 s"
            time.sleep(1)

        def b64(arr: np.ndarray) -> str:
            return base64.b64encode(to_png(arr)).decode()

        rng = np.random.default_rng(0)
        image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        mask[8:24, 8:24] = 255
        columns = ["image", "mask", "prompt", "task"]
        for task, prompt in (("fill", "fill red"), ("extend", ""), ("removal", "remove circle"),
                             ("text", 'text "A7"')):
            status, body = _post(f"{base}/invocations",
                                 {"columns": columns, "data": [[b64(image), b64(mask), prompt, task]]})
            assert status == 200, body
            out = from_png(base64.b64decode(body["predictions"][0]["image"]))
            assert out.shape == (32, 32, 3), task
        small_mask = mask[:16, :16]
        for row, expected in (([b64(image), b64(small_mask), "fill red", "fill"], "row 0: mask is 16x16"),
                              ([b64(image), b64(mask), "fill red", "paint"], "row 0: task 'paint'"),
                              ([base64.b64encode(b"not an image").decode(), b64(mask), "", "fill"],
                               "row 0: field 'image' is not a PNG or JPEG image"),
                              ([b64(image), b64(mask * 0), "fill red", "fill"], "row 0: mask is empty")):
            status, body = _post(f"{base}/invocations", {"columns": columns, "data": [row]})
            assert status == 400 and expected in body["message"], (status, body.get("message", body)[-500:])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_two_processes_distill_one_student_data_parallel(crowned, tmp_path, monkeypatch):
    """`torchrun --nproc_per_node 2`, gloo on the CPU: the processes share the parts of the teacher's states (one
    each), read both, and train one student, which the main process alone measures, writes and registers. Its
    first step is a single process's (process 0 draws the rows one process draws, from the same teacher states);
    process 1's gradient, averaged in, makes another student."""
    import os

    from safetensors.torch import load_file

    monkeypatch.setenv("ONEREWARD_HOME", str(crowned[0]))
    overrides = [*SMALL, *FIRST, "distill.train_steps=1", "distill.teacher_batch=8"]  # 16 conditions: two parts
    step = next(p for p in plan(load_config("tiny", overrides)) if p.stage.name == "distill")
    home = tmp_path / "home"
    monkeypatch.setenv("ONEREWARD_HOME", str(home))
    env = {**os.environ, "ONEREWARD_HOME": str(home), "OMP_NUM_THREADS": "1"}
    out = str(tmp_path / "dp" / "student")
    cmd = data_parallel(stage_command("distill", step.inputs, {"student": out}, overrides), 2)
    said = run_data_parallel(cmd, env)
    assert all(f"distill: process {r}: 1 of 2 parts of the teacher's trajectories" in said for r in (0, 1)), said
    dp = storage.Artifact(out)
    assert dp.read_json("registry.json")["version"]

    single = storage.Artifact(str(tmp_path / "single" / "student"))
    execute_stage(step.stage, load_config("tiny", overrides), step.inputs, {"student": single.uri})
    got, want = dp.read_json("distill_metrics.json"), single.read_json("distill_metrics.json")
    # equal but for the thread count (one a process under torchrun, the test's own here): reductions may reorder
    assert got["distill.loss.first"] == pytest.approx(want["distill.loss.first"], rel=1e-3)
    assert all(got[k] == pytest.approx(want[k], rel=1e-3) for k in want if ".teacher_" in k)
    weights = [load_file(a.local_dir() / "model" / "unet" / "diffusion_pytorch_model.safetensors")
               for a in (dp, single)]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_distill_resumes_after_sigkill_to_the_unkilled_student(crowned, tmp_path, monkeypatch):
    """Killed once the first part of the teacher's states is kept, then again after a checkpoint, the same command
    samples only the part it had not kept, then goes on from the checkpoint without sampling the teacher at all,
    and ends with the student and held-out numbers of a run never killed. Inputs are the crowned graph's; the runs
    register into their own home, so the crowned registry's aliases stay as they are."""
    import os
    import signal
    import subprocess

    monkeypatch.setenv("ONEREWARD_HOME", str(crowned[0]))
    overrides = [*SMALL, *FIRST, "distill.train_steps=12", "distill.checkpoint_every=2",
                 "distill.teacher_batch=8"]  # 16 conditions: two parts of the teacher's states
    step = next(p for p in plan(load_config("tiny", overrides)) if p.stage.name == "distill")
    home = tmp_path / "home"
    monkeypatch.setenv("ONEREWARD_HOME", str(home))
    out = str(tmp_path / "killed" / "student")
    ckpt = f"{out}.scratch/checkpoint"
    cmd = stage_command("distill", step.inputs, {"student": out}, overrides)
    env = {**os.environ, "ONEREWARD_HOME": str(home)}
    # the stage's first commit is the first part: the fault point kills it right after its manifest
    first = subprocess.run(cmd, env={**env, storage.FAULT_ENV: "commit.after_manifest"}, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == -signal.SIGKILL, (first.stdout + first.stderr)[-2000:]
    assert storage.Artifact(f"{out}.scratch/teacher-00000").exists()
    assert not storage.Artifact(f"{out}.scratch/teacher-00001").exists()
    assert not storage.Artifact(f"{out}.scratch/teacher").exists() and not storage.Artifact(ckpt).exists()
    killed_at, said = kill_after_checkpoint(cmd, env, ckpt)
    assert "1 of 2 parts of the teacher's states kept by a killed run" in said, said[-2000:]
    assert "process 0: 1 of 2 parts of the teacher's trajectories" in said
    assert killed_at < 12 and not storage.Artifact(out).exists()
    # the teacher's samples are kept once beside the checkpoint, not in it
    assert storage.Artifact(f"{out}.scratch/teacher").exists()
    assert not any("teacher" in f for f in storage.Artifact(ckpt).files())
    said = rerun_to_the_end(cmd, env, killed_at, "distill")
    assert "2 of 2 parts of the teacher's states kept by a killed run" in said
    assert "teacher's trajectories" not in said and "the teacher's held-out samples of the killed run" in said
    resumed = storage.Artifact(out)
    assert resumed.exists() and not storage.exists(f"{out}.scratch")

    unkilled = str(tmp_path / "unkilled" / "student")
    execute_stage(step.stage, load_config("tiny", overrides), step.inputs, {"student": unkilled})
    assert_same_weights(resumed, storage.Artifact(unkilled), "model/")
    metrics = resumed.read_json("distill_metrics.json")
    assert_same_metrics(metrics, storage.Artifact(unkilled).read_json("distill_metrics.json"), rel=1e-4)


def test_the_students_background_term_pulls_its_x0_towards_the_input_outside_the_mask():
    """distill_step with distill.background_weight: where the teacher's states say nothing useful (noise here),
    the student's x0 outside the mask still moves to the input, which is known there for every task."""
    from types import SimpleNamespace

    from onereward.models import tensors
    from onereward.models.tiny_unet import TinyUNetGenerator
    from onereward.stages.distill import distill_step

    s = load_config("tiny", ["distill.batch_size=8"])
    g = torch.Generator().manual_seed(0)
    n, size = 8, s.image_size
    masks = torch.zeros(n, 1, size, size)
    masks[:, :, 8:24, 8:24] = 1
    batch = {"images": torch.rand(n, 3, size, size, generator=g) * 2 - 1, "masks": masks,
             "prompts": ["fill red circle"] * n}
    c = SimpleNamespace(rows=[{}] * n, batch=batch)
    states = torch.randn(5, n, 3, size, size, generator=g)
    errors = {}
    for weight in (0.0, 4.0):
        student = TinyUNetGenerator.build(s.generator, ["fill red circle", ""], size, 0)
        opt = torch.optim.AdamW(list(student.parameters()), lr=1e-3, weight_decay=0.0)
        dc = s.distill.model_copy(update={"background_weight": weight})
        rng = torch.Generator().manual_seed(1)
        for _ in range(30):
            distill_step(student, opt, c, states, dc, rng)
        with torch.no_grad():
            x0 = student.predict_x0(states[2], torch.full((n,), 0.5), student.condition(batch["images"], masks),
                                    student.encode_text(batch["prompts"]))
        errors[weight] = float(tensors._masked_mse(x0, batch["images"], 1 - masks).mean())
    assert errors[4.0] < 0.8 * errors[0.0], errors  # measured: 0.058 vs 0.091


def test_latency_is_a_median_of_single_image_calls_cut_by_the_time_budget():
    from types import SimpleNamespace

    from onereward.stages.evaluate import Contender, latency

    calls = []

    class Slow:  # a stand-in generator: only the number and size of its calls matter here; its first is slow
        def sample(self, images, masks, prompts, *, steps, guidance, seed):
            calls.append(len(images))
            time.sleep(0.3 if len(calls) == 1 else 0.02)

    cond = SimpleNamespace(rows=[0, 1], batch={"images": torch.zeros(2, 3, 4, 4), "masks": torch.zeros(2, 1, 4, 4),
                                               "prompts": ["a", "b"]})
    c = Contender("teacher", Slow(), 28, 2.0)
    assert 0.02 <= latency(c, cond, 16) < 0.1 and len(calls) == 16  # no warm-up: the median ignores a slow first
    calls.clear()
    assert latency(c, cond, 16, budget_s=0.33) < 0.1
    assert len(calls) == 3 and set(calls) == {1}  # the budget is spent after three calls (0.3 + 2 x 0.02 s)
