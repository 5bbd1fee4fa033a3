"""How a stage process stops when it is told to."""

from __future__ import annotations


def exit_on_sigterm(signum: int, frame: object) -> None:
    # Kubernetes and Airflow stop a task with SIGTERM, the local runner its side-by-side children: unwind
    # normally, so staged outputs are dropped and the MLflow runs end KILLED instead of staying RUNNING
    raise SystemExit(128 + signum)
