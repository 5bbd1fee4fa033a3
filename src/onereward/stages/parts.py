"""Work done in parts that a stage's data-parallel processes take in turn, each part kept in the stage's scratch
(`Checkpoints.keep` / `keep_table`) as soon as it is done: memory holds one part, a killed run resumes at the parts
it had not kept, and N processes each do 1/N (generate_candidates' samples, distill's teacher states). A part is
the same whoever computes it, so the result does not depend on the processes or the kills."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from onereward.distributed import Workers
from onereward.stages.checkpoint import Checkpoints

T = TypeVar("T")


def parts_left(kept: Checkpoints, workers: Workers, names: list[str], what: str) -> tuple[list[int], int]:
    """This process's share (every world-th, from its rank) of the parts no run of this configuration has kept as
    `names[i]`, and how many a killed run had kept. The main process decides what is left (a collective: every
    process calls it), so no process counts a part that another has just kept."""
    todo = workers.from_main([i for i, name in enumerate(names) if not kept.has(name)])
    resumed = len(names) - len(todo)
    if workers.main and resumed:
        print(f"{kept.stage}: {resumed} of {len(names)} {what} kept by a killed run ({kept.scratch}); "
              f"computing the other {len(todo)}", flush=True)
    return todo[workers.rank :: workers.world], resumed


def wait_for(read: Callable[[], T | None], what: str, stage: str, every_s: float = 60) -> T:
    """`read()` once it is not None: a part another process is still computing (that process failing stops the
    launcher's whole group, this one included)."""
    said = time.monotonic()
    while (got := read()) is None:
        if time.monotonic() - said > every_s:
            print(f"{stage}: waiting for {what}", flush=True)
            said = time.monotonic()
        time.sleep(1)
    return got
