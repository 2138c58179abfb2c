"""The latent-set ablation (issue 14): the shipped shape autoencoder (64 latents x 8) against one global latent of the
same 512 floats, trained the same way for the same wall minutes, on ground-truth surfaces of held-out sequences.

    python samples/train_reconstruct.py --stage shape_ae_global --minutes 9.9 --out runs/reconstruct_global
    python samples/eval_reconstruct_ablation.py --global-ae runs/reconstruct_global --sequences 8

Each autoencoder encodes 512 ground-truth surface points of a frame (posterior mean), decodes, and is meshed at 64^3;
IoU against the frame's occupancy at `--metric-points` uniform points and Chamfer-L1 against its surface (the
OFlow / CaDeX protocol at fewer points). Frames 0, 8 and 16 of each sequence: the pipeline meshes frame 0 only, but
the autoencoders were trained on every frame's shape. Writes `samples/results/reconstruct/ablation_global_latent.json`.
This compares the representations (an autoencoder's ceiling); a pipeline on the global latent would need both
denoisers retrained on it, which is not done.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sparsediff.api import load_pipeline
from sparsediff.pipelines.reconstruct import data
from sparsediff.pipelines.reconstruct.geometry import NoSurfaceError, chamfer_l1, extract_mesh, mesh_iou
from sparsediff.pipelines.reconstruct.train import load_stage_model
from sparsediff.timing import device_name

FRAMES = (0, 8, 16)


@torch.no_grad()
def reconstruct_frame(model, surface: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    hidden = model.decode(model.encode(torch.from_numpy(surface)[None]).mean)
    logits = lambda p: model.occupancy(hidden, torch.from_numpy(p)[None])[0].numpy()  # noqa: E731
    return extract_mesh(logits, resolution=resolution)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--global-ae", type=Path, required=True, help="work folder holding shape_ae_global/model")
    parser.add_argument("--splits", default="unseen_motion,unseen_shape")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--metric-points", type=int, default=20_000)
    parser.add_argument("--mesh-resolution", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {
        "set (64 x 8)": load_pipeline("embedded", "cpu", kind="reconstruct").shape_autoencoder.float().eval(),
        "global (1 x 512)": load_stage_model(args.global_ae, "shape_ae_global").eval(),
    }
    rows = []
    for split in args.splits.split(","):
        for index in range(args.sequences):
            seq = data.sequence(split, index)
            surface = seq.surface(512, seed=12345)
            gt_surface = seq.surface(args.metric_points, 0)
            for frame in FRAMES:
                points, labels = seq.volume_points(args.metric_points, 0, frame)
                row = {"split": split, "sequence": index, "shape": seq.shape.kind, "frame": frame}
                for name, model in models.items():
                    started = time.perf_counter()
                    try:
                        vertices, faces = reconstruct_frame(model, surface[frame], args.mesh_resolution)
                    except NoSurfaceError:
                        row[name] = {"iou": 0.0, "chamfer_l1": None, "no_surface": True}
                        continue
                    row[name] = {
                        "iou": mesh_iou(vertices, faces, points, labels),
                        "chamfer_l1": chamfer_l1(vertices, faces, gt_surface[frame], n_samples=args.metric_points, seed=frame),
                        "seconds": round(time.perf_counter() - started, 2),
                    }
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)

    def mean(split: str, name: str, key: str, kind: str | None = None) -> float | None:
        values = [r[name][key] for r in rows if r["split"] == split and (kind is None or r["shape"] == kind)
                  and r[name].get(key) is not None]
        return statistics.mean(values) if values else None

    summary = {"machine": device_name("cpu"), "metric_points": args.metric_points, "frames": FRAMES,
               "mesh_resolution": args.mesh_resolution, "mean": {}, "rows": rows}
    for split in args.splits.split(","):
        kinds = sorted({r["shape"] for r in rows if r["split"] == split})
        summary["mean"][split] = {
            name: {"iou": mean(split, name, "iou"), "chamfer_l1": mean(split, name, "chamfer_l1"),
                   "iou_by_shape": {kind: mean(split, name, "iou", kind) for kind in kinds},
                   "no_surface": sum(bool(r[name].get("no_surface")) for r in rows if r["split"] == split)}
            for name in models
        }
    out = Path(__file__).parent / "results" / "reconstruct" / "ablation_global_latent.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary["mean"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
