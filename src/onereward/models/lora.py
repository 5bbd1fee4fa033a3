"""LoRA adapters (peft) on a frozen network loaded from an external checkpoint: the FLUX generator's transformer
and a pretrained judge's language model. Only the adapter is trained and saved; the base stays at its URI."""

from __future__ import annotations

from pathlib import Path

import torch

ADAPTER = "adapter.safetensors"


def add_lora(module: torch.nn.Module, rank: int, targets: list[str]) -> None:
    """Freeze `module` and add a rank-`rank` adapter on the `targets` projections. The adapter starts as the base
    (B = 0) from a fixed A, made on the CPU: every load of the base is the same network, so a resumed run and an
    unkilled one start alike, and digests compare."""
    # peft's own injection, not transformers' add_adapter: that one asks for a newer peft than installs here
    from peft import LoraConfig, inject_adapter_in_model

    module.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), module)


def has_adapter(module: torch.nn.Module) -> bool:
    return "default" in getattr(module, "peft_config", {})


def adapter_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(module).items()}


def save_adapter(module: torch.nn.Module, file: Path) -> None:
    from safetensors.torch import save_file

    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(module), str(file))


def load_adapter(module: torch.nn.Module, file: Path, what: str) -> None:
    """The adapter saved at `file` into `module`'s (`what` names the setting that gives it one)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not has_adapter(module):
        raise ValueError(f"{file}: a LoRA adapter needs {what} > 0")
    device = next(module.parameters()).device
    result = set_peft_model_state_dict(module, load_file(str(file), device=str(device)))
    if result.unexpected_keys:
        raise ValueError(f"{file}: adapter weights the network does not have: {result.unexpected_keys[:3]}")
