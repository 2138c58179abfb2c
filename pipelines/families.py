"""The diffusers video families the diffusers video adapter serves (a registry): where each keeps its video self-attention and how to read its token grid.

A `Family` names a transformer class and knows three things about it:

- which attention modules are the video self-attention (`attn1` of Wan / LTX / CogVideoX / Mochi blocks, `attn` of
  HunyuanVideo's dual- and single-stream blocks); cross-attention (`attn2`) and HunyuanVideo's text-only token
  refiner stay untouched;
- where text joins that attention: CogVideoX puts its text first, HunyuanVideo and Mochi put it after the video,
  Wan and LTX have none (their text enters through cross-attention);
- how to read the latent grid (frames, height, width after patchify) from the transformer's forward inputs.

Layer `i` of a plan is the `i`-th selected module in `model.named_modules()` order (for HunyuanVideo: the dual-stream
blocks, then the single-stream blocks).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Grid = tuple[int, int, int]


def _video_grid(x: torch.Tensor, frames_dim: int, patch: tuple[int, int, int]) -> Grid:
    """(frames, height, width) of a 5-D latent after patchify; `frames_dim` is 2 for (B, C, F, H, W)."""
    frames, height, width = x.shape[frames_dim], x.shape[-2], x.shape[-1]
    pt, ph, pw = patch
    return frames // pt, height // ph, width // pw


def _wan_grid(model, inputs: dict[str, Any]) -> Grid:
    return _video_grid(inputs["hidden_states"], 2, tuple(model.config.patch_size))


def _cogvideox_grid(model, inputs: dict[str, Any]) -> Grid:
    p = model.config.patch_size
    return _video_grid(inputs["hidden_states"], 1, (model.config.patch_size_t or 1, p, p))  # (B, F, C, H, W)


def _hunyuan_grid(model, inputs: dict[str, Any]) -> Grid:
    p = model.config.patch_size
    return _video_grid(inputs["hidden_states"], 2, (model.config.patch_size_t, p, p))


def _mochi_grid(model, inputs: dict[str, Any]) -> Grid:
    p = model.config.patch_size
    return _video_grid(inputs["hidden_states"], 2, (1, p, p))


def _ltx_grid(model, inputs: dict[str, Any]) -> Grid | None:
    # LTX takes packed tokens (B, S, C); the pipeline passes the token grid it packed, which RoPE also uses.
    sizes = (inputs.get("num_frames"), inputs.get("height"), inputs.get("width"))
    return None if any(s is None for s in sizes) else tuple(int(s) for s in sizes)


@dataclass(frozen=True)
class Family:
    """One supported transformer class.

    Args:
        name (str): short family name used in messages and stats.
        transformer (str): the diffusers class name of the denoiser.
        pipelines (tuple[str, ...]): pipeline classes that carry it (for messages).
        attention (str): regular expression matching the module paths of its video self-attention.
        text (str | None): where text joins that attention: "before", "after", or None for video only.
        grid (Callable): `(model, forward inputs by name) -> (frames, height, width)` after patchify, or None.
    """

    name: str
    transformer: str
    pipelines: tuple[str, ...]
    attention: str
    text: str | None
    grid: Callable[[torch.nn.Module, dict[str, Any]], Grid | None]

    def self_attention(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        pattern = re.compile(self.attention)
        return [(name, module) for name, module in model.named_modules() if pattern.fullmatch(name)]

    @staticmethod
    def forward_parameters(model: torch.nn.Module) -> tuple[str, ...]:
        """Names of the transformer's forward parameters after `self`, in order (read once, at install time:
        `inspect` cannot run inside a compiled graph)."""
        return tuple(inspect.signature(type(model).forward).parameters)[1:]

    @staticmethod
    def forward_inputs(parameters: tuple[str, ...], args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The transformer's forward arguments by name, whether passed by position or keyword."""
        return {**dict(zip(parameters, args)), **kwargs}


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add a diffusers video transformer to the ones the diffusers video adapter serves."""
    if family.name in FAMILIES:
        raise ValueError(f"Family {family.name!r} is already registered; give the new family its own name.")
    FAMILIES[family.name] = family
    return family


for _family in (
    Family("wan", "WanTransformer3DModel", ("WanPipeline", "WanImageToVideoPipeline"), r"blocks\.\d+\.attn1", None, _wan_grid),
    Family("cogvideox", "CogVideoXTransformer3DModel", ("CogVideoXPipeline",), r"transformer_blocks\.\d+\.attn1", "before", _cogvideox_grid),
    Family(
        "hunyuan_video",
        "HunyuanVideoTransformer3DModel",
        ("HunyuanVideoPipeline",),
        r"(single_)?transformer_blocks\.\d+\.attn",
        "after",
        _hunyuan_grid,
    ),
    Family("ltx", "LTXVideoTransformer3DModel", ("LTXPipeline",), r"transformer_blocks\.\d+\.attn1", None, _ltx_grid),
    Family("mochi", "MochiTransformer3DModel", ("MochiPipeline",), r"transformer_blocks\.\d+\.attn1", "after", _mochi_grid),
):
    register_family(_family)


def supported() -> str:
    """One sentence-part naming every supported pipeline and transformer."""
    pipes = ", ".join(p for f in FAMILIES.values() for p in f.pipelines)
    models = ", ".join(f.transformer for f in FAMILIES.values())
    return f"the diffusers pipelines {pipes} (Wan 2.1 and 2.2 included) and the bare transformers {models}"


def family_of(model: Any) -> Family | None:
    """The family of a denoiser, matched on its class or a base class (so subclasses keep working)."""
    names = {cls.__name__ for cls in type(model).__mro__}
    return next((f for f in FAMILIES.values() if f.transformer in names), None)
