"""One way to read and write artifacts at `s3://bucket/prefix` or a local path.

An artifact is a folder (prefix) of files with `_MANIFEST.json` committed last. It exists only once
its manifest does, so readers never see a half-written artifact. Writers stage everything in a local
temporary folder: a local artifact is then moved into place with one rename; an S3 artifact is
uploaded file by file with the manifest last, after any stale objects under the prefix are removed.

S3 endpoint and credentials come from the standard AWS environment (AWS_ENDPOINT_URL[_S3],
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION) and are never logged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST = "_MANIFEST.json"


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Filesystem and path for a URI: `s3://bucket/key` or a local path (absolute or relative)."""
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://") :].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def file_size(uri: str) -> int:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(uri)
    return int(info.size)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def list_files(uri: str) -> list[str]:
    """Relative paths of all files under a folder/prefix, sorted."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path[len(path) + 1 :] for i in infos if i.type == pafs.FileType.File)


def delete_tree(uri: str) -> None:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory or (is_s3(uri) and list_files(uri)):
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def read_parquet_uri(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = resolve(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def artifact_key(stage: str, version: str, params: Any, input_keys: dict[str, str]) -> str:
    """Deterministic key of a stage output: its stage, code version, parameters and inputs' keys."""
    blob = json.dumps(
        {"stage": stage, "version": version, "params": params, "inputs": input_keys},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Artifact:
    """A committed artifact (folder with a manifest) to read from."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")

    def exists(self) -> bool:
        return exists(join(self.uri, MANIFEST))

    @property
    def manifest(self) -> dict[str, Any]:
        if not self.exists():
            raise FileNotFoundError(f"no committed artifact at {self.uri} (missing {MANIFEST})")
        return json.loads(read_bytes(join(self.uri, MANIFEST)))

    @property
    def key(self) -> str:
        return str(self.manifest["key"])

    def files(self, prefix: str = "") -> list[str]:
        return [f for f in list_files(self.uri) if f.startswith(prefix) and f != MANIFEST]

    def read_table(self, name: str = "data", columns: list[str] | None = None) -> pa.Table:
        shards = [f for f in self.files(f"{name}-") if f.endswith(".parquet")]
        if not shards:
            raise FileNotFoundError(f"artifact {self.uri} has no table {name!r}")
        fs, path = resolve(self.uri)
        tables = [pq.read_table(f"{path}/{s}", filesystem=fs, columns=columns) for s in shards]
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]

    def iter_batches(self, name: str = "data", columns: list[str] | None = None) -> Iterator[pa.Table]:
        fs, path = resolve(self.uri)
        for s in self.files(f"{name}-"):
            if s.endswith(".parquet"):
                yield pq.read_table(f"{path}/{s}", filesystem=fs, columns=columns)

    def read_bytes(self, rel: str) -> bytes:
        return read_bytes(join(self.uri, rel))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def local_dir(self) -> Path:
        """A local folder with the artifact's files (S3 artifacts are downloaded once, by key)."""
        if not is_s3(self.uri):
            return Path(resolve(self.uri)[1])
        from onereward.config import home_dir

        return download_prefix(self.uri, home_dir() / "cache" / self.key)


def _ensure(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


class ArtifactWriter:
    """Stages an artifact locally; `commit()` publishes it with the manifest last; `abort()` drops it."""

    def __init__(self, uri: str, key: str, meta: dict[str, Any] | None = None):
        self.uri = uri.rstrip("/")
        self.key = key
        self.meta = dict(meta or {})
        if is_s3(self.uri):
            from onereward.config import home_dir

            parent = _ensure(home_dir() / "staging")
        else:
            parent = _ensure(Path(resolve(self.uri)[1]).parent)
        self.dir = Path(tempfile.mkdtemp(prefix=f".staging-{Path(self.uri).name}-", dir=parent))
        self._counters: dict[str, int] = {}
        self.rows: dict[str, int] = {}

    def path(self, rel: str) -> Path:
        p = self.dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_table(self, table: pa.Table, name: str = "data") -> None:
        """Append one Parquet shard of table `name`."""
        i = self._counters.get(name, 0)
        self._counters[name] = i + 1
        pq.write_table(table, self.path(f"{name}-{i:05d}.parquet"), compression="zstd")
        self.rows[name] = self.rows.get(name, 0) + table.num_rows

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.path(rel).write_bytes(data)

    def write_json(self, rel: str, obj: Any) -> None:
        self.path(rel).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))

    def commit(self) -> Artifact:
        files = sorted(str(p.relative_to(self.dir)) for p in self.dir.rglob("*") if p.is_file())
        manifest = {
            **self.meta,
            "key": self.key,
            "uri": self.uri,
            "files": files,
            "rows": self.rows,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if is_s3(self.uri):
            delete_tree(self.uri)  # drop objects of a killed earlier attempt
            fs, path = resolve(self.uri)
            for rel in files:
                pafs.copy_files(str(self.dir / rel), f"{path}/{rel}", destination_filesystem=fs)
            with fs.open_output_stream(f"{path}/{MANIFEST}") as f:
                f.write(json.dumps(manifest, indent=2, default=str).encode())
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            (self.dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
            final = Path(resolve(self.uri)[1])
            if final.exists():  # a forced rerun or a stale folder: move aside, then swap in
                trash = final.with_name(f".trash-{final.name}-{uuid.uuid4().hex[:8]}")
                os.replace(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(self.dir, final)
        return Artifact(self.uri)

    def abort(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def writing(uri: str, key: str, meta: dict[str, Any] | None = None) -> Iterator[ArtifactWriter]:
    w = ArtifactWriter(uri, key, meta)
    try:
        yield w
    except BaseException:
        w.abort()
        raise
    w.commit()


def clean_stale_staging(uri: str) -> None:
    """Remove staging folders that a killed writer left next to a local artifact."""
    if is_s3(uri):
        return
    final = Path(resolve(uri)[1])
    if final.parent.exists():
        for p in final.parent.glob(f".staging-{final.name}-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in final.parent.glob(f".trash-{final.name}-*"):
            shutil.rmtree(p, ignore_errors=True)


def download_prefix(uri: str, dest: Path) -> Path:
    """Copy every file under a local folder or S3 prefix into dest (once; a marker says it is whole)."""
    marker = dest / ".complete"
    if marker.exists():
        return dest
    fs, path = resolve(uri)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=_ensure(dest.parent)))
    for rel in list_files(uri):
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(f"{path}/{rel}", str(target), source_filesystem=fs)
    (tmp / ".complete").write_text(uri)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest
