"""FlexAttention backend: runs one head group's `SparseSpec` with PyTorch's compiled `flex_attention`.

This is the peer the hand-written kernels are benchmarked against. The spec's blocks become a
`BlockMask`: blocks where every token pair is allowed are "full" (no mask evaluated), the other computed
blocks are "partial" and apply `mask_mod`, the exact token rule (text rule + band / stripe / blocks).
The BlockMask is built once per spec and device (`SparseSpec.cached`), never per call.

`flex_attention` is compiled once, lazily, with `dynamic=False`. The eager path (`compiled=False`, or
`COMPILED = False` for every call) materialises the full score matrix; it is for fast tests only.
Compiled flex_attention on CPU runs inductor's C++ template: it needs AVX2 and float32 / bfloat16 /
float16 inputs. Anything else falls back to the eager path with one logged warning that says why.

>>> import torch
>>> from sparsediff.kernels.spec import SparseSpec
>>> spec = SparseSpec("band", 40, 16, 0, 40, 3, torch.ones((1, 3, 3), dtype=torch.bool))
>>> q = k = v = torch.randn(1, 2, 40, 16)
>>> flex_sparse_attention(q, k, v, spec, compiled=False).shape
torch.Size([1, 2, 40, 16])
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .log import warn_once
from .spec import SparseSpec, block_order

logger = logging.getLogger(__name__)

# Default for every call that does not pass `compiled`: False runs flex_attention eagerly (tests).
COMPILED = True

COMPILED_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Compiled variants of flex_attention before dynamo gives up and runs it eagerly. There is one per
# (mode, G, S, D, dtype, block size); a per-head plan has more group sizes than dynamo's default of 8.
RECOMPILE_LIMIT = 64

_compiled_flex = None


def compiled_flex_attention():
    """`torch.compile(flex_attention, dynamic=False)`, compiled on first use and shared by every call."""
    global _compiled_flex
    if _compiled_flex is None:
        per_call_limit = "recompile_limit" in inspect.signature(torch.compile).parameters  # torch >= 2.13
        options = {"recompile_limit": RECOMPILE_LIMIT} if per_call_limit else {}
        _compiled_flex = torch.compile(flex_attention, dynamic=False, **options)
    return _compiled_flex


def compile_unsupported(q: torch.Tensor) -> str | None:
    """None when compiled flex_attention can run on q's device and dtype, else the reason it cannot."""
    if q.device.type != "cpu":
        return None
    if not torch.cpu._is_avx2_supported():
        return "compiled flex_attention on CPU needs AVX2, which this CPU (or ATEN_CPU_CAPABILITY) lacks"
    if q.dtype not in COMPILED_CPU_DTYPES:
        return f"compiled flex_attention on CPU supports float32, bfloat16 and float16, not {q.dtype}"
    return None


# ---- the token rule as mask_mods ----------------------------------------------------------------------
# Spec integers travel as a tensor (axis_start, axis_end, radius), not as Python constants, so specs that
# differ only in these values share one compiled graph instead of recompiling per spec.


def _band_mask_mod(bounds: torch.Tensor):
    def mask_mod(b, h, q_idx, kv_idx):
        start, end, radius = bounds[0], bounds[1], bounds[2]
        text = (q_idx < start) | (q_idx >= end) | (kv_idx < start) | (kv_idx >= end)
        return text | ((q_idx - kv_idx).abs() <= radius)

    return mask_mod


def _stripe_mask_mod(bounds: torch.Tensor):
    def mask_mod(b, h, q_idx, kv_idx):
        start, end, radius = bounds[0], bounds[1], bounds[2]
        text = (q_idx < start) | (q_idx >= end) | (kv_idx < start) | (kv_idx >= end)
        return text | (kv_idx - start < radius)

    return mask_mod


def _blocks_mask_mod(bounds: torch.Tensor, block_mask: torch.Tensor, block_size: int):
    heads = block_mask.shape[0]  # 1 (shared by the group) or G: h % heads picks the head's blocks

    def mask_mod(b, h, q_idx, kv_idx):
        start, end = bounds[0], bounds[1]
        text = (q_idx < start) | (q_idx >= end) | (kv_idx < start) | (kv_idx >= end)
        return text | block_mask[h % heads, q_idx // block_size, kv_idx // block_size]

    return mask_mod


def token_mask_mod(spec: SparseSpec, device: torch.device):
    """The spec's exact token rule as a flex `mask_mod(b, h, q_idx, kv_idx)`, tensors on `device`."""
    bounds = torch.tensor([spec.axis_start, spec.axis_end, spec.radius], dtype=torch.int64, device=device)
    if spec.mode == "band":
        return _band_mask_mod(bounds)
    if spec.mode == "stripe":
        return _stripe_mask_mod(bounds)
    return _blocks_mask_mod(bounds, spec.block_mask.to(device), spec.block_size)


# ---- BlockMask --------------------------------------------------------------------------------------------


def build_block_mask(spec: SparseSpec, device: torch.device | str = "cpu") -> BlockMask:
    """The spec as a flex `BlockMask` of shape (1, G', S, S): full blocks skip the mask, partial blocks apply
    the token rule. Broadcasts over the batch and, for G' = 1, over the group's heads."""
    full = spec.full_block_mask()  # same (G', nq, nk) shape as spec.block_mask
    partial = spec.block_mask & ~full
    # `block_order`, not `block_table`: flex wants one column per key block (no -1 padding), and its kernels may
    # read an index past the count
    kv_indices, kv_num_blocks = block_order(partial)
    full_kv_indices, full_kv_num_blocks = block_order(full)
    return BlockMask.from_kv_blocks(
        kv_num_blocks[None].to(device),
        kv_indices[None].to(device),
        full_kv_num_blocks[None].to(device),
        full_kv_indices[None].to(device),
        BLOCK_SIZE=spec.block_size,
        mask_mod=token_mask_mod(spec, torch.device(device)),
        seq_lengths=(spec.seq_len, spec.seq_len),
    )


def flex_block_mask(spec: SparseSpec, device: torch.device) -> BlockMask:
    """`build_block_mask`, built once per (spec, device) and kept in the spec's cache."""
    return spec.cached("flex_block_mask", device, lambda: build_block_mask(spec, device))


# ---- wrapper ----------------------------------------------------------------------------------------------


def flex_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: SparseSpec,
    scale: float | None = None,
    compiled: bool | None = None,
) -> torch.Tensor:
    """Sparse attention for one head group with FlexAttention.

    Args:
        q, k, v: (B, G, S, D) in the spec's kernel order, one dtype.
        spec: the group's `SparseSpec` (block_mask with 1 or G heads).
        scale: softmax scale, 1/sqrt(D) by default.
        compiled (bool, optional): run `torch.compile(flex_attention)`; defaults to the module's `COMPILED`.
    Returns:
        (B, G, S, D) in q's dtype, equal to `spec_reference_attention(q, k, v, spec, scale)`.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must be (B, G, S, D) of one shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}; "
            "select the group's heads with q[:, heads] before calling the kernel."
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}; cast k and v to q's dtype."
        )
    if not q.is_floating_point():
        raise ValueError(f"q, k, v must be floating point; got {q.dtype}; cast them to float32 or bfloat16.")
    B, G, S, D = q.shape
    if S != spec.seq_len:
        raise ValueError(
            f"q has S={S} tokens but the spec was built for seq_len={spec.seq_len}; build the spec from this layout."
        )
    if spec.block_mask.shape[0] not in (1, G):
        raise ValueError(
            f"spec.block_mask has {spec.block_mask.shape[0]} heads but q has G={G}; "
            "give one block mask per head of the group, or one shared by all of them."
        )
    compiled = COMPILED if compiled is None else compiled
    if compiled:
        reason = compile_unsupported(q)
        if reason:
            warn_once(logger, f"sparsediff: running flex_attention eagerly (slow, dense scores) because {reason}.")
            compiled = False
    block_mask = flex_block_mask(spec, q.device)
    attend = compiled_flex_attention() if compiled else flex_attention
    return attend(q, k, v, block_mask=block_mask, scale=scale)
