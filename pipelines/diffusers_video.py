"""The diffusers video adapter: WanPipeline (2.1 and 2.2), CogVideoX, HunyuanVideo, LTX-Video, Mochi and their transformers.

Each video self-attention layer (`families.py` says which, per family) gets a `SparseAttnProcessor` wrapping the
processor it had, and each denoiser a `StepTrackingHook` (`hooks.py`) that writes the call's token grid and denoising
step before every forward. `Installation.remove()` puts back the very processor objects and hooks it found.

A search runs the pipeline with a seeded generator, keeps the latents after every step through
`callback_on_step_end`, and scores a run by the PSNR of its frames (or latents) against the dense run.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry

from ..metrics import pooled_psnr, psnr
from ..plan import ModelFingerprint
from .adapter import Adapter, register_adapter
from .families import Family, family_of, supported
from .hooks import HOOK_NAME, StepTrackingHook
from .processor import SparseAttnProcessor, wrap_processor
from .state import CallState, RunLog

DENOISER_COMPONENTS = ("transformer", "transformer_2")


@dataclass
class Installation:
    """sparsediff inside one denoiser: its processors, its hook and the state they share."""

    name: str
    model: torch.nn.Module
    family: Family
    state: CallState
    hook: StepTrackingHook
    processors: list[tuple[torch.nn.Module, SparseAttnProcessor]]
    created_registry: bool
    had_forward: bool  # whether `model.forward` was an instance attribute before (another hook's)
    scheduler: Any = None  # the pipeline's scheduler whose set_timesteps this installation guards

    def remove(self) -> None:
        if self.scheduler is not None:
            vars(self.scheduler).pop("set_timesteps", None)
        for module, processor in self.processors:
            module.processor = processor.restore()
        if self.hook is not None:
            self.hook.remove()
        registry = HookRegistry.check_if_exists_or_initialize(self.model)
        if registry.get_hook(HOOK_NAME) is not None:
            registry.remove_hook(HOOK_NAME, recurse=False)
        if not registry.hooks and not self.had_forward:
            vars(self.model).pop("forward", None)  # remove_hook leaves the bound method as an instance attribute
        if self.created_registry and not registry.hooks:
            del self.model._diffusers_hook

    def reset(self) -> None:
        self.hook.reset_state(self.model)


def _guard_steps(pipeline: Any) -> Any:
    """Refuse a run of no denoising steps: the denoiser is then never called, so nothing else would notice, and the
    pipeline would return its starting noise. Guards `pipeline.scheduler.set_timesteps` (an instance attribute,
    removed by `remove()`); returns the scheduler guarded, or None (a bare model, or one already guarded)."""
    scheduler = getattr(pipeline, "scheduler", None)
    if scheduler is None or "set_timesteps" in vars(scheduler) or not hasattr(scheduler, "set_timesteps"):
        return None
    own = scheduler.set_timesteps
    signature = inspect.signature(own)

    @functools.wraps(own)  # pipelines read its parameters (retrieve_timesteps checks for `sigmas`)
    def set_timesteps(*args, **kwargs):
        steps = signature.bind_partial(*args, **kwargs).arguments.get("num_inference_steps")
        if isinstance(steps, int) and steps <= 0:
            raise ValueError(f"num_inference_steps={steps}: an accelerated pipeline needs at least one denoising step; "
                             "pass num_inference_steps=1 or more.")
        return own(*args, **kwargs)

    scheduler.set_timesteps = set_timesteps
    return scheduler


def _uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    """The module a `torch.compile` wrapper holds (sparsediff installs into it; the wrapper recompiles once)."""
    return getattr(model, "_orig_mod", model)


class DiffusersVideoAdapter(Adapter):
    """Adapter for the diffusers video families in `families.FAMILIES` (a registry of their own)."""

    name = "diffusers_video"
    combined = "pooled"  # `combine`: the PSNR of all calls' outputs together

    def supported(self) -> str:
        return supported()

    def matches(self, pipe_or_model: Any) -> bool:
        if isinstance(pipe_or_model, torch.nn.Module):
            return family_of(_uncompiled(pipe_or_model)) is not None
        found = [getattr(pipe_or_model, n, None) for n in DENOISER_COMPONENTS]
        return any(m is not None and family_of(_uncompiled(m)) is not None for m in found)

    def denoisers(self, pipe_or_model: Any) -> dict[str, torch.nn.Module]:
        """`{component name: denoiser}`: a pipeline's `transformer`, plus `transformer_2` for Wan 2.2 A14B; a bare
        model is named "transformer"."""
        if isinstance(pipe_or_model, torch.nn.Module):
            found = {"transformer": _uncompiled(pipe_or_model)}
        else:
            found = {n: _uncompiled(getattr(pipe_or_model, n)) for n in DENOISER_COMPONENTS
                     if getattr(pipe_or_model, n, None) is not None}
        for name, model in found.items():
            if family_of(model) is None:
                inner = "" if model is pipe_or_model else f" (its {name} is a {type(model).__name__})"
                raise ValueError(f"sparsediff has no adapter for {type(pipe_or_model).__name__}{inner}; it supports {supported()}.")
        return found

    def fingerprint(self, model: torch.nn.Module) -> ModelFingerprint:
        """Class, number of video self-attention layers, heads, head dim and config hash.

        >>> from diffusers import WanTransformer3DModel
        >>> m = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=12, text_dim=32, ffn_dim=32, num_layers=2)
        >>> fp = DiffusersVideoAdapter().fingerprint(m)
        >>> fp.model_class, fp.num_layers, fp.num_heads, fp.head_dim
        ('WanTransformer3DModel', 2, 2, 12)
        """
        family = family_of(model)
        if family is None:
            raise ValueError(f"{type(model).__name__} is not a supported denoiser; sparsediff supports {supported()}.")
        layers = family.self_attention(model)
        first = layers[0][1]
        return ModelFingerprint.of(type(model).__name__, len(layers), first.heads, first.to_q.out_features // first.heads,
                                   dict(model.config))

    def is_installed(self, model: torch.nn.Module) -> bool:
        registry = getattr(model, "_diffusers_hook", None)
        return registry is not None and registry.get_hook(HOOK_NAME) is not None

    def install(
        self, name: str, model: torch.nn.Module, make_controller: Callable[[int], Any], log: RunLog,
        pipeline: Any = None, num_steps: int | None = None,
    ) -> Installation:
        """Wrap the video self-attention processors of `model` and register its step-tracking hook."""
        family = family_of(model)
        layers = family.self_attention(model)
        controller = make_controller(len(layers))
        state = CallState(model=name, text=family.text)
        processors = []
        for index, (_, module) in enumerate(layers):
            processor = wrap_processor(module.processor, index, state, controller)
            module.processor = processor  # plain assignment: MochiAttention has no set_processor
            processors.append((module, processor))
        created, had_forward = not hasattr(model, "_diffusers_hook"), "forward" in vars(model)
        installation = Installation(name, model, family, state, None, processors, created, had_forward)
        try:
            installation.hook = StepTrackingHook(family, state, log, pipeline=pipeline, num_steps=num_steps)
            HookRegistry.check_if_exists_or_initialize(model).register_hook(installation.hook, HOOK_NAME)
            installation.scheduler = _guard_steps(pipeline)
        except BaseException:
            installation.remove()
            raise
        return installation

    def run(self, pipe: Any, call: dict[str, Any], on_step: Callable[[int, torch.Tensor], None] | None = None):
        kwargs = dict(call)
        seed = kwargs.pop("seed", 0)
        kwargs.setdefault("output_type", "np")
        steps: list[torch.Tensor] = []

        def callback(pipe, i, t, tensors):
            latents = tensors["latents"].detach().float().cpu().clone()  # a copy: a pipeline may update latents in place
            steps.append(latents)
            if on_step is not None:
                on_step(i, latents)
            return tensors

        out = pipe(
            **kwargs,
            generator=torch.Generator().manual_seed(seed),
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=["latents"],
        )
        frames = out.frames if hasattr(out, "frames") else out[0]
        return steps, torch.as_tensor(frames).float().cpu()

    def quality(self, output: torch.Tensor, reference: torch.Tensor) -> float:
        """PSNR in dB, the peak being the reference's data range (frames or latents alike)."""
        return psnr(output, reference)

    def combine(self, qualities: Sequence[float]) -> float:
        """The PSNR of the calls' outputs together (`pooled_psnr`), as `sparsediff demo` measures its prompts: a mean
        of dB values would let a prompt the plan keeps well make up for one it spoils (a search at a mean of 28.7 dB on
        eight held-out prompts gave plans 27.4-28.7 dB on the demo's three)."""
        return pooled_psnr(qualities)


register_adapter(DiffusersVideoAdapter())
