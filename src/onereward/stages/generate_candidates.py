"""generate_candidates: N candidates per condition from the base generator, varying seed, guidance and
steps, written as Parquet with a contact sheet per task.

Sampled in parts of `candidates.part_conditions` conditions: a part's candidates are encoded and kept in the stage's
scratch as soon as they are sampled (one Parquet artifact, committed atomically), so memory holds one part's
candidates (and the PNGs of this process's conditions), a killed run resumes at the parts it had not kept, and the
stage runs data parallel on a node's GPUs (`resources.gpus:
{generate_candidates: N}`): process r samples the r-th, (r+N)-th, ... of the parts left to do, and the main process,
once every part is kept, writes them in order as the output's Parquet shards. A candidate's image depends on its
part's batches only (seeds are per candidate), so the output is the same whatever the processes or kills.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import pyarrow as pa
from rich.progress import Progress

from onereward import tracking
from onereward.config import TASKS
from onereward.data import schema
from onereward.data.images import to_png
from onereward.models import tensors
from onereward.models.generator import load_generator
from onereward.stages import StageContext
from onereward.stages.checkpoint import Checkpoints
from onereward.stages.parts import parts_left, wait_for
from onereward.stages.pretrain_base import read_conditions

SHEET_CONDITIONS = 6  # a task's contact sheet: its first conditions, each with its candidates
DIVERSITY_CONDITIONS = 50  # the diversity measure reads the output's first conditions


def pick_conditions(rows: list[dict], limit: int) -> list[dict]:
    """Up to `limit` train conditions, the same share per task, in a stable order."""
    per_task = max(1, limit // len(TASKS))
    by_task = defaultdict(list)
    for r in sorted(rows, key=lambda r: r["condition_id"]):
        if r["split"] == "train" and len(by_task[r["task"]]) < per_task:
            by_task[r["task"]].append(r)
    return [r for t in TASKS for r in by_task[t]]


def candidate_seed(condition_id: str, j: int, base: int) -> int:
    return int(hashlib.sha1(f"{base}:{condition_id}:{j}".encode()).hexdigest()[:8], 16)


def jobs_of(conds: list[dict], settings: list[tuple[int, float]], per: int, batch_size: int
            ) -> list[tuple[tuple[int, float], list[tuple[dict, int]]]]:
    """The sampling batches of `conds`' candidates: candidate j of a condition uses sampling setting j mod
    len(settings); each setting's candidates in batches of `batch_size`."""
    jobs = defaultdict(list)
    for r in conds:
        for j in range(per):
            jobs[settings[j % len(settings)]].append((r, j))
    return [(k, v[i : i + batch_size]) for k, v in jobs.items() for i in range(0, len(v), batch_size)]


def sample_part(gen, batches: list[tuple[tuple[int, float], list[tuple[dict, int]]]], seed: int,
                negative_prompt: str, advance: Callable[[], None]) -> pa.Table:
    """The candidates of `batches` (`jobs_of`), each from its own seed, sorted by (condition, candidate)."""
    out_rows: dict[tuple[str, int], dict] = {}
    for (steps, guidance), batch in batches:
        b = tensors.batch_from_rows([r for r, _ in batch])
        seeds = [candidate_seed(r["condition_id"], j, seed) for r, j in batch]
        imgs = gen.sample(b["images"], b["masks"], b["prompts"], steps=steps, guidance=guidance,
                          negative_prompt=negative_prompt, seed=seeds)
        for (r, j), s, png in zip(batch, seeds, tensors.to_pngs(imgs), strict=True):
            out_rows[(r["condition_id"], j)] = {
                "condition_id": r["condition_id"], "candidate_id": f"{r['condition_id']}-c{j}", "task": r["task"],
                "seed": s, "steps": steps, "guidance": guidance, "image": png}
        advance()
    return schema.table([out_rows[k] for k in sorted(out_rows)], schema.CANDIDATES)


def generate_candidates(ctx: StageContext) -> dict[str, float]:
    s = ctx.settings
    c = s.candidates
    workers = ctx.workers
    art = ctx.inputs["conditions"]
    # chosen on their ids, then read whole only for the parts this process samples (and the contact sheets)
    conds = pick_conditions(read_conditions(art, columns=["condition_id", "split", "task"]), c.max_conditions)
    if not conds:
        raise ValueError(f"generate_candidates: conditions {art.uri} hold no train condition")
    parts = [conds[i : i + c.part_conditions] for i in range(0, len(conds), c.part_conditions)]
    settings = list(itertools.product(c.steps, c.guidance))
    kept = Checkpoints(ctx)
    names = [f"part-{i:05d}" for i in range(len(parts))]
    mine, resumed = parts_left(kept, workers, names, "parts")
    sheets = [r for t in TASKS for r in [x for x in conds if x["task"] == t][:SHEET_CONDITIONS]] if workers.main else []
    full = {r["condition_id"]: r for r in read_conditions(
        art, ids=[r["condition_id"] for i in mine for r in parts[i]] + [r["condition_id"] for r in sheets])}
    batches = {i: jobs_of([full[r["condition_id"]] for r in parts[i]], settings, c.per_condition, c.batch_size)
               for i in mine}
    gen = load_generator(ctx.inputs["base_model"].local_dir() / "model") if mine else None
    with Progress(transient=False, disable=not workers.main) as bar:
        task = bar.add_task("generate_candidates", total=sum(len(batches[i]) for i in mine))
        for i in mine:
            t0 = time.perf_counter()
            table = sample_part(gen, batches[i], s.seed, s.generator.negative_prompt, lambda: bar.advance(task))
            kept.keep_table(names[i], table)
            if len(parts) > 1:
                print(f"generate_candidates: process {workers.rank}: part {i + 1}/{len(parts)} ({len(parts[i])} "
                      f"conditions, {table.num_rows} candidates) in {time.perf_counter() - t0:.0f} s", flush=True)
    if not workers.main:  # the main process writes the output
        return {}
    return write_parts(ctx, kept, [full[r["condition_id"]] for r in sheets], names, c.per_condition, resumed,
                       len(conds))


def write_parts(ctx: StageContext, kept: Checkpoints, sheets: list[dict], names: list[str], per: int, resumed: int,
                conditions: int) -> dict[str, float]:
    """The kept parts, in order, as the output's shards (one in memory at a time), once every process kept its
    own; with the contact sheets (of the conditions `sheets`) and the diversity measure read on the way."""
    out = ctx.outputs["candidates"]
    sheet_ids = {r["condition_id"] for r in sheets}
    sheet_rows, first_rows, first_ids, candidates = [], [], set(), 0
    for i, name in enumerate(names):
        table = wait_for(lambda name=name: kept.kept_table(name, quiet=True), f"part {i + 1}/{len(names)}",
                         ctx.stage)
        out.write_table(table)
        candidates += table.num_rows
        for r in table.to_pylist():  # a condition's candidates lie together: the output's first conditions
            if r["condition_id"] in sheet_ids:
                sheet_rows.append(r)
            if r["condition_id"] in first_ids or len(first_ids) < DIVERSITY_CONDITIONS:
                first_ids.add(r["condition_id"])
                first_rows.append(r)
    _contact_sheets(out, sheets, sheet_rows, per)
    return {"conditions": conditions, "candidates": candidates, "parts": len(names), "parts_resumed": resumed,
            "mean_pairwise_l1": _diversity(first_rows, per)}


def _contact_sheets(out, conds: list[dict], rows: list[dict], per: int, n: int = SHEET_CONDITIONS) -> None:
    by_cond = defaultdict(list)
    for r in rows:
        by_cond[r["condition_id"]].append(r)
    for task in TASKS:
        picked = [c for c in conds if c["task"] == task][:n]
        if not picked:
            continue
        b = tensors.batch_from_rows(picked)
        sheet = []
        for i, c in enumerate(picked):
            cands = tensors.to_tensor([r["image"] for r in by_cond[c["condition_id"]]])
            sheet.append([b["images"][i] * (1 - b["masks"][i]), *cands])
        arr = tensors.grid(sheet)
        out.write_bytes(f"contact_sheets/{task}.png", to_png(arr))
        tracking.log_image(arr, f"contact_sheets/{task}.png")


def _diversity(rows: list[dict], per: int) -> float:
    """Mean pixel L1 between candidates of one condition: the preference labeller needs them to differ."""
    by_cond = defaultdict(list)
    for r in rows:
        by_cond[r["condition_id"]].append(r["image"])
    vals = []
    for pngs in list(by_cond.values())[:DIVERSITY_CONDITIONS]:
        t = tensors.to_tensor(pngs)
        d = (t[:, None] - t[None]).abs().mean((2, 3, 4))
        k = len(pngs)
        if k > 1:
            vals.append(float(d.sum() / (k * (k - 1))))
    return float(np.mean(vals)) if vals else 0.0


