"""Profile and search the embedded model, then ship the chosen plan beside its weights.

The plan that `accelerate(pipe)` and `sparsediff demo` use on the embedded model comes from here:

    python samples/ship_embedded_plan.py --reprofile   # ~75 min on a 2-core CPU (profile 6-10, search 36 + 19)

It runs `sparsediff profile` on two calibration prompts (12 steps like the demo, 8 x 64 x 64 pixels = 8192 tokens),
then `sparsediff search` in two stages on one study (4 step ranges, allowances drawn from 0.005-0.05; PSNR of the
final frames against dense on the calibration prompts, pooled over them): 70 trials, the last 40 refining the best
plan (its allowance, then one step range's or layer's multiplier at a time) at a 29 dB floor, then the same study
continued to 100 trials, all 30 new ones refining, at a 31 dB floor. The stricter second floor steers the refinement
to plans that hold up on other prompts: on this model a refined plan loses about 3 dB from the calibration prompts to
the held-out ones. The last stage validates on eight held-out prompts (`--validate-prompts`, floor 28 dB pooled there,
`--validate-min-psnr`): the plans meeting the floor on the calibration prompts are run on the held-out ones, fastest
first, and the first that holds 28 dB there is shipped to `pipelines/assets/embedded/plan.json`. PSNRs of several
prompts are pooled (the PSNR of all their frames together), as the demo reports its three.

The plan shipped now is what these defaults chose (nineteenth session, BENCHMARKS.md section 5): trial 95, 3.91x
predicted attention speedup, 31.3 dB on the calibration prompts, 28.0 dB pooled on the held-out ones; it runs the demo
at 2.43x and 28.6 dB. (The first stage alone, with the same held-out floor, chooses a plan that runs the demo at 1.77x
and 30.7 dB; the seventeenth session's plan, chosen with PSNRs averaged in dB, ran it at 2.6x and 28.7 dB but holds
27.5 dB pooled on the held-out prompts.) Outputs (profile, study, report) go to `samples/results/embedded/`. The
held-out prompts are neither the calibration prompts nor the demo's, so the demo is a third, unseen set.

Why the held-out set: the PSNR of two calibration prompts overestimates other prompts on this model. The plan chosen
at a 28 dB floor on them alone (29.9 dB there) gave 23.8 dB on the demo's four prompts. (Before the search could
validate, this script chose at 35 dB as a margin instead.) A rerun reuses the profile (unless --reprofile) and the
study (it is named after the model and the profile), and the stored validations, so it only chooses again.
`--no-ship` searches and reports without replacing the shipped plan (to compare a new search with it first).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from sparsediff.cli import main as cli
from sparsediff.pipelines.embedded.pipeline import PLAN_FILE, embedded_path

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = ("full,skip,diagonal_w0.125,diagonal_w0.25,diagonal_w0.5,diagonal_w1,multi_diagonal_w16,multi_diagonal_w32,"
              "multi_diagonal_w64,vertical_stripe_f0.25,vertical_stripe_f0.5,vertical_stripe_f1,topk_blocks_k0.1,topk_blocks_k0.25")
# Calibration and held-out prompts: neither is among the demo's (`sparsediff demo` strides through
# `detector.eval_prompts`, which names every colour with every direction and cycles the camera).
PROMPTS = ["a red square moving up with camera panning left", "a blue circle moving left with camera zooming in"]
HELD_OUT = ["a green square moving right with camera panning down", "a yellow circle moving up",
            "a purple triangle moving down with camera zooming out", "a cyan square moving left with camera panning left",
            "a orange circle moving up with camera panning right", "a white triangle moving left",
            "a red circle moving down with camera panning up", "a blue triangle moving up with camera zooming in"]


def run(*args: str) -> None:
    code = cli([str(a) for a in args])
    if code:
        raise SystemExit(f"sparsediff {args[0]} failed with exit code {code}")


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--{name.replace('_', '-')} {text!r}: give numbers separated by commas, e.g. 29,31.") from None
    return values


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", default="70,100",
                   help="trials of each stage, comma-separated (the study's total after it: each stage continues the study)")
    p.add_argument("--min-psnr", default="29,31",
                   help="each stage's quality floor on the calibration prompts, which steers the search (other prompts "
                   "come out under the calibration PSNR; the held-out floor decides)")
    p.add_argument("--held-out-psnr", type=float, default=28.0,
                   help="the floor on the held-out prompts (`sparsediff search --validate-min-psnr`): the demo's 28 dB, "
                   "pooled over the eight prompts as the demo pools its three")
    p.add_argument("--reprofile", action="store_true", help="profile again even when the output folder holds a profile")
    p.add_argument("--steps", type=int, default=12, help="denoising steps of the profile and of the search (the demo's 12)")
    p.add_argument("--out", type=Path, default=ROOT / "samples" / "results" / "embedded")
    p.add_argument("--ranges", type=int, default=4, help="step ranges of the plan (`sparsediff search --ranges`)")
    p.add_argument("--allowance", default="0.005,0.05", help="range of the per-head error allowance (`sparsediff search --allowance`)")
    p.add_argument("--range-scales", default=None, help="choices of a per-range allowance multiplier (`sparsediff search --range-scales`)")
    p.add_argument("--refine", default="40,70",
                   help="each stage's last trials that refine the best plan (`sparsediff search --refine`), comma-separated")
    p.add_argument("--no-ship", action="store_true",
                   help="search and report only: leave the shipped plan as it is (compare before replacing it)")
    args = p.parse_args()
    per_stage = {name: _floats(getattr(args, name), name) for name in ("trials", "min_psnr", "refine")}
    if len({len(values) for values in per_stage.values()}) != 1:
        p.error(f"--trials, --min-psnr and --refine need one value per stage each; got "
                f"{ {name: len(values) for name, values in per_stage.items()} }.")
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = args.out / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    held_out = args.out / "held_out_prompts.txt"
    held_out.write_text("\n".join(HELD_OUT) + "\n")
    size = ["--height", "64", "--width", "64", "--frames", "8"]
    if args.reprofile or not (args.out / "profile").is_dir():
        run("profile", "--model", "embedded", "--prompts", prompts, "--steps", args.steps, *size, "--candidates", CANDIDATES,
            "--block-size", "64", "--out", args.out / "profile")
    stages = list(zip(*per_stage.values()))
    for i, (trials, floor, refine) in enumerate(stages):
        last = i == len(stages) - 1  # only the last stage's choice is kept: only it validates on the held-out prompts
        run("search", "--model", "embedded", "--profile", args.out / "profile", "--out", args.out / "plan.json",
            "--min-psnr", f"{floor:g}", "--trials", int(trials), "--ranges", args.ranges, "--allowance", args.allowance,
            "--refine", int(refine), "--force", *(["--range-scales", args.range_scales] if args.range_scales else []),
            *(["--validate-prompts", held_out, "--validate-min-psnr", args.held_out_psnr] if last else []))
    if args.no_ship:
        print(f"searched plan: {args.out / 'plan.json'} (not shipped: --no-ship)")
        return
    shutil.copy(args.out / "plan.json", embedded_path() / PLAN_FILE)
    print(f"shipped {embedded_path() / PLAN_FILE}")


if __name__ == "__main__":
    main()
