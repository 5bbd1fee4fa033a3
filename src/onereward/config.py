"""Typed configuration: one pydantic model tree, loaded from configs/*.yaml plus `a.b=value` overrides.

Unknown keys and bad values are refused with the dotted path of the offending key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

TASKS = ("fill", "extend", "removal", "text")
Task = Literal["fill", "extend", "removal", "text"]
CONFIG_DIR = Path(os.environ.get("ONEREWARD_CONFIG_DIR", Path(__file__).resolve().parents[2] / "configs"))


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key path."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# json_schema_extra of a field that says how often a stage saves, not what it makes: left out of the stage keys,
# so changing it neither reruns the stage nor stops a killed run from resuming from its checkpoint
NOT_IN_KEY = {"in_key": False}
# json_schema_extra of a field added after stages were keyed, whose default is what they did before it: left out of
# the keys while it holds its default, so adding it reran nothing
IN_KEY_UNLESS_DEFAULT = {"in_key": "unless_default"}


def key_fields(model: BaseModel) -> dict[str, Any]:
    """model_dump(mode="json") without the fields marked NOT_IN_KEY, in the model and the models it holds
    directly (a marked field of a model inside a list or dict would stay in: there is none)."""
    dumped = model.model_dump(mode="json")

    def keep(m: BaseModel, d: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for name, info in type(m).model_fields.items():
            marked = info.json_schema_extra.get("in_key") if isinstance(info.json_schema_extra, dict) else None
            value = getattr(m, name)
            if marked is False or (marked == "unless_default" and value == info.get_default(call_default_factory=True)):
                continue
            out[name] = keep(value, d[name]) if isinstance(value, BaseModel) else d[name]
        return out

    return keep(model, dumped)


class ProceduralSource(Strict):
    kind: Literal["procedural"] = "procedural"
    count: int = Field(400, ge=1)
    photos: bool = True  # crops of photos bundled with scikit-image as backgrounds
    clipart: bool = True  # Debian openclipart-png objects when installed


class FolderSource(Strict):
    kind: Literal["folder"] = "folder"
    path: str


class ManifestSource(Strict):
    kind: Literal["manifest"] = "manifest"
    uri: str
    column: str = "uri"


Source = Annotated[ProceduralSource | FolderSource | ManifestSource, Field(discriminator="kind")]


class CurateConfig(Strict):
    sources: list[Source] = Field(default_factory=lambda: [ProceduralSource()])
    min_side: int = Field(16, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)  # decompression-bomb guard, checked before decoding
    min_std: float = Field(2.0, ge=0)  # near-constant images are dropped
    dedup_hamming: int = Field(0, ge=0, le=64)  # perceptual-hash distance counted as duplicate
    shard_rows: int = Field(512, ge=1)


class MaskConfig(Strict):
    task_mix: dict[Task, float] = Field(
        default_factory=lambda: {"fill": 0.25, "extend": 0.25, "removal": 0.25, "text": 0.25}
    )
    conditions_per_image: int = Field(2, ge=1)
    coverage: dict[Task, tuple[float, float]] = Field(
        default_factory=lambda: {
            "fill": (0.04, 0.45),
            "extend": (0.1, 0.5),
            "removal": (0.02, 0.6),
            "text": (0.04, 0.5),
        }
    )
    extend_ratios: list[float] = Field(default_factory=lambda: [0.125, 0.25, 0.375])
    removal_dilation: int = Field(1, ge=0)
    latin_texts: list[str] = Field(default_factory=lambda: ["A7", "OK", "HI", "42", "GO", "XY"])
    chinese_texts: list[str] = Field(default_factory=lambda: ["中", "山", "水", "日"])
    heldout_fraction: float = Field(0.1, ge=0, lt=1)
    mix_tolerance: float = Field(0.15, ge=0, le=1)  # allowed |share - target| in validation

    @model_validator(mode="after")
    def _check(self) -> MaskConfig:
        if sum(self.task_mix.values()) <= 0:
            raise ValueError("task_mix must give at least one task a positive weight")
        for task, (lo, hi) in self.coverage.items():
            if not 0 < lo < hi <= 1:
                raise ValueError(f"coverage.{task} must satisfy 0 < low < high <= 1")
        return self


class GeneratorConfig(Strict):
    kind: Literal["tiny_unet", "flux_fill"] = "tiny_unet"
    base_uri: str | None = None  # flux: local path or s3:// URI of a FluxFill checkpoint
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention_heads: int = Field(2, ge=1)  # tiny UNet: 2 heads of 32 channels; 8 of 8 ran 2x slower on CPU
    text_hidden: int = 64
    text_layers: int = 2
    max_prompt_tokens: int = 8
    dtype: Literal["float32", "bfloat16"] = "float32"
    lora_rank: int = Field(0, ge=0)
    # the negative branch of true CFG; the tiny tokenizer's vocabulary is built with it, so it belongs
    # to the generator (and so to the base model's key), not to a sampling stage
    negative_prompt: str = ""


class PretrainConfig(Strict):
    steps: int = Field(600, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)
    mask_loss_weight: float = Field(2.0, ge=1)  # loss weight inside the mask relative to outside
    checkpoint_every: int = Field(100, ge=1, json_schema_extra=NOT_IN_KEY)
    eval_conditions: int = Field(50, ge=1)  # held-out conditions per task for the baseline check
    eval_steps: int = Field(4, ge=1)
    # samples a held-out condition; the gate reads their mean, the base's estimate of the conditional mean, as
    # the baselines are point estimates and one sample carries the spread they do not (README: the base's gate)
    gate_samples: int = Field(4, ge=1)
    sample_grid_rows: int = Field(4, ge=1)
    threads: int = Field(0, ge=0)  # torch threads; 0 = leave torch's default
    # bf16 autocast for the forward pass (fp32 weights and optimizer); "auto" = where the CPU has AVX-512
    # BF16 or on CUDA. Measured on 2 cores: 1.6x faster a step with the same held-out quality.
    autocast: Literal["auto", "bf16", "fp32"] = "auto"
    # tasks whose held-out measure must beat both trivial baselines, or nothing is registered and the
    # stage fails (models/tensors.py GATE_MEASURE says what each task is measured by)
    gate_tasks: list[Task] = Field(default_factory=lambda: list(TASKS))


class CandidatesConfig(Strict):
    per_condition: int = Field(4, ge=1)
    max_conditions: int = Field(200, ge=1)
    steps: list[int] = Field(default_factory=lambda: [4, 8])
    guidance: list[float] = Field(default_factory=lambda: [1.0, 2.0])
    batch_size: int = Field(32, ge=1)
    # conditions a part: its candidates are sampled, then kept in the scratch at once (memory holds one part; a
    # killed run resumes at the parts it had not kept; data-parallel processes take parts in turn)
    part_conditions: int = Field(1024, ge=1, json_schema_extra=IN_KEY_UNLESS_DEFAULT)


Criterion = Literal["alignment", "consistency", "structure", "aesthetics", "removal_quality", "text_correctness"]
Degradation = Literal["blur", "wash", "noise", "masked_input", "flat"]
_FILL_EXTEND: list[Criterion] = ["alignment", "consistency", "structure", "aesthetics"]


class CriteriaConfig(Strict):
    """The evaluation criteria of each task (the paper's); a task with none gets no pairs."""

    fill: list[Criterion] = Field(default_factory=lambda: list(_FILL_EXTEND))
    extend: list[Criterion] = Field(default_factory=lambda: list(_FILL_EXTEND))
    removal: list[Criterion] = Field(default_factory=lambda: ["removal_quality"])
    text: list[Criterion] = Field(default_factory=lambda: ["text_correctness"])


class LabelsConfig(Strict):
    kind: Literal["auto", "import"] = "auto"  # auto: from the procedural ground truth; import: Label Studio
    import_uri: str | None = None  # Label Studio JSON export (local path or s3://), for kind=import
    criteria: CriteriaConfig = Field(default_factory=CriteriaConfig)
    # a candidate pair is labelled only when the loser's measure is at least this share worse than the winner's
    min_margin: float = Field(0.1, ge=0, lt=1)
    # probability of flipping a candidate-vs-candidate label (annotator disagreement); above 0.5 the
    # majority of labels would be wrong
    noise: float = Field(0.0, ge=0, le=0.5)
    degradations: list[Degradation] = Field(
        default_factory=lambda: ["blur", "wash", "noise", "masked_input", "flat"])
    degraded_per_condition: int = Field(2, ge=0)  # collapsed losers per condition, kinds drawn without replacement

    @model_validator(mode="after")
    def _check(self) -> LabelsConfig:
        if self.kind == "import" and not self.import_uri:
            raise ValueError("import_uri is required when kind is import")
        if len(set(self.degradations)) != len(self.degradations):
            raise ValueError("degradations must not repeat a kind")
        if self.degraded_per_condition > len(self.degradations):
            raise ValueError("degraded_per_condition exceeds the number of degradations")
        return self


class JudgeSpec(Strict):
    """One judge: its architecture, which conditions it holds out, and the registered model's name; built from a
    small config (`tiny`) or, with `base_uri`, a pretrained Qwen-VL checkpoint trained through a LoRA adapter."""

    arch: Literal["qwen2_vl", "qwen2_5_vl"] = "qwen2_vl"
    split_seed: int = 0  # which conditions are held out (hash of seed and condition id)
    model_name: str = "onereward-reward-model"
    # local path or s3:// URI of a Qwen2.5-VL / Qwen2-VL checkpoint with its tokenizer (its config must be `arch`)
    base_uri: str | None = Field(None, json_schema_extra=IN_KEY_UNLESS_DEFAULT)
    lora_rank: int = Field(0, ge=0, json_schema_extra=IN_KEY_UNLESS_DEFAULT)  # on the language model's attention
    # the side images are shown at: a multiple of patch x merge (8 on `tiny`, 28 on Qwen2.5-VL-7B); None: 32 on a
    # tiny judge, 448 on a pretrained one (256 tokens an image)
    image_size: int | None = Field(None, ge=8, json_schema_extra=IN_KEY_UNLESS_DEFAULT)
    dtype: Literal["float32", "bfloat16"] = Field("bfloat16", json_schema_extra=IN_KEY_UNLESS_DEFAULT)
    gradient_checkpointing: bool = Field(False, json_schema_extra=IN_KEY_UNLESS_DEFAULT)

    @model_validator(mode="after")
    def _adapter(self) -> JudgeSpec:
        if self.base_uri and not self.lora_rank:
            raise ValueError(f"judge {self.model_name}: a pretrained judge (base_uri) trains a LoRA adapter; set "
                             "its lora_rank (full fine-tuning of a 7B judge is not built)")
        return self

    @property
    def side(self) -> int:
        return self.image_size or (448 if self.base_uri else 32)


class RewardConfig(Strict):
    """The judges (train_reward, train_audit_reward): tiny VLMs on `tiny`, trained on both orders of each
    labelled pair. The audit judge differs from the training judge in architecture and held-out split."""

    steps: int = Field(1500, ge=1)
    batch_size: int = Field(32, ge=1)  # pairs a step; each is seen in both orders
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(0, ge=0)
    # after the warm-up: "constant", or "cosine" towards 0 by the last step (the last weights are the ones gated)
    lr_decay: Literal["constant", "cosine"] = "constant"
    vision_warmup_steps: int = Field(0, ge=0)  # Bradley-Terry steps on the vision tower first (train_reward)
    heldout_fraction: float = Field(0.2, gt=0, lt=1)  # share of conditions whose pairs are held out
    eval_every: int = Field(250, ge=1)
    # steps (warm-up and pairwise counted together); a killed run resumes
    checkpoint_every: int = Field(250, ge=1, json_schema_extra=NOT_IN_KEY)
    # held-out pairs scored for the accuracy curve every `eval_every` steps (every k-th pair, so all kinds and
    # cells stay in); the final metrics and the gate read all held-out pairs
    curve_pairs: int = Field(600, ge=1)
    # share of each batch per kind of pair (label_preferences' `kind`), however many pairs of each there are
    kind_share: dict[str, float] = Field(default_factory=lambda: {
        "cand_vs_cand": 1 / 3, "target_vs_cand": 1 / 3, "cand_vs_degraded": 1 / 3})
    augment: bool = True  # each training pair turned or mirrored at random (the same way for both images)
    augment_skip: list[Task] = Field(default_factory=lambda: ["text"])
    # sanity gate on held-out pairs, per task; a judge below either is not registered
    min_target_vs_base: float = Field(0.7, ge=0, le=1)
    min_base_vs_collapsed: float = Field(0.9, ge=0, le=1)
    gate_tasks: list[Task] = Field(default_factory=lambda: ["fill", "extend", "removal", "text"])
    judge: JudgeSpec = Field(default_factory=JudgeSpec)
    audit: JudgeSpec = Field(default_factory=lambda: JudgeSpec(
        arch="qwen2_5_vl", split_seed=1, model_name="onereward-reward-model-audit"))

    @model_validator(mode="after")
    def _audit_differs(self) -> RewardConfig:
        a, j = self.audit, self.judge
        if a.arch == j.arch or a.split_seed == j.split_seed:
            # two judges differing only by seed were measured to share their blind spots
            raise ValueError("reward.audit must differ from reward.judge in both arch and split_seed")
        if a.model_name == j.model_name:
            raise ValueError("reward.audit.model_name must differ from reward.judge.model_name")
        if self.vision_warmup_steps and (a.base_uri or j.base_uri):
            raise ValueError("reward.vision_warmup_steps trains a tiny judge's vision tower; a pretrained judge "
                             "(base_uri) keeps its own frozen: set reward.vision_warmup_steps to 0")
        return self


class RLConfig(Strict):
    """rl_finetune: reward feedback learning of the generator against the training judge, all tasks at once
    (OneReward, arXiv 2508.21066, Alg. 1-2), with a ground-truth validation that stops reward hacking."""

    steps: int = Field(300, ge=1)  # optimizer steps
    batch_size: int = Field(8, ge=1)  # conditions a step (each a task, a criterion and two images)
    lr: float = Field(1e-5, gt=0)  # 1e-4 collapsed the tiny generator within 100 steps (ENVIRONMENT.md)
    # task of each batch row by these probabilities (paper: fill 50 %, extend 25 %, removal 25 %)
    task_probs: dict[Task, float] = Field(default_factory=lambda: {
        "fill": 0.4, "extend": 0.2, "removal": 0.2, "text": 0.2})
    sample_steps: int = Field(8, ge=2)  # denoising steps of the policy rollout and the reference
    jump_window: tuple[int, int] = (4, 7)  # the policy's one-jump step is drawn from [lo, hi] of sample_steps
    guidance: float = Field(1.0, ge=1.0)
    reference: Literal["base", "ema"] = "base"  # frozen base, or the policy's EMA (the paper's dynamic variant)
    ema_decay: float = Field(0.95, gt=0, lt=1)
    reward_bound: float = Field(0.8, gt=0, le=1)  # λ: loss max(0, λ - P(policy better)); no gain beyond it
    anchor_weight: float = Field(1.0, ge=0)  # supervised flow-matching loss on conditions with targets
    # the judge sees the generated region pasted into the input, so its gradient reaches only the masked
    # pixels: on the raw image it moved the background by 1-2 dB PSNR within 20 steps at lr 1e-5
    judge_composite: bool = True
    # each pair shown to the judge turned or mirrored at random (as the judge was trained), so the policy
    # cannot fit one view's adversarial pixels
    judge_augment: bool = True
    augment_skip: list[Task] = Field(default_factory=lambda: ["text"])
    background_weight: float = Field(1.0, ge=0)  # MSE of the policy's image to the input outside the mask
    mask_loss_weight: float = Field(2.0, ge=1)
    grad_clip: float = Field(1.0, gt=0)
    autocast: Literal["auto", "bf16", "fp32"] = "fp32"
    threads: int = Field(0, ge=0)
    checkpoint_every: int = Field(50, ge=1, json_schema_extra=NOT_IN_KEY)
    # ground-truth validation on held-out conditions: early stopping when the policy drifts off the data
    eval_every: int = Field(50, ge=1)
    eval_conditions: int = Field(24, ge=1)  # per task
    max_bg_psnr_drop: float = Field(1.0, ge=0)  # dB below the base, per task, outside the mask
    max_mask_error_rise: float = Field(0.10, ge=0)  # relative rise of the in-mask error vs the base, per task
    # a run whose best validated step is the base itself registers nothing and fails (off: register it anyway)
    require_improvement: bool = True
    audit_conditions: int = Field(48, ge=1)  # per task, for the audit judge's win rate at the end
    bootstrap: int = Field(1000, ge=100)
    grid_rows: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _check(self) -> RLConfig:
        lo, hi = self.jump_window
        if not 0 <= lo <= hi < self.sample_steps:
            raise ValueError(f"jump_window {self.jump_window} must lie in [0, sample_steps={self.sample_steps})")
        if not any(v > 0 for v in self.task_probs.values()):
            raise ValueError("task_probs must give some task a positive probability")
        return self


class DistillConfig(Strict):
    """distill: a few-step student of the RL teacher with its true CFG folded in (one pass a step), trained on the
    teacher's own trajectories: from the teacher's point at a student grid time, one student Euler step must land
    on the teacher's point at the next grid time."""

    steps: int = Field(4, ge=1)  # the student's sampling steps (what it is registered and served with)
    # Step counts trained. The student is not told its step size, so grids that share a segment start (every grid
    # starts at t = 1) ask it for two different x0 from the same input and it learns their average. Measured on
    # tiny (28-step teacher, 100 steps, 48 held-out conditions a task, student vs base): [1, 2, 4] served at 4 steps
    # had extend measure +8.7 % (tolerance 10 %) and ground-truth quality 0.977; [2, 4] +6.8 %, 0.973; [4] +0.8 %,
    # 1.017, with every per-task delta within 2.7 % save removal in-mask error (-9.7 %)
    grids: list[int] = Field(default_factory=lambda: [4])
    report_steps: list[PositiveInt] = Field(default_factory=lambda: [1, 2, 4])  # measured (distill, evaluate)
    teacher_steps: int = Field(28, ge=1)  # must be a multiple of every grid
    teacher_guidance: float = Field(2.0, ge=1.0)  # true CFG: two passes a step
    train_conditions: int = Field(512, ge=1)  # teacher trajectories, drawn once from the train split
    # conditions a teacher sampling batch: a part of its states that a kill keeps and data-parallel processes share
    teacher_batch: int = Field(64, ge=1, json_schema_extra=IN_KEY_UNLESS_DEFAULT)
    train_steps: int = Field(400, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)
    mask_loss_weight: float = Field(2.0, ge=1)  # the region to generate weighs this much more than the kept one
    # MSE of the student's x0 to the input outside the mask: there the input is the answer, and the teacher's own
    # background (its imitation target) is ~30 dB from it. Measured on tiny (student vs base, held out): at 0 the
    # text background fell 0.52 dB (the gate refused it), at 1 0.32 dB, at 4 it rose 0.07-1.05 dB on every task
    background_weight: float = Field(4.0, ge=0)
    autocast: Literal["auto", "bf16", "fp32"] = "auto"  # the student's training passes
    threads: int = Field(0, ge=0)
    # training steps; a killed run resumes with the teacher's samples
    checkpoint_every: int = Field(50, ge=1, json_schema_extra=NOT_IN_KEY)

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if self.steps not in self.grids:
            raise ValueError(f"steps {self.steps} must be one of grids {self.grids}")
        bad = [g for g in self.grids if g < 1 or self.teacher_steps % g]
        if bad:
            raise ValueError(f"teacher_steps {self.teacher_steps} must be a multiple of every grid (not of {bad})")
        return self


class GateConfig(Strict):
    """evaluate's gates, in one place. The challenger (the distilled student) is compared with the champion, or
    with the base when there is none."""

    min_audit_win_rate_low: float = Field(0.5, ge=0, le=1)  # 95 % bootstrap lower bound of the audit win rate
    # without a champion, the win-rate gate is asked against the base (false: the first champion needs the
    # ground-truth gates only)
    win_rate_vs_base: bool = True
    max_bg_psnr_drop: float = Field(0.5, ge=0)  # dB, per task, outside the mask
    max_mask_error_rise: float = Field(0.05, ge=0)  # relative, per task
    max_measure_rise: float = Field(0.05, ge=0)  # relative, per task, the task's own measure
    # per task, in place of max_measure_rise for the tasks it names
    max_measure_rise_by_task: dict[Task, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    min_student_quality: float = Field(0.95, ge=0)  # student vs teacher at its step count
    # what the student's quality ratio is made of: the teacher/student ratio of the ground-truth measures, and
    # the student's audit win rate vs the base over the teacher's; the gate takes the lower
    student_quality_from: list[Literal["ground_truth", "audit"]] = Field(
        default_factory=lambda: ["ground_truth", "audit"], min_length=1)


class EvaluateConfig(Strict):
    conditions: int = Field(48, ge=1)  # held-out conditions per task
    bootstrap: int = Field(1000, ge=100)
    same_margin: float = Field(0.05, ge=0, lt=0.5)  # |P - 0.5| below this is "Same" in Good/Same/Bad
    latency_images: int = Field(16, ge=1)  # single-image calls timed per model (their median)
    # ... or fewer once a model's calls took this long (3 at least): the 28-step teacher's 16 calls took 52 s of
    # evaluate's 232 on 2 cores, and a 1.4-3 s call already averages out the jitter that moves a 0.1 s one
    latency_budget_s: float = Field(10.0, gt=0)
    grid_rows: int = Field(4, ge=1)
    gates: GateConfig = Field(default_factory=GateConfig)


class Resources(Strict):
    gpu_node_pool: str = "gpu-pool"
    gpu_type: str = "nvidia.com/gpu"
    gpu_accelerator: str = "NVIDIA_H100_80GB"  # value of the node selector / KFP accelerator type
    toleration_key: str = "nvidia.com/gpu"
    cpu_node_pool: str = "cpu-pool"
    # GPUs of a stage's KFP task / Airflow pod where the graph's one will not do (stage name -> count): a
    # data-parallel stage (generate_candidates, train_reward, train_audit_reward, rl_finetune, distill) runs a
    # process per GPU under `accelerate launch`, each drawing its own batch (the global batch is GPUs x the stage's
    # batch size; generate_candidates' processes take its parts in turn). Not in any key, like the node pool: a
    # cached result is reused whatever the count, and a killed run resumes with another (the new processes draw
    # afresh). The local runner runs each stage as one process. pretrain_base is the exception to "each its own
    # batch": its processes share `pretrain.batch_size` (below).
    gpus: dict[str, PositiveInt] = Field(default_factory=dict)
    # Processes the local runner starts for a data-parallel stage on a machine without a GPU (stage name -> count,
    # at most one a core, the cores shared out between them; `--jobs 1` runs it as one). pretrain_base's processes
    # draw the same batch and each computes its slice, so the count changes the speed, not the training; the other
    # stages' processes draw a batch each, as on GPUs. Not in any key. KFP and Airflow run a stage's pod as one
    # process unless `gpus` gives it several.
    cpu_processes: dict[str, PositiveInt] = Field(default_factory=dict)
    # Seconds a stage's KFP task / Airflow task may run (stage name -> seconds) before it is failed and retried by
    # its retry policy: a data-parallel process that hangs (a collective that never returns, a part never kept)
    # otherwise holds its node until someone looks. Not in any key; the local runner sets none. None by default:
    # no stage has been timed at real size.
    timeouts: dict[str, PositiveInt] = Field(default_factory=dict)


class StorageConfig(Strict):
    """How S3 calls are retried (transient faults: 503 SlowDown, 5xx, resets, timeouts) and timed out.
    Not part of any stage's key: it changes how artifacts are fetched, never what they hold."""

    attempts: int = Field(6, ge=1)
    backoff_s: float = Field(0.2, ge=0)  # first retry delay; doubles each retry, with jitter
    backoff_max_s: float = Field(5.0, ge=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    request_timeout_s: float = Field(60.0, gt=0)


class TrackingConfig(Strict):
    experiment: str = "onereward"
    generator_model_name: str = "onereward-generator"


class Settings(Strict):
    profile: str = "tiny"
    image_size: int = Field(32, ge=8)
    seed: int = 0
    artifact_root: str | None = None  # default: $ONEREWARD_HOME/artifacts
    curate: CurateConfig = Field(default_factory=CurateConfig)
    masks: MaskConfig = Field(default_factory=MaskConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    candidates: CandidatesConfig = Field(default_factory=CandidatesConfig)
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    resources: Resources = Field(default_factory=Resources)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def resolved_artifact_root(self) -> str:
        return self.artifact_root or str(home_dir() / "artifacts")


def home_dir() -> Path:
    return Path(os.environ.get("ONEREWARD_HOME", ".onereward")).resolve()


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {path}: {e['msg']}")
    return "\n".join(lines)


def _apply_override(data: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.path=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part) if isinstance(node, dict) else None
        if nxt is None:
            nxt = {}
            node[part] = nxt
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = nxt
    node[parts[-1]] = yaml.safe_load(raw)


def resolve_profile(profile: str) -> Path:
    path = Path(profile)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return CONFIG_DIR / f"{profile}.yaml"


def load_config(profile: str = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> Settings:
    """Load a profile name (configs/NAME.yaml) or a YAML path, then apply `a.b=value` overrides."""
    path = resolve_profile(profile)
    if not path.exists():
        raise ConfigError(f"no configuration file {path} for profile {profile!r}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for ov in overrides:
        _apply_override(data, ov)
    try:
        return Settings.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, str(path))) from None


def settings_from_json(text: str) -> Settings:
    try:
        return Settings.model_validate_json(text)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, "json")) from None
