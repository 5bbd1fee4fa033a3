"""The pipeline graph, declared once. The local runner, the KFP pipeline and the Airflow DAG are all
built from GRAPH, so they cannot drift apart."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

ArtifactKind = Literal["Dataset", "Model", "Metrics", "HTML"]


@dataclass(frozen=True)
class Output:
    name: str
    kind: ArtifactKind = "Dataset"


@dataclass(frozen=True)
class Resources:
    cpu: str = "1"
    memory: str = "4Gi"
    gpu: int = 0
    shm: str | None = None  # size of /dev/shm for data loaders on GPU nodes
    timeout_s: int | None = None  # the pod's deadline (config resources.timeouts); None: none

    @property
    def node_pool(self) -> Literal["gpu", "cpu"]:
        return "gpu" if self.gpu else "cpu"


@dataclass(frozen=True)
class RetryPolicy:
    """How often a failed task is retried and how long it waits: backoff_seconds, then times backoff_factor
    after each further failure, at most max_backoff_seconds. KFP's set_retry and Airflow's retries,
    retry_delay, retry_exponential_backoff and max_retry_delay are both derived from it."""

    retries: int = 2
    backoff_seconds: int = 60
    backoff_factor: float = 2.0
    max_backoff_seconds: int = 3600


@dataclass(frozen=True, kw_only=True)
class Stage:
    name: str
    inputs: tuple[str, ...] = ()  # artifact names produced by earlier stages
    outputs: tuple[Output, ...]
    params: tuple[str, ...]  # Settings sections that, with the inputs, key the outputs
    # "module:function", imported only when the stage runs; default onereward.stages.<name>:<name>
    func: str = ""
    resources: Resources = field(default_factory=Resources)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    version: str = "1"  # bump when the stage's logic changes its outputs
    description: str = ""
    # "module:function" of Settings -> JSON-able fingerprint of external inputs (e.g. a source folder's
    # listing), so that new data under an unchanged configuration is not mistaken for cached work
    fingerprint: str | None = None
    # runs as the processes `accelerate launch` starts (onereward.distributed); the others run in one process
    data_parallel: bool = False

    def __post_init__(self) -> None:
        if not self.func:
            object.__setattr__(self, "func", f"onereward.stages.{self.name}:{self.name}")

    def load(self) -> Callable[..., Any]:
        return _import(self.func)

    def external_fingerprint(self, settings: Any) -> Any:
        return _import(self.fingerprint)(settings) if self.fingerprint else None


def _import(ref: str) -> Callable[..., Any]:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


GPU = Resources(cpu="8", memory="64Gi", gpu=1, shm="16Gi")


@dataclass(frozen=True)
class Graph:
    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        produced: dict[str, str] = {}
        names: set[str] = set()
        for s in self.stages:
            if s.name in names:
                raise ValueError(f"duplicate stage {s.name!r}")
            names.add(s.name)
            for i in s.inputs:
                if i not in produced:
                    raise ValueError(f"stage {s.name!r} reads {i!r}, which no earlier stage produces")
            for o in s.outputs:
                if o.name in produced:
                    raise ValueError(f"artifact {o.name!r} produced twice")
                produced[o.name] = s.name

    def __iter__(self):
        return iter(self.stages)

    def get(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(self.names)}")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def producer(self, artifact: str) -> Stage:
        return next(s for s in self.stages if any(o.name == artifact for o in s.outputs))

    def output_kind(self, artifact: str) -> ArtifactKind:
        return next(o.kind for o in self.producer(artifact).outputs if o.name == artifact)

    def upstream(self, stage: Stage) -> list[Stage]:
        return list(dict.fromkeys(self.producer(a) for a in stage.inputs))

    def with_stage(self, stage: Stage) -> Graph:
        return replace(self, stages=(*self.stages, stage))

    def with_resources(self, gpus: dict[str, int], timeouts: dict[str, int],
                       cpu_processes: dict[str, int] | None = None) -> Graph:
        """The graph with the GPU counts of `gpus` (config `resources.gpus`: stage name -> GPUs of its pod) and the
        deadlines of `timeouts` (`resources.timeouts`: stage name -> seconds). Only a stage that runs on a GPU may
        get one, and more than one only a data-parallel stage, which runs a process per GPU; any other would leave
        the rest idle. `cpu_processes` (the local runner's, checked here) likewise names data-parallel stages only."""
        from onereward.config import ConfigError

        cpu_processes = cpu_processes or {}
        for field_name, names in (("gpus", gpus), ("timeouts", timeouts), ("cpu_processes", cpu_processes)):
            for name in names:
                if name not in self.names:
                    raise ConfigError(f"resources.{field_name}.{name}: unknown stage {name!r}; stages: "
                                      f"{', '.join(self.names)}")
        for name, n in gpus.items():
            stage = self.get(name)
            if not stage.resources.gpu:
                raise ConfigError(f"resources.gpus.{name}: stage {name!r} runs on the CPU node pool")
            if n > 1 and not stage.data_parallel:
                raise ConfigError(f"resources.gpus.{name}: stage {name!r} runs in one process and would use one "
                                 f"of {n} GPUs; only data-parallel stages "
                                 f"({', '.join(s.name for s in self.stages if s.data_parallel)}) take more")
        for name, n in cpu_processes.items():
            if n > 1 and not self.get(name).data_parallel:
                raise ConfigError(f"resources.cpu_processes.{name}: stage {name!r} runs in one process; only "
                                  f"data-parallel stages ({', '.join(s.name for s in self.stages if s.data_parallel)})"
                                  " run as several")
        return replace(self, stages=tuple(
            replace(s, resources=replace(s.resources, gpu=gpus.get(s.name, s.resources.gpu),
                                         timeout_s=timeouts.get(s.name, s.resources.timeout_s)))
            for s in self.stages))


PENDING = "onereward.stages.pending:not_implemented"  # the func of a stage declared before it is built


GRAPH = Graph((
    Stage(name="curate", outputs=(Output("curated"),), params=("image_size", "seed", "curate"), version="2",
          description="ingest, decode, drop corrupt/duplicate/off-size/flat images; Parquet shards",
          fingerprint="onereward.stages.curate:source_fingerprint"),
    Stage(name="synthesize_masks", inputs=("curated",), outputs=(Output("conditions"),),
          params=("image_size", "seed", "curate", "masks"),
          description="fill / extend / removal / text conditions with masks, prompts, targets",
          fingerprint="onereward.stages.synthesize_masks:environment_fingerprint"),
    Stage(name="pretrain_base", inputs=("conditions",), outputs=(Output("base_model", "Model"),),
          params=("image_size", "seed", "generator", "pretrain", "tracking"), resources=GPU, data_parallel=True,
          description="train the tiny base generator, or register an external base (flux)"),
    Stage(name="generate_candidates", inputs=("conditions", "base_model"), outputs=(Output("candidates"),),
          params=("seed", "generator", "candidates"), resources=GPU, data_parallel=True,
          description="N candidates per condition with varied seeds / guidance / steps"),
    Stage(name="label_preferences", inputs=("conditions", "candidates"), outputs=(Output("preferences"),),
          params=("seed", "labels"), version="2",  # 2: pairs name their images, stored once in table "images"
          description="winner/loser per (task, criterion) from a pluggable labeller",
          fingerprint="onereward.data.labelstudio:export_fingerprint"),
    Stage(name="train_reward", inputs=("preferences", "conditions"), outputs=(Output("reward_model", "Model"),),
          params=("seed", "reward"), resources=GPU, data_parallel=True,
          description="train the VLM judge on Yes/No; sanity gate; register it"),
    Stage(name="train_audit_reward", func="onereward.stages.train_reward:train_audit_reward",
          inputs=("preferences", "conditions"), outputs=(Output("audit_model", "Model"),),
          params=("seed", "reward"), resources=GPU, data_parallel=True,
          description="a second judge (other architecture and split) to catch reward hacking; same gate"),
    Stage(name="rl_finetune", inputs=("conditions", "base_model", "reward_model", "audit_model"),
          outputs=(Output("policy", "Model"),), params=("seed", "image_size", "generator", "labels", "rl", "tracking"),
          resources=GPU, data_parallel=True,
          description="OneReward multi-task RL against the judge; ground-truth early stopping; register"),
    Stage(name="distill", inputs=("conditions", "policy"), outputs=(Output("student", "Model"),),
          params=("seed", "image_size", "generator", "distill", "tracking"), resources=GPU, data_parallel=True,
          description="few-step student of the RL teacher with its CFG folded in; register"),
    Stage(name="evaluate", inputs=("conditions", "base_model", "policy", "student", "reward_model", "audit_model"),
          outputs=(Output("evaluation", "Metrics"),),
          params=("seed", "image_size", "generator", "labels", "distill", "evaluate", "tracking"), resources=GPU,
          description="base, RL teacher, student and champion on held-out ground truth and both judges; gates"),
    Stage(name="promote", inputs=("evaluation", "student"), outputs=(Output("promotion", "Metrics"),),
          params=("tracking",), description="registry aliases challenger / champion, after the gates passed"),
))
