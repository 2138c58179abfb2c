"""How sparsediff times kernels (benchmarks and the cost model alike): well-kept timers, medians of round-robin rounds.

On CUDA each sample is a `triton.testing.do_bench` block (warm-up, L2 flushed before every call, CUDA events);
elsewhere it is one call through `torch.utils.benchmark.Timer`, which warms the function up first.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.benchmark import Timer

from .kernels.log import warn_once

logger = logging.getLogger(__name__)


def synchronizer(device: "torch.device | str") -> Callable[[], None]:
    device = torch.device(device)
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def median_ms(fns: dict[str, Callable[[], object]], repeats: int, device: "torch.device | str" = "cpu") -> dict[str, float]:
    """Median milliseconds of each function over `repeats` rounds.

    Each round takes one sample of every function in turn (round-robin) rather than all of one function's samples
    and then the next's: a slow drift of the machine (clock boost, heat, another process) then hits every function
    alike, and the ratios between them, which are what the benchmarks report, stay fair.
    """
    device = torch.device(device)
    take = {name: _sampler(fn, device) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, sample in take.items():
            samples[name].append(sample())
    return {name: statistics.median(s) for name, s in samples.items()}


def _sampler(fn: Callable[[], object], device: torch.device) -> Callable[[], float]:
    """A callable that takes one sample of `fn`'s time in milliseconds on `device`."""
    do_bench = _do_bench() if device.type == "cuda" else None
    if do_bench is not None:
        def sample() -> float:
            with torch.cuda.device(device):  # do_bench's events time the current device
                # short blocks: the rounds repeat them, and the median across rounds is the figure
                return do_bench(fn, warmup=5, rep=20, return_mode="median")

        return sample
    sync = synchronizer(device)

    def clock() -> float:
        sync()
        return time.perf_counter()

    # Timer pins torch to one thread unless told otherwise; the figures are for the threads the caller runs with.
    timer = Timer(stmt="fn()", globals={"fn": fn}, timer=clock, num_threads=torch.get_num_threads())
    # timeit(1) makes two warm-up calls before the timed one (three calls a sample), so each sample finds this
    # function's caches and lazy state warm, whatever ran before it in the round.
    return lambda: timer.timeit(1).median * 1e3


def _do_bench() -> "Callable | None":
    try:
        from triton.testing import do_bench
    except ImportError:
        warn_once(logger, "sparsediff: timing CUDA with torch.utils.benchmark.Timer instead of triton.testing.do_bench "
                          "because Triton is not installed; install triton for event-timed, L2-flushed samples.")
        return None
    return do_bench


def device_name(device: "torch.device | str") -> str:
    """The machine a figure comes from: GPU name, or CPU architecture and thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.machine()} {platform.processor() or ''} {os.cpu_count()} threads".replace("  ", " ")
