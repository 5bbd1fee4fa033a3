"""What the stage times were measured on: CPU model, cores, bf16 support, GPU. Stage times differ several-fold
between CPUs (on 2 cores a pretrain step took 0.41 s on a Xeon with AVX-512 BF16 and 0.95-1.05 s on an AVX2-only
EPYC, where bf16 is emulated and autocast "auto" stays in fp32), so every run records them beside its times.
Read without importing torch or initialising CUDA: a fully cached `make run` imports neither."""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown"


def _gpu() -> str:
    if not shutil.which("nvidia-smi"):
        return "none"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    names = [n.strip() for n in out if n.strip()]
    return f"{len(names)} x {names[0]}" if names else "none"


def cores() -> int:
    """The cores this process may run on (the affinity mask: a container's CPU set, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.cache
def facts() -> dict[str, str]:
    """As MLflow tags (`machine.*`): strings only."""
    return {"machine.cpu": cpu_model(), "machine.cores": str(cores()),
            "machine.avx512_bf16": str("avx512_bf16" in _cpuinfo().get("flags", "").split()).lower(),
            "machine.gpu": _gpu()}


def summary() -> str:
    f = facts()
    if f["machine.gpu"] != "none":
        how = f"GPU {f['machine.gpu']} (bf16 autocast on CUDA)"
    elif f["machine.avx512_bf16"] == "true":
        how = "AVX-512 BF16: bf16 autocast"
    else:
        how = "no AVX-512 BF16: fp32"
    return f"{f['machine.cpu']}, {f['machine.cores']} cores, {how}"
