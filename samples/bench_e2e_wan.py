"""End-to-end: how much faster is a whole Wan denoiser forward with a sparse plan of known density than dense?

A `WanTransformer3DModel` with a tiny config but a long sequence (latent 8x64x64, patch (1, 2, 2): 8 x 32 x 32 =
8192 video tokens) runs one forward three ways, timed round-robin in one process: plain (no sparsediff), accelerated
with an all-`full` plan (the wrapper's own cost; its output must be identical), and accelerated with a uniform sparse
plan. The handles' stats give the time inside attention, so the run reports the attention share of the forward,
the end-to-end and attention speedups, and efficiency = attention speedup x density (1.0 = the 1/density limit).
A correctness check is printed first.

    python samples/bench_e2e_wan.py                      # diagonal_w1 on every head, CPU float32
    python samples/bench_e2e_wan.py --density 0.25 --kind multi_diagonal --json
    python samples/bench_e2e_wan.py --device cuda --dtype bfloat16 --frames 16
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys

import torch
from diffusers import WanTransformer3DModel

import sparsediff
from sparsediff.bench import DTYPES, pattern_for_density
from sparsediff.layout import TokenLayout
from sparsediff.patterns import get_pattern
from sparsediff.pipelines.adapter import fingerprint
from sparsediff.plan import SparsePlan
from sparsediff.runtime import SparseAttention, resolve_backend
from sparsediff.timing import device_name, median_ms


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=8, help="latent frames (tokens: frames x height/2 x width/2)")
    p.add_argument("--height", type=int, default=64, help="latent height")
    p.add_argument("--width", type=int, default=64, help="latent width")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--text-len", type=int, default=512, help="text tokens of the cross-attention (Wan pads to 512)")
    p.add_argument("--pattern", default="diagonal_w1", help="the pattern of every head (ignored with --density)")
    p.add_argument("--density", type=float, help="instead of --pattern: a --kind pattern of this block density")
    p.add_argument("--kind", default="diagonal", help="pattern kind for --density")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--backend", help="sparse backend (default: automatic)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    return p.parse_args(argv)


def build_model(args, device, dtype) -> WanTransformer3DModel:
    dim = args.heads * args.head_dim
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=args.heads,
        attention_head_dim=args.head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=256,
        freq_dim=256,
        ffn_dim=int(2.7 * dim),  # Wan 14B: 13824 / 5120
        num_layers=args.layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
    )
    model = model.to(device)
    if dtype != torch.float32:  # diffusers warns on any dtype cast; float32 needs none
        model = model.to(dtype=dtype)
    return model.eval()


def bench_setup(args):
    """Device, dtype, layout, pattern, its density and the log function the flags give."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bfloat16" if device == "cuda" else "float32")]
    layout = TokenLayout.video_only(args.frames, args.height // 2, args.width // 2)
    pattern = chosen_pattern(args, layout)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print  # --json keeps stdout for the result
    return device, dtype, layout, pattern, pattern.estimated_density(layout, args.block_size), log


def chosen_pattern(args, layout):
    """The pattern of every head: `--pattern`, or a `--kind` pattern of block density `--density`."""
    if args.density is not None:
        return pattern_for_density(args.kind, args.density, layout, args.block_size)
    return get_pattern(args.pattern)


def forward_inputs(args, device, dtype) -> dict:
    """The forward's inputs: seeded latents of the configured size, timestep 500, text embeddings."""
    g = torch.Generator(device=device).manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 16, args.frames, args.height, args.width, generator=g, device=device, dtype=dtype),
        timestep=torch.tensor([500], device=device),
        encoder_hidden_states=torch.randn(1, args.text_len, 256, generator=g, device=device, dtype=dtype),
        return_dict=False,
    )


def sampled_kernel_error(layout, heads, head_dim, pattern, block_size, backend, device, dtype) -> float:
    """Max abs error of the sparse runtime against masked attention (the specs' exact token rule) on 256 rows."""
    g = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(1, heads, layout.num_tokens, head_dim, generator=g, device=device, dtype=dtype) for _ in range(3))
    runtime = SparseAttention(backend=backend)
    out, stats = runtime(q, k, v, layout, [pattern] * heads, block_size)
    group = stats.groups[0]
    rows = torch.linspace(0, layout.num_tokens - 1, 256).long()
    order = group.order
    kq, kk, kv = (x if order is None else x[:, :, order.to(device)] for x in (q, k, v))
    kernel_rows = rows if order is None else group.position[rows]  # the spec speaks kernel order
    allowed = torch.stack([group.spec.token_allowed(kernel_rows, torch.arange(layout.num_tokens), h if group.spec.block_mask.shape[0] > 1 else 0)
                           for h in range(heads)]).to(device)  # (H, rows, S)
    scores = (kq[0][:, kernel_rows.to(device)].float() @ kk[0].float().transpose(-1, -2)) * head_dim**-0.5
    expect = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ kv[0].float()
    return float((out[0][:, rows.to(device)].float() - expect).abs().max())


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype, layout, pattern, density, log = bench_setup(args)

    plain = build_model(args, device, dtype)
    dense_model, sparse_model = copy.deepcopy(plain), copy.deepcopy(plain)
    plan = SparsePlan.uniform(fingerprint(plain), pattern, block_size=args.block_size)
    # num_steps=1: every forward is a run of its own, so each handle's stats hold just the latest forward
    dense_handle = sparsediff.accelerate(dense_model, backend=args.backend, num_steps=1)
    sparse_handle = sparsediff.accelerate(sparse_model, plan, backend=args.backend, num_steps=1)
    inputs = forward_inputs(args, device, dtype)

    # correctness first
    with torch.no_grad():
        reference = plain(**inputs)[0]
        exact = torch.equal(dense_model(**inputs)[0], reference)
        sparse_out = sparse_model(**inputs)[0]
    rel_error = float((sparse_out.float() - reference.float()).norm() / reference.float().norm())
    kernel_error = sampled_kernel_error(layout, args.heads, args.head_dim, pattern, args.block_size, args.backend, device, dtype)
    ran_sparse = not sparse_handle.stats[0].dense and abs(sparse_handle.stats[0].density - density) < 1e-6
    log(f"correctness: all-full plan output identical to plain: {exact}; sparse plan ran sparse at density "
        f"{density:.3f}: {ran_sparse}; output finite: {bool(torch.isfinite(sparse_out).all())}; "
        f"sparse kernel max abs error vs masked attention (256 rows): {kernel_error:.2e}; "
        f"output relative L2 vs dense: {rel_error:.3f}")

    attention_ms = {"dense": [], "sparse": []}

    def forward(model, handle=None, key=None):
        with torch.no_grad():
            model(**inputs)
        if handle is not None:
            attention_ms[key].append(sum(s.attention_ms for s in handle.stats))

    times = median_ms(
        {
            "plain": lambda: forward(plain),
            "dense": lambda: forward(dense_model, dense_handle, "dense"),
            "sparse": lambda: forward(sparse_model, sparse_handle, "sparse"),
        },
        args.repeats,
        device,
    )
    attn_dense = statistics.median(attention_ms["dense"][1:] or attention_ms["dense"])  # skip the warm-up call
    attn_sparse = statistics.median(attention_ms["sparse"][1:] or attention_ms["sparse"])
    share = attn_dense / times["dense"]
    attention_speedup = attn_dense / attn_sparse
    result = {
        "config": {
            "layout": str(layout), "tokens": layout.num_tokens, "layers": args.layers, "heads": args.heads,
            "head_dim": args.head_dim, "text_len": args.text_len, "dtype": str(dtype).removeprefix("torch."),
            "block_size": args.block_size, "pattern": pattern.name, "backend": resolve_backend(args.backend, torch.device(device)),
            "device": device_name(device), "repeats": args.repeats, "torch": torch.__version__,
        },
        "correct": {"dense_plan_exact": exact, "ran_sparse": ran_sparse, "kernel_max_abs_error": kernel_error,
                    "output_rel_l2_vs_dense": round(rel_error, 4)},
        "density": round(density, 4),
        "forward_ms": {k: round(v, 2) for k, v in times.items()},
        "attention_ms": {"dense": round(attn_dense, 2), "sparse": round(attn_sparse, 2)},
        "attention_share": round(share, 4),
        "wrapper_overhead": round(times["dense"] / times["plain"] - 1, 4),
        "speedup_e2e": round(times["plain"] / times["sparse"], 3),
        "speedup_e2e_limit": round(1 / (1 - share + share * density), 3),  # Amdahl with ideal sparse attention
        "speedup_attention": round(attention_speedup, 3),
        "efficiency": round(attention_speedup * density, 3),
    }
    sparse_handle.remove()
    dense_handle.remove()
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    c = result["config"]
    print(f"WanTransformer3DModel {c['layers']} layers, {c['heads']}x{c['head_dim']}, "
          f"{c['layout']} ({c['tokens']} tokens), {c['dtype']}, {c['device']}, {c['backend']}; plan: {pattern.name} on every head, "
          f"density {density:.3f}, block {args.block_size}")
    print(f"{'':<8} {'forward ms':>11} {'attention ms':>13}")
    print(f"{'plain':<8} {times['plain']:>11.1f} {'':>13}")
    print(f"{'dense':<8} {times['dense']:>11.1f} {attn_dense:>13.1f}")
    print(f"{'sparse':<8} {times['sparse']:>11.1f} {attn_sparse:>13.1f}")
    print(f"attention share {share:.1%}; end-to-end speedup {result['speedup_e2e']:.2f}x (limit at this density "
          f"{result['speedup_e2e_limit']:.2f}x); attention speedup {attention_speedup:.2f}x; efficiency "
          f"{result['efficiency']:.2f}; wrapper overhead {result['wrapper_overhead']:+.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
