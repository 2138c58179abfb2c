"""How well does the embedded model follow its prompts? Detector accuracy on generated clips, dense attention.

Loads the trained `ShapesVideoPipeline` (by default the package's `pipelines/assets/embedded/`), generates one clip
per prompt (32 by default: every colour with every direction, shapes cycling) and reports the share of clips whose
detected colour, direction, shape and modifier match the prompt. Targets: colour >= 80%, direction >= 70%. A
correctness check runs first: the detector on ground-truth clips of the same prompts' grammar must be near 100%.

    python samples/eval_embedded.py                               # 8 x 64 x 64 pixels: 8192 tokens per clip
    python samples/eval_embedded.py --height 32 --width 32 --json # the main training resolution
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from sparsediff.pipelines.embedded import data, detector
from sparsediff.pipelines.embedded.pipeline import ShapesVideoPipeline

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"colour": 0.8, "direction": 0.7}


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
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer (faster after a minute of compiling)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = [data.clip_spec(seed) for seed in range(64)]
    truth = detector.accuracy([detector.frames_from_clip(data.render(s, args.frames, args.height, args.width)) for s in specs], [s.caption for s in specs])
    print(f"check: detector on 64 ground-truth clips: colour {truth['colour']:.2f} direction {truth['direction']:.2f} shape {truth['shape']:.2f}", file=sys.stderr)

    pipe = ShapesVideoPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    if args.compile:
        pipe.transformer.compile(dynamic=False)
    prompts = detector.eval_prompts(args.prompts)
    tick = time.perf_counter()
    result = detector.evaluate(
        pipe, prompts, batch_size=args.batch_size, seed=args.seed, num_frames=args.frames, height=args.height, width=args.width,
        num_inference_steps=args.steps, guidance_scale=args.guidance,
    )
    result["seconds"] = round(time.perf_counter() - tick, 1)
    result["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    print(f"{len(prompts)} prompts, {args.frames}x{args.height}x{args.width} pixels ({tokens} tokens), {args.steps} steps, guidance {args.guidance}, {result['seconds']} s")
    for field in detector.FIELDS:
        target = TARGETS.get(field)
        verdict = "" if target is None else ("  (target met)" if result[field] >= target else f"  (target {target:.0%} NOT met)")
        print(f"  {field:9s} {result[field]:6.1%}{verdict}")
    for clip in result["clips"]:
        print(f"  {clip['caption']:35s} -> {', '.join(clip['predicted']) or 'nothing'}")


if __name__ == "__main__":
    main()
