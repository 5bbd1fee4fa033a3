"""One way to read and write artifacts at `s3://bucket/prefix` or a local path.

An artifact is a folder (prefix) holding `_MANIFEST.json` and one attempt folder `a-<id>/` with the
data files. The manifest names the attempt and exactly the files that belong to it (with their sizes);
readers read only those. A commit puts a new attempt's files in place, verifies them, then publishes
the manifest in one step (one PUT on S3, one rename locally) and only then deletes older attempts, so
a crash at any moment leaves the previous artifact or the new one, readable and whole.

Every S3 call is retried on transient errors (503 SlowDown, 5xx, connection resets, timeouts) with
exponential backoff and jitter; a missing object raises FileNotFoundError at once; credential and
permission errors, and errors that persist through the retry budget, raise StorageError naming the URI
and the cause. S3 endpoint and credentials come from the standard AWS environment
(AWS_ENDPOINT_URL[_S3], AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), never logged.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST = "_MANIFEST.json"
ATTEMPT_PREFIX = "a-"
FAULT_ENV = "ONEREWARD_FAULT_POINT"
T = TypeVar("T")

# Substrings of the AWS SDK's error text (as pyarrow reports it) that no retry can fix.
_PERMANENT = ("ACCESS_DENIED", "AccessDenied", "INVALID_ACCESS_KEY_ID", "InvalidAccessKeyId",
              "SIGNATURE_DOES_NOT_MATCH", "SignatureDoesNotMatch", "NO_SUCH_BUCKET", "NoSuchBucket",
              "INVALID_BUCKET_NAME", "HTTP status 403", "HTTP status 400", "MISSING_AUTHENTICATION_TOKEN",
              "EXPIRED_TOKEN", "ExpiredToken")


class StorageError(RuntimeError):
    """A storage call failed for good (credentials, permissions, or a fault that outlived the retries)."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    backoff_s: float = 0.2
    backoff_max_s: float = 5.0
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 60.0


_policy = RetryPolicy()


def configure(policy: RetryPolicy | Any) -> None:
    """Set the S3 retry budget and timeouts (from the `storage` config section)."""
    global _policy
    new = policy if isinstance(policy, RetryPolicy) else RetryPolicy(**policy.model_dump())
    if new != _policy:
        _policy = new
        _s3.cache_clear()


def fault_point(name: str) -> None:
    """Test hook: `ONEREWARD_FAULT_POINT=name` SIGKILLs this process when it reaches the named point."""
    if os.environ.get(FAULT_ENV) == name:
        print(f"fault point {name}: killing pid {os.getpid()}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


@functools.lru_cache(maxsize=4)
def _s3(endpoint: str | None, region: str) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {
        "region": region,
        # our retry loop below is the one policy; background writes would hide a failed upload
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=1),
        "background_writes": False,
        "connect_timeout": _policy.connect_timeout_s,
        "request_timeout": _policy.request_timeout_s,
    }
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    return pafs.S3FileSystem(**kwargs)


def s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    return _s3(endpoint, os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Filesystem and path for a URI: `s3://bucket/key` or a local path (absolute or relative)."""
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://") :].rstrip("/")
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme and scheme != "file":
        raise ValueError(f"{uri}: unsupported scheme {scheme!r} (use s3:// or a local path)")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def _permanent(err: OSError) -> bool:
    return isinstance(err, PermissionError) or any(m in str(err) for m in _PERMANENT)


def call(uri: str, what: str, fn: Callable[[], T]) -> T:
    """Run one storage operation on `uri`, retrying transient S3 faults with backoff and jitter."""
    attempts = _policy.attempts if is_s3(uri) else 1
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except OSError as e:
            if not is_s3(uri):
                raise
            if _permanent(e):
                raise StorageError(f"{what} {uri} failed (credentials or permissions; not retried): {e}") from e
            if attempt == attempts:
                raise StorageError(f"{what} {uri} failed after {attempts} attempts: {e}") from e
            delay = min(_policy.backoff_max_s, _policy.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1)
            print(f"storage: {what} {uri}: {str(e)[:160]}; retry {attempt}/{attempts - 1} in {delay:.2f}s",
                  file=sys.stderr, flush=True)
            time.sleep(delay)
    raise AssertionError("unreachable")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts if p]])


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return call(uri, "stat", lambda: fs.get_file_info(path)).type != pafs.FileType.NotFound


def file_size(uri: str) -> int:
    fs, path = resolve(uri)
    info = call(uri, "stat", lambda: fs.get_file_info(path))
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(uri)
    return int(info.size)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    return call(uri, "read", read)


def write_bytes(uri: str, data: bytes) -> None:
    """One object (one PUT on S3), verified by its size; local files are replaced atomically."""
    fs, path = resolve(uri)
    if not is_s3(uri):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        Path(tmp).parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return

    def put() -> None:
        with fs.open_output_stream(path) as f:
            f.write(data)
        size = fs.get_file_info(path).size
        if size != len(data):  # a lost part: treat like a transient fault, so it is retried
            raise OSError(f"object landed with {size} bytes, expected {len(data)}")

    call(uri, "write", put)


def upload_file(local: Path, uri: str) -> None:
    write_bytes(uri, local.read_bytes())


def list_sizes(uri: str) -> dict[str, int]:
    """{relative path: size} of all files under a folder/prefix."""
    fs, path = resolve(uri)
    infos = call(uri, "list", lambda: fs.get_file_info(pafs.FileSelector(path, recursive=True,
                                                                         allow_not_found=True)))
    return {i.path[len(path) + 1 :]: int(i.size) for i in infos if i.type == pafs.FileType.File}


def list_files(uri: str) -> list[str]:
    """Relative paths of all files under a folder/prefix, sorted."""
    return sorted(list_sizes(uri))


def _children(uri: str) -> list[str]:
    """Names of the entries directly under a folder/prefix."""
    fs, path = resolve(uri)
    infos = call(uri, "list", lambda: fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))
    return [i.base_name for i in infos]


def delete_tree(uri: str) -> None:
    fs, path = resolve(uri)
    info = call(uri, "stat", lambda: fs.get_file_info(path))
    if info.type == pafs.FileType.Directory or (is_s3(uri) and list_files(uri)):
        call(uri, "delete", lambda: fs.delete_dir(path))
    elif info.type == pafs.FileType.File:
        call(uri, "delete", lambda: fs.delete_file(path))


def read_parquet_uri(uri: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file's `columns` (None: all), retried as a whole on a transient fault. Only those columns' chunks
    are read (ranged GETs on S3): a stage choosing rows on light columns does not fetch a shard's PNGs."""
    fs, path = resolve(uri)
    return call(uri, "read", lambda: pq.read_table(path, filesystem=fs, columns=columns))


def artifact_key(stage: str, version: str, params: Any, input_keys: dict[str, str]) -> str:
    """Deterministic key of a stage output: its stage, code version, parameters and inputs' keys."""
    blob = json.dumps(
        {"stage": stage, "version": version, "params": params, "inputs": input_keys},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Artifact:
    """A committed artifact to read from. The manifest is read once: every later read of this object
    goes to the attempt that manifest names, so a reader sees one consistent version."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self._manifest: dict[str, Any] | None = None

    def exists(self) -> bool:
        return exists(join(self.uri, MANIFEST))

    @property
    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            try:
                self._manifest = json.loads(read_bytes(join(self.uri, MANIFEST)))
            except FileNotFoundError:
                raise FileNotFoundError(f"no committed artifact at {self.uri} (missing {MANIFEST})") from None
        return self._manifest

    @property
    def key(self) -> str:
        return str(self.manifest["key"])

    @property
    def root(self) -> str:
        """URI of the attempt folder holding this version's files."""
        return join(self.uri, self.manifest.get("attempt", ""))

    def files(self, prefix: str = "") -> list[str]:
        return [f for f in self.manifest["files"] if f.startswith(prefix)]

    def read_bytes(self, rel: str) -> bytes:
        if rel not in self.manifest["files"]:
            raise FileNotFoundError(f"artifact {self.uri}: its manifest names no file {rel!r}")
        uri = join(self.root, rel)
        try:
            return read_bytes(uri)
        except FileNotFoundError:
            raise FileNotFoundError(f"artifact {self.uri}: {uri} is named by the manifest but missing") from None

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def _shards(self, name: str) -> list[str]:
        shards = [f for f in self.files(f"{name}-") if f.endswith(".parquet")]
        if not shards:
            raise FileNotFoundError(f"artifact {self.uri} has no table {name!r}")
        return shards

    def iter_batches(self, name: str = "data", columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Table `name` a shard at a time, only `columns` read (read_parquet_uri)."""
        for s in self._shards(name):
            uri = join(self.root, s)
            try:
                table = read_parquet_uri(uri, columns)
            except FileNotFoundError:
                raise FileNotFoundError(f"artifact {self.uri}: {uri} is named by the manifest but missing") from None
            yield table

    def table_schema(self, name: str = "data") -> pa.Schema:
        """The schema of table `name` (its first shard's footer only)."""
        uri = join(self.root, self._shards(name)[0])
        fs, path = resolve(uri)
        return call(uri, "read", lambda: pq.read_schema(path, filesystem=fs))

    def read_table(self, name: str = "data", columns: list[str] | None = None) -> pa.Table:
        tables = list(self.iter_batches(name, columns))
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]

    def local_shards(self, name: str = "data") -> list[Path]:
        """The local files of table `name`, for readers that read parts of a shard (`local_dir`)."""
        shards = self._shards(name)
        root = self.local_dir()
        return [root / s for s in shards]

    def local_dir(self) -> Path:
        """A local folder with the artifact's files (S3 artifacts are downloaded once, by key and attempt)."""
        if not is_s3(self.uri):
            return Path(resolve(self.root)[1])
        from onereward.config import home_dir

        dest = home_dir() / "cache" / f"{self.key}-{self.manifest.get('attempt', '')}"

        def fill(tmp: Path) -> None:
            for rel in self.files():
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    download_file(join(self.root, rel), target)
                except FileNotFoundError:
                    raise FileNotFoundError(f"artifact {self.uri}: {join(self.root, rel)} is named by the manifest "
                                            "but missing") from None
            (tmp / MANIFEST).write_text(json.dumps(self.manifest))

        return download_once(dest, fill, self.uri)


def _ensure(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _new_attempt() -> str:
    # sortable by time; unique across concurrent writers
    return f"{ATTEMPT_PREFIX}{time.time_ns():x}-{uuid.uuid4().hex[:6]}"


class ArtifactWriter:
    """Stages an artifact locally; `commit()` publishes it with the manifest last; `abort()` drops it."""

    def __init__(self, uri: str, key: str, meta: dict[str, Any] | None = None):
        self.uri = uri.rstrip("/")
        resolve(self.uri)  # refuse an unsupported scheme before any work
        self.key = key
        self.meta = dict(meta or {})
        parent, prefix = _staging_place(self.uri)
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir=_ensure(parent)))
        self._counters: dict[str, int] = {}
        self.rows: dict[str, int] = {}

    def path(self, rel: str) -> Path:
        p = self.dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_table(self, table: pa.Table, name: str = "data", row_group_rows: int | None = None) -> None:
        """Append one Parquet shard of table `name` (`row_group_rows`: small row groups for tables read a few rows
        at a time)."""
        i = self._counters.get(name, 0)
        self._counters[name] = i + 1
        pq.write_table(table, self.path(f"{name}-{i:05d}.parquet"), compression="zstd", row_group_size=row_group_rows)
        self.rows[name] = self.rows.get(name, 0) + table.num_rows
        if i == 0:
            fault_point("write.first_shard")

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.path(rel).write_bytes(data)

    def write_json(self, rel: str, obj: Any) -> None:
        self.path(rel).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))

    def commit(self) -> Artifact:
        files = sorted(str(p.relative_to(self.dir)) for p in self.dir.rglob("*") if p.is_file())
        if MANIFEST in files:
            raise ValueError(f"{self.uri}: {MANIFEST} is reserved for the commit")
        attempt = _new_attempt()
        manifest = {
            **self.meta,
            "key": self.key,
            "uri": self.uri,
            "attempt": attempt,
            "files": files,
            "sizes": {f: (self.dir / f).stat().st_size for f in files},
            "rows": self.rows,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        attempt_uri = join(self.uri, attempt)
        if is_s3(self.uri):
            for i, rel in enumerate(files):
                upload_file(self.dir / rel, join(attempt_uri, rel))
                if i == 0:
                    fault_point("commit.upload")
            landed = list_sizes(attempt_uri)
            for rel in files:
                if landed.get(rel) != manifest["sizes"][rel]:
                    raise StorageError(f"commit of {self.uri}: {rel} did not land whole under {attempt_uri} "
                                       f"({landed.get(rel)} of {manifest['sizes'][rel]} bytes); nothing published")
        else:
            final = _ensure(Path(resolve(self.uri)[1]))
            os.replace(self.dir, final / attempt)
            fault_point("commit.upload")
        fault_point("commit.before_manifest")
        write_bytes(join(self.uri, MANIFEST), json.dumps(manifest, indent=2, default=str).encode())
        fault_point("commit.after_manifest")
        # Only now is the previous version unreachable: drop it and any killed attempt's leftovers.
        for name in _children(self.uri):
            if name not in (MANIFEST, attempt):
                delete_tree(join(self.uri, name))
        shutil.rmtree(self.dir, ignore_errors=True)
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


def _staging_place(uri: str) -> tuple[Path, str]:
    """(folder, name prefix) of an artifact's staging folders: beside a local artifact (the commit is a rename);
    under $ONEREWARD_HOME/staging for S3, named by the URI's digest so artifacts of the same name do not meet."""
    uri = uri.rstrip("/")
    name = uri.rsplit("/", 1)[-1]
    if is_s3(uri):
        from onereward.config import home_dir

        return home_dir() / "staging", f".staging-{name}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}-"
    return Path(resolve(uri)[1]).parent, f".staging-{name}-"


def clean_stale_staging(uri: str) -> None:
    """Remove the staging folders a killed writer of this artifact left behind (local or S3)."""
    parent, prefix = _staging_place(uri)
    if parent.exists():
        for p in parent.iterdir():
            # mkdtemp's suffix has no "-": ".staging-model-x-…" (artifact "model-x") is not "model"'s
            if p.name.startswith(prefix) and "-" not in p.name[len(prefix):]:
                shutil.rmtree(p, ignore_errors=True)


def external_folder(uri: str) -> Path:
    """An external checkpoint (a local folder or an s3:// prefix) as a local folder: an s3:// one is downloaded
    into ONEREWARD_HOME's cache, once for each listing of the prefix (every object's path, size and modification
    time), so a checkpoint uploaded again under the same URI is downloaded again; the copy it replaces is deleted."""
    if not is_s3(uri):
        return Path(uri)
    from onereward.config import home_dir

    listing = _listing(uri)
    if not listing:
        raise FileNotFoundError(f"external checkpoint {uri}: nothing under that prefix")
    cache, name = home_dir() / "cache", hashlib.sha1(uri.encode()).hexdigest()[:16]
    version = hashlib.sha1(json.dumps(sorted(listing.items())).encode()).hexdigest()[:12]
    dest = download_prefix(uri, cache / f"{name}-{version}", sorted(listing))
    for old in [cache / name, *cache.glob(f"{name}-*")]:  # the copies of earlier listings (and of the old layout)
        if old != dest:
            shutil.rmtree(old, ignore_errors=True)
    return dest


def _listing(uri: str) -> dict[str, tuple[int, int]]:
    """{relative path: (size, modification time in ns)} of the files under a folder/prefix."""
    fs, path = resolve(uri)
    infos = call(uri, "list", lambda: fs.get_file_info(pafs.FileSelector(path, recursive=True,
                                                                         allow_not_found=True)))
    return {i.path[len(path) + 1 :]: (int(i.size), int(i.mtime_ns or 0)) for i in infos
            if i.type == pafs.FileType.File}


def download_prefix(uri: str, dest: Path, files: list[str] | None = None) -> Path:
    """Every file under a folder/prefix that is not an artifact (e.g. an external checkpoint), or those of `files`,
    copied into dest once (`download_once`), each streamed: a FLUX shard is ~10 GB."""

    def fill(tmp: Path) -> None:
        for rel in list_files(uri) if files is None else files:
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            download_file(join(uri, rel), target)

    return download_once(dest, fill, uri)


def download_once(dest: Path, fill: Callable[[Path], None], source: str) -> Path:
    """`dest`, filled by `fill(folder)` unless a marker says a copy is whole there already. Under a lock beside it:
    the processes of a data-parallel stage on one node ask at once, and the others wait for the first one's copy
    rather than each replacing the folder under the feet of those already reading it."""
    marker = dest / ".complete"
    if marker.exists():
        return dest
    with open(_ensure(dest.parent) / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if marker.exists():
            return dest
        # a copy killed half-way (SIGKILL runs no cleanup) is left beside: on a node's disk a FLUX copy is ~24 GB;
        # this destination's only (mkdtemp's 8 random characters after the prefix), another's may be in progress
        prefix = f".download-{dest.name}-"
        for stale in dest.parent.glob(f"{prefix}*"):
            if len(stale.name) == len(prefix) + 8:
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
        try:
            fill(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        (tmp / ".complete").write_text(source)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    return dest


def download_file(uri: str, dest: Path) -> None:
    """One object streamed to a local file in 16 MiB pieces (retried whole on a transient fault)."""
    fs, path = resolve(uri)

    def copy() -> None:
        with fs.open_input_stream(path) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 16 << 20)

    call(uri, "read", copy)
