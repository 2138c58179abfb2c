"""`sparsediff bench attention`: sparse vs dense SDPA vs FlexAttention, side by side in one run.

For each case (one pattern for every head, or a mixed layer of per-head patterns) it checks correctness first
(max abs error of every backend against masked dense attention on sampled query rows), then times dense SDPA
and each backend through the runtime (head grouping, reorders and all), interleaved round by round so the
machine's noise hits all of them alike, and reports the median. Speedup = dense / backend; the physical
limit is 1 / density, so efficiency = speedup x density (1.0 = ideal).

Band cases (one `diagonal` or `multi_diagonal` pattern on every head) also time the plain anchor of issue 16: a
loop of SDPA calls, `ANCHOR_ROWS` queries per call over the contiguous key window their band touches, no mask, on
q, k, v already in the pattern's kernel order. It computes more than the band (its output is not the band's: the
rows see the whole window) and pays no reorder, so it is a speed reference only; its efficiency is taken against
the same block density.

On the CPU the torch backend runs the compiled kernel (`kernels/cpu_kernel.py`; float32 compute for every dtype,
except 16-bit on CPUs that multiply it natively (AMX): there its 16-bit entry), whose GEMMs can be faster than the ones SDPA uses (on a 2-core AMD EPYC, dense attention through it takes half of
SDPA's time). Every case then also times dense attention through that kernel (`compiled_dense_ms`) and reports the
torch backend's efficiency against it as well (`compiled_efficiency`): the part of the speedup that sparsity earns,
with the GEMMs' gain taken out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .kernels import cpu_kernel
from .layout import TokenLayout
from .patterns import PATTERNS, Pattern, get_pattern
from .runtime import AttentionStats, SparseAttention, resolve_backend, triton_usable
from .timing import median_ms

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The parameter that sets each kind's density, with its search interval.
DENSITY_PARAM = {
    "diagonal": ("w", 0.0, 64.0),
    "multi_diagonal": ("w", 0.0, 4096.0),
    "vertical_stripe": ("f", 1e-3, 64.0),
    "topk_blocks": ("keep", 1e-3, 1.0),
}
SWEEP_KINDS = ("diagonal", "multi_diagonal", "vertical_stripe")
SWEEP_DENSITIES = (0.1, 0.25, 0.5)


def video_layout_for(seq_len: int, frames: int = 8) -> TokenLayout:
    """A video layout of exactly `seq_len` tokens: `frames` frames of a near-square grid."""
    if seq_len % frames:
        frames = math.gcd(seq_len, frames) or 1
    spatial = seq_len // frames
    h = max(d for d in range(1, math.isqrt(spatial) + 1) if spatial % d == 0)
    return TokenLayout.video_only(frames, h, spatial // h)


def pattern_for_density(kind: str, density: float, layout: TokenLayout, block_size: int) -> Pattern:
    """The pattern of `kind` whose block density on `layout` is closest to `density` (bisection)."""
    if kind not in DENSITY_PARAM:
        raise ValueError(f"--density works for {', '.join(DENSITY_PARAM)}, not {kind!r}; give --pattern NAME instead.")
    if not 0 < density <= 1:
        raise ValueError(f"--density {density} must be in (0, 1].")
    name, lo, hi = DENSITY_PARAM[kind]
    cls = PATTERNS[kind]
    for _ in range(30):
        mid = (lo + hi) / 2
        if cls(**{name: mid}).estimated_density(layout, block_size) < density:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-3 * max(hi, 1e-3):
            break
    best = min((lo, hi), key=lambda x: abs(cls(**{name: x}).estimated_density(layout, block_size) - density))
    return cls(**{name: float(f"{best:.3g}")})


@dataclass
class CaseResult:
    case: str
    density: float
    dense_ms: float
    ms: dict[str, float] = field(default_factory=dict)
    max_error: dict[str, float] = field(default_factory=dict)
    groups_alone_ms: dict[str, float] = field(default_factory=dict)  # mixed layers: sum of groups run alone
    anchor_ms: float | None = None  # band cases: the plain SDPA loop (see the module docstring)
    compiled_dense_ms: float | None = None  # CPU: dense attention through the compiled kernel

    def speedup(self, backend: str) -> float:
        return self.dense_ms / self.ms[backend]

    def efficiency(self, backend: str) -> float:
        return self.speedup(backend) * self.density

    def to_dict(self) -> dict:
        d = asdict(self)
        d["speedup"] = {b: self.speedup(b) for b in self.ms}
        d["efficiency"] = {b: self.efficiency(b) for b in self.ms}
        if self.anchor_ms is not None:
            d["anchor_efficiency"] = self.dense_ms / self.anchor_ms * self.density
        if self.compiled_dense_ms is not None:
            d["compiled_dense_speedup"] = self.dense_ms / self.compiled_dense_ms
            d["compiled_efficiency"] = {b: self.compiled_efficiency(b) for b in self.ms}
        return d

    def compiled_efficiency(self, backend: str) -> float:
        """Speedup against dense attention through the compiled CPU kernel, times density."""
        return self.compiled_dense_ms / self.ms[backend] * self.density


ANCHOR_ROWS = 320  # the anchor used 256-384 queries per call


def sdpa_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, radius: int, rows: int = ANCHOR_ROWS) -> torch.Tensor:
    """The plain anchor: for each `rows` queries, one SDPA call over the keys within `radius` of any of them."""
    S = q.shape[2]
    out = torch.empty_like(q)
    for c0 in range(0, S, rows):
        c1 = min(S, c0 + rows)
        k0, k1 = max(0, c0 - radius), min(S, c1 + radius)
        out[:, :, c0:c1] = F.scaled_dot_product_attention(q[:, :, c0:c1], k[:, :, k0:k1], v[:, :, k0:k1])
    return out


def _sampled_error(out: torch.Tensor, q, k, v, stats: AttentionStats, rows: torch.Tensor, scale) -> float:
    """Max abs error of `out` against masked dense attention on query rows `rows` (kernel specs' exact rule)."""
    B, H, S, D = q.shape
    expect = torch.zeros(B, H, len(rows), D, dtype=torch.float32, device=q.device)
    cols = torch.arange(S)
    for g in stats.groups:
        if g.pattern.kind == "skip":
            continue
        heads = g.heads.to(q.device)
        qg, kg, vg = q[:, heads][:, :, rows.to(q.device)].float(), k[:, heads].float(), v[:, heads].float()
        if g.spec is None:
            allowed = torch.ones(len(heads), len(rows), S, dtype=torch.bool)
        else:
            kernel_rows = rows
            if g.order is not None:  # the spec speaks kernel order: move keys and row numbers there
                order = g.order.to(q.device)
                kg, vg, kernel_rows = kg[:, :, order], vg[:, :, order], g.position[rows]
            per_head = g.spec.block_mask.shape[0] > 1
            allowed = torch.stack([g.spec.token_allowed(kernel_rows, cols, h if per_head else 0) for h in range(len(heads))])
        s = (qg @ kg.transpose(-1, -2)) * (D**-0.5 if scale is None else scale)
        expect[:, heads] = torch.softmax(s.masked_fill(~allowed.to(q.device), float("-inf")), dim=-1) @ vg
    return float((out[:, :, rows.to(q.device)].float() - expect).abs().max())


def run_case(
    case: str,
    patterns: Sequence[Pattern],
    layout: TokenLayout,
    backends: Sequence[str],
    batch: int = 1,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    block_size: int = 64,
    repeats: int = 5,
    device: str = "cpu",
    seed: int = 0,
) -> CaseResult:
    """Benchmark one layer of per-head `patterns` on `layout` against dense SDPA, all `backends` in one run."""
    H, S = len(patterns), layout.num_tokens
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(batch, H, S, head_dim, generator=g, device=device, dtype=dtype) for _ in range(3))
    runtimes = {b: SparseAttention(backend=b) for b in backends}
    rows = torch.linspace(0, S - 1, min(S, 256)).long()
    result = CaseResult(case, density=0.0, dense_ms=0.0)
    for b, rt in runtimes.items():  # correctness first
        out, stats = rt(q, k, v, layout, patterns, block_size)
        result.max_error[b] = _sampled_error(out, q, k, v, stats, rows, None)
        result.density = stats.density
    fns: dict[str, Callable[[], object]] = {"dense": lambda: F.scaled_dot_product_attention(q, k, v)}
    for b, rt in runtimes.items():
        fns[b] = lambda rt=rt: rt(q, k, v, layout, patterns, block_size)
    if len({p.name for p in patterns}) == 1 and patterns[0].kernel_mode == "band" and layout.num_axis_tokens == S:
        order = patterns[0].order(layout)
        qo, ko, vo = (x if order is None else x[:, :, order.to(x.device)].contiguous() for x in (q, k, v))
        radius = patterns[0].kernel_radius(layout)
        fns["anchor"] = lambda: sdpa_loop(qo, ko, vo, radius)
    if torch.device(device).type == "cpu" and dtype in cpu_kernel.DTYPES and cpu_kernel.load() is not None:
        fns["compiled_dense"] = lambda: cpu_kernel.dense_attention(q, k, v)
    times = median_ms(fns, repeats, device)
    result.anchor_ms = times.pop("anchor", None)
    result.compiled_dense_ms = times.pop("compiled_dense", None)
    result.dense_ms = times.pop("dense")
    result.ms = times
    if len({p.name for p in patterns}) > 1:  # mixed layer: each group alone, summed
        for b, rt in runtimes.items():
            alone = {}
            for p in {p.name: p for p in patterns}.values():
                n = sum(1 for x in patterns if x.name == p.name)
                sub = SparseAttention(backend=b)
                qs, ks, vs = q[:, :n].contiguous(), k[:, :n].contiguous(), v[:, :n].contiguous()
                alone[p.name] = lambda sub=sub, qs=qs, ks=ks, vs=vs, p=p, n=n: sub(qs, ks, vs, layout, [p] * n, block_size)
            t = median_ms(alone, repeats, device)
            result.groups_alone_ms[b] = sum(t.values())
    return result


def available_backends(device: str) -> list[str]:
    """Backends that can run on `device`: torch always, triton on CUDA, flex where FlexAttention imports."""
    out = ["torch"]
    try:
        import torch.nn.attention.flex_attention  # noqa: F401

        from .kernels import flex_sparse  # noqa: F401

        out.append("flex")
    except ImportError as e:
        logger.warning("sparsediff bench: skipping the flex backend because %s.", e)
    if triton_usable(torch.device(device)) is None:
        out.insert(0, "triton")
    return out


def sweep_cases(layout: TokenLayout, heads: int, block_size: int) -> list[tuple[str, list[Pattern]]]:
    """The standard sweep: band/stripe kinds at densities 0.1/0.25/0.5, topk at keep 0.25, and a mixed layer."""
    cases = []
    for kind in SWEEP_KINDS:
        for d in SWEEP_DENSITIES:
            p = pattern_for_density(kind, d, layout, block_size)
            cases.append((p.name, [p] * heads))
    topk = get_pattern("topk_blocks_k0.25")
    cases.append((topk.name, [topk] * heads))
    cases.append(("mixed", mixed_layer(layout, heads, block_size)))
    return cases


def mixed_layer(layout: TokenLayout, heads: int, block_size: int) -> list[Pattern]:
    """A layer mixing every kind, in a fixed cycle over the heads."""
    cycle = [
        get_pattern("full"),
        get_pattern("skip"),
        pattern_for_density("diagonal", 0.25, layout, block_size),
        pattern_for_density("multi_diagonal", 0.25, layout, block_size),
        pattern_for_density("vertical_stripe", 0.25, layout, block_size),
        get_pattern("topk_blocks_k0.25"),
    ]
    return [cycle[h % len(cycle)] for h in range(heads)]


def format_table(results: Sequence[CaseResult], backends: Sequence[str]) -> str:
    """The correctness check, then one table: times, density, speedup and efficiency per backend."""
    lines = ["correctness: max abs error vs masked dense attention (256 sampled query rows)"]
    for r in results:
        errs = "  ".join(f"{b}={r.max_error[b]:.2e}" for b in backends)
        lines.append(f"  {r.case:<26} {errs}")
    head = f"{'case':<26} {'density':>7} {'dense ms':>9}"
    for b in backends:
        head += f" {b + ' ms':>10} {b[:5] + ' x':>8} {b[:5] + ' eff':>9}"
    lines += ["", head, "-" * len(head)]
    for r in results:
        row = f"{r.case:<26} {r.density:>7.3f} {r.dense_ms:>9.1f}"
        for b in backends:
            row += f" {r.ms[b]:>10.1f} {r.speedup(b):>8.2f} {r.efficiency(b):>9.2f}"
        lines.append(row)
    anchored = [r for r in results if r.anchor_ms is not None]
    if anchored:
        lines += ["", f"anchor: a plain loop of SDPA calls, {ANCHOR_ROWS} queries each over their contiguous key window (no mask, kernel order)"]
        for r in anchored:
            effs = "  ".join(f"{b} eff {r.efficiency(b):.2f}" for b in backends)
            lines.append(f"  {r.case:<26} anchor {r.anchor_ms:>8.1f} ms  eff {r.dense_ms / r.anchor_ms * r.density:.2f}   {effs}")
    compiled = [r for r in results if r.compiled_dense_ms is not None]
    if compiled:
        lines += ["", "against dense attention through the compiled CPU kernel (the GEMMs' own gain taken out)"]
        for r in compiled:
            effs = "  ".join(f"{b} eff {r.compiled_efficiency(b):.2f}" for b in backends)
            lines.append(f"  {r.case:<26} compiled dense {r.compiled_dense_ms:>8.1f} ms ({r.dense_ms / r.compiled_dense_ms:.2f}x SDPA)   {effs}")
    for r in results:
        for b, alone in r.groups_alone_ms.items():
            lines.append(
                f"{r.case} ({b}): layer {r.ms[b]:.1f} ms vs its groups run alone {alone:.1f} ms "
                f"({(r.ms[b] / alone - 1) * 100:+.1f}%)"
            )
    return "\n".join(lines)


def parse_patterns(spec: str, heads: int) -> list[Pattern]:
    """`--pattern NAME` for every head, or a comma-separated list of one name per head (a mixed layer)."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if len(names) == 1:
        return [get_pattern(names[0])] * heads
    if len(names) != heads:
        raise ValueError(f"--pattern lists {len(names)} head patterns but --heads is {heads}; give one per head or one for all.")
    return [get_pattern(n) for n in names]


def resolve_backends(requested: str | None, device: str) -> list[str]:
    if not requested:
        return available_backends(device)
    out = []
    for b in requested.split(","):
        b = b.strip()
        if resolve_backend(b, torch.device(device)) != b:
            raise ValueError(f"--backend {b} cannot run on {device}; see the warning above for why.")
        out.append(b)
    return out



DEFAULT_COST_CANDIDATES = (
    "diagonal_w0.4", "diagonal_w1", "diagonal_w2", "multi_diagonal_w51", "multi_diagonal_w128",
    "vertical_stripe_f1", "vertical_stripe_f2", "topk_blocks_k0.1", "topk_blocks_k0.25",
)


def validate_cost_model(
    layout: TokenLayout,
    heads: int,
    head_dim: int,
    candidates: Sequence[str] = DEFAULT_COST_CANDIDATES,
    layers: int = 8,
    block_size: int = 64,
    backend: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Measure the cost model, then compare its prediction with the measured time of `layers` random mixed
    layers (held out: assignments the model never timed). Returns per-layer rows and the error summary."""
    from .search.cost import CostModel

    model = CostModel.measure(layout, heads, head_dim, candidates, block_size, backend, dtype, device, repeats=repeats, progress=True)
    rng = torch.Generator().manual_seed(seed)
    pool = ["full", "skip", *candidates]
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(1, heads, layout.num_tokens, head_dim, generator=g, device=device, dtype=dtype) for _ in range(3))
    rows = []
    for _ in range(layers):
        # a few distinct patterns per layer, as a searched plan has
        kinds = [pool[int(i)] for i in torch.randint(len(pool), (3,), generator=rng)]
        patterns = [kinds[int(i)] for i in torch.randint(len(kinds), (heads,), generator=rng)]
        rt = SparseAttention(backend=model.key.backend)
        measured = median_ms({"layer": lambda: rt(q, k, v, layout, patterns, block_size)}, repeats, device)["layer"]
        predicted = model.layer_time(patterns)
        rows.append({"patterns": patterns, "predicted_ms": predicted, "measured_ms": measured,
                     "error": predicted / measured - 1 if measured else 0.0})
    errors = [abs(r["error"]) for r in rows]
    return {"key": model.key.__dict__, "points": model.points, "layers": rows,
            "mean_abs_error": sum(errors) / len(errors), "max_abs_error": max(errors)}
