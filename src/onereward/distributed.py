"""Data-parallel training across the processes of one stage run, as `accelerate launch` (or torchrun) starts
them on the GPUs of a node: every process draws its own batch, the gradients are averaged before each optimizer
step, and the main process alone validates, tracks, checkpoints and writes the stage's outputs.

    accelerate launch --num_processes 8 -m onereward stage rl_finetune --config flux --in ... --out ...

Launched as one process (the local runner, tests, `onereward stage`), `Workers()` is that process and every
method is the identity: the single-process loop is the same code, and its results do not change.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # planning the graph imports this module and must not import torch
    import torch


RANK_SEED = 7919  # data-parallel process r draws its rows and noise from seed + RANK_SEED * r


@dataclass(frozen=True)
class Workers:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Each parameter's gradient replaced by its mean over the processes (one all-reduce of all of them)."""
        if self.world == 1:
            return
        import torch
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        params = list(params)
        for p in params:
            if p.grad is None:  # every process must hand the all-reduce the same tensors
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.world
        for g, mean in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(mean)

    def gather(self, obj: Any) -> list[Any]:
        """`obj` of every process, in rank order."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Returns once every process has called it."""
        self.gather(None)

    def seed(self, seed: int) -> int:
        """This process's seed for its draws: the main process draws what a single process does."""
        return seed + RANK_SEED * self.rank

    def from_main(self, obj: Any) -> Any:
        """The main process's `obj`, on every process."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


ONE_PROCESS = Workers()


def workers() -> Workers:
    """This process's place among the stage run's processes, from the launcher's environment."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return ONE_PROCESS
    import torch
    from accelerate import PartialState

    # joins the process group (NCCL on GPUs, gloo on CPUs: accelerate takes a CPU run for one process unless told)
    state = PartialState(cpu=not torch.cuda.is_available())
    return Workers(state.process_index, state.num_processes)
