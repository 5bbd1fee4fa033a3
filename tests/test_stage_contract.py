"""The stage contract: a stage sees only the configuration its key is made of, external inputs are in the
key, the data gates measure instead of trusting, and killed runs do not stay RUNNING in MLflow."""

import io
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from onereward.config import load_config
from onereward.data.validation import TASK_MIX_SUITE, DataValidationError, curated_suite, task_mix_frame, validate
from onereward.pipeline import GRAPH
from onereward.runner import execute_stage, plan, stage_key
from onereward.stages import StageSettings, UndeclaredConfigError


def _keys(*overrides: str) -> dict[str, str]:
    return {p.stage.name: p.key for p in plan(load_config("tiny", list(overrides)))}


def read_undeclared(ctx):
    return {"steps": ctx.settings.pretrain.steps}


def test_a_stage_reading_an_undeclared_section_fails(home, tmp_path):
    s = load_config("tiny")
    view = StageSettings(s, "pretrain_base", GRAPH.get("pretrain_base").params)
    assert view.generator is s.generator and view.image_size == 32
    with pytest.raises(UndeclaredConfigError, match=r"stage 'pretrain_base' read config section 'candidates'"):
        _ = view.candidates
    # the runner hands stages nothing else: a stage function that strays fails the stage, writes nothing
    from dataclasses import replace

    stray = replace(GRAPH.get("curate"), func="test_stage_contract:read_undeclared")
    with pytest.raises(UndeclaredConfigError, match="'pretrain'"):
        execute_stage(stray, s, {}, {"curated": str(tmp_path / "c")})
    assert not (tmp_path / "c").exists()


def test_keys_hold_every_input_that_changes_an_output(home):
    base = _keys()
    # the negative prompt is in the base model's vocabulary: a new one retrains the base
    neg = _keys("generator.negative_prompt=blurry")
    assert neg["pretrain_base"] != base["pretrain_base"] and neg["synthesize_masks"] == base["synthesize_masks"]
    # sampling settings of the candidates do not touch the base model
    more = _keys("candidates.per_condition=8")
    assert more["pretrain_base"] == base["pretrain_base"] and more["generate_candidates"] != base["generate_candidates"]
    # machine assets (fonts) are part of the conditions' key
    from onereward.stages.synthesize_masks import environment_fingerprint

    fp = environment_fingerprint(load_config("tiny"))
    assert fp["latin_font"] and set(fp) == {"cjk_font", "latin_font"}
    s = load_config("tiny")
    stage = GRAPH.get("synthesize_masks")
    from dataclasses import replace

    no_fp = replace(stage, fingerprint=None)
    assert stage_key(no_fp, s, {"curated": "x"}) != stage_key(stage, s, {"curated": "x"})


def test_asset_fingerprints_do_not_depend_on_where_the_assets_are_installed(tmp_path):
    """The Latin font sits in the virtual environment: two checkouts (or container images) with the same assets
    elsewhere on disk must key the data stages alike; another font must not."""
    import shutil

    from onereward.data.procedural import LATIN_FONT, asset_fingerprint

    moved = tmp_path / "elsewhere" / LATIN_FONT.name
    moved.parent.mkdir()
    shutil.copy(LATIN_FONT, moved)
    assert asset_fingerprint(str(moved), moved.parent) == asset_fingerprint(str(LATIN_FONT), LATIN_FONT.parent)
    (tmp_path / LATIN_FONT.name).write_bytes(LATIN_FONT.read_bytes()[:-1])
    assert asset_fingerprint(str(tmp_path / LATIN_FONT.name), tmp_path) != asset_fingerprint(str(moved), moved.parent)
    assert asset_fingerprint(str(moved), tmp_path) != asset_fingerprint(str(moved), moved.parent)  # another name


def test_a_checkpoint_cadence_is_not_part_of_any_key(home):
    """How often a training stage saves changes nothing it makes: a new cadence neither reruns the stage nor
    keeps a killed run from resuming its checkpoint. Its training settings still key it."""
    base = _keys()
    trained = {"pretrain": ["pretrain_base"], "reward": ["train_reward", "train_audit_reward"],
               "rl": ["rl_finetune"], "distill": ["distill"]}
    for section, stages in trained.items():
        assert _keys(f"{section}.checkpoint_every=7") == base, section
        lr = _keys(f"{section}.lr=0.123")
        assert all(lr[name] != base[name] for name in stages), section
    # MLflow and the artifact's meta still record the cadence a run used
    from onereward.runner import stage_params

    s = load_config("tiny", ["rl.checkpoint_every=7"])
    assert stage_params(GRAPH.get("rl_finetune"), s)["rl"]["checkpoint_every"] == 7


def test_task_mix_gate_fails_when_a_task_is_missing():
    mix = {"fill": 0.25, "extend": 0.25, "removal": 0.25, "text": 0.25}
    tasks = pd.Series(["fill"] * 14 + ["extend"] * 13 + ["text"] * 13)  # no removal in 40 rows
    frame = task_mix_frame(tasks, mix, tolerance=0.3)  # 0.25 ± 0.3 alone would accept a share of 0
    with pytest.raises(DataValidationError, match="removal|count"):
        validate("task_mix", frame, TASK_MIX_SUITE, "task")
    ok = pd.Series(["fill"] * 10 + ["extend"] * 10 + ["text"] * 10 + ["removal"] * 10)
    validate("task_mix", task_mix_frame(ok, mix, tolerance=0.3), TASK_MIX_SUITE, "task")


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_conditions_gate_measures_the_mask(home):
    from onereward.stages.synthesize_masks import validate_conditions

    s = load_config("tiny", ["masks.task_mix={fill: 1.0}"])
    mask = np.zeros((32, 32), np.uint8)
    mask[:2, :2] = 255  # 0.4 % of the image: below fill's coverage range
    img = _png(np.full((32, 32, 3), 100, np.uint8))
    row = {"condition_id": "c-lies", "image_id": "i", "task": "fill", "image": img, "mask": _png(mask),
           "prompt": "fill red", "target": None, "mask_coverage": 0.2, "split": "train", "params": "{}"}
    with pytest.raises(DataValidationError) as e:
        validate_conditions([row], s)
    assert "c-lies" in str(e.value) and "measured_coverage" in str(e.value)


def test_killed_runs_are_marked_killed(home, tmp_path):
    """A stage process SIGKILLed mid-run leaves its MLflow run RUNNING; the next attempt marks it KILLED."""
    import mlflow

    from onereward import tracking

    out = str(tmp_path / "curated")
    cmd = [sys.executable, "-m", "onereward", "stage", "curate", "--out", f"curated={out}",
           "--set", "curate.sources=[{kind: procedural, count: 20}]"]
    env = {**os.environ, "ONEREWARD_HOME": str(home), "ONEREWARD_FAULT_POINT": "commit.before_manifest"}
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode < 0
    tracking.setup("onereward")
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("onereward").experiment_id
    [stale] = client.search_runs([exp], "tags.stage = 'curate'")
    assert stale.info.status == "RUNNING"
    s = load_config("tiny", ["curate.sources=[{kind: procedural, count: 20}]"])
    start = time.perf_counter()
    execute_stage(GRAPH.get("curate"), s, {}, {"curated": out})
    assert time.perf_counter() - start < 120
    runs = {r.info.run_id: r for r in client.search_runs([exp], "tags.stage = 'curate'")}
    assert runs[stale.info.run_id].info.status == "KILLED"
    assert "ended without closing" in runs[stale.info.run_id].data.tags["killed_reason"]
    assert sorted(r.info.status for r in runs.values()) == ["FINISHED", "KILLED"]


def test_sigterm_ends_the_runs_killed_and_drops_the_staged_output(home, tmp_path):
    import mlflow

    from onereward import tracking

    out = tmp_path / "curated"
    cmd = [sys.executable, "-m", "onereward", "stage", "curate", "--out", f"curated={out}",
           "--set", "curate.sources=[{kind: procedural, count: 5000}]"]
    tracking.setup("onereward")  # the store exists before two processes use it
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("onereward").experiment_id
    proc = subprocess.Popen(cmd, env={**os.environ, "ONEREWARD_HOME": str(home)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    runs: list = []
    while time.time() < deadline and not runs:  # SIGTERM once the stage's run is open, mid-curation
        time.sleep(0.5)
        runs = client.search_runs([exp], "tags.stage = 'curate'")
    assert runs and runs[0].info.status == "RUNNING"
    proc.terminate()
    assert proc.wait(60) == 128 + 15
    assert not out.exists() and not list(tmp_path.glob(".staging-curated-*"))
    assert client.get_run(runs[0].info.run_id).info.status == "KILLED"


def test_a_missing_column_is_named(home):
    df = pd.DataFrame({"image_id": ["a", "b"], "source": ["x", "y"], "decodable": [True, True]})
    with pytest.raises(DataValidationError) as e:
        validate("curated", df, curated_suite(16), "image_id")
    assert "observed {'missing': ['height', 'image', 'origin', 'phash', 'width']}" in str(e.value)


def test_planning_the_graph_imports_no_torch(tmp_path):
    """A fully cached `make run` only plans the graph (keys from config, inputs and external fingerprints) and
    finds every output committed: it must not pay for importing torch (~3 s here). Run in a fresh interpreter,
    since this one has imported torch already."""
    code = ("import sys\nfrom onereward.config import load_config\nfrom onereward.runner import plan\n"
            "plan(load_config('tiny'))\n"
            "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    env = {**os.environ, "ONEREWARD_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_stage_prints_its_metrics_a_few_to_a_line(capsys):
    from onereward.stages import print_metrics

    metrics = {f"heldout.acc_cand.{t}.criterion_{i}": i / 7 for t in ("fill", "extend", "text") for i in range(6)}
    print_metrics("train_audit_reward", metrics)
    lines = capsys.readouterr().out.splitlines()
    assert all(line.startswith("train_audit_reward: ") and len(line) <= 120 for line in lines), lines
    assert 1 < len(lines) < len(metrics)
    shown = dict(pair.split("=") for line in lines for pair in line.removeprefix("train_audit_reward: ").split())
    assert shown.keys() == metrics.keys() and float(shown["heldout.acc_cand.text.criterion_5"]) == round(5 / 7, 4)
