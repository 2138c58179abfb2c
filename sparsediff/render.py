"""Pictures of what sparsediff does: a pattern's mask on a layout, and a plan as a layer x head grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .layout import TokenLayout
from .patterns import PATTERNS, Pattern
from .plan import SparsePlan

# One colour per pattern kind (RGB), shared by every figure so a plan reads the same everywhere.
KIND_COLOURS = {
    "full": (64, 64, 64),
    "skip": (245, 245, 245),
    "diagonal": (31, 119, 180),
    "multi_diagonal": (44, 160, 44),
    "vertical_stripe": (255, 127, 14),
    "topk_blocks": (148, 103, 189),
}


def kind_colour(kind: str) -> tuple[int, int, int]:
    if kind in KIND_COLOURS:
        return KIND_COLOURS[kind]
    rng = np.random.default_rng(sorted(PATTERNS).index(kind) if kind in PATTERNS else 0)
    return tuple(int(c) for c in rng.integers(0, 200, 3))


def render_pattern(
    pattern: Pattern,
    layout: TokenLayout,
    out: "str | Path",
    block_size: int | None = None,
    scale: int = 1,
    scores: torch.Tensor | None = None,
) -> Path:
    """Write the token mask (or, with `block_size`, the block mask) as a PNG of `scale` pixels per cell.
    Allowed pairs are drawn in the pattern's colour on white. Image size: (cells * scale) square."""
    if pattern.needs_scores and scores is None:
        n = layout.num_blocks(block_size or 64)
        scores = torch.rand((n, n), generator=torch.Generator().manual_seed(0))  # an illustrative draw
        block_size = block_size or 64
    if block_size is not None:
        mask = pattern.block_mask(layout, block_size, scores)
    else:
        mask = pattern.token_mask(layout, None, scores)
    img = np.full((*mask.shape, 3), 255, dtype=np.uint8)
    img[mask.numpy()] = kind_colour(pattern.kind)
    if scale > 1:
        img = img.repeat(scale, axis=0).repeat(scale, axis=1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(out)
    return out


def render_plan(plan: SparsePlan, out: "str | Path", layout: TokenLayout | None = None, dpi: int = 100) -> Path:
    """Write a plan as one layer x head grid per step range, coloured by pattern kind, with each layer's
    density on the right (on `layout`, default the plan's calibration layout or video:8x32x32)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if layout is None:
        layout = TokenLayout.parse(plan.layout or "video:8x32x32")
    n_ranges, L, H = len(plan.ranges), plan.model.num_layers, plan.model.num_heads
    fig, axes = plt.subplots(1, n_ranges, figsize=(plan_figure_width(plan), 4.8), dpi=dpi, squeeze=False)
    kinds_used = set()
    for ax, r in zip(axes[0], plan.ranges):
        img = np.zeros((L, H, 3), dtype=np.uint8)
        for li, layer in enumerate(r.layers):
            for hi, p in enumerate(layer):
                kind = "full" if li in plan.dense_layers else p.kind
                kinds_used.add(kind)
                img[li, hi] = kind_colour(kind)
        ax.imshow(img, aspect="auto", interpolation="nearest")
        ax.set_title(f"progress [{r.start:.2f}, {r.end:.2f})", fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        densities = plan.layer_densities(layout, (r.start + r.end) / 2)
        for li, d in enumerate(densities):
            ax.text(H - 0.4, li, f" {d:.2f}", va="center", ha="left", fontsize=7, clip_on=False)
    handles = [Patch(color=np.array(kind_colour(k)) / 255, label=k) for k in sorted(kinds_used)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    fig.suptitle(
        f"{plan.model.model_class}: dense steps {plan.dense_steps}, block {plan.block_size}, density on {layout}",
        fontsize=9,
    )
    fig.subplots_adjust(bottom=0.2, right=0.9, wspace=0.4)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def plan_figure_width(plan: SparsePlan) -> float:
    return 1.0 + 3.5 * len(plan.ranges)
