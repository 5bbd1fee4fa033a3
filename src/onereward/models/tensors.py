"""Tensors from condition rows, images back to PNG, and the per-task metrics of mask-guided outputs."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from onereward.data.images import from_png, to_png


def to_tensor(pngs: list[bytes], mode: str = "RGB") -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] (masks: {0, 1}). Each distinct PNG is decoded once: a judge's 19k training pairs
    hold ~5k distinct images (a candidate is in many pairs): the winner and loser tensors 4.8 -> 1.2 s."""
    index: dict[bytes, int] = {}
    rows = [index.setdefault(p, len(index)) for p in pngs]
    distinct = torch.from_numpy(np.stack([from_png(p, mode) for p in index]))
    x = distinct[torch.tensor(rows)].float() / 255.0
    if mode == "L":
        return (x > 0.5).float()[:, None]
    return x.permute(0, 3, 1, 2) * 2 - 1


def to_pngs(images: torch.Tensor) -> list[bytes]:
    """(B, 3, H, W) in [-1, 1], on any device and in any float dtype (a flux sample is bf16 on the GPU)."""
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [to_png(a) for a in arr]


def batch_from_rows(rows: list[dict]) -> dict:
    return {
        "images": to_tensor([r["image"] for r in rows]),
        "masks": to_tensor([r["mask"] for r in rows], "L"),
        "targets": to_tensor([r["target"] for r in rows]) if all(r.get("target") for r in rows) else None,
        "prompts": [r["prompt"] for r in rows],
        "tasks": [r["task"] for r in rows],
    }


def _masked_mse(a: torch.Tensor, b: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Per-image MSE over `region` (B,1,H,W), in [0,1] pixel units."""
    se = (((a - b) / 2) ** 2).mean(1, keepdim=True) * region
    return se.flatten(1).sum(1) / region.flatten(1).sum(1).clamp_min(1)


def masked_ssim(a: torch.Tensor, b: torch.Tensor, region: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Per-image SSIM (uniform window, per channel, [0, 1] pixel units) averaged over `region` (B,1,H,W)."""
    x, y = (a + 1) / 2, (b + 1) / 2
    pad = window // 2

    def mean(v: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.pad(v, (pad,) * 4, mode="reflect"), window, stride=1)

    mx, my = mean(x), mean(y)
    vx, vy, cxy = mean(x * x) - mx**2, mean(y * y) - my**2, mean(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return (ssim.mean(1, keepdim=True) * region).flatten(1).sum(1) / region.flatten(1).sum(1).clamp_min(1)


def psnr(mse: float) -> float:
    return 10 * math.log10(1.0 / max(mse, 1e-10))


def mean_colour_fill(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Baseline: every masked pixel gets the mean colour of the unmasked ones."""
    keep = 1 - masks
    mean = (images * keep).flatten(2).sum(2) / keep.flatten(2).sum(2).clamp_min(1)
    return images * keep + mean[:, :, None, None] * masks


def masked_input(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Baseline: copy the model's masked input (the masked region is mid-grey, 0 in [-1, 1])."""
    return images * (1 - masks)


def detail(x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per image, inside the mask: RMS of the luminance minus its 3x3 local mean, the fine detail blur removes."""
    lum = x.mean(1, keepdim=True)
    high = lum - F.avg_pool2d(lum, 3, stride=1, padding=1, count_include_pad=False)
    return ((high**2 * masks).flatten(1).sum(1) / masks.flatten(1).sum(1).clamp_min(1)).sqrt()


def mask_correlation(outputs, masks, targets) -> torch.Tensor:
    """Per image, inside the mask: Pearson correlation of output and target luminance. It asks whether the
    structure (for text rows, the glyph strokes) is where the target has it; anything flat (mean-colour
    fill, the masked input) scores 0, however low its MSE."""
    lum = [x.mean(1, keepdim=True) for x in (outputs, targets)]
    n = masks.flatten(1).sum(1).clamp_min(1)
    centred = [(x - ((x * masks).flatten(1).sum(1) / n)[:, None, None, None]) * masks for x in lum]
    cov = (centred[0] * centred[1]).flatten(1).sum(1)
    var = [(c**2).flatten(1).sum(1) for c in centred]
    return cov / (var[0] * var[1]).sqrt().clamp_min(1e-8)


# What "better than the trivial baselines" is measured by, per task (lower is better for an error).
GATE_MEASURE = {"fill": ("mse_mask", "lower"), "extend": ("mse_mask", "lower"),
                "removal": ("mse_mask", "lower"), "text": ("mask_corr", "higher")}
BASELINES = {"meanfill": mean_colour_fill, "masked_input": masked_input}


def mask_metrics(outputs, images, masks, targets) -> dict[str, torch.Tensor]:
    """Per image: background PSNR outside the mask on the raw output; MSE and correlation with the target
    inside the mask, each also for the two trivial baselines (suffixes _meanfill, _masked_input)."""
    bg = _masked_mse(outputs, images, 1 - masks)
    out = {"bg_psnr": torch.tensor([psnr(float(v)) for v in bg])}
    for name, x in (("", outputs), *((f"_{b}", f(images, masks)) for b, f in BASELINES.items())):
        out[f"mse_mask{name}"] = _masked_mse(x, targets, masks)
        out[f"mask_corr{name}"] = mask_correlation(x, masks, targets)
    return out


def beats_baselines(task: str, metrics: dict[str, torch.Tensor]) -> bool:
    measure, better = GATE_MEASURE[task]
    own = float(metrics[measure].mean())
    base = [float(metrics[f"{measure}_{b}"].mean()) for b in BASELINES]
    return own < min(base) if better == "lower" else own > max(base)


def grid(rows_of_images: list[list[torch.Tensor]]) -> np.ndarray:
    """A contact sheet: each inner list is one row of (3,H,W) tensors in [-1, 1]."""
    rows = [torch.cat([t.detach().float().cpu() for t in r], dim=2) for r in rows_of_images]  # samples may be on a GPU
    arr = ((torch.cat(rows, dim=1).clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return np.kron(arr, np.ones((2, 2, 1), dtype=np.uint8))  # 2x upscale for viewing
