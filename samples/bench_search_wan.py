"""The search end to end at a long sequence: profile -> Optuna search -> Pareto front (speedup vs PSNR), on CPU.

Until the project's embedded model ships, this runs on a randomly initialised Wan pipeline built in code (the tiny
VAE of diffusers' tests and a WanTransformer3DModel of 2 layers x 12 heads x 64) at latent 8 x 64 x 64, i.e.
8 x 32 x 32 = 8192 video tokens per attention call. Random weights give attention with little structure, so
this measures the machinery (measured costs, pruning, the front), not the quality a trained model reaches.
PSNR is taken on the final latents (the VAE is not the point here).

    python samples/bench_search_wan.py --trials 12 --out samples/results/search_wan
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

CANDIDATES = ["full", "skip", "diagonal_w0.5", "diagonal_w1", "diagonal_w2", "multi_diagonal_w64", "multi_diagonal_w128",
              "vertical_stripe_f1", "vertical_stripe_f2", "topk_blocks_k0.1", "topk_blocks_k0.25"]


def build_pipeline(layers: int, heads: int, head_dim: int):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=256,
                                        num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads")
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                       transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--min-psnr", type=float, default=25.0)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--frames", type=int, default=29, help="pixel frames (29 -> 8 latent frames)")
    p.add_argument("--size", type=int, default=512, help="pixel height and width (512 -> 64 latent -> 32 tokens)")
    p.add_argument("--out", default="samples/results/search_wan")
    args = p.parse_args()

    import sparsediff

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = build_pipeline(args.layers, args.heads, args.head_dim)
    g = torch.Generator().manual_seed(1)
    call = dict(prompt_embeds=torch.randn(1, 16, 32, generator=g), negative_prompt_embeds=torch.randn(1, 16, 32, generator=g),
                height=args.size, width=args.size, num_frames=args.frames, num_inference_steps=args.steps, guidance_scale=5.0)
    start = time.perf_counter()
    prof = sparsediff.profile(pipe, [dict(call, output_type="latent", generator=torch.Generator().manual_seed(0))],
                              candidates=CANDIDATES, block_size=64, out=out / "profile")
    profile_s = time.perf_counter() - start
    start = time.perf_counter()
    plan, summary = sparsediff.search_plan(pipe, prof, [dict(call, seed=0)], out=out / "plan.json", min_psnr=args.min_psnr,
                                      trials=args.trials, backend="torch", force=True, return_summary=True,
                                      output_type="latent", storage=f"sqlite:///{(out / 'study.db').resolve()}")
    search_s = time.perf_counter() - start
    summary.update(profile_seconds=profile_s, search_seconds=search_s, layout=str(prof.layout), config=vars(args),
                   storage=f"sqlite:///{out / 'study.db'}", plan=str(out / "plan.json"), report=str(out / "search_report.png"))
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"layout {prof.layout}; profile {profile_s:.0f} s, search {search_s:.0f} s; trials {summary['trials']} "
          f"(pruned {summary['pruned']}); dense run {summary['dense_seconds']:.1f} s")
    print(f"{'trial':>5} {'pred. attn x':>12} {'measured run x':>14} {'PSNR dB':>8}  params")
    for o in summary["pareto_front"]:
        print(f"{o['number']:>5} {o['predicted_speedup']:>12.2f} {summary['dense_seconds'] / o['seconds']:>14.2f} {o['psnr']:>8.1f}  "
              f"dense_steps={o['params']['dense_steps']} dense_layers={o['params']['dense_layers']} allowance={o['params']['allowance']:.3f}")
    c = summary["chosen"]
    print(f"chosen trial {c['number']}: predicted {c['predicted_speedup']:.2f}x attention, measured {c['measured_speedup']:.2f}x run, PSNR {c['psnr']:.1f} dB")


if __name__ == "__main__":
    main()
