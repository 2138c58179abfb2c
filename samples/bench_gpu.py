"""GPU benchmark of the Triton block-sparse kernels: dense SDPA (fastest backend) vs Triton vs FlexAttention.

One question: at S = 32768 (video 8x64x64), bf16, D = 128, 8 heads, how much faster than dense attention is the
Triton kernel for each pattern and density, and how close to proportional (efficiency = speedup x density)? Both
Triton kernels are timed side by side (`--variants`): the portable pointer kernel ("triton") and, on compute
capability >= 9, the Hopper path through TMA descriptors ("tma"), which the runtime picks there by itself.

For a CUDA machine whose Python has torch and triton but not diffusers or optuna, with sparsediff NOT installed:
`sparsediff` and `sparsediff.kernels` are imported from this checkout. In order it (1) runs the Triton tests,
GPU-marked ones included, when pytest is available; (2) prints the correctness check: the max abs error of
Triton and (eager) FlexAttention against the dense masked reference on a small ragged text+video case; (3) prints
one table; (4) writes everything to $OUT/bench_gpu.json when $OUT is set. About 3-5 minutes on an H200, most of
it compiling kernels.

Device time is scarce, so the stages run in order of value and each one rewrites the JSON when it ends:
correctness, Triton timings, the mixed-pattern layer through the runtime, FlexAttention timings, then the pytest
run last. `--deadline-s` (default 400) stops starting new stages and cases once that many seconds have passed, and
says so in the output: a run cut short still reports what it measured.

    python samples/bench_gpu.py
    python samples/bench_gpu.py --no-tests --reps 50
    python samples/bench_gpu.py --dry-run      # no GPU needed: set up the imports and list the cases
    TRITON_INTERPRET=1 python samples/bench_gpu.py --device cpu --layout video:2x8x16 --heads 2 --head-dim 32 \
        --block-size 32 --check-layout text:8+video:2x4x8 --reps 1 --warmup 0 --no-tests --no-flex   # CPU interpreter
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("kernels",)  # folders that pyproject.toml installs as sparsediff.<folder>

BENCH_LAYOUT = "video:8x64x64"  # 32768 tokens, 8 frames of 4096
CHECK_LAYOUT = "text:32+video:4x16x16"  # 1056 tokens: text first, ragged last block at block size 128
CHECK_PATTERNS = ["diagonal_w1", "multi_diagonal_w8", "vertical_stripe_f1", "topk_blocks_k0.25"]
DENSITIES = (0.1, 0.25, 0.5)
CHECK_TOLERANCE = 2e-2  # max abs error allowed in bf16 against the float32 reference
# The Triton kernel's variants, each timed side by side: the pointer kernel and the Hopper path (Q/K/V/out through
# TMA descriptors). On a GPU below compute capability 9 only the first.
VARIANTS = {
    "triton": {"tma": False},
    "tma": {"tma": True},
}


def use_checkout() -> None:
    """Make `sparsediff` and its subpackages importable from this checkout without pip: the repo root goes
    first on sys.path, and each folder in SUBPACKAGES is registered as `sparsediff.<folder>`."""
    sys.path.insert(0, str(REPO))
    import sparsediff

    if Path(sparsediff.__file__).resolve().parent != REPO / "sparsediff":
        raise SystemExit(f"sparsediff was imported from {sparsediff.__file__}, not from {REPO}.")
    for name in SUBPACKAGES:
        spec = importlib.util.spec_from_file_location(
            f"sparsediff.{name}", REPO / name / "__init__.py", submodule_search_locations=[str(REPO / name)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        setattr(sparsediff, name, module)


def bench_cases(layout) -> list[tuple[str, float | None]]:
    """(pattern name, target density) per row. A band of half-width r * S keeps 2r - r^2 of the score square,
    so r = 1 - sqrt(1 - density); a stripe of w keys keeps w / S."""
    S, per_frame, frames = layout.num_axis_tokens, layout.tokens_per_frame, layout.frames
    radii = [round((1 - math.sqrt(1 - d)) * S) for d in DENSITIES]
    return [
        *[(f"diagonal_w{r / per_frame:.4g}", d) for r, d in zip(radii, DENSITIES)],
        *[(f"multi_diagonal_w{r / frames:.4g}", d) for r, d in zip(radii, DENSITIES)],
        *[(f"vertical_stripe_f{d * S / per_frame:.4g}", d) for d in DENSITIES],
        ("topk_blocks_k0.25", None),
    ]


def make_spec(name: str, layout, block_size: int, heads: int, seed: int = 0):
    """The spec the runtime builds; topk_blocks gets random per-head block scores (heads, nq, nk)."""
    from sparsediff.patterns import get_pattern
    from sparsediff.runtime import build_spec

    pattern = get_pattern(name)
    scores = None
    if pattern.needs_scores:
        n = layout.num_blocks(block_size)
        scores = torch.rand((heads, n, n), generator=torch.Generator().manual_seed(seed))
    return build_spec(pattern, layout, block_size, scores)


DEVICE = "cuda"  # --device cpu runs the flow on Triton's interpreter (a smoke test; its timings mean nothing)


def random_qkv(heads: int, seq_len: int, head_dim: int, seed: int) -> list[torch.Tensor]:
    """(1, H, S, D) bf16 on the device, taken as already in each pattern's kernel order."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, seq_len, head_dim, generator=g).to(DEVICE).bfloat16() for _ in range(3)]


def time_ms(fn, warmup: int, reps: int) -> float:
    """Median milliseconds of `fn()` on the GPU, after warmup calls (which also compile and autotune)."""
    for _ in range(warmup):
        fn()
    if DEVICE != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_pytest(args: list[str], timeout: float | None = None) -> dict:
    """pytest in a child Python that imports sparsediff from this checkout: exit code, summary, failures."""
    child = (
        f"import sys; sys.path.insert(0, {str(REPO / 'samples')!r}); import bench_gpu; bench_gpu.use_checkout(); "
        "import pytest; sys.exit(pytest.main(sys.argv[1:]))"
    )
    start = time.perf_counter()
    command = [sys.executable, "-c", child, "-p", "no:cacheprovider", *args]
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        return {
            "args": args, "returncode": None, "summary": f"stopped after {timeout:.0f} s (deadline); not a pass",
            "failures": [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))],
            "seconds": round(time.perf_counter() - start, 1),
        }
    lines = done.stdout.splitlines()
    counts = [line for line in lines if re.search(r"\b(passed|failed|errors?|skipped|no tests ran)\b", line)]
    return {
        "args": args,
        "returncode": done.returncode,
        "summary": counts[-1].strip() if counts else (lines or [done.stderr.strip()[-300:]])[-1],
        "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))],
        "seconds": round(time.perf_counter() - start, 1),
    }


def correctness(args, flex) -> list[dict]:
    """Max abs error of Triton and eager FlexAttention vs the dense masked reference on a small ragged case."""
    from sparsediff.kernels.reference import spec_reference_attention
    from sparsediff.kernels.triton_sparse import triton_sparse_attention
    from sparsediff.layout import TokenLayout

    layout = TokenLayout.parse(args.check_layout)
    q, k, v = random_qkv(args.heads, layout.num_tokens, args.head_dim, seed=0)
    rows = []
    for name in CHECK_PATTERNS:
        spec = make_spec(name, layout, args.block_size, args.heads)
        expect = spec_reference_attention(q, k, v, spec).float()
        row = {"pattern": name}
        for variant in list(args.variants):
            try:
                out = triton_sparse_attention(q, k, v, spec, **VARIANTS[variant])
            except Exception as error:  # noqa: BLE001  (a variant this Triton cannot build: drop it, say why)
                args.variants.remove(variant)
                args.variant_errors[variant] = f"{type(error).__name__}: {str(error)[:400]}"
                print(f"  variant {variant} dropped: {args.variant_errors[variant]}", file=sys.stderr)
                continue
            row[variant] = (out.float() - expect).abs().max().item()
        if flex is not None:
            row["flex"] = (flex(q, k, v, spec, compiled=False).float() - expect).abs().max().item()
        row["ok"] = all(row[key] <= CHECK_TOLERANCE for key in (*VARIANTS, "flex") if key in row)
        rows.append(row)
    return rows


class Deadline:
    """Seconds since the script started, against --deadline-s: stages and cases check it before they start."""

    def __init__(self, seconds: float):
        self.seconds, self.start, self.skipped = seconds, time.perf_counter(), []

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def allows(self, what: str) -> bool:
        if self.left() > 0:
            return True
        self.skipped.append(what)
        print(f"  deadline: {what} skipped", file=sys.stderr)
        return False


def benchmark(args, deadline: Deadline) -> tuple[list[dict], dict, list[torch.Tensor]]:
    """One row per case: dense SDPA and Triton milliseconds, measured side by side in this run. Also returns the
    specs by pattern and the inputs, so the FlexAttention stage times the very same cases."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sparsediff.kernels.triton_sparse import triton_sparse_attention
    from sparsediff.layout import TokenLayout
    from sparsediff.patterns import block_density

    layout = TokenLayout.parse(args.layout)
    q, k, v = random_qkv(args.heads, layout.num_tokens, args.head_dim, seed=1)  # multi_diagonal's reorder: untimed

    # Dense SDPA through each backend this device runs; the fastest is the baseline of every ratio (on an H200
    # cuDNN's attention is much faster than the flash backend, and a ratio against a slow baseline flatters).
    backends = {"default": None}
    if DEVICE == "cuda":
        backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                    "efficient": SDPBackend.EFFICIENT_ATTENTION}
    dense_backends = {}
    for label, backend in backends.items():
        def dense(backend=backend):
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        try:
            dense_backends[label] = time_ms(dense, args.warmup, args.reps)
        except RuntimeError as error:  # a backend this device or dtype lacks
            print(f"  dense {label}: unavailable ({str(error).splitlines()[0][:120]})", file=sys.stderr)
    args.dense_backends_ms = dense_backends
    best = min(dense_backends, key=dense_backends.get)
    dense_ms = dense_backends[best]
    print(f"  dense SDPA ms by backend: {dense_backends}; baseline: {best}", file=sys.stderr)
    rows, specs = [], {}
    # the kernel with every block computed (a band wider than the clip): its cost per block, against dense
    cases = [*bench_cases(layout), (f"diagonal_w{layout.frames}", 1.0)]
    # in order of value, should the deadline stop the run: every block, then density 0.25 (the targets' density)
    cases.sort(key=lambda case: (case[1] != 1.0, case[1] != 0.25))
    for name, target in cases:
        if not deadline.allows(f"triton {name}"):
            continue
        start = time.perf_counter()
        spec = specs[name] = make_spec(name, layout, args.block_size, args.heads)
        build_s = time.perf_counter() - start
        density = block_density(spec.block_mask, layout, args.block_size)
        row = {"pattern": name, "target_density": target, "density": density, "spec_build_s": build_s,
               "dense_backend": best, "dense_ms": dense_ms}
        for variant in args.variants:
            ms = time_ms(lambda: triton_sparse_attention(q, k, v, spec, **VARIANTS[variant]), args.warmup, args.reps)
            row[f"{variant}_ms"] = ms
            row[f"{variant}_speedup"] = dense_ms / ms
            row[f"{variant}_efficiency"] = dense_ms / ms * density
            row[f"{variant}_config"] = best_config(variant)
        if "triton_ms" in row:  # the keys earlier reports used for the pointer kernel
            row["speedup"], row["efficiency"] = row["triton_speedup"], row["triton_efficiency"]
        rows.append(row)
        times = ", ".join(f"{v} {row[f'{v}_ms']:.2f} ms ({row[f'{v}_speedup']:.2f}x)" for v in args.variants)
        print(f"  {name}: density {density:.3f}, {times}, spec {build_s:.1f} s", file=sys.stderr)
    return rows, specs, [q, k, v]


def best_config(variant: str) -> str | None:
    """The autotuner's pick for the last call of this variant (tiles, warps, stages)."""
    from sparsediff.kernels import triton_sparse

    kernel = triton_sparse._sparse_attn_fwd if variant == "triton" else triton_sparse._sparse_attn_fwd_tma
    config = getattr(kernel, "best_config", None)
    return None if config is None else f"{config.kwargs} w{config.num_warps} s{config.num_stages}"


def benchmark_flex(args, flex, rows: list[dict], specs: dict, qkv: list[torch.Tensor], deadline: Deadline) -> None:
    """Adds FlexAttention (compiled) milliseconds to each row, on the inputs and specs `benchmark` timed."""
    from sparsediff.kernels.triton_sparse import triton_sparse_attention

    q, k, v = qkv
    for row in rows:
        if not deadline.allows(f"flex {row['pattern']}"):
            continue
        spec = specs[row["pattern"]]
        row["flex_ms"] = time_ms(lambda: flex(q, k, v, spec), args.warmup, args.reps)
        row["flex_speedup"] = row["dense_ms"] / row["flex_ms"]
        row["flex_efficiency"] = row["flex_speedup"] * row["density"]
        difference = triton_sparse_attention(q, k, v, spec).float() - flex(q, k, v, spec).float()
        row["triton_vs_flex_max_abs"] = difference.abs().max().item()
        print(f"  flex {row['pattern']}: {row['flex_ms']:.2f} ms", file=sys.stderr)


MIXED_PATTERNS = ["full", "skip", "diagonal_w1", "diagonal_w1", "multi_diagonal_w8", "vertical_stripe_f1",
                  "vertical_stripe_f1", "topk_blocks_k0.25"]


def benchmark_mixed(args) -> dict:
    """One layer of per-head patterns through `SparseAttention(backend="triton")` (grouping, gathers, reorders
    and scatter included) against dense SDPA over the same heads, after a correctness check on the reference."""
    from sparsediff.layout import TokenLayout
    from sparsediff.runtime import SparseAttention

    layout = TokenLayout.parse(args.layout)
    heads = len(MIXED_PATTERNS)
    q, k, v = random_qkv(heads, layout.num_tokens, args.head_dim, seed=2)
    runtime = SparseAttention(backend="triton")
    call = lambda: runtime(q, k, v, layout, MIXED_PATTERNS, block_size=args.block_size)  # noqa: E731
    call()  # builds the groups (top-k scores from full attention: once, untimed)
    density = call()[1].density
    dense_ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v), args.warmup, args.reps)
    if heads == args.heads:  # the per-backend dense timings were taken at this very shape: use the fastest
        dense_ms = min(dense_ms, *args.dense_backends_ms.values())
    sparse_ms = time_ms(call, args.warmup, args.reps)
    return {"patterns": MIXED_PATTERNS, "density": density, "dense_ms": dense_ms, "triton_runtime_ms": sparse_ms,
            "speedup": dense_ms / sparse_ms, "efficiency": dense_ms / sparse_ms * density}


def print_table(rows: list[dict], variants: list[str]) -> None:
    flex = "flex_ms" in rows[0]
    head = f"{'pattern':<26}{'density':>8}{'dense ms':>10}"
    for variant in variants:
        head += f"{variant + ' ms':>12}{'speedup':>9}{'effic.':>8}"
    if flex:
        head += f"{'flex ms':>9}{'speedup':>9}{'effic.':>8}{'|tri-flex|':>11}"
    print(head)
    for r in rows:
        line = f"{r['pattern']:<26}{r['density']:>8.3f}{r['dense_ms']:>10.2f}"
        for variant in variants:
            line += f"{r[f'{variant}_ms']:>12.2f}{r[f'{variant}_speedup']:>9.2f}{r[f'{variant}_efficiency']:>8.2f}"
        if flex:
            line += (
                f"{r['flex_ms']:>9.2f}{r['flex_speedup']:>9.2f}{r['flex_efficiency']:>8.2f}"
                f"{r['triton_vs_flex_max_abs']:>11.2e}"
            )
        print(line)
    print(f"dense = fastest SDPA backend ({rows[0].get('dense_backend', '?')}); "
          "the last row computes every block, so its speedup is the kernel's per-block cost against dense")
    print("triton = pointer kernel; tma = Hopper path (tiles through TMA descriptors)")
    print("speedup = dense ms / sparse ms; efficiency = speedup x density (1.0: time proportional to computed blocks)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layout", default=BENCH_LAYOUT, help=f"token layout to time (default {BENCH_LAYOUT})")
    parser.add_argument("--check-layout", default=CHECK_LAYOUT, help=f"layout of the correctness check (default {CHECK_LAYOUT})")
    parser.add_argument("--heads", type=int, default=8, help="heads, all in one kernel launch (default 8)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dim D (default 128)")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per block of the tables (default 128)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per kernel, compiles included (default 3)")
    parser.add_argument("--reps", type=int, default=20, help="timed calls per kernel; reports the median (default 20)")
    parser.add_argument("--deadline-s", type=float, default=400, help="start no new stage or case after this (default 400)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"Triton variants to time, comma-separated, from {', '.join(VARIANTS)} (default all)")
    parser.add_argument("--no-mixed", action="store_true", help="skip the mixed-pattern layer through the runtime")
    parser.add_argument("--no-tests", action="store_true", help="skip the pytest run")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compiles take about a minute)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke test on the interpreter")
    parser.add_argument("--dry-run", action="store_true", help="set up the imports and list the cases; needs no GPU")
    return parser.parse_args(argv)


def write_report(report: dict) -> None:
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "bench_gpu.json"
        path.write_text(json.dumps(report, indent=2))


def main(argv=None) -> int:
    global DEVICE
    args = parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants {','.join(unknown)}: unknown; choose from {', '.join(VARIANTS)}.")
    args.variant_errors = {}
    deadline = Deadline(args.deadline_s)
    DEVICE = args.device
    use_checkout()
    from sparsediff.layout import TokenLayout

    if args.dry_run:
        import sparsediff.kernels.triton_sparse  # noqa: F401  (the kernel module imports without a GPU)
        import sparsediff.runtime  # noqa: F401

        print(f"sparsediff from {REPO}; torch {torch.__version__}; cases on {args.layout}:")
        for name, target in bench_cases(TokenLayout.parse(args.layout)):
            print(f"  {name} (target density {target})")
        return 0
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA device; run it on a GPU machine (--dry-run checks the setup).", file=sys.stderr)
        return 2
    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        dropped = [v for v in args.variants if VARIANTS[v].get("tma")]
        args.variants = [v for v in args.variants if v not in dropped]
        args.variant_errors.update({v: "needs compute capability >= 9" for v in dropped})
    import triton

    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (Triton interpreter: timings meaningless)"
    report = {
        "device": device_name, "torch": torch.__version__, "triton": triton.__version__,
        "config": vars(args), "tests": [],
    }
    print(f"{report['device']}, torch {report['torch']}, triton {report['triton']}")
    flex = None
    if not args.no_flex:
        try:
            from sparsediff.kernels.flex_sparse import flex_sparse_attention as flex
        except ImportError as error:
            print(f"FlexAttention column skipped: {error}.", file=sys.stderr)

    report["correctness"] = correctness(args, flex)
    report["variants"], report["variant_errors"] = args.variants, args.variant_errors
    print(f"\ncorrectness on {args.check_layout}, bf16, D={args.head_dim}, block {args.block_size}: "
          f"max abs error vs the dense masked reference (tolerance {CHECK_TOLERANCE})")
    for row in report["correctness"]:
        errors = "  ".join(f"{key} {row[key]:.2e}" for key in (*VARIANTS, "flex") if key in row)
        print(f"  {row['pattern']:<22} {errors}  {'ok' if row['ok'] else 'FAIL'}")
    for variant, error in args.variant_errors.items():
        print(f"  variant {variant} not run: {error}")
    write_report(report)

    layout = TokenLayout.parse(args.layout)
    print(f"\n{args.layout} ({layout.num_tokens} tokens), bf16, D={args.head_dim}, {args.heads} heads, "
          f"block {args.block_size}; median of {args.reps} calls after {args.warmup} warmup calls", flush=True)
    report["results"], specs, qkv = benchmark(args, deadline)
    report["dense_backends_ms"] = args.dense_backends_ms
    write_report(report)
    if not args.no_mixed and deadline.allows("mixed layer"):
        try:
            report["mixed"] = benchmark_mixed(args)
        except Exception as error:  # noqa: BLE001  (report it; the other stages still run)
            report["mixed"] = {"error": repr(error)}
        write_report(report)
    if flex is not None and report["results"]:
        try:
            benchmark_flex(args, flex, report["results"], specs, qkv, deadline)
        except Exception as error:  # noqa: BLE001
            report["flex_error"] = repr(error)
            print(f"FlexAttention column failed: {error!r}", file=sys.stderr)
        write_report(report)
    if report["results"]:
        print_table(report["results"], args.variants)
    mixed = report.get("mixed", {})
    if "speedup" in mixed:
        print(f"mixed layer {mixed['patterns']}: density {mixed['density']:.3f}, dense {mixed['dense_ms']:.2f} ms, "
              f"runtime (triton) {mixed['triton_runtime_ms']:.2f} ms, speedup {mixed['speedup']:.2f}, "
              f"efficiency {mixed['efficiency']:.2f}")
    elif mixed:
        print(f"mixed layer failed: {mixed['error']}")
    sys.stdout.flush()

    if args.no_tests:
        print("tests: skipped (--no-tests)")
    elif importlib.util.find_spec("pytest") is None:
        print("tests: pytest is not installed; the built-in correctness check above is the only check")
    else:  # the Triton tests with their GPU-marked ones, then the GPU-marked tests of other modules
        runs = [["-m", "not slow", "-x", "tests/test_triton_kernel.py"]]
        others = [
            str(path.relative_to(REPO))
            for path in sorted((REPO / "tests").glob("test_*.py"))
            if path.name != "test_triton_kernel.py" and "mark.gpu" in path.read_text()
        ]
        if others:
            runs.append(["-m", "gpu", *others])
        for pytest_args in runs:
            if not deadline.allows(f"pytest {' '.join(pytest_args)}"):
                continue
            result = run_pytest(pytest_args, timeout=max(30.0, deadline.left() + 60))
            report["tests"].append(result)
            print(f"tests {' '.join(pytest_args)}: {result['summary']} "
                  f"(exit {result['returncode']}, {result['seconds']} s)")
            for failure in result["failures"]:
                print(f"  {failure}")
            write_report(report)
    report["skipped_by_deadline"] = deadline.skipped
    if deadline.skipped:
        print(f"skipped by the deadline: {', '.join(deadline.skipped)}")
    write_report(report)
    tests_ok = all(t["returncode"] == 0 for t in report["tests"])
    return 0 if tests_ok and all(r["ok"] for r in report["correctness"]) else 1


if __name__ == "__main__":
    sys.exit(main())
