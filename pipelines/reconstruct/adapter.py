"""The latent-set adapter: sparsediff inside the 4D reconstructor's synchronized deformation denoiser.

The project's own models call the runtime directly: every attention of `DeformationDenoiser` runs through
`LatentAttention`, whose `sparse_site` this adapter sets on the self-attention modules (the space-time attention
over a sequence's latent sets; cross-attention to the shape latents and the condition stays dense). A plan's layer i
is the i-th of them in module order:

- `space_time="joint"`: one call over all T x M latents of a sequence, layout `axis:TxM` (frame-major), where the
  plan's patterns mean what they mean on video: `diagonal` nearby frames, `multi_diagonal` the same latent across
  frames (the original's temporal attention is one such pattern), `vertical_stripe` the first frame;
- `space_time="interleaved"` (the original block): the spatial call over one frame's M latents (`axis:1xM`) and the
  temporal call over one latent's T frames (`axis:Tx1`), each its own layer.

Steps are network evaluations: EDM's Heun sampler evaluates the denoiser twice per step but the last, so a run of N
steps has 2N - 1; a run starts again at the largest noise level. A dense plan leaves every call the model's own.
Quality for the search is the PSNR of the deformation latents against the dense run (meshing every trial would cost
more than the search; `samples/eval_reconstruct.py` reports IoU and Chamfer of the chosen plan).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ...layout import TokenLayout, axis
from ...metrics import psnr
from ...plan import ModelFingerprint
from ...runtime import AttentionStats, Clock
from ..adapter import Adapter, register_adapter
from ..state import CallState, RunLog

SELF_KINDS = ("joint", "spatial", "temporal")


def _denoiser_class():
    from .models import DeformationDenoiser

    return DeformationDenoiser


def self_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if getattr(m, "kind", None) in SELF_KINDS and hasattr(m, "sparse_site")]


@dataclass
class LatentCallState(CallState):
    """One evaluation of the deformation denoiser: T frames of M latents."""

    frames: int = 0
    latents: int = 0

    def layout_of(self, kind: str) -> TokenLayout:
        if kind == "joint":
            return TokenLayout((axis(self.frames, self.latents),))
        if kind == "spatial":
            return TokenLayout((axis(1, self.latents),))
        return TokenLayout((axis(self.frames, 1),))


@dataclass
class Installation:
    name: str
    model: torch.nn.Module
    state: LatentCallState
    controller: Any
    log: RunLog
    pipeline: Any = None
    num_steps: int | None = None
    modules: list[torch.nn.Module] = field(default_factory=list)
    hook: Any = None
    count: int = 0

    def pre_forward(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        scheduler = getattr(self.pipeline, "scheduler", None)
        steps = getattr(scheduler, "num_inference_steps", None)
        if scheduler is not None and steps:
            # c_noise = ln(sigma) / 4: the first evaluation of a run is at sigma_max
            first = math.isclose(float(timestep.flatten()[0]), math.log(float(scheduler.sigmas[0])) / 4, rel_tol=1e-4)
            if first:
                self.count = 0
            evaluations = 2 * steps - 1
        else:
            evaluations = self.num_steps
        step = self.count if evaluations is None else min(self.count, evaluations - 1)
        self.state.step, self.state.num_steps, self.state.source = step, evaluations, "count"
        self.state.frames, self.state.latents = sample.shape[1], sample.shape[2]
        self.count += 1
        self.log.begin_call(self.state)

    def reset(self) -> None:
        self.count = 0

    def remove(self) -> None:
        for module in self.modules:
            module.sparse_site = None
        if self.hook is not None:
            self.hook.remove()


@dataclass
class _Site:
    installation: Installation
    layer: int

    def __call__(self, module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        installation, layer = self.installation, self.layer
        controller, state = installation.controller, installation.state
        start = Clock.start(q.device)
        result = None
        if controller.active(layer, state):
            result = controller.attend(layer, state, q, k, v, [(None, state.layout_of(module.kind))], scale)
        if result is None:
            out, stats = F.scaled_dot_product_attention(q, k, v, scale=scale), AttentionStats()
        else:
            out, stats = result
        stats.timings = [Clock.stop(start)]
        controller.record(state, stats)
        return out


class LatentSetAdapter(Adapter):
    """Adapter for `Motion2VecSetsPipeline` (its deformation denoiser) or a bare `DeformationDenoiser`."""

    name = "latent_sets"

    def supported(self) -> str:
        return "sparsediff's Motion2VecSetsPipeline (its deformation denoiser's space-time attention)"

    def matches(self, pipe_or_model: Any) -> bool:
        cls = _denoiser_class()
        return isinstance(pipe_or_model, cls) or isinstance(getattr(pipe_or_model, "deformation_denoiser", None), cls)

    def denoisers(self, pipe_or_model: Any) -> dict[str, torch.nn.Module]:
        model = pipe_or_model if isinstance(pipe_or_model, torch.nn.Module) else pipe_or_model.deformation_denoiser
        return {"deformation_denoiser": model}

    def fingerprint(self, model: torch.nn.Module) -> ModelFingerprint:
        config = dict(model.config)
        return ModelFingerprint.of(type(model).__name__, len(self_attention_modules(model)), config["heads"],
                                   config["head_dim"], config)

    def is_installed(self, model: torch.nn.Module) -> bool:
        return any(m.sparse_site is not None for m in self_attention_modules(model))

    def install(self, name, model, make_controller, log, pipeline=None, num_steps=None) -> Installation:
        modules = self_attention_modules(model)
        controller = make_controller(len(modules))
        state = LatentCallState(model=name, text=None)
        installation = Installation(name, model, state, controller, log, pipeline, num_steps, modules)
        for layer, module in enumerate(modules):
            module.sparse_site = _Site(installation, layer)
        installation.hook = model.register_forward_pre_hook(installation.pre_forward, with_kwargs=True)
        return installation

    def run(self, pipe, call, on_step=None):
        """One seeded reconstruction to latents: the deformation latents at the end (no per-step outputs: the sampler
        has no step callback, so a search compares final latents only)."""
        kwargs = {k: v for k, v in call.items() if k not in ("seed", "output_type")}
        out = pipe(**kwargs, generator=torch.Generator().manual_seed(call.get("seed", 0)), output_type="latent")
        final = out.deformation_latents.detach().cpu()
        if on_step is not None:
            on_step(0, final)
        return [final], final

    def quality(self, output: torch.Tensor, reference: torch.Tensor) -> float:
        """PSNR of the deformation latents against the dense run's, over the reference's range."""
        return psnr(output, reference)


register_adapter(LatentSetAdapter())
