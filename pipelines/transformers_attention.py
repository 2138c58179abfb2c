"""The transformers adapter: any `PreTrainedModel` whose attention dispatches through transformers' attention interface.

This is the seam diffusion language models come in through (a bidirectional Llama trained as a masked diffusion LM,
diffusers' `LLaDA2Pipeline` around one). Installing registers an attention function named `sparsediff` (and
`sparsediff_eager` over eager models) with transformers' `AttentionInterface`, registers the model's own mask function
under the same name in `AttentionMaskInterface` (an implementation without one silently gets no padding mask), and
switches the model to it with `set_attn_implementation` (setting `config._attn_implementation` where a remote-code
model ignores that call). `remove()` puts the model's implementation back.

Each call: layer from `module.layer_idx`, q as (B, Hq, S, D) and k, v as (B, Hkv, S, D) (GQA: query head h reads KV
head h // groups), the denoising step from a forward pre-hook, and the token layout `generation(S)` (under a
block-wise pipeline `prompt(P) + generation(S - P)`, P the tokens before the active block; 1-D: patterns act
on token distance). A bare model counts its calls (it needs `num_steps`). Under diffusers' `LLaDA2Pipeline`, which
re-runs the whole prefix plus the active block at every step, the step is counted per block: a block starts when the
sequence grows or its active block is all mask tokens; steps are that block's (the scheduler's `num_inference_steps`;
the pipeline's extra editing steps count as the last one); each block is its own cache context in the stats
("block 0", "block 1", ...), and a shorter sequence, or the first block starting again, is a new request. When the controller replaces nothing, the
model's own implementation runs with the mask it would have had, so a dense plan is bit-exact.

A call whose queries are fewer than its keys is a canvas attending a cache plus itself (DiffusionGemma's decoder, see
`diffusion_gemma.py`): the queries are the last valid keys, the layout `prompt(keys - Sq) + generation(Sq)` over the
valid keys only (so top-k keeps its own share of each and never picks a masked key: padding, empty static-cache
slots), and only the canvas rows run. Sliding-window layers run sparse as well: the sdpa and eager functions this wraps ignore
`sliding_window` (the window lives in the mask, or, in DiffusionGemma's decoder, in what the sliding cache kept), so
the plan's pattern intersected with the call's mask is exactly what runs; a mask that is not key padding, such as a
sliding causal one, stays dense. Causal calls (DiffusionGemma's encoder, causal LMs) stay dense, as do dropout and,
in calls without a cache, padding other than on the right (one warning each).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..kernels.log import warn_once
from ..layout import TokenLayout, generation, prompt
from ..plan import ModelFingerprint
from ..runtime import AttentionStats, Clock
from .adapter import Adapter, register_adapter
from .compiled_ops import register_site, unregister_site
from .controllers import DenseFallback, PlanController, valid_lengths
from .diffusion_gemma import CanvasSteps, is_diffusion_gemma
from .state import CallState, RunLog

logger = logging.getLogger("sparsediff.pipelines")

# the name our attention function is registered under, per the model's own implementation
NAMES = {"sdpa": "sparsediff", "eager": "sparsediff_eager"}
_ATTR = "_sparsediff_attention"  # on each accelerated attention module: (its _ModuleSite, the site's op id)


def _pretrained(obj: Any) -> bool:
    from transformers import PreTrainedModel

    return isinstance(obj, PreTrainedModel)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that dispatch attention through the interface: they carry `layer_idx` and a config."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]


@dataclass
class TextCallState(CallState):
    """The state of one denoiser call of a text model: the layout is 1-D over the call's valid tokens."""

    text: str | None = None
    prompt_len: int = 0  # block-wise pipelines: the tokens before the active block (prompt and committed blocks)

    def layout(self, seq_len: int) -> TokenLayout | None:
        """`prompt(p) + generation(n - p)` under a block-wise pipeline (so top-k picks prompt and generation keys
        with their own shares), else `generation(n)`."""
        if 0 < self.prompt_len < seq_len:
            return TokenLayout((prompt(self.prompt_len), generation(seq_len - self.prompt_len)))
        return TokenLayout((generation(seq_len),))


@dataclass
class Installation:
    """sparsediff inside one transformers model."""

    name: str
    model: torch.nn.Module
    state: TextCallState
    controller: Any
    log: RunLog
    original: str
    num_steps: int | None
    pipeline: Any = None
    modules: list[torch.nn.Module] = field(default_factory=list)
    hook: Any = None
    count: int = 0
    length: int = -1  # sequence length of the previous call
    block: int = -1  # block index within the request (block-wise pipelines)
    site: int = -1  # for the compiled path's ops
    sites: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.site = register_site(self)


    def pre_forward(self, module, args, kwargs) -> None:
        """Forward pre-hook: where this call belongs (step, block). Under `torch.compile` this is found at run time,
        inside the `sparsediff::begin_call` op (see compiled_ops.py), so steps never become guards."""
        ids = args[0] if args else kwargs.get("input_ids")
        if torch.compiler.is_compiling():
            ids = ids if torch.is_tensor(ids) else torch.zeros(1)
            self.state.token = torch.ops.sparsediff.begin_call(ids, self.site, [])
            return
        self.begin(ids)

    def begin(self, ids, grid=None) -> None:
        """Where an eager call belongs (also the `begin_call` op's body)."""
        if self.pipeline is not None and getattr(self.pipeline, "scheduler", None) is not None:
            self._begin_block_step(ids)
        else:
            step = self.count % self.num_steps if self.num_steps else self.count
            self.state.step, self.state.num_steps, self.state.source = step, self.num_steps, "count"
        self.count += 1
        self.log.begin_call(self.state)

    def _begin_block_step(self, ids: torch.Tensor) -> None:
        scheduler = self.pipeline.scheduler
        length = ids.shape[-1]
        block_length = scheduler.config.block_length
        mask_token = getattr(self.pipeline, "mask_token_id", None)
        fresh = mask_token is not None and bool((ids[:, -block_length:] == mask_token).all())
        if length < self.length or (fresh and length == self.length and self.block == 0 and self.count > 0
                                    and self.state.step > 0):
            self.log.reset()  # a new request: its first block again
            self.block = -1
        if length != self.length or fresh:
            self.block += 1
            self.count = 0
        num_steps = scheduler.num_inference_steps
        self.state.step, self.state.num_steps = min(self.count, num_steps - 1), num_steps
        self.state.context, self.state.source = f"block {self.block}", "block"
        self.state.prompt_len = length - block_length
        self.length = length

    def remove(self) -> None:
        unregister_site(self.site)
        for site in self.sites:
            unregister_site(site)
        for module in self.modules:
            vars(module).pop(_ATTR, None)
        if self.hook is not None:
            self.hook.remove()
        _set_implementation(self.model, self.original)

    def reset(self) -> None:
        self.count, self.length, self.block = 0, -1, -1
        if hasattr(self.hook, "reset"):  # DiffusionGemma's CanvasSteps
            self.hook.reset()


def _set_implementation(model: torch.nn.Module, name: str) -> None:
    try:
        model.set_attn_implementation(name)
    except (ValueError, KeyError, AttributeError):
        pass
    if model.config._attn_implementation != name:  # remote-code models ignore set_attn_implementation
        model.config._attn_implementation = name


def _own_function(module: torch.nn.Module, original: str) -> Callable:
    """The attention function the model used before: the interface's entry, or its modeling file's eager one."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if original == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[original]


def sparse_attention(module, query, key, value, attention_mask, *, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, sliding_window: int | None = None, **kwargs):
    """The function registered with transformers' `AttentionInterface`: returns ((B, S, Hq, D), None). Under
    `torch.compile` the call goes through the `sparsediff::text_attention` op, which decides at run time."""
    module_site, site = vars(module)[_ATTR]
    installation = module_site.installation
    if torch.compiler.is_compiling():
        if not installation.controller.may_replace:  # nothing to decide: the model's own call, traced as it is
            return _own_function(module, installation.original)(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                sliding_window=sliding_window, **kwargs)
        token = getattr(installation.state, "token", None)
        token = token if token is not None else query.new_zeros(())
        out = torch.ops.sparsediff.text_attention(
            query, key, value, token, site, attention_mask, float(dropout), scaling,
            -1 if is_causal is None else int(bool(is_causal)), int(sliding_window or 0),
        )
        return out, None
    return module_site.attend(query, key, value, attention_mask, dropout, scaling, is_causal, sliding_window, kwargs), None


@dataclass
class _ModuleSite:
    """One attention module's run-time side: decides, runs and records one call."""

    installation: Installation
    module: torch.nn.Module
    layer: int

    def attend(self, query, key, value, attention_mask, dropout, scaling, is_causal, sliding_window, kwargs) -> torch.Tensor:
        """((B, S, Hq, D) output of one call."""
        module, installation, layer = self.module, self.installation, self.layer
        own = lambda: _own_function(module, installation.original)(  # noqa: E731
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
            sliding_window=sliding_window, **kwargs)
        controller, state = installation.controller, installation.state
        start = Clock.start(query.device)
        result = None
        if controller.active(layer, state):
            try:
                causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
                if causal and attention_mask is None and query.shape[2] > 1:
                    raise DenseFallback("the call is causal (a causal encoder, such as DiffusionGemma's, or a causal LM) "
                                        "and sparsediff's patterns are bidirectional")
                if dropout and module.training:
                    raise DenseFallback("the call uses dropout")
                over_cache = key.shape[2] != query.shape[2]
                if over_cache and not isinstance(controller, PlanController):
                    raise DenseFallback("profiling does not observe calls over a cache (keys != queries) yet")
                groups = (_cache_groups if over_cache else _token_groups)(state, query, key, attention_mask)
            except DenseFallback as why:
                warn_once(logger, f"sparsediff: attention stays dense because {why}.")
            else:
                groups_of = module.num_key_value_groups  # per module: DiffusionGemma's full layers have fewer KV heads
                k, v = (x.repeat_interleave(groups_of, dim=1) if groups_of > 1 else x for x in (key, value))
                if over_cache:
                    result = _attend_over_cache(controller, layer, state, query, k, v, groups, scaling)
                else:
                    result = controller.attend(layer, state, query, k, v, groups, scaling)
        if result is None:
            out, stats = own()[0], AttentionStats()
        else:
            out, stats = result
            out = out.transpose(1, 2).contiguous()
        stats.timings = [Clock.stop(start)]
        controller.record(state, stats)
        return out

    def text_attention(self, query, key, value, attention_mask, dropout, scaling, is_causal, sliding_window):
        """The `sparsediff::text_attention` op's body."""
        causal = None if is_causal < 0 else bool(is_causal)
        return self.attend(query, key, value, attention_mask, dropout, scaling, causal, sliding_window or None, {})


def _key_mask(attention_mask):
    """The call's mask as a bool key mask ((B, S) from a (B, 1, Sq, S) one), if it is the same for every query."""
    mask = attention_mask
    if mask is not None:
        if mask.dtype != torch.bool:  # an additive float mask (eager models)
            mask = mask > torch.finfo(mask.dtype).min / 2
        if mask.dim() == 4 and mask.shape[1] == 1:
            if not torch.equal(mask, mask[:, :, :1].expand_as(mask)):
                raise DenseFallback("the attention mask differs between queries (not key padding: e.g. causal or a sliding window)")
            mask = mask[:, 0, 0]
    return mask


def _token_groups(state: TextCallState, query, key, attention_mask):
    """Batch rows by valid key length (right padding only), each with its 1-D layout."""
    B, _, S, _ = query.shape
    mask = _key_mask(attention_mask)
    lengths = valid_lengths(mask, B, S)
    sizes = sorted(set(lengths.tolist())) if lengths is not None else [S]
    return [(None if lengths is None else torch.nonzero(lengths == n).flatten(), state.layout(n)) for n in sizes]


def canvas_layout(num_keys: int, num_queries: int) -> TokenLayout:
    """The layout of a call whose queries are the last of its keys: the cached prefix as prompt, the canvas as
    generation."""
    if num_keys == num_queries:
        return TokenLayout((generation(num_keys),))
    return TokenLayout((prompt(num_keys - num_queries), generation(num_queries)))


def _cache_groups(state: TextCallState, query, key, attention_mask):
    """Batch rows of a call over a cache plus its canvas, grouped by which keys are valid (padding anywhere, empty
    static-cache slots): each group runs on its valid keys only, the canvas being their last Sq. Returns
    [(rows or None for all, valid key indices or None for all, layout over the valid keys)]."""
    B, _, Sq, _ = query.shape
    S = key.shape[2]
    if S < Sq:
        raise DenseFallback(f"the call has fewer keys ({S}) than queries ({Sq})")
    mask = _key_mask(attention_mask)
    if mask is None or bool(mask.all()):
        return [(None, None, canvas_layout(S, Sq))]
    if mask.dim() != 2 or mask.shape[-1] != S:
        raise DenseFallback(f"an attention mask of shape {tuple(attention_mask.shape)} is not a key mask")
    patterns, inverse = torch.unique(mask.expand(B, S), dim=0, return_inverse=True)
    groups = []
    for i, valid in enumerate(patterns):
        keys = torch.nonzero(valid).flatten()
        if len(keys) < Sq:
            raise DenseFallback(f"a row has fewer valid keys ({len(keys)}) than the {Sq} queries")
        rows = None if len(patterns) == 1 else torch.nonzero(inverse == i).flatten()
        groups.append((rows, keys, canvas_layout(len(keys), Sq)))
    return groups


def _attend_over_cache(controller, layer, state, query, key, value, groups, scale):
    """The plan on each group's valid keys, the queries being their last ones; None keeps the model's own call."""
    out, stats = None, None
    for rows, keys, layout in groups:
        q, k, v = (x if rows is None else x[rows] for x in (query, key, value))
        if keys is not None:
            k, v = k.index_select(2, keys), v.index_select(2, keys)
        result = controller.attend(layer, state, q, k, v, [(None, layout)], scale)
        if result is None:
            return None
        part, stats = result
        if rows is None:
            return part, stats
        out = query.new_empty((*query.shape[:3], value.shape[-1])) if out is None else out
        out[rows] = part
    return out, stats


class TransformersAdapter(Adapter):
    """Adapter for transformers models (and pipelines that hold one as `model`, like diffusers' `LLaDA2Pipeline`)."""

    name = "transformers"
    quality_name = "token agreement"
    quality_unit = ""
    profile_output_type = "seq"
    # A sparse run may commit the answer slots in another order than dense and still end with the same tokens, so the
    # block's agreement after a step can fall and recover (the embedded DLM: 0.75 at step 2, 1.0 at the end); trials
    # are judged on the final sequences.
    prune_on_steps = False

    def supported(self) -> str:
        return "transformers models dispatching through the attention interface (sdpa or eager), bare or as a pipeline's `model`"

    def matches(self, pipe_or_model: Any) -> bool:
        return _pretrained(pipe_or_model) or _pretrained(getattr(pipe_or_model, "model", None))

    def denoisers(self, pipe_or_model: Any) -> dict[str, torch.nn.Module]:
        model = pipe_or_model if _pretrained(pipe_or_model) else pipe_or_model.model
        if not attention_modules(model):
            raise ValueError(f"{type(model).__name__} has no attention modules with `layer_idx`; sparsediff cannot reach its attention.")
        return {"model": model}

    def fingerprint(self, model: torch.nn.Module) -> ModelFingerprint:
        modules = attention_modules(model)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = config.num_attention_heads
        # the first attention module's own head dim: some models (DiffusionGemma) vary it per layer
        head_dim = getattr(modules[0], "head_dim", None) or config.hidden_size // heads
        return ModelFingerprint.of(type(model).__name__, len(modules), heads, head_dim, config.to_dict())

    def is_installed(self, model: torch.nn.Module) -> bool:
        return str(model.config._attn_implementation).startswith("sparsediff")

    def install(self, name, model, make_controller, log, pipeline=None, num_steps=None) -> Installation:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface

        original = model.config._attn_implementation or "eager"
        if original not in NAMES:
            raise ValueError(
                f"{type(model).__name__} runs attn_implementation={original!r}; sparsediff wraps 'sdpa' or 'eager'. Call "
                "model.set_attn_implementation('sdpa') first, then accelerate."
            )
        ours = NAMES[original]
        AttentionInterface.register(ours, sparse_attention)
        AttentionMaskInterface.register(ours, ALL_MASK_ATTENTION_FUNCTIONS[original])  # the model's own masks
        modules = attention_modules(model)
        controller = make_controller(len(modules))
        state = TextCallState(model=name)
        installation = Installation(name, model, state, controller, log, original, num_steps, pipeline)
        for index, module in enumerate(modules):  # a plan's layer i is the i-th attention module (encoder, then decoder)
            module_site = _ModuleSite(installation, module, index)
            site = register_site(module_site)
            vars(module)[_ATTR] = (module_site, site)
            installation.modules.append(module)
            installation.sites.append(site)
        if is_diffusion_gemma(model):  # an encoder call per canvas, then a decoder call per step
            installation.hook = CanvasSteps(installation)
        else:
            installation.hook = model.register_forward_pre_hook(installation.pre_forward, with_kwargs=True)
        try:
            _set_implementation(model, ours)
        except BaseException:
            installation.remove()
            raise
        return installation

    def shipped_plan(self, pipe_or_model: Any):
        """A saved pipeline's own plan: `plan.json` in the directory it was loaded from (sparsediff's embedded DLM
        keeps its plan there; so can a user's saved pipeline)."""
        from ..plan import SparsePlan

        config = getattr(pipe_or_model, "config", None)
        name = config.get("_name_or_path") if hasattr(config, "get") else getattr(config, "_name_or_path", None)
        if not name:
            return None
        path = Path(name) / "plan.json"
        return SparsePlan.load(path) if path.is_file() else None

    def run(self, pipe, call, on_step=None):
        """One seeded call of a text pipeline (`LLaDA2Pipeline`): the active block's tokens after every step (steps
        counted over the whole request, block after block) and the final token sequences."""
        if _pretrained(pipe):
            raise ValueError("A search runs a text pipeline end to end (e.g. diffusers' LLaDA2Pipeline around the model), not a bare model.")
        kwargs = {k: v for k, v in call.items() if k != "output_type"}
        seed = kwargs.pop("seed", 0)
        block_length = kwargs.get("block_length") or pipe.scheduler.config.block_length
        steps: list[torch.Tensor] = []

        def callback(pipe, i, t, tensors):
            tokens = tensors["block_x"][:, -block_length:].detach().cpu().clone()  # the pipeline writes block_x in place
            steps.append(tokens)
            if on_step is not None:
                on_step(len(steps) - 1, tokens)
            return tensors

        out = pipe(**kwargs, generator=torch.Generator().manual_seed(seed), output_type="seq",
                   callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["block_x"])
        return steps, out.sequences.detach().cpu()

    def quality(self, output: torch.Tensor, reference: torch.Tensor) -> float:
        """Token agreement with the dense run: the share of positions holding the same token (of the argmax token,
        for logits)."""
        if output.is_floating_point():
            output, reference = output.argmax(-1), reference.argmax(-1)
        if output.shape != reference.shape:
            return 0.0
        return float((output == reference).float().mean())


register_adapter(TransformersAdapter())
