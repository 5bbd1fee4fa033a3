"""MLflow tracking: one run per stage, nested under a pipeline run, with lineage tags.

Default store: `sqlite:///$ONEREWARD_HOME/mlflow.db` with artifacts under `$ONEREWARD_HOME/mlruns`;
`MLFLOW_TRACKING_URI` points at a server instead. mlflow is imported inside functions so that
importing onereward (e.g. when Airflow parses a DAG) stays cheap.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from onereward.config import home_dir


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = home_dir()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def git_commit() -> str:
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


def setup(experiment: str) -> str:
    """Point mlflow at the store and make sure the experiment exists; returns the experiment id."""
    import mlflow

    uri = tracking_uri()
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


@contextmanager
def pipeline_run(experiment: str, name: str, tags: dict[str, str] | None = None) -> Iterator[Any]:
    import mlflow

    exp_id = setup(experiment)
    all_tags = {"git_commit": git_commit(), **(tags or {})}
    with mlflow.start_run(experiment_id=exp_id, run_name=name, tags=all_tags) as run:
        yield run


@contextmanager
def stage_run(
    experiment: str,
    stage: str,
    params: dict[str, Any],
    inputs: dict[str, str],
    outputs: dict[str, str],
) -> Iterator[Any]:
    """A run for one stage: nested when a pipeline run is active, top-level otherwise."""
    import mlflow

    exp_id = setup(experiment)
    parent = mlflow.active_run()
    tags = {
        "stage": stage,
        "git_commit": git_commit(),
        **{f"input.{k}": v for k, v in inputs.items()},
        **{f"output.{k}": v for k, v in outputs.items()},
    }
    with mlflow.start_run(experiment_id=exp_id, run_name=stage, nested=parent is not None, tags=tags) as run:
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


def log_image(image: Any, name: str) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_image(image, name)


def set_tags(tags: dict[str, str]) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.set_tags(tags)


def active_run_id() -> str | None:
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run else None
