"""Stage logic. Each stage is `fn(ctx: StageContext) -> dict[str, float]` (metrics)."""

from __future__ import annotations

import textwrap
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from onereward.config import Settings
from onereward.distributed import Workers
from onereward.storage import Artifact, ArtifactWriter


class StageNotImplemented(NotImplementedError):
    pass


class GateFailed(ValueError):
    """A stage's gate refused its result. The runner logs `metrics` to the stage's MLflow run before the stage
    fails, so the numbers behind the refusal are kept while nothing is written or registered."""

    def __init__(self, message: str, metrics: dict[str, float]):
        super().__init__(message)
        self.metrics = metrics


class UndeclaredConfigError(AttributeError):
    """A stage read a configuration section that is not part of its cache key."""


class StageSettings:
    """The configuration a stage is keyed on, and nothing else: reading a section the graph does not
    declare for the stage raises, so a cached output can never depend on configuration outside its key."""

    def __init__(self, settings: Settings, stage: str, sections: Iterable[str]):
        self._settings = settings
        self._stage = stage
        self._sections = frozenset(sections)

    def __getattr__(self, name: str) -> Any:
        if name in self._sections:
            return getattr(self._settings, name)
        if name in Settings.model_fields:
            raise UndeclaredConfigError(
                f"stage {self._stage!r} read config section {name!r}, which is not part of its key; "
                f"declare it in the stage's params in onereward/pipeline.py (declared: {sorted(self._sections)})")
        raise AttributeError(name)


@dataclass
class StageContext:
    stage: str
    settings: StageSettings | Settings
    inputs: dict[str, Artifact]
    # writers; on a data-parallel worker (not `workers.main`) the outputs' addresses only: it writes nothing
    outputs: dict[str, ArtifactWriter] | dict[str, Artifact]
    key: str
    scratch_used: bool = False
    workers: Workers = field(default_factory=Workers)

    @property
    def scratch_uri(self) -> str:
        """Where a stage keeps resumable state (checkpoints): beside its first output."""
        return f"{next(iter(self.outputs.values())).uri}.scratch"

    def scratch(self) -> str:
        """The scratch URI, for a stage that keeps state there: the runner deletes it once the outputs are
        committed (a stage that never asks costs no storage call)."""
        self.scratch_used = True
        return self.scratch_uri


def print_metrics(stage: str, metrics: dict[str, float], digits: int = 4) -> None:
    """A stage's metrics, as many to a line as fit in 120 columns, each line led by the stage's name. All of
    them are on the stage's MLflow run too."""
    pairs = " ".join(f"{k}={int(v) if float(v).is_integer() else f'{v:.{digits}g}'}" for k, v in metrics.items())
    for line in textwrap.wrap(pairs, 120 - len(stage) - 2, break_long_words=False, break_on_hyphens=False):
        print(f"{stage}: {line}", flush=True)
