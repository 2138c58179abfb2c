"""Block-level attention mass from a sample of query rows: what top-k block selection and profiling read."""

from __future__ import annotations

import torch


def block_attention_mass(
    q: torch.Tensor, k: torch.Tensor, block_size: int, rows_per_block: int = 4, scale: float | None = None
) -> torch.Tensor:
    """Mean softmax mass that each query block puts on each key block, estimated from evenly spaced rows.

    Args:
        q, k: (B, H, S, D).
        block_size: tokens per block.
        rows_per_block: query rows sampled per block (memory is O(H * rows * S), not O(H * S^2)).
    Returns:
        (H, nq, nk) float32, rows summing to 1 (averaged over the batch).
    """
    B, H, S, D = q.shape
    n = -(-S // block_size)
    scale = D**-0.5 if scale is None else scale
    step = max(1, block_size // rows_per_block)
    rows = torch.arange(0, S, step, device=q.device)  # evenly spaced, at least one row per block
    probs = torch.softmax((q[:, :, rows].float() @ k.float().transpose(-1, -2)) * scale, dim=-1)  # (B, H, R, S)
    probs = torch.nn.functional.pad(probs, (0, n * block_size - S)).view(B, H, len(rows), n, block_size).sum(-1)
    q_block = rows // block_size
    mass = torch.zeros((B, H, n, n), device=q.device, dtype=torch.float32)
    mass.index_add_(2, q_block, probs)
    counts = torch.bincount(q_block, minlength=n).clamp(min=1).to(mass)
    return (mass / counts[:, None]).mean(dim=0)
