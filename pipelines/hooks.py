"""The step-tracking hook: before each denoiser forward, record its token grid and the current denoising step.

The step comes from the best signal available, in this order:

1. the pipeline's `CacheContext.step_index` (diffusers >= 0.42 passes it for Wan), with its `num_inference_steps`;
2. the `timestep` argument matched against `pipe.scheduler.timesteps` (nearest value; ties, such as the repeated
   timesteps of second-order schedulers, go to the index after the last one seen in the same cache context);
3. counting the calls made in each cache context ("cond", "uncond", "cond_uncond", or none for a bare model),
   wrapping at `num_steps` when it is known.

The hook is stateful: diffusers resets it at the end of every pipeline call, which forgets the counters and ends
the run in the `RunLog`.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager

from .compiled_ops import register_site, unregister_site
from .families import Family
from .state import CallState, RunLog

HOOK_NAME = "sparsediff"


class _Calls(BaseState):
    """Per cache context: calls counted so far and the last step index given out."""

    def __init__(self):
        self.count = 0
        self.last = -1

    def reset(self) -> None:
        self.count = 0
        self.last = -1


def match_timestep(timestep: "torch.Tensor | float", timesteps: torch.Tensor, expected: int) -> int:
    """Index of `timestep` in the scheduler's `timesteps` (nearest value, ties broken towards `expected`).

    >>> match_timestep(torch.tensor([500.0]), torch.tensor([999.0, 500.0, 500.0, 1.0]), expected=2)
    2
    """
    if torch.is_tensor(timestep):
        timestep = timestep.detach().float().max()  # per-token timesteps (Wan 2.2 TI2V): the noisiest token
    t = float(timestep)
    distance = (timesteps.detach().float().cpu() - t).abs()
    nearest = torch.nonzero(distance <= distance.min() + 1e-6 * max(1.0, abs(t))).flatten()
    return int(nearest[(nearest - expected).abs().argmin()])


class StepTrackingHook(ModelHook):
    """Writes grid, step and cache context of every denoiser call into `state` (which its processors read).

    Args:
        family (Family): the denoiser's family (reads the grid from the forward inputs).
        state (CallState): shared with the denoiser's processors.
        log (RunLog): told where each call belongs, to keep runs apart.
        pipeline (optional): the pipeline, whose scheduler gives the timesteps to match; None for a bare model.
        num_steps (int, optional): steps per run when counting calls (bare models).
    """

    _is_stateful = True

    def __init__(self, family: Family, state: CallState, log: RunLog, pipeline: Any = None, num_steps: int | None = None):
        super().__init__()
        self.family = family
        self.state = state
        self.log = log
        self.pipeline = pipeline
        self.num_steps = num_steps
        self.contexts = StateManager(_Calls)  # diffusers' cache_context() sets the pipeline's CacheContext here
        self._outside = _Calls()  # calls made outside any cache context
        self.site = register_site(self)
        self.parameters: tuple[str, ...] = ()  # the model's forward parameters, set by `initialize_hook`

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.parameters = self.family.forward_parameters(module)
        return module

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        inputs = self.family.forward_inputs(self.parameters, args, kwargs)
        grid = self.family.grid(module, inputs)  # shapes only: constant in a compiled graph
        timestep = inputs.get("timestep")
        if torch.compiler.is_compiling():  # the step is found at run time, in an op (see compiled_ops.py)
            t = timestep if torch.is_tensor(timestep) else torch.tensor([] if timestep is None else [float(timestep)])
            self.state.token = torch.ops.sparsediff.begin_call(t, self.site, list(grid) if grid else [])
        else:
            self.begin(timestep, grid)
        return args, kwargs

    def begin(self, timestep, grid) -> None:
        """Record one denoiser call: its token grid, cache context and denoising step."""
        context: CacheContext | None = self.contexts._context
        self.state.grid = grid
        self.state.context = context.name if context is not None else None
        self.state.step, self.state.num_steps, self.state.source = self._locate(context, timestep)
        self.log.begin_call(self.state)

    def remove(self) -> None:
        unregister_site(self.site)

    def _locate(self, context: CacheContext | None, timestep) -> tuple[int, int | None, str]:
        calls = self.contexts.get_state() if context is not None else self._outside
        timesteps = getattr(getattr(self.pipeline, "scheduler", None), "timesteps", None)
        if context is not None and context.step_index is not None:
            num = context.num_inference_steps or (len(timesteps) if timesteps is not None else self.num_steps)
            step, source = context.step_index, "cache_context"
        elif timesteps is not None and len(timesteps) > 0 and timestep is not None:
            step, num, source = match_timestep(timestep, timesteps, calls.last + 1), len(timesteps), "timestep"
        else:
            num = self.num_steps
            step, source = (calls.count % num if num else calls.count), "count"
        calls.count += 1
        calls.last = step
        return step, num, source

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.contexts.reset()
        self._outside.reset()
        self.log.end_run()
        return module
