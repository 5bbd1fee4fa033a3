"""label_preferences: ordered (winner, loser) pairs per condition and evaluation criterion of its task, from a
pluggable labeller, for the one reward model.

Inputs: `conditions` (synthesize_masks), `candidates` (generate_candidates).
Output: `preferences` — table `data` (schema.PREFERENCES: the pairs, naming their images by id), table `images`
(schema.PAIR_IMAGES: each image the pairs name, once, and each condition's masked input as COND-context, in small
row groups for readers that fetch a batch at a time), `report.json` (pairs and mean margin per task, criterion and
kind); with `labels.kind: import` also table `rejected` (schema.REJECTED_LABELS) and `rejected.json`, naming every
export entry that was not kept. The candidates are read a shard at a time and labelled a condition at a time;
memory holds the pairs without their images, one shard's candidates and the conditions it labels.
Config: `seed`, `labels`.
Metrics: `pairs`, `pairs.<kind>`, `pairs.<task>.<criterion>.<kind>`, `margin.<task>.<criterion>.<kind>`,
`below_margin.<kind>`, `flipped`, `conditions`, `conditions.no_target`, `rejected`, `rejected.<reason>`,
`smoother_wins.<kind>.<task>`.

Label health: `smoother_wins.<kind>.<task>` is the share of pairs whose winner has less in-mask detail than its
loser. Where candidate pairs reward the smoother image and target pairs the detailed one, the two kinds pull a
judge's use of detail in opposite directions: "detail wins", the simplest rule the easy kinds teach, ranks the
candidates the wrong way round. The stage says so (a warning, not a failure: the labels may still be right).

Labellers:
- `auto` decides from the ground truth of the procedural data: each criterion has a measure of an image
  against the condition's target, input and mask (MEASURES, lower is better). Candidate pairs whose
  measures differ by less than `labels.min_margin` (relative) are not labelled; the target beats every
  candidate it beats by that margin (target_vs_cand); degraded images (blurred, colour-washed, noisy,
  the masked input, a flat image) lose to a candidate that beats them by the margin (cand_vs_degraded).
  `labels.noise` flips that share of the candidate pairs, seeded, to imitate annotator disagreement.
- `import` reads a Label Studio export (data/labelstudio.py) at `labels.import_uri`; its pairs are
  candidate pairs, with the ground-truth margin where the condition has a target.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_dilation

from onereward import storage, tracking
from onereward.config import LabelsConfig
from onereward.data import image_table, labelstudio, procedural, schema
from onereward.data.candidates import candidates_by_condition
from onereward.models import tensors
from onereward.models.tensors import _masked_mse
from onereward.stages import StageContext
from onereward.stages.pretrain_base import read_conditions

KINDS = ("cand_vs_cand", "target_vs_cand", "cand_vs_degraded")
SHARD_ROWS = 4096
IMAGE_SHARD_ROWS = 1024  # images a shard of table `images` (flux: ~0.4 GB of 512 px PNGs, estimated)
CONFIDENCE_SCALE = 0.25  # relative margin at which a ground-truth label is trusted with p ≈ 0.82


@dataclass(frozen=True)
class Ground:
    """What the data knows about one condition, as (1, C, H, W) tensors in [-1, 1]."""

    image: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor
    ring: torch.Tensor  # the mask's inner border: where a fill meets the kept image
    colour: torch.Tensor | None  # the prompt's colour word (free-form fills), (1, 3)

    @classmethod
    def of(cls, row: dict) -> Ground:
        mask = tensors.to_tensor([row["mask"]], "L")
        m = mask[0, 0].numpy() > 0.5
        width = max(1, m.shape[0] // 16)
        ring = torch.from_numpy((binary_dilation(~m, iterations=width) & m).astype(np.float32))[None, None]
        words = row["prompt"].split()
        colour = None
        if row["task"] == "fill" and len(words) == 2 and words[1] in procedural.COLORS:
            colour = torch.tensor(procedural.COLORS[words[1]], dtype=torch.float32)[None] / 127.5 - 1
        return cls(tensors.to_tensor([row["image"]]), mask, tensors.to_tensor([row["target"]]), ring, colour)


def _in_mask_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).flatten(2).sum(2) / mask.flatten(2).sum(2).clamp_min(1)


def _colour_gap(x: torch.Tensor, g: Ground) -> torch.Tensor:
    """How much farther the in-mask mean colour is from the prompt's colour than the target's is."""
    if g.colour is None:
        return torch.zeros(x.shape[0])

    def dist(y: torch.Tensor) -> torch.Tensor:
        return (((_in_mask_mean(y, g.mask) - g.colour) / 2) ** 2).mean(1)

    return (dist(x) - dist(g.target)).clamp_min(0)


def _gradient_error(x: torch.Tensor, g: Ground) -> torch.Tensor:
    """Squared error of the luminance gradients inside the mask: edges where the target has them."""
    lum, ref, m = x.mean(1, keepdim=True), g.target.mean(1, keepdim=True), g.mask
    total = torch.zeros(x.shape[0])
    for dim in (2, 3):
        n = m.shape[dim] - 1
        region = torch.maximum(m.narrow(dim, 1, n), m.narrow(dim, 0, n))
        grad, grad_ref = lum.diff(dim=dim), ref.diff(dim=dim)
        total = total + _masked_mse(grad, grad_ref, region)
    return total


def _contrast_gap(x: torch.Tensor, g: Ground) -> torch.Tensor:
    """Squared difference of the in-mask luminance spread: flat fills and noise both miss the target's."""
    def spread(y: torch.Tensor) -> torch.Tensor:
        lum = y.mean(1, keepdim=True)
        mean = _in_mask_mean(lum, g.mask)[:, :, None, None]
        return _in_mask_mean((lum - mean) ** 2, g.mask)[:, 0].sqrt()

    return ((spread(x) - spread(g.target)) / 2) ** 2


def alignment(x: torch.Tensor, g: Ground) -> torch.Tensor:
    return _masked_mse(x, g.target, g.mask) + _colour_gap(x, g)


def consistency(x: torch.Tensor, g: Ground) -> torch.Tensor:
    return _masked_mse(x, g.target, g.ring) + _masked_mse(x, g.image, 1 - g.mask)


def structure(x: torch.Tensor, g: Ground) -> torch.Tensor:
    return _gradient_error(x, g)


def aesthetics(x: torch.Tensor, g: Ground) -> torch.Tensor:
    return (_masked_mse(x, g.target, g.mask) + consistency(x, g) + structure(x, g)) / 3 + _contrast_gap(x, g)


def removal_quality(x: torch.Tensor, g: Ground) -> torch.Tensor:
    # the removal target is the clean background: any residue of the object, or anything new, is error
    return _masked_mse(x, g.target, g.mask)


def text_correctness(x: torch.Tensor, g: Ground) -> torch.Tensor:
    return 1 - tensors.mask_correlation(x, g.mask, g.target)


# Per criterion: (images (K,3,H,W), ground) -> (K,) error against the ground truth, lower is better.
MEASURES: dict[str, Callable[[torch.Tensor, Ground], torch.Tensor]] = {
    f.__name__: f for f in (alignment, consistency, structure, aesthetics, removal_quality, text_correctness)}


def pair_pngs(rows: list[dict]) -> dict[str, bytes]:
    """image id -> PNG of every image the pairs (rows with `winner_image` and `loser_image`) name."""
    return {r[f"{side}_id"]: r[f"{side}_image"] for r in rows for side in ("winner", "loser")}


def smoother_flags(rows: list[dict], mask: bytes) -> list[bool]:
    """For the pairs of one condition (rows with their images): whether each winner has less in-mask detail than
    its loser. Each image is measured once, however many pairs it is in."""
    images = pair_pngs(rows)
    ids = list(images)
    values = tensors.detail(tensors.to_tensor([images[i] for i in ids]), tensors.to_tensor([mask], "L"))
    measured = dict(zip(ids, values.tolist(), strict=True))
    return [measured[r["winner_id"]] < measured[r["loser_id"]] for r in rows]


def smoother_shares(rows: list[dict], flags: list[bool]) -> dict[str, float]:
    """`smoother_wins.<kind>.<task>`: share of the pairs whose winner has less in-mask detail than its loser."""
    wins: dict[str, list[bool]] = defaultdict(list)
    for r, smoother in zip(rows, flags, strict=True):
        wins[f"smoother_wins.{r['kind']}.{r['task']}"].append(smoother)
    return {k: float(np.mean(v)) for k, v in sorted(wins.items())}


def smoother_wins(rows: list[dict], masks: dict[str, bytes]) -> dict[str, float]:
    """smoother_shares of rows with their images; `masks` maps condition id -> mask PNG."""
    by_cond: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_cond[r["condition_id"]].append(r)
    ordered = [r for group in by_cond.values() for r in group]
    return smoother_shares(ordered, [f for cid, group in by_cond.items() for f in smoother_flags(group, masks[cid])])


def detail_conflicts(shares: dict[str, float]) -> list[str]:
    """Tasks whose candidate pairs mostly reward the smoother image while their target pairs mostly reward
    the detailed one, worded for the stage's warning."""
    out = []
    for key, cand in shares.items():
        task = key.rsplit(".", 1)[1]
        target = shares.get(f"smoother_wins.target_vs_cand.{task}")
        if key.startswith("smoother_wins.cand_vs_cand.") and target is not None and cand > 0.5 > target:
            out.append(f"{task}: the smoother image wins {cand:.0%} of candidate pairs but {target:.0%} of "
                       "target pairs")
    return out


def relative_margin(winner: float, loser: float) -> float:
    return (loser - winner) / loser if loser > 1e-8 else 0.0


def confidence(rel: float, noise: float = 0.0) -> float:
    """Probability that a label is right: 0.5 at no margin, towards 1 as the margin grows, lowered by the
    chance that label noise flipped it."""
    right = 1 - 0.5 * math.exp(-rel / CONFIDENCE_SCALE)
    return (1 - noise) * right + noise * (1 - right)


def _rng(seed: int, condition_id: str, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, int(hashlib.sha1(condition_id.encode()).hexdigest()[:12], 16), stream])


def degrade(kind: str, x: torch.Tensor, g: Ground, gen: torch.Generator) -> torch.Tensor:
    """A (1,3,H,W) image the way a policy drifting off the data makes it."""
    if kind == "blur":
        k = max(3, x.shape[-1] // 8 | 1)
        for _ in range(2):
            x = F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)
        return x
    if kind == "wash":
        return ((0.3 * x + 0.7 * x.mean(1, keepdim=True)) * 0.5 + 0.4).clamp(-1, 1)
    if kind == "noise":
        return (x + 0.5 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    if kind == "masked_input":
        return tensors.masked_input(g.image, g.mask)
    if kind == "flat":
        return x.mean((2, 3), keepdim=True).expand_as(x).clone()
    raise ValueError(f"unknown degradation {kind!r}")


def _degraded(cond: dict, cands: list[dict], g: Ground, lc: LabelsConfig, seed: int
              ) -> tuple[list[str], torch.Tensor | None]:
    rng = _rng(seed, cond["condition_id"], 1)
    kinds = rng.choice(lc.degradations, size=lc.degraded_per_condition, replace=False)
    ids, images = [], []
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    for kind in map(str, kinds):
        if kind == "masked_input":
            source, x = f"{cond['condition_id']}-input", g.image
        elif rng.random() < 0.5:
            source, x = f"{cond['condition_id']}-target", g.target
        else:
            c = cands[int(rng.integers(len(cands)))]
            source, x = c["candidate_id"], tensors.to_tensor([c["image"]])
        ids.append(f"{source}~{kind}")
        images.append(degrade(kind, x, g, gen))
    return ids, torch.cat(images) if images else None


def auto_pairs(cond: dict, cands: list[dict], lc: LabelsConfig, seed: int) -> tuple[list[dict], Counter[str]]:
    """The ground-truth labels of one condition with a target: rows of schema.PREFERENCES, and counts of
    pairs left out (below the margin) and flipped by label noise."""
    g = Ground.of(cond)
    cid = cond["condition_id"]
    cand_ids = [c["candidate_id"] for c in cands]
    deg_ids, deg = _degraded(cond, cands, g, lc, seed)
    pngs = {c["candidate_id"]: c["image"] for c in cands} | {f"{cid}-target": cond["target"]}
    if deg is not None:
        pngs |= dict(zip(deg_ids, tensors.to_pngs(deg), strict=True))
    cand_x = tensors.to_tensor([c["image"] for c in cands])
    pick, noise = _rng(seed, cid, 2), _rng(seed, cid, 3)
    rows: list[dict] = []
    counts: Counter[str] = Counter()

    def emit(criterion: str, kind: str, winner: str, loser: str, mw: float, ml: float, flip: bool = False) -> None:
        rel = relative_margin(mw, ml)
        if flip:
            winner, loser, mw, ml = loser, winner, ml, mw
        rows.append({"pair_id": labelstudio.pair_id(cid, criterion, winner, loser), "condition_id": cid,
                     "task": cond["task"], "criterion": criterion, "kind": kind, "winner_id": winner,
                     "loser_id": loser, "winner_image": pngs[winner], "loser_image": pngs[loser],
                     "labeller": "auto", "confidence": confidence(rel, lc.noise if kind == "cand_vs_cand" else 0),
                     "margin": ml - mw, "split": cond["split"]})

    for criterion in getattr(lc.criteria, cond["task"]):
        measure = MEASURES[criterion]
        m_c = measure(cand_x, g).tolist()
        m_t = float(measure(g.target, g)[0])
        for i in range(len(cands)):
            for j in range(i + 1, len(cands)):
                w, lo = (i, j) if m_c[i] <= m_c[j] else (j, i)
                if relative_margin(m_c[w], m_c[lo]) < lc.min_margin:
                    counts["below_margin.cand_vs_cand"] += 1
                    continue
                flip = bool(noise.random() < lc.noise)
                counts["flipped"] += flip
                emit(criterion, "cand_vs_cand", cand_ids[w], cand_ids[lo], m_c[w], m_c[lo], flip)
            if relative_margin(m_t, m_c[i]) >= lc.min_margin:
                emit(criterion, "target_vs_cand", f"{cid}-target", cand_ids[i], m_t, m_c[i])
            else:
                counts["below_margin.target_vs_cand"] += 1
        if deg is None:
            continue
        for d, m_d in zip(deg_ids, measure(deg, g).tolist(), strict=True):
            winners = [i for i in range(len(cands)) if relative_margin(m_c[i], m_d) >= lc.min_margin]
            if not winners:
                counts["below_margin.cand_vs_degraded"] += 1
                continue
            i = winners[int(pick.integers(len(winners)))]
            emit(criterion, "cand_vs_degraded", cand_ids[i], d, m_c[i], m_d)
    return rows, counts


def imported_pairs(judged: list[labelstudio.Judgement], cond: dict, cands: list[dict]) -> list[dict]:
    """Rows of schema.PREFERENCES (with their images) of one condition's imported labels (`parse_export`), with
    the ground-truth margin where the condition has a target."""
    pngs = {x["candidate_id"]: x["image"] for x in cands}
    g = Ground.of(cond) if cond["target"] is not None else None
    rows = []
    for j in judged:
        margin = float("nan")
        if g is not None:
            m = MEASURES[j.criterion](tensors.to_tensor([pngs[j.winner_id], pngs[j.loser_id]]), g).tolist()
            margin = m[1] - m[0]
        rows.append({"pair_id": j.pair_id, "condition_id": j.condition_id, "task": cond["task"],
                     "criterion": j.criterion, "kind": "cand_vs_cand", "winner_id": j.winner_id,
                     "loser_id": j.loser_id, "winner_image": pngs[j.winner_id], "loser_image": pngs[j.loser_id],
                     "labeller": "import", "confidence": j.confidence, "margin": margin, "split": cond["split"]})
    return rows


def report(rows: list[dict], counts: Counter[str]) -> dict:
    """Pairs and mean margin per task, criterion and kind, and the counts of what was left out."""
    groups: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["criterion"], r["kind"])].append(r["margin"])
    pairs: dict[str, dict[str, dict[str, int]]] = {}
    margins: dict[str, dict[str, dict[str, float | None]]] = {}
    for (task, criterion, kind), ms in sorted(groups.items()):
        pairs.setdefault(task, {}).setdefault(criterion, {})[kind] = len(ms)
        finite = [m for m in ms if math.isfinite(m)]
        margins.setdefault(task, {}).setdefault(criterion, {})[kind] = float(np.mean(finite)) if finite else None
    return {"pairs": len(rows), "by_kind": dict(Counter(r["kind"] for r in rows)), "pairs_by_cell": pairs,
            "mean_margin": margins, **dict(sorted(counts.items()))}


class Labelled:
    """The pairs made so far, without their images, and their images written to table `images` of `out` in shards
    of IMAGE_SHARD_ROWS as conditions are added."""

    def __init__(self, out):
        self.out = out
        self.rows: dict[str, list[dict]] = {}
        self.flags: dict[str, list[bool]] = {}
        self.pending: list[dict] = []

    def add(self, cond: dict, made: list[dict]) -> None:
        """The pairs of one condition, rows with their images (`auto_pairs`, `imported_pairs`)."""
        if not made:
            return
        cid = cond["condition_id"]
        self.flags[cid] = smoother_flags(made, cond["mask"])
        # what the judge is shown of the condition beside the two images, as annotators are shown it
        pngs = {f"{cid}-context": labelstudio.masked_input_png(cond["image"], cond["mask"])} | pair_pngs(made)
        self.pending += [{"image_id": i, "condition_id": cid, "image": png} for i, png in pngs.items()]
        self.rows[cid] = [{k: v for k, v in r.items() if k not in ("winner_image", "loser_image")} for r in made]
        if len(self.pending) >= IMAGE_SHARD_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.out.write_table(schema.table(self.pending, schema.PAIR_IMAGES), "images",
                                 row_group_rows=image_table.GROUP_ROWS)
            self.pending = []

    def ordered(self) -> tuple[list[dict], list[bool]]:
        """All pairs, by condition id, and their smoother_flags."""
        cids = sorted(self.rows)
        return [r for c in cids for r in self.rows[c]], [f for c in cids for f in self.flags[c]]


def label_preferences(ctx: StageContext) -> dict[str, float]:
    s = ctx.settings
    lc: LabelsConfig = s.labels
    cond_art, cand_art = ctx.inputs["conditions"], ctx.inputs["candidates"]
    schema.check_columns(cand_art.table_schema(), schema.CANDIDATES, f"candidates artifact {cand_art.uri}")
    schema.check_columns(cond_art.table_schema(), schema.CONDITIONS, f"conditions artifact {cond_art.uri}")
    light = cand_art.read_table(columns=["candidate_id", "condition_id"]).to_pylist()
    per_condition = Counter(c["condition_id"] for c in light)
    known = {c["condition_id"]: (c["task"], set()) for c in read_conditions(cond_art, columns=["condition_id", "task"])}
    for c in sorted(light, key=lambda c: c["candidate_id"]):
        if c["condition_id"] not in known:
            raise ValueError(f"candidate {c['candidate_id']!r} names condition {c['condition_id']!r}, "
                             f"which the conditions artifact {cond_art.uri} does not hold")
        known[c["condition_id"]][1].add(c["candidate_id"])

    out = ctx.outputs["preferences"]
    counts: Counter[str] = Counter({"conditions": len(per_condition)})
    labelled = Labelled(out)
    if lc.kind == "auto":
        conds = {r["condition_id"]: r for r in read_conditions(cond_art, ids=per_condition)}
        for cid, cands in candidates_by_condition(cand_art, per_condition):
            if conds[cid]["target"] is None:
                counts["conditions.no_target"] += 1
                continue
            made, c = auto_pairs(conds[cid], cands, lc, s.seed)
            labelled.add(conds[cid], made)
            counts.update(c)
    else:
        try:
            export = json.loads(storage.read_bytes(lc.import_uri))
        except json.JSONDecodeError as e:
            raise ValueError(f"labels.import_uri {lc.import_uri}: not a JSON file: {e}") from None
        judged, rejected = labelstudio.parse_export(export, known, lc.criteria.model_dump())
        by_cond: dict[str, list[labelstudio.Judgement]] = defaultdict(list)
        for j in judged:
            by_cond[j.condition_id].append(j)
        conds = {r["condition_id"]: r for r in read_conditions(cond_art, ids=by_cond)}
        for cid, cands in candidates_by_condition(cand_art, per_condition):
            if cid in by_cond:
                labelled.add(conds[cid], imported_pairs(by_cond[cid], conds[cid], cands))
        bad = [{"entry": r.entry, "pair_id": r.pair_id, "reason": r.reason, "detail": r.detail} for r in rejected]
        out.write_table(schema.table(bad, schema.REJECTED_LABELS), "rejected")
        out.write_json("rejected.json", bad)
        counts["rejected"] = len(bad)
        counts.update(f"rejected.{r.reason}" for r in rejected)
    labelled.flush()
    rows, flags = labelled.ordered()
    if not rows:
        raise ValueError(f"label_preferences ({lc.kind}) made no pairs: {dict(counts)}")
    for i in range(0, len(rows), SHARD_ROWS):
        out.write_table(schema.table(rows[i : i + SHARD_ROWS], schema.PREFERENCES))
    health = smoother_shares(rows, flags)
    for conflict in detail_conflicts(health):
        print(f"label_preferences: warning: {conflict}; the two kinds pull a judge's use of detail "
              "in opposite directions (metrics smoother_wins.*)", flush=True)
    rep = report(rows, counts) | {"smoother_wins": health}
    out.write_json("report.json", rep)
    tracking.log_dict(rep, "preferences_report.json")
    metrics: dict[str, float] = {"pairs": len(rows), **{f"pairs.{k}": n for k, n in rep["by_kind"].items()},
                                 **{k: float(v) for k, v in counts.items()}, **health}
    for task, crits in rep["pairs_by_cell"].items():
        for criterion, kinds in crits.items():
            for kind, n in kinds.items():
                metrics[f"pairs.{task}.{criterion}.{kind}"] = n
                margin = rep["mean_margin"][task][criterion][kind]
                if margin is not None:
                    metrics[f"margin.{task}.{criterion}.{kind}"] = margin
    return metrics
