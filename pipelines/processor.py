"""The attention processor sparsediff installs: the model's own processor, with only its attention call replaced.

Each video self-attention layer gets one `SparseAttnProcessor` wrapping the processor it had. The wrapper calls that
original processor, so the model's own projections, norms and RoPE run unchanged, inside a `TorchFunctionMode` that
catches its `F.scaled_dot_product_attention` call(s), turns each into q, k, v in (B, H, S, D) layout with the token
layouts of its batch rows, and hands them to a controller (`controllers.py`): the sparse runtime when accelerating,
the profiler when profiling. When the controller replaces nothing (dense steps and
layers, an all-`full` plan) the original SDPA call runs as is, so the output is bit-identical to the unwrapped model.

Processors that dispatch through diffusers' attention backends (Wan, LTX, HunyuanVideo) run on the `native` backend
while a call is replaced, since only that backend ends in SDPA; dense calls keep the backend the user chose.
`_attention_backend` and `_parallel_config` live on the wrapper, where `set_attention_backend` and
`enable_parallelism` put them, and are handed to the original processor on every call.
"""

from __future__ import annotations

import inspect
import logging
import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..kernels.log import warn_once
from ..runtime import AttentionStats, Clock
from .controllers import TokenGroups
from .state import CallState

logger = logging.getLogger("sparsediff.pipelines")

_SDPA = F.scaled_dot_product_attention
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SWITCHES = ("_attention_backend", "_parallel_config")  # diffusers' per-processor switches
_MISSING = object()

class DenseFallback(Exception):
    """Why an attention call stays dense (logged once per reason)."""


def token_groups(state: CallState, query: torch.Tensor, attn_mask: torch.Tensor | None) -> TokenGroups:
    """Batch rows that share a number of valid tokens, with their layout; `[(None, layout)]` when all are valid.

    HeunyuanVideo pads its text and passes a key-padding mask: each group of rows then runs on its valid tokens
    (layout `video + text(valid)`); Mochi drops padded text itself and calls SDPA once per sample, each call with its
    own layout."""
    B, _, S, _ = query.shape
    lengths = _valid_lengths(attn_mask, B, S)
    groups = []
    for n in sorted(set(lengths.tolist())) if lengths is not None else [S]:
        layout = state.layout(n)
        if layout is None:
            raise DenseFallback(
                f"an attention call over {n} tokens does not fit the video grid {state.grid} of {state.model}"
                f"{'' if state.text else ' (this family has no text in its self-attention)'}"
            )
        groups.append((None if lengths is None else torch.nonzero(lengths == n).flatten(), layout))
    return groups


def _valid_lengths(attn_mask: torch.Tensor | None, batch: int, seq_len: int) -> torch.Tensor | None:
    """(B,) valid-token counts of a boolean key-padding mask whose valid tokens come first; None if all valid."""
    if attn_mask is None:
        return None
    mask = attn_mask
    if mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == mask.shape[2] == 1:
        mask = mask[:, 0, 0]  # (B, 1, 1, S): HunyuanVideo's key padding
    if mask.dtype != torch.bool or mask.dim() != 2 or mask.shape[-1] != seq_len:
        raise DenseFallback(f"an attention mask of shape {tuple(attn_mask.shape)} and dtype {attn_mask.dtype} is not a key-padding mask")
    mask = mask.expand(batch, seq_len)
    lengths = mask.sum(dim=-1)
    if not torch.equal(mask, torch.arange(seq_len, device=mask.device)[None] < lengths[:, None]):
        raise DenseFallback("the attention mask leaves padding between valid tokens, not only at the end")
    return None if bool((lengths == seq_len).all()) else lengths.cpu()


def _check_plain(dropout_p: float, is_causal: bool, enable_gqa: bool, query, key, value) -> None:
    if dropout_p or is_causal or enable_gqa or key.shape != query.shape or value.shape[:3] != query.shape[:3]:
        raise DenseFallback("the attention call uses dropout, causal masking, GQA or unequal q/k/v shapes")


class SDPAIntercept(TorchFunctionMode):
    """Sends every `F.scaled_dot_product_attention` call made inside it, as q, k, v with their token groups, to
    `controller.attend` (which returns `(output, AttentionStats)`, or None to keep SDPA). Torch disables
    the mode while `__torch_function__` runs, so the controller's own SDPA calls go straight through."""

    def __init__(self, controller, layer: int, state: CallState):
        super().__init__()
        self.controller, self.layer, self.state = controller, layer, state
        self.calls: list[AttentionStats] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not _SDPA:
            return func(*args, **kwargs)
        call = {**dict(zip(_SDPA_PARAMS, args)), **kwargs}
        result = self._attend(**call)
        out, stats = (func(*args, **kwargs), AttentionStats()) if result is None else result
        self.calls.append(stats)
        return out

    def _attend(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        try:
            _check_plain(dropout_p, is_causal, enable_gqa, query, key, value)
            groups = token_groups(self.state, query, attn_mask)
        except DenseFallback as why:
            warn_once(logger, f"sparsediff: attention stays dense because {why}.")
            return None
        return self.controller.attend(self.layer, self.state, query, key, value, groups, scale)

    def layer_stats(self, timing) -> AttentionStats:
        """The layer call's record: a Mochi-style layer makes one SDPA call per sample, each counted in the density.
        `timing` is the whole layer call's (projections included, as for a dense layer, so the two compare)."""
        replaced = [c for c in self.calls if not c.dense]
        if not replaced:
            return AttentionStats(timings=[timing])
        density = (sum(r.density for r in replaced) + len(self.calls) - len(replaced)) / len(self.calls)
        return dataclasses.replace(replaced[0], density=density, timings=[timing], groups=())


class SparseAttnProcessor:
    """Wraps one layer's original processor; the controller decides each call.

    Args:
        original: the processor the layer had (restored by `restore()`).
        layer (int): the layer's index among the model's video self-attention layers.
        state (CallState): written by the step-tracking hook before each denoiser call.
        controller: has `active(layer, state) -> bool` (does this call need q, k, v at all),
            `attend(layer, state, query, key, value, groups, scale) -> (output, AttentionStats) | None` and
            `record(state, AttentionStats)`.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, original: Any, layer: int, state: CallState, controller: Any):
        self.original = original
        self.layer = layer
        self.state = state
        self.controller = controller
        self._saved = {name: vars(original).get(name, _MISSING) for name in _SWITCHES if hasattr(original, name)}
        for name in self._saved:
            setattr(self, name, getattr(original, name))

    def _run(self, attn: torch.nn.Module, *args, **kwargs):
        active = self.controller.active(self.layer, self.state)
        if active and self._parallel_config is not None:
            warn_once(
                logger,
                "sparsediff: context parallelism is enabled, so attention stays dense; sparse patterns need the full "
                "sequence of every head, which Ulysses/ring sharding does not give this processor.",
            )
            active = False
        self._hand_switches(native=active)
        hidden = args[0] if args else kwargs.get("hidden_states")
        start = Clock.start(hidden.device if torch.is_tensor(hidden) else torch.device("cpu"))
        if not active:  # the model's own call, untouched
            out = self.original(attn, *args, **kwargs)
            self.controller.record(self.state, AttentionStats(timings=[Clock.stop(start)]))
            return out
        intercept = SDPAIntercept(self.controller, self.layer, self.state)
        with intercept:
            out = self.original(attn, *args, **kwargs)
        self.controller.record(self.state, intercept.layer_stats(Clock.stop(start)))
        return out

    def _hand_switches(self, native: bool) -> None:
        if "_attention_backend" in self._saved:
            from diffusers.models.attention_dispatch import AttentionBackendName

            self.original._attention_backend = AttentionBackendName.NATIVE if native else self._attention_backend
        if "_parallel_config" in self._saved:
            self.original._parallel_config = self._parallel_config

    def restore(self) -> Any:
        """The original processor, with diffusers' switches as they were, or as the user set them since."""
        for name, saved in self._saved.items():
            initial = saved if saved is not _MISSING else getattr(type(self.original), name, None)
            current = getattr(self, name)
            if current is not initial:
                setattr(self.original, name, current)
            elif saved is _MISSING:
                vars(self.original).pop(name, None)
            else:
                setattr(self.original, name, saved)
        return self.original


_classes: dict[type, type] = {}


def wrap_processor(original: Any, layer: int, state: CallState, controller: Any) -> SparseAttnProcessor:
    """A `SparseAttnProcessor` whose `__call__` has the signature of `original.__call__`.

    diffusers' `Attention.forward` and `LTXAttention.forward` drop every keyword argument the processor's signature
    does not name (`image_rotary_emb` included), so the wrapper must name exactly what the original names."""
    cls = type(original)
    if cls not in _classes:

        def __call__(self, attn, *args, **kwargs):
            return self._run(attn, *args, **kwargs)

        __call__.__signature__ = inspect.signature(cls.__call__)
        _classes[cls] = type(f"Sparse{cls.__name__}", (SparseAttnProcessor,), {"__call__": __call__})
    return _classes[cls](original, layer, state, controller)
