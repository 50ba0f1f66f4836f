"""Where bfloat16 pays. Only on hardware that multiplies it natively (CUDA since Ampere, a CPU with
AVX512-BF16 or AMX); elsewhere torch emulates it and it runs slower than float32, so every "auto" setting
(training's mixed precision, a teacher's feature pass) resolves to float32 there."""
from __future__ import annotations

from typing import Callable

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def native_bf16(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    cpu = getattr(torch, "cpu", None)
    probes = [getattr(cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(p()) for p in probes if callable(p))


def resolve_dtype(setting: str | None, device: torch.device | str,
                  native: Callable[[torch.device], bool] = native_bf16) -> str:
    """A dtype setting ("float32" | "bfloat16" | "auto"; None = "float32") as the name it runs in on `device`."""
    if setting in (None, "float32"):
        return "float32"
    if setting == "bfloat16":
        return "bfloat16"
    if setting == "auto":
        return "bfloat16" if native(torch.device(device)) else "float32"
    raise ValueError(f"dtype {setting!r}: expected one of 'float32', 'bfloat16', 'auto'")
