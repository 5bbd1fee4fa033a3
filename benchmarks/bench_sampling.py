"""Sampling throughput of the tiny base generator at 1, 4, 8, 28 steps, with and without true CFG, as
ratios to the 28-step CFG case (the teacher cost the distillation stage will cut), and the sampler's bf16
autocast (`MaskedFlowGenerator.sample_autocast`, "auto") against fp32 at each setting, measured in the same run.

    .venv/bin/python benchmarks/bench_sampling.py [--model PATH/TO/base_model/model] [--batch 32]
Without --model it times a freshly built model of the tiny profile's shape (same cost, random weights).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="a saved generator folder (base_model artifact's model/)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from onereward.config import load_config
    from onereward.models.generator import load_generator
    from onereward.models.tiny_unet import TinyUNetGenerator

    s = load_config("tiny")
    gen = load_generator(args.model) if args.model else TinyUNetGenerator.build(
        s.generator, ["fill red circle", "extend", "remove blue square", 'text "A7"'], s.image_size)
    x = torch.rand(args.batch, 3, s.image_size, s.image_size) * 2 - 1
    m = torch.zeros(args.batch, 1, s.image_size, s.image_size)
    m[:, :, : s.image_size // 2] = 1
    prompts = ["fill red circle"] * args.batch
    gen.sample(x[:2], m[:2], prompts[:2], steps=1)  # warm-up
    rates = {}
    for precision in ("auto", "fp32"):
        gen.sample_autocast = precision
        for steps in (1, 4, 8, 28):
            for cfg in (1.0, 3.5):
                best = float("inf")
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    gen.sample(x, m, prompts, steps=steps, guidance=cfg, seed=0)
                    best = min(best, time.perf_counter() - t)
                rates[(precision, steps, cfg)] = args.batch / best
    ref = rates[("auto", 28, 3.5)]
    print(f"threads={torch.get_num_threads()} batch={args.batch} image={s.image_size}px "
          f"(sample_autocast auto = bf16 here: {torch.cpu._is_avx512_bf16_supported()})")
    print(f"{'steps':>5} {'true CFG':>8} {'images/s':>10} {'x vs 28-step CFG':>17} {'fp32 images/s':>14} "
          f"{'auto vs fp32':>13}")
    for steps in (1, 4, 8, 28):
        for cfg in (1.0, 3.5):
            r, r32 = rates[("auto", steps, cfg)], rates[("fp32", steps, cfg)]
            print(f"{steps:>5} {'yes' if cfg != 1.0 else 'no':>8} {r:>10.1f} {r / ref:>17.1f} {r32:>14.1f} "
                  f"{r / r32:>12.2f}x")


if __name__ == "__main__":
    main()
