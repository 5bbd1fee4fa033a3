"""`onereward` command line: run the graph, run one stage (container entrypoint), plan the stages' URIs,
print the graph, export candidate pairs for labelling by hand."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

from onereward.config import ConfigError, load_config
from onereward.signals import exit_on_sigterm


def _pairs(values: list[list[str]], flag: str) -> dict[str, str]:
    """`--in NAME=URI` (people) or `--in NAME URI` (orchestrator placeholders, no string concat)."""
    out = {}
    for v in values:
        if len(v) == 2:
            out[v[0]] = v[1]
        elif len(v) == 1 and "=" in v[0]:
            k, u = v[0].split("=", 1)
            out[k] = u
        else:
            raise SystemExit(f"{flag} {' '.join(v)!r}: expected NAME=URI or NAME URI")
    return out


def cmd_graph(args: argparse.Namespace) -> int:
    from onereward.pipeline import GRAPH

    if args.json:
        print(json.dumps([
            {"stage": s.name, "inputs": list(s.inputs),
             "outputs": [{"name": o.name, "kind": o.kind} for o in s.outputs],
             "gpu": s.resources.gpu, "node_pool": s.resources.node_pool}
            for s in GRAPH
        ], indent=2))
        return 0
    for s in GRAPH:
        ins = ", ".join(s.inputs) or "-"
        outs = ", ".join(f"{o.name}:{o.kind}" for o in s.outputs)
        pool = f"gpu x{s.resources.gpu}" if s.resources.gpu else "cpu"
        print(f"{s.name:<20} in: {ins:<40} out: {outs:<28} [{pool}]  {s.description}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from onereward import machine, tracking
    from onereward.runner import StageFailed, run_pipeline

    settings = load_config(args.profile, args.set)
    start = time.perf_counter()
    try:
        result = run_pipeline(settings, until=args.until, force=tuple(args.force), jobs=args.jobs)
    except StageFailed as e:
        print(f"pipeline failed at stage {e.stage}: {e.cause}", file=sys.stderr)
        return 1
    took = time.perf_counter() - start
    cached = [o.stage for o in result.outcomes if o.status == "cached"]
    print(f"\npipeline ({settings.profile}) finished in {took:.1f}s; "
          f"ran {len(result.outcomes) - len(cached)} stage(s), cached {len(cached)}: {', '.join(cached) or '-'}")
    print(f"machine: {machine.summary()}")
    for o in result.outcomes:
        for name, uri in o.outputs.items():
            print(f"  {o.stage}.{name}: {uri}")
    print(f"MLflow: {tracking.tracking_uri()} (pipeline run {result.run_id}, "
          f"experiment {settings.tracking.experiment!r})")
    if result.stopped_at:
        print(f"stopped at {result.stopped_at}: not implemented yet (stages before it completed)")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from onereward import distributed
    from onereward.pipeline import GRAPH
    from onereward.runner import execute_stage

    settings = load_config(args.config, [*json.loads(args.set_json or "[]"), *args.set])
    stage = GRAPH.get(args.name)
    outcome = execute_stage(stage, settings, _pairs(args.inputs, "--in"), _pairs(args.outputs, "--out"),
                            force=args.force)
    line = json.dumps({"stage": outcome.stage, "status": outcome.status, "key": outcome.key,
                       "outputs": outcome.outputs, "metrics": outcome.metrics})
    # Processes of a data-parallel run share one log: the others say theirs once the main process has said all
    # (a worker's line written while the main process printed its metrics landed inside one of its lines)
    workers = distributed.workers()
    if workers.main:
        print(line, flush=True)
    workers.barrier()
    if not workers.main:
        print(line, flush=True)
    for path, obj in ((args.metrics_file, outcome.metrics), (args.outputs_file, outcome.outputs)):
        if path:  # orchestrators read small results from files (e.g. /airflow/xcom/return.json)
            _write_json(path, obj)
    return 0


def _write_json(path: str, obj: object) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def cmd_plan(args: argparse.Namespace) -> int:
    from onereward.orchestration.entry import plan_uris

    planned = plan_uris(args.config, [*json.loads(args.set_json or "[]"), *args.set])
    print(json.dumps(planned, indent=2))
    if args.outputs_file:
        _write_json(args.outputs_file, planned)
    return 0


def cmd_labels_export(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from onereward import storage
    from onereward.data.candidates import candidate_counts, candidates_by_condition
    from onereward.data.labelstudio import condition_tasks, inline
    from onereward.stages.pretrain_base import read_conditions

    settings = load_config(args.config, args.set)
    storage.configure(settings.storage)
    cand_art = storage.Artifact(args.candidates)
    counts = candidate_counts(cand_art)
    chosen = sorted(c for c, n in counts.items() if n >= 2)[: args.max_conditions]
    conds = {r["condition_id"]: r for r in read_conditions(storage.Artifact(args.conditions), ids=chosen)}

    def stored(image_id: str, png: bytes) -> str:
        uri = storage.join(args.images_uri, f"{image_id}.png")
        storage.write_bytes(uri, png)
        return uri

    # a condition at a time, written as it goes: on flux the candidates are 160,000 512 px PNGs
    n = 0
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "tasks.json"
        with open(local, "w") as f:
            f.write("[")
            for cid, cands in candidates_by_condition(cand_art, counts):
                if cid not in conds:
                    continue
                for task in condition_tasks(conds[cid], cands, settings.labels.criteria.model_dump(), settings.seed,
                                            stored if args.images_uri else inline):
                    f.write(("," if n else "") + json.dumps(task))
                    n += 1
            f.write("]")
        storage.upload_file(local, args.out)
    where = f", images under {args.images_uri}" if args.images_uri else ""
    print(f"wrote {n} Label Studio tasks (candidate pairs x criteria) of {len(conds)} conditions to {args.out}{where}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    import mlflow

    from onereward import tracking
    from onereward.stages import promote

    name = args.model or load_config(args.config, args.set).tracking.generator_model_name
    mlflow.set_tracking_uri(tracking.tracking_uri())
    client = mlflow.MlflowClient()
    if args.rollback:
        try:
            now, previous = promote.rollback(client, name)
        except promote.RollbackError as e:
            print(str(e), file=sys.stderr)
            return 1
        print(f"{name}: champion {now} -> {previous} (rolled back)")
        return 0
    print(json.dumps({alias: promote.alias_version(client, name, alias)
                      for alias in (promote.CHAMPION, promote.CHALLENGER)}))
    return 0


def serve_command(model_uri: str, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """`mlflow models serve` of this environment, against this project's tracking store (the scoring server's
    uvicorn is looked up on PATH, so the environment's bin folder goes first)."""
    from onereward import tracking

    bindir = os.path.dirname(sys.executable)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(),
           "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    return [os.path.join(bindir, "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
            "-h", host, "-p", str(port)], env


def cmd_serve(args: argparse.Namespace) -> int:
    name = args.model or load_config(args.config, args.set).tracking.generator_model_name
    cmd, env = serve_command(f"models:/{name}@{args.alias}", args.host, args.port)
    print(f"serving models:/{name}@{args.alias} on http://{args.host}:{args.port}/invocations", flush=True)
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onereward", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the whole graph locally (skips cached stages)")
    r.add_argument("--profile", default="tiny", help="profile name in configs/ or a YAML path")
    r.add_argument("--until", help="stop after this stage")
    r.add_argument("--force", action="append", default=[], metavar="STAGE", help="rerun STAGE even if cached")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    r.add_argument("--jobs", type=int, metavar="N", help="stages that do not depend on each other (the two judges) "
                   "run side by side, up to N at a time (default: the cores; 1 with a GPU); 1: one at a time")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("stage", help="run one stage from input URIs to output URIs (container entrypoint)")
    s.add_argument("name")
    s.add_argument("--in", dest="inputs", action="append", default=[], nargs="+", metavar="NAME=URI")
    s.add_argument("--out", dest="outputs", action="append", default=[], nargs="+", metavar="NAME=URI")
    s.add_argument("--config", default="tiny", help="profile name or YAML path")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    s.add_argument("--set-json", help="config overrides as a JSON list of KEY=VALUE (orchestrator parameter)")
    s.add_argument("--force", action="store_true", help="rerun even if the outputs are cached")
    s.add_argument("--metrics-file", help="also write the stage metrics as JSON here")
    s.add_argument("--outputs-file", help="also write {output name: URI} as JSON here")
    s.set_defaults(func=cmd_stage)

    pl = sub.add_parser("plan", help="print every stage's keyed input/output URIs as JSON (head of the DAG)")
    pl.add_argument("--config", default="tiny", help="profile name or YAML path")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, applied after --set-json")
    pl.add_argument("--set-json", help="config overrides as a JSON list of KEY=VALUE (orchestrator parameter)")
    pl.add_argument("--outputs-file", help="also write the plan here (e.g. /airflow/xcom/return.json)")
    pl.set_defaults(func=cmd_plan)

    lb = sub.add_parser("labels", help="preference labels by hand (Label Studio)")
    lsub = lb.add_subparsers(dest="labels_command", required=True)
    ex = lsub.add_parser("export", help="write the candidate pairs as a Label Studio import file (JSON)")
    ex.add_argument("--conditions", required=True, metavar="URI", help="the conditions artifact")
    ex.add_argument("--candidates", required=True, metavar="URI", help="the candidates artifact")
    ex.add_argument("--out", required=True, metavar="FILE.json", help="local path or s3:// URI")
    ex.add_argument("--images-uri", metavar="URI", help="write each image once as a PNG under this folder or s3:// "
                    "prefix and have the tasks point at it (Label Studio with that bucket as source storage); "
                    "default: images inline as data: URIs")
    ex.add_argument("--max-conditions", type=int, metavar="N", help="the first N conditions (by id) only")
    ex.add_argument("--config", default="tiny", help="profile name or YAML path (labels.criteria per task)")
    ex.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ex.set_defaults(func=cmd_labels_export)

    pr = sub.add_parser("promote", help="the generator's registry aliases: show them, or roll the champion back")
    pr.add_argument("--rollback", action="store_true", help="point champion at the version it replaced")
    pr.add_argument("--model", help="registered model name (default: tracking.generator_model_name)")
    pr.add_argument("--config", default="tiny", help="profile name or YAML path")
    pr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    pr.set_defaults(func=cmd_promote)

    sv = sub.add_parser("serve", help="serve a generator alias over HTTP (mlflow models serve, this environment)")
    sv.add_argument("--alias", default="champion")
    sv.add_argument("--model", help="registered model name (default: tracking.generator_model_name)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8080)
    sv.add_argument("--config", default="tiny", help="profile name or YAML path")
    sv.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    sv.set_defaults(func=cmd_serve)

    g = sub.add_parser("graph", help="print the stages and their artifacts")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_graph)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        return args.func(args)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
