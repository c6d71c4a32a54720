"""The machine a number came from, named in one line (metrics.json, the benchmarks' tables)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_description(cpuinfo: str, fallback: str = "CPU") -> str:
    """The CPU of a /proc/cpuinfo text: its model name, x86 family and model, and widest vector unit, since one model
    name covers several generations (an "AMD EPYC" with and without native bf16)."""
    info = {}
    for line in cpuinfo.split("\n\n")[0].splitlines():  # the first processor
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    detail = [f"family {info['cpu family']} model {info['model']}"] if "cpu family" in info and "model" in info else []
    flags = info.get("flags", "").split()
    detail += [name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"),
                                       ("avx2", "AVX2")) if flag in flags][:1]
    name = info.get("model name", fallback)
    return f"{name} ({', '.join(detail)})" if detail else name


def machine_description() -> str:
    """One line naming the machine a number came from."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = cpu_description(Path("/proc/cpuinfo").read_text(), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


__all__ = ["cpu_description", "machine_description"]
