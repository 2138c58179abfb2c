"""Sparse attention under diffusers' Ulysses context parallelism: each rank runs the plan's patterns for its heads.

Ulysses all-to-alls q, k, v from (B, S/N, H, D) — a slice of the sequence, every head — to (B, S, H/N, D): the whole
sequence, in its original order, for the contiguous head block [r·H/N, (r+1)·H/N) of the rank r in the Ulysses group.
A per-head pattern is exactly computable there, so the rank runs the plan's patterns for global heads starting at
`r·H/N` and the all-to-all back gives every rank its sequence slice of all heads, as dense Ulysses does.

Ring attention splits the sequence instead: each rank sees chunks of keys without their positions, so a
position-dependent pattern cannot run there; it is refused with the fix.

diffusers (0.36 to 0.42) has no public entry point for a custom kernel inside context parallelism. This module uses
its private `_templated_context_parallel_attention` (the all-to-all, the backend call through `forward_op`, the
all-to-all back) and the native backend's backward op; both are imported here and nowhere else.

`sparsediff generate video --ulysses N` starts itself once per GPU through torchrun (`torchrun_command`); each rank
then calls `enable_ulysses` on its pipeline, and rank 0 writes the video.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch


def ulysses_degree(parallel_config: Any) -> int:
    """The Ulysses degree of a diffusers `ParallelConfig`, after refusing what sparse patterns cannot run under.

    Raises ValueError for ring attention (alone or unified with Ulysses) and for `ulysses_anything`."""
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None:
        raise ValueError(
            f"sparsediff runs sparse plans only under context parallelism, but got the parallel config {parallel_config!r}; "
            "use ContextParallelConfig(ulysses_degree=N), or a dense plan."
        )
    if cp.ring_degree > 1:
        raise ValueError(
            f"sparsediff cannot run a sparse plan under ring attention (ring_degree={cp.ring_degree}): each rank then "
            "sees key chunks without their positions, so per-head patterns cannot be computed; use Ulysses "
            f"instead, ContextParallelConfig(ulysses_degree={cp.ring_degree * cp.ulysses_degree}), or a dense plan."
        )
    if cp.ulysses_anything:
        raise ValueError(
            "sparsediff cannot run a sparse plan under ContextParallelConfig(ulysses_anything=True), which pads heads "
            "and tokens unevenly across ranks; use ulysses_anything=False with a head count and sequence length "
            "divisible by the Ulysses degree, or a dense plan."
        )
    return cp.ulysses_degree


def ulysses_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, parallel_config, attend) -> torch.Tensor:
    """One Ulysses attention call, (B, S/N, H, D) in and out, whose local attention is `attend`.

    `attend(query, key, value, attn_mask, dropout_p, scale, head_start)` gets (B, S, H/N, D) tensors holding global
    heads [head_start, head_start + H/N) over the whole sequence and returns (B, S, H/N, D)."""
    from diffusers.models.attention_dispatch import (  # private: see the module docstring
        _native_attention_backward_op,
        _templated_context_parallel_attention,
    )

    degree = ulysses_degree(parallel_config)
    heads = query.shape[2]
    if heads % degree:
        raise ValueError(f"Ulysses degree {degree} does not divide the {heads} attention heads; choose a degree that does.")
    rank = parallel_config.context_parallel_config._ulysses_local_rank

    def forward_op(ctx, q, k, v, mask, p, is_causal, sc, enable_gqa, return_lse, _save_ctx=True, _parallel_config=None):
        if return_lse:
            raise ValueError("sparsediff's Ulysses attention does not return log-sum-exp values.")
        if _save_ctx:  # the native backward op's inputs, should a caller differentiate through the dense path
            ctx.save_for_backward(q, k, v)
            ctx.attn_mask, ctx.dropout_p, ctx.is_causal, ctx.scale, ctx.enable_gqa = mask, p, is_causal, sc, enable_gqa
        return attend(q, k, v, mask, p, sc, rank * q.shape[2])

    return _templated_context_parallel_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, False,
        forward_op=forward_op, backward_op=_native_attention_backward_op, _parallel_config=parallel_config,
    )  # fmt: skip


def torchrun_command(argv: list[str], degree: int) -> list[str]:
    """The command that runs `sparsediff <argv>` once per rank of a Ulysses group of `degree` processes on this
    machine (torchrun sets each rank's RANK, LOCAL_RANK and WORLD_SIZE)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={degree}",
            "-m", "sparsediff.cli", *argv]


def check_gpus(degree: int) -> None:
    """Refuses a Ulysses degree this machine cannot run: one GPU per rank."""
    available = torch.cuda.device_count()
    if available < degree:
        raise ValueError(
            f"Ulysses degree {degree} needs {degree} CUDA GPUs, one per rank, but this machine has {available}; "
            + (f"pass --ulysses {available} or less" if available > 1 else "run without --ulysses")
            + ", or run on a machine with more GPUs."
        )


def enable_ulysses(pipe: Any, degree: int) -> int:
    """In a process started by torchrun: join the process group, and enable diffusers' Ulysses context parallelism of
    `degree` on each denoiser of `pipe` (already on this rank's GPU, `cuda:LOCAL_RANK`). Returns the rank.

    >>> # torchrun --nproc-per-node 2 script.py, where script.py does:
    >>> # rank = enable_ulysses(pipe.to(f"cuda:{os.environ['LOCAL_RANK']}"), 2)
    """
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    from .adapter import adapter_for

    check_gpus(degree)
    if not dist.is_initialized():
        dist.init_process_group("nccl")
    if dist.get_world_size() != degree:
        raise ValueError(f"Ulysses degree {degree} needs {degree} processes, but torchrun started {dist.get_world_size()}; "
                         f"launch with --nproc-per-node {degree}.")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    for model in adapter_for(pipe).denoisers(pipe).values():
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))
    return dist.get_rank()
