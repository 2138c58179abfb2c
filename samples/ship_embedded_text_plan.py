"""Profile the embedded diffusion LM, search its plan on this machine, and ship it beside the weights.

    python samples/ship_embedded_text_plan.py --model runs/embedded_text/pipeline --trials 16
    python samples/ship_embedded_text_plan.py --model pipelines/assets/embedded_text --trials 24 --length 8192 \
        --tasks 3 --floor 0.95 --out runs/embedded_text_search/plan_8192.json     # the shipped plan (BENCHMARKS 7a)

Calibration: one task of each kind at `--length` tokens; validation: three other held-out tasks. The quality measure is
token agreement with the dense run (the answer slots, after every step and at the end), and the floor is 1.0: a plan
must reproduce the dense answers exactly on calibration and validation (`--floor` lowers it). A rerun at the same
length reuses the profile (unless --reprofile) and resumes the study. Costs are measured here at the model's head dim
and the calibration length. The plan is written to `MODEL/plan.json` (the transformers adapter's `plan="auto"`
finds it there) and, with `--ship`, also into the package's embedded model.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import sparsediff
from sparsediff.api import load_pipeline
from sparsediff.pipelines.embedded_text.evaluate import call_arguments
from sparsediff.pipelines.embedded_text.model import embedded_text_path
from sparsediff.pipelines.embedded_text.tasks import task_set
from sparsediff.search.profile import AttentionProfile

# local windows (in tokens: on a 1-D axis each token is a frame), attention sinks, and SparseD's top-k blocks with
# separate prompt shares (the active block is the generation)
CANDIDATES = ["full", "skip", "diagonal_w32", "diagonal_w128", "diagonal_w512", "vertical_stripe_f64",
              "topk_blocks_k1_p0.05", "topk_blocks_k1_p0.1", "topk_blocks_k1_p0.25"]
CALIBRATION_SEED, VALIDATION_SEED = 5_000, 6_000


def calls_for(seed: int, length: int, n: int = 3) -> list[dict]:
    return [dict(prompt=t.prompt_text, seed=0, use_chat_template=False, **call_arguments()) for t in task_set(n, length, seed + length)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/embedded_text/pipeline")
    parser.add_argument("--length", type=int, default=2048, help="calibration context length in tokens")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=3, help="calibration tasks, and as many held-out validation tasks")
    parser.add_argument("--floor", type=float, default=1.0,
                        help="least token agreement with the dense answers (1.0: every answer-slot token the same)")
    parser.add_argument("--min-tokens", type=int, default=None,
                        help="the plan's min_tokens: shorter calls run dense (default: half of --length, the shortest "
                             "length the shipped plan was checked at without a changed answer)")
    parser.add_argument("--out", default=None, help="where to write the plan (default: MODEL/plan.json)")
    parser.add_argument("--reprofile", action="store_true", help="profile again even when a profile at this length exists")
    parser.add_argument("--ship", action="store_true", help="also copy the plan into the package's embedded model")
    args = parser.parse_args()
    pipe = load_pipeline(args.model, "cpu", kind="text")
    pipe.set_progress_bar_config(disable=True)
    calls = calls_for(CALIBRATION_SEED, args.length, args.tasks)
    validation = calls_for(VALIDATION_SEED, args.length, args.tasks)
    work = Path("runs/embedded_text_search")
    work.mkdir(parents=True, exist_ok=True)
    inputs = [{k: v for k, v in c.items() if k != "seed"} for c in calls]
    folder = work / f"profile_{args.length}"
    if args.reprofile or not folder.is_dir():
        prof = sparsediff.profile(pipe, inputs, out=folder, candidates=CANDIDATES, block_size=args.block_size,
                                  rows_per_block=args.block_size)
    else:  # the same calibration calls: the study resumes (its name holds the profile's digest)
        prof = AttentionProfile.load(folder)
    print(f"profile: layout {prof.layout}, mean errors {json.dumps(prof.mean_errors())}", file=sys.stderr)
    plan, summary = sparsediff.search_plan(
        pipe, prof, calls, out=work / "plan.json", min_psnr=args.floor, trials=args.trials, backend="torch", force=True,
        validation_calls=validation, return_summary=True, log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    plan.min_tokens = args.min_tokens if args.min_tokens is not None else args.length // 2
    target = Path(args.out) if args.out else Path(args.model) / "plan.json"
    plan.save(target)
    shutil.copy(work / "search_report.png", Path(__file__).parent / "results" / "embedded_text" / f"search_report_{args.length}.png")
    print(json.dumps({k: summary[k] for k in ("trials", "pruned", "chosen", "dense_seconds") if k in summary}, indent=1,
                     default=str))
    if args.ship:
        shutil.copy(target, embedded_text_path() / "plan.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
