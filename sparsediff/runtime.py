"""Runs one attention layer with per-head patterns: groups heads, caches specs, dispatches one kernel per group.

For `q, k, v` of shape (B, H, S, D), a layer's per-head patterns are grouped by (pattern, parameters). Each
group runs in one kernel call over its heads (head fusion); `skip` heads stay zero and cost nothing; `full`
heads run dense SDPA together (on the torch backend's CPU path: dense through the compiled CPU kernel, beside sparse
heads or a layer of them alone, since its GEMMs are at least as fast as SDPA's there, ~1.6-2x on AMD CPUs where MKL
runs SDPA's at AVX2 rates; BENCHMARKS 1a. The model's own attention runs where the plan says dense: its dense steps
and layers, and every call of an all-dense plan, which never reach this runtime).
A call returns its output and one `AttentionStats`; heads are named by their global index in the layer, so a
caller holding a slice of the heads runs exactly the plan's patterns for them. Specs (block masks, block tables) are
built once per (layout, block size, patterns) and cached. `topk_blocks` heads take their block scores from full attention at their first call
and reuse them until `reset()`.

>>> import torch
>>> from sparsediff.layout import TokenLayout
>>> attn = SparseAttention(backend="torch")
>>> q = k = v = torch.randn(1, 2, 64, 16)
>>> out, stats = attn(q, k, v, TokenLayout.parse("video:4x4x4"), ["diagonal_w1", "skip"], block_size=16)
>>> out.shape, bool(out[:, 1].eq(0).all()), stats.heads_skipped
(torch.Size([1, 2, 64, 16]), True, 1)
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .kernels import cpu_kernel
from .kernels.block_mass import block_attention_mass
from .kernels.log import warn_once
from .kernels.spec import SparseSpec
from .layout import TokenLayout
from .patterns import Pattern, block_density, get_pattern

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "triton", "flex", "reference")
SUFFIX_BACKENDS = ("torch", "reference")  # those that run queries that are only the last keys
BACKEND_ENV = "SPARSEDIFF_BACKEND"

KernelFn = Callable[..., torch.Tensor]  # (q, k, v, spec, scale) -> out, all (B, G, S, D)


def _kernel(backend: str) -> KernelFn:
    if backend == "torch":
        from .kernels.torch_sparse import torch_sparse_attention

        return torch_sparse_attention
    if backend == "triton":
        from .kernels.triton_sparse import triton_sparse_attention

        return triton_sparse_attention
    if backend == "flex":
        from .kernels.flex_sparse import flex_sparse_attention

        return flex_sparse_attention
    from .kernels.reference import spec_reference_attention

    return spec_reference_attention


def triton_usable(device: torch.device) -> str | None:
    """None when Triton can run on `device`, else the reason it cannot."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"tensors are on {device.type}, and Triton kernels need CUDA (or TRITON_INTERPRET=1 for tests)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


def check_backend(backend: str | None, source: str = "backend") -> None:
    """Refuse a backend name sparsediff does not have (None means automatic)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{source}={backend!r} is not a sparsediff backend; use one of {', '.join(BACKENDS)} or leave it unset.")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend to run: the argument, else $SPARSEDIFF_BACKEND, else `triton` on CUDA and `torch` on CPU
    (the faster of torch/flex measured on CPU; see BENCHMARKS.md). A fallback logs one warning."""
    choice = backend or os.environ.get(BACKEND_ENV) or None
    check_backend(choice, "backend" if backend else f"${BACKEND_ENV}")
    if choice is None:
        choice = "triton" if device.type == "cuda" else "torch"
    if choice == "triton":
        reason = triton_usable(device)
        if reason:
            warn_once(logger, f"sparsediff: falling back from the triton backend to torch because {reason}.")
            return "torch"
    return choice


@dataclass(frozen=True)
class HeadGroup:
    """Heads of one layer that share a pattern; `spec` is None for full and skip. `heads` are global head indices
    (the plan's), `local` their positions in the call's q, k, v (they differ when a caller holds a slice of the
    layer's heads, as a context-parallel rank does)."""

    pattern: Pattern
    heads: torch.Tensor  # (G,) int64, global
    local: torch.Tensor  # (G,) int64, in the call
    spec: SparseSpec | None = None
    order: torch.Tensor | None = None  # kernel order permutation, for multi_diagonal
    density: float = 1.0

    @property
    def position(self) -> torch.Tensor | None:
        """Inverse of `order`: out_kernel_order[..., position, :] is back in the layout's order."""
        return None if self.order is None else self.order.argsort()


def group_heads(patterns: Sequence[Pattern], heads: Sequence[int] | None = None) -> list[tuple[Pattern, torch.Tensor]]:
    """Heads grouped by pattern (name encodes the parameters), in first-appearance order. `heads[i]` is the global
    index of `patterns[i]` (default: its position)."""
    heads = range(len(patterns)) if heads is None else heads
    groups: dict[str, list[int]] = {}
    first: dict[str, Pattern] = {}
    for h, p in zip(heads, patterns):
        groups.setdefault(p.name, []).append(h)
        first.setdefault(p.name, p)
    return [(first[name], torch.tensor(hs)) for name, hs in groups.items()]


def build_spec(pattern: Pattern, layout: TokenLayout, block_size: int, scores: torch.Tensor | None = None) -> SparseSpec:
    """The kernel's view of one pattern on one layout (scores: (G, nq, nk) for topk_blocks)."""
    if not pattern.kernel_mode:
        raise ValueError(f"Pattern {pattern.name!r} has no sparse kernel; full and skip are handled by the runtime.")
    mask = pattern.block_mask(layout, block_size, scores)
    start, end = layout.axis_range
    return SparseSpec(
        mode=pattern.kernel_mode,
        seq_len=layout.num_tokens,
        block_size=block_size,
        axis_start=start,
        axis_end=end,
        radius=pattern.kernel_radius(layout),
        block_mask=mask if mask.dim() == 3 else mask[None],
    )


@dataclass
class AttentionStats:
    """What attention did, the one record from a kernel call up to `handle.summary()`.

    A runtime call returns one for its attention call; a pipeline's run log folds them (`fold`) into one per
    (denoiser, cache context, step), filling in where they come from.

    Fields: `density` (share of attention blocks computed, mean over heads and calls: full = 1, skip = 0),
    `heads_skipped` / `heads_sparse` / `heads_full` (summed over calls), `dense` (every head ran the model's own
    attention), `layers` (attention calls folded in: one per layer, or one per sample where a model loops over its
    batch, as Mochi does), `backend`, `groups` (a single call's head groups, with global head
    indices), `timings` (raw timings of the attention calls; `attention_ms` reads them), and where a folded record
    belongs: `model`, `context`, `step`, `num_steps`, `source` (how the step was found).
    """

    density: float = 1.0
    heads_skipped: int = 0
    heads_sparse: int = 0
    heads_full: int = 0
    dense: bool = True
    layers: int = 1
    backend: str = ""
    groups: tuple["HeadGroup", ...] = field(default=(), repr=False)
    timings: list = field(default_factory=list, repr=False)
    model: str | None = None
    context: str | None = None
    step: int | None = None
    num_steps: int | None = None
    source: str | None = None

    @classmethod
    def fold(cls, parts: Sequence["AttentionStats"], **where) -> "AttentionStats":
        """One record for several layer calls: mean density, summed head counts and timings."""
        if not parts:
            return cls(layers=0, **where)
        return cls(
            density=sum(p.density * p.layers for p in parts) / max(1, sum(p.layers for p in parts)),
            heads_skipped=sum(p.heads_skipped for p in parts),
            heads_sparse=sum(p.heads_sparse for p in parts),
            heads_full=sum(p.heads_full for p in parts),
            dense=all(p.dense for p in parts),
            layers=sum(p.layers for p in parts),
            backend=",".join(sorted({p.backend for p in parts if p.backend})),
            timings=[t for p in parts for t in p.timings],
            **where,
        )

    @property
    def attention_ms(self) -> float:
        return 1000.0 * sum(Clock.seconds(t) for t in self.timings)

    def to_dict(self) -> dict:
        keys = ("model", "context", "step", "num_steps", "source", "dense", "density", "heads_skipped",
                "heads_sparse", "heads_full", "layers", "backend")
        return {**{k: getattr(self, k) for k in keys}, "attention_ms": self.attention_ms}


class Clock:
    """Wall time of attention calls: `perf_counter` on the CPU; CUDA events on a GPU, read only when stats are
    read, so timing adds no synchronisation to the denoising loop. Inside a `torch.compile`d graph nothing is timed
    (a timer is a graph break; the compiled region is timed as a whole by whoever compiled it)."""

    @staticmethod
    def start(device: torch.device):
        if torch.compiler.is_compiling():
            return None
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @staticmethod
    def stop(start):
        if start is None:
            return None
        if isinstance(start, float):
            return time.perf_counter() - start
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        return (start, end)

    @staticmethod
    def seconds(timing) -> float:
        if timing is None:
            return 0.0
        if isinstance(timing, float):
            return timing
        start, end = timing
        end.synchronize()
        return start.elapsed_time(end) / 1000.0


@dataclass
class SparseAttention:
    """Per-layer sparse attention runtime (one instance per attention layer).

    Args:
        backend (str, optional): "torch", "triton", "flex" or "reference"; default: automatic.
        rows_per_block (int, defaults to None): query rows per block that score key blocks for topk_blocks; None
            uses every row (the exact block mass of that call's attention, as SparseD selects; computed in row chunks,
            once per layout and run, costing about one dense attention of those heads).
    """

    backend: str | None = None
    rows_per_block: int | None = None
    _groups: dict[tuple, list[HeadGroup]] = field(default_factory=dict, repr=False)

    def reset(self) -> None:
        """Forget cached groups and top-k scores (call between pipeline runs)."""
        self._groups.clear()

    def groups(
        self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, patterns: Sequence[Pattern], block_size: int, scale,
        head_start: int = 0,
    ) -> list[HeadGroup]:
        """The head groups of a call whose q holds global heads [head_start, head_start + H) of the layer."""
        H = q.shape[1]
        query_start = k.shape[2] - q.shape[2]  # q holds the layout's last tokens (0: all of them)
        local_patterns = patterns[head_start : head_start + H]
        key = (str(layout), query_start, block_size, head_start, tuple(p.name for p in local_patterns), q.device)
        cached = self._groups.get(key)
        if cached is not None:
            return cached
        built = []
        for pattern, heads in group_heads(local_patterns, range(head_start, head_start + H)):
            local = heads - head_start
            if not pattern.kernel_mode:
                built.append(HeadGroup(pattern, heads, local, density=float(pattern.kind == "full")))
                continue
            order = pattern.order(layout)
            if order is not None and query_start:
                raise ValueError(f"Pattern {pattern.name!r} reorders the tokens of {layout}, so its queries cannot be only the last {layout.num_tokens - query_start}; run the call with every query.")
            scores = None
            if pattern.needs_scores:  # from full attention at this first call, reused afterwards
                qg, kg = q[:, local.to(q.device)], k[:, local.to(q.device)]
                if order is not None:
                    qg, kg = qg[:, :, order.to(q.device)], kg[:, :, order.to(q.device)]
                rows = block_size if self.rows_per_block is None else self.rows_per_block
                scores = block_attention_mass(qg, kg, block_size, rows, scale).cpu()
            spec = build_spec(pattern, layout, block_size, scores)
            density = block_density(spec.block_mask, layout, block_size, query_start)
            built.append(HeadGroup(pattern, heads, local, spec, order, density))
        self._groups[key] = built
        return built

    def runs_full_layers(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether a call of these tensors whose heads are all `full` runs here through the compiled CPU kernel
        (elsewhere this runtime would run SDPA, the model's own attention, so the model's own call stays)."""
        return resolve_backend(self.backend, q.device) == "torch" and cpu_kernel.usable(q, k, v)

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: TokenLayout,
        patterns: Sequence["Pattern | str"],
        block_size: int = 64,
        scale: float | None = None,
        head_start: int | None = None,
    ) -> tuple[torch.Tensor, AttentionStats]:
        """Attention for (B, H, S, D) q, k, v; returns the (B, H, S, D) output and what the call did.

        `patterns` are the layer's patterns by global head. By default q, k, v hold every head (one pattern per head);
        with `head_start` they hold global heads [head_start, head_start + H) (a slice of the layer, as a
        context-parallel rank holds).

        q may hold only the layout's last Sq < S tokens (a decoder's canvas attending a cache plus itself): those
        query rows run with the patterns' rows for them, and the others are never computed. The torch and reference
        backends run such calls; others fall back to torch with one warning."""
        B, H, Sq, D = q.shape
        S = k.shape[2]
        if head_start is None:
            if len(patterns) != H:
                raise ValueError(f"Got {len(patterns)} head patterns for {H} heads; give one pattern per head (or head_start= for a slice).")
            head_start = 0
        if head_start < 0 or head_start + H > len(patterns):
            raise ValueError(
                f"The call holds heads [{head_start}, {head_start + H}) but the layer has {len(patterns)} head patterns; "
                "give one pattern per head of the layer and the global index of the call's first head."
            )
        if layout.num_tokens != S:
            raise ValueError(f"Layout {layout} has {layout.num_tokens} tokens but {'q' if Sq == S else 'k'} has S={S}; build the layout from the inputs.")
        if Sq > S:
            raise ValueError(f"q has {Sq} tokens but k only {S}; queries are all the keys' tokens or their last ones (a cache before them).")
        patterns = [get_pattern(p) for p in patterns]
        backend = resolve_backend(self.backend, q.device)
        if Sq < S and backend not in SUFFIX_BACKENDS:
            warn_once(logger, f"sparsediff: calls whose queries are only the last keys (a cache before them) run on the torch backend; the {backend} kernels take whole sequences.")
            backend = "torch"
        groups = self.groups(q, k, layout, patterns, block_size, scale, head_start)
        # The torch backend's compiled CPU path: every group but a reordered one writes its heads straight into one
        # output from the call's own q, K^T, v (no per-group slices, no scatter), made on the first such group (a layer
        # of reordered groups only never needs them). The output is float32: 16-bit inputs are widened into scratch
        # buffers once (or, on a CPU that multiplies them natively, packed for the kernel's 16-bit entry), the output
        # rounded back at the end. A layer of full heads runs there too (dense, in one call).
        compiled = backend == "torch" and cpu_kernel.usable(q, k, v)
        if len(groups) == 1 and groups[0].pattern.kind == "full" and not compiled:
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
            return out, AttentionStats(1.0, 0, 0, H, True, 1, backend, tuple(groups))
        kernel = _kernel(backend)
        stats = AttentionStats(0.0, 0, 0, 0, False, 1, backend, tuple(groups))
        prepared = None
        if compiled:
            out = torch.zeros(q.shape, dtype=torch.float32)
        else:
            out = None if len(groups) == 1 else torch.zeros_like(q)  # one group writes its own output
        for g in groups:
            n = len(g.heads)
            stats.density += g.density * n / H
            if g.pattern.kind == "skip":
                stats.heads_skipped += n
                continue
            heads = g.spec.cached("heads", q.device, lambda: g.local) if g.spec else g.local.to(q.device)
            if g.spec is None:
                stats.heads_full += n
            else:
                stats.heads_sparse += n
            if compiled and g.order is None:
                if prepared is None:
                    prepared = cpu_kernel.prepare(q, k, v, scratch=_scratch_named("layer"))
                cpu_kernel.attend_into(out, prepared, heads, g.spec, scale)
                continue
            if compiled:  # a reordered group: its heads' swapped copies in, its output swapped back in place
                shape = g.spec.cached("transpose", torch.device("cpu"), lambda: _transpose_shape(g.order, g.spec))
                if len(shape):
                    a0, r, c = shape.tolist()
                    which = None if n == H else heads  # a whole layer's heads: one batched copy each way
                    B, _, Sq, D = q.shape
                    compute = cpu_kernel.compute_dtype(q.dtype, D)  # the swapped copies in the kernel's operand type
                    qs, ks, vs = (_swap(x, a0, r, c, which, out=_scratch(name, (B, n, Sq, D), compute))
                                  for x, name in ((q, "q"), (k, "k"), (v, "v")))
                    og = _scratch("out", (B, n, Sq, D))
                    cpu_kernel.attend_into(og, cpu_kernel.prepare(qs, ks, vs, scratch=_scratch_named("group")), torch.arange(n),
                                           g.spec, scale)
                    _unswap_into(out, which, og, a0, r, c)
                    continue
            qg, kg, vg = (q, k, v) if n == H else (q[:, heads], k[:, heads], v[:, heads])  # (B, G, S, D)
            if g.spec is None:
                og = F.scaled_dot_product_attention(qg, kg, vg, scale=scale)
            elif g.order is not None:
                shape = g.spec.cached("transpose", torch.device("cpu"), lambda: _transpose_shape(g.order, g.spec))
                if len(shape):  # a video's frame/position swap: strided copies, about twice as fast as a gather
                    a0, r, c = shape.tolist()
                    og = _swap(kernel(*(_swap(x, a0, r, c) for x in (qg, kg, vg)), g.spec, scale), a0, c, r)
                else:
                    order = g.spec.cached("order", q.device, lambda: g.order)
                    position = g.spec.cached("position", q.device, lambda: g.position)
                    og = kernel(qg[:, :, order], kg[:, :, order], vg[:, :, order], g.spec, scale)[:, :, position]
            else:
                og = kernel(qg, kg, vg, g.spec, scale)
            if out is None:
                out = og
            else:
                out[:, heads] = og.to(out.dtype)  # a float32 output of the compiled path, or the call's own dtype
        if out is None:  # every head skipped
            out = torch.zeros_like(q)
        return out.to(q.dtype), stats


_scratch_pool: dict[tuple[int, str], torch.Tensor] = {}
_scratch_lock = threading.Lock()


def _scratch(name: str, shape: tuple, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A CPU scratch tensor of `shape` and `dtype` for the compiled CPU path, kept (one per name and thread, shared by
    every layer) for the next call of the same shape: fresh tensors of many MB cost their page faults on every call
    (glibc hands such blocks back to the system), 10-20% of a layer at S = 8192, 8 heads x 64 (BENCHMARKS §3).
    `release_scratch` (called by a handle's `.remove()`) hands them back."""
    key = (threading.get_ident(), name)
    buf = _scratch_pool.get(key)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = torch.empty(shape, dtype=dtype)
        with _scratch_lock:
            _scratch_pool[key] = buf
    return buf


def _scratch_named(suffix: str) -> "cpu_kernel.Scratch":
    """`_scratch` under names ending in `suffix`, as `cpu_kernel.prepare` asks for its buffers."""
    return lambda name, shape, dtype: _scratch(f"{name}_{suffix}", shape, dtype)


def release_scratch() -> int:
    """Drop every thread's scratch buffers (the next call on the compiled CPU path allocates them again); returns the
    bytes released. At a large model's shapes they hold several copies of a layer's q, K and V."""
    with _scratch_lock:
        freed = sum(b.numel() * b.element_size() for b in _scratch_pool.values())
        _scratch_pool.clear()
    return freed


def _transpose_shape(order: torch.Tensor, spec: SparseSpec) -> torch.Tensor:
    """(a0, r, c) when `order` keeps the text in place and swaps the axis tokens' (r, c) grid to (c, r) (a video's
    frame-major <-> position-major reorder), else an empty tensor: then the runtime gathers with `order`."""
    a0, a1 = spec.axis_start, spec.axis_end
    n = a1 - a0
    if n < 2:
        return torch.empty(0, dtype=torch.long)
    c = int(order[a0 + 1]) - a0
    if c <= 0 or n % c:
        return torch.empty(0, dtype=torch.long)
    r = n // c
    expect = torch.arange(len(order))
    expect[a0:a1] = a0 + torch.arange(n).view(r, c).t().flatten()
    return torch.tensor([a0, r, c]) if torch.equal(order.cpu(), expect) else torch.empty(0, dtype=torch.long)


def _swap(x: torch.Tensor, a0: int, r: int, c: int, heads: torch.Tensor | None = None,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, H, S, D) with the (r, c) grid of tokens [a0, a0 + r * c) transposed to (c, r), contiguous; text kept.
    With `heads`, only those heads, in that order (one copy each, no slice of x first); with `out`, written there."""
    B, H, S, D = x.shape
    if out is None:
        out = torch.empty(B, H if heads is None else len(heads), S, D, dtype=x.dtype, device=x.device)
    pairs = [(slice(None), slice(None))] if heads is None else list(enumerate(heads.tolist()))
    _copy_swapped(out, x, pairs, a0, r, c)
    return out


def _unswap_into(out: torch.Tensor, heads: torch.Tensor | None, og: torch.Tensor, a0: int, r: int, c: int) -> None:
    """Write og (B, G, S, D), whose tokens [a0, a0 + r * c) are the (c, r) transpose of the layout's (r, c) grid, back
    into heads `heads` of out (B, H, S, D) in the layout's order (None: all heads, in one copy)."""
    pairs = [(slice(None), slice(None))] if heads is None else [(h, i) for i, h in enumerate(heads.tolist())]
    _copy_swapped(out, og, pairs, a0, c, r)


def _copy_swapped(dst: torch.Tensor, src: torch.Tensor, pairs, a0: int, r: int, c: int) -> None:
    """For each (i, h) in `pairs`: dst[:, i] = src[:, h] with src's (r, c) grid of tokens [a0, a0 + r * c) transposed
    to (c, r) and the tokens around it (text) copied as they are."""
    a1 = a0 + r * c
    for i, h in pairs:
        d, s = dst[:, i], src[:, h]  # (B, [G,] S, D)
        d[..., a0:a1, :].unflatten(-2, (c, r)).copy_(s[..., a0:a1, :].unflatten(-2, (r, c)).transpose(-3, -2))
        if a0:
            d[..., :a0, :] = s[..., :a0, :]
        if a1 < dst.shape[2]:
            d[..., a1:, :] = s[..., a1:, :]
