"""What a sparse kernel is told about one head group: plain integers and tensors, no patterns or layouts.

The runtime turns a pattern on a layout into a `SparseSpec`. Token positions are in the pattern's kernel
order (the runtime has already reordered q, k, v where `Pattern.order` asks, e.g. for `multi_diagonal` on a
video). Tokens outside `[axis_start, axis_end)` are text: a text query attends every key and every query
attends every text key. For two axis tokens i, j (axis positions `a = i - axis_start`) the spec's `mode` decides:

- `"band"`:   allowed iff |a_i - a_j| <= radius                 (diagonal, multi_diagonal)
- `"stripe"`: allowed iff a_j < radius                         (vertical_stripe: the first `radius` axis keys)
- `"blocks"`: allowed iff block_mask[h, i // block_size, j // block_size]   (topk_blocks; no partial blocks)

`block_mask` is the token rule reduced per block (block-sparse kernels visit exactly its True blocks and
apply the token rule only inside them). `block_table` lists those blocks per query block, sorted ascending and
padded with -1, the table the Triton and torch kernels walk; `block_order` is the same list continued with the
blocks left out, the form FlexAttention's `BlockMask` takes. Every backend builds its tables with these two.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

MODES = ("band", "stripe", "blocks")


@dataclass(frozen=True)
class SparseSpec:
    """One head group's sparsity, in kernel order.

    Args:
        mode (str): "band", "stripe" or "blocks" (see the module docstring).
        seq_len (int): S, tokens in the sequence.
        block_size (int): tokens per block of `block_mask` (square blocks, ragged tail allowed).
        axis_start, axis_end (int): the non-text tokens; text lies before and after.
        radius (int, defaults to 0): band half-width or stripe width, in axis tokens.
        block_mask (torch.Tensor): (G, nq, nk) bool with G = 1 (shared by the group) or the group's heads.
    """

    mode: str
    seq_len: int
    block_size: int
    axis_start: int
    axis_end: int
    radius: int
    block_mask: torch.Tensor
    _device_cache: dict = field(default_factory=dict, compare=False, repr=False)

    def cached(self, name: str, device: torch.device, build: Callable[[], Any]) -> Any:
        """`build()` (a tensor or a tuple of tensors) moved to `device`, computed once per (name, device): block
        tables are built once per spec, never per call. The spec itself stays on the CPU."""
        key = (name, str(device))
        if key not in self._device_cache:
            value = build()
            self._device_cache[key] = tuple(t.to(device) for t in value) if isinstance(value, tuple) else value.to(device)
        return self._device_cache[key]

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"SparseSpec mode {self.mode!r} is not one of {MODES}.")
        n = -(-self.seq_len // self.block_size)
        if self.block_mask.dim() != 3 or self.block_mask.shape[1:] != (n, n):
            raise ValueError(f"block_mask must be (G, {n}, {n}); got {tuple(self.block_mask.shape)}.")

    @property
    def num_blocks(self) -> int:
        return self.block_mask.shape[-1]

    @property
    def text_before(self) -> int:
        return self.axis_start

    @property
    def text_after(self) -> int:
        return self.seq_len - self.axis_end

    def block_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kv_block_index (G, nq, max_k) int32 padded with -1, kv_block_count (G, nq) int32)."""
        return block_table(self.block_mask)

    def full_block_mask(self) -> torch.Tensor:
        """(G, nq, nk) bool: blocks where every token pair is allowed (kernels skip the mask there)."""
        if self.mode == "blocks":
            return self.block_mask.clone()
        lo, hi, has_axis, _ = block_axis_ranges(self.seq_len, self.axis_start, self.axis_end, self.block_size)
        if self.mode == "band":  # the farthest axis pair of the two blocks is within the band
            far = torch.maximum((hi[:, None] - lo[None, :]).abs(), (hi[None, :] - lo[:, None]).abs())
            rule = far <= self.radius
        else:  # stripe: every axis key of the block is a stripe column
            rule = (hi < self.radius)[None, :].expand(len(lo), -1)
        # pairs with a text token are always allowed, so only axis-axis pairs can break a block
        full = rule | ~has_axis[:, None] | ~has_axis[None, :]
        return full[None] & self.block_mask

    def token_allowed(self, rows: torch.Tensor, cols: torch.Tensor, head: int = 0) -> torch.Tensor:
        """(len(rows), len(cols)) bool: the exact token rule (for references and kernels' partial blocks)."""
        text_r = (rows < self.axis_start) | (rows >= self.axis_end)
        text_c = (cols < self.axis_start) | (cols >= self.axis_end)
        ar, ac = rows - self.axis_start, cols - self.axis_start
        if self.mode == "band":
            rule = (ar[:, None] - ac[None, :]).abs() <= self.radius
        elif self.mode == "stripe":
            rule = (ac < self.radius)[None, :].expand(len(rows), -1)
        else:
            g = head if self.block_mask.shape[0] > 1 else 0
            rule = self.block_mask[g][rows // self.block_size][:, cols // self.block_size]
        return rule | text_r[:, None] | text_c[None, :]


def block_order(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (G, nq, nk) bool block mask as (order (G, nq, nk) int32: each query block's kept key blocks, ascending,
    then the ones left out, ascending; counts (G, nq) int32 of the kept ones)."""
    # a stable sort of "not kept" puts the kept blocks first, each part in ascending key order
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return order, mask.sum(dim=-1).to(torch.int32)


def block_table(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (G, nq, nk) bool block mask as (indices (G, nq, max_k) int32, ascending, padded with -1; counts (G, nq)):
    `block_order` cut after the longest list."""
    order, count = block_order(mask)
    max_k = max(int(count.max()), 1)
    order = order[..., :max_k]
    valid = torch.arange(max_k, device=mask.device)[None, None, :] < count[..., None]
    return torch.where(valid, order, torch.full_like(order, -1)), count


def block_axis_ranges(seq_len: int, axis_start: int, axis_end: int, block_size: int):
    """Per block: the first and last axis position it holds (`lo`, `hi`), whether it holds any axis token and
    whether it holds any text token. Axis positions rise with token index, so a block's are one interval."""
    n = -(-seq_len // block_size)
    start = torch.arange(n) * block_size
    end = torch.clamp(start + block_size, max=seq_len)  # exclusive
    lo = torch.clamp(start, min=axis_start) - axis_start
    hi = torch.clamp(end, max=axis_end) - 1 - axis_start
    has_axis = lo <= hi
    has_text = (start < axis_start) | (end > axis_end)
    return lo, hi, has_axis, has_text
