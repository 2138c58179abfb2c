"""Accuracy and speed of the embedded diffusion LM against context length and top-k keep ratio, dense vs sparse.

    python samples/eval_embedded_text.py                      # the shipped model and plan, 2k-16k tokens
    python samples/eval_embedded_text.py --lengths 8192 --tasks 6 --keeps 0.05,0.1,0.25

For each context length: the same held-out tasks (one of each kind in turn) dense and under the shipped plan, one
request at a time, dense and sparse interleaved per task; exact-match accuracy, token agreement with dense, and the
wall time of the generation (one block of 8 answer slots, 8 steps, each a forward over the whole context). The keep
sweep runs SparseD's recipe on every head (first step dense, then top-k blocks of the prompt keys, the active block
always kept) at each keep share. Writes `samples/results/embedded_text/eval.json` and `accuracy_speed.png` (with
`--out other.json`: `other.json` and `other.png`). `--dtype bfloat16` loads the pipeline in bfloat16.
"""

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from sparsediff.api import load_pipeline, resolve_plan
from sparsediff.pipelines.adapter import fingerprint
from sparsediff.pipelines.embedded_text.evaluate import compare_plans, held_out_tasks, run_tasks
from sparsediff.plan import SparsePlan
from sparsediff.timing import device_name

RESULTS = Path(__file__).parent / "results" / "embedded_text"


def compare(pipe, tasks, plan, backend, bar) -> dict:
    dense, sparse = compare_plans(pipe, tasks, plan, backend, progress=bar.update)
    return {
        "tasks": len(tasks),
        "accuracy_dense": dense.accuracy(tasks),
        "accuracy_sparse": sparse.accuracy(tasks),
        "by_kind_dense": dense.accuracy_by_kind(tasks),
        "by_kind_sparse": sparse.accuracy_by_kind(tasks),
        "agreement": sparse.agreement(dense),
        "dense_seconds": dense.seconds,
        "sparse_seconds": sparse.seconds,
        "speedup": dense.seconds / sparse.seconds,
        "density": sparse.stats["sparse_density"],
    }


def sparsed_plan(pipe, keep: float, block_size: int = 64) -> SparsePlan:
    """SparseD's recipe on every head: the first step dense, then top-k blocks of the prompt keys at `keep` (the
    active block always kept), selected once per request and block."""
    return SparsePlan.uniform(fingerprint(pipe.model), f"topk_blocks_k1_p{keep}", block_size=block_size, dense_steps=1)


def plot(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3), dpi=100)
    by_length = results["by_length"]
    lengths = sorted(int(k) for k in by_length)
    acc, speed = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    acc.plot(lengths, [by_length[str(n)]["accuracy_dense"] for n in lengths], "o-", label="dense")
    label = results.get("plan", "shipped plan")
    acc.plot(lengths, [by_length[str(n)]["accuracy_sparse"] for n in lengths], "s--", label=label)
    speed.plot(lengths, [by_length[str(n)]["speedup"] for n in lengths], "s--", label=label)
    for keep, row in sorted(results.get("keep_sweep", {}).items()):
        acc.plot([row["length"]], [row["accuracy_sparse"]], "x", label=f"top-k every head, keep {keep}")
        speed.plot([row["length"]], [row["speedup"]], "x", label=f"top-k every head, keep {keep}")
    for ax, name in ((acc, "exact-match accuracy"), (speed, "speedup vs dense (end to end)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=6)
    acc.set_ylim(0, 1.05)
    speed.axhline(1.0, color="grey", lw=0.5)
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="`embedded` or a saved pipeline directory with its plan.json")
    parser.add_argument("--lengths", default="2048,4096,8192,16384")
    parser.add_argument("--tasks", default="12,12,9,3", help="tasks per length (one number for all)")
    parser.add_argument("--keeps", default="", help="top-k keep shares for the SparseD sweep, e.g. 0.05,0.1,0.25")
    parser.add_argument("--keep-length", type=int, default=8192)
    parser.add_argument("--keep-tasks", type=int, default=6)
    parser.add_argument("--sparsed-keep", type=float, default=None,
                        help="run the length sweep under SparseD's recipe at this keep share instead of the model's plan")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="load the pipeline in this dtype (default: as saved, float32)")
    parser.add_argument("--out", default=str(RESULTS / "eval.json"))
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",") if x]
    counts = [int(x) for x in args.tasks.split(",")]
    counts = counts * len(lengths) if len(counts) == 1 else counts
    keeps = [float(x) for x in args.keeps.split(",") if x]
    pipe = load_pipeline(args.model, "cpu", kind="text", dtype=args.dtype)
    pipe.set_progress_bar_config(disable=True)
    plan = resolve_plan(pipe, "auto")
    if args.sparsed_keep is not None:
        plan = sparsed_plan(pipe, args.sparsed_keep)
    if plan is None:
        raise SystemExit(f"{args.model} has no plan.json; search one with samples/ship_embedded_text_plan.py.")
    run_tasks(pipe, held_out_tasks(1, lengths[0]), "dense")  # warm-up
    total = 2 * (sum(counts) + len(keeps) * args.keep_tasks)
    results = {"machine": device_name("cpu"), "model": args.model, "dtype": str(pipe.dtype).removeprefix("torch."),
               "plan_dense_steps": plan.dense_steps,
               "plan": "shipped" if args.sparsed_keep is None else f"SparseD keep {args.sparsed_keep}",
               "by_length": {}, "keep_sweep": {}}
    with tqdm(total=total, desc="requests", file=sys.stderr) as bar:
        for n, count in zip(lengths, counts):
            results["by_length"][str(n)] = row = compare(pipe, held_out_tasks(count, n), plan, args.backend, bar)
            print(f"{n:>6} tokens: accuracy dense {row['accuracy_dense']:.0%} sparse {row['accuracy_sparse']:.0%}, "
                  f"agreement {row['agreement']:.3f}, speedup {row['speedup']:.2f}x at density {row['density']:.3f}",
                  file=sys.stderr, flush=True)
        for keep in keeps:
            row = compare(pipe, held_out_tasks(args.keep_tasks, args.keep_length), sparsed_plan(pipe, keep, plan.block_size),
                          args.backend, bar)
            results["keep_sweep"][str(keep)] = {"length": args.keep_length, **row}
            print(f"keep {keep} at {args.keep_length}: accuracy dense {row['accuracy_dense']:.0%} sparse "
                  f"{row['accuracy_sparse']:.0%}, speedup {row['speedup']:.2f}x at density {row['density']:.3f}",
                  file=sys.stderr, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    plot(results, out.with_name("accuracy_speed.png") if out.name == "eval.json" else out.with_suffix(".png"))
    print("| context | tasks | accuracy dense | accuracy sparse | agreement | dense s | sparse s | speedup | density |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, r in results["by_length"].items():
        print(f"| {n} | {r['tasks']} | {r['accuracy_dense']:.0%} | {r['accuracy_sparse']:.0%} | {r['agreement']:.3f} | "
              f"{r['dense_seconds']:.1f} | {r['sparse_seconds']:.1f} | {r['speedup']:.2f}x | {r['density']:.3f} |")
    for keep, r in results["keep_sweep"].items():
        print(f"| {r['length']} (top-k every head, keep {keep}) | {r['tasks']} | {r['accuracy_dense']:.0%} | "
              f"{r['accuracy_sparse']:.0%} | {r['agreement']:.3f} | {r['dense_seconds']:.1f} | {r['sparse_seconds']:.1f} | "
              f"{r['speedup']:.2f}x | {r['density']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
