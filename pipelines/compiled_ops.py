"""Two custom ops that keep sparsediff's run-time decisions out of a `torch.compile`d graph.

Which pattern each head runs depends on the denoising step, and the step is only known when a call runs (a timestep
matched to the scheduler, a pipeline's cache context, a call counter). Traced, every such value would become a guard
and the model would recompile at every step. So under `torch.compile` the adapter's hook and processors call these
ops instead of deciding in Python: `begin_call` records the call's step and token grid (the hook's work) and returns
a token; `attention` runs one attention call the way the installation's controller decides at that moment (the
model's own call on dense steps, the sparse runtime otherwise). Both run eagerly, as the compiler's opaque calls,
with the torch backend's loops and Triton launches inside them. The token, passed into every `attention` op of the
call, orders them after `begin_call`.

Ops name their Python side by an integer `site` (the hook or processor registered with `register_site`), since an
op's arguments are tensors and plain values.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

_SITES: dict[int, Any] = {}
_ids = itertools.count()


def register_site(obj: Any) -> int:
    site = next(_ids)
    _SITES[site] = obj
    return site


def unregister_site(site: int) -> None:
    _SITES.pop(site, None)


@torch.library.custom_op("sparsediff::begin_call", mutates_args=())
def begin_call(timestep: torch.Tensor, site: int, grid: list[int]) -> torch.Tensor:
    """The hook's step tracking for one denoiser call; `timestep` is empty when the model got none."""
    _SITES[site].begin(timestep if timestep.numel() else None, tuple(grid) if grid else None)
    return torch.zeros((), device=timestep.device)


@begin_call.register_fake
def _(timestep, site, grid):
    return torch.empty((), device=timestep.device)


@torch.library.custom_op("sparsediff::attention", mutates_args=())
def attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, token: torch.Tensor, site: int,
    attn_mask: torch.Tensor | None, dropout_p: float, is_causal: bool, scale: float | None, enable_gqa: bool,
    heads_first: bool,
) -> torch.Tensor:
    """One (B, H, S, D) attention call of a processor, decided and run eagerly. `heads_first` is False when the
    model's own call takes (B, S, H, D) tensors (diffusers' dispatch), for its dense path."""
    out = _SITES[site].attend_eager(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, heads_first)
    # a custom op's output may not alias its inputs
    return out.clone() if any(out.data_ptr() == x.data_ptr() for x in (query, key, value)) else out


@attention.register_fake
def _(query, key, value, token, site, attn_mask, dropout_p, is_causal, scale, enable_gqa, heads_first):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


@torch.library.custom_op("sparsediff::text_attention", mutates_args=())
def text_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, token: torch.Tensor, site: int,
    attention_mask: torch.Tensor | None, dropout: float, scaling: float | None, is_causal: int, sliding_window: int,
) -> torch.Tensor:
    """One call of transformers' attention interface (q (B, Hq, S, D), k and v (B, Hkv, S, D)), decided and run
    eagerly; returns (B, S, Hq, D) as the interface does. `is_causal` is -1 for "the module's own", `sliding_window`
    0 for none."""
    out = _SITES[site].text_attention(query, key, value, attention_mask, dropout, scaling, is_causal, sliding_window)
    return out.clone() if any(out.data_ptr() == x.data_ptr() for x in (query, key, value)) else out


@text_attention.register_fake
def _(query, key, value, token, site, attention_mask, dropout, scaling, is_causal, sliding_window):
    B, H, S, _ = query.shape
    return query.new_empty((B, S, H, value.shape[-1]))
