"""Train sparsediff's embedded video model (`ShapesVideoPipeline`) on procedural clips, on the CPU.

The model generates 8 frames of 64 x 64 pixels: with patch (1, 2, 2) that is 8 x 32 x 32 = 8192 video tokens. The
clips (`pipelines/embedded/data.py`, issue 16) have the statistics that make real video DiTs' heads sparse: textured
backgrounds seen through a panning or zooming camera, and one to three objects with their own motion that may
occlude each other; captions state the objects and the camera. The transformer is `torch.compile`d (a minute or two,
once per step shape). Two steps in three run 4 clips at 8 x 32 x 32, every 3rd one clip at the full 8 x 64 x 64, so the
model sees the whole RoPE position range and the object sizes in pixels it generates at.

Recipe (the shipped model, one run): plain flow matching until `--structured-from`, then structure-aware training
(`--structured auto`, see `pipelines/embedded/structured.py`): a probe on three held-out clips measures every head's
relative error under the cheapest diagonal, multi-diagonal and vertical-stripe patterns and gives each head the one
it already fits best (the worst-fitting head of each middle layer stays full); from then on each step adds those
heads' relative squared difference between sparse and dense attention to the loss (`--consistency-weight`) and half
the steps pass the sparse output on. The model stays a dense model; the search is not told the assignment (it is
written to `<work-dir>/assignment.json` for the record). The shipped run was started on one thread of a 2-core CPU
(the other core busy with other work), stopped at step 400 and resumed on two threads, lengthened to 1 500 steps
(86.3 minutes of steps in all; the probe at step 450 ran in the second invocation, so its clips follow 1 500 steps):

    nohup .venv/bin/python samples/train_embedded.py --steps 1100 --structured auto --structured-from 450 \
        --consistency-weight 2.0 --max-minutes 100 --work-dir runs/embedded_v2/work --out runs/embedded_v2/pipe \
        > runs/embedded_v2/train.log 2>&1 &                       # stopped after the checkpoint at step 400
    nohup .venv/bin/python samples/train_embedded.py --steps 1500 --structured auto --structured-from 450 \
        --consistency-weight 2.0 --max-minutes 85 --threads 2 --work-dir runs/embedded_v2/work \
        --out runs/embedded_v2/pipe > runs/embedded_v2/train.log 2>&1 &

The run checkpoints every `--checkpoint-every` steps into `--work-dir` and resumes from there when started again
(the head assignment too). At each checkpoint it redraws the loss curve (`--loss-png`) and writes the pipeline with the
averaged (EMA) weights to `--out` (by default the package's `pipelines/assets/embedded/`), so a stopped run still
leaves a usable model. Each step logs its loss, its seconds and the elapsed time to stderr. `--threads 1` (the
default) leaves a core to other work: two torch threads under contention run several times slower, not faster.

    python samples/train_embedded.py --steps 20 --work-dir /tmp/embedded --out /tmp/embedded/pipe   # a smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from sparsediff.pipelines.embedded.train import TrainConfig, Trainer, plot_loss

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1600, help="optimizer steps in all")
    p.add_argument("--batch-size", type=int, default=4, help="clips per low-resolution step")
    p.add_argument("--full-res-every", type=int, default=3, help="every n-th step runs one clip at 8 x 64 x 64")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: min(50, steps / 10 + 1))")
    p.add_argument("--init-from", type=Path, default=None, help="start from the pipeline saved in this folder (a fine-tuning phase)")
    p.add_argument("--structured", choices=["auto"], default=None,
                   help="train heads towards sparse patterns: 'auto' gives each head the candidate it fits best, probed at --structured-from")
    p.add_argument("--structured-from", type=int, default=0, help="with --structured: the step the structure-aware terms start at")
    p.add_argument("--multi-object-prob", type=float, default=0.25, help="share of clips with two or three objects")
    p.add_argument("--sparse-prob", type=float, default=0.5, help="with --structured: share of steps passing sparse outputs on")
    p.add_argument("--consistency-weight", type=float, default=1.0, help="with --structured: weight of the sparse-vs-dense loss")
    p.add_argument("--checkpoint-every", type=int, default=25, help="steps between checkpoints")
    p.add_argument("--max-minutes", type=float, default=90.0, help="stop (and save) after this long")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 leaves a core to other work: two threads under contention thrash)")
    p.add_argument("--no-compile", action="store_true", help="run the transformer eagerly (no torch.compile)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "sparsediff" / "embedded_train_v2", help="checkpoint folder")
    p.add_argument("--out", type=Path, default=ROOT / "pipelines" / "assets" / "embedded", help="where the trained pipeline goes")
    p.add_argument("--loss-png", type=Path, default=ROOT / "samples" / "embedded_loss.png", help="loss curve")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        full_res_every=args.full_res_every,
        lr=args.lr,
        warmup=args.warmup if args.warmup is not None else min(50, args.steps // 10 + 1),  # 50 for 1600 steps
        init_from=str(args.init_from) if args.init_from is not None else None,
        head_patterns=args.structured,
        structured_from=args.structured_from,
        multi_object_prob=args.multi_object_prob,
        sparse_prob=args.sparse_prob,
        consistency_weight=args.consistency_weight,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        threads=args.threads,
    )
    torch.set_num_threads(config.threads)
    trainer = Trainer(config, args.work_dir, compile=not args.no_compile)
    if trainer.resume():
        print(f"resumed from {trainer.checkpoint_path} at step {trainer.step}", file=sys.stderr)
    print(f"training {config}", file=sys.stderr)

    def export(t: Trainer) -> None:
        plot_loss(t.history, args.loss_png)
        t.ema_pipeline().save_pretrained(args.out)
        if t.assignment is not None:  # what the heads were trained towards (the search does not read it)
            (args.work_dir / "assignment.json").write_text(json.dumps({"assignment": t.assignment, "candidates": t.config.auto_candidates, "probe_errors": t.probe_errors}, indent=1))
        seconds = sum(h.get("seconds", 0.0) for h in t.history)
        print(f"checkpoint at step {t.step}: {seconds / 60:.1f} min of steps in all; pipeline -> {args.out}", file=sys.stderr, flush=True)

    trainer.run(on_checkpoint=export, max_seconds=args.max_minutes * 60)
    if trainer.step < config.steps:
        print(f"stopped by --max-minutes at step {trainer.step} of {config.steps}; run again to continue", file=sys.stderr)


if __name__ == "__main__":
    main()
