"""How far each prompt's dense output moves when self-attention is perturbed by a small, content-blind amount: the
prompt's sensitivity, against which a sparse plan's PSNR on it reads.

    python samples/perturbation_floor.py                  # the eight held-out prompts, then the demo's three
    python samples/perturbation_floor.py --set demo --json

Each prompt runs dense, then twice more with every self-attention output (`attn1` of each block) perturbed at every
step: rounded to bfloat16 and back (relative error up to 2^-9, what a 16-bit kernel would do), and multiplied by
(1 + 0.01 z), z standard normal (seeded, 1% relative noise). The PSNR of each against the dense frames, per prompt and
pooled, through the same runs as `validate_embedded_plan.py` (12 steps at 8 x 64 x 64 pixels, the same seeds). A
prompt whose frames move far under these moves far under a sparse plan too: its PSNR measures the model's trajectory
more than the plan. About 90 s per prompt on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # validate_embedded_plan's prompt sets

from validate_embedded_plan import set_calls  # noqa: E402

from sparsediff.api import load_pipeline  # noqa: E402
from sparsediff.metrics import pooled_psnr  # noqa: E402
from sparsediff.pipelines.adapter import adapter_for  # noqa: E402

PERTURBATIONS = {
    "bfloat16": lambda out, g: out.to(torch.bfloat16).to(out.dtype),
    "noise_1pct": lambda out, g: out * (1 + 0.01 * torch.randn(out.shape, generator=g, dtype=out.dtype)),
}


def main(argv: list[str] | None = None, pipe=None) -> dict:
    """Run the script; `pipe` (default: the embedded model, loaded) is left with no hook of the script's."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--set", choices=["held-out", "demo", "both"], default="both", help="the prompts and seeds to run")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--size", type=int, default=64, help="height and width in pixels")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    pipe = load_pipeline("embedded") if pipe is None else pipe
    pipe.set_progress_bar_config(disable=True)
    adapter = adapter_for(pipe)
    settings = dict(num_inference_steps=args.steps, height=args.size, width=args.size, num_frames=args.frames)
    sets = {name: set_calls(name, settings) for name in ("held-out", "demo") if args.set in (name, "both")}
    active = {"name": None, "generator": None}

    def perturb(module, inputs, out):
        if active["name"] is None:
            return out
        return PERTURBATIONS[active["name"]](out, active["generator"])

    hooks = [block.attn1.register_forward_hook(perturb) for block in pipe.transformer.blocks]
    result: dict = {}
    try:
        for set_name, calls in sets.items():
            rows = []
            for call in calls:
                active["name"] = None
                _, dense = adapter.run(pipe, call)
                row = {"prompt": call["prompt"], "seed": call["seed"]}
                for name in PERTURBATIONS:
                    active["name"], active["generator"] = name, torch.Generator().manual_seed(0)
                    _, out = adapter.run(pipe, call)
                    row[name] = adapter.quality(out, dense)  # PSNR, as the search and the validation script read it
                rows.append(row)
                if not args.json:
                    print(f"{set_name:8s} {call['prompt']:55s} " + "  ".join(f"{n} {row[n]:6.2f} dB" for n in PERTURBATIONS), flush=True)
            pooled = {name: pooled_psnr([r[name] for r in rows]) for name in PERTURBATIONS}
            result[set_name] = {"prompts": rows, "pooled": pooled}
            if not args.json:
                print(f"{set_name:8s} {'pooled':55s} " + "  ".join(f"{n} {v:6.2f} dB" for n, v in pooled.items()))
    finally:
        for hook in hooks:
            hook.remove()
    if args.json:
        print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
