"""Executes stages: the one path shared by `onereward stage` (containers), the local runner and tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from onereward import config, storage, tracking
from onereward.config import Settings
from onereward.pipeline import GRAPH, Graph, Stage
from onereward.stages import GateFailed, StageContext, StageNotImplemented, StageSettings

console = Console(stderr=True)


EXIT_NOT_IMPLEMENTED = 3  # `onereward stage`'s exit code for a stage not built yet


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


def groups(steps: list[PlannedStage]) -> list[list[PlannedStage]]:
    """The stages in graph order, cut where a stage reads an output of its own group: the stages of one group
    need only what earlier groups made, so they can run at once (the two judges)."""
    out: list[list[PlannedStage]] = []
    made: set[str] = set()
    for p in steps:
        if not out or made & set(p.stage.inputs):
            out.append([])
            made = set()
        out[-1].append(p)
        made |= set(p.outputs)
    return out


def is_cached(p: PlannedStage) -> bool:
    return all(a.exists() and a.key == p.key for a in map(storage.Artifact, p.outputs.values()))


def default_jobs() -> int:
    return max(1, os.cpu_count() or 1)


def run_pipeline(
    settings: Settings,
    *,
    until: str | None = None,
    force: tuple[str, ...] = (),
    graph: Graph = GRAPH,
    jobs: int | None = None,
) -> PipelineResult:
    """Walk the graph in order; skip cached stages; stop at the first failure (raised as StageFailed).
    With `jobs` > 1, stages that do not need each other (the two judges) run at once, the later ones in
    `onereward stage` processes, the CPU's threads shared between them."""
    if until is not None:
        graph.get(until)
    for f in force:
        graph.get(f)
    jobs = default_jobs() if jobs is None else jobs
    steps = plan(settings, graph)
    if until is not None:
        steps = steps[: [p.stage.name for p in steps].index(until) + 1]
    result = PipelineResult([])
    done = 0
    with tracking.pipeline_run(settings.tracking.experiment, f"pipeline-{settings.profile}",
                               {"profile": settings.profile}) as run:
        result.run_id = run.info.run_id
        for group in groups(steps):
            due = [p for p in group if p.stage.name in force or not is_cached(p)]
            # the first stage due runs here, up to jobs - 1 others beside it (a process finds stages in GRAPH)
            aside = due[1:jobs] if graph is GRAPH else []
            here = [p for p in group if p not in aside]
            with _stages_aside(aside, settings, force, result.run_id) as collect:
                for p in here:
                    done += 1
                    console.rule(f"[bold]{done}/{len(steps)} {p.stage.name}")
                    if not _run_here(p, settings, force, result):
                        break
                done += len(aside)
                collect(result)
            order = [p.stage.name for p in steps]
            result.outcomes.sort(key=lambda o: order.index(o.stage))
            if result.stopped_at:
                break
    return result


def _run_here(p: PlannedStage, settings: Settings, force: tuple[str, ...], result: PipelineResult) -> bool:
    try:
        outcome = execute_stage(p.stage, settings, p.inputs, p.outputs, force=p.stage.name in force)
    except StageNotImplemented as e:
        console.print(f"[yellow]stopped at {p.stage.name}: {e}")
        result.stopped_at = p.stage.name
        return False
    except Exception as e:
        console.print(f"[red]stage {p.stage.name} failed: {type(e).__name__}: {e}")
        raise StageFailed(p.stage.name, e) from e
    result.outcomes.append(outcome)
    label = "cached" if outcome.status == "cached" else f"done in {outcome.seconds:.1f}s"
    console.print(f"[green]{p.stage.name}: {label}[/] -> {', '.join(outcome.outputs.values())}")
    return True


class StageProcessFailed(RuntimeError):
    """A stage run in its own `onereward stage` process exited non-zero; the message ends its log."""


@contextmanager
def _stages_aside(aside: list[PlannedStage], settings: Settings, force: tuple[str, ...],
                  run_id: str | None) -> Iterator[Callable[[PipelineResult], None]]:
    """Start `aside` as `onereward stage` processes; the body runs the rest of the group here. The threads
    are split between the processes and this one; on any error the processes are stopped (SIGTERM: they
    drop their staged outputs and end their MLflow runs KILLED)."""
    if not aside:
        yield lambda result: None
        return
    import torch

    threads = max(1, default_jobs() // (len(aside) + 1))
    before = torch.get_num_threads()
    logs = config.home_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="onereward-group-") as tmp:
        settings_file = Path(tmp) / "settings.yaml"
        settings_file.write_text(settings.model_dump_json())  # JSON is YAML
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               tracking.PARENT_RUN_ENV: run_id or ""}
        procs = []
        try:
            for p in aside:
                metrics_file = Path(tmp) / f"{p.stage.name}.metrics.json"
                cmd = [sys.executable, "-m", "onereward", "stage", p.stage.name, "--config", str(settings_file),
                       "--metrics-file", str(metrics_file),
                       *(a for k, u in p.inputs.items() for a in ("--in", f"{k}={u}")),
                       *(a for k, u in p.outputs.items() for a in ("--out", f"{k}={u}")),
                       *(["--force"] if p.stage.name in force else [])]
                log = logs / f"{p.stage.name}.log"
                with open(log, "wb") as f:
                    procs.append((p, log, metrics_file, time.perf_counter(),
                                  subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)))
                console.print(f"{p.stage.name}: started in a separate process, {threads} thread(s); log {log}")
            torch.set_num_threads(threads)

            def collect(result: PipelineResult) -> None:
                for p, log, metrics_file, start, proc in procs:
                    code = proc.wait()
                    if code == EXIT_NOT_IMPLEMENTED:
                        console.print(f"[yellow]stopped at {p.stage.name}: not implemented (log {log})")
                        result.stopped_at = result.stopped_at or p.stage.name
                        continue
                    if code != 0:
                        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
                        cause = StageProcessFailed(f"exit code {code}; the end of {log}:\n" + "\n".join(tail))
                        console.print(f"[red]stage {p.stage.name} failed: {cause}")
                        raise StageFailed(p.stage.name, cause)
                    if not is_cached(p):
                        raise StageFailed(p.stage.name, StageProcessFailed(
                            f"its outputs do not carry the planned key {p.key} (log {log})"))
                    outcome = StageOutcome(p.stage.name, "done", p.key, dict(p.outputs),
                                           json.loads(metrics_file.read_text()), time.perf_counter() - start)
                    result.outcomes.append(outcome)
                    console.print(f"[green]{p.stage.name}: done in {outcome.seconds:.1f}s (separate process)[/] -> "
                                  f"{', '.join(p.outputs.values())}")

            yield collect
        finally:
            torch.set_num_threads(before)
            for *_, proc in procs:
                if proc.poll() is None:
                    proc.terminate()
            for *_, proc in procs:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
