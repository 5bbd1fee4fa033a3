"""What the stage times were measured on: CPU model, threads, bf16 support, GPU. Stage times differ several-fold
between CPUs (on 2 cores a pretrain step took 0.41 s on a Xeon with AVX-512 BF16 and 0.95-1.05 s on an AVX2-only
EPYC, where bf16 is emulated and autocast "auto" stays in fp32), so every run records them beside its times."""

from __future__ import annotations

import functools
import platform


@functools.cache
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def facts() -> dict[str, str]:
    """As MLflow tags (`machine.*`): strings only."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"machine.cpu": cpu_model(), "machine.threads": str(torch.get_num_threads()),
            "machine.avx512_bf16": str(torch.cpu._is_avx512_bf16_supported()).lower(), "machine.gpu": gpu}


def summary() -> str:
    f = facts()
    bf16 = "bf16 autocast where asked" if f["machine.avx512_bf16"] == "true" else "no AVX-512 BF16: fp32"
    gpu = "" if f["machine.gpu"] == "none" else f", GPU {f['machine.gpu']}"
    return f"{f['machine.cpu']}, {f['machine.threads']} threads, {bf16}{gpu}"
