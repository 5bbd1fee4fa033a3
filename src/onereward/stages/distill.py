"""distill: a few-step student of the RL teacher with the teacher's true CFG folded in (one network pass a step).

Inputs: `conditions` (synthesize_masks), `policy` (rl_finetune: the teacher).
Output: `student` — the student generator (`model/`, safetensors), `distill_metrics.json`, `registry.json`;
registered as `onereward-generator@distilled-candidate` with lineage tags to the teacher's version.
Config: `seed`, `image_size`, `generator`, `distill`, `tracking`.
Metrics: `distill.loss` (curve), and on held-out conditions, for every step count k in `distill.report_steps`,
`heldout.match_mse.student_<k>` (the student's k-step sample vs the teacher's full sample from the same noise)
beside `heldout.match_mse.teacher_<k>` (the teacher itself sampled with k steps and no CFG): the distillation
worked where the student's error is below the undistilled k-step teacher's.

Reflow-style step distillation: the teacher samples train conditions once (`distill.teacher_steps` steps, CFG
`distill.teacher_guidance`), keeping its states at the times of the finest student grid. A training row draws a
grid k of `distill.grids` and one of its segments [t_a, t_b]; from the teacher's state z_a the student's one
Euler step z_b = x0 + (t_b / t_a)(z_a - x0) must land on the teacher's z_b, so its x0 target is
(z_b - r z_a) / (1 - r), r = t_b / t_a. The student starts from the teacher's weights and is sampled without CFG.
It is not told its step size, so grids that share a segment start (all start at t = 1) would ask it for two answers
to one input: the default trains the served 4 steps alone and reports the others. A checkpoint every
`distill.checkpoint_every` steps keeps the student; the teacher's states are kept beside it in parts of
`distill.teacher_batch` conditions (one sampling batch each) as they are sampled, and its held-out samples once, so
a killed run samples none of them again (`stages.parts`).

Data parallel like rl_finetune (`resources.gpus: {distill: N}`): the processes share the parts of the teacher's
states (process r samples every N-th from r) and each reads them all once all are kept; then each draws its own
training rows, the gradients are averaged before each step and the main process alone measures, checkpoints,
writes and registers.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from rich.progress import Progress

from onereward import tracking
from onereward.config import DistillConfig
from onereward.distributed import ONE_PROCESS, Workers
from onereward.models import tensors
from onereward.models.generator import MaskedFlowGenerator, autocast, load_generator
from onereward.models.registry import register_generator
from onereward.stages import StageContext, print_metrics
from onereward.stages.checkpoint import Checkpoint, Checkpoints, ranks_rng
from onereward.stages.parts import parts_left, wait_for
from onereward.stages.pretrain_base import CONDITION_KEYS, load_conditions
from onereward.stages.rl_finetune import Conditions, validation_rows


def seeds(seed: int, n: int, stream: int) -> list[int]:
    return [(seed * 7919 + stream * 1_000_003 + i) % 2**31 for i in range(n)]


def teacher_part(teacher: MaskedFlowGenerator, c: Conditions, dc: DistillConfig, seed: int, part: int
                 ) -> torch.Tensor:
    """(finest grid + 1, rows, *model space): the teacher's states at the finest student grid's times, for part
    `part` of the conditions (`distill.teacher_batch` rows a part, sampled as one batch), each row from its own
    noise."""
    b, lo = c.batch, part * dc.teacher_batch
    rows = slice(lo, min(lo + dc.teacher_batch, len(c.rows)))
    return torch.stack(teacher.trajectory(b["images"][rows], b["masks"][rows], b["prompts"][rows],
                                          steps=dc.teacher_steps, every=dc.teacher_steps // max(dc.grids),
                                          guidance=dc.teacher_guidance, seed=seeds(seed, len(c.rows), 0)[rows]))


def segment_targets(states: torch.Tensor, idx: torch.Tensor, grid: int, seg: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rows `idx` and segment `seg` of a `grid`-step schedule: the teacher's state at the segment's start,
    its time t_a, and the x0 that carries one Euler step from there onto the teacher's state at its end."""
    finest = states.shape[0] - 1
    stride = finest // grid
    a, b_ = seg * stride, (seg + 1) * stride
    z_a, z_b = states[a, idx], states[b_, idx]
    t_a, t_b = 1 - a.float() / finest, 1 - b_.float() / finest
    r = (t_b / t_a).view(-1, *([1] * (z_a.dim() - 1))).to(z_a.device, z_a.dtype)
    return z_a, t_a, (z_b - r * z_a) / (1 - r)


def match_mse(gen: MaskedFlowGenerator, c: Conditions, reference: torch.Tensor, steps: int, guidance: float,
              seed: int) -> float:
    b = c.batch
    out = gen.sample(b["images"], b["masks"], b["prompts"], steps=steps, guidance=guidance,
                     seed=seeds(seed, len(c.rows), 1))
    return float(((out - reference) / 2).pow(2).mean())


def distill_step(student: MaskedFlowGenerator, opt, c: Conditions, states: torch.Tensor, dc: DistillConfig,
                 rng: torch.Generator, workers: Workers = ONE_PROCESS) -> float:
    """One optimizer step on a batch of (condition, grid, segment) rows; returns the loss."""
    b = c.batch
    grid = dc.grids[int(torch.randint(len(dc.grids), (1,), generator=rng))]
    idx = torch.randint(len(c.rows), (dc.batch_size,), generator=rng)
    seg = torch.randint(grid, (dc.batch_size,), generator=rng)
    z_a, t_a, x0 = segment_targets(states, idx, grid, seg)
    images, masks = student._place(b["images"][idx], b["masks"][idx])
    with autocast(dc.autocast, student.device):
        pred = student.predict_x0(z_a.to(student.device, student.dtype), t_a.to(student.device, student.dtype),
                                  student.condition(images, masks),
                                  student.encode_text([b["prompts"][i] for i in idx.tolist()]))
    err = (pred.float() - x0.to(pred.device).float()) ** 2
    weights = student.region_weights(masks, dc.mask_loss_weight)
    loss = err.mean() if weights is None else (weights * err).sum() / (weights.sum() * err.shape[1])
    if dc.background_weight > 0:  # outside the mask the answer is the input itself, whatever the teacher drew
        keep = (1 - masks).float()
        bg = tensors._masked_mse(student.to_pixels(pred).float(), images.float(), keep).mean()
        loss = loss + dc.background_weight * bg
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = list(student.parameters())
    workers.average_gradients(params)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return float(loss.detach())


def train_student(student: MaskedFlowGenerator, c: Conditions, states: torch.Tensor, dc: DistillConfig,
                  seed: int, ckpts: Checkpoints | None = None, ck: Checkpoint | None = None,
                  workers: Workers = ONE_PROCESS) -> list[float]:
    """The student's loop; returns the (main process's) loss every 10 steps. With `ckpts` it saves the student
    every `distill.checkpoint_every` steps, and goes on from `ck`. With several `workers` each draws its own rows
    and their gradients are averaged; the main process alone checkpoints."""
    opt = torch.optim.AdamW(list(student.parameters()), lr=dc.lr, weight_decay=0.0, fused=True)
    rng = torch.Generator().manual_seed(workers.seed(seed))
    losses: list[float] = []
    window: list[float] = []
    start = 0
    if ck:
        ck.restore(opt, rng, workers, workers.seed(seed), "distill")
        losses, window, start = ck.progress["losses"], ck.progress["window"], ck.step
    student.train(True)
    with Progress(transient=False, disable=not workers.main) as bar:
        task = bar.add_task("distill", total=dc.train_steps, completed=start)
        for step in range(start + 1, dc.train_steps + 1):
            window.append(distill_step(student, opt, c, states, dc, rng, workers))
            bar.advance(task)
            if step % 10 == 0 or step == dc.train_steps:
                losses.append(float(np.mean(window)))
                tracking.log_metrics({"distill.loss": losses[-1]}, step=step)
                if workers.main and not bar.console.is_terminal and step % 50 == 0:
                    print(f"distill: step {step}/{dc.train_steps} loss {losses[-1]:.5f}", flush=True)
                window.clear()
            if ckpts and ckpts.due(step, dc.train_steps):
                rngs = ranks_rng(workers, rng)
                if workers.main:
                    ckpts.save(step, opt, rng, folders={"student": student.save}, tensors=rngs,
                               progress={"losses": losses, "window": window})
    student.train(False)
    return losses


def teacher_samples(ckpts: Checkpoints, workers: Workers, teacher_dir, train: Conditions, held: Conditions,
                    dc: DistillConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """The teacher's states of every train condition, on every process; on the main process also its held-out
    samples (the reference the student is measured against) and its own k-step errors. The states are sampled in
    parts the processes share, each kept in the scratch as it is done, then read by all; a killed run's parts and
    reference are not sampled again."""
    names = [f"teacher-{i:05d}" for i in range(-(-len(train.rows) // dc.teacher_batch))]
    mine, _ = parts_left(ckpts, workers, names, "parts of the teacher's states")
    measured = ckpts.kept("teacher") if workers.main else None
    teacher = load_generator(teacher_dir) if mine or (workers.main and measured is None) else None
    t0 = time.perf_counter()
    for i in mine:
        ckpts.keep(names[i], {"states": teacher_part(teacher, train, dc, seed, i)}, {})
    seconds = time.perf_counter() - t0
    if mine:
        print(f"distill: process {workers.rank}: {len(mine)} of {len(names)} parts of the teacher's trajectories "
              f"({dc.teacher_steps} steps, CFG {dc.teacher_guidance}; {len(train.rows)} conditions in all) in "
              f"{seconds:.0f} s", flush=True)
    reference, metrics = None, {}
    if workers.main and measured is None:  # the held-out reference and the teacher's own k-step errors
        hb = held.batch
        reference = teacher.sample(hb["images"], hb["masks"], hb["prompts"], steps=dc.teacher_steps,
                                   guidance=dc.teacher_guidance, seed=seeds(seed, len(held.rows), 1))
        metrics = {"teacher_trajectory_seconds": seconds}
        for k in dc.report_steps:
            metrics[f"heldout.match_mse.teacher_{k}"] = match_mse(teacher, held, reference, k, 1.0, seed)
        ckpts.keep("teacher", {"reference": reference}, metrics)
    elif measured is not None:
        print(f"distill: the teacher's held-out samples of the killed run ({ckpts.scratch})", flush=True)
        reference, metrics = measured[0]["reference"], measured[1]
    del teacher
    states = [wait_for(lambda name=name: ckpts.kept(name, quiet=True), f"{name} of the teacher's states",
                       "distill")[0]["states"] for name in names]
    return torch.cat(states, dim=1), reference, metrics


def distill(ctx: StageContext) -> dict[str, float]:
    s = ctx.settings
    dc = s.distill
    if s.generator.kind == "flux_fill" and not s.generator.lora_rank:
        raise ValueError("distill: the flux profile's student is a LoRA adapter (generator.lora_rank > 0); full "
                         "fine-tuning of the 12 B transformer is not supported")
    if dc.threads:
        torch.set_num_threads(dc.threads)
    conditions = ctx.inputs["conditions"]
    ids = [r["condition_id"] for r in load_conditions(conditions, "train", columns=CONDITION_KEYS)]
    if not ids:
        raise ValueError(f"conditions {conditions.uri}: no train rows")
    pick = torch.randperm(len(ids), generator=torch.Generator().manual_seed(s.seed))[: dc.train_conditions]
    train = Conditions.of(load_conditions(conditions, "train", ids=[ids[i] for i in pick.tolist()]))
    held = Conditions.of([r for rs in validation_rows(conditions, 8).values() for r in rs])
    teacher_dir = ctx.inputs["policy"].local_dir() / "model"
    ckpts = Checkpoints(ctx, dc.checkpoint_every)
    workers = ctx.workers
    states, reference, metrics = teacher_samples(ckpts, workers, teacher_dir, train, held, dc, s.seed)

    ck = ckpts.resume()
    student = load_generator(ck.folder("student") if ck else teacher_dir)
    t0 = time.perf_counter()
    losses = train_student(student, train, states, dc, s.seed, ckpts, ck, workers)
    if workers.world > 1 and len(set(workers.gather(student.weights_digest()))) > 1:
        raise RuntimeError("distill: the data-parallel processes ended with different weights")
    if not workers.main:  # the main process measures, writes and registers
        return {}
    metrics |= {"train_seconds": time.perf_counter() - t0, "distill.loss.first": losses[0],
                "distill.loss.last": losses[-1]}
    for k in dc.report_steps:
        metrics[f"heldout.match_mse.student_{k}"] = match_mse(student, held, reference, k, 1.0, s.seed)
    print("distill: held-out error to the teacher's sample, student vs the teacher at the same steps: " + ", ".join(
        f"{k} steps {metrics[f'heldout.match_mse.student_{k}']:.4f} vs {metrics[f'heldout.match_mse.teacher_{k}']:.4f}"
        for k in dc.report_steps), flush=True)

    out = ctx.outputs["student"]
    student.save(out.dir / "model")
    out.write_json("distill_metrics.json", metrics)
    teacher_reg = ctx.inputs["policy"].read_json("registry.json")
    lineage = {"artifact_key": ctx.key, "conditions": conditions.uri, "teacher.version": str(teacher_reg["version"]),
               "teacher.name": teacher_reg["name"], "sample_steps": str(dc.steps), "guidance": "1.0",
               "teacher_steps": str(dc.teacher_steps), "teacher_guidance": str(dc.teacher_guidance)}
    version = register_generator(out.dir / "model", s.tracking.generator_model_name, "distilled-candidate",
                                 s.image_size, lineage)
    out.write_json("registry.json", {"name": s.tracking.generator_model_name, "version": version,
                                     "alias": "distilled-candidate", "sample_steps": dc.steps, "guidance": 1.0})
    print_metrics(ctx.stage, metrics)
    return metrics | {"registered_version": float(version)}
