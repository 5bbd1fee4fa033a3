"""Shared by the resume tests of the training stages: run a stage as `onereward stage` would in a pod, SIGKILL it
once its checkpoint has reached a step, run the same command again to the end, and compare the result with a run
never killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from onereward import storage


def stage_command(stage: str, inputs: dict[str, str], outputs: dict[str, str], overrides: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "onereward", "stage", stage]
    cmd += [a for name, uri in inputs.items() for a in ("--in", f"{name}={uri}")]
    cmd += [a for name, uri in outputs.items() for a in ("--out", f"{name}={uri}")]
    return cmd + [a for o in overrides for a in ("--set", o)]


def saved_step(checkpoint_uri: str) -> int:
    """The step of the checkpoint at `checkpoint_uri`, 0 while there is none (its manifest is written last)."""
    try:
        return int(storage.Artifact(checkpoint_uri).manifest["step"])
    except (FileNotFoundError, OSError, ValueError, KeyError):
        return 0


def data_parallel(cmd: list[str], processes: int) -> list[str]:
    """`cmd` (a `python -m onereward ...` command) as `processes` processes under torchrun, gloo on the CPU: what
    `accelerate launch` starts on a GPU node."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, "--standalone", "--nproc_per_node", str(processes), *cmd[1:]]


def run_data_parallel(cmd: list[str], env: dict[str, str]) -> str:
    """`cmd` (a `data_parallel` command of two processes) to the end: the main process says "done", the other
    "worker"; its output."""
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    said = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"stage"')]
    assert sorted(o["status"] for o in said) == ["done", "worker"], done.stdout[-2000:]
    return done.stdout


def kill_after_checkpoint(cmd: list[str], env: dict[str, str], checkpoint_uri: str, at_least: int = 1,
                          timeout_s: float = 300) -> tuple[int, str]:
    """Start `cmd`, SIGKILL it and every process it started (a launcher's workers sit in sessions of their own)
    once its checkpoint records a step >= `at_least`; the checkpoint's step and the process's output."""
    import psutil

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout_s
    while time.time() < deadline and saved_step(checkpoint_uri) < at_least and proc.poll() is None:
        time.sleep(0.02)
    tree = [proc.pid]
    try:
        tree += [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    log = proc.communicate()[0]
    step = saved_step(checkpoint_uri)
    assert proc.returncode == -signal.SIGKILL and step >= at_least, (proc.returncode, step, log[-2000:])
    return step, log


def rerun_to_the_end(cmd: list[str], env: dict[str, str], killed_at: int, stage: str) -> str:
    """The same command again: it must say it resumes at `killed_at` and finish (its main process says "done");
    its output."""
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-3000:]
    assert f"{stage}: resuming from checkpoint at step {killed_at}" in said, said[-3000:]
    outcomes = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"stage"')]
    assert "done" in [o["status"] for o in outcomes], done.stdout[-2000:]
    return said


def assert_same_weights(a: storage.Artifact, b: storage.Artifact, folder: str) -> None:
    files = [f for f in a.files(folder) if f.endswith(".safetensors")]
    assert files, f"no weights under {a.uri}/{folder}"
    for rel in files:
        x, y = load_file(a.local_dir() / rel), load_file(b.local_dir() / rel)
        assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], atol=1e-5) for k in x), rel


def assert_same_metrics(got: dict[str, float], want: dict[str, float], rel: float = 1e-3) -> None:
    """Every metric equal within `rel` (relative above 1), timings excepted."""
    assert got.keys() == want.keys()
    off = {k: (got[k], want[k]) for k in want
           if "seconds" not in k and abs(got[k] - want[k]) >= rel * max(1.0, abs(want[k]))}
    assert not off, off
