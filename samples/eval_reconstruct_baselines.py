"""The shipped reconstructor against nearest-neighbour tracking of its own frame-0 mesh, on held-out sequences.

    python samples/eval_reconstruct_baselines.py --split unseen_motion --sequences 8
    python samples/eval_reconstruct_baselines.py --regressor runs/reconstruct_reg/pipeline_deform   # + the one-step regressor

With `--regressor DIR` (a pipeline exported by `train_reconstruct.py --stage export --regressor deformation`: the
shipped autoencoders and shape DM, the deformation denoiser's network trained as a one-step regressor) a third row
moves the same frame-0 mesh with the regressor's one evaluation (same seed, so the same sampled shape; checked).

Both use the pipeline's frame-0 mesh; the pipeline moves it with the deformation DM + autoencoder, the baseline with
the displacement of each vertex's nearest frame-0 input point (sparse input corresponds across frames). Metrics:
IoU, Chamfer-L1, correspondence L2 at `--metric-points` (the protocol uses 100k; 20k keeps this to minutes).
Writes `samples/results/reconstruct/baselines_<split>.json`.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from sparsediff.api import load_pipeline
from sparsediff.pipelines.reconstruct import data
from sparsediff.pipelines.reconstruct.baselines import nearest_neighbour_tracking
from sparsediff.pipelines.reconstruct.generate import reconstruct, sample_points
from sparsediff.pipelines.reconstruct.geometry import sequence_metrics
from sparsediff.timing import device_name

KEYS = ("iou", "chamfer_l1", "correspondence_l2")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="unseen_motion", choices=data.SPLITS)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--metric-points", type=int, default=20_000)
    parser.add_argument("--regressor", type=Path, default=None, help="a pipeline whose deformation denoiser is the one-step regressor")
    args = parser.parse_args()
    pipe = load_pipeline("embedded", "cpu", kind="reconstruct")
    pipe.set_progress_bar_config(disable=True)
    names = ("pipeline", "nn_tracking")
    regressor = None
    if args.regressor is not None:
        import torch
        from sparsediff.pipelines.reconstruct.pipeline import Motion2VecSetsPipeline

        regressor = Motion2VecSetsPipeline.from_pretrained(args.regressor, dtype=torch.float32)
        regressor.set_progress_bar_config(disable=True)
        names += ("deformation_regressor",)
    rows = []
    for index in range(args.sequences):
        seq = data.sequence(args.split, index)
        points = sample_points(args.split, index, "sparse")
        result = reconstruct(pipe, points, "dense")
        tracked = nearest_neighbour_tracking(result.vertices[0], points)
        moved = {"pipeline": result.vertices, "nn_tracking": tracked}
        if regressor is not None:
            out = regressor(points, num_inference_steps=18, deformation_steps=1, generator=torch.Generator().manual_seed(0))
            if not (out.faces[0].shape == result.faces.shape and (out.vertices[0][0] == result.vertices[0]).all()):
                raise SystemExit(f"{args.regressor} sampled another frame-0 mesh than the shipped pipeline; export it with --regressor deformation from the shipped stages.")
            moved["deformation_regressor"] = out.vertices[0]
        row = {"sequence": index, "shape": seq.shape.kind}
        for name, vertices in moved.items():
            metrics = sequence_metrics(vertices, result.faces, seq, n_points=args.metric_points)
            row[name] = {k: metrics[k] for k in KEYS}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    summary = {"machine": device_name("cpu"), "split": args.split, "input": "sparse, 128 points",
               "metric_points": args.metric_points,
               "mean": {name: {k: statistics.mean(r[name][k] for r in rows) for k in KEYS} for name in names},
               "rows": rows}
    out = Path(__file__).parent / "results" / "reconstruct" / f"baselines_{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary["mean"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
