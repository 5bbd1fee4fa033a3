"""synthesize_masks: per curated image, (image, mask, prompt, task, target) rows for the four tasks."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from rich.progress import track
from scipy.ndimage import binary_dilation

from onereward import tracking
from onereward.config import TASKS, MaskConfig, Settings
from onereward.data import procedural, schema, validation
from onereward.data.images import from_png, to_png, try_from_png
from onereward.stages import StageContext
from onereward.stages.curate import validate_curated

# mask, prompt, target (pixels to encode, or PNG bytes the input row already holds), params
Condition = tuple[np.ndarray, str, np.ndarray | bytes | None, dict]
ATTEMPTS = 8


def _in_range(mask: np.ndarray, rng_: tuple[float, float]) -> bool:
    return rng_[0] <= float(mask.mean()) <= rng_[1]


def _brush(rng: np.random.Generator, size: int) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(canvas)
    pts = [tuple(rng.uniform(0.15, 0.85, 2) * size)]
    for _ in range(int(rng.integers(2, 5))):
        pts.append(tuple(np.clip(np.array(pts[-1]) + rng.normal(0, 0.25, 2) * size, 0, size - 1)))
    d.line(pts, fill=255, width=max(2, int(rng.uniform(0.12, 0.25) * size)), joint="curve")
    return np.asarray(canvas) > 127


def _box(rng: np.random.Generator, size: int, lo: float, hi: float) -> tuple[int, int, int, int]:
    w = int(rng.uniform(lo, hi) * size)
    h = int(rng.uniform(lo, hi) * size)
    x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
    return x, y, x + w, y + h


def _box_mask(size: int, box: tuple[int, int, int, int]) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[box[1] : box[3], box[0] : box[2]] = True
    return m


def fill(rng, img, row, cfg: MaskConfig) -> Condition | None:
    size = img.shape[0]
    obj = from_png(row["object_mask"], "L") > 127 if row["object_mask"] else None
    for _ in range(ATTEMPTS):
        if obj is not None and rng.random() < 0.7:
            ys, xs = np.nonzero(obj)
            pad = int(rng.integers(0, 3))
            box = (max(xs.min() - pad, 0), max(ys.min() - pad, 0), min(xs.max() + 1 + pad, size),
                   min(ys.max() + 1 + pad, size))
            mask, prompt, kind = _box_mask(size, box), f"fill {row['object_label']}", "object_box"
        else:
            mask = _brush(rng, size) if rng.random() < 0.5 else _box_mask(size, _box(rng, size, 0.25, 0.6))
            prompt, kind = f"fill {procedural.color_name(img[mask])}", "free_form"
        if _in_range(mask, cfg.coverage["fill"]):
            return mask, prompt, row["image"], {"mask_kind": kind}
    return None


def extend(rng, img, row, cfg: MaskConfig) -> Condition | None:
    size = img.shape[0]
    for _ in range(ATTEMPTS):
        side = str(rng.choice(["left", "right", "top", "bottom", "all"]))
        ratio = float(rng.choice(cfg.extend_ratios))
        n = max(1, round(ratio * size / (2 if side == "all" else 1)))
        mask = np.zeros((size, size), bool)
        if side in ("left", "all"):
            mask[:, :n] = True
        if side in ("right", "all"):
            mask[:, size - n :] = True
        if side in ("top", "all"):
            mask[:n] = True
        if side in ("bottom", "all"):
            mask[size - n :] = True
        if _in_range(mask, cfg.coverage["extend"]):
            return mask, "extend", row["image"], {"side": side, "ratio": ratio}
    return None


def removal(rng, img, row, cfg: MaskConfig) -> Condition | None:
    if not row["object_mask"] or not row["background"]:
        return None
    obj = from_png(row["object_mask"], "L") > 127
    mask = binary_dilation(obj, iterations=cfg.removal_dilation) if cfg.removal_dilation else obj
    if not _in_range(mask, cfg.coverage["removal"]):
        return None
    return mask, f"remove {row['object_label']}", row["background"], {"label": row["object_label"]}


def text(rng, img, row, cfg: MaskConfig) -> Condition | None:
    size = img.shape[0]
    cjk = bool(cfg.chinese_texts) and procedural.cjk_font_path() is not None and rng.random() < 0.3
    word = str(rng.choice(cfg.chinese_texts if cjk else cfg.latin_texts))
    for _ in range(ATTEMPTS):
        w = int(rng.uniform(0.4, 0.75) * size)
        h = int(rng.uniform(0.3, 0.5) * size)
        x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        mask = _box_mask(size, (x, y, x + w, y + h))
        if _in_range(mask, cfg.coverage["text"]):
            target = procedural.render_text(img, (x, y, x + w, y + h), word, cjk)
            return mask, f'text "{word}"', target, {"text": word, "script": "chinese" if cjk else "latin",
                                                     "box": [x, y, x + w, y + h]}
    return None


MAKERS = {"fill": fill, "extend": extend, "removal": removal, "text": text}


def _split(image_id: str, heldout: float) -> str:
    u = int(hashlib.sha1(image_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "heldout" if u < heldout else "train"


def _coverage_if_it_fits(mask: np.ndarray, target: np.ndarray | bytes | None, row: dict,
                         size: tuple[int, ...]) -> float | None:
    """The mask's coverage, or None when the mask or a target other than the image is not at the image's
    (height, width) or does not decode. The stage calls it on the arrays it encodes; the conditions suite, on
    rows from elsewhere, after decoding the mask (`_measured_coverage`)."""
    if mask.shape != tuple(size):
        return None
    if isinstance(target, bytes) and target != row["image"]:
        target = try_from_png(target)
        if target is None:
            return None
    if isinstance(target, np.ndarray) and target.shape[:2] != tuple(size):
        return None
    return float(mask.mean())


def conditions_for(row: dict, img: np.ndarray, s: Settings) -> tuple[list[dict], Counter[str], list[float | None]]:
    """The conditions of one curated row whose image decodes to `img`, and each one's coverage as the conditions
    suite would measure it (`_coverage_if_it_fits`)."""
    cfg = s.masks
    rng = np.random.default_rng([s.seed, int(row["image_id"][:12], 16)])
    tasks = [t for t in TASKS if cfg.task_mix.get(t, 0) > 0]
    weights = np.array([cfg.task_mix[t] for t in tasks], dtype=float)
    split = _split(row["image_id"], cfg.heldout_fraction)
    rows, skipped, measured = [], Counter(), []
    used: set[str] = set()
    for k in range(cfg.conditions_per_image):
        # One removal per image: its mask and target are fixed by the scene, a second would repeat it.
        eligible = [i for i, t in enumerate(tasks)
                    if t != "removal" or (row["object_mask"] and "removal" not in used)]
        p = weights[eligible] / weights[eligible].sum()
        task = tasks[int(rng.choice(eligible, p=p))]
        used.add(task)
        made = MAKERS[task](rng, img, row, cfg)
        if made is None:
            skipped[f"{task}_coverage_out_of_range"] += 1
            continue
        mask, prompt, target, params = made
        measured.append(_coverage_if_it_fits(mask, target, row, img.shape[:2]))
        rows.append({
            "condition_id": f"{row['image_id']}-{k}", "image_id": row["image_id"], "task": task,
            "image": row["image"], "mask": to_png(mask.astype(np.uint8) * 255), "prompt": prompt,
            "target": to_png(target) if isinstance(target, np.ndarray) else target,
            "mask_coverage": float(mask.mean()), "split": split, "params": json.dumps(params),
        })
    return rows, skipped, measured


def synthesize_masks(ctx: StageContext) -> dict[str, float]:
    s = ctx.settings
    curated = ctx.inputs["curated"].read_table()
    schema.check_columns(curated, schema.CURATED, f"curated artifact {ctx.inputs['curated'].uri}")
    curated_rows = curated.to_pylist()
    rows, skipped, decodable, measured = [], Counter(), [], []
    for r in track(curated_rows, description="synthesize_masks"):
        img = try_from_png(r["image"])
        decodable.append(img is not None)
        if img is None or not r["image_id"]:
            continue  # the curated suite below refuses the input
        made, sk, cov = conditions_for(r, img, s)
        rows.extend(made)
        skipped.update(sk)
        measured.extend(cov)
    # The input boundary, checked on the one decode the rows were made from; nothing is written before it.
    validate_curated(curated_rows, s, decodable)
    # measured on the arrays the PNGs were just encoded from (lossless): no decode of each mask again
    validate_conditions(rows, s, expected_mix(curated_rows, s), measured)
    for i in range(0, len(rows), s.curate.shard_rows):
        ctx.outputs["conditions"].write_table(schema.table(rows[i : i + s.curate.shard_rows], schema.CONDITIONS))
    counts = Counter((r["task"], r["split"]) for r in rows)
    report = {"conditions": len(rows), "skipped": dict(skipped),
              "by_task_split": {f"{t}/{sp}": n for (t, sp), n in sorted(counts.items())}}
    ctx.outputs["conditions"].write_json("report.json", report)
    tracking.log_dict(report, "conditions_report.json")
    return {"conditions": len(rows), **{f"conditions.{k.replace('/', '.')}": v
                                        for k, v in report["by_task_split"].items()},
            **{f"skipped.{k}": v for k, v in skipped.items()}}


def environment_fingerprint(s: Settings) -> dict[str, str | None]:
    """Fonts on this machine change the text rows (Chinese rows exist only with a CJK font)."""
    return {"cjk_font": procedural.asset_fingerprint(procedural.cjk_font_path()),
            "latin_font": procedural.asset_fingerprint(str(procedural.LATIN_FONT), procedural.LATIN_FONT.parent)}


def expected_mix(curated_rows: list[dict], s: Settings) -> dict[str, float]:
    """The task shares the configured mix gives on these images: removal needs an exact object mask, so
    on images without one the other tasks share its weight."""
    mix = {t: w for t, w in s.masks.task_mix.items() if w > 0}
    totals = dict.fromkeys(mix, 0.0)
    for r in curated_rows:
        eligible = {t: w for t, w in mix.items() if t != "removal" or r["object_mask"]}
        norm = sum(eligible.values())
        for t, w in eligible.items():
            totals[t] += w / norm
    return {t: v / max(len(curated_rows), 1) for t, v in totals.items()}


def validate_conditions(rows: list[dict], s: Settings, mix: dict[str, float] | None = None,
                        measured: list[float | None] | None = None) -> None:
    """The conditions suite and the task mix on `rows`; `measured` (each mask's coverage, None where it does
    not decode) spares decoding masks a caller has just encoded."""
    cfg = s.masks
    df = pd.DataFrame([{k: v for k, v in r.items() if k not in ("image", "mask", "target")} for r in rows])
    if df.empty:
        df = pd.DataFrame(columns=[f.name for f in schema.CONDITIONS])
    df["image"] = [r["image"] for r in rows]
    df["mask"] = [r["mask"] for r in rows]
    if measured is None:
        measured = [_measured_coverage(r) for r in rows]
    df["decodable"] = [m is not None for m in measured]
    df["measured_coverage"] = [m if m is not None else -1.0 for m in measured]
    df["coverage_as_declared"] = [m is not None and abs(m - float(r["mask_coverage"])) < 1e-4
                                  for m, r in zip(measured, rows, strict=True)]
    ranges = [cfg.coverage.get(r["task"], (0.0, 1.0)) for r in rows]  # an unknown task fails on its own
    df["coverage_low"] = [lo for lo, _ in ranges]
    df["coverage_high"] = [hi for _, hi in ranges]
    tasks = [t for t in TASKS if cfg.task_mix.get(t, 0) > 0]
    validation.validate("conditions", df, validation.conditions_suite(tasks), "condition_id")
    target = mix or {t: cfg.task_mix[t] for t in tasks}
    shares = validation.task_mix_frame(df["task"], target, cfg.mix_tolerance)
    validation.validate("task_mix", shares, validation.TASK_MIX_SUITE, "task")


def _measured_coverage(r: dict) -> float | None:
    """`_coverage_if_it_fits` on a row's decoded mask at the size of its image (the image itself passed the
    curated suite); None where anything does not decode."""
    try:
        size = Image.open(io.BytesIO(r["image"])).size[::-1]
        return _coverage_if_it_fits(from_png(r["mask"], "L") > 127, r["target"], r, size)
    except Exception:
        return None
