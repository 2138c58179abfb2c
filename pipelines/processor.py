"""The attention processor sparsediff installs: the model's own processor code, with only its attention call routed.

Each video self-attention layer gets one `SparseAttnProcessor` wrapping the processor it had. The wrapper runs the
original processor's own `__call__` code, so the model's projections, norms and RoPE run unchanged, but rebound to
globals in which `F.scaled_dot_product_attention` (CogVideoX, Mochi) and diffusers' `dispatch_attention_fn` (Wan,
LTX, HunyuanVideo) lead to this layer's `attend`. No function mode and no patching of diffusers: the rebound code is
an ordinary Python function, which `torch.compile` traces (`fullgraph=True` included).

`attend` turns a call into q, k, v in (B, H, S, D) layout with the token layouts of its batch rows and asks the
controller (`controllers.py`): the sparse runtime when accelerating, the profiler when profiling. When the controller
replaces nothing (dense steps and layers, an all-`full` plan) the original call runs as is, with the backend the user
chose, so the output is bit-identical to the unwrapped model. Under `torch.compile` the decision is made at run time
inside the `sparsediff::attention` op (`compiled_ops.py`), so changing plans between steps never recompiles.

`_attention_backend` and `_parallel_config` live on the wrapper, where `set_attention_backend` and
`enable_parallelism` put them, and are handed to the original processor on every call.
"""

from __future__ import annotations

import inspect
import logging
import sys
import types
from typing import Any

import torch
import torch.nn.functional as F

from ..kernels.log import warn_once
from ..runtime import AttentionStats, Clock
from .compiled_ops import register_site, unregister_site
from .controllers import DenseFallback, TokenGroups, valid_lengths
from .state import CallState

logger = logging.getLogger("sparsediff.pipelines")

_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SWITCHES = ("_attention_backend", "_parallel_config")  # diffusers' per-processor switches
_MISSING = object()

def token_groups(state: CallState, query: torch.Tensor, attn_mask: torch.Tensor | None) -> TokenGroups:
    """Batch rows that share a number of valid tokens, with their layout; `[(None, layout)]` when all are valid.

    HeunyuanVideo pads its text and passes a key-padding mask: each group of rows then runs on its valid tokens
    (layout `video + text(valid)`); Mochi drops padded text itself and calls SDPA once per sample, each call with its
    own layout."""
    B, _, S, _ = query.shape
    lengths = valid_lengths(attn_mask, B, S)
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


@torch.compiler.disable
def _timed_eagerly(processor: "SparseAttnProcessor", call: dict, own, head_start: int | None = None):
    """`processor._timed` run eagerly from compiled code, for controllers whose output autograd must see through
    (`differentiable = True`, structure-aware training): the `sparsediff::attention` op has no backward."""
    return processor._timed(call, own, head_start)


def _check_plain(dropout_p: float, is_causal: bool, enable_gqa: bool, query, key, value) -> None:
    if dropout_p or is_causal or enable_gqa or key.shape != query.shape or value.shape[:3] != query.shape[:3]:
        raise DenseFallback("the attention call uses dropout, causal masking, GQA or unequal q/k/v shapes")


class SparseAttnProcessor:
    """Wraps one layer's original processor; the controller decides each attention call.

    Args:
        original: the processor the layer had (restored by `restore()`).
        layer (int): the layer's index among the model's video self-attention layers.
        state (CallState): written by the step-tracking hook before each denoiser call.
        controller: has `may_replace` (False when no call can ever be replaced: a dense plan), `active(layer, state)
            -> bool` (does this call need q, k, v at all),
            `attend(layer, state, query, key, value, groups, scale) -> (output, AttentionStats) | None` (None keeps
            the model's own call) and `record(state, AttentionStats)`.
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
        self.site = register_site(self)
        self._call = rebind(type(original).__call__, self)

    # ---- the routed attention calls ------------------------------------------------------------------------
    def sdpa(self, *args, **kwargs) -> torch.Tensor:
        """Stands in for `F.scaled_dot_product_attention` in the original processor's code: (B, H, S, D)."""
        call = {**dict(zip(_SDPA_PARAMS, args)), **kwargs}
        return self._route(call, lambda: F.scaled_dot_product_attention(*args, **kwargs), heads_first=True)

    def dispatch(self, *args, **kwargs) -> torch.Tensor:
        """Stands in for diffusers' `dispatch_attention_fn` in the original processor's code: (B, S, H, D)."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        call = {**dict(zip(_SDPA_PARAMS, args)), **kwargs}
        own = lambda: dispatch_attention_fn(*args, **kwargs)  # noqa: E731
        if call.get("parallel_config") is not None and self.controller.may_replace:
            return self._context_parallel(call, own)
        if call.get("parallel_config") is not None or call.get("attention_kwargs"):
            return own()
        sdpa = {k: v for k, v in call.items() if k in _SDPA_PARAMS}
        q, k, v = (sdpa.pop(n).transpose(1, 2) for n in ("query", "key", "value"))  # (B, H, S, D)
        return self._route({"query": q, "key": k, "value": v, **sdpa}, own, heads_first=False)

    def _context_parallel(self, call: dict, own) -> torch.Tensor:
        """A (B, S/N, H, D) call under diffusers' context parallelism: Ulysses runs the plan's patterns of each rank's
        head block over the whole sequence (`parallel.py`); ring is refused, and so is profiling."""
        from .controllers import ObserveController
        from .parallel import ulysses_attention, ulysses_degree

        if isinstance(self.controller, ObserveController):
            raise ValueError(
                "sparsediff cannot profile a model under context parallelism; profile on one process (calibration "
                "inputs are small), then run the searched plan under Ulysses."
            )
        ulysses_degree(call["parallel_config"])  # refuses ring on dense steps too: the plan would be sparse later
        if torch.compiler.is_compiling():
            warn_once(logger, "sparsediff: attention stays dense under torch.compile with context parallelism; run "
                              "the context-parallel model eagerly to use the plan.")
            return own()
        heads_last = {k: v for k, v in call.items() if k in _SDPA_PARAMS}
        if not self.controller.active(self.layer, self.state):  # a dense step or layer: the model's own call, timed
            q, k, v = (heads_last[n].transpose(1, 2) for n in ("query", "key", "value"))
            return self._route({**heads_last, "query": q, "key": k, "value": v}, own, heads_first=False)

        def attend(query, key, value, attn_mask, dropout_p, scale, head_start):  # (B, S, H/N, D), whole sequence
            q, k, v = (x.transpose(1, 2) for x in (query, key, value))
            local = dict(query=q, key=k, value=v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
            dense = lambda: F.scaled_dot_product_attention(**local).transpose(1, 2)  # noqa: E731
            return self._route(local, dense, heads_first=False, head_start=head_start)

        return ulysses_attention(
            heads_last["query"], heads_last["key"], heads_last["value"], heads_last.get("attn_mask"),
            heads_last.get("dropout_p", 0.0), heads_last.get("is_causal", False), heads_last.get("scale"),
            heads_last.get("enable_gqa", False), call["parallel_config"], attend,
        )  # fmt: skip

    def _route(self, call: dict, original, heads_first: bool, head_start: int | None = None) -> torch.Tensor:
        """Eagerly, or through the `sparsediff::attention` op when compiling (the decision is made at run time)."""
        if torch.compiler.is_compiling():
            if not self.controller.may_replace:  # nothing to decide: the model's own call, traced as it is
                return original()
            if getattr(self.controller, "differentiable", False):  # gradients must flow (training): no custom op,
                out, replaced = _timed_eagerly(self, call, original, head_start)  # an eager call behind a graph break
                return out if heads_first or not replaced else out.transpose(1, 2)
            token = getattr(self.state, "token", None)
            token = token if token is not None else call["query"].new_zeros(())
            out = torch.ops.sparsediff.attention(
                call["query"], call["key"], call["value"], token, self.site, call.get("attn_mask"),
                float(call.get("dropout_p", 0.0)), bool(call.get("is_causal", False)), call.get("scale"),
                bool(call.get("enable_gqa", False)), heads_first,
            )
            return out if heads_first else out.transpose(1, 2)
        out, replaced = self._timed(call, original, head_start)
        return out if heads_first or not replaced else out.transpose(1, 2)

    def attend_eager(self, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, heads_first) -> torch.Tensor:
        """The `sparsediff::attention` op's body: (B, H, S, D) in and out, decided and recorded at run time."""
        call = dict(query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                    scale=scale, enable_gqa=enable_gqa)

        def own():  # the model's own call: SDPA, or the user's diffusers backend where the model dispatches
            if heads_first:
                return F.scaled_dot_product_attention(**call)
            from diffusers.models.attention_dispatch import dispatch_attention_fn

            q, k, v = (x.transpose(1, 2) for x in (query, key, value))
            return dispatch_attention_fn(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                         scale=scale, enable_gqa=enable_gqa, backend=self.original._attention_backend
                                         ).transpose(1, 2)

        return self._timed(call, own)[0]

    def _timed(self, call: dict, own, head_start: int | None = None) -> tuple[torch.Tensor, bool]:
        """The controller's (B, H, S, D) output for one call, or `own()` when it replaces nothing (timed too, so that
        dense and sparse steps compare); recorded. Returns the output and whether the controller replaced the call."""
        start = Clock.start(call["query"].device)
        result = self._decide(call, head_start)
        out, stats = (own(), AttentionStats()) if result is None else result
        stats.timings = [Clock.stop(start)]
        self.controller.record(self.state, stats)
        return out, result is not None

    def _decide(self, call: dict, head_start: int | None = None):
        """`(output, AttentionStats)` from the controller for one (B, H, S, D) call, or None for the model's own;
        `head_start` is the global index of the call's first head when it holds a slice of them (Ulysses)."""
        if not self.controller.active(self.layer, self.state):
            return None
        query = call["query"]
        try:
            _check_plain(call.get("dropout_p", 0.0), call.get("is_causal", False), call.get("enable_gqa", False),
                         query, call["key"], call["value"])
            groups = token_groups(self.state, query, call.get("attn_mask"))
        except DenseFallback as why:
            warn_once(logger, f"sparsediff: attention stays dense because {why}.")
            return None
        return self.controller.attend(self.layer, self.state, query, call["key"], call["value"], groups, call.get("scale"),
                                      head_start=head_start)

    # ---- the processor call --------------------------------------------------------------------------------
    def _run(self, attn: torch.nn.Module, *args, **kwargs):
        self._hand_switches()
        return self._call(self.original, attn, *args, **kwargs)

    def _hand_switches(self) -> None:
        for name in self._saved:
            setattr(self.original, name, getattr(self, name))

    def restore(self) -> Any:
        """The original processor, with diffusers' switches as they were, or as the user set them since."""
        unregister_site(self.site)
        unbind(self._call)
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


def rebind(function: types.FunctionType, processor: SparseAttnProcessor) -> types.FunctionType:
    """`function` (a processor's `__call__`) with its global `F` and `dispatch_attention_fn` leading to `processor`.

    The code is the processor's own; only the names it looks up change. They live in a copy of its module registered
    in `sys.modules` under a name of sparsediff's (removed by `unbind`): the compiler reads a function's globals
    through the module its `__module__` names, so the copy must be a real module."""
    names = function.__globals__
    routed = {}
    if names.get("F") is F:
        shim = types.ModuleType("sparsediff_functional", "torch.nn.functional with SDPA routed to sparsediff")
        shim.__dict__.update({k: v for k, v in vars(F).items() if not k.startswith("__")})
        shim.scaled_dot_product_attention = processor.sdpa
        routed["F"] = shim
    if "dispatch_attention_fn" in names:
        routed["dispatch_attention_fn"] = processor.dispatch
    if not routed:
        raise ValueError(
            f"sparsediff cannot route the attention of {type(processor.original).__name__}: its code calls neither "
            "F.scaled_dot_product_attention nor diffusers' dispatch_attention_fn; accelerate a supported family."
        )
    module = types.ModuleType(f"{__name__}._routed_{processor.site}")
    module.__dict__.update({**names, **routed, "__name__": module.__name__})
    sys.modules[module.__name__] = module
    # a code object of its own: the compiler keys what it learns about a function on its code object, and the
    # original processors of other layers (cross-attention) run the same code with the module's own globals
    code = function.__code__.replace()
    rebound = types.FunctionType(code, module.__dict__, function.__name__, function.__defaults__, function.__closure__)
    rebound.__kwdefaults__ = function.__kwdefaults__
    return rebound


def unbind(rebound: types.FunctionType) -> None:
    sys.modules.pop(rebound.__module__, None)


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
