"""train_reward and train_audit_reward: train a VLM judge on labelled pairs, check it on held-out conditions,
register it.

Inputs: `preferences` (label_preferences: ordered pairs naming their images, and the images with each condition's
masked input), `conditions` (synthesize_masks: the prompt the judge is asked with, the mask).
Output: `reward_model` (train_reward) or `audit_model` (train_audit_reward) — the judge (`judge/`,
safetensors), `heldout_metrics.json`, `calibration.png`, `registry.json`.
Config: `seed`, `reward` (`reward.judge` and `reward.audit` say which architecture, split and name, and with
`base_uri` which pretrained checkpoint to train a LoRA adapter on instead of building a tiny judge from config).
Metrics: `heldout.acc.mean`, `heldout.acc.<task>.<criterion>` (all held-out pairs), `heldout.acc_cand.mean` and
`heldout.acc_cand.<task>.<criterion>` (candidate-vs-candidate pairs only), `heldout.acc_kind.<kind>`,
`heldout.order_gap` (mean |P(A>B) + P(B>A) - 1|), `sanity.<task>.target_vs_base`,
`sanity.<task>.base_vs_collapsed`, `heldout.smoother_label` and `heldout.smoother_pref` (on held-out
candidate pairs, how often the labels and the judge pick the image with less in-mask detail), `train_loss` and
`heldout.acc*.curve`; from the vision warm-up `warmup.bt_loss`, `warmup.heldout.acc_kind.<kind>` and
`warmup.heldout.acc_cand.mean` (the warm-up's vision-only score on the held-out pairs: whether the image features
separate a kind before the query is trained); the audit judge's carry the prefix `audit.`.

Pairs are split by condition (`reward.heldout_fraction`, hashed with the judge's `split_seed`), so no held-out
condition is seen in training; the audit judge holds out other conditions and is another architecture
(Qwen2.5-VL against Qwen2-VL), since two judges differing only by seed share their blind spots. Each pair is
trained in both orders: "is image 1 better than image 2?" is Yes for (winner, loser) and No for
(loser, winner), a 2-way cross-entropy on the Yes/No logits. Batches are drawn by kind of pair
(`reward.kind_share`) and each pair is turned or mirrored at random (`reward.augment`). The sanity gate: on
held-out pairs, per task, P(target better than a base sample) >= `reward.min_target_vs_base` and P(base sample
better than a degraded image) >= `reward.min_base_vs_collapsed`, for each task of `reward.gate_tasks`; a judge
below either, or with no such held-out pairs for a gated task, is not registered and the stage fails.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress

from onereward import tracking
from onereward.config import JudgeSpec, RewardConfig
from onereward.data.image_table import ImageTable
from onereward.distributed import ONE_PROCESS, Workers
from onereward.models import tensors
from onereward.models.judge import Judge, JudgeShape, Query, Source
from onereward.models.registry import register_judge
from onereward.stages import GateFailed, StageContext, print_metrics
from onereward.stages.checkpoint import Checkpoint, Checkpoints, ranks_rng
from onereward.stages.pretrain_base import cosine_factor, read_conditions


class JudgeGateFailed(GateFailed):
    """The judge fails its held-out sanity gate: it is not registered."""


def _heldout(condition_id: str, fraction: float, seed: int) -> bool:
    u = int(hashlib.sha1(f"{seed}:{condition_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return u < fraction


@dataclass
class Pairs:
    """Labelled pairs as positions in an ImageTable — the winner, the loser and the condition's masked input (what
    the judge is shown with them) — and their queries' words. Decoded a selection at a time (`tensors`), so a
    table read lazily holds no pixels between batches. `weight`: the chance of each to be drawn in training."""

    images: ImageTable
    winner: torch.Tensor
    loser: torch.Tensor
    context: torch.Tensor
    tasks: list[str]
    criteria: list[str]
    prompts: list[str]
    weight: torch.Tensor | None = None

    @classmethod
    def of(cls, rows: list[dict], images: ImageTable, prompts: dict[str, str], r: RewardConfig | None = None
           ) -> Pairs:
        """The pairs of `rows` (schema.PREFERENCES) over `images`; with `r`, weighted by `reward.kind_share`."""
        missing = sorted({x["condition_id"] for x in rows} - prompts.keys())
        if missing:
            raise ValueError(f"preferences name conditions not in the conditions input: {missing[:5]}")
        return cls(images, images.positions([x["winner_id"] for x in rows]),
                   images.positions([x["loser_id"] for x in rows]),
                   images.positions([f"{x['condition_id']}-context" for x in rows]),
                   [x["task"] for x in rows], [x["criterion"] for x in rows],
                   [prompts[x["condition_id"]] for x in rows],
                   None if r is None else sampling_weights(rows, r.kind_share))

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, sel: slice | list[int]) -> Pairs:
        pick = (lambda v: v[sel]) if isinstance(sel, slice) else (lambda v: [v[i] for i in sel])
        at = sel if isinstance(sel, slice) else torch.tensor(sel, dtype=torch.long)
        return Pairs(self.images, self.winner[at], self.loser[at], self.context[at], pick(self.tasks),
                     pick(self.criteria), pick(self.prompts), None if self.weight is None else self.weight[at])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, Query]:
        """(winner images, loser images, query with the masked inputs), decoded."""
        n = len(self)
        x = self.images.take(torch.cat([self.winner, self.loser, self.context]))
        return x[:n], x[n : 2 * n], Query(self.tasks, self.criteria, self.prompts, x[2 * n :])


def sampling_weights(rows: list[dict], share: dict[str, float]) -> torch.Tensor:
    """A weight a training pair, so that each kind of pair fills its `share` of a batch however many pairs of it
    there are: candidate pairs outnumber the others up to 14 to 1 (8 candidates a condition), and drawn uniformly
    the judge barely saw a degraded image."""
    counts = Counter(r["kind"] for r in rows)
    unknown = sorted(counts.keys() - share.keys())
    if unknown or not any(share[k] > 0 for k in counts):
        raise ValueError(f"reward.kind_share {share} gives no share to the pair kinds {unknown or sorted(counts)}")
    return torch.tensor([share.get(r["kind"], 0.0) / counts[r["kind"]] for r in rows], dtype=torch.double)


def draw_batch(train: Pairs, r: RewardConfig, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, Query]:
    """`r.batch_size` training pairs drawn by their kind's share (winner, loser, query). With `r.augment`
    each pair is turned or mirrored (one of the 8 symmetries of the square, the same for both images and the
    masked input), except the tasks of `r.augment_skip` (a mirrored glyph is not the requested text): on
    `tiny` a judge sees ~1,000 distinct images and otherwise learns them by heart."""
    idx = torch.multinomial(train.weight, r.batch_size, replacement=True, generator=rng)
    winner, loser, q = train[idx.tolist()].tensors()
    context = q.context
    if r.augment:
        sym = torch.randint(0, 8, (len(idx),), generator=rng)
        sym[torch.tensor([t in r.augment_skip for t in q.tasks])] = 0
        winner, loser = square_symmetry(winner, sym), square_symmetry(loser, sym)
        context = None if context is None else square_symmetry(context, sym)
    return winner, loser, Query(q.tasks, q.criteria, q.prompts, context)


def square_symmetry(x: torch.Tensor, sym: torch.Tensor) -> torch.Tensor:
    """Row i turned by sym[i] % 4 quarter turns, then mirrored if sym[i] >= 4."""
    out = x.clone()
    for k in sym.unique().tolist():
        rows = sym == k
        y = torch.rot90(x[rows], k % 4, (2, 3))
        out[rows] = y.flip(3) if k >= 4 else y
    return out


def both_orders_loss(judge: Judge, winner: torch.Tensor, loser: torch.Tensor, q: Query) -> torch.Tensor:
    """Cross-entropy on (winner, loser) -> Yes and (loser, winner) -> No."""
    logits = judge.both_orders_logits(winner, loser, q)
    labels = torch.cat([torch.zeros(len(winner)), torch.ones(len(winner))]).long()  # 0 = Yes, 1 = No
    return F.cross_entropy(logits, labels.to(logits.device))


@torch.no_grad()
def score_pairs(judge: Judge, pairs: Pairs, batch: int = 128, workers: Workers = ONE_PROCESS
                ) -> tuple[np.ndarray, np.ndarray]:
    """P(winner better than loser) asked both ways: (P(Yes | winner, loser), P(Yes | loser, winner)). With several
    `workers` (the same judge in each) each scores every world-th pair and every process gets all of them."""
    judge.model.eval()
    mine = pairs[workers.rank :: workers.world]
    fwd, rev = [np.zeros(0, np.float32)], [np.zeros(0, np.float32)]
    for s in range(0, len(mine), batch):
        p_wl, p_lw = judge.p_yes_both_orders(*mine[s : s + batch].tensors())
        fwd.append(p_wl.float().cpu().numpy())
        rev.append(p_lw.float().cpu().numpy())
    if workers.world == 1:
        return np.concatenate(fwd), np.concatenate(rev)
    out = np.zeros((2, len(pairs)), np.float32)
    for rank, (f, r) in enumerate(workers.gather((np.concatenate(fwd), np.concatenate(rev)))):
        out[0, rank :: workers.world], out[1, rank :: workers.world] = f, r
    return out[0], out[1]


def evaluate_judge(judge: Judge, rows: list[dict], pairs: Pairs, workers: Workers = ONE_PROCESS
                   ) -> tuple[dict[str, float], np.ndarray]:
    """Held-out metrics of `rows` (as Pairs: `pairs`), and the judge's order-averaged P(winner better)
    of each row; with several `workers` they share the scoring (score_pairs)."""
    fwd, rev = score_pairs(judge, pairs, workers=workers)
    p_win = (fwd + 1 - rev) / 2
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
    return metrics, p_win


def smoother_preference(rows: list[dict], p_win: np.ndarray, pairs: Pairs, masks: dict[str, bytes]
                        ) -> dict[str, float]:
    """On the candidate pairs of `rows`: the share whose label picks the image with less in-mask detail, and the
    share where the judge (its P(winner better) `p_win`) does. A judge below the labels learned "detail wins"
    from the target and degraded pairs (label_preferences' `smoother_wins`); one above them leans to blur, what
    RL against it would learn."""
    idx = [i for i, r in enumerate(rows) if r["kind"] == "cand_vs_cand"]
    if not idx:
        return {}
    m = tensors.to_tensor([masks[rows[i]["condition_id"]] for i in idx], "L")
    winner, loser, _ = pairs[idx].tensors()
    smoother_won = tensors.detail(winner, m) < tensors.detail(loser, m)
    judge_agrees = torch.from_numpy(p_win[idx] > 0.5)
    return {"heldout.smoother_label": float(smoother_won.float().mean()),
            "heldout.smoother_pref": float((smoother_won == judge_agrees).float().mean())}


def check_gate(metrics: dict[str, float], tasks: list[str], min_target: float, min_collapsed: float,
               stage: str) -> None:
    failed = []
    for task in tasks:
        for name, floor in (("target_vs_base", min_target), ("base_vs_collapsed", min_collapsed)):
            value = metrics.get(f"sanity.{task}.{name}")
            if value is None:
                failed.append(f"{task}: no held-out {name} pairs")
            elif value < floor:
                failed.append(f"{task}: P({name}) {value:.3f} < {floor}")
    if failed:
        raise JudgeGateFailed(f"{stage}: the judge fails its held-out sanity gate (reward.min_*); it is not "
                              "registered. " + "; ".join(failed), metrics)


def calibration_plot(p_win: np.ndarray, bins: int = 10):
    """Reliability diagram: the judge's P(winner better) in bins against how often it was right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = np.maximum(p_win, 1 - p_win)  # confidence in the side it picks
    right = p_win > 0.5
    edges = np.linspace(0.5, 1.0, bins // 2 + 1)
    which = np.clip(np.digitize(p, edges) - 1, 0, len(edges) - 2)
    centres, acc, counts = [], [], []
    for b in range(len(edges) - 1):
        sel = which == b
        if sel.any():
            centres.append(float(p[sel].mean()))
            acc.append(float(right[sel].mean()))
            counts.append(int(sel.sum()))
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0.5, 1], [0.5, 1], "k--", lw=1)
    ax.plot(centres, acc, "o-")
    for x, y, n in zip(centres, acc, counts, strict=True):
        ax.annotate(str(n), (x, y), fontsize=7)
    ax.set(xlabel="judge confidence", ylabel="held-out accuracy", title="calibration (pairs per point)")
    fig.tight_layout()
    return fig


def _lr_at(step: int, r: RewardConfig) -> float:
    if r.warmup_steps and step < r.warmup_steps:
        return r.lr * (step + 1) / r.warmup_steps
    if r.lr_decay == "cosine":
        return r.lr * cosine_factor((step - r.warmup_steps) / max(r.steps - r.warmup_steps, 1))
    return r.lr


def _scores(judge: Judge, head: torch.Tensor, keys: list[tuple[str, str]], winner: torch.Tensor,
            loser: torch.Tensor, q: Query) -> tuple[torch.Tensor, torch.Tensor]:
    """The warm-up's linear score of each winner and loser over its pooled vision features."""
    b = len(winner)
    context = None if q.context is None else q.context.repeat(2, 1, 1, 1)
    feats = judge.image_features(torch.cat([winner, loser]), context)
    w = head[torch.tensor([keys.index(k) for k in zip(q.tasks, q.criteria, strict=True)])]
    return (feats[:b] * w).sum(-1), (feats[b:] * w).sum(-1)


def vision_accuracy(judge: Judge, head: torch.Tensor, keys: list[tuple[str, str]], rows: list[dict],
                    pairs: Pairs, batch: int = 256) -> dict[str, float]:
    """`warmup.heldout.acc_kind.<kind>` and `warmup.heldout.acc_cand.mean`: how often the warm-up's score alone
    ranks the held-out pairs right, i.e. whether the image features separate a kind at all before the query
    is trained. Cells the training pairs lack have no score and are left out."""
    judge.model.eval()
    known = [i for i, x in enumerate(rows) if (x["task"], x["criterion"]) in keys]
    right = []
    with torch.no_grad():
        for s in range(0, len(known), batch):
            idx = known[s : s + batch]
            win, lose = _scores(judge, head, keys, *pairs[idx].tensors())
            right.extend((win > lose).tolist())
    kinds: dict[str, list[bool]] = defaultdict(list)
    for i, ok in zip(known, right, strict=True):
        kinds[rows[i]["kind"]].append(ok)
    out = {f"warmup.heldout.acc_kind.{k}": float(np.mean(v)) for k, v in sorted(kinds.items())}
    if "cand_vs_cand" in kinds:
        out["warmup.heldout.acc_cand.mean"] = out["warmup.heldout.acc_kind.cand_vs_cand"]
    return out


def warm_up_vision(judge: Judge, train: Pairs, r: RewardConfig, seed: int, label: str,
                   held: tuple[list[dict], Pairs] | None = None, ckpts: Checkpoints | None = None,
                   ck: Checkpoint | None = None, workers: Workers = ONE_PROCESS) -> dict[str, float]:
    """Bradley-Terry on the vision tower alone before the pairwise query is trained: a linear score per
    (task, criterion) over each image's pooled features, pushed winner above loser; the score head is then
    dropped. Trained alone, the pairwise query sat at ln 2 for 1,000+ steps on candidate pairs (the answer token
    must find the comparison through the language model before any image feature gets a useful gradient); from
    a vision tower that already tells the images apart it learns in a few hundred steps. Returns
    `warmup.bt_loss`, the mean Bradley-Terry loss of the last tenth of the steps, and with `held` (held-out rows
    and their Pairs) the vision_accuracy metrics; {} without a warm-up. With `ckpts` it saves a checkpoint
    every `reward.checkpoint_every` steps, and goes on from `ck`, one saved during the warm-up. With several
    `workers` (data parallel) each draws its own batches and their gradients are averaged; the main process alone
    checkpoints and measures `held`."""
    if r.vision_warmup_steps == 0:
        return {}
    keys = sorted(set(zip(train.tasks, train.criteria, strict=True)))
    rng = torch.Generator().manual_seed(workers.seed(seed))
    head = (torch.randn(len(keys), judge.shape.text_hidden, generator=rng) / judge.shape.text_hidden**0.5)
    head = workers.from_main(head)  # one head for all: each process's generator drew its own
    if ck:
        head = ck.tensors("warmup")["head"]
    head.requires_grad_(True)
    params = [*judge.model.model.visual.parameters(), head]
    opt = torch.optim.AdamW(params, lr=r.lr, fused=True)
    losses: list[float] = []
    start = 0
    if ck:
        ck.restore(opt, rng, workers, workers.seed(seed), label)
        losses, start = ck.progress["losses"], ck.step
    with Progress(transient=False, disable=not workers.main) as bar:
        task = bar.add_task(f"{label} vision warm-up", total=r.vision_warmup_steps, completed=start)
        for step in range(start, r.vision_warmup_steps):
            judge.model.train()
            win, lose = _scores(judge, head, keys, *draw_batch(train, r, rng))
            loss = F.softplus(lose - win).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            workers.average_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            bar.advance(task)
            losses.append(loss.item())
            if step % 10 == 0:
                tracking.log_metrics({"warmup_loss": loss.item()}, step=step)
            if ckpts and ckpts.due(step + 1, r.vision_warmup_steps + r.steps):
                rngs = ranks_rng(workers, rng)
                if workers.main:
                    ckpts.save(step + 1, opt, rng, folders={"judge": judge.save},
                               tensors={"warmup": {"head": head}} | rngs,
                               progress={"phase": "warmup", "losses": losses})
    metrics = {"warmup.bt_loss": float(np.mean(losses[-max(1, len(losses) // 10):]))}
    if not workers.main:
        return metrics
    if held is not None:
        metrics |= vision_accuracy(judge, head.detach(), keys, *held)
    print(f"{label}: vision warm-up {r.vision_warmup_steps} steps, Bradley-Terry loss {metrics['warmup.bt_loss']:.4f}"
          + "".join(f", held-out {k.rsplit('.', 1)[1]} {v:.3f}" for k, v in metrics.items() if ".acc_kind." in k),
          flush=True)
    return metrics


def fit_judge(judge: Judge, train: Pairs, held: list[dict], held_pairs: Pairs, r: RewardConfig, seed: int,
              label: str, ckpts: Checkpoints | None = None, ck: Checkpoint | None = None,
              warmup: dict[str, float] | None = None, workers: Workers = ONE_PROCESS) -> None:
    """AdamW on both orders of random training pairs; the held-out accuracy curve every `eval_every` steps. With
    `ckpts` it saves a checkpoint (with the warm-up's metrics) every `reward.checkpoint_every` steps, counted after
    the warm-up's, and goes on from `ck`, one saved after the warm-up. With several `workers` each draws its own
    batches and their gradients are averaged; the main process alone measures the curve and checkpoints."""
    params = judge.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=r.lr, fused=True)
    rng = torch.Generator().manual_seed(workers.seed(seed))
    offset, start = r.vision_warmup_steps, 0
    if ck:
        ck.restore(opt, rng, workers, workers.seed(seed), label)
        start = ck.step - offset
    # the curve on every k-th held-out pair: all 3,600 on `tiny` are ~15 s a point (estimated from the scoring rate)
    every = max(1, -(-len(held) // r.curve_pairs))
    curve_rows = held[::every]
    curve_pairs = held_pairs[::every]
    with Progress(transient=False, disable=not workers.main) as bar:
        task = bar.add_task(label, total=r.steps, completed=start)
        for step in range(start, r.steps):
            judge.model.train()
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, r)
            loss = both_orders_loss(judge, *draw_batch(train, r, rng))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            workers.average_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            bar.advance(task)
            if step % 10 == 0:
                tracking.log_metrics({"train_loss": loss.item()}, step=step)
            if workers.main and (step + 1) % r.eval_every == 0 and step + 1 < r.steps:
                m, _ = evaluate_judge(judge, curve_rows, curve_pairs)
                tracking.log_metrics({"heldout.acc.curve": m["heldout.acc.mean"],
                                      "heldout.acc_cand.curve": m.get("heldout.acc_cand.mean", 0.0)}, step=step + 1)
                print(f"{label}: step {step + 1}/{r.steps} loss {loss.item():.4f} held-out acc "
                      f"{m['heldout.acc.mean']:.3f} of {len(curve_rows)} pairs "
                      f"(candidate pairs {m.get('heldout.acc_cand.mean', 0):.3f})",
                      flush=True)
            if ckpts and ckpts.due(offset + step + 1, offset + r.steps):
                rngs = ranks_rng(workers, rng)
                if workers.main:
                    ckpts.save(offset + step + 1, opt, rng, folders={"judge": judge.save}, tensors=rngs,
                               progress={"phase": "fit", "warmup": warmup or {}})


def new_judge(spec: JudgeSpec, cells: list[tuple[str, str]], prompts: list[str], seed: int) -> Judge:
    """A tiny judge built from config, or the pretrained checkpoint at `spec.base_uri` with a fresh adapter."""
    if spec.base_uri:
        return Judge.from_pretrained(Source(spec.base_uri, spec.lora_rank, spec.dtype), spec.side, spec.arch)
    return Judge.build(cells, prompts, JudgeShape(arch=spec.arch, image_size=spec.side), seed=seed)


def train_judge(ctx: StageContext, role: str) -> dict[str, float]:
    """Train, check and register one judge: `role` "judge" (the reward RL trains against) or "audit"."""
    s, r = ctx.settings, ctx.settings.reward
    spec = getattr(r, role)
    stage = ctx.stage
    prefs = ctx.inputs["preferences"]
    rows = prefs.read_table().to_pylist()
    if not rows:
        raise ValueError(f"preferences {prefs.uri}: no labelled pairs to learn from")
    conditions = read_conditions(ctx.inputs["conditions"], ids={x["condition_id"] for x in rows},
                                 columns=["condition_id", "prompt", "mask"])
    prompts = {c["condition_id"]: c["prompt"] for c in conditions}
    images = ImageTable.read(prefs)
    held = [x for x in rows if _heldout(x["condition_id"], r.heldout_fraction, spec.split_seed)]
    train = [x for x in rows if not _heldout(x["condition_id"], r.heldout_fraction, spec.split_seed)]
    if not held or not train:
        raise ValueError(f"{stage}: {len(train)} training and {len(held)} held-out pairs; both must be > 0")
    cells = sorted({(x["task"], x["criterion"]) for x in rows})
    ckpts = Checkpoints(ctx, r.checkpoint_every)
    ck = ckpts.resume()
    judge = Judge.load(ck.folder("judge")) if ck else new_judge(
        spec, cells, sorted(set(prompts.values())), s.seed)
    if spec.gradient_checkpointing:
        judge.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    workers = ctx.workers
    what = f"{spec.base_uri} (LoRA r={spec.lora_rank}, {spec.dtype})" if spec.base_uri else "tiny"
    if workers.main:
        print(f"{stage}: {spec.arch} {what} on {judge.device}, {len(train)} training pairs, {len(held)} held out "
              f"(split {spec.split_seed}), {len(cells)} cells, {r.vision_warmup_steps} vision warm-up steps, then "
              f"{r.steps} steps of {r.batch_size} pairs (both orders), {len(images)} images"
              f"{' read a batch at a time' if images.lazy else ''}"
              + (f" in each of {workers.world} processes" if workers.world > 1 else ""), flush=True)
    t0 = time.perf_counter()
    train_pairs, held_pairs = Pairs.of(train, images, prompts, r), Pairs.of(held, images, prompts)
    in_warmup = ck is not None and ck.progress["phase"] == "warmup"
    if ck and not in_warmup:
        warmup = ck.progress["warmup"]
    else:
        warmup = warm_up_vision(judge, train_pairs, r, s.seed, stage, (held, held_pairs), ckpts, ck, workers)
    fit_judge(judge, train_pairs, held, held_pairs, r, s.seed, stage, ckpts, None if in_warmup else ck, warmup,
              workers)
    if workers.world > 1 and len(set(workers.gather(judge.weights_digest()))) > 1:
        raise RuntimeError(f"{stage}: the data-parallel processes ended with different weights")
    metrics, p_win = evaluate_judge(judge, held, held_pairs, workers)  # scored by all: on flux ~10^4 pairs x 2
    if not workers.main:  # the main process measures, gates, writes and registers
        return {}
    metrics |= smoother_preference(held, p_win, held_pairs, {c["condition_id"]: c["mask"] for c in conditions})
    metrics["train_seconds"] = time.perf_counter() - t0
    metrics |= warmup
    print_metrics(ctx.stage, metrics)
    fig = calibration_plot(p_win)
    tracking.log_figure(fig, "calibration.png")
    check_gate(metrics, sorted(set(r.gate_tasks)), r.min_target_vs_base, r.min_base_vs_collapsed, stage)
    out = next(iter(ctx.outputs.values()))
    judge.save(out.dir / "judge")
    fig.savefig(out.dir / "calibration.png")
    out.write_json("heldout_metrics.json", metrics)
    alias = "training" if role == "judge" else "audit"
    version = register_judge(out.dir / "judge", spec.model_name, alias, judge.shape.image_size,
                             {"artifact_key": ctx.key, "arch": spec.arch, "split_seed": str(spec.split_seed)})
    out.write_json("registry.json", {"name": spec.model_name, "version": version, "alias": alias})
    prefix = "" if role == "judge" else "audit."
    return {f"{prefix}{k}": v for k, v in metrics.items()} | {"registered_version": float(version)}


def train_reward(ctx: StageContext) -> dict[str, float]:
    return train_judge(ctx, "judge")


def train_audit_reward(ctx: StageContext) -> dict[str, float]:
    return train_judge(ctx, "audit")
