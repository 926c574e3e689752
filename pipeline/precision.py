"""The arithmetic a training runs in: ``<ds>.train.precision`` (auto, fp32, bf16, fp16), resolved per machine.

Mixed precision is torch's autocast; ``auto`` is bf16 on a GPU that has it, else fp16 with a ``GradScaler``; on a
CPU, fp32. Measurements and reasons: docs/training.md, "Precision".
"""

from __future__ import annotations

import contextlib

import torch

from pipeline.params import ParamError
from pipeline.runtime import cpu_isa

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
NATIVE_BF16_CPU_ISAS = ("amx_tile", "avx512_bf16")  # cpu_isa() names, best first; both imply bf16 dot products
# Flip when a measurement shows bf16 on a native-bf16 CPU reaching the same quality as fp32.
AUTO_BF16_ON_NATIVE_CPU = False


def native_bf16_cpu() -> bool:
    return cpu_isa() in NATIVE_BF16_CPU_ISAS


def resolve(requested: str, device: torch.device, key: str) -> str:
    """The precision to train in for ``requested`` on ``device``; ``key`` names the param."""
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return "bf16" if bf16 else "fp16"
        if requested == "bf16" and not bf16:
            raise ParamError(
                f"{key}: bf16 needs a GPU that supports it ({torch.cuda.get_device_name(device)} does "
                f"not); use auto (fp16 with loss scaling here) or fp32"
            )
        return requested
    if requested == "auto":
        return "bf16" if AUTO_BF16_ON_NATIVE_CPU and native_bf16_cpu() else "fp32"
    if requested == "fp16":
        raise ParamError(f"{key}: fp16 needs a CUDA GPU; on a CPU use auto or fp32")
    if requested == "bf16" and not native_bf16_cpu():
        raise ParamError(
            f"{key}: bf16 on this CPU ({cpu_isa()}, no avx512_bf16 or AMX) runs in software, measured "
            f"14x slower than fp32; use auto or fp32"
        )
    return requested


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Forward passes in ``precision``; fp32 is no context at all."""
    return contextlib.nullcontext() if precision == "fp32" else torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None
