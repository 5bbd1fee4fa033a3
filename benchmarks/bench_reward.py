"""Judge throughput: pairs/s scored batched vs one pair at a time, and their ratio, in one run.

The tiny judge (models/judge.py) at its tiny-profile shape, on random 32x32 pairs with a masked input and a
prompt; the cost of a
forward pass does not depend on the weights, so an untrained judge measures the same as a trained one.

    .venv/bin/python benchmarks/bench_reward.py [--pairs 256] [--batch 64] [--arch qwen2_vl|qwen2_5_vl]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--arch", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl"])
    args = ap.parse_args()
    from onereward.models.judge import Judge, JudgeShape, Query

    cells = [("fill", "alignment"), ("extend", "consistency"), ("removal", "removal_quality"),
             ("text", "text_correctness")]
    prompts = ["fill red circle", "extend", "remove blue square", 'text "A7"']
    judge = Judge.build(cells, prompts, JudgeShape(arch=args.arch))
    judge.model.eval()
    g = torch.Generator().manual_seed(0)
    a, b, context = (torch.rand(args.pairs, 3, 32, 32, generator=g) * 2 - 1 for _ in range(3))
    q = Query([cells[i % 4][0] for i in range(args.pairs)], [cells[i % 4][1] for i in range(args.pairs)],
              [prompts[i % 4] for i in range(args.pairs)], context)
    with torch.no_grad():
        judge.p_yes(a[:2], b[:2], q[:2])  # warm-up
        start = time.perf_counter()
        for i in range(0, args.pairs, args.batch):
            sl = slice(i, i + args.batch)
            judge.p_yes(a[sl], b[sl], q[sl])
        batched = args.pairs / (time.perf_counter() - start)
        n = min(args.pairs, 64)
        start = time.perf_counter()
        for i in range(n):
            judge.p_yes(a[i : i + 1], b[i : i + 1], q[i : i + 1])
        single = n / (time.perf_counter() - start)
    params = sum(p.numel() for p in judge.trainable_parameters())
    print(f"threads {torch.get_num_threads()}; judge {params / 1e6:.2f} M params")
    print(f"batched (batch {args.batch}): {batched:.1f} pairs/s; one at a time: {single:.1f} pairs/s; "
          f"ratio {batched / single:.1f}x")


if __name__ == "__main__":
    main()
