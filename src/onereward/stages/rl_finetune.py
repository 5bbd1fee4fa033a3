"""rl_finetune: reward feedback learning of the generator against the ONE reward model, all tasks at once
(OneReward, arXiv 2508.21066, Fig. 3, Alg. 1-2).

Inputs: `conditions` (synthesize_masks), `base_model` (pretrain_base), `reward_model` (train_reward, the judge
trained against), `audit_model` (train_audit_reward, the judge that checks the result).
Output: `policy` — the fine-tuned generator (`model/`, safetensors), `heldout_metrics.json`, `samples/`,
`registry.json`; registered as `onereward-generator@rl-candidate` with lineage tags.
Config: `seed`, `generator`, `labels` (the criteria of each task), `rl`.
Metrics: `heldout.<task>.bg_psnr`, `heldout.<task>.mse_mask`, `heldout.<task>.measure` for the policy and the same
prefixed `base.`; `audit.<task>.win_rate`, `audit.<task>.win_rate_low` (95 % bootstrap lower bound), the
same by the training judge as `reward.<task>.*`; `train.reward`, `train.<task>.reward`, `train.<task>.loss`,
`train.<task>.clamped`, `train.grad_norm`, `val.*` curves and the base's `val.base.*`; `early_stopped`, `best_step`.

One step: each batch row draws a task by `rl.task_probs` and one of its criteria; the reference (the frozen
base, or the policy's EMA) samples the condition from its own noise, all steps, without gradients; the policy
denoises without gradients to a step drawn from `rl.jump_window` and predicts x0 in one jump with gradients;
the loss is max(0, λ - P(policy better)) in both image orders (minimised: Alg. 1's "ascent" would lower the
reward), plus a supervised flow-matching anchor on the conditions' known targets.

Ground truth first: every `rl.eval_every` steps the policy samples held-out conditions; if any task's
background PSNR falls more than `rl.max_bg_psnr_drop` dB below the base's, or its in-mask error rises more
than `rl.max_mask_error_rise`, the run stops there (reward hacking) and the best validated step is kept. A run
whose best step is the base itself registers nothing and fails. Training resumes from the last checkpoint.

One network: the reference and the base are the policy's network with their trainable weights swapped in
(`WeightsView`). On flux the trainable weights are a LoRA adapter (`generator.lora_rank`), saved alone beside the
base's URI.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from rich.progress import Progress

from onereward import storage, tracking
from onereward.config import TASKS, RLConfig, Settings
from onereward.data.images import to_png
from onereward.distributed import ONE_PROCESS, Workers
from onereward.models import tensors
from onereward.models.generator import MaskedFlowGenerator, autocast, load_generator
from onereward.models.judge import Judge, Query
from onereward.models.registry import register_generator
from onereward.stages import GateFailed, StageContext, print_metrics
from onereward.stages.checkpoint import Checkpoints, ranks_rng
from onereward.stages.label_preferences import MEASURES, Ground
from onereward.stages.pretrain_base import CONDITION_KEYS, load_conditions
from onereward.stages.train_reward import square_symmetry

# Each task's own ground-truth measure (lower is better): what RL must move without being trained on it.
TASK_MEASURE = {"fill": "alignment", "extend": "consistency", "removal": "residue", "text": "text_correctness"}


class NoImprovement(GateFailed):
    """No validated step improved on the base (with `rl.require_improvement`): nothing is registered."""


def residue(x: torch.Tensor, g: Ground) -> torch.Tensor:
    """Removal: the share of the removed object's difference from the background still in the output inside
    the mask (1 = the object is all there, 0 = clean background or an unrelated error)."""
    obj = (g.image - g.target) * g.mask
    left = ((x - g.target) * obj).flatten(1).sum(1)
    return (left / (obj**2).sum().clamp_min(1e-6)).clamp_min(0)


def task_summary(metrics: dict[str, float], t: str) -> str:
    """One task's held-out numbers, policy vs base, in a line (all of them are on the MLflow run)."""
    pol, base = f"heldout.{t}.", f"base.heldout.{t}."
    return (f"{t} held out, policy vs base: measure {metrics[pol + 'measure']:.4f} vs {metrics[base + 'measure']:.4f}, "
            f"bg PSNR {metrics[pol + 'bg_psnr']:.2f} vs {metrics[base + 'bg_psnr']:.2f} dB; audit win rate "
            f"{metrics[f'audit.{t}.win_rate']:.2f} (low {metrics[f'audit.{t}.win_rate_low']:.2f}), "
            f"judge {metrics[f'reward.{t}.win_rate']:.2f}")


def task_measure(task: str, images: torch.Tensor, rows: list[dict]) -> torch.Tensor:
    fn = residue if TASK_MEASURE[task] == "residue" else MEASURES[TASK_MEASURE[task]]
    return torch.cat([fn(images[i : i + 1], Ground.of(r)) for i, r in enumerate(rows)])


# ---------------------------------------------------------------------------------------------- data
@dataclass
class Conditions:
    rows: list[dict]
    batch: dict | None  # every row decoded; None where rows are decoded as they are drawn (`take`)
    context: torch.Tensor | None  # the masked input the judges are shown
    by_task: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def of(cls, rows: list[dict], decoded: bool = True) -> Conditions:
        """`decoded=False` for a training pool: flux's train conditions decoded at 512 px would take ~10 MB each,
        hundreds of GB in all, where their PNGs take ~1 MB and a draw decodes a batch."""
        by_task = defaultdict(list)
        for i, r in enumerate(rows):
            by_task[r["task"]].append(i)
        if not decoded:
            return cls(rows, None, None, dict(by_task))
        b = tensors.batch_from_rows(rows)
        return cls(rows, b, tensors.masked_input(b["images"], b["masks"]), dict(by_task))

    def take(self, idx: list[int], device: torch.device | str = "cpu") -> dict:
        if self.batch is None:
            b = tensors.batch_from_rows([self.rows[i] for i in idx])
            context = tensors.masked_input(b["images"], b["masks"])
        else:
            whole, context = self.batch, self.context[idx]
            b = {"images": whole["images"][idx], "masks": whole["masks"][idx], "targets": whole["targets"][idx],
                 "prompts": [whole["prompts"][i] for i in idx], "tasks": [whole["tasks"][i] for i in idx]}
        return {"images": b["images"].to(device), "masks": b["masks"].to(device),
                "targets": b["targets"].to(device), "prompts": b["prompts"], "tasks": b["tasks"],
                "context": context.to(device)}


def validation_rows(conditions: storage.Artifact, per_task: int) -> dict[str, list[dict]]:
    """The first `per_task` held-out conditions with a target of each task (by id): chosen on their ids, then only
    those read whole."""
    light = load_conditions(conditions, "heldout", columns=CONDITION_KEYS)
    ids = {t: [r["condition_id"] for r in light if r["task"] == t][:per_task] for t in TASKS}
    chosen = [i for v in ids.values() for i in v]
    full = {r["condition_id"]: r for r in load_conditions(conditions, "heldout", ids=chosen)}
    return {t: [full[i] for i in v] for t, v in ids.items()}


def train_pool(conditions: storage.Artifact, workers: Workers) -> list[dict]:
    """This process's share of the train conditions with a target: every `world`-th of each task's (by id), so the
    processes of a node hold the pool once between them rather than once each (flux: ~1 MB of PNGs a condition),
    and each draws every task. One process holds them all."""
    light = load_conditions(conditions, "train", columns=CONDITION_KEYS)
    mine = [r["condition_id"] for t in TASKS
            for r in [x for x in light if x["task"] == t][workers.rank :: workers.world]]
    return load_conditions(conditions, "train", ids=mine)


def noise_seeds(seed: int, step: int, n: int, stream: int) -> list[int]:
    """Per-row noise seeds, a function of the step only, so a resumed run draws what the unkilled one drew."""
    return [(seed * 1_000_003 + step * 4099 + stream * 104_729 + i) % 2**31 for i in range(n)]


# ---------------------------------------------------------------------------------------------- step
def draw_rows(train: Conditions, rc: RLConfig, criteria: dict[str, list[str]], rng: torch.Generator
              ) -> tuple[list[int], list[str]]:
    tasks = [t for t in TASKS if rc.task_probs.get(t, 0) > 0 and train.by_task.get(t)]
    probs = torch.tensor([rc.task_probs[t] for t in tasks], dtype=torch.double)
    idx, crit = [], []
    for k in torch.multinomial(probs, rc.batch_size, replacement=True, generator=rng).tolist():
        pool = train.by_task[tasks[k]]
        idx.append(pool[int(torch.randint(len(pool), (1,), generator=rng))])
        options = criteria[tasks[k]]
        crit.append(options[int(torch.randint(len(options), (1,), generator=rng))])
    return idx, crit


def p_policy_better(judge: Judge, policy_img: torch.Tensor, ref_img: torch.Tensor, q: Query
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """P(policy better) asked both ways: (policy, reference) -> Yes, (reference, policy) -> No; on the judge's
    device (the policy's image keeps its gradient)."""
    dev = judge.device
    q = replace(q, context=None if q.context is None else q.context.to(dev))
    first, reverse = judge.p_yes_both_orders(policy_img.to(dev), ref_img.to(dev), q)
    return first, 1 - reverse


def rl_step(policy: MaskedFlowGenerator, reference: MaskedFlowGenerator | WeightsView, judge: Judge, opt,
            train: Conditions, rc: RLConfig, criteria: dict[str, list[str]], rng: torch.Generator, seed: int,
            step: int, phases: dict[str, float] | None = None, workers: Workers = ONE_PROCESS
            ) -> dict[str, torch.Tensor | list[str]]:
    """One optimizer step; `phases` (if given) accumulates seconds of reference sampling, policy rollout,
    reward scoring and backward (what benchmarks/bench_rl.py reports). With several `workers` each draws its own
    rows (its `rng` and `seed`) and the gradients are averaged over them before the step."""
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        if phases is not None:
            now = time.perf_counter()
            phases[name] = phases.get(name, 0.0) + now - clock
            clock = now

    idx, crit = draw_rows(train, rc, criteria, rng)
    b = train.take(idx, policy.device)
    n = len(idx)
    ref_img = reference.sample(b["images"], b["masks"], b["prompts"], steps=rc.sample_steps, guidance=rc.guidance,
                               seed=noise_seeds(seed, step, n, 0))
    lap("reference")
    lo, hi = rc.jump_window
    stop = int(torch.randint(lo, hi + 1, (1,), generator=rng))
    policy.train(True)
    with autocast(rc.autocast, policy.device):
        pol_img = policy.denoise_then_jump(b["images"], b["masks"], b["prompts"], stop_step=stop,
                                           steps=rc.sample_steps, guidance=rc.guidance,
                                           seed=noise_seeds(seed, step, n, 1))
    lap("rollout")
    q = Query(b["tasks"], crit, b["prompts"], b["context"])
    seen_pol, seen_ref = pol_img.float(), ref_img
    if rc.judge_composite:
        keep = 1 - b["masks"].to(pol_img.device)
        seen_pol, seen_ref = (x * (1 - keep) + b["images"] * keep for x in (seen_pol, seen_ref))
    if rc.judge_augment:
        sym = torch.randint(0, 8, (n,), generator=rng)
        sym[torch.tensor([t in rc.augment_skip for t in b["tasks"]])] = 0
        seen_pol, seen_ref = square_symmetry(seen_pol, sym), square_symmetry(seen_ref, sym)
        q = Query(q.tasks, q.criteria, q.prompts, square_symmetry(q.context, sym))
    first, second = p_policy_better(judge, seen_pol, seen_ref, q)
    per_row = (torch.relu(rc.reward_bound - first) + torch.relu(rc.reward_bound - second)) / 2
    loss = per_row.mean()
    if rc.background_weight > 0:  # outside the mask the answer is the input itself, for every task
        keep = (1 - b["masks"]).to(pol_img.device)
        loss = loss + rc.background_weight * tensors._masked_mse(pol_img.float(), b["images"], keep).mean()
    if rc.anchor_weight > 0:
        with autocast(rc.autocast, policy.device):
            anchor = policy.training_loss(b["targets"], b["images"], b["masks"], b["prompts"], rng,
                                          mask_weight=rc.mask_loss_weight)
        loss = loss + rc.anchor_weight * anchor.float()
    lap("reward")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    workers.average_gradients(policy.parameters())
    grad_norm = torch.nn.utils.clip_grad_norm_(list(policy.parameters()), rc.grad_clip)
    opt.step()
    lap("backward")
    p = ((first + second) / 2).detach()
    return {"tasks": b["tasks"], "reward": p, "loss": per_row.detach(), "grad_norm": grad_norm.detach(),
            "clamped": ((first.detach() >= rc.reward_bound) & (second.detach() >= rc.reward_bound)).float()}


# ---------------------------------------------------------------------------------------------- state
def trainable_state(gen: MaskedFlowGenerator) -> dict[str, torch.Tensor]:
    return {f"{i}.{name}": p.detach().clone() for i, m in enumerate(gen.trainable_modules())
            for name, p in m.named_parameters() if p.requires_grad}


def load_trainable_state(gen: MaskedFlowGenerator, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for i, m in enumerate(gen.trainable_modules()):
            for name, p in m.named_parameters():
                if p.requires_grad:
                    p.copy_(state[f"{i}.{name}"])


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], policy: MaskedFlowGenerator, decay: float) -> None:
    for i, m in enumerate(policy.trainable_modules()):
        for name, p in m.named_parameters():
            if p.requires_grad:
                ema[f"{i}.{name}"].lerp_(p, 1 - decay)


class WeightsView:
    """The policy's network sampled with other values of its trainable weights (the base's, or their EMA), put
    in place for the call and taken out after it. One copy of the network serves the policy, the reference and
    the base: FLUX's transformer is 12 B parameters, and under LoRA the trainable weights are the adapter."""

    def __init__(self, gen: MaskedFlowGenerator, state: dict[str, torch.Tensor]):
        self.gen, self.state = gen, state

    @property
    def device(self) -> torch.device:
        return self.gen.device

    def _in_place(self, call):
        own = trainable_state(self.gen)
        load_trainable_state(self.gen, self.state)
        try:
            return call()
        finally:
            load_trainable_state(self.gen, own)

    def sample(self, *args, **kwargs) -> torch.Tensor:
        return self._in_place(lambda: self.gen.sample(*args, **kwargs))

    def weights_digest(self) -> str:
        return self._in_place(self.gen.weights_digest)


@dataclass
class RunState:
    """What a resumed run must know besides the weights: validation history and the best step so far."""

    evals: list[dict] = field(default_factory=list)
    best_step: int = 0
    best_score: float = 1.0
    stopped_at: int | None = None
    reason: str = ""


# ---------------------------------------------------------------------------------------------- evaluation
def sample_rows(gen: MaskedFlowGenerator, c: Conditions, steps: int, guidance: float, seeds: list[int]
                ) -> torch.Tensor:
    """Every condition sampled, 64 a batch, row i from noise seed `seeds[i]`."""
    b = c.batch
    return torch.cat([gen.sample(b["images"][i : i + 64], b["masks"][i : i + 64], b["prompts"][i : i + 64],
                                 steps=steps, guidance=guidance, seed=seeds[i : i + 64])
                      for i in range(0, len(c.rows), 64)])


def rl_samples(gen: MaskedFlowGenerator | WeightsView, c: Conditions, rc: RLConfig, seed: int) -> torch.Tensor:
    """The samples on the CPU, beside the conditions' ground truth."""
    return sample_rows(gen, c, rc.sample_steps, rc.guidance, list(range(seed, seed + len(c.rows)))).cpu()


def ground_truth_per_image(out: torch.Tensor, c: Conditions, task: str) -> dict[str, torch.Tensor]:
    b = c.batch
    m = tensors.mask_metrics(out, b["images"], b["masks"], b["targets"])
    return {"bg_psnr": m["bg_psnr"], "mse_mask": m["mse_mask"], "measure": task_measure(task, out, c.rows)}


def ground_truth(out: torch.Tensor, c: Conditions, task: str) -> dict[str, float]:
    return {k: float(v.mean()) for k, v in ground_truth_per_image(out, c, task).items()}


def validate(gen: MaskedFlowGenerator, val: dict[str, Conditions], rc: RLConfig, seed: int
             ) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    outs = {t: rl_samples(gen, c, rc, seed) for t, c in val.items()}
    return {t: ground_truth(outs[t], val[t], t) for t in val}, outs


@dataclass
class Validation:
    """The held-out conditions each eval samples (fixed noise), with the base's measures and images on them."""

    sets: dict[str, Conditions]
    base: dict[str, dict[str, float]]
    base_out: dict[str, torch.Tensor]
    audit: Judge | None = None  # scores each eval's samples against the base's, beside the ground truth
    criteria: dict[str, list[str]] = field(default_factory=dict)


def drift(gt: dict[str, dict[str, float]], base: dict[str, dict[str, float]], rc: RLConfig) -> list[str]:
    """The tasks on which the policy left the data: background PSNR or in-mask error beyond the tolerance."""
    out = []
    for t, m in gt.items():
        b = base[t]
        if m["bg_psnr"] < b["bg_psnr"] - rc.max_bg_psnr_drop:
            out.append(f"{t}: background PSNR {b['bg_psnr']:.2f} -> {m['bg_psnr']:.2f} dB")
        if m["mse_mask"] > b["mse_mask"] * (1 + rc.max_mask_error_rise):
            out.append(f"{t}: in-mask error {b['mse_mask']:.4f} -> {m['mse_mask']:.4f}")
    return out


def score(gt: dict[str, dict[str, float]], base: dict[str, dict[str, float]]) -> float:
    """Mean over tasks of the task's own measure relative to the base's (lower is better, the base is 1)."""
    return float(np.mean([gt[t]["measure"] / max(base[t]["measure"], 1e-8) for t in gt]))


def bootstrap_interval(wins: np.ndarray, n: int, seed: int) -> tuple[float, float]:
    """95 % bootstrap interval of the mean of `wins`."""
    rng = np.random.default_rng(seed)
    means = wins[rng.integers(0, len(wins), (n, len(wins)))].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def bootstrap_low(wins: np.ndarray, n: int, seed: int) -> float:
    return bootstrap_interval(wins, n, seed)[0]


@torch.no_grad()
def pairwise_p(judge: Judge, a_out: torch.Tensor, b_out: torch.Tensor, c: Conditions, task: str,
               criteria: list[str]) -> torch.Tensor:
    """Per condition, P(a better than b) by the judge, averaged over both orders and the task's criteria."""
    n = len(c.rows)
    p = torch.zeros(n)
    for crit in criteria:
        q = Query([task] * n, [crit] * n, c.batch["prompts"], c.context)
        first, second = p_policy_better(judge, a_out, b_out, q)
        p += ((first + second) / 2 / len(criteria)).cpu()  # the judge may sit on a GPU
    return p


def wins_of(p: torch.Tensor) -> np.ndarray:
    """A win is P > 0.5; a tie (the same image, P = 0.5) is half a win."""
    tie = (p - 0.5).abs() < 1e-6
    return torch.where(tie, 0.5, (p > 0.5).float()).numpy()


def win_rates(judge: Judge, policy_out: torch.Tensor, base_out: torch.Tensor, c: Conditions, task: str,
              criteria: list[str], bootstrap: int, seed: int) -> tuple[float, float, float]:
    """(win rate of policy vs base, its 95 % bootstrap lower bound, mean P)."""
    p = pairwise_p(judge, policy_out, base_out, c, task, criteria)
    wins = wins_of(p)
    return float(wins.mean()), bootstrap_low(wins, bootstrap, seed), float(p.mean())


def sample_grid(c: Conditions, outputs: list[torch.Tensor], rows: int) -> np.ndarray:
    """A row per condition: masked input | mask | each of `outputs` | target."""
    b = c.batch
    n = min(rows, len(c.rows))
    return tensors.grid([[b["images"][i] * (1 - b["masks"][i]), b["masks"][i].expand(3, -1, -1) * 2 - 1,
                        *(o[i] for o in outputs), b["targets"][i]] for i in range(n)])


# ---------------------------------------------------------------------------------------------- the stage
def _load_judge(art: storage.Artifact, device: torch.device | str = "cpu") -> Judge:
    judge = Judge.load(art.local_dir() / "judge", device)
    judge.model.to(device).eval()
    judge.model.requires_grad_(False)
    return judge


def _criteria(s) -> dict[str, list[str]]:
    return {t: list(getattr(s.labels.criteria, t)) for t in TASKS}


def train(s: Settings, ckpts: Checkpoints, policy: MaskedFlowGenerator, base_state: dict[str, torch.Tensor],
          train_c: Conditions, val: Validation | None, judge: Judge, workers: Workers = ONE_PROCESS) -> RunState:
    """Trains `policy` (the base's weights, `base_state`, at step 0) in place and leaves it at the best
    validated step. With several `workers` each draws its own rows and noise, and the main process alone
    validates (`val`; the others get None and its verdict), logs and checkpoints."""
    rc = s.rl
    seed = workers.seed(s.seed)  # the main process draws with a single process's seed (from its share: train_pool)
    criteria = _criteria(s)
    ck = ckpts.resume()
    if ck and ck.tensors("policy") is None:  # an older onereward saved the policy as a model folder
        print(f"rl_finetune: the checkpoint at step {ck.step} is of an older layout: starting over", flush=True)
        ck = None
    if ck:
        load_trainable_state(policy, ck.tensors("policy"))
    best = ck.tensors("best") if ck else trainable_state(policy)
    # the rewards since the last validation go into its record, and the logged curves are 10-step means: a
    # checkpoint between the two keeps what they have gathered
    since_eval: list[float] = ck.progress.pop("since_eval", []) if ck else []
    window: dict[str, list[float]] = defaultdict(list, ck.progress.pop("window", {}) if ck else {})
    prog = RunState(**ck.progress) if ck else RunState()
    # the reference: the frozen base, or (ema) the base's weights moved towards the policy's after each step
    ema = {k: v.clone() for k, v in base_state.items()} if rc.reference == "ema" else None
    if ck and ema is not None:
        ema = {k: v.to(policy.device) for k, v in ck.tensors("ema").items()}
    reference = WeightsView(policy, ema if ema is not None else base_state)
    opt = torch.optim.AdamW(list(policy.parameters()), lr=rc.lr, weight_decay=0.0, fused=True)
    rng, start = torch.Generator().manual_seed(seed), 0
    if ck:
        ck.restore(opt, rng, workers, seed, "rl_finetune")
        start = ck.step
    t0 = time.perf_counter()
    with Progress(transient=False, disable=not workers.main) as bar:
        task_bar = bar.add_task("rl_finetune", total=rc.steps, completed=start)
        step = start
        while step < rc.steps and prog.stopped_at is None:
            out = rl_step(policy, reference, judge, opt, train_c, rc, criteria, rng, seed, step, workers=workers)
            if ema is not None:
                ema_update(ema, policy, rc.ema_decay)
            step += 1
            bar.advance(task_bar)
            rows = [r for rank in workers.gather(list(zip(out["tasks"], out["reward"].tolist(), out["loss"].tolist(),
                                                          out["clamped"].tolist(), strict=True))) for r in rank]
            for t, r, lo, cl in rows:
                window[f"train.{t}.reward"].append(r)
                window[f"train.{t}.loss"].append(lo)
                window[f"train.{t}.clamped"].append(cl)
            window["train.reward"] += [r for _, r, _, _ in rows]
            since_eval += [r for _, r, _, _ in rows]
            window["train.grad_norm"].append(float(out["grad_norm"]))
            if step % 10 == 0 or step == rc.steps:
                tracking.log_metrics({k: float(np.mean(v)) for k, v in window.items()}, step=step)
                if workers.main and not bar.console.is_terminal and step % 50 == 0:
                    print(f"rl_finetune: step {step}/{rc.steps} reward {np.mean(window['train.reward']):.3f}",
                          flush=True)
                window.clear()
            if step % rc.eval_every == 0 or step == rc.steps:
                if workers.main:
                    _validate_step(policy, val, rc, s.seed, step, prog, float(np.mean(since_eval)))
                prog = workers.from_main(prog)
                since_eval.clear()
                if prog.best_step == step:
                    best = trainable_state(policy)
            if ckpts.due(step, rc.steps) and prog.stopped_at is None:
                rngs = ranks_rng(workers, rng)
                if workers.main:
                    kept = {"policy": trainable_state(policy), "best": best} | (
                        {"ema": ema} if ema is not None else {}) | rngs
                    ckpts.save(step, opt, rng, tensors=kept,
                               progress={**prog.__dict__, "since_eval": since_eval, "window": window})
    seconds = time.perf_counter() - t0
    tracking.log_metrics({"train_seconds": seconds, "seconds_per_step": seconds / max(step - start, 1)})
    load_trainable_state(policy, best)
    if workers.world > 1 and len(set(workers.gather(policy.weights_digest()))) > 1:
        raise RuntimeError("rl_finetune: the data-parallel processes ended with different weights")
    return prog


def _validate_step(policy, val: Validation, rc: RLConfig, seed: int, step: int, prog: RunState, reward: float
                   ) -> None:
    gt, outs = validate(policy, val.sets, rc, seed)
    for t, out in outs.items():
        tracking.log_image(sample_grid(val.sets[t], [val.base_out[t], out], rc.grid_rows),
                          f"samples/step-{step:05d}/{t}.png")
    audit = {}
    if val.audit is not None:
        audit = {t: win_rates(val.audit, out, val.base_out[t], val.sets[t], t, val.criteria[t], rc.bootstrap,
                                seed)[0]
                 for t, out in outs.items()}
    drifted = drift(gt, val.base, rc)
    sc = score(gt, val.base)
    prog.evals.append({"step": step, "score": sc, "drifted": drifted, "gt": gt, "train_reward": reward,
                       "audit_win_rate": audit})
    tracking.log_metrics({"val.score": sc, **{f"val.{t}.{k}": v for t, m in gt.items() for k, v in m.items()},
                          **{f"val.audit.{t}.win_rate": v for t, v in audit.items()}}, step=step)
    if drifted:
        prog.stopped_at = step
        prog.reason = "; ".join(drifted)
        print(f"rl_finetune: stopped at step {step}, the policy left the data on held-out conditions "
              f"({prog.reason}); keeping step {prog.best_step}", flush=True)
    elif sc < prog.best_score:
        prog.best_step, prog.best_score = step, sc
    print(f"rl_finetune: step {step} held-out measure vs base {sc:.3f} (best {prog.best_score:.3f} at step "
          f"{prog.best_step}); " + ", ".join(
              f"{t} bg {m['bg_psnr']:.2f} dB, mask {m['mse_mask']:.4f}, measure {m['measure']:.4f}"
              for t, m in gt.items())
          + "; audit win rate vs base " + ", ".join(f"{t} {v:.2f}" for t, v in audit.items())
          + f"; training reward {reward:.3f}", flush=True)


def rl_finetune(ctx: StageContext) -> dict[str, float]:
    s = ctx.settings
    rc = s.rl
    if s.generator.kind == "flux_fill" and not s.generator.lora_rank:
        raise ValueError("rl_finetune: the flux profile trains a LoRA adapter (generator.lora_rank > 0); full "
                         "fine-tuning of the 12 B transformer is not supported")
    if rc.threads:
        torch.set_num_threads(rc.threads)
    conditions = ctx.inputs["conditions"]
    train_rows = train_pool(conditions, ctx.workers)
    if not train_rows:
        raise ValueError(f"conditions {conditions.uri}: no train rows with a target")
    sets = {t: Conditions.of(r) for t, r in validation_rows(conditions, rc.eval_conditions).items() if r}
    audit_rows = {t: Conditions.of(r) for t, r in validation_rows(conditions, rc.audit_conditions).items() if r}
    missing = [t for t in TASKS if rc.task_probs.get(t, 0) > 0 and t not in sets]
    if missing:
        raise ValueError(f"rl_finetune: no held-out conditions with a target for tasks {missing}")
    base_dir = ctx.inputs["base_model"].local_dir() / "model"
    criteria = _criteria(s)
    policy = load_generator(base_dir)
    judge = _load_judge(ctx.inputs["reward_model"], policy.device)
    base_state = trainable_state(policy)
    base = WeightsView(policy, base_state)
    workers = ctx.workers
    val, audit = None, None
    if workers.main:  # the main process validates; the others train beside it
        audit = _load_judge(ctx.inputs["audit_model"], policy.device)
        val = Validation(sets, *validate(base, sets, rc, s.seed), audit, criteria)
        base_val = {f"val.base.{t}.{k}": v for t, m in val.base.items() for k, v in m.items()}  # beside val.*
        tracking.log_metrics(base_val)
        print_metrics(ctx.stage, base_val)
    ckpts = Checkpoints(ctx, rc.checkpoint_every)
    prog = train(s, ckpts, policy, base_state, Conditions.of(train_rows, decoded=False), val, judge, workers)
    if not workers.main:
        return {}
    if prog.best_step == 0 and rc.require_improvement:
        last = prog.evals[-1] if prog.evals else {}
        raise NoImprovement(
            "rl_finetune: no validated step improved the held-out measures on the base ("
            + (f"stopped at step {prog.stopped_at}: {prog.reason}" if prog.stopped_at else "no drift, no gain")
            + "); nothing registered",
            {"early_stopped": float(prog.stopped_at is not None), "best_step": 0.0,
             "stopped_at": float(prog.stopped_at or 0), "val.score.last": float(last.get("score", 1.0)),
             "train.reward.last": float(last.get("train_reward", 0.5))})

    metrics: dict[str, float] = {"early_stopped": float(prog.stopped_at is not None),
                                 "best_step": float(prog.best_step), "steps_run": float(prog.stopped_at or rc.steps)}
    out = ctx.outputs["policy"]
    unchanged = same_state(trainable_state(policy), base_state)
    for t, c in audit_rows.items():
        bas = rl_samples(base, c, rc, s.seed + 7)
        # a policy with the base's weights (it kept step 0) samples the same images from the same noise
        pol = bas if unchanged else rl_samples(policy, c, rc, s.seed + 7)
        for prefix, x in (("", pol), ("base.", bas)):
            metrics.update({f"{prefix}heldout.{t}.{k}": v for k, v in ground_truth(x, c, t).items()})
        for name, j in (("audit", audit), ("reward", judge)):
            rate, low, p = win_rates(j, pol, bas, c, t, criteria[t], rc.bootstrap, s.seed)
            metrics |= {f"{name}.{t}.win_rate": rate, f"{name}.{t}.win_rate_low": low, f"{name}.{t}.p_mean": p}
        arr = sample_grid(c, [bas, pol], rc.grid_rows)
        out.write_bytes(f"samples/{t}.png", to_png(arr))
        tracking.log_image(arr, f"samples/{t}.png")
    policy.save(out.dir / "model")
    out.write_json("heldout_metrics.json", metrics)
    out.write_json("validation.json", prog.__dict__)
    lineage = {"artifact_key": ctx.key, "conditions": conditions.uri, "best_step": str(prog.best_step),
               "improved": str(prog.best_step > 0).lower(), "early_stopped": str(prog.stopped_at is not None).lower(),
               "reference": rc.reference}
    for name in ("base_model", "reward_model", "audit_model"):
        reg = ctx.inputs[name].read_json("registry.json")
        lineage[f"{name}.version"] = str(reg["version"])
        lineage[f"{name}.name"] = reg["name"]
    version = register_generator(out.dir / "model", s.tracking.generator_model_name, "rl-candidate",
                                 s.image_size, lineage)
    out.write_json("registry.json", {"name": s.tracking.generator_model_name, "version": version,
                                     "alias": "rl-candidate"})
    for t in audit_rows:
        print(f"rl_finetune: {task_summary(metrics, t)}", flush=True)
    return metrics | {"registered_version": float(version)}
