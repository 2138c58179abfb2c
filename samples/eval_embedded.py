"""How well does the embedded model follow its prompts? Detector accuracy on generated clips, dense attention.

Loads the trained `ShapesVideoPipeline` (by default the package's `pipelines/assets/embedded/`), generates one clip
per prompt (32 by default: every colour with every direction, shapes and camera motions cycling) and reports the
share of clips whose detected colour, direction, shape, modifier and camera motion match the prompt. Target (issue
16): >= 80% on every field. A correctness check runs first: the detector on ground-truth clips of the same grammar
must be near 100%.

    python samples/eval_embedded.py                               # 8 x 64 x 64 pixels: 8192 tokens per clip
    python samples/eval_embedded.py --height 32 --width 32 --json # the main training resolution
    python samples/eval_embedded.py --steps 12 --plan shipped      # dense and with the shipped plan, same seeds

With `--plan` (a plan file, or `shipped` for the model's own) every prompt is generated twice with the same seeds,
dense and under the plan, and both accuracies are reported with their difference and the PSNR of the sparse clips
against the dense ones (the demo's target: detector accuracy within 5 points of dense).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import sparsediff
from sparsediff.metrics import psnr
from sparsediff.pipelines.embedded import data, detector
from sparsediff.pipelines.embedded.pipeline import ShapesVideoPipeline

ROOT = Path(__file__).resolve().parents[1]
TARGETS = dict.fromkeys(detector.FIELDS, 0.8)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "pipelines" / "assets" / "embedded", help="pipeline folder")
    p.add_argument("--prompts", type=int, default=32, help="number of prompts (one clip each)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer (faster after a minute of compiling; dense only)")
    p.add_argument("--plan", help="also generate under this plan (a file, or 'shipped') and compare with dense")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    return p.parse_args(argv)


def _shown(path: Path) -> str:
    """A path for the saved results: relative to the repo when inside it (no machine paths in committed files)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = [data.clip_spec(seed) for seed in range(64)]
    truth = detector.accuracy([detector.frames_from_clip(data.render(s, args.frames, args.height, args.width)) for s in specs], [s.caption for s in specs])
    print("check: detector on 64 ground-truth clips: " + " ".join(f"{f} {truth[f]:.2f}" for f in detector.FIELDS), file=sys.stderr)

    pipe = ShapesVideoPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    if args.compile and args.plan:
        raise SystemExit("--compile is for dense runs only (the sparse runtime runs eagerly); drop --compile or --plan.")
    if args.compile:
        pipe.transformer.compile(dynamic=False)
    prompts = detector.eval_prompts(args.prompts)
    call = dict(batch_size=args.batch_size, seed=args.seed, num_frames=args.frames, height=args.height, width=args.width,
                num_inference_steps=args.steps, guidance_scale=args.guidance)
    tick = time.perf_counter()
    dense = detector.generate_clips(pipe, prompts, **call)
    result = detector.accuracy(dense, prompts)
    if args.plan:
        plan = pipe.shipped_plan() if args.plan == "shipped" else args.plan
        with sparsediff.accelerate(pipe, plan) as handle:
            sparse = detector.generate_clips(pipe, prompts, **call)
            density = handle.summary()["sparse_density"]
        result = {"dense": result, "sparse": detector.accuracy(sparse, prompts), "psnr": psnr(np.stack(sparse), np.stack(dense), data_range=1.0),
                  "sparse_density": density}
        result["difference_points"] = {f: round(100 * (result["sparse"][f] - result["dense"][f]), 1) for f in detector.FIELDS}
    result["seconds"] = round(time.perf_counter() - tick, 1)
    result["settings"] = {k: (_shown(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    if args.plan:
        print(f"{len(prompts)} prompts, dense vs plan {args.plan}: PSNR {result['psnr']:.1f} dB, {result['seconds']} s")
        for field in detector.FIELDS:
            print(f"  {field:9s} dense {result['dense'][field]:6.1%}  sparse {result['sparse'][field]:6.1%}  "
                  f"({result['difference_points'][field]:+.1f} points)")
        return
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    print(f"{len(prompts)} prompts, {args.frames}x{args.height}x{args.width} pixels ({tokens} tokens), {args.steps} steps, guidance {args.guidance}, {result['seconds']} s")
    for field in detector.FIELDS:
        target = TARGETS.get(field)
        verdict = "" if target is None else ("  (target met)" if result[field] >= target else f"  (target {target:.0%} NOT met)")
        print(f"  {field:9s} {result[field]:6.1%}{verdict}")
    for clip in result["clips"]:
        print(f"  {clip['caption']:60s} -> {', '.join(clip['predicted']) or 'nothing'}; camera {clip['predicted_camera']}")


if __name__ == "__main__":
    main()
