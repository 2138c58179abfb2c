"""Pictures of what sparsediff does: a pattern's mask on a layout, and a plan as a layer x head grid."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .layout import TokenLayout
from .patterns import PATTERNS, Pattern
from .plan import SparsePlan

logger = logging.getLogger(__name__)

# One colour per pattern kind (RGB), shared by every figure so a plan reads the same everywhere.
KIND_COLOURS = {
    "full": (64, 64, 64),
    "skip": (245, 245, 245),
    "diagonal": (31, 119, 180),
    "multi_diagonal": (44, 160, 44),
    "vertical_stripe": (255, 127, 14),
    "topk_blocks": (148, 103, 189),
}


def _write_atomic(out: "str | Path", save: Callable[[Path], None]) -> Path:
    """Call `save(tmp)` on a temporary name beside `out`, then rename it to `out`: an interrupted write leaves an
    existing file as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    try:
        save(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def aligned_rows(rows: "list[tuple[str, str]]") -> str:
    """`label  value` lines with the values in one column: the demo tables (video, text, reconstruction)."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def kind_colour(kind: str) -> tuple[int, int, int]:
    if kind in KIND_COLOURS:
        return KIND_COLOURS[kind]
    rng = np.random.default_rng(sorted(PATTERNS).index(kind) if kind in PATTERNS else 0)
    return tuple(int(c) for c in rng.integers(0, 200, 3))


# A mask wider than this many cells is drawn downsampled: each pixel shows whether any pair in its square of cells
# is allowed, so a real-size layout (Wan 720p: 75600 tokens, a 46 GB token mask) draws without the S x S mask.
MAX_MASK_CELLS = 2048
# A downsampled token mask in another order than the pattern's kernel order visits every token pair (in row
# chunks); past this many tokens the block mask in kernel order is drawn instead, with a warning.
MAX_POOLED_TOKENS = 1 << 15
# Tokens of a layout that can be drawn at all (its per-token tables alone take O(S) memory).
MAX_LAYOUT_TOKENS = 1 << 24
# Blocks per side of a score-dependent block mask (its scores are an (n, n) tensor).
MAX_SCORED_BLOCKS = 1 << 14
# Blocks per side up to which `sparsediff show` reports a block mask's density (it needs the whole block mask).
MAX_DENSITY_BLOCKS = 1 << 12
# Pixels per side of the written PNG (a 8192 x 8192 RGB image is 200 MB in memory).
MAX_IMAGE_SIDE = 8192


def _any_pool(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(ceil(r / factor), ceil(c / factor)) bool: whether any cell of each factor x factor square is set."""
    r, c = mask.shape
    mask = torch.nn.functional.pad(mask, (0, (-c) % factor, 0, (-r) % factor))
    return mask.view(mask.shape[0] // factor, factor, mask.shape[1] // factor, factor).any(dim=3).any(dim=1)


def _pooled_token_mask(pattern: Pattern, layout: TokenLayout, factor: int, scores: torch.Tensor | None) -> torch.Tensor:
    """`_any_pool(pattern.token_mask(layout), factor)` without the S x S mask: rows in chunks, layout order."""
    S = layout.num_tokens
    order = pattern.order(layout)
    position = order.argsort() if order is not None else None  # where each layout token sits in kernel order
    rows_per_chunk = max(1, (1 << 24) // (S * factor)) * factor
    out = torch.empty((-(-S // factor), -(-S // factor)), dtype=torch.bool)
    for start in range(0, S, rows_per_chunk):
        rows = torch.arange(start, min(start + rows_per_chunk, S))
        if position is None:
            chunk = pattern.token_rows(layout, rows, None, scores)
        else:
            chunk = pattern.token_rows(layout, position[rows], None, scores)[:, position]
        pooled = _any_pool(chunk, factor)
        out[start // factor : start // factor + pooled.shape[0]] = pooled
    return out


def pattern_image_mask(
    pattern: Pattern, layout: TokenLayout, block_size: int | None = None, scores: torch.Tensor | None = None
) -> torch.Tensor:
    """The bool mask `render_pattern` draws: the token mask (or, with `block_size`, the block mask), downsampled by
    any() to at most `MAX_MASK_CELLS` per side. Large sizes are drawn without building the full mask."""
    if layout.num_tokens > MAX_LAYOUT_TOKENS:
        raise ValueError(
            f"Layout {str(layout)!r} has {layout.num_tokens} tokens, over the limit of {MAX_LAYOUT_TOKENS} that can be "
            "drawn; pass a smaller --layout."
        )
    if pattern.needs_scores and scores is None:
        block_size = block_size or 64
        n = layout.num_blocks(block_size)
        if n > MAX_SCORED_BLOCKS:
            raise ValueError(
                f"Layout {str(layout)!r} has {n} blocks of {block_size} tokens per side, over the limit of "
                f"{MAX_SCORED_BLOCKS} for {pattern.name!r}, whose mask needs an {n} x {n} score table; pass a larger "
                "--block-size or a smaller --layout."
            )
        scores = torch.rand((n, n), generator=torch.Generator().manual_seed(0))  # an illustrative draw
    if block_size is not None:
        n = layout.num_blocks(block_size)
        if n <= MAX_MASK_CELLS:
            return pattern.block_mask(layout, block_size, scores)
        factor = -(-n // MAX_MASK_CELLS)
        if scores is not None:
            if n > MAX_SCORED_BLOCKS:
                raise ValueError(
                    f"Layout {str(layout)!r} has {n} blocks of {block_size} tokens per side, over the limit of "
                    f"{MAX_SCORED_BLOCKS} for {pattern.name!r}; pass a larger --block-size or a smaller --layout."
                )
            return _any_pool(pattern.block_mask(layout, block_size, scores), factor)
        # any() over factor x factor blocks is the block mask of blocks factor times as large
        return pattern.block_mask(layout, block_size * factor)
    S = layout.num_tokens
    if S <= MAX_MASK_CELLS:
        return pattern.token_mask(layout, None, scores)
    factor = -(-S // MAX_MASK_CELLS)
    if pattern.order(layout) is None and scores is None:
        # kernel order is the layout's, so any() over factor x factor tokens is the block mask at that block size
        return pattern.block_mask(layout, factor)
    if S <= MAX_POOLED_TOKENS:
        return _pooled_token_mask(pattern, layout, factor, scores)
    if scores is not None:
        raise ValueError(
            f"Layout {str(layout)!r} has {S} tokens, over the limit of {MAX_POOLED_TOKENS} for drawing {pattern.name!r} "
            "with scores as a token mask; pass a block_size to draw its block mask instead."
        )
    logger.warning(
        "%s on %s (%d tokens) is drawn as its block mask in kernel order, %d tokens per pixel: its token mask in the "
        "layout's order would visit all %d token pairs (over %d tokens); pass --block-size to choose the block size.",
        pattern.name, layout, S, factor, S * S, MAX_POOLED_TOKENS,
    )
    return pattern.block_mask(layout, factor)


def render_pattern(
    pattern: Pattern,
    layout: TokenLayout,
    out: "str | Path",
    block_size: int | None = None,
    scale: int = 1,
    scores: torch.Tensor | None = None,
) -> Path:
    """Write the token mask (or, with `block_size`, the block mask) as a PNG of `scale` pixels per cell.
    Allowed pairs are drawn in the pattern's colour on white. Image size: (cells * scale) square, where a mask of
    more than `MAX_MASK_CELLS` cells per side is downsampled (a pixel is set when any pair it covers is allowed);
    an image over `MAX_IMAGE_SIDE` pixels per side is refused before anything is computed."""
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise ValueError(f"scale={scale!r} must be a whole number of pixels per cell, 1 or more (--scale).")
    cells = layout.num_blocks(block_size or (64 if pattern.needs_scores and scores is None else 1))
    if cells > MAX_MASK_CELLS:
        cells = -(-cells // -(-cells // MAX_MASK_CELLS))
    if cells * scale > MAX_IMAGE_SIDE:
        raise ValueError(
            f"The image would be {cells * scale} x {cells * scale} pixels ({cells} cells x scale {scale}), over the "
            f"limit of {MAX_IMAGE_SIDE} pixels per side; pass --scale {max(1, MAX_IMAGE_SIDE // cells)} or less."
        )
    mask = pattern_image_mask(pattern, layout, block_size, scores)
    img = np.full((*mask.shape, 3), 255, dtype=np.uint8)
    img[mask.numpy()] = kind_colour(pattern.kind)
    if scale > 1:
        img = img.repeat(scale, axis=0).repeat(scale, axis=1)
    return _write_atomic(out, Image.fromarray(img).save)


def render_plan(plan: SparsePlan, out: "str | Path", layout: TokenLayout | None = None, dpi: int = 100) -> Path:
    """Write a plan as one layer x head grid per step range, coloured by pattern kind, with each layer's
    density on the right (on `layout`, default the plan's calibration layout or video:8x32x32)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if layout is None:
        layout = TokenLayout.parse(plan.layout or "video:8x32x32")
    n_ranges, H = len(plan.ranges), plan.model.num_heads
    fig = Figure(figsize=(plan_figure_width(plan), 4.8), dpi=dpi)
    axes = fig.subplots(1, n_ranges, squeeze=False)
    kinds_used = set()
    for ax, r in zip(axes[0], plan.ranges):
        img, kinds = plan_grid(plan, r)
        kinds_used |= kinds
        ax.imshow(img, aspect="auto", interpolation="nearest")
        _integer_ticks(ax, img)
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
    return _write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=dpi))


def plan_grid(plan: SparsePlan, step_range) -> tuple[np.ndarray, set[str]]:
    """(L, H, 3) uint8 image of one step range's patterns, coloured by kind (dense layers as `full`), and the
    kinds it shows."""
    img = np.zeros((plan.model.num_layers, plan.model.num_heads, 3), dtype=np.uint8)
    kinds = set()
    for li, layer in enumerate(step_range.layers):
        for hi, p in enumerate(layer):
            kind = "full" if li in plan.dense_layers else p.kind
            kinds.add(kind)
            img[li, hi] = kind_colour(kind)
    return img, kinds


def _integer_ticks(ax, img: np.ndarray) -> None:
    """Layer and head numbers as whole ticks (at most ~16 per axis)."""
    rows, cols = img.shape[:2]
    ax.set_yticks(range(0, rows, max(1, rows // 16)))
    ax.set_xticks(range(0, cols, max(1, cols // 16)))


def plan_figure_width(plan: SparsePlan) -> float:
    return 1.0 + 3.5 * len(plan.ranges)


def _pick(values: list[int], chosen: "list[int] | None", what: str) -> list[int]:
    if chosen is None:
        return sorted({values[0], values[len(values) // 2], values[-1]}) if what == "layers" else sorted({values[0], values[-1]})
    missing = [v for v in chosen if v not in values]
    if missing:
        raise ValueError(f"The profile has no {what} {missing}; it recorded {what} {values}.")
    return list(chosen)


def render_profile(
    profile,
    out: "str | Path",
    layers: "list[int] | None" = None,
    steps: "list[int] | None" = None,
    max_heads: int = 16,
    dpi: int = 100,
    force: bool = True,
) -> tuple[Path, Path]:
    """Write a profile (`sparsediff.search.profile.AttentionProfile`) as three PNGs.

    `out`: per-head block attention maps (log10 of the mass, query blocks down, key blocks across), one row per
    chosen (step, layer), one column per head (the first `max_heads`); by default the first, middle and last
    layers at the first and last recorded steps. `<out stem>_errors.png`: the error table as a heatmap, one row
    per (layer, head), one column per candidate, the relative L2 error averaged over the chosen steps (0..1).
    `<out stem>_preferred.png`: what each head became (`render_head_preferences`). With `force=False` an existing
    file at any of the paths is refused (ValueError) before anything is drawn.
    """
    from matplotlib.figure import Figure

    layers = _pick(profile.layers, layers, "layers")
    steps = _pick(profile.steps, steps, "steps")
    out = Path(out)
    errors_out = out.with_name(f"{out.stem}_errors{out.suffix}")
    existing = [repr(str(p)) for p in (out, errors_out) if p.exists()]
    if existing and not force:
        verb = "exists" if len(existing) == 1 else "exist"
        raise ValueError(f"{' and '.join(existing)} already {verb}; pass --force to overwrite, or choose another --out.")
    preferred_out = out.with_name(f"{out.stem}_preferred{out.suffix}")
    if preferred_out.exists() and not force:
        raise ValueError(f"{str(preferred_out)!r} already exists; pass --force to overwrite, or choose another --out.")
    heads = min(profile.num_heads, max_heads)
    rows = [(s, l) for s in steps for l in layers]
    fig = Figure(figsize=(max(5.0, 1.0 + 1.2 * heads), 0.6 + 1.2 * len(rows)), dpi=dpi)
    axes = fig.subplots(len(rows), heads, squeeze=False)
    for r, (step, layer) in enumerate(rows):
        mass = profile.mass[profile.steps.index(step), profile.layers.index(layer)]  # (H, nq, nk)
        for h in range(heads):
            ax = axes[r, h]
            ax.imshow(torch.log10(mass[h] + 1e-6).numpy(), cmap="magma", vmin=-4, vmax=0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(f"step {step}\nlayer {layer}", fontsize=8)
    fig.suptitle(
        f"{profile.model.model_class}\nblock attention mass (log10) on {profile.layout}, {profile.mass_block_size}-token blocks",
        fontsize=9,
    )
    fig.subplots_adjust(top=1 - 0.9 / (0.6 + 1.2 * len(rows)))
    _write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=dpi))

    t = [profile.steps.index(s) for s in steps]
    errors = profile.errors[t].nanmean(dim=0).flatten(0, 1)  # (L * H, C)
    n_rows = errors.shape[0]
    fig = Figure(figsize=(2.5 + 0.5 * len(profile.candidates), 1.5 + min(0.12 * n_rows, 40)), dpi=dpi)
    ax = fig.subplots()
    image = ax.imshow(errors.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(profile.candidates)), profile.candidates, rotation=60, ha="right", fontsize=7)
    H = profile.num_heads
    ax.set_yticks([i * H for i in range(len(profile.layers))], [f"layer {l}" for l in profile.layers], fontsize=7)
    ax.set_title(f"relative L2 error vs full attention, steps {steps} (rows: layer x head)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    _write_atomic(errors_out, lambda tmp: fig.savefig(tmp, dpi=dpi))
    render_head_preferences(profile, preferred_out, dpi=dpi)
    return out, errors_out, preferred_out


def head_preferences(profile, tolerance: float = 0.1) -> torch.Tensor:
    """(steps, layers, heads) index into `profile.candidates` of each head's cheapest candidate (by block density on
    the profile's layout) whose relative L2 error is at most `tolerance` at that recorded step; -1 where none is
    (a profile without `full` among its candidates)."""
    from .patterns import get_pattern

    density = torch.tensor([get_pattern(c).estimated_density(profile.layout, profile.block_size) for c in profile.candidates])
    order = torch.argsort(density, stable=True)  # cheapest first
    fits = (profile.errors <= tolerance)[..., order]  # (T, L, H, C) in cheapest-first order
    first = torch.where(fits.any(dim=-1), fits.to(torch.int8).argmax(dim=-1), torch.full(fits.shape[:-1], -1))
    return torch.where(first >= 0, order[first.clamp(min=0)], first)


def render_head_preferences(profile, out: "str | Path", tolerance: float = 0.1, dpi: int = 100) -> Path:
    """What each head became: for every (layer, head) row and recorded step column, the cheapest candidate within
    `tolerance` relative L2 error (`head_preferences`), coloured by its kind and labelled with its parameters."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from .patterns import get_pattern

    chosen = head_preferences(profile, tolerance)  # (T, L, H)
    T, L, H = chosen.shape
    grid = chosen.permute(1, 2, 0).reshape(L * H, T)  # rows layer x head, columns steps
    image = np.full((L * H, T, 3), 255, dtype=np.uint8)
    used = sorted({int(i) for i in grid.flatten().tolist() if i >= 0})
    for i in used:
        image[(grid == i).numpy()] = kind_colour(get_pattern(profile.candidates[i]).kind)
    fig = Figure(figsize=(2.5 + 0.45 * T, 1.6 + 0.22 * L * H), dpi=dpi)
    ax = fig.subplots()
    ax.imshow(image, aspect="auto", interpolation="nearest")
    for r in range(L * H):
        for c in range(T):
            i = int(grid[r, c])
            name = profile.candidates[i] if i >= 0 else "none"
            short = name.replace("multi_diagonal_", "md ").replace("diagonal_", "d ").replace("vertical_stripe_", "vs ").replace("topk_blocks_", "tk ")
            ax.text(c, r, short, ha="center", va="center", fontsize=5)
    ax.set_xticks(range(T), [str(s) for s in profile.steps], fontsize=7)
    ax.set_xlabel("denoising step")
    ax.set_yticks([l * H for l in range(L)], [f"layer {profile.layers[l]}" for l in range(L)], fontsize=7)
    for l in range(1, L):
        ax.axhline(l * H - 0.5, color="black", linewidth=0.8)
    handles = [Patch(color=np.asarray(kind_colour(get_pattern(profile.candidates[i]).kind)) / 255, label=profile.candidates[i]) for i in used]
    ax.legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"each head's cheapest pattern within {tolerance:g} relative L2 error\n(rows: layer x head; {profile.layout})", fontsize=8)
    fig.tight_layout()
    return _write_atomic(Path(out), lambda tmp: fig.savefig(tmp, dpi=dpi))


def render_search_report(outcomes, front, chosen, plan: SparsePlan, out: "str | Path", min_psnr: float, dpi: int = 100) -> Path:
    """`search_report.png`: every trial as predicted attention speedup vs PSNR (Pareto front joined, pruned trials
    marked at the floor, the chosen plan circled), beside the chosen plan's layer x head map (last step range)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fig = Figure(figsize=(11, 4.5), dpi=dpi)
    ax, grid = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.3, 1]})
    done = [o for o in outcomes if o.state == "complete"]
    pruned = [o for o in outcomes if o.state == "pruned"]
    ax.scatter([o.predicted_speedup for o in done], [o.psnr for o in done], s=18, color="0.6", label="trials")
    if pruned:
        ax.scatter([o.predicted_speedup for o in pruned], [min_psnr] * len(pruned), marker="x", color="tab:red",
                   s=18, label="pruned (below floor)")
    front = sorted(front, key=lambda o: o.predicted_speedup)
    ax.plot([o.predicted_speedup for o in front], [o.psnr for o in front], "-o", color="tab:blue", ms=4, label="Pareto front")
    ax.scatter([chosen.predicted_speedup], [chosen.psnr], s=160, facecolors="none", edgecolors="black", linewidths=1.5,
               label=f"chosen: {chosen.predicted_speedup:.2f}x, {chosen.psnr:.1f} dB")
    ax.axhline(min_psnr, color="tab:red", lw=0.8, ls="--")
    ax.set_xlabel("predicted attention speedup (measured cost model)")
    ax.set_ylabel("PSNR vs dense (dB)")
    ax.legend(fontsize=7, loc="lower left")
    r = plan.ranges[-1]
    img, kinds = plan_grid(plan, r)
    grid.imshow(img, aspect="auto", interpolation="nearest")
    _integer_ticks(grid, img)
    grid.set_title(f"chosen plan, progress [{r.start:.2f}, {r.end:.2f}), dense steps {plan.dense_steps}", fontsize=9)
    grid.set_xlabel("head")
    grid.set_ylabel("layer")
    grid.legend(handles=[Patch(color=np.array(kind_colour(k)) / 255, label=k) for k in sorted(kinds)], fontsize=7,
                loc="upper right", bbox_to_anchor=(1.0, -0.12), ncol=3)
    fig.tight_layout()
    return _write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=dpi))
