"""Does the embedded DLM learn to bind keys to values? A fast probe on short contexts (BENCHMARKS section 7).

    python samples/probe_dlm_binding.py --minutes 8                              # plain lookups among <= 4 pairs
    python samples/probe_dlm_binding.py --minutes 8 --echo-share 0.3             # + "; kA ->" asks for kA itself
    python samples/probe_dlm_binding.py --minutes 8 --aux-weight 1 --aux-layer 2 # + every value names its key mid-network
    python samples/probe_dlm_binding.py --minutes 8 --init-range 0.02            # Llama's default initialisation
    python samples/probe_dlm_binding.py --minutes 10 --qk-init 0.02              # a softer start for attention only
    python samples/probe_dlm_binding.py --minutes 9 --layers 2                   # the smallest model that can bind
    python samples/probe_dlm_binding.py --minutes 40 --layers 2                  # ~10k steps: a late phase change?
    python samples/probe_dlm_binding.py --minutes 25 --layers 2 --plain-embeddings  # no shared class direction
    python samples/probe_dlm_binding.py --minutes 20 --layers 2 --weight-decay 0.1   # decay what the lookup does not use
    python samples/probe_dlm_binding.py --minutes 15 --layers 2 --aux-weight 1 --aux-layer 1 --echo-share 0.3 --save runs/probe_model_aux_l2
    python samples/probe_dlm_attention.py --model runs/probe_model_aux_l2           # where the answer slot attends
    python samples/probe_dlm_binding.py --minutes 10 --layers 2 --aux-weight 1 --aux-layer 1 --echo-share 0.3 \
        --reinit-qk-at 400 --save runs/probe_model_reinit_l2                      # layer 1's attention re-drawn at step 400
    python samples/probe_dlm_binding.py --minutes 12 --layers 2 --arch qwen3 --save runs/probe_model_qwen3_l2  # QK-norm
    python samples/probe_dlm_binding.py --minutes 25 --layers 4 --aux-weight 1 --aux-layer 2 --echo-share 0.3 \
        --reinit-qk-at 400 --reinit-from 2 --seed 1 --save runs/probe_model_reinit_l4 > runs/probe_reinit_l4.log
                                                # stage 1 of the shipped DLM (samples/train_embedded_text.py)
    python samples/probe_dlm_binding.py --plot-log runs/probe_reinit_l4.log --loss-png samples/embedded_text_loss_stage1.png

Each step is a batch of short prompts (1..--pairs `kA = vB ;` pairs among up to 4 filler words per pair, then
`? kA ->`), all 8 answer slots masked, cross-entropy on them (the LLaDA loss with every slot masked). Every 50
steps it prints the one-pass accuracy of the first slot on 64 fresh prompts: echo with 4 pairs (when trained), and
lookups among 1, 4 and 16 pairs. Copying the only value (1 pair) is learned within ~100-250 steps at
--init-range 0.1. Binding stays at chance in every setting without auxiliary losses; with them plus layer 1's
attention re-drawn after the features form (--reinit-qk-at), 2-pair lookups reach 98% and 4-pair ones rise above
chance within 20 minutes (`--seed 1 --minutes 20`). One thread, seeded.
"""

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sparsediff.pipelines.embedded_text import model as M
from sparsediff.pipelines.embedded_text.tasks import ANSWER_SLOTS, VALUES, VOCAB
from sparsediff.pipelines.embedded_text.tasks import short_prompt as prompt
from sparsediff.pipelines.embedded_text.train import MASK, encode


LINE = re.compile(r"step (\d+) loss ([\d.]+) aux ([\d.]+) accuracy echo@4 ([\d.]+) lookup@1 ([\d.]+) @4 ([\d.]+) @16 ([\d.]+)")


def plot_log(log: Path, png: Path) -> None:
    """Draw a probe's printed log (loss, auxiliary loss, accuracies every 50 steps) as a small PNG: stage 1 of the
    shipped DLM's recipe keeps its curve this way (`--plot-log LOG --loss-png PNG`)."""
    from matplotlib.figure import Figure

    rows = [tuple(float(g) for g in m.groups()) for m in map(LINE.search, log.read_text().splitlines()) if m]
    if not rows:
        raise SystemExit(f"{log} holds no probe progress lines ('step N loss ... @16 ...'); give a probe's log.")
    cols = list(zip(*rows))
    fig = Figure(figsize=(6, 3), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(cols[0], [max(v, 1e-4) for v in cols[1]], lw=1, label="answer-slot loss (one batch)")
    ax.plot(cols[0], [max(v, 1e-4) for v in cols[2]], lw=1, label="auxiliary loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend(loc="upper right", fontsize=7)
    acc = ax.twinx()
    for i, name in ((5, "lookups among 4 pairs"), (6, "among 16 (never trained)")):
        acc.plot(cols[0], cols[i], "--", lw=1, label=name)
    acc.set_ylim(0, 1)
    acc.set_ylabel("first-slot accuracy")
    acc.legend(loc="center right", fontsize=7)
    ax.set_title(f"binding probe ({log.name}), {int(cols[0][-1])} steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(png)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (the repo trainer uses 0.01)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=4, help="at most this many pairs per training prompt")
    parser.add_argument("--echo-share", type=float, default=0.0)
    parser.add_argument("--aux-weight", type=float, default=0.0, help="weight of the auxiliary 'name the key two tokens back' loss")
    parser.add_argument("--aux-layer", type=int, default=4, help="the layer whose output (final norm, tied head) the auxiliary loss reads")
    parser.add_argument("--init-range", type=float, default=M.MODEL_CONFIG["initializer_range"])
    parser.add_argument("--rope-theta", type=float, default=M.MODEL_CONFIG["rope_theta"])
    parser.add_argument("--layers", type=int, default=M.MODEL_CONFIG["num_hidden_layers"], help="transformer layers (the shipped model has 4)")
    parser.add_argument("--qk-init", type=float, default=None, help="re-initialise the query and key projections with this std (a softer start for attention)")
    parser.add_argument("--arch", default="llama", choices=("llama", "qwen3"), help="qwen3: the same sizes with QK-norm (q and k RMS-normalised per head)")
    parser.add_argument("--plain-embeddings", action="store_true", help="re-draw the token embeddings without the shared per-class direction build_model adds")
    parser.add_argument("--reinit-qk-at", type=int, default=None, help="at this step, re-draw the q/k projections of the layers from --reinit-from on (std --qk-init or 0.02): do saturated attention sinks block a matching layer?")
    parser.add_argument("--reinit-from", type=int, default=1, help="first layer --reinit-qk-at re-draws")
    parser.add_argument("--save", default=None, help="save the trained model to this folder (for inspection)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot-log", type=Path, default=None, help="do not train: draw this probe log as --loss-png")
    parser.add_argument("--loss-png", type=Path, default=None, help="with --plot-log: the PNG to write")
    args = parser.parse_args()
    if args.plot_log:
        if args.loss_png is None:
            parser.error("--plot-log needs --loss-png PNG (where to draw it)")
        plot_log(args.plot_log, args.loss_png)
        return 0
    torch.set_num_threads(1)
    M.MODEL_CONFIG.update(initializer_range=args.init_range, rope_theta=args.rope_theta, num_hidden_layers=args.layers)
    model = M.build_model(args.seed, args.arch).train()
    if args.plain_embeddings:
        with torch.no_grad():
            torch.nn.init.normal_(model.get_input_embeddings().weight, std=args.init_range, generator=torch.Generator().manual_seed(args.seed))
    if args.qk_init is not None:
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                torch.nn.init.normal_(proj.weight, std=args.qk_init)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    rng = np.random.default_rng(args.seed)
    is_value = torch.zeros(len(VOCAB), dtype=torch.bool)
    is_value[[VOCAB.index(v) for v in VALUES]] = True
    start = time.monotonic()
    step = 0
    while time.monotonic() - start < args.minutes * 60:
        step += 1
        if step == args.reinit_qk_at:
            with torch.no_grad():
                for layer in model.model.layers[args.reinit_from:]:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                        torch.nn.init.normal_(proj.weight, std=args.qk_init or 0.02)
            opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)  # fresh moments
            print(f"step {step}: q/k of layers {args.reinit_from}.. re-drawn", flush=True)
        pairs = int(rng.integers(1, args.pairs + 1))
        filler = int(rng.integers(0, 4 * args.pairs + 1))
        rows = [prompt(rng, pairs, filler, echo=rng.uniform() < args.echo_share) for _ in range(args.batch)]
        ids = torch.tensor([encode(p + a) for p, a in rows])
        x = ids.clone()
        x[:, -ANSWER_SLOTS:] = MASK
        out = model.model(input_ids=x, output_hidden_states=args.aux_weight > 0)
        logits = model.lm_head(out.last_hidden_state[:, -ANSWER_SLOTS:])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, -ANSWER_SLOTS:].reshape(-1))
        aux = torch.zeros(())
        if args.aux_weight > 0:
            where = is_value[x]
            where[:, :2] = False
            where[:, -ANSWER_SLOTS] = True  # the first slot names the asked key too
            rows_, cols = where.nonzero(as_tuple=True)
            mid = model.model.norm(out.hidden_states[args.aux_layer])
            aux = F.cross_entropy(model.lm_head(mid[rows_, cols]).float(), ids[rows_, cols - 2])
        opt.zero_grad()
        (loss + args.aux_weight * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            with torch.no_grad():
                accuracy = []
                for pairs_eval, echo in ((4, True), (1, False), (4, False), (16, False)):
                    rows = [prompt(rng, pairs_eval, 4 * pairs_eval, echo=echo) for _ in range(64)]
                    ids = torch.tensor([encode(p + a) for p, a in rows])
                    x = ids.clone()
                    x[:, -ANSWER_SLOTS:] = MASK
                    first = model(input_ids=x).logits[:, -ANSWER_SLOTS].argmax(-1)
                    accuracy.append(round((first == ids[:, -ANSWER_SLOTS]).float().mean().item(), 2))
            print(f"step {step} loss {loss.item():.3f} aux {aux.item():.3f} accuracy echo@4 {accuracy[0]} "
                  f"lookup@1 {accuracy[1]} @4 {accuracy[2]} @16 {accuracy[3]} ({time.monotonic() - start:.0f} s)", flush=True)
    # Which value does a 2-pair lookup pick? The asked one, the one nearer the question, or something else.
    with torch.no_grad():
        picks = {"asked": 0, "nearer value": 0, "farther value": 0, "other": 0}
        for _ in range(4):
            rows = [prompt(rng, 2, 8) for _ in range(64)]
            ids = torch.tensor([encode(p + a) for p, a in rows])
            x = ids.clone()
            x[:, -ANSWER_SLOTS:] = MASK
            first = model(input_ids=x).logits[:, -ANSWER_SLOTS].argmax(-1)
            for (words, answer), pick in zip(rows, first.tolist()):
                values = [w for w in words if w in VALUES]  # in text order: the second is nearer the question
                word = VOCAB[pick]
                picks["asked" if word == answer[0] else "nearer value" if word == values[1] else "farther value" if word == values[0] else "other"] += 1
    print("2-pair picks:", {k: round(v / 256, 2) for k, v in picks.items()}, flush=True)
    if args.save:
        model.save_pretrained(args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
