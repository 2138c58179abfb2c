"""What an adapter's attention layers do with a call: run the plan's sparse patterns, or show q, k, v to a profiler.

Controllers know no model family. An adapter hands them each attention call as (B, H, S, D) q, k, v plus its token
groups: batch rows that share a number of valid tokens, each with the `TokenLayout` of those tokens (`[(None,
layout)]` when every row is whole). Rows with padding run on their valid tokens, and their padded query rows attend
the valid keys densely, which is what a key-padding-masked SDPA computes (padded keys are never attended).

A controller has `may_replace` (False when it never replaces a call, e.g. a dense plan), `active(layer, state)` (does this call need q, k, v at all: when not, the model's own attention runs
untouched), `attend(layer, state, query, key, value, groups, scale) -> (output, AttentionStats) | None` (None keeps the
model's own call) and `record(state, AttentionStats)`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..kernels.log import warn_once
from ..layout import TokenLayout
from ..patterns import Pattern
from ..plan import SparsePlan
from ..runtime import AttentionStats, SparseAttention
from .state import CallState, RunLog

logger = logging.getLogger("sparsediff.pipelines")

TokenGroups = list[tuple["torch.Tensor | None", TokenLayout]]


class DenseFallback(Exception):
    """Why an attention call stays dense (logged once per reason)."""


def valid_lengths(attn_mask: torch.Tensor | None, batch: int, seq_len: int) -> torch.Tensor | None:
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


def layout_bound_patterns(plan: SparsePlan) -> list[str]:
    """Names of the plan's patterns whose parameters hold only on the plan's calibration layout (a pattern class
    says so with `layout_bound = True`; the built-in patterns are all in layout units and transfer)."""
    return sorted({p.name for r in plan.ranges for layer in r.layers for p in layer if getattr(p, "layout_bound", False)})


class PlanController:
    """Runs each layer's planned per-head patterns through one `SparseAttention` runtime per layer.

    Args:
        plan (SparsePlan | None): None runs every call dense.
        num_layers (int): accelerated layers of the denoiser.
        log (RunLog): collects the per-step stats; a new run resets the runtimes when the plan has top-k patterns.
        backend (str, optional): the runtime's kernel backend.
    """

    def __init__(self, plan: SparsePlan | None, num_layers: int, log: RunLog, backend: str | None = None):
        self.plan = plan
        self.log = log
        self.runtimes = [SparseAttention(backend=backend) for _ in range(num_layers)]
        self._full_layers_here: bool | None = None  # whether all-full layers run in the runtime (None: not seen yet)
        self._layout_bound = layout_bound_patterns(plan) if plan is not None else []
        self._layouts_seen: set[TokenLayout] = set()  # checked already (a call's layout repeats every step)
        scored = plan is not None and any(p.needs_scores for r in plan.ranges for layer in r.layers for p in layer)
        if scored:  # top-k blocks are picked anew each run; other specs stay cached across runs
            log.on_new_run.append(self.reset)

    def reset(self) -> None:
        for runtime in self.runtimes:
            runtime.reset()

    def patterns(self, layer: int, state: CallState) -> tuple[Pattern, ...] | None:
        """The layer's patterns at this step, or None where the call stays the model's own: a dense step or layer of
        the plan, an all-dense plan, and a layer whose heads the plan made all `full` where the runtime would run them
        as SDPA anyway (known from the first such call; see `SparseAttention.runs_full_layers`)."""
        if self.plan is None or self.plan.is_all_dense:
            return None
        if state.num_steps is None:
            warn_once(logger, f"sparsediff: the number of denoising steps of {state.model} is unknown, so it runs dense; pass num_steps to accelerate().")
            return None
        if self.plan.is_dense_step(state.step, state.num_steps) or layer in self.plan.dense_layers:
            return None
        patterns = self.plan.layer_patterns(state.step, state.num_steps, layer)
        if self._full_layers_here is False and all(p.kind == "full" for p in patterns):
            return None
        return patterns

    @property
    def may_replace(self) -> bool:
        return self.plan is not None and not self.plan.is_all_dense

    def active(self, layer: int, state: CallState) -> bool:
        return self.patterns(layer, state) is not None

    def record(self, state: CallState, call: AttentionStats) -> None:
        self.log.record(state, call)

    def attend(self, layer: int, state: CallState, query, key, value, groups: TokenGroups, scale=None, head_start: int | None = None):
        """The layer's patterns on q, k, v holding global heads [head_start, head_start + H)."""
        patterns = self.patterns(layer, state)
        if patterns is None:
            return None
        if self.plan.min_tokens and max(layout.num_tokens for _, layout in groups) < self.plan.min_tokens:
            return None  # shorter than the plan applies to: the model's own attention
        runtime = self.runtimes[layer]
        if all(p.kind == "full" for p in patterns):  # a layer of full heads: here only where the compiled kernel runs it
            self._full_layers_here = runtime.runs_full_layers(query, key, value)
            if not self._full_layers_here:
                return None
        # diffusers' dispatch hands SDPA (B, S, H, D) tensors permuted to (B, H, S, D); the sparse kernels run
        # markedly faster on contiguous heads (measured 1.3-1.6x on CPU), for one cheap copy.
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
        block = self.plan.block_size
        if len(groups) == 1 and groups[0][0] is None:
            self._check_layout(groups[0][1])
            return runtime(query, key, value, groups[0][1], patterns, block, scale, head_start)
        out, stats = torch.empty_like(query), None
        for rows, layout in groups:
            self._check_layout(layout)
            n = layout.num_tokens
            q, k, v = query[rows], key[rows], value[rows]
            out[rows, :, :n], stats = runtime(q[:, :, :n], k[:, :, :n], v[:, :, :n], layout, patterns, block, scale, head_start)
            if n < q.shape[2]:  # padded queries attend the valid keys, as the key-padding-masked SDPA did
                out[rows, :, n:] = F.scaled_dot_product_attention(q[:, :, n:], k[:, :, :n], v[:, :, :n], scale=scale)
        return out, stats

    def _check_layout(self, layout: TokenLayout) -> None:
        if layout in self._layouts_seen:
            return
        if self._layout_bound and str(layout) != self.plan.layout:
            raise ValueError(
                f"The plan's patterns {', '.join(self._layout_bound)} are tied to its calibration layout "
                f"{self.plan.layout}, but the model now runs on layout {layout}; generate at the calibration size, or "
                "search a plan for this size with `sparsediff search`."
            )
        self._layouts_seen.add(layout)
        searched = _video_shape(self.plan.layout)
        if searched is not None and _video_shape(str(layout)) not in (None, searched):
            # patterns are in layout units, so the plan runs; its quality was only measured at the searched size
            warn_once(logger, f"sparsediff: the plan was searched on video layout {'x'.join(map(str, searched))} "
                      f"(frames x height x width in tokens) and now runs on {layout}. Its patterns scale with the "
                      "layout, but its quality was checked only at the searched size (the embedded model's plan "
                      "loses 9 dB at a quarter of it, BENCHMARKS.md §5): compare with a dense run "
                      "(`--plan dense`), or search a plan at this size with `sparsediff search`.")


def _video_shape(layout: str | None) -> tuple[int, ...] | None:
    """The (frames, height, width) of a layout's video segment, or None when it has none."""
    if not layout:
        return None
    segment = next((s for s in TokenLayout.parse(layout).segments if s.kind == "video"), None)
    return None if segment is None else tuple(segment.shape)


class ObserveController:
    """Keeps every attention call dense and first shows its q, k, v and layout to `observe`.

    Args:
        log (RunLog): gets the (dense) layer calls, which keeps runs apart.
        observe (Callable): `observe(step=, num_steps=, layer=, model=, query=, key=, value=, layout=, scale=)`,
            called with the valid tokens of each group of batch rows.
        wants (Callable): `wants(step, layer) -> bool`; calls it does not want run the original path untouched.
    """

    def __init__(self, log: RunLog, observe: Callable, wants: Callable[[int, int], bool]):
        self.log = log
        self.observe = observe
        self.wants = wants

    may_replace = True

    def active(self, layer: int, state: CallState) -> bool:
        return self.wants(state.step, layer)

    def record(self, state: CallState, call: AttentionStats) -> None:
        self.log.record(state, call)

    def attend(self, layer: int, state: CallState, query, key, value, groups: TokenGroups, scale=None, head_start: int | None = None):
        for rows, layout in groups:
            n = layout.num_tokens
            q, k, v = (x if rows is None else x[rows] for x in (query, key, value))
            self.observe(
                step=state.step, num_steps=state.num_steps, layer=layer, model=state.model,
                query=q[:, :, :n], key=k[:, :, :n], value=v[:, :, :n], layout=layout, scale=scale,
            )  # fmt: skip
        return None  # the model gets the original SDPA output
