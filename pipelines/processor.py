"""The attention processor sparsediff installs: the model's own processor, with only its attention call replaced.

Each video self-attention layer gets one `SparseAttnProcessor` wrapping the processor it had. The wrapper calls that
original processor, so the model's own projections, norms and RoPE run unchanged, inside a `TorchFunctionMode` that
catches its `F.scaled_dot_product_attention` call(s) and hands them, in (B, H, S, D) layout, to a controller: the
sparse runtime when accelerating, the profiler when profiling. When the controller replaces nothing (dense steps and
layers, an all-`full` plan) the original SDPA call runs as is, so the output is bit-identical to the unwrapped model.

Processors that dispatch through diffusers' attention backends (Wan, LTX, HunyuanVideo) run on the `native` backend
while a call is replaced, since only that backend ends in SDPA; dense calls keep the backend the user chose.
`_attention_backend` and `_parallel_config` live on the wrapper, where `set_attention_backend` and
`enable_parallelism` put them, and are handed to the original processor on every call.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .state import CallState, Clock, LayerCall

logger = logging.getLogger("sparsediff.pipelines")

_SDPA = F.scaled_dot_product_attention
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SWITCHES = ("_attention_backend", "_parallel_config")  # diffusers' per-processor switches
_MISSING = object()
_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


@dataclass(frozen=True)
class Replaced:
    """What a replaced attention call did: its density over heads (full = 1, skip = 0) and head counts."""

    density: float
    heads_skipped: int
    heads_sparse: int


# (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> (output, Replaced), or None to keep SDPA
Replacement = Callable[..., "tuple[torch.Tensor, Replaced] | None"]


class SDPAIntercept(TorchFunctionMode):
    """Sends every `F.scaled_dot_product_attention` call made inside it to `replace` (None: keep SDPA) and times it.
    Torch disables the mode while `__torch_function__` runs, so the replacement's own SDPA calls go straight through."""

    def __init__(self, replace: Replacement | None):
        super().__init__()
        self.replace = replace
        self.calls: list[tuple[Replaced | None, Any]] = []  # (what replaced it or None, timing)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not _SDPA:
            return func(*args, **kwargs)
        call = {**dict(zip(_SDPA_PARAMS, args)), **kwargs}
        start = Clock.start(call["query"].device)
        result = self.replace(**call) if self.replace is not None else None
        out, replaced = (func(*args, **kwargs), None) if result is None else result
        self.calls.append((replaced, Clock.stop(start)))
        return out

    def layer_call(self, layer: int, processor_timing) -> LayerCall:
        replaced = [r for r, _ in self.calls if r is not None]
        timings = [t for _, t in self.calls] or [processor_timing]  # no SDPA seen (another backend): time the layer
        if not replaced:
            return LayerCall(layer, True, 1.0, 0, 0, timings)
        dense_calls = len(self.calls) - len(replaced)
        density = (sum(r.density for r in replaced) + dense_calls) / len(self.calls)
        return LayerCall(layer, False, density, replaced[0].heads_skipped, replaced[0].heads_sparse, timings)


class SparseAttnProcessor:
    """Wraps one layer's original processor; `controller.replacement(layer, state)` decides each call.

    Args:
        original: the processor the layer had (restored by `restore()`).
        layer (int): the layer's index among the model's video self-attention layers.
        state (CallState): written by the step-tracking hook before each denoiser call.
        controller: has `replacement(layer, state) -> Replacement | None` and `record(state, LayerCall)`.
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
        replace = self.controller.replacement(self.layer, self.state)
        if replace is not None and self._parallel_config is not None:
            warn_once(
                "sparsediff: context parallelism is enabled, so attention stays dense; sparse patterns need the full "
                "sequence of every head, which Ulysses/ring sharding does not give this processor."
            )
            replace = None
        self._hand_switches(native=replace is not None)
        hidden = args[0] if args else kwargs.get("hidden_states")
        start = Clock.start(hidden.device if torch.is_tensor(hidden) else torch.device("cpu"))
        intercept = SDPAIntercept(replace)
        with intercept:
            out = self.original(attn, *args, **kwargs)
        self.controller.record(self.state, intercept.layer_call(self.layer, Clock.stop(start)))
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
