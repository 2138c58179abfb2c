"""How far can the embedded model go sparse? Its training assignment, run as a plan, against dense.

The structure-aware training (`pipelines/embedded/structured.py`) pulled each head towards the pattern its probe
preferred (the assignment is in `samples/results/embedded/assignment.json`, written by the training run). This
probe runs exactly that assignment as a plan (the best case for those heads: no search involved), and the same
assignment with its multi-diagonal heads left full, each with a few leading dense steps, and prints the PSNR of the
final frames against dense and the attention density of the sparse steps.

It first prints the share of one dense denoiser forward (8192 tokens) spent in attention kernels, which bounds
any end-to-end speedup from sparse attention (Amdahl).

    python samples/probe_structured_plan.py                 # 2 prompts, 12 steps: about 6 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sparsediff.api import load_pipeline
from sparsediff.generate import generate
from sparsediff.metrics import psnr
from sparsediff.patterns import get_pattern
from sparsediff.plan import SparsePlan, StepRange

ROOT = Path(__file__).resolve().parents[1]


def plan_of(model, layers, dense_steps: int) -> SparsePlan:
    patterns = tuple(tuple(get_pattern(p) for p in layer) for layer in layers)
    return SparsePlan(model=model, ranges=[StepRange(0.0, 1.0, patterns)], dense_steps=dense_steps, layout="video:8x32x32").validate()


def attention_share(pipe) -> float:
    """Share of one dense forward's CPU time in `scaled_dot_product_attention` kernels (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(1, 3, 8, 64, 64, generator=torch.Generator().manual_seed(0))
    text = pipe.encode_prompt(["a red circle moving left"], pipe.tokenizer.model_max_length, "cpu")
    call = dict(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text)
    with torch.no_grad():
        pipe.transformer(**call)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            pipe.transformer(**call)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    attention = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key)
    return attention / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--dense-steps", default="2,4", help="leading dense steps to try, comma-separated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--assignment", type=Path, default=ROOT / "samples" / "results" / "embedded" / "assignment.json")
    args = p.parse_args()
    assignment = json.loads(args.assignment.read_text())["assignment"]
    torch.set_num_threads(args.threads)
    pipe = load_pipeline("embedded")
    pipe.set_progress_bar_config(disable=True)
    model = pipe.shipped_plan().model
    share = attention_share(pipe)
    print(f"attention share of a dense forward at 8192 tokens: {share:.1%} (sparse attention alone can give at most {1 / (1 - share):.2f}x)")
    prompts = ["a red circle moving left", "a blue circle moving right"]
    dense = generate(pipe, prompts, None, num_inference_steps=args.steps)
    no_md = [[("full" if n.startswith("multi_diagonal") else n) for n in layer] for layer in assignment]
    print(f"{'assignment':<32} {'dense steps':>11} {'PSNR dB':>8} {'density':>8}")
    for name, layers in (("training assignment", assignment), ("... multi_diagonal heads full", no_md)):
        for dense_steps in (int(x) for x in args.dense_steps.split(",")):
            sparse = generate(pipe, prompts, plan_of(model, layers, dense_steps), num_inference_steps=args.steps)
            print(f"{name:<32} {dense_steps:>11} {psnr(sparse.frames, dense.frames, data_range=1.0):>8.2f} {sparse.stats['sparse_density']:>8.3f}", flush=True)


if __name__ == "__main__":
    main()
