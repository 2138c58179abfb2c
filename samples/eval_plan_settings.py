"""Quality and speed of plans built by hand from a profile, without a study: the search's own parts
(`build_plan`, the measured cost model, `PipelineEvaluator`) on the embedded model's calibration or held-out prompts.

    python samples/eval_plan_settings.py PROFILE_DIR --prompts calibration 2:4:0.016 4:2:0.018:2,1,2,1
    python samples/eval_plan_settings.py PROFILE_DIR --prompts held-out 2:4:0.016

Each setting is `DENSE_STEPS:RANGES:ALLOWANCE[:LAYER_SCALES[:RANGE_SCALES]]` (scales comma-separated, one per layer /
range, default 1): every head of every range gets its cheapest candidate within `ALLOWANCE x layer scale x range scale`
of the profile's worst error in that range, as a search trial builds it (range scales are not a search knob; they are
here to ask which part of the trajectory a plan's error hurts most). Prints the predicted attention speedup (the cost
model), the plan's predicted density, the PSNR of the final frames against dense, and the measured speedup of the
denoising runs against the dense runs of the same prompts (both timed in this process, after a warm-up run).
PROFILE_DIR is a `sparsediff profile --model embedded` output, e.g. the one `samples/ship_embedded_plan.py` writes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sparsediff.api import accelerate, load_pipeline
from sparsediff.pipelines.adapter import adapter_for
from sparsediff.plan import SparsePlan
from sparsediff.search.cost import CostModel
from sparsediff.search.optimize import build_plan, dense_time, predicted_time
from sparsediff.search.profile import AttentionProfile
from sparsediff.search.quality import PipelineEvaluator

from ship_embedded_plan import HELD_OUT


def plan_for(profile: AttentionProfile, cost: CostModel, steps: int, setting: str) -> SparsePlan:
    dense_steps, ranges, allowance, *scales = setting.split(":")
    L, R = profile.model.num_layers, int(ranges)
    layer_scales = [float(x) for x in scales[0].split(",")] if scales else [1.0] * L
    range_scales = [float(x) for x in scales[1].split(",")] if len(scales) > 1 else None
    if len(layer_scales) != L:
        raise SystemExit(f"{setting!r}: give {L} layer scales (or none)")
    return build_plan(profile, cost, steps, int(dense_steps), 0, [float(allowance) * s for s in layer_scales], R,
                      range_scales=range_scales)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("profile", help="profile directory of the embedded model")
    p.add_argument("settings", nargs="+", help="DENSE_STEPS:RANGES:ALLOWANCE[:LAYER_SCALES[:RANGE_SCALES]]")
    p.add_argument("--prompts", choices=["calibration", "held-out"], default="calibration",
                   help="the profile's calibration calls, or the ship script's held-out prompts (seeds 1000, 1001, ...)")
    p.add_argument("--save", type=Path, help="folder to write each setting's plan to (SETTING.json, ':' as '_')")
    args = p.parse_args()
    profile = AttentionProfile.load(args.profile)
    cost = CostModel.load_or_measure(profile.layout, profile.model.num_heads, profile.model.head_dim, profile.candidates,
                                     block_size=profile.block_size, dtype=torch.float32, device="cpu")
    pipe = load_pipeline("embedded", "cpu")
    pipe.set_progress_bar_config(disable=True)
    calls = profile.meta["calls"]
    if args.prompts == "held-out":
        calls = [dict(calls[0], prompt=prompt, seed=1000 + i) for i, prompt in enumerate(HELD_OUT)]
    steps = calls[0]["num_inference_steps"]
    evaluator = PipelineEvaluator(pipe, calls, apply=lambda pipe, plan: accelerate(pipe, plan), adapter=adapter_for(pipe))
    print(f"dense runs: {evaluator.dense_seconds:.1f} s for {len(calls)} {args.prompts} prompt(s)")
    for setting in args.settings:
        plan = plan_for(profile, cost, steps, setting)
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            plan.save(args.save / f"{setting.replace(':', '_')}.json")
        result = evaluator(plan, lambda step, value: None)
        print(f"{setting:24s} predicted {dense_time(plan, cost, steps) / predicted_time(plan, cost, steps):.2f}x  "
              f"density {plan.predicted_flops_share(profile.layout, steps):.3f}  PSNR {result.psnr:.2f} dB  "
              f"measured {evaluator.dense_seconds / result.seconds:.2f}x ({result.seconds:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
