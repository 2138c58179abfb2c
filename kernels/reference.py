"""Dense reference attention: SDPA with one token mask per head; the truth every fast path is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    masks: torch.Tensor | None,
    scale: float | None = None,
) -> torch.Tensor:
    """Masked attention computed the plain way.

    Args:
        q, k, v: (B, H, S, D); q may hold fewer rows (Sq) than k and v (S), e.g. queries over a cache.
        masks: (H, Sq, S) bool, True where query i may attend key j, or None for dense attention. A head whose
            mask is all False is a skipped head: its output is zero (not NaN).
        scale: softmax scale, 1/sqrt(D) by default.
    Returns:
        (B, H, S, D) in q's dtype; computed in float32.
    """
    if q.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3] or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"q, k, v must be (B, H, S, D) of one shape (q may have fewer rows); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")
    B, H, Sq, D = q.shape
    S = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    qf, kf, vf = q.float(), k.float(), v.float()
    scores = qf @ kf.transpose(-1, -2) * scale  # (B, H, Sq, S)
    if masks is not None:
        if masks.shape != (H, Sq, S):
            raise ValueError(f"masks must be (H, Sq, S) = ({H}, {Sq}, {S}); got {tuple(masks.shape)}.")
        scores = scores.masked_fill(~masks.to(q.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows (skipped heads) -> 0
    return (probs @ vf).to(q.dtype)


def dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The dense baseline every speedup is measured against: PyTorch's fused SDPA."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def spec_reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec, scale: float | None = None) -> torch.Tensor:
    """Reference for one head group described by a `SparseSpec` (q, k, v in kernel order, (B, G, S, D); q may hold
    only the last tokens' queries)."""
    S, G = k.shape[2], q.shape[1]
    rows, cols = torch.arange(S - q.shape[2], S), torch.arange(S)
    per_head = spec.block_mask.shape[0] > 1
    masks = torch.stack([spec.token_allowed(rows, cols, head=h if per_head else 0) for h in range(G)])
    return reference_attention(q, k, v, masks, scale)
