"""The RL step split into its parts: reference sampling, policy rollout (denoise, then one jump with gradients),
reward scoring (the judge in both orders, plus the supervised anchor) and backward + optimizer step, as
fractions of the step, with the frozen-base reference and with the EMA reference, measured in one run.

The tiny generator and judge at their tiny-profile shapes, untrained (the cost of a pass does not depend on the
weights), on random 32x32 conditions; the step is `stages.rl_finetune.rl_step`, as the stage runs it.

    .venv/bin/python benchmarks/bench_rl.py [--steps 10] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

PROMPTS = {"fill": "fill red", "extend": "extend", "removal": "remove circle", "text": 'text "A7"'}


def setup(batch: int, reference: str):
    from onereward.config import TASKS, load_config
    from onereward.models.judge import Judge, JudgeShape
    from onereward.models.tiny_unet import TinyUNetGenerator
    from onereward.stages.rl_finetune import Conditions, WeightsView, trainable_state

    s = load_config("tiny", [f"rl.batch_size={batch}", f"rl.reference={reference}"])
    criteria = {t: list(getattr(s.labels.criteria, t)) for t in TASKS}
    policy = TinyUNetGenerator.build(s.generator, [*PROMPTS.values(), ""], s.image_size, s.seed)
    # as the stage: the reference is the policy's network with the base's weights swapped in (ema: their EMA)
    state = trainable_state(policy)
    ref = WeightsView(policy, state)
    judge = Judge.build([(t, c) for t in TASKS for c in criteria[t]], list(PROMPTS.values()), JudgeShape())
    judge.model.eval().requires_grad_(False)
    n, size = 64, s.image_size
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    masks = (torch.rand(n, 1, size, size, generator=g) > 0.6).float()
    tasks = [TASKS[i % 4] for i in range(n)]
    batch_ = {"images": images, "masks": masks, "targets": torch.rand(n, 3, size, size, generator=g) * 2 - 1,
              "prompts": [PROMPTS[t] for t in tasks], "tasks": tasks}
    train = Conditions([{}] * n, batch_, images * (1 - masks), {t: [i for i in range(n) if tasks[i] == t]
                                                                for t in TASKS})
    opt = torch.optim.AdamW(list(policy.parameters()), lr=s.rl.lr, weight_decay=0.0, fused=True)
    return s, policy, ref, state, judge, opt, train, criteria


def run(batch: int, steps: int, reference: str) -> tuple[dict[str, float], float]:
    from onereward.stages.rl_finetune import ema_update, rl_step

    s, policy, ref, state, judge, opt, train, criteria = setup(batch, reference)
    rng = torch.Generator().manual_seed(0)
    phases: dict[str, float] = {}
    for step in range(steps + 2):
        if step == 2:  # the first two steps warm up allocators and kernels
            phases.clear()
            start = time.perf_counter()
        rl_step(policy, ref, judge, opt, train, s.rl, criteria, rng, 0, step, phases)
        if reference == "ema":
            t0 = time.perf_counter()
            ema_update(state, policy, s.rl.ema_decay)
            phases["ema update"] = phases.get("ema update", 0.0) + time.perf_counter() - t0
    return phases, (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--one", choices=["base", "ema"], help=argparse.SUPPRESS)  # a child process measures one mode
    args = ap.parse_args()
    if args.one:
        phases, seconds = run(args.batch, args.steps, args.one)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"phases": phases, "seconds": seconds, "peak_mib": peak}))
        return
    print(f"RL step, batch {args.batch}, {torch.get_num_threads()} threads, tiny generator and judge "
          "(each reference mode in its own process, for its own peak memory)")
    per_step = {}
    for reference in ("base", "ema"):
        out = subprocess.run([sys.executable, __file__, "--one", reference, "--steps", str(args.steps),
                              "--batch", str(args.batch)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        per_step[reference] = r["seconds"]
        total = sum(r["phases"].values())
        split = ", ".join(f"{k} {v / total:.0%}" for k, v in r["phases"].items())
        print(f"  reference={reference}: {r['seconds'] * 1000:.0f} ms a step ({split}); peak resident memory "
              f"{r['peak_mib']:.0f} MiB")
    print(f"EMA / base step time ratio: {per_step['ema'] / per_step['base']:.2f}")


if __name__ == "__main__":
    main()
