"""Plugging into a denoiser and out again: swap its video self-attention processors, register the step hook.

`find_denoisers` picks what to accelerate (a pipeline's `transformer`, plus `transformer_2` for Wan 2.2 A14B, or a
bare transformer), `install` wraps one denoiser, and `Installation.remove()` puts back the very processor objects
and hooks it found.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry

from .families import Family, family_of, supported
from .hooks import HOOK_NAME, StepTrackingHook
from .processor import SparseAttnProcessor, wrap_processor
from .state import CallState, RunLog

DENOISER_COMPONENTS = ("transformer", "transformer_2")


def find_denoisers(pipe_or_model: Any) -> dict[str, tuple[torch.nn.Module, Family]]:
    """`{component name: (denoiser, family)}`; a bare model is named "transformer". Raises for anything else."""
    if isinstance(pipe_or_model, torch.nn.Module):
        found = {"transformer": pipe_or_model}
    else:
        found = {name: getattr(pipe_or_model, name) for name in DENOISER_COMPONENTS if getattr(pipe_or_model, name, None) is not None}
    what = type(pipe_or_model).__name__
    if not found:
        raise ValueError(f"{what} has no `transformer` denoiser that sparsediff can accelerate; it supports {supported()}.")
    out = {}
    for name, model in found.items():
        family = family_of(model)
        if family is None:
            inner = "" if model is pipe_or_model else f" (its {name} is a {type(model).__name__})"
            raise ValueError(f"sparsediff has no adapter for {what}{inner}; it supports {supported()}.")
        out[name] = (model, family)
    return out


def check_not_installed(name: str, model: torch.nn.Module) -> None:
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(HOOK_NAME) is not None:
        raise ValueError(
            f"The {name} ({type(model).__name__}) is already accelerated or profiled by sparsediff; call .remove() on "
            "the existing handle first, then accelerate again."
        )


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

    def remove(self) -> None:
        for module, processor in self.processors:
            module.processor = processor.restore()
        registry = HookRegistry.check_if_exists_or_initialize(self.model)
        registry.remove_hook(HOOK_NAME, recurse=False)
        if not registry.hooks and not self.had_forward:
            vars(self.model).pop("forward", None)  # remove_hook leaves the bound method as an instance attribute
        if self.created_registry and not registry.hooks:
            del self.model._diffusers_hook

    def reset(self) -> None:
        self.hook.reset_state(self.model)


def install(
    name: str,
    model: torch.nn.Module,
    family: Family,
    make_controller: Callable[[int], Any],
    log: RunLog,
    pipeline: Any = None,
    num_steps: int | None = None,
) -> Installation:
    """Wrap the video self-attention processors of `model` and register its step-tracking hook.

    `make_controller(num_layers)` builds the controller its processors consult (see `controllers.py`)."""
    check_not_installed(name, model)
    layers = family.self_attention(model)
    controller = make_controller(len(layers))
    state = CallState(model=name, text=family.text)
    processors = []
    for index, (_, module) in enumerate(layers):
        processor = wrap_processor(module.processor, index, state, controller)
        module.processor = processor  # plain assignment: MochiAttention has no set_processor
        processors.append((module, processor))
    created, had_forward = not hasattr(model, "_diffusers_hook"), "forward" in vars(model)
    hook = StepTrackingHook(family, state, log, pipeline=pipeline, num_steps=num_steps)
    HookRegistry.check_if_exists_or_initialize(model).register_hook(hook, HOOK_NAME)
    return Installation(name, model, family, state, hook, processors, created, had_forward)
