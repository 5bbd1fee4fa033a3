"""The flux profile's models at real size on one GPU, randomly initialised (no hub): FLUX.1 Fill [dev]'s
transformer and VAE (`models.flux.FLUX_FILL_DEV`) and Qwen2.5-VL-7B as the judge, both built from their
published configs in bf16. Prints time and peak GPU memory of

  - a sampling step (one transformer pass; a true-CFG step is two) at 512² and 1024², and a whole 28-step sample;
  - a judge scoring batch (P(Yes) for pairs, no gradients: what evaluation and the audit do), asked as the flux
    profile's pretrained judge is (ChatML, a byte-level BPE tokenizer standing in for Qwen's);
  - a judge training step: train_reward's on the judge's LoRA adapter (r=64 on the language model's attention,
    gradient checkpointing), both orders of each pair;
  - one RL step with LoRA: `stages.rl_finetune.rl_step` as the stage runs it (reference sampling, policy rollout
    then one jump with gradients, the judge in both orders plus the anchor, backward + AdamW), split by phase.

The text encoders are one layer each at full output width: a prompt is encoded once, outside these loops.
With LoRA the frozen base is the reference, so the step holds one copy of FLUX: `--reference adapter` samples it
through the (zero) adapter, `--reference base` with the adapter switched off (what a flux rl_finetune would do).
`--autocast bf16` keeps the adapter in fp32 (Adam's small updates survive) and runs the policy's passes under
bf16 autocast (`rl.autocast`), against `--lora-dtype bfloat16`, which casts the adapter itself.

    python benchmarks/bench_flux_gpu.py [--out FILE]     # needs a CUDA GPU with ~60 GB
    python benchmarks/bench_flux_gpu.py --toy            # the same code at toy width on CPU (a wiring check)
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch

PROMPTS = {"fill": "a red circle on grass", "extend": "extend the scene", "removal": "remove the object",
           "text": 'the word "OPEN" on a sign'}


def qwen25_vl_7b(tokenizer):
    """Qwen2.5-VL-7B-Instruct's architecture (config.json of the release), the stand-in tokenizer's vocabulary
    inside its 152,064-row embedding."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from onereward.models.judge import IMAGE_PAD, VISION_END, VISION_START

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        vision_config={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                       "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                       "hidden_act": "silu"},
        text_config={"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                     "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                     "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}},
        image_token_id=ids(IMAGE_PAD), vision_start_token_id=ids(VISION_START), vision_end_token_id=ids(VISION_END),
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "sdpa"
    return Qwen2_5_VLForConditionalGeneration(config)


class Meter:
    def __init__(self, device: torch.device):
        self.device = device
        self.results: dict[str, dict] = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def peak_reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        return torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else float("nan")

    def held_gib(self) -> float:
        return torch.cuda.memory_allocated() / 2**30 if self.device.type == "cuda" else float("nan")

    def time(self, name: str, fn, repeats: int = 3, **extra) -> float:
        fn()  # warm-up: kernels, allocator
        self.sync()
        self.peak_reset()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        self.sync()
        seconds = (time.perf_counter() - start) / repeats
        self.results[name] = {"seconds": seconds, "peak_gib": self.peak_gib(), **extra}
        print(f"  {name}: {seconds * 1000:.1f} ms, peak {self.peak_gib():.1f} GiB", flush=True)
        return seconds


class AdapterOff:
    """The policy's frozen base as the reference: sample() with the LoRA adapter switched off."""

    def __init__(self, gen):
        self.gen = gen

    def sample(self, *args, **kwargs) -> torch.Tensor:
        tr = self.gen.pipe.transformer
        tr.disable_adapters()
        try:
            return self.gen.sample(*args, **kwargs)
        finally:
            tr.enable_adapters()


def conditions(n: int, size: int, device: torch.device):
    from onereward.config import TASKS
    from onereward.models import tensors
    from onereward.stages.rl_finetune import Conditions

    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    masks = torch.zeros(n, 1, size, size)
    for i in range(n):  # a box a quarter to a half of each side, as synthesize_masks draws them
        h, w = (torch.randint(size // 4, size // 2, (2,), generator=g)).tolist()
        y, x = (torch.randint(0, size - max(h, w), (2,), generator=g)).tolist()
        masks[i, :, y : y + h, x : x + w] = 1
    tasks = [TASKS[i % len(TASKS)] for i in range(n)]
    targets = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    images, masks, targets = (v.to(device) for v in (images, masks, targets))
    batch = {"images": images, "masks": masks, "targets": targets, "prompts": [PROMPTS[t] for t in tasks],
             "tasks": tasks}
    by_task = {t: [i for i in range(n) if tasks[i] == t] for t in TASKS}
    return Conditions([{}] * n, batch, tensors.masked_input(images, masks), by_task)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--toy", action="store_true", help="toy width on CPU: checks the wiring, measures nothing real")
    ap.add_argument("--out", help="write the measurements as JSON here")
    ap.add_argument("--judge-batch", type=int, default=8)
    ap.add_argument("--rl-batch", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--checkpointing", choices=["on", "off"], default="on",
                    help="activation checkpointing of the FLUX transformer in the RL step")
    ap.add_argument("--lora-dtype", choices=["float32", "bfloat16"], default="float32",
                    help="the adapter's weights (peft makes them in the default dtype, float32)")
    ap.add_argument("--autocast", choices=["fp32", "bf16"], default="fp32",
                    help="rl.autocast: the policy's rollout and anchor under bf16 autocast")
    ap.add_argument("--reference", choices=["adapter", "base"], default="adapter",
                    help="the reference samples through the adapter, or with it switched off")
    ap.add_argument("--jump-window", type=int, nargs=2, metavar=("LO", "HI"),
                    help="rl.jump_window (default: the second half of the steps); LO = HI fixes the rollout's length")
    ap.add_argument("--rl-only", action="store_true", help="skip the sampling and judge measurements")
    args = ap.parse_args()

    from onereward.config import TASKS, RLConfig, load_config
    from onereward.models.flux import FLUX_FILL_DEV, FluxFillGenerator
    from onereward.models.judge import LORA_TARGETS as JUDGE_LORA
    from onereward.models.judge import Judge, JudgeShape, Query, Source, chat_tokenizer, write_toy_checkpoint
    from onereward.models.lora import add_lora
    from onereward.stages.rl_finetune import rl_step
    from onereward.stages.train_reward import both_orders_loss

    device = torch.device("cpu" if args.toy else "cuda")
    dtype = torch.float32 if args.toy else torch.bfloat16
    size, sizes = (32, [32]) if args.toy else (512, [512, 1024])
    steps = 4 if args.toy else 28
    meter = Meter(device)
    criteria = {t: list(getattr(load_config("flux").labels.criteria, t)) for t in TASKS}
    if not args.toy:
        # cuDNN's fused attention failed in the backward of the RL step here (torch 2.11, H100: "mha_graph.execute
        # ... is_good()", or an illegal memory access without CUDA_LAUNCH_BLOCKING); flash attention does not
        torch.backends.cuda.enable_cudnn_sdp(False)
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)

    t0 = time.perf_counter()
    gen = FluxFillGenerator.build_random(size, tuple(PROMPTS.values()) + ("",), None if args.toy else FLUX_FILL_DEV,
                                         dtype=dtype, device=device)
    n_params = sum(p.numel() for p in gen.pipe.transformer.parameters())
    print(f"FLUX Fill transformer: {n_params / 1e9:.2f} B parameters, built in {time.perf_counter() - t0:.0f} s; "
          f"everything held: {meter.held_gib():.1f} GiB", flush=True)
    meter.results["flux"] = {"parameters": n_params, "held_gib": meter.held_gib()}

    print("sampling step (one transformer pass, no gradients):", flush=True)
    for s in [] if args.rl_only else sizes:
        g = gen if s == size else FluxFillGenerator(gen.pipe, s, max_sequence_length=gen.max_sequence_length)
        for b in (1, 2):
            cond = conditions(b, s, device)
            x, m = g._place(cond.batch["images"], cond.batch["masks"])
            with torch.no_grad():
                c, text = g.condition(x, m), g.encode_text(cond.batch["prompts"])
                z = torch.randn(g.model_space_shape(b), device=device, dtype=dtype)
                t = torch.full((b,), 0.5, device=device, dtype=dtype)
                meter.time(f"step {s}px batch {b}", partial(g.predict_x0, z, t, c, text),
                           tokens=z.shape[1] + g.max_sequence_length)
    cond = conditions(1, size, device)
    args.rl_only or meter.time(f"sample {size}px, {steps} steps, VAE decode", lambda: gen.sample(
        cond.batch["images"], cond.batch["masks"], cond.batch["prompts"], steps=steps), repeats=1)

    cells = [(t, c) for t in TASKS for c in criteria[t]]
    tk = chat_tokenizer(cells, list(PROMPTS.values()))
    if args.toy:
        import tempfile

        folder = write_toy_checkpoint(tempfile.mkdtemp() + "/judge", "qwen2_5_vl", cells, list(PROMPTS.values()))
        judge = Judge.from_pretrained(Source(str(folder), 64, "float32"), 32, "qwen2_5_vl", device)
        jshape = judge.shape
    else:
        jshape = JudgeShape(arch="qwen2_5_vl", image_size=448, patch_size=14, merge_size=2, temporal_patch_size=2)
        t0 = time.perf_counter()
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = qwen25_vl_7b(tk)
        torch.set_default_dtype(default)
        add_lora(model, 64, JUDGE_LORA)
        judge = Judge(model, tk, jshape, Source("random initialisation", 64, "bfloat16"))
        n_judge = sum(p.numel() for p in model.parameters())
        print(f"Qwen2.5-VL-7B judge: {n_judge / 1e9:.2f} B parameters, built in {time.perf_counter() - t0:.0f} s; "
              f"everything held: {meter.held_gib():.1f} GiB", flush=True)
        meter.results["judge"] = {"parameters": n_judge, "held_gib": meter.held_gib(),
                                  "tokens_per_image": jshape.tokens_per_image}
    jb = args.judge_batch
    cond = conditions(jb, size, device)
    a, b_ = cond.batch["images"].to(device, dtype), cond.batch["targets"].to(device, dtype)
    q = Query(cond.batch["tasks"], [criteria[t][0] for t in cond.batch["tasks"]], cond.batch["prompts"],
              cond.context.to(device, dtype))
    print(f"judge scoring, {jb} pairs at {jshape.image_size}px ({jshape.tokens_per_image} tokens an image):",
          flush=True)
    judge.model.eval()
    with torch.no_grad():
        args.rl_only or meter.time(f"judge batch {jb}", lambda: judge.p_yes(a, b_, q))
    adapter = judge.trainable_parameters()
    print(f"judge training step, {jb} pairs in both orders, LoRA r=64 on {JUDGE_LORA} "
          f"({sum(p.numel() for p in adapter) / 1e6:.1f} M trainable), gradient checkpointing:", flush=True)
    judge_opt = torch.optim.AdamW(adapter, lr=1e-4)

    def judge_step() -> None:
        loss = both_orders_loss(judge, a, b_, q)
        judge_opt.zero_grad(set_to_none=True)
        loss.backward()
        judge_opt.step()

    judge.model.train()
    if not args.toy:
        judge.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    args.rl_only or meter.time(f"judge training step {jb}", judge_step, repeats=2)
    judge_opt.state.clear()
    judge.model.eval().requires_grad_(False)

    from peft import LoraConfig

    from onereward.models.flux import LORA_TARGETS

    tr = gen.pipe.transformer
    tr.requires_grad_(False)
    tr.add_adapter(LoraConfig(r=64, lora_alpha=64, target_modules=LORA_TARGETS))
    if args.lora_dtype == "bfloat16":
        for p in gen.parameters():
            p.data = p.data.to(torch.bfloat16)
    if args.checkpointing == "on" and not args.toy:
        tr.enable_gradient_checkpointing()
    lora = list(gen.parameters())
    print(f"LoRA r=64 on {LORA_TARGETS}: {sum(p.numel() for p in lora) / 1e6:.1f} M trainable parameters",
          flush=True)
    opt = torch.optim.AdamW(lora, lr=1e-5)
    reference = AdapterOff(gen) if args.reference == "base" else gen
    for rb in args.rl_batch:
        window = tuple(args.jump_window) if args.jump_window else (steps // 2, steps - 1)
        rc = RLConfig(batch_size=rb, sample_steps=steps, jump_window=window, autocast=args.autocast)
        train = conditions(8, size, device)
        rng = torch.Generator().manual_seed(0)
        phases: dict[str, float] = {}
        name = (f"RL step batch {rb} ({steps} reference steps, rollout to a step in {rc.jump_window}, "
                f"checkpointing {args.checkpointing}, LoRA in {args.lora_dtype}, autocast {args.autocast}, "
                f"reference through the {'adapter' if args.reference == 'adapter' else 'base (adapter off)'})")
        try:
            meter.time(name, partial(rl_step, gen, reference, judge, opt, train, rc, criteria, rng, 0, 0, phases),
                       repeats=2)
        except torch.OutOfMemoryError as e:
            print(f"  {name}: out of memory ({str(e).splitlines()[0]})", flush=True)
            meter.results[name] = {"oom": True}
            torch.cuda.empty_cache()
            continue
        total = sum(phases.values())
        meter.results[name]["phases"] = {k: v / total for k, v in phases.items()}
        print("    " + ", ".join(f"{k} {v / total:.0%}" for k, v in phases.items()), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(meter.results, f, indent=1)


if __name__ == "__main__":
    main()
