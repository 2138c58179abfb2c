"""How sparsediff times kernels (benchmarks and the cost model alike): warm up, synchronise, median of rounds."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def synchronizer(device: "torch.device | str") -> Callable[[], None]:
    device = torch.device(device)
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def median_ms(fns: dict[str, Callable[[], object]], repeats: int, device: "torch.device | str" = "cpu") -> dict[str, float]:
    """Median milliseconds of each function, timed round-robin (one call of each per round) after one warm-up
    call each, so slow drifts of the machine hit every function alike."""
    sync = synchronizer(device)
    for fn in fns.values():
        fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def device_name(device: "torch.device | str") -> str:
    """The machine a figure comes from: GPU name, or CPU architecture and thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.machine()} {platform.processor() or ''} {os.cpu_count()} threads".replace("  ", " ")
