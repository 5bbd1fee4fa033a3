"""Stages of a toy graph for the local runner's side-by-side test: a child process imports them by name, so they
live in a module of their own (importing a test module would drag pytest and the fixtures along)."""

import os
import time

from onereward.stages import StageContext


def source(ctx: StageContext) -> dict[str, float]:
    ctx.outputs["seed"].write_json("seed.json", {"seed": ctx.settings.seed})
    return {}


def _branch(ctx: StageContext, out: str, fail: bool = False) -> dict[str, float]:
    start = time.time()
    print(f"{ctx.stage}: started", flush=True)
    ctx.outputs[out].write_json("half.json", {"written": "before the failure or the stop, if any"})
    # long enough to overlap a sibling's start-up (imports, MLflow run) by a wide margin
    time.sleep(float(os.environ.get("SIDE_STAGE_SLEEP", "2.0")))
    if fail:
        raise ValueError(f"{ctx.stage}: row 3, field 'mask' is empty")
    ctx.outputs[out].write_json("who.json", {"pid": os.getpid(), "start": start, "end": time.time(),
                                             "seed": ctx.inputs["seed"].read_json("seed.json")["seed"]})
    return {"slept": time.time() - start}


def left(ctx: StageContext) -> dict[str, float]:
    return _branch(ctx, "left_out")


def right(ctx: StageContext) -> dict[str, float]:
    return _branch(ctx, "right_out")


def right_fails(ctx: StageContext) -> dict[str, float]:
    return _branch(ctx, "right_out", fail=True)


def join(ctx: StageContext) -> dict[str, float]:
    ctx.outputs["joined"].write_json("both.json", [ctx.inputs[a].read_json("who.json") for a in ("left_out",
                                                                                                  "right_out")])
    return {}


FAIL_RANK_1 = 13  # the seed at which `ranks`' process 1 fails before the collective its peer waits in


def ranks(ctx: StageContext) -> dict[str, float]:
    """A data-parallel stage: every process says who it is; the main process writes what all of them said."""
    import torch

    w = ctx.workers
    if w.rank == 1 and ctx.settings.seed == FAIL_RANK_1:
        raise ValueError(f"{ctx.stage}: process 1: row 3, field 'mask' is empty")
    seen = w.gather({"rank": w.rank, "world": w.world, "pid": os.getpid(), "threads": torch.get_num_threads()})
    if not w.main:
        return {}
    ctx.outputs["ranks_out"].write_json("ranks.json", seen)
    return {"processes": len(seen)}
