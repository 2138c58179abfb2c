"""Profile and search the embedded model, then ship the chosen plan beside its weights.

The plan that `accelerate(pipe)` and `sparsediff demo` use on the embedded model comes from here:

    python samples/ship_embedded_plan.py            # ~16 min on a 2-core CPU

It runs `sparsediff profile` on two calibration prompts (12 steps like the demo, 8 x 64 x 64 pixels = 8192 tokens),
then `sparsediff search` (20 trials; floor 35 dB PSNR of the final frames against dense), and copies the plan to
`pipelines/assets/embedded/plan.json`. Outputs (profile, study, report) go to `samples/results/embedded/`.

Why 35 dB when the demo's target is 28: the PSNR of two calibration prompts overestimates other prompts on this
model. The plan chosen at a 28 dB floor (29.9 dB on the calibration prompts) gave 23.8 dB on the demo's four prompts,
so the shipped plan is chosen with a margin. A rerun with another floor reuses the study (it is named after the
model and the profile) and only chooses again.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from sparsediff.cli import main as cli
from sparsediff.pipelines.embedded.pipeline import PLAN_FILE, embedded_path

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = ("full,skip,diagonal_w0.25,diagonal_w0.5,diagonal_w1,multi_diagonal_w32,multi_diagonal_w64,"
              "multi_diagonal_w128,vertical_stripe_f0.5,vertical_stripe_f1,topk_blocks_k0.1,topk_blocks_k0.25")
PROMPTS = ["a red circle moving right", "a blue square moving up"]


def run(*args: str) -> None:
    code = cli([str(a) for a in args])
    if code:
        raise SystemExit(f"sparsediff {args[0]} failed with exit code {code}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--min-psnr", type=float, default=35.0, help="quality floor on the calibration prompts (see above)")
    p.add_argument("--steps", type=int, default=12, help="denoising steps of the profile and of the search (the demo's 12)")
    p.add_argument("--out", type=Path, default=ROOT / "samples" / "results" / "embedded")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = args.out / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    size = ["--height", "64", "--width", "64", "--frames", "8"]
    run("profile", "--model", "embedded", "--prompts", prompts, "--steps", args.steps, *size, "--candidates", CANDIDATES,
        "--block-size", "64", "--out", args.out / "profile")
    run("search", "--model", "embedded", "--profile", args.out / "profile", "--out", args.out / "plan.json",
        "--min-psnr", args.min_psnr, "--trials", args.trials, "--force")
    shutil.copy(args.out / "plan.json", embedded_path() / PLAN_FILE)
    print(f"shipped {embedded_path() / PLAN_FILE}")


if __name__ == "__main__":
    main()
