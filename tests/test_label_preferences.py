"""label_preferences: the auto labeller's decisions on constructed cases, the stage through the runner, and
the Label Studio import (malformed entries reported by id) and export round trip."""

import base64
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from onereward import storage
from onereward.config import ConfigError, LabelsConfig, load_config
from onereward.data import schema
from onereward.data.images import from_png, to_png
from onereward.pipeline import GRAPH
from onereward.runner import execute_stage, run_pipeline, stage_key
from onereward.stages.label_preferences import KINDS, auto_pairs, detail_conflicts, smoother_wins

SIZE = 32
STAGE = GRAPH.get("label_preferences")


def textured(seed: int) -> np.ndarray:
    """A scene with edges everywhere, so blur and flat fills are measurably wrong."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE][..., None]
    img = rng.uniform(80, 150, 3) + 40 * np.sin(xx / rng.uniform(1.5, 3) + rng.uniform(0, 6, 3)) + 20 * np.cos(yy / 2)
    return img.astype(np.uint8)  # 20..210: room for the shifts below without clipping


def box(x0: int = 8, y0: int = 8, x1: int = 24, y1: int = 24) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), bool)
    m[y0:y1, x0:x1] = True
    return m


def condition(cid: str, target: np.ndarray, mask: np.ndarray, task: str = "fill", prompt: str = "fill shape",
              split: str = "train") -> dict:
    return {"condition_id": cid, "image_id": cid, "task": task, "image": to_png(target),
            "mask": to_png(mask.astype(np.uint8) * 255), "prompt": prompt, "target": to_png(target),
            "mask_coverage": float(mask.mean()), "split": split, "params": "{}"}


def candidate(cid: str, j: int, image: np.ndarray, task: str = "fill") -> dict:
    return {"condition_id": cid, "candidate_id": f"{cid}-c{j}", "task": task, "seed": j, "steps": 4,
            "guidance": 1.0, "image": to_png(image)}


def shifted(target: np.ndarray, mask: np.ndarray, offset) -> np.ndarray:
    """The target with the masked region moved by `offset` (grey levels, per channel or one for all)."""
    out = target.astype(np.int16)
    out[mask] += np.asarray(offset, dtype=np.int16)
    return np.clip(out, 0, 255).astype(np.uint8)


def only(task: str, *criteria: str, **kw) -> LabelsConfig:
    return LabelsConfig(criteria={"fill": [], "extend": [], "removal": [], "text": [], task: list(criteria)}, **kw)


def pairs(rows, criterion=None, kind=None) -> set[tuple[str, str]]:
    return {(r["winner_id"], r["loser_id"]) for r in rows
            if (criterion is None or r["criterion"] == criterion) and (kind is None or r["kind"] == kind)}


def test_auto_labeller_ranks_by_the_ground_truth():
    target, mask = textured(1), box()
    cond = condition("k", target, mask)
    cands = [candidate("k", 0, shifted(target, mask, 6)), candidate("k", 1, shifted(target, mask, 40)),
             candidate("k", 2, shifted(target, mask, -20))]
    rows, counts = auto_pairs(cond, cands, LabelsConfig(degraded_per_condition=0), seed=0)

    # the candidate closer to the target wins on alignment, and the target beats every candidate
    assert pairs(rows, "alignment", "cand_vs_cand") == {("k-c0", "k-c1"), ("k-c0", "k-c2"), ("k-c2", "k-c1")}
    for criterion in ("alignment", "consistency", "structure", "aesthetics"):
        assert pairs(rows, criterion, "target_vs_cand") == {("k-target", f"k-c{j}") for j in range(3)}, criterion
    assert {r["criterion"] for r in rows} == {"alignment", "consistency", "structure", "aesthetics"}
    pngs = {c["candidate_id"]: c["image"] for c in cands} | {"k-target": cond["target"]}
    for r in rows:
        assert r["margin"] > 0 and 0.5 < r["confidence"] <= 1 and r["labeller"] == "auto" and r["split"] == "train"
        assert r["winner_image"] == pngs[r["winner_id"]] and r["loser_image"] == pngs[r["loser_id"]]
    # a larger margin earns a higher confidence
    by = {(r["winner_id"], r["loser_id"]): r for r in rows if r["criterion"] == "alignment"}
    assert by[("k-c0", "k-c1")]["confidence"] > by[("k-c2", "k-c1")]["confidence"]
    assert counts["flipped"] == 0


def test_fill_alignment_prefers_the_prompt_colour_at_equal_error():
    grey = np.full((SIZE, SIZE, 3), 128, np.uint8)
    mask = box()
    # the same in-mask error to the target, one step towards red (220, 30, 30) and one away from it
    towards, away = shifted(grey, mask, (30, -30, -30)), shifted(grey, mask, (-30, 30, 30))
    rows, _ = auto_pairs(condition("c", grey, mask, prompt="fill red"),
                         [candidate("c", 0, away), candidate("c", 1, towards)], only("fill", "alignment"), seed=0)
    assert pairs(rows, kind="cand_vs_cand") == {("c-c1", "c-c0")}
    # without a colour word the two are a tie, and a tie is no label
    rows, counts = auto_pairs(condition("c", grey, mask, prompt="fill shape"),
                              [candidate("c", 0, away), candidate("c", 1, towards)], only("fill", "alignment"), seed=0)
    assert pairs(rows, kind="cand_vs_cand") == set() and counts["below_margin.cand_vs_cand"] == 1


def test_pairs_below_the_margin_are_not_emitted():
    target, mask = textured(2), box()
    # in-mask squared errors 20² and 21²: the second is 9.3% worse
    cands = [candidate("m", 0, shifted(target, mask, 20)), candidate("m", 1, shifted(target, mask, 21))]
    cond = condition("m", target, mask)
    rows, counts = auto_pairs(cond, cands, only("fill", "alignment", min_margin=0.1, degraded_per_condition=0), 0)
    assert pairs(rows, kind="cand_vs_cand") == set() and counts["below_margin.cand_vs_cand"] == 1
    assert pairs(rows, kind="target_vs_cand") == {("m-target", "m-c0"), ("m-target", "m-c1")}
    rows, _ = auto_pairs(cond, cands, only("fill", "alignment", min_margin=0.08, degraded_per_condition=0), 0)
    (row,) = [r for r in rows if r["kind"] == "cand_vs_cand"]
    assert (row["winner_id"], row["loser_id"]) == ("m-c0", "m-c1")
    assert row["margin"] == pytest.approx((21**2 - 20**2) / 255**2, rel=1e-3)


def test_degraded_images_lose_to_good_candidates():
    target, mask = textured(3), box(6, 4, 26, 22)
    rng = np.random.default_rng(0)
    good = [candidate("d", j, np.clip(target + rng.normal(0, 2, target.shape), 0, 255).astype(np.uint8))
            for j in range(3)]
    kinds = ["blur", "wash", "noise", "masked_input", "flat"]
    lc = LabelsConfig(degradations=kinds, degraded_per_condition=5, min_margin=0.3)
    rows, counts = auto_pairs(condition("d", target, mask), good, lc, seed=0)
    for criterion in ("alignment", "consistency", "structure", "aesthetics"):
        lost = [r for r in rows if r["criterion"] == criterion and r["kind"] == "cand_vs_degraded"]
        assert sorted(r["loser_id"].split("~")[1] for r in lost) == sorted(kinds), criterion
        assert all(r["winner_id"] in {c["candidate_id"] for c in good} for r in lost)
    assert counts["below_margin.cand_vs_degraded"] == 0
    losers = {r["loser_id"]: from_png(r["loser_image"]) for r in rows if r["kind"] == "cand_vs_degraded"}
    masked = next(v for k, v in losers.items() if k.endswith("~masked_input"))
    assert (masked[mask] == 128).all() and (masked[~mask] == target[~mask]).all()
    flat = next(v for k, v in losers.items() if k.endswith("~flat"))
    assert flat.reshape(-1, 3).std(0).max() < 1
    # a degraded image that is not worse than any candidate by the margin is no label
    bad = [candidate("d", 0, np.full_like(target, 255))]
    rows, counts = auto_pairs(condition("d", target, mask), bad, only("fill", "alignment", degradations=["blur"],
                                                                       degraded_per_condition=1), seed=0)
    assert not [r for r in rows if r["kind"] == "cand_vs_degraded"] and counts["below_margin.cand_vs_degraded"] == 1


def test_label_noise_flips_the_expected_share():
    conds = []
    for i in range(12):
        target, mask = textured(10 + i), box()
        cands = [candidate(f"n{i}", j, shifted(target, mask, 6 * j + 6)) for j in range(10)]  # 45 pairs, all apart
        conds.append((condition(f"n{i}", target, mask), cands))

    def run(noise):
        out = []
        for cond, cands in conds:
            out += auto_pairs(cond, cands, only("fill", "alignment", noise=noise, degraded_per_condition=0), 7)[0]
        return out

    clean, noisy = run(0.0), run(0.3)
    assert len(clean) == len(noisy) == 12 * (45 + 10)
    truth = pairs(clean, kind="cand_vs_cand")
    cand = [r for r in noisy if r["kind"] == "cand_vs_cand"]
    flipped = [r for r in cand if (r["winner_id"], r["loser_id"]) not in truth]
    assert all((r["loser_id"], r["winner_id"]) in truth and r["margin"] < 0 for r in flipped)
    share = len(flipped) / len(cand)
    assert abs(share - 0.3) < 4 * (0.3 * 0.7 / len(cand)) ** 0.5, share  # 540 draws: 0.3 ± 0.08
    # only candidate pairs are noisy; the same seed flips the same pairs
    assert pairs(noisy, kind="target_vs_cand") == pairs(clean, kind="target_vs_cand")
    assert [r["winner_id"] for r in run(0.3)] == [r["winner_id"] for r in noisy]
    assert max(r["confidence"] for r in cand) < max(r["confidence"] for r in clean if r["kind"] == "cand_vs_cand")


def test_smoother_wins_names_kinds_that_reward_opposite_detail():
    """Candidate pairs won by the blurred image and target pairs won by the sharp target: the warning names the
    task; when the candidate pairs also reward detail it does not."""
    target, mask = textured(5), box()
    blurred = (target.astype(float) + np.roll(target, 1, 0) + np.roll(target, 1, 1) + np.roll(target, 1, (0, 1))) / 4
    images = {"t": to_png(target), "soft": to_png(blurred.astype(np.uint8)), "sharp": to_png(shifted(target, mask, 9))}

    def row(kind: str, winner: str, loser: str) -> dict:
        return {"condition_id": "k", "task": "fill", "kind": kind, "winner_id": winner, "loser_id": loser,
                "winner_image": images[winner], "loser_image": images[loser]}

    masks = {"k": to_png(mask.astype(np.uint8) * 255)}
    shares = smoother_wins([row("cand_vs_cand", "soft", "sharp"), row("target_vs_cand", "t", "soft")], masks)
    assert shares == {"smoother_wins.cand_vs_cand.fill": 1.0, "smoother_wins.target_vs_cand.fill": 0.0}
    assert detail_conflicts(shares) == ["fill: the smoother image wins 100% of candidate pairs but 0% of target pairs"]
    shares = smoother_wins([row("cand_vs_cand", "sharp", "soft"), row("target_vs_cand", "t", "soft")], masks)
    assert shares["smoother_wins.cand_vs_cand.fill"] == 0.0 and detail_conflicts(shares) == []


def test_config_refuses_unknown_criteria_and_import_without_uri():
    with pytest.raises(ConfigError, match=r"labels\.criteria\.fill\.0"):
        load_config("tiny", ["labels.criteria.fill=[beauty]"])
    with pytest.raises(ConfigError, match="import_uri is required"):
        load_config("tiny", ["labels.kind=import"])
    assert load_config("tiny", ["labels.criteria.text=[]"]).labels.criteria.fill  # others keep their defaults


def _candidates_for(conditions: list[dict], per: int = 3) -> list[dict]:
    """Candidates of a generator of varied quality: the target with growing in-mask errors, one flat fill."""
    out = []
    for r in conditions:
        target, mask = from_png(r["target"]), from_png(r["mask"], "L") > 127
        rng = np.random.default_rng(int(r["condition_id"][:8], 16))
        for j in range(per - 1):
            noisy = target + rng.normal(0, 6 + 30 * j, target.shape) * mask[..., None]
            out.append(candidate(r["condition_id"], j, np.clip(noisy, 0, 255).astype(np.uint8), r["task"]))
        flat = target.copy()
        flat[mask] = target[~mask].mean(0)
        out.append(candidate(r["condition_id"], per - 1, flat, r["task"]))
    return out


def test_stage_runs_through_the_runner_and_writes_the_schema(small_settings, tmp_path):
    s = small_settings()
    by = {o.stage: o for o in run_pipeline(s, until="synthesize_masks").outcomes}
    cond_uri = by["synthesize_masks"].outputs["conditions"]
    conditions = [r for r in storage.Artifact(cond_uri).read_table().to_pylist() if r["split"] == "train"][:24]
    cand_uri = str(tmp_path / "candidates")
    with storage.writing(cand_uri, "test-candidates") as w:
        w.write_table(pa.Table.from_pylist(_candidates_for(conditions), schema=schema.CANDIDATES))
    out = str(tmp_path / "preferences")
    outcome = execute_stage(STAGE, s, {"conditions": cond_uri, "candidates": cand_uri}, {"preferences": out})

    art = storage.Artifact(out)
    tbl = art.read_table()
    assert tbl.schema.equals(schema.PREFERENCES)
    rows = tbl.to_pylist()
    assert {r["kind"] for r in rows} == set(KINDS) and {r["labeller"] for r in rows} == {"auto"}
    assert {r["condition_id"] for r in rows} <= {c["condition_id"] for c in conditions}
    tasks = {c["condition_id"]: c["task"] for c in conditions}
    crit = s.labels.criteria.model_dump()
    assert all(r["criterion"] in crit[tasks[r["condition_id"]]] and r["task"] == tasks[r["condition_id"]]
               for r in rows)
    assert len({(r["pair_id"], r["winner_id"]) for r in rows}) == len(rows)
    # the images the pairs name, each once, and each labelled condition's masked input, in small row groups
    images = _pair_images(art)
    named = {r[f"{side}_id"] for r in rows for side in ("winner", "loser")}
    assert set(images) == named | {f"{r['condition_id']}-context" for r in rows}
    assert all(from_png(png).shape == (32, 32, 3) for png in images.values())
    by_id = {c["candidate_id"]: c["image"] for c in _candidates_for(conditions)}
    by_id |= {f"{c['condition_id']}-target": c["target"] for c in conditions}
    assert all(images[i] == by_id[i] for i in named if "~" not in i)
    for c in conditions:
        if f"{c['condition_id']}-context" in images:
            context = from_png(images[f"{c['condition_id']}-context"])
            mask = from_png(c["mask"], "L") > 127
            assert (context[mask] == 128).all() and (context[~mask] == from_png(c["image"])[~mask]).all()
    assert max(pq.ParquetFile(f).metadata.row_group(0).num_rows for f in art.local_shards("images")) <= 16

    # the report, the metrics and the table agree, cell by cell
    rep = art.read_json("report.json")
    m = outcome.metrics
    assert rep["pairs"] == m["pairs"] == len(rows) and m["conditions"] == len(conditions)
    for r in rows:
        cell = (r["task"], r["criterion"], r["kind"])
        assert rep["pairs_by_cell"][cell[0]][cell[1]][cell[2]] == m["pairs." + ".".join(cell)]
    assert rep["smoother_wins"] == {k: v for k, v in m.items() if k.startswith("smoother_wins.")}
    assert {tuple(k.split(".")[1:]) for k in rep["smoother_wins"]} == {(r["kind"], r["task"]) for r in rows}
    cells = [k for k in m if k.count(".") == 3 and k.startswith("pairs.")]
    assert sum(m[k] for k in cells) == len(rows)
    # on these candidates the worst one loses to the best on the in-mask measures
    for c in conditions:
        if c["task"] in ("fill", "removal"):
            crit_name = "alignment" if c["task"] == "fill" else "removal_quality"
            got = pairs([r for r in rows if r["condition_id"] == c["condition_id"]], crit_name, "cand_vs_cand")
            assert (f"{c['condition_id']}-c0", f"{c['condition_id']}-c1") in got, c["condition_id"]

    again = execute_stage(STAGE, s, {"conditions": cond_uri, "candidates": cand_uri}, {"preferences": out})
    assert again.status == "cached"


def _pair_images(art: storage.Artifact) -> dict[str, bytes]:
    t = art.read_table("images")
    assert t.schema.equals(schema.PAIR_IMAGES)
    ids = t.column("image_id").to_pylist()
    assert len(set(ids)) == len(ids)
    return dict(zip(ids, t.column("image").to_pylist(), strict=True))


def _write_inputs(tmp_path) -> tuple[dict[str, str], list[dict], list[dict]]:
    conditions = []
    for i, task in enumerate(["fill", "removal", "text", "extend"]):
        conditions.append(condition(f"{i:02d}c0ffee", textured(30 + i), box(4 + i, 6, 20 + i, 26), task,
                                    split="heldout" if i == 3 else "train"))
    cands = _candidates_for(conditions)
    uris = {"conditions": str(tmp_path / "conditions"), "candidates": str(tmp_path / "candidates")}
    with storage.writing(uris["conditions"], "test-conditions") as w:
        w.write_table(schema.table(conditions, schema.CONDITIONS))
    with storage.writing(uris["candidates"], "test-candidates") as w:
        w.write_table(pa.Table.from_pylist(cands, schema=schema.CANDIDATES))
    return uris, conditions, cands


def _choice(value: str, kind: str = "choices") -> dict:
    v = {"choices": [value]} if kind == "choices" else {"selected": value}
    return {"id": 1, "result": [{"from_name": "better", "to_name": "image1", "type": kind, "value": v}],
            "was_cancelled": False}


def _export(tmp_path, uris: dict[str, str]) -> list[dict]:
    from onereward.cli import main

    path = tmp_path / "tasks.json"
    assert main(["labels", "export", "--conditions", uris["conditions"], "--candidates", uris["candidates"],
                 "--out", str(path)]) == 0
    return json.loads(path.read_text())


def test_label_studio_export_then_import_gives_the_same_pairs(home, tmp_path):
    uris, conditions, cands = _write_inputs(tmp_path)
    tasks = _export(tmp_path, uris)
    # 3 candidates: 3 pairs per criterion; fill and extend have 4 criteria, removal and text 1
    assert len(tasks) == 3 * (4 + 1 + 1 + 4)
    pngs = {c["candidate_id"]: c["image"] for c in cands}
    for t in tasks:
        d = t["data"]
        assert base64.b64decode(d["image1"].split(",", 1)[1]) == pngs[d["candidate1"]]
        assert base64.b64decode(d["image2"].split(",", 1)[1]) == pngs[d["candidate2"]]
    assert {t["data"]["candidate1"] < t["data"]["candidate2"] for t in tasks} == {True, False}  # both orders shown

    rng = np.random.default_rng(5)
    chosen = set()
    for i, t in enumerate(tasks):  # what Label Studio gives back: task ids and one annotation each
        t["id"] = 100 + i
        pick = int(rng.integers(2))
        kind = "pairwise" if i % 2 else "choices"
        t["annotations"] = [_choice(["left", "right"][pick] if kind == "pairwise" else f"image{pick + 1}", kind)]
        d = t["data"]
        ids = (d["candidate1"], d["candidate2"])
        chosen.add((d["condition_id"], d["criterion"], ids[pick], ids[1 - pick], d["pair_id"]))
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    s = load_config("tiny", ["labels.kind=import", f"labels.import_uri={export}"])
    out = str(tmp_path / "preferences")
    outcome = execute_stage(STAGE, s, uris, {"preferences": out})
    rows = storage.Artifact(out).read_table().to_pylist()
    assert {(r["condition_id"], r["criterion"], r["winner_id"], r["loser_id"], r["pair_id"]) for r in rows} == chosen
    assert len(rows) == len(tasks) and outcome.metrics["rejected"] == 0
    assert {r["labeller"] for r in rows} == {"import"} and {r["kind"] for r in rows} == {"cand_vs_cand"}
    images = _pair_images(storage.Artifact(out))
    assert all(images[r["winner_id"]] == pngs[r["winner_id"]] and r["confidence"] == 1.0 for r in rows)
    split = {c["condition_id"]: c["split"] for c in conditions}
    assert all(r["split"] == split[r["condition_id"]] for r in rows)
    # the ground truth is known here: the margin says whether the annotator agreed with it
    margins = [r["margin"] for r in rows]
    assert all(np.isfinite(margins)) and min(margins) < 0 < max(margins)

    # new labels under the same URI are new data: the key changes with the export's bytes
    key = stage_key(STAGE, s, {"conditions": "a", "candidates": "b"})
    export.write_text(json.dumps(tasks[:-1]))
    assert stage_key(STAGE, s, {"conditions": "a", "candidates": "b"}) != key


def test_label_studio_import_keeps_good_rows_and_reports_each_bad_one(home, tmp_path):
    uris, conditions, cands = _write_inputs(tmp_path)
    tasks = [t for t in _export(tmp_path, uris) if t["data"]["criterion"] in ("alignment", "removal_quality")]
    good = []
    for i, t in enumerate(tasks):
        t["id"] = i + 1
        t["annotations"] = [_choice("image1")]
        good.append(t)

    def bad(id_, **changes):
        t = json.loads(json.dumps(good[0]))
        t["id"] = id_
        t["data"].update(changes.pop("data", {}))
        t.update(changes)
        return t

    c0 = good[0]["data"]["candidate1"]
    malformed = {
        901: ("unknown_candidate", bad(901, data={"candidate2": "nope-c9"})),
        902: ("unknown_condition", bad(902, data={"condition_id": "gone"})),
        903: ("missing_choice", bad(903, annotations=[])),
        904: ("missing_choice", bad(904, annotations=[{**_choice("image2"), "was_cancelled": True}])),
        905: ("duplicate_pair", bad(905, annotations=[_choice("image2")])),  # a second label of entry 1
        906: ("self_pair", bad(906, data={"candidate1": c0, "candidate2": c0})),
        907: ("wrong_type", bad(907, data={"candidate1": 7})),
        908: ("unknown_choice", bad(908, annotations=[_choice("image3")])),
        909: ("tied_choices", bad(909, annotations=[_choice("image1"), _choice("image2")])),
        910: ("unknown_criterion", bad(910, data={"criterion": "structure"})),  # removal has no structure
        911: ("missing_field", bad(911, data={"criterion": None})),
    }
    removal = next(t["data"] for t in good if t["data"]["task"] == "removal")
    malformed[910][1]["data"].update({k: removal[k] for k in ("condition_id", "candidate1", "candidate2")})
    export = [*good, *(t for _, t in malformed.values()), "not a task"]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export))
    s = load_config("tiny", ["labels.kind=import", f"labels.import_uri={path}"])
    out = str(tmp_path / "preferences")
    outcome = execute_stage(STAGE, s, uris, {"preferences": out})

    art = storage.Artifact(out)
    rows = art.read_table().to_pylist()
    assert sorted(r["pair_id"] for r in rows) == sorted(t["data"]["pair_id"] for t in good)
    rejected = art.read_table("rejected")
    assert rejected.schema.equals(schema.REJECTED_LABELS)
    got = {r["entry"]: r["reason"] for r in rejected.to_pylist()}
    want = {str(k): reason for k, (reason, _) in malformed.items()} | {f"#{len(export) - 1}": "wrong_type"}
    assert got == want
    assert art.read_json("rejected.json") == rejected.to_pylist()
    assert len(rows) + len(got) == len(export)  # nothing dropped silently
    m = outcome.metrics
    assert m["rejected"] == len(want) and m["rejected.missing_choice"] == 2 and m["rejected.duplicate_pair"] == 1
    dup = next(r for r in rejected.to_pylist() if r["reason"] == "duplicate_pair")
    assert dup["pair_id"] == good[0]["data"]["pair_id"] and "entry 1" in dup["detail"]


@pytest.mark.parametrize("which, drop", [("candidates", "image"), ("candidates", "condition_id"),
                                         ("conditions", "mask")])
def test_an_input_of_the_wrong_schema_is_refused_by_column_and_nothing_written(home, tmp_path, which, drop):
    uris, conditions, cands = _write_inputs(tmp_path)
    rows, sch = (cands, schema.CANDIDATES) if which == "candidates" else (conditions, schema.CONDITIONS)
    bad = pa.Table.from_pylist(rows, schema=sch).drop_columns([drop])
    uris[which] = str(tmp_path / f"bad-{which}")
    with storage.writing(uris[which], "bad") as w:
        w.write_table(bad)
    out = str(tmp_path / "preferences")
    with pytest.raises(ValueError, match=f"{which} artifact .*: missing column '{drop}'"):
        execute_stage(STAGE, load_config("tiny"), uris, {"preferences": out})
    assert not storage.Artifact(out).exists()


def test_export_can_point_at_image_objects_and_take_the_first_conditions(home, tmp_path):
    """A flux export inline would be terabytes: with --images-uri each image is written once beside and the tasks
    point at it; --max-conditions exports the first conditions by id. The tasks are the inline export's otherwise."""
    from onereward.cli import main

    uris, conditions, cands = _write_inputs(tmp_path)
    inline = _export(tmp_path, uris)
    images, path = str(tmp_path / "images"), tmp_path / "by-uri.json"
    assert main(["labels", "export", "--conditions", uris["conditions"], "--candidates", uris["candidates"],
                 "--out", str(path), "--images-uri", images, "--max-conditions", "2"]) == 0
    tasks = json.loads(path.read_text())
    first_two = sorted(c["condition_id"] for c in conditions)[:2]
    assert {t["data"]["condition_id"] for t in tasks} == set(first_two)
    pngs = {c["candidate_id"]: c["image"] for c in cands}
    for t in tasks:
        d = t["data"]
        for side in ("1", "2"):
            assert d[f"image{side}"] == f"{images}/{d[f'candidate{side}']}.png"
            assert storage.read_bytes(d[f"image{side}"]) == pngs[d[f"candidate{side}"]]
        assert d["input"] == f"{images}/{d['condition_id']}-input.png" and storage.exists(d["input"])
    same = [t for t in inline if t["data"]["condition_id"] in first_two]
    keys = ("image1", "image2", "input")
    assert [{k: v for k, v in t["data"].items() if k not in keys} for t in tasks] == \
        [{k: v for k, v in t["data"].items() if k not in keys} for t in same]
    assert all(base64.b64decode(s["data"]["input"].split(",", 1)[1]) == storage.read_bytes(t["data"]["input"])
               for s, t in zip(same, tasks, strict=True))
