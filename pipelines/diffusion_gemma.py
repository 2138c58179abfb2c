"""DiffusionGemma (transformers' `DiffusionGemmaForBlockDiffusion`, diffusers' `DiffusionGemmaPipeline`) in the
transformers adapter: where its calls belong, and a fix that lets the pipeline run on the installed versions.

The model is a causal encoder that writes the prompt (and each committed canvas) into a cache, and a bidirectional
decoder that denoises a canvas of `canvas_length` tokens over that cache: one encoder call per canvas, then one decoder
call per denoising step. `CanvasSteps` hooks both: an encoder call starts a canvas (on an empty cache, a new request),
and each decoder call is the next step of it (the pipeline scheduler's `num_inference_steps`, else `num_steps`;
corrector sweeps count as the last step). Each canvas is its own cache context in the stats ("canvas 0", ...), and
the encoder's calls are recorded apart, as `<name> encoder`.

diffusers 0.42.1's pipeline calls the decoder's `create_diffusion_decoder_attention_mask(..., past_key_values=...)`,
which transformers 5.24.0 names `cache`: a `TypeError` before the first step. `fix_pipeline(pipe)` sets a wrapper on
that decoder instance (mapping the keyword, nothing else) and returns a handle whose `remove()` deletes it, so the
class's own static method shows through again. `accelerate` applies the same fix for as long as it is installed
(dense plans too) unless the pipeline is already fixed, and leaves a fix the user made in place.

>>> from sparsediff.pipelines.diffusion_gemma import fix_pipeline
>>> fix = fix_pipeline(pipe)  # doctest: +SKIP
>>> out = pipe(prompt="Why is the sky blue?", gen_length=256)  # doctest: +SKIP
>>> fix.remove()  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from .compiled_ops import register_site, unregister_site

BUILDER = "create_diffusion_decoder_attention_mask"


def _decoder(pipe_or_model: Any) -> torch.nn.Module | None:
    model = pipe_or_model if isinstance(pipe_or_model, torch.nn.Module) else getattr(pipe_or_model, "model", None)
    decoder = getattr(getattr(model, "model", None), "decoder", None)
    return decoder if hasattr(decoder, BUILDER) else None


def is_diffusion_gemma(model: torch.nn.Module) -> bool:
    """A block-diffusion encoder-decoder laid out as DiffusionGemma is: `model.model.encoder` and a decoder that
    builds its mask with `create_diffusion_decoder_attention_mask`."""
    return _decoder(model) is not None and hasattr(model.model, "encoder")


@dataclass
class MaskBuilderFix:
    """The wrapper `fix_pipeline` set on one decoder (None when it set nothing); `remove()` deletes it."""

    decoder: torch.nn.Module | None = None

    def remove(self) -> None:
        if self.decoder is not None and getattr(vars(self.decoder).get(BUILDER), "_sparsediff_fix", False):
            del vars(self.decoder)[BUILDER]
        self.decoder = None


def _takes_past_key_values(builder) -> bool:
    params = inspect.signature(builder).parameters.values()
    return any(p.name == "past_key_values" or p.kind is p.VAR_KEYWORD for p in params)


def fix_pipeline(pipe_or_model: Any) -> MaskBuilderFix:
    """Let diffusers' `DiffusionGemmaPipeline` call the decoder's mask builder on transformers versions whose builder
    takes `cache=` where the pipeline passes `past_key_values=` (transformers 5.24.0 with diffusers 0.42.1).

    Args:
        pipe_or_model: a `DiffusionGemmaPipeline` or its `DiffusionGemmaForBlockDiffusion`.

    Returns:
        MaskBuilderFix: `.remove()` restores the decoder's own builder. Nothing is set, and removing does nothing, when
        the installed builder already takes `past_key_values` or the decoder already carries a builder of its own.
    """
    decoder = _decoder(pipe_or_model)
    if decoder is None:
        raise ValueError(
            f"fix_pipeline got a {type(pipe_or_model).__name__}, which holds no DiffusionGemma decoder; pass a "
            "DiffusionGemmaPipeline or a DiffusionGemmaForBlockDiffusion."
        )
    original = getattr(decoder, BUILDER)
    if BUILDER in vars(decoder) or _takes_past_key_values(original):
        return MaskBuilderFix()

    @functools.wraps(original)
    def create_mask(*args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            kwargs.setdefault("cache", past_key_values)
        return original(*args, **kwargs)

    create_mask._sparsediff_fix = True
    vars(decoder)[BUILDER] = create_mask  # an instance attribute hides the class's static method, for this decoder only
    return MaskBuilderFix(decoder)


class _Phase:
    """A `begin_call` site: the encoder's or the decoder's side of `CanvasSteps`."""

    def __init__(self, begin):
        self.begin = begin


class CanvasSteps:
    """Step tracking of a DiffusionGemma installation (see the module docstring); `remove()` takes its hooks and the
    mask-builder fix out, `reset()` forgets the current request."""

    def __init__(self, installation):
        self.installation = installation
        inner = installation.model.model
        self.canvas, self.count = -1, 0
        self.fix = fix_pipeline(installation.model)
        phases = (self._encoder_call, self._decoder_call)
        self.sites = [register_site(_Phase(begin)) for begin in phases]
        self.hooks = [
            module.register_forward_pre_hook(functools.partial(self._pre_forward, begin=begin, site=site), with_kwargs=True)
            for module, begin, site in zip((inner.encoder, inner.decoder), phases, self.sites)
        ]

    def _pre_forward(self, module, args, kwargs, begin, site: int) -> None:
        """Under `torch.compile` the call is placed at run time, inside the `sparsediff::begin_call` op."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cached = torch.as_tensor(0 if cache is None else cache.get_seq_length()).reshape(1)  # 0: a new request
        if torch.compiler.is_compiling():
            self.installation.state.token = torch.ops.sparsediff.begin_call(cached, site, [])
            return
        begin(cached)

    def _encoder_call(self, cached, grid=None) -> None:
        inst, state = self.installation, self.installation.state
        if cached is None or int(cached.flatten()[0]) == 0:  # an empty cache: a new request
            inst.log.reset()
            self.canvas = -1
        self.canvas, self.count = self.canvas + 1, 0
        state.model, state.step, state.num_steps = f"{inst.name} encoder", 0, self._num_steps()
        state.context, state.source = f"canvas {self.canvas}", "canvas"
        inst.log.begin_call(state)

    def _decoder_call(self, cached, grid=None) -> None:
        inst, state = self.installation, self.installation.state
        self.canvas = max(self.canvas, 0)  # a decoder called on a cache the user filled
        num_steps = self._num_steps()
        state.model, state.num_steps = inst.name, num_steps
        state.step = self.count if num_steps is None else min(self.count, num_steps - 1)
        state.context, state.source = f"canvas {self.canvas}", "canvas"
        self.count += 1
        inst.log.begin_call(state)

    def _num_steps(self) -> int | None:
        scheduler = getattr(self.installation.pipeline, "scheduler", None)
        return getattr(scheduler, "num_inference_steps", None) or self.installation.num_steps

    def reset(self) -> None:
        self.canvas, self.count = -1, 0

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for site in self.sites:
            unregister_site(site)
        self.fix.remove()
        self.hooks, self.sites = [], []
