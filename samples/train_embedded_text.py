"""Train the embedded diffusion LM (resumable: run the same command again to continue) and ship it.

    python samples/train_embedded_text.py --out runs/embedded_text --minutes 60
    python samples/train_embedded_text.py --out runs/embedded_text --minutes 0 --ship   # copy the result into the package

The binding recipe the probes found (BENCHMARKS section 7; being tried at length, not yet shipped):

    python samples/train_embedded_text.py --out runs/text_D --minutes 45 --threads 1 --set curriculum=1500 \
        --set recall_share=0.8 --set lr=2e-3 --set eval_every=100 --set aux_weight=1.0 --set aux_layer=2 \
        --set redraw_attention_at=400

Writes `OUT/checkpoint.pt`, `OUT/pipeline/` (a saved LLaDA2Pipeline) and the loss curve (`--loss-png`, default
`OUT/loss.png`, so an experiment never overwrites the committed `samples/embedded_text_loss.png`; pass that path for a
run whose curve belongs in the repo); `--ship` copies the pipeline into `pipelines/assets/embedded_text/`.
"""

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

from sparsediff.pipelines.embedded_text.model import embedded_text_path
from sparsediff.pipelines.embedded_text.train import TrainConfig, plot_loss, train


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/embedded_text", help="checkpoint and output folder (resumes from it)")
    parser.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget of this run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--loss-png", type=Path, default=None, help="where to draw the loss curve (default OUT/loss.png)")
    parser.add_argument("--ship", action="store_true", help="copy the trained pipeline into the package assets")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a TrainConfig field, e.g. --set lr=2e-3 (the checkpoint records the configuration)")
    args = parser.parse_args()
    out = Path(args.out)
    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    changes = {}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in fields:
            parser.error(f"--set {item!r}: TrainConfig has no field {name!r}; fields: {', '.join(fields)}")
        changes[name] = type(getattr(TrainConfig(), name))(value)
    history = train(out, TrainConfig(**changes), args.minutes, threads=args.threads,
                    log=lambda line: print(line, file=sys.stderr, flush=True))
    plot_loss(history, args.loss_png or out / "loss.png")
    if args.ship:
        target = embedded_text_path()
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(out / "pipeline", target)
        print(f"shipped {out / 'pipeline'} -> {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
