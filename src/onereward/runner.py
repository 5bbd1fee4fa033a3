"""Executes stages: the one path shared by `onereward stage` (containers), the local runner and tests."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from onereward import storage, tracking
from onereward.config import Settings
from onereward.pipeline import GRAPH, Graph, Stage
from onereward.stages import GateFailed, StageContext, StageNotImplemented, StageSettings

console = Console(stderr=True)


class StageFailed(RuntimeError):
    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"stage {stage!r} failed: {type(cause).__name__}: {cause}")
        self.stage = stage
        self.cause = cause


@dataclass
class StageOutcome:
    stage: str
    status: str  # "done" | "cached"
    key: str
    outputs: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def stage_params(stage: Stage, settings: Settings) -> dict[str, Any]:
    dumped = settings.model_dump(mode="json")
    return {p: dumped[p] for p in stage.params}


def stage_key(stage: Stage, settings: Settings, input_keys: dict[str, str]) -> str:
    params = stage_params(stage, settings)
    external = stage.external_fingerprint(settings)
    if external is not None:
        params = {**params, "_external": external}
    return storage.artifact_key(stage.name, stage.version, params, input_keys)


def execute_stage(
    stage: Stage,
    settings: Settings,
    inputs: dict[str, str],
    outputs: dict[str, str],
    *,
    force: bool = False,
) -> StageOutcome:
    """Run one stage from input URIs to output URIs; a no-op ("cached") when outputs match the key."""
    missing = set(stage.inputs) - set(inputs)
    if missing:
        raise ValueError(f"stage {stage.name!r}: no URI given for input(s) {sorted(missing)}")
    unknown = set(outputs) ^ {o.name for o in stage.outputs}
    if unknown:
        raise ValueError(f"stage {stage.name!r}: outputs must be exactly {[o.name for o in stage.outputs]}")
    storage.configure(settings.storage)
    in_arts = {k: storage.Artifact(inputs[k]) for k in stage.inputs}
    for name, art in in_arts.items():
        if not art.exists():
            raise FileNotFoundError(f"stage {stage.name!r}: input {name!r} has no committed artifact at {art.uri}")
    key = stage_key(stage, settings, {k: a.key for k, a in in_arts.items()})
    out_arts = {k: storage.Artifact(u) for k, u in outputs.items()}
    if not force and all(a.exists() and a.key == key for a in out_arts.values()):
        return StageOutcome(stage.name, "cached", key, dict(outputs))

    for uri in outputs.values():
        storage.clean_stale_staging(uri)
    params = stage_params(stage, settings)
    meta = {"stage": stage.name, "version": stage.version, "inputs": inputs, "params": params}
    writers = {k: storage.ArtifactWriter(u, key, meta) for k, u in outputs.items()}
    ctx = StageContext(stage.name, StageSettings(settings, stage.name, stage.params), in_arts, writers, key)
    start = time.perf_counter()
    try:
        with tracking.stage_run(settings.tracking.experiment, stage.name, params, inputs, outputs):
            tracking.set_tags({"artifact_key": key})
            try:
                metrics = stage.load()(ctx) or {}
            except GateFailed as e:
                tracking.log_metrics(e.metrics)
                raise
            for w in writers.values():
                w.meta["run_id"] = tracking.active_run_id()
                w.commit()
            seconds = time.perf_counter() - start
            tracking.log_metrics({**metrics, "stage_seconds": seconds})
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return StageOutcome(stage.name, "done", key, dict(outputs), metrics, seconds)


@dataclass
class PlannedStage:
    stage: Stage
    key: str
    inputs: dict[str, str]
    outputs: dict[str, str]


def plan(settings: Settings, graph: Graph = GRAPH) -> list[PlannedStage]:
    """Output URIs for every stage: `{root}/{stage}/{key}/{artifact}`, keyed through the graph."""
    storage.configure(settings.storage)
    root = settings.resolved_artifact_root()
    uris: dict[str, str] = {}
    keys: dict[str, str] = {}
    planned = []
    for s in graph:
        key = stage_key(s, settings, {a: keys[a] for a in s.inputs})
        outs = {o.name: storage.join(root, s.name, key, o.name) for o in s.outputs}
        for o in s.outputs:
            keys[o.name] = key
        uris.update(outs)
        planned.append(PlannedStage(s, key, {a: uris[a] for a in s.inputs}, outs))
    return planned


@dataclass
class PipelineResult:
    outcomes: list[StageOutcome]
    stopped_at: str | None = None  # the first stage not implemented yet
    run_id: str | None = None


def run_pipeline(
    settings: Settings,
    *,
    until: str | None = None,
    force: tuple[str, ...] = (),
    graph: Graph = GRAPH,
) -> PipelineResult:
    """Walk the graph in order; skip cached stages; stop at the first failure (raised as StageFailed)."""
    if until is not None:
        graph.get(until)
    for f in force:
        graph.get(f)
    steps = plan(settings, graph)
    result = PipelineResult([])
    with tracking.pipeline_run(settings.tracking.experiment, f"pipeline-{settings.profile}",
                               {"profile": settings.profile}) as run:
        result.run_id = run.info.run_id
        for i, p in enumerate(steps, 1):
            console.rule(f"[bold]{i}/{len(steps)} {p.stage.name}")
            try:
                outcome = execute_stage(p.stage, settings, p.inputs, p.outputs, force=p.stage.name in force)
            except StageNotImplemented as e:
                console.print(f"[yellow]stopped at {p.stage.name}: {e}")
                result.stopped_at = p.stage.name
                break
            except Exception as e:
                console.print(f"[red]stage {p.stage.name} failed: {type(e).__name__}: {e}")
                raise StageFailed(p.stage.name, e) from e
            result.outcomes.append(outcome)
            label = "cached" if outcome.status == "cached" else f"done in {outcome.seconds:.1f}s"
            console.print(f"[green]{p.stage.name}: {label}[/] -> {', '.join(outcome.outputs.values())}")
            if p.stage.name == until:
                break
    return result
