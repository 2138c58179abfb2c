"""How much of the demo's speedup is sparsity and how much is the compiled CPU kernel: the demo's clips three ways,
side by side in one process, one prompt at a time, the order rotating per prompt:

    python samples/demo_kernel_baseline.py [--prompts 3] [--plan PATH]

1. dense: the model's own attention (SDPA), what `sparsediff demo` calls dense;
2. dense through the kernel: every head `full` at every step, run by the compiled CPU kernel as sparse plans run the
   layers they leave all `full` (an all-`full` plan otherwise stays the model's own SDPA, by design: exact by default);
3. sparse: the shipped plan (or `--plan`).

It prints the correctness check first (PSNR of 2 and 3 against 1), then the times and the ratios: 1/3 is the demo's
speedup; 2/3 is the speedup against a dense baseline through the same kernel, the part sparsity earns.
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from unittest import mock

import numpy as np
import torch

from sparsediff.api import accelerate, load_pipeline
from sparsediff.generate import Generation, demo_prompts, generate
from sparsediff.metrics import psnr
from sparsediff.plan import SparsePlan


@contextmanager
def all_full_through_kernel(pipe, plan: SparsePlan):
    """Accelerate `pipe` with `plan` made all `full`, no dense steps or layers, so that every attention call goes to
    the runtime (the compiled kernel on CPU). `is_all_dense` is patched for this measurement only: `accelerate`
    would otherwise leave such a plan as the model's own attention."""
    data = plan.to_dict()
    data.update(dense_steps=0, dense_layers=[], search={})
    for r in data["ranges"]:
        r["layers"] = [["full"] * len(layer) for layer in r["layers"]]
    full = SparsePlan.from_dict(data)
    with mock.patch.object(SparsePlan, "is_all_dense", property(lambda self: False)):
        handle = accelerate(pipe, full)
        try:
            yield handle
        finally:
            handle.remove()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=3, help="the demo's first N prompts")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--plan", default=None, help="a plan JSON (default: the shipped plan)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    pipe = load_pipeline("embedded")
    pipe.set_progress_bar_config(disable=True)
    plan = SparsePlan.load(args.plan) if args.plan else pipe.shipped_plan()
    prompts = demo_prompts(args.prompts)
    size = dict(height=64, width=64, num_frames=8)
    generate(pipe, prompts[:1], None, num_inference_steps=2, **size)  # warm-ups, as the demo's
    generate(pipe, prompts[:1], plan, num_inference_steps=3, **size)
    with all_full_through_kernel(pipe, plan):
        generate(pipe, prompts[:1], None, num_inference_steps=2, **size)

    def run(kind: str, prompt: str, seed: int) -> Generation:
        if kind == "kernel":  # (plan None: generate leaves the pipeline as the context accelerated it)
            with all_full_through_kernel(pipe, plan):
                return generate(pipe, [prompt], None, seed=seed, num_inference_steps=args.steps, **size)
        return generate(pipe, [prompt], plan if kind == "sparse" else None, seed=seed, num_inference_steps=args.steps, **size)

    kinds = ["dense", "kernel", "sparse"]
    frames = {k: [] for k in kinds}
    seconds = {k: 0.0 for k in kinds}
    for i, prompt in enumerate(prompts):
        for kind in kinds[i % 3:] + kinds[:i % 3]:  # rotate the order so a slow spell falls on every side
            out = run(kind, prompt, i)
            frames[kind].append(out.frames)
            seconds[kind] += out.seconds
            print(f"  {prompt!r} {kind}: {out.seconds:.1f} s", flush=True)
    ref = np.concatenate(frames["dense"])
    result = {
        "prompts": prompts,
        "psnr_kernel_vs_dense": psnr(np.concatenate(frames["kernel"]), ref, data_range=1.0),
        "psnr_sparse_vs_dense": psnr(np.concatenate(frames["sparse"]), ref, data_range=1.0),
        "seconds": seconds,
        "speedup_vs_sdpa": seconds["dense"] / seconds["sparse"],
        "speedup_vs_kernel_dense": seconds["kernel"] / seconds["sparse"],
        "kernel_dense_vs_sdpa": seconds["dense"] / seconds["kernel"],
        "cpu": torch.backends.cpu.get_cpu_capability(),
    }
    print(f"correctness: dense through the kernel vs SDPA {result['psnr_kernel_vs_dense']:.1f} dB; "
          f"sparse vs SDPA {result['psnr_sparse_vs_dense']:.1f} dB")
    print(f"seconds: SDPA dense {seconds['dense']:.1f}, kernel dense {seconds['kernel']:.1f}, sparse {seconds['sparse']:.1f}")
    print(f"speedup vs SDPA dense {result['speedup_vs_sdpa']:.2f}x; vs dense through the kernel "
          f"{result['speedup_vs_kernel_dense']:.2f}x (the kernel's dense alone: {result['kernel_dense_vs_sdpa']:.2f}x)")
    if args.json:
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
