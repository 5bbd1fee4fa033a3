"""Training efficiency: FLOPs per step of each training loop (counted with FlopCounterMode), the FLOP/s it
achieves, and the ratio to a 1024x1024 matmul measured in the same run with the same threads and dtype.

Loops measured: pretrain_base (the tiny UNet generator's step, as `stages.pretrain_base.train_step` runs
it), with bf16 autocast off and on, and as `--processes` data-parallel processes that share each batch (what
`resources.cpu_processes` starts: the threads shared out, gloo between them), its step time against one
process's; train_reward (one pairwise step of the tiny judge: both orders, backward, AdamW, as
`stages.train_reward.fit_judge` runs it); rl_finetune (one `stages.rl_finetune.rl_step`, as in
benchmarks/bench_rl.py); distill (one `stages.distill.distill_step` of the student on teacher states, bf16
autocast where the stage's default "auto" turns it on).

    .venv/bin/python benchmarks/bench_train.py [--steps 12] [--batch 32] [--processes 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from onereward.machine import cpu_model


def matmul_flops_per_s(dtype: torch.dtype, n: int = 1024, seconds: float = 2.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


def pretrain_loop(batch: int, autocast: str, workers=None):
    """A step function of the pretrain loop on synthetic rows (the cost does not depend on the pixels); as one of
    several data-parallel `workers` (onereward.distributed.Workers) when given."""
    from onereward.config import load_config
    from onereward.distributed import ONE_PROCESS
    from onereward.models.tiny_unet import TinyUNetGenerator
    from onereward.stages.pretrain_base import train_step

    s = load_config("tiny", [f"pretrain.batch_size={batch}", f"pretrain.autocast={autocast}"])
    prompts = ["fill red circle", "extend", "remove blue square", 'text "A7"']
    gen = TinyUNetGenerator.build(s.generator, [*prompts, ""], s.image_size, s.seed)
    opt = torch.optim.AdamW(list(gen.parameters()), lr=s.pretrain.lr, fused=True)
    n, size = 64, s.image_size
    g = torch.Generator().manual_seed(0)
    data = {"images": torch.rand(n, 3, size, size, generator=g) * 2 - 1,
            "targets": torch.rand(n, 3, size, size, generator=g) * 2 - 1,
            "masks": (torch.rand(n, 1, size, size, generator=g) > 0.6).float(),
            "prompts": [prompts[i % 4] for i in range(n)]}
    gen.train(True)
    return lambda: train_step(gen, opt, data, g, s.pretrain, workers or ONE_PROCESS)


def _pretrain_process(rank: int, world: int, threads: int, batch: int, autocast: str, steps: int, out) -> None:
    import torch.distributed as dist

    from onereward.distributed import Workers

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    step = pretrain_loop(batch, autocast, Workers(rank, world))
    for _ in range(2):
        step()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if rank == 0:
        out.put((time.perf_counter() - start) / steps)
    dist.destroy_process_group()


def data_parallel_seconds(processes: int, batch: int, autocast: str, steps: int) -> float:
    """Seconds a pretrain step as `processes` processes sharing each batch, the threads shared out between them."""
    import os

    import torch.multiprocessing as mp

    from onereward.runner import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    threads = max(1, torch.get_num_threads() // processes)
    mp.start_processes(_pretrain_process, (processes, threads, batch, autocast, steps, out), nprocs=processes,
                       start_method="spawn")
    return out.get()


def judge_loop(batch: int):
    """A pairwise step of the judge on random pairs (the cost does not depend on the pixels)."""
    from onereward.models.judge import Judge, JudgeShape, Query
    from onereward.stages.train_reward import both_orders_loss

    cells = [("fill", "alignment"), ("extend", "consistency"), ("removal", "removal_quality"),
             ("text", "text_correctness")]
    prompts = ["fill red circle", "extend", "remove blue square", 'text "A7"']
    judge = Judge.build(cells, prompts, JudgeShape())
    judge.model.train()
    opt = torch.optim.AdamW(judge.trainable_parameters(), lr=1e-3, fused=True)
    g = torch.Generator().manual_seed(0)
    a, b, context = (torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1 for _ in range(3))
    q = Query([cells[i % 4][0] for i in range(batch)], [cells[i % 4][1] for i in range(batch)],
              [prompts[i % 4] for i in range(batch)], context)

    def step():
        loss = both_orders_loss(judge, a, b, q)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def rl_loop(batch: int):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_rl import setup

    from onereward.stages.rl_finetune import rl_step

    s, policy, ref, _, judge, opt, train, criteria = setup(batch, "base")
    rng = torch.Generator().manual_seed(0)
    counter = iter(range(10**9))
    return lambda: rl_step(policy, ref, judge, opt, train, s.rl, criteria, rng, 0, next(counter))


def distill_loop(batch: int):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_rl import setup

    from onereward.stages.distill import distill_step

    s, policy, _, _, _, _, train, _ = setup(batch, "base")
    dc = s.distill.model_copy(update={"batch_size": batch})
    n, finest = len(train.rows), max(dc.grids)
    states = torch.randn(finest + 1, n, *policy.model_space_shape(1)[1:])  # the cost does not depend on them
    opt = torch.optim.AdamW(list(policy.parameters()), lr=dc.lr, weight_decay=0.0, fused=True)
    rng = torch.Generator().manual_seed(0)
    policy.train(True)
    return lambda: distill_step(policy, opt, train, states, dc, rng)


def measure(step, steps: int) -> tuple[float, float]:
    """(FLOPs of one step, seconds a step)."""
    for _ in range(2):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return float(counter.get_total_flops()), (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--bf16", action="store_true", help="measure the bf16 pretrain loop without AVX-512 BF16 too")
    ap.add_argument("--processes", type=int, default=2, help="data-parallel pretrain processes (1: not measured)")
    args = ap.parse_args()
    has_bf16 = torch.cpu._is_avx512_bf16_supported()
    print(f"CPU: {cpu_model()}; threads: {torch.get_num_threads()}, AVX-512 BF16: {has_bf16}")
    dtypes = ("fp32", "bf16") if has_bf16 or args.bf16 else ("fp32",)
    if len(dtypes) == 1:
        # without it bf16 is emulated: a 1024^2 bf16 matmul ran at 1 GFLOP/s on an AVX2-only EPYC (fp32: 125),
        # a bf16 pretrain step took 15 s; autocast "auto" stays in fp32 on such a CPU, so that is what is measured
        print("bf16: not measured (no AVX-512 BF16 here: emulated, and autocast 'auto' stays in fp32); --bf16 forces")
    peak = {d: matmul_flops_per_s(torch.float32 if d == "fp32" else torch.bfloat16) for d in dtypes}
    for dtype, v in peak.items():
        print(f"matmul 1024^2 {dtype}: {v / 1e9:.0f} GFLOP/s")
    rows = []
    for dtype in dtypes:  # the autocast mode is named like the dtype
        flops, sec = measure(pretrain_loop(args.batch, dtype), args.steps)
        rate = flops / sec
        rows.append((dtype, sec, flops))
        print(f"pretrain_base [{dtype}] batch {args.batch}: {flops / 1e9:.1f} GFLOP/step, {sec:.3f} s/step, "
              f"{rate / 1e9:.0f} GFLOP/s = {rate / peak[dtype]:.2f}x the {dtype} matmul, "
              f"{rate / peak['fp32']:.2f}x the fp32 matmul")
    if len(rows) == 2:
        print(f"pretrain_base bf16 vs fp32 step time: {rows[0][1] / rows[1][1]:.2f}x faster")
    auto = "bf16" if has_bf16 else "fp32"  # what autocast "auto" picks here
    if args.processes > 1:
        _, one, flops = next(r for r in rows if r[0] == auto)
        sec = data_parallel_seconds(args.processes, args.batch, auto, args.steps)
        threads = max(1, torch.get_num_threads() // args.processes)
        print(f"pretrain_base [{auto}] batch {args.batch} as {args.processes} processes x {threads} thread(s), each "
              f"its slice: {sec:.3f} s/step, {flops / sec / 1e9:.0f} GFLOP/s = {flops / sec / peak['fp32']:.2f}x the "
              f"fp32 matmul; {one / sec:.2f}x the one-process step's speed ({one:.3f} s/step)")
    for name, loop, batch, dtype in (("train_reward", judge_loop, 32, "fp32"), ("rl_finetune", rl_loop, 8, "fp32"),
                                     ("distill", distill_loop, 32, auto)):
        flops, sec = measure(loop(batch), args.steps)
        rate = flops / sec
        print(f"{name} [{dtype}] batch {batch}: {flops / 1e9:.2f} GFLOP/step, {sec:.3f} s/step, "
              f"{rate / 1e9:.0f} GFLOP/s = {rate / peak[dtype]:.2f}x the {dtype} matmul")

if __name__ == "__main__":
    main()
