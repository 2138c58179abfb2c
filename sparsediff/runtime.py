"""Runs one attention layer with per-head patterns: groups heads, caches specs, dispatches one kernel per group.

For `q, k, v` of shape (B, H, S, D), a layer's per-head patterns are grouped by (pattern, parameters). Each
group runs in one kernel call over its heads (head fusion); `skip` heads stay zero and cost nothing; `full`
heads run dense SDPA together. Specs (block masks, block tables) are built once per (layout, block size,
patterns) and cached. `topk_blocks` heads take their block scores from full attention at their first call
and reuse them until `reset()`.

>>> import torch
>>> from sparsediff.layout import TokenLayout
>>> attn = SparseAttention(backend="torch")
>>> q = k = v = torch.randn(1, 2, 64, 16)
>>> out = attn(q, k, v, TokenLayout.parse("video:4x4x4"), ["diagonal_w1", "skip"], block_size=16)
>>> out.shape, bool(out[:, 1].eq(0).all())
(torch.Size([1, 2, 64, 16]), True)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .kernels.block_mass import block_attention_mass
from .kernels.spec import SparseSpec
from .layout import TokenLayout
from .patterns import Pattern, block_density, get_pattern

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "triton", "flex", "reference")
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


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def triton_usable(device: torch.device) -> str | None:
    """None when Triton can run on `device`, else the reason it cannot."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"tensors are on {device.type}, and Triton kernels need CUDA (or TRITON_INTERPRET=1 for tests)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend to run: the argument, else $SPARSEDIFF_BACKEND, else `triton` on CUDA and `torch` on CPU
    (the faster of torch/flex measured on CPU; see BENCHMARKS.md). A fallback logs one warning."""
    choice = backend or os.environ.get(BACKEND_ENV) or None
    if choice is not None and choice not in BACKENDS:
        source = "backend" if backend else f"${BACKEND_ENV}"
        raise ValueError(f"{source}={choice!r} is not a sparsediff backend; use one of {', '.join(BACKENDS)}.")
    if choice is None:
        choice = "triton" if device.type == "cuda" else "torch"
    if choice == "triton":
        reason = triton_usable(device)
        if reason:
            _warn_once(f"sparsediff: falling back from the triton backend to torch because {reason}.")
            return "torch"
    return choice


@dataclass(frozen=True)
class HeadGroup:
    """Heads of one layer that share a pattern; `spec` is None for full and skip."""

    pattern: Pattern
    heads: torch.Tensor  # (G,) int64
    spec: SparseSpec | None = None
    order: torch.Tensor | None = None  # kernel order permutation, for multi_diagonal
    density: float = 1.0

    @property
    def position(self) -> torch.Tensor | None:
        """Inverse of `order`: out_kernel_order[..., position, :] is back in the layout's order."""
        return None if self.order is None else self.order.argsort()


def group_heads(patterns: Sequence[Pattern]) -> list[tuple[Pattern, torch.Tensor]]:
    """Heads grouped by pattern (name encodes the parameters), in first-appearance order."""
    groups: dict[str, list[int]] = {}
    first: dict[str, Pattern] = {}
    for h, p in enumerate(patterns):
        groups.setdefault(p.name, []).append(h)
        first.setdefault(p.name, p)
    return [(first[name], torch.tensor(heads)) for name, heads in groups.items()]


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
class LayerStats:
    """What the last call did: density over all heads (skip = 0, full = 1) and head counts."""

    density: float = 1.0
    heads_skipped: int = 0
    heads_sparse: int = 0
    heads_full: int = 0
    backend: str = ""


@dataclass
class SparseAttention:
    """Per-layer sparse attention runtime (one instance per attention layer).

    Args:
        backend (str, optional): "torch", "triton", "flex" or "reference"; default: automatic.
        rows_per_block (int, defaults to 4): query rows per block sampled to score blocks for topk_blocks.
    """

    backend: str | None = None
    rows_per_block: int = 4
    _groups: dict[tuple, list[HeadGroup]] = field(default_factory=dict, repr=False)
    last: LayerStats = field(default_factory=LayerStats, repr=False)
    last_groups: list[HeadGroup] = field(default_factory=list, repr=False)

    def reset(self) -> None:
        """Forget cached groups and top-k scores (call between pipeline runs)."""
        self._groups.clear()

    def groups(
        self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, patterns: Sequence[Pattern], block_size: int, scale
    ) -> list[HeadGroup]:
        key = (str(layout), block_size, tuple(p.name for p in patterns), q.device)
        cached = self._groups.get(key)
        if cached is not None:
            return cached
        built = []
        for pattern, heads in group_heads(patterns):
            if not pattern.kernel_mode:
                built.append(HeadGroup(pattern, heads, density=float(pattern.kind == "full")))
                continue
            order = pattern.order(layout)
            scores = None
            if pattern.needs_scores:  # from full attention at this first call, reused afterwards
                qg, kg = q[:, heads.to(q.device)], k[:, heads.to(q.device)]
                if order is not None:
                    qg, kg = qg[:, :, order.to(q.device)], kg[:, :, order.to(q.device)]
                scores = block_attention_mass(qg, kg, block_size, self.rows_per_block, scale).cpu()
            spec = build_spec(pattern, layout, block_size, scores)
            density = block_density(spec.block_mask, layout, block_size)
            built.append(HeadGroup(pattern, heads, spec, order, density))
        self._groups[key] = built
        return built

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: TokenLayout,
        patterns: Sequence["Pattern | str"],
        block_size: int = 64,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Attention for (B, H, S, D) q, k, v with one pattern per head; returns (B, H, S, D)."""
        B, H, S, D = q.shape
        if len(patterns) != H:
            raise ValueError(f"Got {len(patterns)} head patterns for {H} heads; give one pattern per head.")
        if layout.num_tokens != S:
            raise ValueError(f"Layout {layout} has {layout.num_tokens} tokens but q has S={S}; build the layout from the inputs.")
        patterns = [get_pattern(p) for p in patterns]
        backend = resolve_backend(self.backend, q.device)
        groups = self.last_groups = self.groups(q, k, layout, patterns, block_size, scale)
        if len(groups) == 1 and groups[0].pattern.kind == "full":
            self.last = LayerStats(1.0, 0, 0, H, backend)
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        kernel = _kernel(backend)
        stats = LayerStats(0.0, 0, 0, 0, backend)
        out = None if len(groups) == 1 else torch.zeros_like(q)  # one group writes its own output
        for g in groups:
            n = len(g.heads)
            stats.density += g.density * n / H
            if g.pattern.kind == "skip":
                stats.heads_skipped += n
                continue
            heads = g.spec.cached("heads", q.device, lambda: g.heads) if g.spec else g.heads.to(q.device)
            qg, kg, vg = (q, k, v) if n == H else (q[:, heads], k[:, heads], v[:, heads])  # (B, G, S, D)
            if g.spec is None:
                stats.heads_full += n
                og = F.scaled_dot_product_attention(qg, kg, vg, scale=scale)
            elif g.order is not None:
                stats.heads_sparse += n
                order = g.spec.cached("order", q.device, lambda: g.order)
                position = g.spec.cached("position", q.device, lambda: g.position)
                og = kernel(qg[:, :, order], kg[:, :, order], vg[:, :, order], g.spec, scale)[:, :, position]
            else:
                stats.heads_sparse += n
                og = kernel(qg, kg, vg, g.spec, scale)
            if out is None:
                out = og
            else:
                out[:, heads] = og
        if out is None:  # every head skipped
            out = torch.zeros_like(q)
        self.last = stats
        return out

