"""Resumable training state, shared by the training loops (pretrain_base, train_reward, rl_finetune, distill).

One artifact under the stage's scratch URI, replaced atomically at each save, so a kill during a save leaves
the previous checkpoint whole. Weights are safetensors (a model's own `save()` folders, or flat tensor files);
the optimizer and the RNG go through `torch.save` and are read back with `weights_only=True`; the loop's own
progress (validation history, phase, losses) is JSON. What a stage computes once before its loop and must not
compute again on a resume (distill's teacher samples) is kept beside it, saved once (`keep`/`kept`); so are the
finished parts of an output built in parts (generate_candidates: `keep_table`/`kept_table`). The runner deletes the
scratch once the stage's outputs are committed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file

from onereward import storage, tracking
from onereward.distributed import ONE_PROCESS, Workers
from onereward.stages import StageContext

STATE = "state.pt"
PROGRESS = "progress.json"


@dataclass
class Checkpoint:
    step: int
    local: Path  # the checkpoint's files on this machine
    progress: dict[str, Any]
    _state: dict[str, Any]

    def folder(self, name: str) -> Path:
        """A model folder saved with `folders={name: model.save}`."""
        return self.local / name

    def tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        """A flat tensor file saved with `tensors={name: ...}`; None when that save had none."""
        path = self.local / f"{name}.safetensors"
        return load_file(str(path)) if path.exists() else None

    def restore(self, opt: torch.optim.Optimizer, rng: torch.Generator, workers: Workers = ONE_PROCESS,
                seed: int = 0, stage: str = "") -> None:
        """The optimizer and this process's RNG as saved. Of several data-parallel processes each goes on with its
        own draws (`ranks_rng`); one the checkpoint's run did not have (resumed by more processes than left it)
        starts afresh from `seed` + the step, and the main process says how many did."""
        opt.load_state_dict(self._state["optimizer"])
        rng.set_state(self._state["rng"])
        if workers.world == 1:
            return
        kept = self.tensors("ranks_rng") or {}
        if str(workers.rank) in kept:
            rng.set_state(kept[str(workers.rank)])
        elif not workers.main:  # the main process goes on with its own draws, saved as the checkpoint's "rng"
            rng.manual_seed(seed + self.step)
        left = max(len(kept), 1)
        if workers.main and workers.world > left:
            print(f"{stage}: {workers.world} processes resume the checkpoint of {left}; the {workers.world - left} "
                  f"new draw afresh from step {self.step}", flush=True)


def ranks_rng(workers: Workers, rng: torch.Generator) -> dict[str, dict[str, torch.Tensor]]:
    """Every data-parallel process's RNG state, for the main process's checkpoint (`tensors=`): a collective, so
    every process calls it at each save; {} for one process."""
    states = workers.gather(rng.get_state())
    return {"ranks_rng": {str(r): g for r, g in enumerate(states)}} if workers.world > 1 else {}


class Checkpoints:
    """Where one stage run keeps its checkpoint, and how often it saves one. What it saves carries the run's key:
    a scratch left by another configuration under the same output URI (`onereward stage --out` reused) is not
    resumed from."""

    def __init__(self, ctx: StageContext, every: int = 0):
        self.scratch = ctx.scratch()
        self.uri = storage.join(self.scratch, "checkpoint")
        self.every, self.stage, self.key = every, ctx.stage, ctx.key

    def due(self, step: int, total: int) -> bool:
        """After optimizer step `step` of `total`: the last step saves nothing (the stage's output follows); never
        with `every` 0 (a stage that keeps only parts of its output)."""
        return self.every > 0 and step % self.every == 0 and step < total

    def save(self, step: int, opt: torch.optim.Optimizer, rng: torch.Generator, *,
             folders: dict[str, Callable[[Path], None]] | None = None,
             tensors: dict[str, dict[str, torch.Tensor]] | None = None,
             progress: dict[str, Any] | None = None) -> None:
        with storage.writing(self.uri, key=self.key, meta={"step": step}) as w:
            for name, save in (folders or {}).items():
                save(w.dir / name)
            for name, state in (tensors or {}).items():
                _save_tensors(w, name, state)
            torch.save({"optimizer": opt.state_dict(), "rng": rng.get_state(), "step": step}, w.path(STATE))
            w.write_json(PROGRESS, progress or {})

    def _ours(self, uri: str, quiet: bool = False) -> storage.Artifact | None:
        """What this run's configuration saved at `uri`, if anything (`quiet`: without saying why not)."""
        art = storage.Artifact(uri)
        if not art.exists():
            return None
        if art.key != self.key:
            who = ("an older version of onereward (its checkpoints did not carry the run's key)"
                   if art.key.startswith("step-") else f"another configuration (key {art.key}, this run's {self.key})")
            if not quiet:
                print(f"{self.stage}: {uri} was left by {who}: not resumed from", flush=True)
            return None
        return art

    def _local(self, uri: str, quiet: bool = False) -> tuple[Path, dict[str, Any]] | None:
        """The local files and progress JSON of what this run's configuration saved at `uri`, if anything."""
        art = self._ours(uri, quiet)
        if art is None:
            return None
        local = art.local_dir()
        return local, json.loads((local / PROGRESS).read_text())

    def resume(self) -> Checkpoint | None:
        """The checkpoint a killed run of this stage left, if any (said on the stage's output and logged as
        `resumed_from_step`)."""
        found = self._local(self.uri)
        if found is None:
            tracking.log_metrics({"resumed_from_step": 0})
            return None
        local, progress = found
        state = torch.load(local / STATE, weights_only=True)
        ck = Checkpoint(int(state["step"]), local, progress, state)
        print(f"{self.stage}: resuming from checkpoint at step {ck.step} ({self.uri})", flush=True)
        tracking.log_metrics({"resumed_from_step": ck.step})
        return ck

    def keep(self, name: str, tensors: dict[str, torch.Tensor], facts: dict[str, Any]) -> None:
        """Save once what the stage computed before its loop, so a resumed run (from a checkpoint or not) does not
        compute it again, and no checkpoint carries a copy of it."""
        with storage.writing(storage.join(self.scratch, name), key=self.key) as w:
            _save_tensors(w, name, tensors)
            w.write_json(PROGRESS, facts)

    def kept(self, name: str, quiet: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """What `keep(name, ...)` saved in this run or a killed one of this configuration, if anything."""
        found = self._local(storage.join(self.scratch, name), quiet)
        if found is None:
            return None
        local, facts = found
        return load_file(str(local / f"{name}.safetensors")), facts

    def keep_table(self, name: str, table: pa.Table) -> None:
        """Save a finished share of the stage's output rows (generate_candidates' parts), once, atomically."""
        with storage.writing(storage.join(self.scratch, name), key=self.key) as w:
            w.write_table(table)

    def kept_table(self, name: str, quiet: bool = False) -> pa.Table | None:
        """What `keep_table(name, ...)` saved in this run or a killed one of this configuration, if anything."""
        art = self._ours(storage.join(self.scratch, name), quiet)
        return None if art is None else art.read_table()

    def has(self, name: str) -> bool:
        """Whether `keep(name, ...)` or `keep_table(name, ...)` of this configuration has committed (quietly)."""
        return self._ours(storage.join(self.scratch, name), quiet=True) is not None


def _save_tensors(w: storage.ArtifactWriter, name: str, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(w.path(f"{name}.safetensors")))
