"""Where a reconstruction's time goes, and the most any attention plan could save on it.

    python samples/bench_reconstruct.py --sequences 2

For each held-out sequence (unseen motion, sparse input) the shipped pipeline runs dense, then with every head of
the deformation denoiser's self-attention skipped (the physical limit of a sparse plan there: attention costs
nothing), then dense again; the median time of each part (shape DM, deformation DM, meshing, deformation decode)
and the end-to-end ratio, with the quality of both (IoU, Chamfer-L1, correspondence L2 at `--metric-points`).
Writes `samples/results/reconstruct/bench.json`.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import sparsediff
from sparsediff.api import load_pipeline
from sparsediff.pipelines.adapter import fingerprint
from sparsediff.pipelines.reconstruct import data
from sparsediff.pipelines.reconstruct.generate import reconstruct, sample_points
from sparsediff.pipelines.reconstruct.geometry import sequence_metrics
from sparsediff.plan import SparsePlan
from sparsediff.timing import device_name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--metric-points", type=int, default=20_000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "reconstruct" / "bench.json"))
    args = parser.parse_args()
    pipe = load_pipeline("embedded", "cpu", kind="reconstruct")
    pipe.set_progress_bar_config(disable=True)
    fp = fingerprint(pipe.deformation_denoiser)
    skip = SparsePlan.uniform(fp, "skip", block_size=16)
    input_type = pipe.deformation_denoiser.config.input_type
    rows = []
    for index in range(args.sequences):
        points = sample_points("unseen_motion", index, input_type)
        seq = data.sequence("unseen_motion", index)
        runs = {}
        for name, plan in (("dense", "dense"), ("skip", skip), ("dense_again", "dense")):
            runs[name] = reconstruct(pipe, points, plan, backend="torch")
        quality = {name: sequence_metrics(runs[name].vertices, runs[name].faces, seq, n_points=args.metric_points)
                   for name in ("dense", "skip")}
        row = {"sequence": index, "shape": seq.shape.kind}
        for name, run in runs.items():
            row[name] = {"seconds": run.seconds, **{k: round(v, 4) for k, v in run.timings.items()}}
        for name, q in quality.items():
            row[name].update({k: q[k] for k in ("iou", "chamfer_l1", "correspondence_l2")})
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    dense = [min(r["dense"]["seconds"], r["dense_again"]["seconds"]) for r in rows]
    skipped = [r["skip"]["seconds"] for r in rows]
    parts = {part: statistics.median(r["dense"][part] for r in rows) for part in ("shape_dm", "deformation_dm", "meshing", "deformation_decode")}
    summary = {
        "machine": device_name("cpu"), "model": f"{fp.model_class} ({pipe.deformation_denoiser.config.space_time}, "
        f"{fp.num_layers} self-attention layers x {fp.num_heads} heads x {fp.head_dim})",
        "median_dense_parts_s": parts, "median_dense_s": statistics.median(dense), "median_skip_s": statistics.median(skipped),
        "ceiling_speedup": statistics.median(d / s for d, s in zip(dense, skipped)), "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
