import json

import pyarrow as pa
import pytest

from onereward import storage


def _roundtrip(uri: str):
    t = pa.table({"a": [1, 2, 3]})
    with storage.writing(uri, key="k1", meta={"stage": "x"}) as w:
        w.write_table(t)
        w.write_table(t)
        w.write_json("report.json", {"ok": True})
        assert not storage.Artifact(uri).exists()  # nothing visible before commit
    art = storage.Artifact(uri)
    assert art.exists() and art.key == "k1" and art.manifest["rows"] == {"data": 6}
    assert art.read_table().column("a").to_pylist() == [1, 2, 3, 1, 2, 3]
    assert art.read_json("report.json") == {"ok": True}
    local = art.local_dir()  # S3 artifacts are downloaded once into the cache
    assert json.loads((local / "report.json").read_text()) == {"ok": True} and (local / "_MANIFEST.json").exists()


def _aborted(uri: str):
    with pytest.raises(RuntimeError):
        with storage.writing(uri, key="k2") as w:
            w.write_table(pa.table({"a": [1]}))
            raise RuntimeError("boom")
    assert not storage.Artifact(uri).exists()
    assert storage.list_files(uri) == []


def test_local_atomic_artifacts(tmp_path, home):
    _roundtrip(str(tmp_path / "art"))
    _aborted(str(tmp_path / "bad"))
    assert not list(tmp_path.glob(".staging-*"))


def test_s3_atomic_artifacts(s3_bucket, home):
    _roundtrip(f"s3://{s3_bucket}/p/art")
    _aborted(f"s3://{s3_bucket}/p/bad")


def test_s3_partial_upload_is_invisible_and_replaced(s3_bucket, home):
    uri = f"s3://{s3_bucket}/p/partial"
    fs, path = storage.resolve(uri)
    with fs.open_output_stream(f"{path}/data-00000.parquet") as f:  # a killed upload's leftover
        f.write(b"garbage")
    assert not storage.Artifact(uri).exists()
    with storage.writing(uri, key="k3") as w:
        w.write_table(pa.table({"a": [9]}))
    assert storage.Artifact(uri).read_table().column("a").to_pylist() == [9]


def test_artifact_key_depends_on_params_and_inputs():
    k = storage.artifact_key("s", "1", {"p": 1}, {"in": "abc"})
    assert k == storage.artifact_key("s", "1", {"p": 1}, {"in": "abc"})
    assert k != storage.artifact_key("s", "1", {"p": 2}, {"in": "abc"})
    assert k != storage.artifact_key("s", "1", {"p": 1}, {"in": "abd"})
    assert k != storage.artifact_key("s", "2", {"p": 1}, {"in": "abc"})
