"""What machine a figure came from: recorded beside every benchmark result and model card."""

from __future__ import annotations

import os
import platform

import torch


# CPU instruction sets that change which kernels run (and so the float32 / bfloat16 trade-off)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:  # the first core's entry: its model name, then its flags
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    cpu = value.strip()
                elif key.strip() == "flags":
                    flags = [f for f in CPU_FLAGS if f in set(value.split())]
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "cpu_flags": flags,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def flags_note(m: dict) -> str:
    """`` (avx2, avx512f, ...)`` for a recorded machine (empty where none were recorded)."""
    return f" ({', '.join(m['cpu_flags'])})" if m.get("cpu_flags") else ""


def machine_line() -> str:
    m = machine_info()
    return f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}" + (f", GPU {m['gpu']}" if m["gpu"] else "")
