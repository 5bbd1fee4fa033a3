"""train_reward: train the one VLM judge on labelled pairs, check it on held-out conditions, register it.

Input: `preferences` (label_preferences: ordered pairs with both images).
Output: `reward_model` — the judge (`judge/`, safetensors), `heldout_metrics.json`, `registry.json`.
Config: `seed`, `reward`.
Metrics: `heldout.acc.mean`, `heldout.acc.<task>.<criterion>` (all held-out pairs), `heldout.acc_cand.mean` and
`heldout.acc_cand.<task>.<criterion>` (candidate-vs-candidate pairs only), `heldout.acc_kind.<kind>`,
`heldout.order_gap` (mean |P(A>B) + P(B>A) - 1|), `sanity.<task>.target_vs_base`,
`sanity.<task>.base_vs_collapsed`, `train_loss` curves.

Pairs are split by condition (`reward.heldout_fraction`), so no held-out condition is seen in training. Each
pair is trained in both orders: "is image 1 better than image 2?" is Yes for (winner, loser) and No for
(loser, winner), a 2-way cross-entropy on the Yes/No logits. The sanity gate: on held-out pairs, per task,
P(target better than a base sample) >= `reward.min_target_vs_base` and P(base sample better than a degraded
image) >= `reward.min_base_vs_collapsed`; a judge below either is not registered and the stage fails.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress

from onereward import tracking
from onereward.models import data as mdata
from onereward.models.judge import TinyJudge
from onereward.models.registry import register_judge
from onereward.stages import GateFailed, StageContext


class JudgeGateFailed(GateFailed):
    """The judge fails its held-out sanity gate: it is not registered."""


def _heldout(condition_id: str, fraction: float, seed: int) -> bool:
    u = int(hashlib.sha1(f"{seed}:{condition_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return u < fraction


def _tensors(rows: list[dict]) -> dict:
    return {"winner": mdata.to_tensor([r["winner_image"] for r in rows]),
            "loser": mdata.to_tensor([r["loser_image"] for r in rows]),
            "tasks": [r["task"] for r in rows], "criteria": [r["criterion"] for r in rows]}


def _both_orders(judge: TinyJudge, d: dict, idx: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on (winner, loser) -> Yes and (loser, winner) -> No."""
    i = idx.tolist()
    tasks, criteria = [d["tasks"][k] for k in i] * 2, [d["criteria"][k] for k in i] * 2
    first = torch.cat([d["winner"][idx], d["loser"][idx]])
    second = torch.cat([d["loser"][idx], d["winner"][idx]])
    labels = torch.cat([torch.zeros(len(i)), torch.ones(len(i))]).long()  # 0 = Yes, 1 = No
    return F.cross_entropy(judge.yes_no_logits(first, second, tasks, criteria), labels)


@torch.no_grad()
def score_pairs(judge: TinyJudge, d: dict, batch: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """P(winner better than loser) asked both ways: (P(Yes | winner, loser), P(Yes | loser, winner))."""
    judge.model.eval()
    fwd, rev = [], []
    for s in range(0, len(d["tasks"]), batch):
        sl = slice(s, s + batch)
        args = (d["tasks"][sl], d["criteria"][sl])
        fwd.append(judge.p_yes(d["winner"][sl], d["loser"][sl], *args))
        rev.append(judge.p_yes(d["loser"][sl], d["winner"][sl], *args))
    return torch.cat(fwd).numpy(), torch.cat(rev).numpy()


def evaluate_judge(judge: TinyJudge, rows: list[dict]) -> dict[str, float]:
    d = _tensors(rows)
    fwd, rev = score_pairs(judge, d)
    p_win = (fwd + 1 - rev) / 2  # the judge's P(winner better), order-averaged
    correct = p_win > 0.5
    metrics: dict[str, float] = {"heldout.pairs": float(len(rows)), "heldout.acc.mean": float(correct.mean()),
                                 "heldout.order_gap": float(np.abs(fwd + rev - 1).mean())}
    cells, cand, kinds, sanity = defaultdict(list), defaultdict(list), defaultdict(list), defaultdict(list)
    for r, ok, p in zip(rows, correct, p_win, strict=True):
        cells[f"{r['task']}.{r['criterion']}"].append(ok)
        kinds[r["kind"]].append(ok)
        if r["kind"] == "cand_vs_cand":
            cand[f"{r['task']}.{r['criterion']}"].append(ok)
        elif r["kind"] == "target_vs_cand":
            sanity[f"sanity.{r['task']}.target_vs_base"].append(p)
        else:
            sanity[f"sanity.{r['task']}.base_vs_collapsed"].append(p)
    metrics.update({f"heldout.acc.{k}": float(np.mean(v)) for k, v in cells.items()})
    metrics.update({f"heldout.acc_kind.{k}": float(np.mean(v)) for k, v in kinds.items()})
    metrics.update({f"heldout.acc_cand.{k}": float(np.mean(v)) for k, v in cand.items()})
    if cand:
        metrics["heldout.acc_cand.mean"] = float(np.mean([o for v in cand.values() for o in v]))
    metrics.update({k: float(np.mean(v)) for k, v in sanity.items()})
    return metrics


def check_gate(metrics: dict[str, float], tasks: list[str], min_target: float, min_collapsed: float) -> None:
    failed = []
    for task in tasks:
        for name, floor in (("target_vs_base", min_target), ("base_vs_collapsed", min_collapsed)):
            value = metrics.get(f"sanity.{task}.{name}")
            if value is None:
                failed.append(f"{task}: no held-out {name} pairs")
            elif value < floor:
                failed.append(f"{task}: P({name}) {value:.3f} < {floor}")
    if failed:
        raise JudgeGateFailed("train_reward: the judge fails its held-out sanity gate (reward.min_*); it is not "
                              "registered. " + "; ".join(failed), metrics)


def train_reward(ctx: StageContext) -> dict[str, float]:
    s = ctx.settings
    r = s.reward
    rows = ctx.inputs["preferences"].read_table().to_pylist()
    if not rows:
        raise ValueError(f"preferences {ctx.inputs['preferences'].uri}: no labelled pairs to learn from")
    held = [x for x in rows if _heldout(x["condition_id"], r.heldout_fraction, s.seed)]
    train = [x for x in rows if not _heldout(x["condition_id"], r.heldout_fraction, s.seed)]
    if not held or not train:
        raise ValueError(f"train_reward: {len(train)} training and {len(held)} held-out pairs; both must be > 0")
    cells = sorted({(x["task"], x["criterion"]) for x in rows})
    judge = TinyJudge.build(cells, seed=s.seed)
    opt = torch.optim.AdamW(judge.parameters(), lr=r.lr)
    d = _tensors(train)
    rng = torch.Generator().manual_seed(s.seed)
    print(f"train_reward: {len(train)} training pairs, {len(held)} held out, {len(cells)} cells, "
          f"{r.steps} steps of {r.batch_size} pairs (both orders)", flush=True)
    t0 = time.perf_counter()
    with Progress(transient=False) as bar:
        task = bar.add_task("train_reward", total=r.steps)
        for step in range(r.steps):
            judge.model.train()
            loss = _both_orders(judge, d, torch.randint(0, len(train), (r.batch_size,), generator=rng))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(judge.parameters(), 1.0)
            opt.step()
            bar.advance(task)
            if step % 10 == 0:
                tracking.log_metrics({"train_loss": loss.item()}, step=step)
            if (step + 1) % r.eval_every == 0 and step + 1 < r.steps:
                acc = evaluate_judge(judge, held)["heldout.acc.mean"]
                tracking.log_metrics({"heldout.acc.curve": acc}, step=step + 1)
                print(f"train_reward: step {step + 1}/{r.steps} loss {loss.item():.4f} held-out acc {acc:.3f}",
                      flush=True)
    metrics = evaluate_judge(judge, held)
    metrics["train_seconds"] = time.perf_counter() - t0
    print(json.dumps({k: round(v, 3) for k, v in metrics.items()}, indent=1), flush=True)
    check_gate(metrics, sorted({t for t, _ in cells}), r.min_target_vs_base, r.min_base_vs_collapsed)
    out = ctx.outputs["reward_model"]
    judge.save(out.dir / "judge")
    out.write_json("heldout_metrics.json", metrics)
    version = register_judge(out.dir / "judge", r.model_name, "training", judge.shape.image_size,
                             {"artifact_key": ctx.key})
    out.write_json("registry.json", {"name": r.model_name, "version": version, "alias": "training"})
    return {**metrics, "registered_version": float(version)}
