"""What machine a figure came from: recorded beside every benchmark result and model card."""

from __future__ import annotations

import os
import platform

import torch


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def machine_line() -> str:
    m = machine_info()
    return f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}" + (f", GPU {m['gpu']}" if m["gpu"] else "")
