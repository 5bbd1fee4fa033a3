"""Reduced sizes shared by the tests that train the upstream stages for real (a few steps each)."""

UPSTREAM = [
    "curate.sources=[{kind: procedural, count: 64}]", "masks.heldout_fraction=0.3", "masks.mix_tolerance=0.3",
    "pretrain.steps=60", "pretrain.batch_size=16", "pretrain.eval_conditions=4", "pretrain.gate_tasks=[]",
    "candidates.max_conditions=16", "candidates.per_condition=2", "candidates.steps=[2]", "candidates.guidance=[1.0]",
    "reward.vision_warmup_steps=2", "reward.steps=4", "reward.batch_size=4", "reward.heldout_fraction=0.5",
    "reward.gate_tasks=[]",  # four steps make no judge; the gate has its own test
]
RL = ["rl.steps=8", "rl.batch_size=2", "rl.sample_steps=2", "rl.jump_window=[0, 1]", "rl.eval_every=2",
      "rl.checkpoint_every=2", "rl.eval_conditions=2", "rl.audit_conditions=3", "rl.bootstrap=100",
      "rl.grid_rows=1", "rl.require_improvement=false"]
DISTILL = ["distill.teacher_steps=8", "distill.train_conditions=16", "distill.train_steps=6", "distill.batch_size=8"]
EVALUATE = ["evaluate.conditions=4", "evaluate.bootstrap=200", "evaluate.latency_images=2", "evaluate.grid_rows=2"]

# The whole graph in a minute or two (the orchestrators' runs, the flux profile at toy width): every gate opened
WHOLE_GRAPH = ["curate.sources=[{kind: procedural, count: 48}]", "masks.heldout_fraction=0.25",
        "masks.mix_tolerance=0.3", "pretrain.steps=8", "pretrain.batch_size=8", "pretrain.eval_conditions=4",
        "candidates.max_conditions=8", "candidates.per_condition=2", "candidates.steps=[2]",
        "candidates.guidance=[1.0]", "reward.vision_warmup_steps=2", "reward.steps=3", "reward.batch_size=4",
        "reward.heldout_fraction=0.5", "rl.steps=2", "rl.batch_size=2", "rl.sample_steps=2", "rl.jump_window=[0, 1]",
        "rl.eval_every=2", "rl.eval_conditions=2", "rl.audit_conditions=2", "rl.bootstrap=100", "rl.grid_rows=1",
        "distill.teacher_steps=4", "distill.train_conditions=8", "distill.train_steps=2", "distill.batch_size=4",
        "evaluate.conditions=2", "evaluate.bootstrap=100", "evaluate.latency_images=1", "evaluate.grid_rows=1",
        # 8 steps cannot beat the baselines, 3 cannot make a judge, 2 cannot improve on the base, 2 distillation
        # steps make no student worth promoting; each gate has its own test
        "pretrain.gate_tasks=[]", "reward.gate_tasks=[]", "rl.require_improvement=false",
        "evaluate.gates.win_rate_vs_base=false", "evaluate.gates.max_bg_psnr_drop=100",
        "evaluate.gates.max_mask_error_rise=100", "evaluate.gates.max_measure_rise=100",
        "evaluate.gates.min_student_quality=0"]


def flux_toy(base_uri) -> list[str]:
    """The flux profile's generator at toy width: the FluxFill folder at `base_uri` (conftest's `flux_base`), a
    rank-4 adapter, fp32 on the CPU."""
    return ["generator.kind=flux_fill", f"generator.base_uri={base_uri}", "generator.lora_rank=4",
            "generator.dtype=float32"]


def flux_judges(bases) -> list[str]:
    """The flux profile's judges at toy width: the pretrained checkpoints of conftest's `judge_bases` (Qwen2.5-VL
    trains the reward, Qwen2-VL audits), rank-4 adapters, fp32 on the CPU, 32 px images (448 by default: 3,136
    tokens an image at the toy's patch 4), no vision warm-up (their towers stay frozen)."""
    return ["reward.vision_warmup_steps=0", *(f"reward.{role}.{k}" for role, arch in (
        ("judge", "qwen2_5_vl"), ("audit", "qwen2_vl")) for k in (
        f"arch={arch}", f"base_uri={bases[arch]}", "lora_rank=4", "dtype=float32", "image_size=32"))]
