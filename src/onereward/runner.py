"""Executes stages: the one path shared by `onereward stage` (containers), the local runner and tests."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape

from onereward import distributed, storage, tracking
from onereward.config import Settings, key_fields
from onereward.pipeline import GRAPH, PENDING, Graph, Stage
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
    keyed = key_fields(settings)
    params = {p: keyed[p] for p in stage.params}
    external = stage.external_fingerprint(settings)
    if external is not None:
        params = {**params, "_external": external}
    return storage.artifact_key(stage.name, stage.version, params, input_keys)


def outputs_current(outputs: Iterable[storage.Artifact], key: str) -> bool:
    """Every output committed under this key: the stage has nothing to do."""
    return all(a.exists() and a.key == key for a in outputs)


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
    if not force and outputs_current(out_arts.values(), key):
        return StageOutcome(stage.name, "cached", key, dict(outputs))
    workers = distributed.workers()
    if not workers.main:
        return _beside_the_main_process(stage, settings, in_arts, out_arts, key, workers)

    for uri in outputs.values():
        storage.clean_stale_staging(uri)
    params = stage_params(stage, settings)
    meta = {"stage": stage.name, "version": stage.version, "inputs": inputs, "params": params}
    writers = {k: storage.ArtifactWriter(u, key, meta) for k, u in outputs.items()}
    ctx = StageContext(stage.name, StageSettings(settings, stage.name, stage.params), in_arts, writers, key,
                       workers=workers)
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
            if ctx.scratch_used:  # a checkpoint resumes only the run that left it, and that run is committed
                storage.delete_tree(ctx.scratch_uri)
            seconds = time.perf_counter() - start
            tracking.log_metrics({**metrics, "stage_seconds": seconds})
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return StageOutcome(stage.name, "done", key, dict(outputs), metrics, seconds)


def _beside_the_main_process(stage: Stage, settings: Settings, inputs: dict[str, storage.Artifact],
                             outputs: dict[str, storage.Artifact], key: str, workers: distributed.Workers
                             ) -> StageOutcome:
    """A data-parallel worker's share of a stage run: it trains beside the main process, which alone tracks,
    writes and commits; its context holds the outputs' addresses, not writers."""
    if not stage.data_parallel:
        raise ValueError(f"stage {stage.name!r} runs in one process; this is process {workers.rank} of "
                         f"{workers.world} (launch it without accelerate)")
    ctx = StageContext(stage.name, StageSettings(settings, stage.name, stage.params), inputs, outputs, key,
                       workers=workers)
    metrics = stage.load()(ctx) or {}
    return StageOutcome(stage.name, "worker", key, {k: a.uri for k, a in outputs.items()}, metrics)


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


def side_by_side(steps: list[PlannedStage], jobs: int, processes: dict[str, int] | None = None
                 ) -> list[list[PlannedStage]]:
    """The plan cut into groups of consecutive stages, at most `jobs` a group, none reading what another of its
    group writes: what KFP and Airflow run as parallel tasks (the two judges) the local runner can too. A stage
    run as several `processes` (stage name -> count) is a group of its own."""
    many = {name for name, n in (processes or {}).items() if n > 1}
    groups: list[list[PlannedStage]] = []
    for p in steps:
        group = groups[-1] if groups else []
        written = {o.name for q in group for o in q.stage.outputs}
        alone = p.stage.name in many or any(q.stage.name in many for q in group)
        if group and len(group) < jobs and not written & set(p.stage.inputs) and not alone:
            group.append(p)
        else:
            groups.append([p])
    return groups


def is_cached(p: PlannedStage, force: tuple[str, ...]) -> bool:
    """execute_stage's own test, asked before a child process is started for nothing."""
    return p.stage.name not in force and outputs_current((storage.Artifact(u) for u in p.outputs.values()), p.key)


class ChildStageError(RuntimeError):
    """A stage run in a child process failed; the message is its exception's last line."""


def _stage_spec(stage: Stage) -> dict[str, Any]:
    return {"name": stage.name, "func": stage.func, "inputs": list(stage.inputs),
            "outputs": [[o.name, o.kind] for o in stage.outputs], "params": list(stage.params),
            "version": stage.version, "fingerprint": stage.fingerprint, "data_parallel": stage.data_parallel}


def _stage_of(spec: dict[str, Any]) -> Stage:
    from onereward.pipeline import Output

    return Stage(name=spec["name"], func=spec["func"], inputs=tuple(spec["inputs"]),
                 outputs=tuple(Output(n, k) for n, k in spec["outputs"]), params=tuple(spec["params"]),
                 version=spec["version"], fingerprint=spec["fingerprint"], data_parallel=spec["data_parallel"])


def run_child(spec_path: str) -> int:
    """A child process's side of run_side_by_side: one stage through execute_stage, its outcome (or its error's
    last line) written as JSON beside the spec. The traceback still goes to stderr, which the parent shows."""
    import json
    import signal
    from pathlib import Path

    from onereward.config import settings_from_json
    from onereward.signals import exit_on_sigterm

    signal.signal(signal.SIGTERM, exit_on_sigterm)  # stopped by the runner: end the run KILLED, drop the staging
    spec = json.loads(Path(spec_path).read_text())
    result = Path(spec_path).with_suffix(".result.json")
    try:
        o = execute_stage(_stage_of(spec["stage"]), settings_from_json(spec["settings"]), spec["inputs"],
                          spec["outputs"], force=spec["force"])
    except BaseException as e:
        result.write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        raise
    result.write_text(json.dumps({"status": o.status, "key": o.key, "metrics": o.metrics, "seconds": o.seconds}))
    return 0


def free_port() -> int:
    """A TCP port free on the loopback now: a data-parallel rendezvous's."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launches(group: list[PlannedStage], processes: dict[str, int]) -> list[tuple[PlannedStage, str, dict[str, str]]]:
    """Each child process of `group`: its stage, its name in the lines shown, and what its environment adds (a
    data-parallel stage's processes: what `torchrun --standalone` would give them, gloo on the CPU)."""
    out = []
    for p in group:
        n = processes.get(p.stage.name, 1)
        if n == 1:
            out.append((p, p.stage.name, {}))
            continue
        rendezvous = {"WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1",
                      "MASTER_PORT": str(free_port())}
        out += [(p, p.stage.name if r == 0 else f"{p.stage.name}[{r}]",
                 {**rendezvous, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(n)]
    return out


def run_side_by_side(group: list[PlannedStage], settings: Settings, force: tuple[str, ...],
                     parent_run_id: str, processes: dict[str, int] | None = None) -> list[StageOutcome]:
    """Each stage of `group` in its own process, or in `processes[stage]` data-parallel ones, the cores shared out
    between all of them (torch's threads scale badly past what a small model can use: a judge step on 2 cores is
    0.19 s with 2 threads, 0.35 s with 1, and two such steps side by side take 0.35 s). Lines are shown prefixed
    with the stage's name. All run to the end; then the first failure, in graph order, is raised."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    import threading
    from pathlib import Path

    from onereward import machine

    launches = _launches(group, processes or {})
    threads = str(max(1, machine.cores() // len(launches)))
    env = {**os.environ, tracking.PARENT_RUN_ENV: parent_run_id, "OMP_NUM_THREADS": threads,
           "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # a test's own stage modules import there too
    width = max(len(shown) for _, shown, _ in launches)

    def relay(name: str, shown: str, stream: Any) -> None:
        for line in stream:  # a stage's own lines start with its name already: shown once
            text = line.rstrip().removeprefix(f"{name}: ").removeprefix(f"{name} ")
            console.out(f"{shown:<{width}} | {text}", highlight=False)

    with tempfile.TemporaryDirectory(prefix="onereward-side-by-side-") as tmp:
        procs, relays, specs = [], [], []
        data_parallel = {p.stage.name for p, _, rank_env in launches if rank_env}
        stopped: dict[Any, str] = {}  # a data-parallel process the runner stopped -> the one that failed
        try:
            for i, (p, shown, rank_env) in enumerate(launches):
                spec = Path(tmp) / f"{i}-{p.stage.name}.json"
                spec.write_text(json.dumps({"stage": _stage_spec(p.stage), "settings": settings.model_dump_json(),
                                            "inputs": p.inputs, "outputs": p.outputs,
                                            "force": p.stage.name in force}))
                proc = subprocess.Popen(
                    [sys.executable, "-c", "import sys; from onereward.runner import run_child; "
                     "sys.exit(run_child(sys.argv[1]))", str(spec)],
                    env={**env, **rank_env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
                procs.append(proc)
                specs.append(spec)
                relays.append(threading.Thread(target=relay, args=(p.stage.name, shown, proc.stdout), daemon=True))
                relays[-1].start()
            while any(proc.poll() is None for proc in procs):
                for (p, _, rank_env), proc in zip(launches, procs, strict=True):
                    if proc.poll() and p.stage.name in data_parallel and proc not in stopped:
                        for (q, _, _), peer in zip(launches, procs, strict=True):  # they would wait on it
                            if q is p and peer.poll() is None:
                                stopped[peer] = f"process {rank_env['RANK']}"
                                peer.terminate()
                time.sleep(0.1)
        except BaseException:  # an interrupt: the children end their runs KILLED and drop their staged outputs
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait()
            raise
        finally:
            for t, proc in zip(relays, procs, strict=False):
                t.join(timeout=10)
                proc.stdout.close()
        outcomes, failures = [], {}
        for (p, _, rank_env), proc, spec in zip(launches, procs, specs, strict=True):
            result = spec.with_suffix(".result.json")
            r = json.loads(result.read_text()) if result.exists() else {}
            said = f"process {rank_env['RANK']}: " if rank_env else ""  # which of a data-parallel stage's
            if proc in stopped:
                failures.setdefault(p.stage.name, []).append(f"{said}stopped, as {stopped[proc]} failed")
                continue
            if proc.returncode != 0 or "error" in r:
                failures.setdefault(p.stage.name, []).append(
                    said + (r.get("error") or f"its process exited with {proc.returncode}"))
                continue
            if r["status"] == "worker":  # a data-parallel process beside the main one, which reports the run
                continue
            if r["key"] != p.key:  # the settings did not survive the trip to the child
                failures.setdefault(p.stage.name, []).append(f"keyed {r['key']} in its process, {p.key} in the plan")
                continue
            outcomes.append(StageOutcome(p.stage.name, r["status"], r["key"], dict(p.outputs), r["metrics"],
                                         r["seconds"]))
    if failures:
        name, whys = next(iter(failures.items()))  # the first in graph order, with each of its processes' errors
        why = "; ".join(whys)
        console.print(f"[red]stage {name} failed: {escape(why)}")  # an error may hold "[...]"
        raise StageFailed(name, ChildStageError(why))
    return outcomes


def run_pipeline(
    settings: Settings,
    *,
    until: str | None = None,
    force: tuple[str, ...] = (),
    graph: Graph = GRAPH,
    jobs: int | None = None,
) -> PipelineResult:
    """Walk the graph in order; skip cached stages; stop at the first failure (raised as StageFailed).

    Stages that do not depend on each other (the two judges) run side by side in child processes, up to `jobs`
    at a time (default: the cores, at least one each, or 1 on a machine with a GPU); `jobs=1` runs everything in
    this process, one by one."""
    from onereward import machine

    if until is not None:
        graph.get(until)
    for f in force:
        graph.get(f)
    # refuses a count or a stage the orchestrators could not honour, here too
    res = settings.resources
    graph.with_resources(res.gpus, res.timeouts, res.cpu_processes)
    many = {k: n for k, n in settings.resources.gpus.items() if n > 1}
    if many:
        console.print(f"resources.gpus {many}: KFP and Airflow run those stages as a process per GPU; this runner "
                      "runs each as one process (`accelerate launch -m onereward stage ...` runs one as several)")
    planned = plan(settings, graph)
    n, done = len(planned), 0
    steps = planned[: graph.names.index(until) + 1] if until is not None else planned
    if jobs is None:  # a GPU is one device the stages would share (two 7B judges need not fit it together)
        jobs = machine.cores() if machine.facts()["machine.gpu"] == "none" else 1
    # data-parallel processes on the cores; one process each where the runner runs stages one by one (jobs=1)
    processes = {k: min(n, jobs) for k, n in res.cpu_processes.items() if min(n, jobs) > 1}
    result = PipelineResult([])
    with tracking.pipeline_run(settings.tracking.experiment, f"pipeline-{settings.profile}",
                               {"profile": settings.profile}) as run:
        result.run_id = run.info.run_id
        for group in side_by_side(steps, max(1, jobs), processes):
            todo = [p for p in group if not is_cached(p, force)]
            launched = len(todo) > 1 or any(p.stage.name in processes for p in todo)
            if launched and PENDING not in {p.stage.func for p in todo}:
                names = " + ".join(p.stage.name for p in group)
                console.rule(f"[bold]{done + 1}-{done + len(group)}/{n} {names} (side by side)" if len(group) > 1
                             else f"[bold]{done + 1}/{n} {names} ({processes[names]} data-parallel processes)")
                outcomes = {o.stage: o for o in run_side_by_side(todo, settings, force, result.run_id, processes)}
                for p in group:
                    o = outcomes.get(p.stage.name) or StageOutcome(p.stage.name, "cached", p.key, dict(p.outputs))
                    result.outcomes.append(o)
                    _report(o)
                done += len(group)
                continue
            for p in group:
                done += 1
                console.rule(f"[bold]{done}/{n} {p.stage.name}")
                try:
                    outcome = execute_stage(p.stage, settings, p.inputs, p.outputs, force=p.stage.name in force)
                except StageNotImplemented as e:
                    console.print(f"[yellow]stopped at {p.stage.name}: {e}")
                    result.stopped_at = p.stage.name
                    return result
                except Exception as e:
                    console.print(f"[red]stage {p.stage.name} failed: {type(e).__name__}: {escape(str(e))}")
                    raise StageFailed(p.stage.name, e) from e
                result.outcomes.append(outcome)
                _report(outcome)
    return result


def _report(o: StageOutcome) -> None:
    label = "cached" if o.status == "cached" else f"done in {o.seconds:.1f}s"
    console.print(f"[green]{o.stage}: {label}[/] -> {', '.join(o.outputs.values())}")
