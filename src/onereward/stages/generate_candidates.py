"""generate_candidates: N candidates per condition from the base generator, varying seed, guidance and
steps, written as Parquet with a contact sheet per task."""

from __future__ import annotations

import hashlib
import itertools
from collections import defaultdict

import numpy as np
from rich.progress import track

from onereward import tracking
from onereward.config import TASKS
from onereward.data import schema
from onereward.data.images import to_png
from onereward.models import tensors
from onereward.models.generator import load_generator
from onereward.stages import StageContext


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


def generate_candidates(ctx: StageContext) -> dict[str, float]:
    s = ctx.settings
    c = s.candidates
    gen = load_generator(ctx.inputs["base_model"].local_dir() / "model")
    conds = pick_conditions(ctx.inputs["conditions"].read_table().to_pylist(), c.max_conditions)
    settings = list(itertools.product(c.steps, c.guidance))
    # candidate j of every condition uses sampling setting j mod len(settings) and its own seed
    jobs = defaultdict(list)
    for r in conds:
        for j in range(c.per_condition):
            jobs[settings[j % len(settings)]].append((r, j))
    out_rows: dict[tuple[str, int], dict] = {}
    batches = [(k, v[i : i + c.batch_size]) for k, v in jobs.items() for i in range(0, len(v), c.batch_size)]
    for (steps, guidance), batch in track(batches, description="generate_candidates"):
        b = tensors.batch_from_rows([r for r, _ in batch])
        seeds = [candidate_seed(r["condition_id"], j, s.seed) for r, j in batch]
        imgs = gen.sample(b["images"], b["masks"], b["prompts"], steps=steps, guidance=guidance,
                          negative_prompt=s.generator.negative_prompt, seed=seeds)
        for (r, j), seed, png in zip(batch, seeds, tensors.to_pngs(imgs), strict=True):
            out_rows[(r["condition_id"], j)] = {
                "condition_id": r["condition_id"], "candidate_id": f"{r['condition_id']}-c{j}", "task": r["task"],
                "seed": seed, "steps": steps, "guidance": guidance, "image": png}
    rows = [out_rows[k] for k in sorted(out_rows)]
    out = ctx.outputs["candidates"]
    out.write_table(schema.table(rows, schema.CANDIDATES))
    _contact_sheets(out, conds, rows, c.per_condition)
    diversity = _diversity(rows, c.per_condition)
    return {"conditions": len(conds), "candidates": len(rows), "mean_pairwise_l1": diversity}


def _contact_sheets(out, conds: list[dict], rows: list[dict], per: int, n: int = 6) -> None:
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
    for pngs in list(by_cond.values())[:50]:
        t = tensors.to_tensor(pngs)
        d = (t[:, None] - t[None]).abs().mean((2, 3, 4))
        k = len(pngs)
        if k > 1:
            vals.append(float(d.sum() / (k * (k - 1))))
    return float(np.mean(vals)) if vals else 0.0


