"""The one seam between sparsediff and a kind of model: an `Adapter`, registered the way patterns are.

Everything model-specific lives behind this protocol; the core (layout, patterns, plan, runtime) never names a model
family. An adapter knows

- which pipelines or models it serves (`matches`) and their denoisers (`denoisers`: component name -> module),
- what a plan for a denoiser must match (`fingerprint`: class, attention layers, heads, head dim, config hash),
- how it installs itself into a denoiser and out again (`install` -> an `Installation` with `remove()`), which
  includes where a call's token layout and denoising step come from,
- how a search runs the model and scores an output against the dense one (`run`, `quality`, `quality_name`), and
  several calls' scores as one (`combine`, named by `combined`), and
- the plan a model ships with, if any (`shipped_plan`).

`install_all` is the one install loop that `accelerate`, `profile` and the training helpers share: every denoiser
or none (a failure half-way removes what was installed).

Add a kind of model by subclassing `Adapter` and registering an instance with `register_adapter`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol

import torch

from ..plan import ModelFingerprint, SparsePlan

ADAPTERS: dict[str, "Adapter"] = {}


class Installation(Protocol):
    """sparsediff inside one denoiser."""

    name: str
    model: torch.nn.Module

    def remove(self) -> None: ...

    def reset(self) -> None: ...


class Adapter:
    """Base class of adapters; see the module docstring for what each method answers."""

    name: ClassVar[str] = ""
    quality_name: ClassVar[str] = "PSNR"  # what `quality` returns (higher is better), for messages and reports
    quality_unit: ClassVar[str] = "dB"
    profile_output_type: ClassVar[str] = "latent"  # what a profiling run asks the pipeline for (nothing decoded)
    # Whether quality at an intermediate step bounds the final one, so a search may prune a trial as soon as a step
    # falls below the floor (true of a video trajectory, whose errors only accumulate).
    prune_on_steps: ClassVar[bool] = True
    # How `combine` makes one figure of several calls' qualities; a search keeps studies and stored validations of
    # another way apart (names other than "mean" go into their names).
    combined: ClassVar[str] = "mean"

    def matches(self, pipe_or_model: Any) -> bool:
        raise NotImplementedError

    def supported(self) -> str:
        """A phrase naming what the adapter serves, for error messages."""
        raise NotImplementedError

    def denoisers(self, pipe_or_model: Any) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    def fingerprint(self, model: torch.nn.Module) -> ModelFingerprint:
        raise NotImplementedError

    def install(
        self, name: str, model: torch.nn.Module, make_controller: Callable[[int], Any], log: Any,
        pipeline: Any = None, num_steps: int | None = None,
    ) -> Installation:
        raise NotImplementedError

    def is_installed(self, model: torch.nn.Module) -> bool:
        raise NotImplementedError

    def run(self, pipe: Any, call: dict[str, Any], on_step: Callable[[int, torch.Tensor], None] | None = None):
        """One seeded pipeline call (`call` may hold `seed`): `(per-step tensors, final output)` on the CPU."""
        raise NotImplementedError

    def quality(self, output: torch.Tensor, reference: torch.Tensor) -> float:
        """How close `output` is to the dense `reference` (higher is better)."""
        raise NotImplementedError

    def combine(self, qualities: Sequence[float]) -> float:
        """One figure for several calls' `quality` values: here their mean (right for a share, such as agreement)."""
        return sum(qualities) / len(qualities)

    def shipped_plan(self, pipe_or_model: Any) -> SparsePlan | None:
        """The plan the model ships with (sparsediff's own models keep one beside their weights), or None."""
        shipped = getattr(pipe_or_model, "shipped_plan", None)
        return shipped() if callable(shipped) else None


def register_adapter(adapter: Adapter) -> Adapter:
    if not adapter.name or adapter.name in ADAPTERS:
        raise ValueError(f"Adapter name {adapter.name!r} is empty or already registered; give each adapter its own name.")
    ADAPTERS[adapter.name] = adapter
    return adapter


def _load_builtin() -> None:
    from . import diffusers_video, transformers_attention  # noqa: F401  (they register themselves)
    from .reconstruct import adapter  # noqa: F401


def supported() -> str:
    _load_builtin()
    return "; ".join(a.supported() for a in ADAPTERS.values())


def adapter_for(pipe_or_model: Any) -> Adapter:
    """The adapter serving `pipe_or_model`; a ValueError naming what is supported otherwise."""
    _load_builtin()
    for adapter in ADAPTERS.values():
        if adapter.matches(pipe_or_model):
            return adapter
    parts = [f"its {n} is a {type(m).__name__}" for n, m in vars(pipe_or_model).items() if isinstance(m, torch.nn.Module)] \
        if not isinstance(pipe_or_model, torch.nn.Module) and hasattr(pipe_or_model, "__dict__") else []
    inner = f" ({', '.join(parts[:3])})" if parts else ""
    raise ValueError(f"sparsediff has no adapter for {type(pipe_or_model).__name__}{inner}; it supports {supported()}.")


def check_not_installed(adapter: Adapter, name: str, model: torch.nn.Module) -> None:
    if adapter.is_installed(model):
        raise ValueError(
            f"The {name} ({type(model).__name__}) is already accelerated or profiled by sparsediff; call .remove() on "
            "the existing handle first, then accelerate again."
        )


def install_all(
    pipe_or_model: Any,
    make_controller: Callable[[str, int], Any],
    log: Any,
    num_steps: int | None = None,
    names: Sequence[str] | None = None,
) -> list[Installation]:
    """Install sparsediff into every denoiser of `pipe_or_model` (or those in `names`), or into none.

    `make_controller(component name, number of attention layers)` builds what each denoiser's layers consult."""
    adapter = adapter_for(pipe_or_model)
    denoisers = adapter.denoisers(pipe_or_model)
    if names is not None:
        denoisers = {n: m for n, m in denoisers.items() if n in names}
    for name, model in denoisers.items():
        check_not_installed(adapter, name, model)
    pipeline = None if isinstance(pipe_or_model, torch.nn.Module) else pipe_or_model
    done: list[Installation] = []
    try:
        for name, model in denoisers.items():
            make = lambda n, name=name: make_controller(name, n)  # noqa: E731
            done.append(adapter.install(name, model, make, log, pipeline=pipeline, num_steps=num_steps))
    except BaseException:
        for inst in done:
            inst.remove()
        raise
    return done


def fingerprint(model: torch.nn.Module) -> ModelFingerprint:
    """What a plan for the denoiser `model` must match, as its adapter reads it."""
    return adapter_for(model).fingerprint(model)
