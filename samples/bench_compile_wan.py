"""Does sparsediff keep what torch.compile gives? A Wan denoiser forward: eager and compiled, dense and sparse.

The model and plan of `bench_e2e_wan.py` (same flags): a `WanTransformer3DModel` at 8192 video tokens, one pattern on
every head. Four forwards are timed round-robin in one process: plain eager, plain compiled (`torch.compile(model,
fullgraph=True)`, the dense baseline a compiling user has), sparse eager and sparse compiled (the accelerated model
compiled the same way). The correctness check comes first: compiled vs eager outputs of both, and whether the compiled
sparse forward ran sparse.

    python samples/bench_compile_wan.py                       # diagonal_w1, CPU float32, Inductor
    python samples/bench_compile_wan.py --density 0.25 --json
"""

from __future__ import annotations

import copy
import json
import sys
import time

import torch

import sparsediff
from bench_e2e_wan import bench_setup, build_model, forward_inputs, parse_args
from sparsediff.pipelines.adapter import fingerprint
from sparsediff.plan import SparsePlan
from sparsediff.runtime import resolve_backend
from sparsediff.timing import device_name, median_ms


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype, layout, pattern, density, log = bench_setup(args)

    plain = build_model(args, device, dtype)
    sparse = copy.deepcopy(plain)
    plan = SparsePlan.uniform(fingerprint(plain), pattern, block_size=args.block_size)
    handle = sparsediff.accelerate(sparse, plan, backend=args.backend, num_steps=1)
    inputs = forward_inputs(args, device, dtype)
    models = {
        "plain eager": plain,
        "plain compiled": torch.compile(plain, fullgraph=True),
        "sparse eager": sparse,
        "sparse compiled": torch.compile(sparse, fullgraph=True),
    }
    compile_s = {}
    with torch.no_grad():
        outputs = {}
        for name, model in models.items():
            start = time.perf_counter()
            outputs[name] = model(**inputs)[0]
            compile_s[name] = time.perf_counter() - start  # the first call of a compiled model includes compiling
        ran_sparse = not handle.stats[-1].dense and abs(handle.stats[-1].density - density) < 1e-6

    def rel(a, b) -> float:
        return float((outputs[a].float() - outputs[b].float()).norm() / outputs[b].float().norm())

    check = {
        "plain_compiled_vs_eager_rel_l2": rel("plain compiled", "plain eager"),
        "sparse_compiled_vs_eager_rel_l2": rel("sparse compiled", "sparse eager"),
        "sparse_vs_dense_rel_l2": rel("sparse eager", "plain eager"),
        "compiled_sparse_ran_sparse": ran_sparse,
    }
    log("correctness: " + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in check.items()))

    def forward(model):
        with torch.no_grad():
            model(**inputs)

    times = median_ms({name: (lambda m=m: forward(m)) for name, m in models.items()}, args.repeats, device)
    result = {
        "config": {"layout": str(layout), "tokens": layout.num_tokens, "layers": args.layers, "heads": args.heads,
                   "head_dim": args.head_dim, "dtype": str(dtype).removeprefix("torch."), "pattern": pattern.name,
                   "block_size": args.block_size, "backend": resolve_backend(args.backend, torch.device(device)),
                   "device": device_name(device), "repeats": args.repeats, "torch": torch.__version__},
        "correct": check,
        "density": round(density, 4),
        "first_call_s": {k: round(v, 1) for k, v in compile_s.items()},
        "forward_ms": {k: round(v, 1) for k, v in times.items()},
        "speedup_vs_plain_compiled": {k: round(times["plain compiled"] / v, 3) for k, v in times.items()},
    }
    handle.remove()
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    c = result["config"]
    print(f"WanTransformer3DModel {c['layers']} layers, {c['heads']}x{c['head_dim']}, {c['layout']}, {c['dtype']}, "
          f"{c['device']}, {c['backend']}; plan {pattern.name} on every head, density {density:.3f}")
    print(f"{'':<16} {'forward ms':>11} {'vs plain compiled':>18} {'first call s':>13}")
    for name in models:
        print(f"{name:<16} {times[name]:>11.1f} {result['speedup_vs_plain_compiled'][name]:>17.2f}x {compile_s[name]:>13.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
