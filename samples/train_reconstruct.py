"""Train the Motion2VecSets-style 4D reconstructor on SynthDeform4D on the CPU, stage by stage, and ship it.

Stages (each resumable with --resume; a DM stage needs the autoencoders it encodes with):
    shape_ae, deform_ae, shape_dm, deform_dm   train one stage for --minutes of wall time
    all                                        the four in order, --minutes split 22/20/20/38 %
    export                                     the four EMA models as one float16 pipeline in --export-to
    eval                                       end-to-end metrics and timings of the exported pipeline

Loss curves go to samples/reconstruct_loss_<stage>.png; checkpoints, data and models to --out (runs/ is gitignored).
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
    parser.add_argument("--stage", required=True, choices=(*train.STAGES, "all", "export", "eval"))
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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    config = train.TrainConfig(
        model=ReconstructModelConfig(input_type=args.input_type, space_time=args.space_time), seed=args.seed, train_sequences=args.train_sequences,
    )
    if args.stage == "export":
        train.export_pipeline(args.out, args.export_to, config)
        size = sum(f.stat().st_size for f in args.export_to.rglob("*") if f.is_file())
        print(f"exported to {args.export_to} ({size / 2**20:.1f} MiB)", file=sys.stderr)
        return 0
    if args.stage == "eval":
        pipe = Motion2VecSetsPipeline.from_pretrained(args.export_to, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        print(json.dumps(train.evaluate_pipeline(pipe, args.split, args.sequences, args.input_type, args.mesh_resolution, first=args.first), indent=1))
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
