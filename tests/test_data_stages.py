"""curate + synthesize_masks end to end: local and S3, caching, bad input, crash safety."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from onereward import storage
from onereward.data.images import from_png
from onereward.data.validation import DataValidationError
from onereward.pipeline import GRAPH
from onereward.runner import execute_stage, run_pipeline

DATA_STAGES = ("curate", "synthesize_masks")


def _run_data(settings, root=None):
    if root:
        settings = settings.model_copy(update={"artifact_root": root})
    return run_pipeline(settings, until="synthesize_masks")


def _rows(uri):
    t = storage.Artifact(uri).read_table().sort_by("condition_id")
    return t.drop_columns(["params"]).to_pylist()


def test_local_run_then_cached(small_settings):
    s = small_settings()
    first = _run_data(s)
    assert [o.status for o in first.outcomes] == ["done", "done"]
    cond_uri = first.outcomes[1].outputs["conditions"]
    art = storage.Artifact(cond_uri)
    tbl = art.read_table()
    assert set(tbl.column("task").to_pylist()) == {"fill", "extend", "removal", "text"}
    assert set(tbl.column("split").to_pylist()) == {"train", "heldout"}
    for r in tbl.to_pylist()[:20]:
        mask = from_png(r["mask"], "L") > 127
        assert abs(mask.mean() - r["mask_coverage"]) < 1e-6 and mask.any()
        assert from_png(r["image"]).shape == (32, 32, 3)
        assert r["target"] is not None and r["prompt"]
    removal = [r for r in tbl.to_pylist() if r["task"] == "removal"][0]
    mask = from_png(removal["mask"], "L") > 127
    # outside the removal mask the target equals the input: only the object changes
    assert np.array_equal(from_png(removal["image"])[~mask], from_png(removal["target"])[~mask])

    second = _run_data(s)
    assert [o.status for o in second.outcomes] == ["cached", "cached"]
    changed = _run_data(s.model_copy(update={"seed": 1}))
    assert [o.status for o in changed.outcomes] == ["done", "done"]


def test_s3_matches_local(small_settings, s3_bucket):
    s = small_settings()
    local = _run_data(s)
    remote = _run_data(s, f"s3://{s3_bucket}/runs")
    r_uri = remote.outcomes[1].outputs["conditions"]
    assert r_uri.startswith("s3://")
    assert _rows(local.outcomes[1].outputs["conditions"]) == _rows(r_uri)
    assert [o.status for o in _run_data(s, f"s3://{s3_bucket}/runs").outcomes] == ["cached", "cached"]


def _png(size, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_folder_images_are_counted_drops(small_settings, tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    (d / "good1.png").write_bytes(_png((64, 48), seed=1))
    (d / "good2.png").write_bytes(_png((40, 40), seed=2))
    (d / "dup.png").write_bytes(_png((64, 48), seed=1))
    (d / "corrupt.png").write_bytes(_png((64, 64), seed=3)[:60])
    (d / "empty.png").write_bytes(b"")
    (d / "tiny.png").write_bytes(_png((1, 1)))
    (d / "flat.png").write_bytes(_png((64, 64), "L", 4)[:0] or _flat_png())
    Image.new("1", (9000, 5000)).save(d / "bomb.png")  # 45 M pixels > max_pixels
    s = small_settings(f"curate.sources=[{{kind: folder, path: '{d}'}}]", "curate.max_pixels=20000000")
    out = str(tmp_path / "curated")
    outcome = execute_stage(GRAPH.get("curate"), s, {}, {"curated": out})
    report = storage.Artifact(out).read_json("report.json")
    assert report["kept"] == 2 and outcome.metrics["images_kept"] == 2
    assert report["dropped"] == {"corrupt": 1, "empty_file": 1, "undersized": 1, "too_large": 1,
                                 "duplicate": 1, "near_constant": 1}
    assert any("bomb.png" in e for e in report["examples"]["too_large"])
    assert any("corrupt.png" in e for e in report["examples"]["corrupt"])


def _flat_png():
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 120, 120)).save(buf, format="PNG")
    return buf.getvalue()


def test_manifest_missing_column_is_a_clear_error(small_settings, tmp_path):
    man = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"path": [str(tmp_path / "x.png")]}), man)
    s = small_settings(f"curate.sources=[{{kind: manifest, uri: '{man}'}}]")
    out = tmp_path / "curated"
    with pytest.raises(ValueError, match="missing column 'uri'"):
        execute_stage(GRAPH.get("curate"), s, {}, {"curated": str(out)})
    assert not out.exists() and not list(tmp_path.glob(".staging-*"))


def _s3_manifest(bucket: str, n: int, missing: int = 1) -> str:
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    uris = []
    for i in range(n):
        s3.put_object(Bucket=bucket, Key=f"img/{i}.png", Body=_png((48, 48), seed=10 + i))
        uris.append(f"s3://{bucket}/img/{i}.png")
    uris += [f"s3://{bucket}/img/missing-{i}.png" for i in range(missing)]
    man = f"s3://{bucket}/manifest.parquet"
    buf = io.BytesIO()
    pq.write_table(pa.table({"uri": uris}), buf)
    storage.write_bytes(man, buf.getvalue())
    return man


def test_manifest_of_s3_uris(small_settings, s3_bucket, tmp_path):
    man = _s3_manifest(s3_bucket, 3)
    s = small_settings(f"curate.sources=[{{kind: manifest, uri: '{man}'}}]")
    out = f"s3://{s3_bucket}/out/curated"
    execute_stage(GRAPH.get("curate"), s, {}, {"curated": out})
    art = storage.Artifact(out)
    rep = art.read_json("report.json")
    assert rep["kept"] == 3 and rep["dropped"] == {"missing": 1}
    drops = art.read_table("drops").to_pylist()
    assert [(d["origin"], d["reason"]) for d in drops] == [(f"s3://{s3_bucket}/img/missing-0.png", "missing")]


def test_data_stages_through_s3_faults_keep_every_row(small_settings, s3_server, s3_bucket, monkeypatch):
    """A few percent of S3 requests answered 503 SlowDown and some connections reset: the data stages
    (S3 manifest source, S3 artifacts) give the same rows and the same drop counts as without faults."""
    from faulty_s3 import FaultyS3Proxy

    man = _s3_manifest(s3_bucket, 30, missing=2)
    s = small_settings(f"curate.sources=[{{kind: manifest, uri: '{man}'}}]", "masks.mix_tolerance=0.35",
                       "curate.shard_rows=8", "storage.attempts=10", "storage.backoff_s=0.01")
    clean = _run_data(s, f"s3://{s3_bucket}/clean")
    with FaultyS3Proxy(s3_server, slowdown=0.05, reset=0.03, seed=1) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        faulty = _run_data(s, f"s3://{s3_bucket}/faulty")
        assert proxy.stats["slowdown"] + proxy.stats["reset"] >= 3, proxy.stats
        got_rows = _rows(faulty.outcomes[1].outputs["conditions"])
        got_report = storage.Artifact(faulty.outcomes[0].outputs["curated"]).read_json("report.json")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    want_report = storage.Artifact(clean.outcomes[0].outputs["curated"]).read_json("report.json")
    assert got_report["kept"] == want_report["kept"] == 30
    assert got_report["dropped"] == want_report["dropped"] == {"missing": 2}
    assert got_rows == _rows(clean.outcomes[1].outputs["conditions"])


def test_unreachable_store_fails_the_stage_with_the_cause(small_settings, tmp_path, monkeypatch, home):
    from conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    s = small_settings("curate.sources=[{kind: manifest, uri: 's3://nowhere/manifest.parquet'}]",
                       "storage.attempts=2", "storage.backoff_s=0.01")
    out = tmp_path / "curated"
    with pytest.raises(storage.StorageError, match=r"s3://nowhere/manifest.parquet failed after 2 attempts"):
        execute_stage(GRAPH.get("curate"), s, {}, {"curated": str(out)})
    assert not out.exists() and not list(tmp_path.glob(".staging-*"))


def test_bad_credentials_fail_at_once_and_write_nothing(small_settings, home, tmp_path, monkeypatch):
    """moto_server enforcing authentication: a wrong key is a permanent error, not retried, not a drop."""
    from conftest import BIN, free_port, wait_port

    port = free_port()
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        out = "s3://onereward-x/curated"
        s = small_settings("curate.sources=[{kind: procedural, count: 8}]", "storage.attempts=5")
        start = time.perf_counter()
        with pytest.raises(storage.StorageError, match=r"credentials or permissions; not retried"):
            execute_stage(GRAPH.get("curate"), s, {}, {"curated": out})
        assert time.perf_counter() - start < 30
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_folder_is_listed_in_path_order_without_hidden_files_or_linked_folders(tmp_path, monkeypatch):
    """curate lists a folder source from directory entries: nested folders in path order, names as `root / name`
    reads them (no "./" for the current folder), files named .* and broken or looping links left out, linked
    folders not entered (as Path.rglob), linked files kept and flagged for the outside-the-root check."""
    from pathlib import Path

    from onereward.stages.curate import _files

    d = tmp_path / "images"
    for f in ("b-c.jpg", "a.jpg", "sub/x.jpg", ".hidden/y.jpg", ".h.jpg"):
        (d / f).parent.mkdir(parents=True, exist_ok=True)
        (d / f).write_bytes(b"x")
    (d / "link.jpg").symlink_to(d / "a.jpg")
    (d / "loop").symlink_to(d / "loop")
    (d / "gone.jpg").symlink_to(d / "nowhere.jpg")
    (d / "sublink").symlink_to(d / "sub")
    want = [(".hidden/y.jpg", False), ("a.jpg", False), ("b-c.jpg", False), ("link.jpg", True), ("sub/x.jpg", False)]
    assert _files(d) == [(str(d / p), link) for p, link in want]
    monkeypatch.chdir(d)
    assert _files(Path(".")) == want


def test_folder_source_refuses_links_out_of_its_root(small_settings, tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    for i in range(3):
        (d / f"ok{i}.png").write_bytes(_png((48, 48), seed=300 + i))
    secret = tmp_path / "outside.png"
    secret.write_bytes(_png((48, 48), seed=399))
    (d / "link.png").symlink_to(secret)
    s = small_settings(f"curate.sources=[{{kind: folder, path: '{d}'}}]")
    out = str(tmp_path / "curated")
    execute_stage(GRAPH.get("curate"), s, {}, {"curated": out})
    art = storage.Artifact(out)
    assert art.read_json("report.json")["dropped"] == {"outside_source": 1}
    assert [d["origin"] for d in art.read_table("drops").to_pylist()] == [str(d / "link.png")]
    assert str(secret) not in {r["origin"] for r in art.read_table().to_pylist()}


def test_jpegs_decode_at_a_reduced_scale_to_the_same_pixels(small_settings, tmp_path):
    """curate decodes a JPEG at the smallest DCT scale that keeps twice the output side: the decode shrinks,
    the curated pixels stay those of a full decode (within JPEG's own rounding)."""
    from onereward.data import procedural
    from onereward.data.images import center_square, decode_guarded

    rng = np.random.default_rng(0)
    photo = procedural._crop(rng, procedural._photo(procedural.photo_names()[0]), 512)[:, :384]
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="JPEG", quality=90)
    full = decode_guarded(buf.getvalue(), "p.jpg", min_side=16, max_pixels=10**8)
    reduced = decode_guarded(buf.getvalue(), "p.jpg", min_side=16, max_pixels=10**8, reduce_to=64)
    assert full.size == (384, 512) and reduced.size == (96, 128)  # 1/4: 1/8 would leave a 48 px short side
    diff = np.abs(np.asarray(center_square(full, 32), np.int16) - np.asarray(center_square(reduced, 32), np.int16))
    assert diff.mean() < 1.0 and diff.max() <= 8, (diff.mean(), diff.max())  # measured 0.47 and 3
    png = io.BytesIO()
    Image.fromarray(photo).save(png, format="PNG")  # other formats decode in full
    assert decode_guarded(png.getvalue(), "p.png", min_side=16, max_pixels=10**8, reduce_to=64).size == (384, 512)
    # curate takes the reduced decode (twice the 32-px output side)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "p.jpg").write_bytes(buf.getvalue())
    s = small_settings(f"curate.sources=[{{kind: folder, path: '{tmp_path / 'photos'}'}}]")
    execute_stage(GRAPH.get("curate"), s, {}, {"curated": str(tmp_path / "curated")})
    (row,) = storage.Artifact(str(tmp_path / "curated")).read_table().to_pylist()
    assert np.array_equal(from_png(row["image"]), np.asarray(center_square(reduced, 32)))


def test_unsupported_uri_scheme_and_nothing_kept_are_named(small_settings, tmp_path):
    man = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"uri": [str(tmp_path / "a.png"), "https://example.invalid/b.png"]}), man)
    s = small_settings(f"curate.sources=[{{kind: manifest, uri: '{man}'}}]")
    with pytest.raises(ValueError, match=r"unsupported scheme.*row 1: 'https://example.invalid/b.png'"):
        execute_stage(GRAPH.get("curate"), s, {}, {"curated": str(tmp_path / "c1")})
    (tmp_path / "bad.png").write_bytes(b"not an image")
    pq.write_table(pa.table({"uri": [str(tmp_path / "gone.png"), str(tmp_path / "bad.png")]}), man)
    with pytest.raises(ValueError, match=r"no image survived.*gone.png \(missing.*bad.png \(corrupt"):
        execute_stage(GRAPH.get("curate"), s, {}, {"curated": str(tmp_path / "c2")})
    assert not (tmp_path / "c2").exists()


def test_failing_validation_names_rows_and_writes_nothing(small_settings, tmp_path):
    s = small_settings("curate.sources=[{kind: procedural, count: 8}]")
    cur = str(tmp_path / "curated")
    execute_stage(GRAPH.get("curate"), s, {}, {"curated": cur})
    rows = storage.Artifact(cur).read_table().to_pylist()
    rows[3]["image"] = b"not a png"
    error = _masks_refuse_a_copy(s, rows, tmp_path)
    assert rows[3]["image_id"] in error and "decodable" in error


def _masks_refuse_a_copy(s, rows: list[dict], tmp_path) -> str:
    """synthesize_masks on a copy of curated `rows` altered by the caller (a wrong upstream, a bad import): the
    message it fails with; nothing of its output is left."""
    from onereward.data import schema

    bad = str(tmp_path / "curated_bad")
    with storage.writing(bad, key="bad") as w:
        w.write_table(schema.table(rows, schema.CURATED))
    out = tmp_path / "conditions"
    with pytest.raises(DataValidationError) as e:
        execute_stage(GRAPH.get("synthesize_masks"), s, {"curated": bad}, {"conditions": str(out)})
    assert not out.exists() and not list(tmp_path.glob(".staging-conditions-*"))
    return str(e.value)


def test_a_curated_background_of_another_size_fails_the_conditions_suite(small_settings, tmp_path):
    """synthesize_masks measures its own rows on the arrays it encodes rather than decoding them again; a removal
    target (the curated background) that is not at the image's size still fails the suite, by condition."""
    s = small_settings("curate.sources=[{kind: procedural, count: 8}]", "masks.task_mix={removal: 1.0}",
                       "masks.conditions_per_image=1")
    cur = str(tmp_path / "curated")
    execute_stage(GRAPH.get("curate"), s, {}, {"curated": cur})
    rows = storage.Artifact(cur).read_table().to_pylist()
    i = next(k for k, r in enumerate(rows) if r["object_mask"])
    rows[i]["background"] = _png((16, 16), seed=5)
    error = _masks_refuse_a_copy(s, rows, tmp_path)
    assert f"{rows[i]['image_id']}-0" in error and "decodable" in error
    # the untouched artifact passes
    out = str(tmp_path / "conditions")
    execute_stage(GRAPH.get("synthesize_masks"), s, {"curated": cur}, {"conditions": out})
    assert storage.Artifact(out).exists()


def test_empty_mask_fails_conditions_suite(small_settings):
    from onereward.stages.synthesize_masks import validate_conditions

    s = small_settings()
    blank = io.BytesIO()
    Image.new("L", (32, 32), 0).save(blank, format="PNG")
    rows = [{"condition_id": "c-empty", "image_id": "i", "task": "fill", "image": _png((32, 32)),
             "mask": blank.getvalue(), "prompt": "fill red", "target": None, "mask_coverage": 0.0,
             "split": "train", "params": "{}"}]
    with pytest.raises(DataValidationError, match="c-empty"):
        validate_conditions(rows, s.model_copy(update={"masks": s.masks.model_copy(
            update={"task_mix": {"fill": 1.0}})}))


KILL_POINTS = ("write.first_shard", "commit.upload", "commit.before_manifest", "commit.after_manifest")
CURATE_FLAGS = ["--set", "curate.sources=[{kind: procedural, count: 40}]", "--set", "curate.shard_rows=10"]


def _row_hashes(uri: str) -> list[str]:
    import hashlib

    rows = storage.Artifact(uri).read_table().sort_by("image_id").to_pylist()
    return [hashlib.sha1(json.dumps(r, sort_keys=True, default=repr).encode()).hexdigest() for r in rows]


def _curate_cmd(out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "onereward", "stage", "curate", "--out", f"curated={out}", *CURATE_FLAGS, *extra]


@pytest.fixture(params=["local", "s3"])
def kill_root(request, home, tmp_path):
    if request.param == "local":
        return str(tmp_path / "arts")
    return f"s3://{request.getfixturevalue('s3_bucket')}/arts"


def test_sigkill_inside_the_write_keeps_a_whole_artifact(kill_root, home, tmp_path):
    """SIGKILL at each named point of a forced rerun: the previous artifact (or the new one, once its
    manifest is in place) stays readable and whole, and the same command then completes with the unkilled
    run's rows. A kill of a first run leaves nothing under the output name until the manifest is in."""
    from onereward.config import load_config

    settings = load_config("tiny", CURATE_FLAGS[1::2])  # what the command's flags say

    def rerun(uri: str) -> None:  # the same stage and flags, in-process (no kill point set here)
        assert execute_stage(GRAPH.get("curate"), settings, {}, {"curated": uri}, force=True).status == "done"
        assert _row_hashes(uri) == want
        attempts = {f.split("/")[0] for f in storage.list_files(uri)} - {storage.MANIFEST}
        assert attempts == {storage.Artifact(uri).manifest["attempt"]}  # leftovers cleaned by the commit

    env = {**os.environ, "ONEREWARD_HOME": str(home)}
    out = f"{kill_root}/curated"
    execute_stage(GRAPH.get("curate"), settings, {}, {"curated": out})
    want = _row_hashes(out)
    assert len(want) == 40
    for point in KILL_POINTS:
        killed = subprocess.run(_curate_cmd(out, "--force"), env={**env, storage.FAULT_ENV: point},
                                capture_output=True, text=True, timeout=300)
        assert killed.returncode == -signal.SIGKILL and f"fault point {point}" in killed.stderr, killed.stderr
        assert _row_hashes(out) == want, point  # old or new version: whole and equal
        rerun(out)
    for point in ("write.first_shard", "commit.before_manifest"):
        fresh = f"{kill_root}/fresh-{point}"
        killed = subprocess.run(_curate_cmd(fresh), env={**env, storage.FAULT_ENV: point},
                                capture_output=True, text=True, timeout=300)
        assert killed.returncode == -signal.SIGKILL and not storage.Artifact(fresh).exists(), point
        rerun(fresh)
    if not storage.is_s3(out):
        assert not list((tmp_path / "arts").glob(".staging-*"))


def test_cli_run_prints_locations_and_reports_cached(home, capsys, tmp_path):
    from onereward.cli import main

    args = ["run", "--until", "synthesize_masks", "--set", "curate.sources=[{kind: procedural, count: 24}]",
            "--set", "masks.mix_tolerance=0.3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "ran 2 stage(s), cached 0" in first and "synthesize_masks.conditions:" in first
    assert f"sqlite:///{home}/mlflow.db" in first
    assert main(args) == 0
    assert "ran 0 stage(s), cached 2: curate, synthesize_masks" in capsys.readouterr().out
    assert main(["run", "--set", "pretrain.stepz=1"]) == 2  # config errors exit 2 with the key path
    assert "pretrain.stepz" in capsys.readouterr().err

    out_file = tmp_path / "xcom" / "return.json"
    assert main(["stage", "curate", "--out", "curated", str(tmp_path / "c"), "--outputs-file", str(out_file),
                 "--set", "curate.sources=[{kind: procedural, count: 24}]"]) == 0
    assert json.loads(out_file.read_text()) == {"curated": str(tmp_path / "c")}


def test_folder_photos_without_objects_get_the_other_tasks(small_settings, tmp_path):
    """No exact object masks in plain photos: removal rows are impossible, the mix check adapts."""
    d = tmp_path / "photos"
    d.mkdir()
    for i in range(12):
        (d / f"p{i}.png").write_bytes(_png((40 + i, 48), seed=100 + i))
    s = small_settings(f"curate.sources=[{{kind: folder, path: '{d}'}}]", "masks.mix_tolerance=0.2")
    cur, cond = str(tmp_path / "cur"), str(tmp_path / "cond")
    execute_stage(GRAPH.get("curate"), s, {}, {"curated": cur})
    execute_stage(GRAPH.get("synthesize_masks"), s, {"curated": cur}, {"conditions": cond})
    tasks = storage.Artifact(cond).read_table().column("task").to_pylist()
    assert "removal" not in tasks and set(tasks) <= {"fill", "extend", "text"} and len(tasks) > 12


def test_new_files_in_a_folder_source_are_not_served_from_cache(small_settings, tmp_path):
    d = tmp_path / "incoming"
    d.mkdir()
    for i in range(3):
        (d / f"a{i}.png").write_bytes(_png((48, 48), seed=200 + i))
    s = small_settings(f"curate.sources=[{{kind: folder, path: '{d}'}}]")
    first = run_pipeline(s, until="curate").outcomes[0]
    assert run_pipeline(s, until="curate").outcomes[0].status == "cached"
    (d / "a9.png").write_bytes(_png((48, 48), seed=299))
    again = run_pipeline(s, until="curate").outcomes[0]
    assert again.status == "done" and again.key != first.key
    assert storage.Artifact(again.outputs["curated"]).read_json("report.json")["kept"] == 4
