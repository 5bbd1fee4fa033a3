"""pretrain_base: train the tiny base generator on conditions with known targets (all four tasks), check
it against trivial baselines on held-out conditions, register it as `onereward-generator@base`.

Inputs: `conditions` (synthesize_masks). Output: `base_model` — the generator (`model/`, safetensors),
`heldout_metrics.json`, `samples/` (one sample a condition), `registry.json`.
Config: `image_size`, `seed`, `generator`, `pretrain`, `tracking`.
Metrics: `train_loss`, `lr`; per task `heldout.<task>.{bg_psnr,mse_mask,mask_corr}` (a sample's, averaged over
`pretrain.gate_samples` samples) with the baselines' (`_meanfill`, `_masked_input`),
`heldout.<task>.mean_prediction.{mse_mask,mask_corr}` (the mean of those samples, what the gate reads) and
`heldout.<task>.beats_baselines`.

The flux profile trains nothing here: it registers the external base checkpoint (`generator.base_uri`).
Training resumes from the last checkpoint (kept under the stage's scratch URI) when killed. Data-parallel processes
(`resources.cpu_processes`, or torchrun / accelerate) share each batch of `pretrain.batch_size` (`train_step`); the
main process alone logs (`train_loss` is its slice's), checkpoints, measures and registers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import numpy as np
import torch
from rich.progress import Progress

from onereward import storage, tracking
from onereward.config import TASKS, PretrainConfig, Settings
from onereward.data import schema
from onereward.data.images import to_png
from onereward.distributed import ONE_PROCESS, Workers
from onereward.models import tensors
from onereward.models.generator import MaskedFlowGenerator, autocast, load_generator
from onereward.models.registry import register_generator
from onereward.models.tiny_unet import TinyUNetGenerator
from onereward.stages import GateFailed, StageContext, print_metrics
from onereward.stages.checkpoint import Checkpoints

CONDITION_KEYS = ["condition_id", "split", "task", "target"]  # what load_conditions must read to choose rows


def load_conditions(art: storage.Artifact, split: str, ids: Iterable[str] | None = None,
                    columns: list[str] | None = None) -> list[dict]:
    """The conditions of `split` that have a target (of `ids` only, when given), sorted by id (`read_conditions`)."""
    return read_conditions(art, ids, split, with_target=True, columns=columns)


def read_conditions(art: storage.Artifact, ids: Iterable[str] | None = None, split: str | None = None,
                    with_target: bool = False, columns: list[str] | None = None) -> list[dict]:
    """Conditions of `ids` / `split` / with a target (each filter when given), sorted by id: read a shard at a time,
    and only the rows kept become Python objects, so memory holds what the caller asked for (on flux the table is
    tens of GB of 512 px PNGs). `columns` (with those the filters read: CONDITION_KEYS) reads fewer."""
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = None if ids is None else pa.array(sorted(set(ids)), pa.string())
    rows: list[dict] = []
    for t in art.iter_batches(columns=columns):
        if columns is None:
            schema.check_columns(t, schema.CONDITIONS, f"conditions artifact {art.uri}")
        keep = pa.array([True] * t.num_rows)
        if split is not None:
            keep = pc.and_(keep, pc.equal(t["split"], split))
        if with_target:
            keep = pc.and_(keep, pc.greater(pc.binary_length(t["target"]), 0))  # a null (no target) is dropped
        if wanted is not None:
            keep = pc.and_(keep, pc.is_in(t["condition_id"], value_set=wanted))
        rows += t.filter(keep).to_pylist()
    return sorted(rows, key=lambda r: r["condition_id"])


def heldout_by_task(rows: list[dict], per_task: int) -> dict[str, list[dict]]:
    return {t: [r for r in rows if r["task"] == t][:per_task] for t in TASKS}


def evaluate_generator(gen: MaskedFlowGenerator, by_task: dict[str, list[dict]], steps: int, seed: int,
                       grid_rows: int, samples: int = 1) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Per task: background PSNR and in-mask error and correlation vs the target, with the two baselines, as the
    mean over `samples` samples a condition; and the same measured on the mean of those samples
    (`mean_prediction.*`), the base's estimate of the conditional mean, which is what the gate compares with the
    baselines: they are point estimates, and a sample carries the spread a point estimate does not."""
    metrics: dict[str, float] = {}
    grids = {}
    for task, rows in by_task.items():
        if not rows:
            continue
        b = tensors.batch_from_rows(rows)
        outs = [torch.cat([
            gen.sample(b["images"][i : i + 64], b["masks"][i : i + 64], b["prompts"][i : i + 64],
                       steps=steps, seed=seed + i + j * 100_003)  # a stride past any batch offset
            for i in range(0, len(rows), 64)
        ]) for j in range(samples)]
        per_sample = [tensors.mask_metrics(out, b["images"], b["masks"], b["targets"]) for out in outs]
        for k in per_sample[0]:
            metrics[f"heldout.{task}.{k}"] = float(torch.stack([m[k] for m in per_sample]).mean())
        mean = tensors.mask_metrics(torch.stack(outs).mean(0), b["images"], b["masks"], b["targets"])
        for k in ("mse_mask", "mask_corr"):
            metrics[f"heldout.{task}.mean_prediction.{k}"] = float(mean[k].mean())
        metrics[f"heldout.{task}.n"] = len(rows)
        metrics[f"heldout.{task}.beats_baselines"] = float(tensors.beats_baselines(task, mean))
        n = min(grid_rows, len(rows))
        grey_mask = b["masks"][:n].expand(-1, 3, -1, -1) * 2 - 1
        grids[task] = tensors.grid([
            [b["images"][i] * (1 - b["masks"][i]), grey_mask[i], outs[0][i], b["targets"][i]] for i in range(n)
        ])
    return metrics, grids


class BaseGateFailed(GateFailed):
    """The trained base does not beat the trivial baselines on held-out conditions: nothing is registered."""


def check_gate(metrics: dict[str, float], tasks: list[str]) -> None:
    failed = []
    for task in tasks:
        measure, better = tensors.GATE_MEASURE[task]
        if f"heldout.{task}.beats_baselines" not in metrics:
            failed.append(f"{task}: no held-out conditions with a target to measure")
        elif metrics[f"heldout.{task}.beats_baselines"] != 1.0:
            own = metrics[f"heldout.{task}.mean_prediction.{measure}"]
            base = ", ".join(f"{b} {metrics[f'heldout.{task}.{measure}_{b}']:.4f}" for b in tensors.BASELINES)
            failed.append(f"{task}: {measure} {own:.4f} (of the mean prediction) is not {better} than the "
                          f"baselines ({base})")
    if failed:
        raise BaseGateFailed("pretrain_base: the base generator fails its held-out gate (pretrain.gate_tasks); "
                             "train longer or relax the gate. " + "; ".join(failed), metrics)


def train_step(gen: MaskedFlowGenerator, opt: torch.optim.Optimizer, data: dict, rng: torch.Generator,
               p: PretrainConfig, workers: Workers = ONE_PROCESS) -> torch.Tensor:
    """One optimiser step on a random batch of `data` (also what benchmarks/bench_train.py measures). Several
    data-parallel `workers`, seeded alike, draw the same batch and each computes its slice of it: the step is the
    one process's step, on more cores (its loss is this process's slice's, scaled to the batch)."""
    idx = torch.randint(0, len(data["prompts"]), (p.batch_size,), generator=rng)
    # 10% empty prompts teach the unconditional prediction that true CFG needs.
    prompts = ["" if torch.rand(1, generator=rng).item() < 0.1 else data["prompts"][i] for i in idx]
    with autocast(p.autocast, gen.device):
        loss = gen.training_loss(data["targets"][idx], data["images"][idx], data["masks"][idx], prompts, rng,
                                 mask_weight=p.mask_loss_weight, share=(workers.rank, workers.world))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    workers.average_gradients(gen.parameters())
    torch.nn.utils.clip_grad_norm_(list(gen.parameters()), 1.0)
    opt.step()
    return loss


def cosine_factor(done: float) -> float:
    """The lr's share `done` (0..1, clamped) of the way along a cosine schedule from 1 to 0 (math, not numpy: the lr
    lands in the optimizer state, which torch.load(weights_only=True) reads back)."""
    return 0.5 * (1 + math.cos(math.pi * min(max(done, 0.0), 1.0)))


def train(s: Settings, ckpts: Checkpoints, train_rows: list[dict], all_prompts: list[str],
          workers: Workers = ONE_PROCESS) -> MaskedFlowGenerator:
    p = s.pretrain
    if p.batch_size < workers.world:
        raise ValueError(f"pretrain.batch_size {p.batch_size}: {workers.world} data-parallel processes share each "
                         "batch, so it must hold at least one row for each")
    ck = ckpts.resume()
    gen = load_generator(ck.folder("model")) if ck else TinyUNetGenerator.build(s.generator, all_prompts,
                                                                                 s.image_size, s.seed)
    opt = torch.optim.AdamW(list(gen.parameters()), lr=p.lr, fused=True)
    rng, start = torch.Generator().manual_seed(s.seed), 0
    if ck:
        ck.restore(opt, rng)
        start = ck.step
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: cosine_factor((i + start) / p.steps))
    data = tensors.batch_from_rows(train_rows)
    gen.train(True)
    t0 = time.perf_counter()
    with Progress(transient=False, disable=not workers.main) as bar:
        task = bar.add_task("pretrain_base", total=p.steps, completed=start)
        for step in range(start, p.steps):
            loss = train_step(gen, opt, data, rng, p, workers)
            sched.step()
            bar.advance(task)
            if workers.main and not bar.console.is_terminal and step % 50 == 0:  # plain lines for pod/task logs
                print(f"pretrain_base: step {step}/{p.steps} loss {loss.item():.4f}", flush=True)
            if step % 10 == 0 or step == p.steps - 1:
                tracking.log_metrics({"train_loss": loss.item(), "lr": sched.get_last_lr()[0]}, step=step)
            if workers.main and ckpts.due(step + 1, p.steps):
                ckpts.save(step + 1, opt, rng, folders={"model": gen.save})
    tracking.log_metrics({"train_seconds": time.perf_counter() - t0,
                          "seconds_per_step": (time.perf_counter() - t0) / max(p.steps - start, 1)})
    return gen


def _register_external(ctx: StageContext) -> dict[str, float]:
    s = ctx.settings
    if not s.generator.base_uri:
        raise ValueError("generator.base_uri: the flux profile needs the URI of a FLUX.1 Fill checkpoint")
    out = ctx.outputs["base_model"]
    from onereward.models.flux import write_pointer

    write_pointer(out.dir / "model", s.generator, s.image_size)
    version = register_generator(out.dir / "model", s.tracking.generator_model_name, "base", s.image_size,
                                 {"source": s.generator.base_uri})
    out.write_json("registry.json", {"name": s.tracking.generator_model_name, "version": version, "alias": "base"})
    return {"registered_external": 1.0, "registered_version": float(version)}


def pretrain_base(ctx: StageContext) -> dict[str, float]:
    s = ctx.settings
    if s.generator.kind != "tiny_unet":
        return _register_external(ctx) if ctx.workers.main else {}
    if s.pretrain.threads:
        torch.set_num_threads(s.pretrain.threads)
    conditions = ctx.inputs["conditions"]
    train_rows = load_conditions(conditions, "train")
    # read before training, so a bad row fails the run first; the main process alone measures
    heldout = (heldout_by_task(load_conditions(conditions, "heldout"), s.pretrain.eval_conditions)
               if ctx.workers.main else {})
    if not train_rows:
        raise ValueError(f"conditions {conditions.uri}: no train rows with a target to learn from")
    prompts = [r["prompt"] for r in conditions.read_table(columns=["prompt"]).to_pylist()]
    ckpts = Checkpoints(ctx, s.pretrain.checkpoint_every)
    gen = train(s, ckpts, train_rows, [*prompts, s.generator.negative_prompt], ctx.workers)
    if ctx.workers.world > 1 and len(set(ctx.workers.gather(gen.weights_digest()))) > 1:
        raise RuntimeError("pretrain_base: the data-parallel processes ended with different weights")
    if not ctx.workers.main:  # the main process measures, writes and registers
        return {}
    if ctx.workers.world > 1:  # on the cores the others leave (the local runner gave each process its share)
        torch.set_num_threads(torch.get_num_threads() * ctx.workers.world)

    metrics, grids = evaluate_generator(gen, heldout, s.pretrain.eval_steps, s.seed, s.pretrain.sample_grid_rows,
                                        s.pretrain.gate_samples)
    check_gate(metrics, s.pretrain.gate_tasks)
    out = ctx.outputs["base_model"]
    gen.save(out.dir / "model")
    out.write_json("heldout_metrics.json", metrics)
    for task, arr in grids.items():
        out.write_bytes(f"samples/{task}.png", to_png(arr))
        tracking.log_image(arr, f"samples/{task}.png")
    version = register_generator(out.dir / "model", s.tracking.generator_model_name, "base", s.image_size,
                                 {"artifact_key": ctx.key})
    out.write_json("registry.json", {"name": s.tracking.generator_model_name, "version": version,
                                     "alias": "base"})
    print_metrics(ctx.stage, metrics)
    return {**metrics, "registered_version": float(version)}
