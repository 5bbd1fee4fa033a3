"""Stage logic. Each stage is `fn(ctx: StageContext) -> dict[str, float]` (metrics)."""

from __future__ import annotations

from dataclasses import dataclass

from onereward.config import Settings
from onereward.storage import Artifact, ArtifactWriter


class StageNotImplemented(NotImplementedError):
    pass


@dataclass
class StageContext:
    stage: str
    settings: Settings
    inputs: dict[str, Artifact]
    outputs: dict[str, ArtifactWriter]
    key: str

    @property
    def scratch_uri(self) -> str:
        """Where a stage keeps resumable state (checkpoints), keyed like its outputs."""
        first = next(iter(self.outputs.values()))
        return f"{first.uri}.scratch"
