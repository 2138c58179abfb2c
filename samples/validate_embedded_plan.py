"""A plan's PSNR on the embedded model, prompt by prompt and pooled, on the search's prompt sets: compare plans on the
same prompts and seeds before shipping one.

    python samples/validate_embedded_plan.py                       # the shipped plan on the eight held-out prompts
    python samples/validate_embedded_plan.py PLAN.json --set demo  # another plan on the demo's prompts

Sets: `held-out` (the eight of `ship_embedded_plan.py`, seeds 1000, 1001, ... as `sparsediff search
--validate-prompts` runs them), `calibration` (its two, seeds 0 and 1, as the profile ran them) and `demo` (the first
three of `sparsediff demo`, seeds 0, 1, 2). Each prompt runs dense and under the plan through the search's own
evaluator (`PipelineEvaluator`, 12 steps at 8 x 64 x 64 pixels); the pooled figure is the one the search and the demo
report, the PSNR of all the frames together. (`--steps`, `--height`, `--width`, `--frames`: other settings, for
quick checks.) (The demo takes the peak as 1.0, the evaluator the dense frames' range:
the figures on the demo set may differ from `sparsediff demo`'s in the second decimal.) About 40 s per prompt on 2 CPU
cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ship_embedded_plan's prompt sets

from ship_embedded_plan import HELD_OUT, PROMPTS  # noqa: E402

import sparsediff  # noqa: E402
from sparsediff.api import load_pipeline  # noqa: E402
from sparsediff.cli import held_out_calls  # noqa: E402
from sparsediff.generate import demo_prompts  # noqa: E402
from sparsediff.metrics import pooled_psnr  # noqa: E402
from sparsediff.pipelines.adapter import adapter_for  # noqa: E402
from sparsediff.plan import SparsePlan  # noqa: E402
from sparsediff.search.quality import PipelineEvaluator  # noqa: E402

SETS = {"held-out": HELD_OUT, "calibration": PROMPTS, "demo": demo_prompts(3)}


def set_calls(name: str, settings: dict) -> list[dict]:
    """The calls of prompt set `name` with `settings`, seeded as the search and the demo run them: the calibration
    and demo prompts 0, 1, 2, ... (as the profile and the demo seed them), the held-out ones as `sparsediff search
    --validate-prompts` runs them (`held_out_calls`: seeds 1000, 1001, ...)."""
    calls = [dict(settings, prompt=text, seed=i) for i, text in enumerate(SETS[name])]
    return held_out_calls(SETS[name], calls) if name == "held-out" else calls


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("plan", nargs="?", default=None, help="a plan file (default: the embedded model's shipped plan)")
    p.add_argument("--set", choices=sorted(SETS), default="held-out", help="the prompts and seeds to run")
    p.add_argument("--backend", default=None, help="kernel backend (default: automatic, as the demo)")
    p.add_argument("--steps", type=int, default=12, help="denoising steps (the search's and the demo's 12)")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--frames", type=int, default=8)
    args = p.parse_args(argv)
    pipe = load_pipeline("embedded")
    pipe.set_progress_bar_config(disable=True)
    plan = SparsePlan.load(args.plan) if args.plan else pipe.shipped_plan()
    prompts = SETS[args.set]
    settings = dict(num_inference_steps=args.steps, height=args.height, width=args.width, num_frames=args.frames)
    calls = set_calls(args.set, settings)
    evaluator = PipelineEvaluator(pipe, calls, apply=lambda q, pl: sparsediff.accelerate(q, pl, backend=args.backend),
                                  adapter=adapter_for(pipe))
    result = evaluator(plan, lambda step, value: None)
    each = result.call_psnr
    summary = {
        "plan": args.plan or "shipped", "set": args.set, "prompts": prompts,
        "prompt_psnr": [round(v, 2) for v in each], "pooled_psnr": round(pooled_psnr(each), 2),
        "mean_of_db": round(sum(each) / len(each), 2), "worst": round(min(each), 2),
        "dense_seconds": round(evaluator.dense_seconds, 1), "sparse_seconds": round(result.seconds, 1),
    }
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
