"""ONEREWARD_HOMEs for fixtures wider than a test: set one for a block, copy one trained once a session."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@contextmanager
def in_home(home: Path) -> Iterator[Path]:
    """ONEREWARD_HOME=home (and its own MLflow store) for the block; both as they were after it. For fixtures
    wider than a test, which conftest's autouse fixture does not cover."""
    before = {k: os.environ.pop(k, None) for k in ("ONEREWARD_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["ONEREWARD_HOME"] = str(home)
    try:
        yield home
    finally:
        for k, v in before.items():
            restore_env(k, v)


def copy_home(src: Path, dst: Path) -> Path:
    """A copy of an ONEREWARD_HOME: artifacts, and the MLflow store through sqlite's backup (whole whatever its
    write-ahead log holds). The copy's experiment logs new runs' artifacts under the copy; the runs and model
    versions already there keep pointing into `src`."""
    import sqlite3
    from contextlib import closing

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("mlflow.db*"))
    with closing(sqlite3.connect(src / "mlflow.db")) as a, closing(sqlite3.connect(dst / "mlflow.db")) as b:
        a.backup(b)
        with b:
            moved = b.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?) "
                              "WHERE artifact_location LIKE ?", (src.as_uri(), dst.as_uri(), f"{src.as_uri()}%"))
    assert moved.rowcount >= 1, f"no experiment of {src} logs under {src.as_uri()}"
    return dst
