"""MLflow tracking: one run per stage, nested under a pipeline run, with lineage tags.

Default store: `sqlite:///$ONEREWARD_HOME/mlflow.db` with artifacts under `$ONEREWARD_HOME/mlruns`;
`MLFLOW_TRACKING_URI` points at a server instead. mlflow is imported inside functions so that
importing onereward (e.g. when Airflow parses a DAG) stays cheap.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from onereward import machine
from onereward.config import home_dir


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = home_dir()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


GIT_COMMIT_ENV = "ONEREWARD_GIT_COMMIT"
# the local runner's pipeline run, for stages it runs side by side in child processes (no active run there)
PARENT_RUN_ENV = "ONEREWARD_PARENT_RUN_ID"


def git_commit() -> str:
    """The source commit: the image's build argument (an image holds no .git), else the checkout's HEAD."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _write_ahead_log(path: str) -> None:
    """Switch the sqlite store to write-ahead logging (kept in the file, so once is enough): each MLflow call
    commits, and a rollback-journal commit costs two fsyncs where WAL's costs one (log_metrics 17.6 -> ~10 ms;
    a stage makes dozens). Readers and the one writer of this machine's stages no longer block each other."""
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(path, timeout=30)) as db:
        if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            db.execute("PRAGMA journal_mode=WAL")


def setup(experiment: str) -> str:
    """Point mlflow at the store and make sure the experiment exists; returns the experiment id."""
    import mlflow

    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        _write_ahead_log(uri.removeprefix("sqlite:///"))
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        kwargs: dict[str, Any] = {}
        if uri.startswith("sqlite:"):
            kwargs["artifact_location"] = (home_dir() / "mlruns").as_uri()
        return mlflow.create_experiment(experiment, **kwargs)
    return exp.experiment_id


def _flat(prefix: str, obj: Any, out: dict[str, str]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(obj, default=str) if isinstance(obj, list | tuple) else str(obj)


def flatten_params(params: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    _flat("", params, out)
    return {k: v[:500] for k, v in out.items()}


HOST = socket.gethostname()
KIND_TAG = "onereward.kind"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def mark_killed_runs(experiment_id: str, *, outputs: dict[str, str] | None = None) -> list[str]:
    """Runs left RUNNING by a killed process are marked KILLED: pipeline runs whose process on this host is
    gone, and stage runs writing the same outputs as a new attempt (their process is gone, or it ran on
    another host: a retried pod). Returns the run ids it marked."""
    from mlflow import MlflowClient

    client = MlflowClient()
    flt = "attributes.status = 'RUNNING'"
    if outputs:
        name, uri = sorted(outputs.items())[0]
        flt += f" and tags.`output.{name}` = {_quote(uri)}"
    else:
        flt += f" and tags.`{KIND_TAG}` = 'pipeline'"
    marked = []
    for run in client.search_runs([experiment_id], flt, max_results=200):
        tags = run.data.tags
        pid = int(tags.get("pid", "-1"))
        if tags.get("host") == HOST:
            if pid == os.getpid() or _alive(pid):
                continue
        elif not outputs:
            continue
        client.set_tag(run.info.run_id, "killed_reason",
                       f"process {tags.get('host')}:{pid} ended without closing the run")
        client.set_terminated(run.info.run_id, "KILLED")
        marked.append(run.info.run_id)
    if marked:
        print(f"tracking: marked {len(marked)} stale run(s) KILLED: {', '.join(marked)}", flush=True)
    return marked


@contextmanager
def _run(**kwargs: Any) -> Iterator[Any]:
    """mlflow.start_run that records how it ended: FINISHED, FAILED, or KILLED on an interrupt/SIGTERM."""
    import mlflow

    run = mlflow.start_run(**kwargs)
    try:
        yield run
    except (KeyboardInterrupt, SystemExit):
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


@contextmanager
def pipeline_run(experiment: str, name: str, tags: dict[str, str] | None = None) -> Iterator[Any]:
    exp_id = setup(experiment)
    mark_killed_runs(exp_id)
    all_tags = {"git_commit": git_commit(), KIND_TAG: "pipeline", "host": HOST, "pid": str(os.getpid()),
                **machine.facts(), **(tags or {})}
    with _run(experiment_id=exp_id, run_name=name, tags=all_tags) as run:
        yield run


@contextmanager
def stage_run(
    experiment: str,
    stage: str,
    params: dict[str, Any],
    inputs: dict[str, str],
    outputs: dict[str, str],
) -> Iterator[Any]:
    """A run for one stage: nested when a pipeline run is active (in this process, or the local runner's, named
    by ONEREWARD_PARENT_RUN_ID in a stage it runs side by side), top-level otherwise."""
    import mlflow

    exp_id = setup(experiment)
    mark_killed_runs(exp_id, outputs=outputs)
    parent = mlflow.active_run()
    parent_id = None if parent else os.environ.get(PARENT_RUN_ENV) or None
    tags = {
        "stage": stage,
        KIND_TAG: "stage",
        "git_commit": git_commit(),
        "host": HOST,
        "pid": str(os.getpid()),
        **machine.facts(),  # stage times mean little without the CPU they ran on
        **{f"input.{k}": v for k, v in inputs.items()},
        **{f"output.{k}": v for k, v in outputs.items()},
    }
    with _run(experiment_id=exp_id, run_name=stage, nested=parent is not None, parent_run_id=parent_id,
              tags=tags) as run:
        mlflow.log_params(flatten_params(params))
        yield run


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import mlflow

    if mlflow.active_run() is not None and metrics:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_dict(obj: Any, name: str) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_dict(obj, name)


def log_text(text: str, name: str) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_text(text, name)


def log_image(image: Any, name: str) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_image(image, name)


def log_figure(figure: Any, name: str) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_figure(figure, name)


def set_tags(tags: dict[str, str]) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.set_tags(tags)


def active_run_id() -> str | None:
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run else None
