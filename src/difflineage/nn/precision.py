"""Whether bfloat16 is a speed-up on a device, and what a ``bf16: auto`` setting means there.

bf16 autocast is a real speed lever where the hardware computes in bf16: CUDA devices with bf16 (Ampere and later)
and CPUs with AVX-512 BF16 or AMX (an Intel Xeon with AMX ran a 2048 matmul at 718 GFLOP/s in bf16 against 237 in
fp32). Elsewhere the bf16 matmuls are emulated: on the AMD EPYC this project was measured on they run about 11x
slower than fp32, so a recipe that says ``bf16: true`` would make a quickstart there an hour long. ``auto`` takes bf16
only where it is native.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch


def native_bf16(device: torch.device | str) -> bool:
    """Whether bf16 autocast is a speed-up on ``device``: a CUDA device with bf16, or a CPU with AVX-512 BF16 or AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve_bf16(setting: Union[bool, str], device: torch.device | str) -> bool:
    """A ``bf16`` setting (true, false or ``"auto"``) as a choice on ``device``."""
    if setting == "auto":
        return native_bf16(device)
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"bf16 must be true, false or auto, not {setting!r}")


__all__ = ["native_bf16", "resolve_bf16"]
