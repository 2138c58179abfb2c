"""Train the Motion2VecSets-style 4D reconstructor on SynthDeform4D on the CPU, stage by stage, and ship it.

Stages (each resumable with --resume; a DM stage needs the autoencoders it encodes with):
    shape_ae, deform_ae, shape_dm, deform_dm   train one stage for --minutes of wall time
    shape_reg, deform_reg                      the one-step regressor baseline: the DMs' networks trained at sigma_max
                                               only (export --regressor both|deformation, eval --steps 1 or
                                               --deformation-steps 1)
    all                                        the four in order, --minutes split 22/20/20/38 %
    export                                     the four EMA models as one float16 pipeline in --export-to
    eval                                       end-to-end metrics and timings of the exported pipeline

Loss curves go to samples/reconstruct_loss_<stage>.png (a DM stage for partial input or the joint block adds
_partial / _joint); checkpoints, data and models to --out (runs/ is gitignored).
The shipped pipeline (pipelines/assets/reconstruct) was trained with (2-core CPU shared with another training job,
one thread; 32.5 + 12 wall minutes; the figures it reached are below):

    nohup .venv/bin/python samples/train_reconstruct.py --stage all --minutes 45 --out runs/reconstruct > runs/reconstruct.log 2>&1 &
    # a second phase of the deformation DM: a new work folder sharing the other stages and the data
    mkdir runs/reconstruct_p2 && for f in shape_ae deform_ae shape_dm data_train_sparse_512.npz data_val_sparse_16.npz; do
        ln -s ../reconstruct/$f runs/reconstruct_p2/$f; done
    .venv/bin/python samples/train_reconstruct.py --stage deform_dm --minutes 12 --out runs/reconstruct_p2 \
        --init-from runs/reconstruct/deform_dm/model
    .venv/bin/python samples/train_reconstruct.py --stage export --out runs/reconstruct_p2
    .venv/bin/python samples/train_reconstruct.py --stage eval --split unseen_motion --sequences 4

Figures reached (validation at the end of each stage, EMA weights):
    shape AE      1941 steps, 8.5 wall min: IoU 0.605 on the volume samples of 16 val sequences (a first run with the
                  original KL weight 1e-3, 1889 steps, 9.0 min, reached 0.565 and was discarded)
    deform AE     2683 steps, 7.8 min: mean L2 0.0093 of held-out surface points over frames 0 -> t
    shape DM      2157 steps, 8.3 min: EDM val loss 0.879
    deform DM     1191 steps, 8.1 min, then 808 steps, 12.0 min: EDM val loss 0.640 -> 0.627
End to end on unseen_motion 0-7 from sparse input (128 points, 18 Heun steps, 64^3 marching cubes; eval --first 0
and --first 4): IoU 0.463, Chamfer-L1 0.0345, correspondence L2 0.053; spheres 0.83 / 0.84, ellipsoids 0.72 / 0.81,
tori 0.03-0.23. From ground-truth latents (oracle) IoU 0.554, Chamfer-L1 0.026, correspondence L2 0.029: the shape
AE is the ceiling (it fails on tori). The project's IoU target of 0.8 is met only on spheres and some ellipsoids.
About 2.5 s a sequence on one thread of the shared CPU: deformation DM 1.9-2.4 s, meshing 0.5-0.7 s, deformation
decode 0.1-0.2 s, shape DM 0.1-0.2 s.

A stage plans as many steps as fit its minutes at the speed of its first steps, so on a CPU whose load changes it may
end early (the DM stages above did) or stop before its plan (then --resume continues it).

Machine-readable results (eval) go to stdout as JSON, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from sparsediff.pipelines.reconstruct import train
from sparsediff.pipelines.reconstruct.pipeline import (
    Motion2VecSetsPipeline,
    ReconstructModelConfig,
    reconstruct_path,
)

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", required=True, choices=(*train.STAGES, *train.REGRESSOR_STAGES, *train.ABLATION_STAGES, "all", "export", "eval"))
    parser.add_argument("--minutes", type=float, default=10.0, help="wall minutes of this call (for 'all': of the four stages together)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reconstruct", help="work folder: data, checkpoints, stage models")
    parser.add_argument("--resume", action="store_true", help="continue the stages' checkpoints in --out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--train-sequences", type=int, default=None, help="training sequences (default: the whole split)")
    parser.add_argument("--input-type", default="sparse", choices=("sparse", "partial"))
    parser.add_argument("--space-time", default="interleaved", choices=("interleaved", "joint"))
    parser.add_argument("--init-from", type=Path, default=None, help="a fresh single stage starts from this saved stage model")
    parser.add_argument("--export-to", type=Path, default=reconstruct_path(), help="the pipeline folder export writes and eval reads")
    parser.add_argument("--split", default="unseen_motion", help="eval: the split")
    parser.add_argument("--sequences", type=int, default=4, help="eval: sequences of the split")
    parser.add_argument("--first", type=int, default=0, help="eval: index of the first sequence")
    parser.add_argument("--mesh-resolution", type=int, default=64)
    parser.add_argument("--regressor", choices=("both", "deformation"), default=None,
                        help="export: the one-step regressors (shape_reg, deform_reg) in both denoisers' places, or in the deformation denoiser's only")
    parser.add_argument("--steps", type=int, default=18, help="eval: Heun steps per solve (1 for a regressor pipeline)")
    parser.add_argument("--deformation-steps", type=int, default=None, help="eval: Heun steps of the deformation solve (default: --steps)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    config = train.TrainConfig(
        model=ReconstructModelConfig(input_type=args.input_type, space_time=args.space_time), seed=args.seed, train_sequences=args.train_sequences,
    )
    if args.stage == "export":
        train.export_pipeline(args.out, args.export_to, config, regressor=args.regressor)
        size = sum(f.stat().st_size for f in args.export_to.rglob("*") if f.is_file())
        print(f"exported to {args.export_to} ({size / 2**20:.1f} MiB)", file=sys.stderr)
        return 0
    if args.stage == "eval":
        pipe = Motion2VecSetsPipeline.from_pretrained(args.export_to, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        print(json.dumps(train.evaluate_pipeline(pipe, args.split, args.sequences, args.input_type, args.mesh_resolution, first=args.first,
                                                    num_inference_steps=args.steps, deformation_steps=args.deformation_steps), indent=1))
        return 0
    if args.init_from is not None and args.stage == "all":
        parser.error("--init-from names one stage's model; use it with a single --stage.")
    stages = train.STAGES if args.stage == "all" else (args.stage,)
    for stage in stages:
        minutes = args.minutes * (train.STAGE_SHARE[stage] if args.stage == "all" else 1.0)
        started = time.perf_counter()
        trainer = train.train_stage(stage, config, args.out, minutes, args.resume, plot_dir=ROOT / "samples", init_from=args.init_from)
        print(f"{stage}: step {trainer.step}/{trainer.planned_steps}, {(time.perf_counter() - started) / 60:.1f} wall min in this call", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
