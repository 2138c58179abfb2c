"""Where a sparse generation of the demo spends its time: one clip of the embedded video model at the demo's size under
its shipped plan, through `torch.profiler` (CPU), ops sorted by their own time.

    python samples/profile_demo_sparse.py [--steps 12] [--plan PLAN.json]

The compiled CPU kernel is a C++ extension call the profiler does not name: its time is the wall time less the
profiled ops' total.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from sparsediff.api import accelerate, load_pipeline
from sparsediff.generate import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prompt", default="a red circle moving right")
    parser.add_argument("--plan", default=None, help="a plan JSON (default: the shipped plan)")
    args = parser.parse_args()
    pipe = load_pipeline("embedded")
    pipe.set_progress_bar_config(disable=True)
    size = dict(height=64, width=64, num_frames=8)
    generate(pipe, [args.prompt], None, num_inference_steps=2, **size)  # warm-up
    handle = accelerate(pipe, args.plan if args.plan else pipe.shipped_plan())
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            pipe([args.prompt], generator=torch.Generator().manual_seed(0), output_type="np", num_inference_steps=args.steps, **size)
            wall = time.perf_counter() - start
    finally:
        handle.remove()
    averages = prof.key_averages()
    profiled = sum(e.self_cpu_time_total for e in averages) / 1e6
    print(averages.table(sort_by="self_cpu_time_total", row_limit=12))
    print(f"wall {wall:.1f} s; profiled ops {profiled:.1f} s; outside them (the compiled kernel, Python) {wall - profiled:.1f} s")


if __name__ == "__main__":
    main()
