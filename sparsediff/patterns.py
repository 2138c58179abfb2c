"""The pattern library: what one attention head looks at, as a block mask, a token mask and a density.

Every pattern is a small frozen dataclass whose `name` encodes its parameters (`diagonal_w1`,
`multi_diagonal_w2`, `vertical_stripe_f1`, `topk_blocks_k0.25`) and parses back with `get_pattern(name)`.
Parameters are in layout units (frames, spatial tokens, fractions), so a pattern chosen on a small
calibration layout applies to a larger one.

Rules that hold for every sparse pattern:

- Text tokens (`text` segments of joint text+video attention) are always attended: a text query sees every
  key and every query sees every text key.
- The block mask is the token mask reduced per block (a block is computed if any of its token pairs is
  allowed); kernels compute exactly those blocks and mask inside partial ones. Both are taken in the
  pattern's *kernel order*: the token order its kernel runs in (`Pattern.order`, None for the layout's own).
  `diagonal` and `vertical_stripe` run in frame-major order and `multi_diagonal` in position-major order, so
  each reorders the axis tokens when the layout stores them otherwise (a video is frame-major, an
  `axis:TxN:position` segment position-major, a 1-D axis is both). `topk_blocks` runs in the layout's order.
  `token_mask` is always in the layout's order (the reference's truth); `kernel_token_mask` is the same mask
  in kernel order.
- Density is the share of the S x S score area that the computed blocks cover (the cost of a block-sparse
  kernel relative to dense).

Add a pattern by subclassing `Pattern`, giving it `kind` and `params`, and decorating it with
`@register_pattern`; names, parsing, plans and `sparsediff show` pick it up from the registry.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from .kernels.spec import block_axis_ranges
from .layout import TokenLayout, check_block_size

PATTERNS: dict[str, type["Pattern"]] = {}

# Rows of the token mask evaluated at once when reducing a pattern to blocks (bounds memory at long S).
_ROW_CHUNK_ELEMENTS = 1 << 24


def register_pattern(cls: type["Pattern"]) -> type["Pattern"]:
    if cls.kind in PATTERNS:
        raise ValueError(f"Pattern kind {cls.kind!r} is already registered by {PATTERNS[cls.kind].__name__}.")
    PATTERNS[cls.kind] = cls
    return cls


def _fmt(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Pattern:
    """Base class. Subclasses set `kind`, `params` (field name -> one-letter tag used in the name) and
    implement `allowed` (token rule on the axis) or override the mask methods."""

    kind: ClassVar[str] = ""
    params: ClassVar[dict[str, str]] = {}
    # True when the mask depends on attention scores (given as `scores` to the mask methods).
    needs_scores: ClassVar[bool] = False
    # How a kernel runs it (see sparsediff.kernels.spec): "band", "stripe", "blocks"; "" for full/skip.
    kernel_mode: ClassVar[str] = ""

    def kernel_radius(self, layout: TokenLayout) -> int:
        """Band half-width or stripe width in axis tokens, for `band`/`stripe` kernels."""
        return 0

    @property
    def name(self) -> str:
        # an optional parameter left at None is not part of the name
        tags = [f"{tag}{_fmt(getattr(self, field))}" for field, tag in self.params.items() if getattr(self, field) is not None]
        return "_".join([self.kind, *tags])

    def __str__(self) -> str:
        return self.name

    # ---- token level ----------------------------------------------------------------------------------
    def allowed(self, layout: TokenLayout, rows: torch.Tensor) -> torch.Tensor:
        """(len(rows), S) bool, in kernel order: may query `rows[i]` attend key `j` (axis tokens only; text
        is handled by `token_rows`)."""
        raise NotImplementedError

    def token_rows(
        self, layout: TokenLayout, rows: torch.Tensor, block_size: int | None = None, scores: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Kernel-order token mask rows `rows` as a (len(rows), S) bool tensor, text rule included."""
        is_text = layout.is_text
        return self.allowed(layout, rows) | is_text[rows][:, None] | is_text[None, :]

    def order(self, layout: TokenLayout) -> torch.Tensor | None:
        """Kernel order as a permutation (`x[..., order, :]` reorders tokens), or None for the layout's order."""
        return None

    def kernel_token_mask(
        self, layout: TokenLayout, block_size: int | None = None, scores: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(S, S) bool token mask in kernel order. Only for tests and references at small S."""
        return self.token_rows(layout, torch.arange(layout.num_tokens), block_size, scores)

    def token_mask(
        self, layout: TokenLayout, block_size: int | None = None, scores: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(S, S) bool token mask in the layout's order: may query i attend key j. Small S only."""
        mask = self.kernel_token_mask(layout, block_size, scores)
        order = self.order(layout)
        if order is None:
            return mask
        position = order.argsort()  # where each original token sits in kernel order
        return mask[position][:, position]

    # ---- block level ----------------------------------------------------------------------------------
    def block_mask(self, layout: TokenLayout, block_size: int, scores: torch.Tensor | None = None) -> torch.Tensor:
        """(num_q_blocks, num_kv_blocks) bool, in kernel order: blocks that contain any allowed token pair."""
        check_block_size(block_size)
        S, n = layout.num_tokens, layout.num_blocks(block_size)
        pad = n * block_size - S
        rows_per_chunk = max(1, _ROW_CHUNK_ELEMENTS // (S * block_size)) * block_size
        out = torch.empty((n, n), dtype=torch.bool)
        for start in range(0, S, rows_per_chunk):
            rows = torch.arange(start, min(start + rows_per_chunk, S))
            m = self.token_rows(layout, rows, block_size, scores)  # (r, S)
            m = torch.nn.functional.pad(m, (0, pad, 0, (-len(rows)) % block_size))  # pad to whole blocks
            m = m.view(-1, block_size, n, block_size).any(dim=3).any(dim=1)  # (r // bs, n)
            out[start // block_size : start // block_size + m.shape[0]] = m
        return out

    def density(self, layout: TokenLayout, block_size: int, scores: torch.Tensor | None = None) -> float:
        """Share of the S x S score area covered by computed blocks (1.0 = dense cost, 0.0 = free)."""
        return block_density(self.block_mask(layout, block_size, scores), layout, block_size)

    def estimated_density(self, layout: TokenLayout, block_size: int) -> float:
        """Density without attention scores (equal to `density` for every pattern but `topk_blocks`)."""
        return self.density(layout, block_size)


def block_density(mask: torch.Tensor, layout: TokenLayout, block_size: int, query_start: int = 0) -> float:
    """Area share of a (…, nq, nk) block mask, ragged tail blocks weighted by their size; mean over heads. With
    `query_start`, of the area of the query rows from that token on (the rows a call over a cache computes)."""
    lengths = layout.block_lengths(block_size).to(torch.float64)
    starts = torch.arange(len(lengths), dtype=torch.float64) * block_size
    rows = (starts + lengths - starts.clamp(min=query_start)).clamp(min=0)  # each query block's rows that run
    area = rows[:, None] * lengths[None, :]
    covered = (mask.to(torch.float64) * area).sum(dim=(-2, -1))
    return float(covered.mean()) / ((layout.num_tokens - query_start) * layout.num_tokens)


@register_pattern
@dataclass(frozen=True)
class Full(Pattern):
    """Dense attention."""

    kind: ClassVar[str] = "full"

    def token_rows(self, layout, rows, block_size=None, scores=None):
        return torch.ones((len(rows), layout.num_tokens), dtype=torch.bool)

    def block_mask(self, layout, block_size, scores=None):
        n = layout.num_blocks(block_size)
        return torch.ones((n, n), dtype=torch.bool)


@register_pattern
@dataclass(frozen=True)
class Skip(Pattern):
    """The head contributes nothing: its output is zero and it costs nothing (Sparse-vDiT M1)."""

    kind: ClassVar[str] = "skip"

    def token_rows(self, layout, rows, block_size=None, scores=None):
        return torch.zeros((len(rows), layout.num_tokens), dtype=torch.bool)

    def block_mask(self, layout, block_size, scores=None):
        n = layout.num_blocks(block_size)
        return torch.zeros((n, n), dtype=torch.bool)


def _check_param(pattern: Pattern, field: str, value: float, lo: float, hi: float = math.inf, lo_open=False) -> None:
    ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok or not math.isfinite(value):
        bound = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi != math.inf else "")
        raise ValueError(f"Pattern {pattern.kind!r} got {field}={value!r}; it must be {bound}.")


def _axis_blocks(layout: TokenLayout, block_size: int):
    check_block_size(block_size)
    a0, a1 = layout.axis_range
    return block_axis_ranges(layout.num_tokens, a0, a1, block_size)


def band_block_mask(layout: TokenLayout, block_size: int, radius: int) -> torch.Tensor:
    """Block mask of a band |a_i - a_j| <= radius on the axis (text rows and columns kept), without token masks:
    two blocks meet when the nearest axis pair of their intervals is within the band."""
    lo, hi, has_axis, has_text = _axis_blocks(layout, block_size)
    near = torch.clamp(torch.maximum(lo[None, :] - hi[:, None], lo[:, None] - hi[None, :]), min=0)
    meet = (near <= radius) & has_axis[:, None] & has_axis[None, :]
    return meet | has_text[:, None] | has_text[None, :]


@register_pattern
@dataclass(frozen=True)
class Diagonal(Pattern):
    """Local window: each axis query sees axis keys within `w` frames' worth of tokens in frame-major order
    (the same and nearby frames, nearby space). Half-width `R = round(w * tokens_per_frame)` tokens; runs as a
    band in frame-major order, after a reorder for a position-major layout (Sparse-vDiT M2)."""

    kind: ClassVar[str] = "diagonal"
    params: ClassVar[dict[str, str]] = {"w": "w"}
    kernel_mode: ClassVar[str] = "band"
    w: float = 1.0

    def __post_init__(self):
        _check_param(self, "w", self.w, 0.0)

    def kernel_radius(self, layout: TokenLayout) -> int:
        return round(self.w * layout.tokens_per_frame)

    def order(self, layout):
        return None if layout.is_frame_major else layout.frame_major_order

    def allowed(self, layout, rows):
        a = layout.axis_index  # in kernel order this is the frame-major place
        return (a[rows][:, None] - a[None, :]).abs() <= self.kernel_radius(layout)

    def block_mask(self, layout, block_size, scores=None):
        return band_block_mask(layout, block_size, self.kernel_radius(layout))


@register_pattern
@dataclass(frozen=True)
class MultiDiagonal(Pattern):
    """The same spatial neighbourhood in every frame: a band of half-width `R = round(w * frames)` tokens in
    position-major (position, frame) order, i.e. about `w` positions around the query's position, across all
    frames. Runs as a band in position-major order, after a reorder for a frame-major layout such as a video
    (Sparse-vDiT M3)."""

    kind: ClassVar[str] = "multi_diagonal"
    params: ClassVar[dict[str, str]] = {"w": "w"}
    kernel_mode: ClassVar[str] = "band"
    w: float = 1.0

    def __post_init__(self):
        _check_param(self, "w", self.w, 0.0)

    def kernel_radius(self, layout: TokenLayout) -> int:
        return round(self.w * layout.frames)

    def order(self, layout):
        return None if layout.is_position_major else layout.position_major_order

    def allowed(self, layout, rows):
        a = layout.axis_index  # in kernel order this is the position-major place
        return (a[rows][:, None] - a[None, :]).abs() <= self.kernel_radius(layout)

    def block_mask(self, layout, block_size, scores=None):
        return band_block_mask(layout, block_size, self.kernel_radius(layout))


@register_pattern
@dataclass(frozen=True)
class VerticalStripe(Pattern):
    """Global key columns every query attends to: the first `f` frames of the axis (attention sinks),
    `R = max(1, round(f * tokens_per_frame))` keys, plus text (Sparse-vDiT M4). Those keys are the first `R`
    axis places in frame-major order, so a position-major layout is reordered to frame-major first."""

    kind: ClassVar[str] = "vertical_stripe"
    params: ClassVar[dict[str, str]] = {"f": "f"}
    kernel_mode: ClassVar[str] = "stripe"
    f: float = 1.0

    def __post_init__(self):
        _check_param(self, "f", self.f, 0.0, lo_open=True)

    def kernel_radius(self, layout: TokenLayout) -> int:
        """Stripe width: the number of leading axis keys every query sees."""
        return min(layout.num_axis_tokens, max(1, round(self.f * layout.tokens_per_frame)))

    def order(self, layout):
        return None if layout.is_frame_major else layout.frame_major_order

    def allowed(self, layout, rows):
        a = layout.axis_index
        keep = (a >= 0) & (a < self.kernel_radius(layout))
        return keep[None, :].expand(len(rows), -1)

    def block_mask(self, layout, block_size, scores=None):
        lo, _, has_axis, has_text = _axis_blocks(layout, block_size)
        stripe = has_axis & (lo < self.kernel_radius(layout))
        return stripe[None, :] | has_text[:, None] | has_text[None, :]


@register_pattern
@dataclass(frozen=True)
class TopkBlocks(Pattern):
    """Per query block, the `k` share of key blocks with the highest attention score (SparseD). Prompt and
    generation key blocks are selected separately, each keeping its own share: `keep` for generation keys and
    `prompt_keep` (`p` in the name; `keep` when not given) for prompt keys (a block holding any generation token
    counts as generation; on a video axis every key block is a "prompt" block); key blocks holding text are always kept. Scores are a
    `(num_q_blocks, num_kv_blocks)` tensor (or `(H, nq, nk)` for a group of heads), taken from full
    attention at the first sparse step and reused afterwards."""

    kind: ClassVar[str] = "topk_blocks"
    params: ClassVar[dict[str, str]] = {"keep": "k", "prompt_keep": "p"}
    needs_scores: ClassVar[bool] = True
    kernel_mode: ClassVar[str] = "blocks"
    keep: float = 0.25
    prompt_keep: float | None = None

    def __post_init__(self):
        _check_param(self, "keep", self.keep, 0.0, 1.0, lo_open=True)
        if self.prompt_keep is not None:
            _check_param(self, "prompt_keep", self.prompt_keep, 0.0, 1.0, lo_open=True)

    def block_mask(self, layout, block_size, scores=None):
        return topk_block_mask(scores, layout, block_size, self.keep, self.prompt_keep)

    def token_rows(self, layout, rows, block_size=None, scores=None):
        if block_size is None:
            raise ValueError("topk_blocks is defined on blocks; pass block_size to token_mask/token_rows.")
        blocks = self.block_mask(layout, block_size, scores)
        if blocks.dim() != 2:
            raise ValueError(f"token masks are per head; pass (nq, nk) scores, not {tuple(blocks.shape)}.")
        key_block = torch.arange(layout.num_tokens) // block_size
        allowed = blocks[rows // block_size][:, key_block]
        return allowed | layout.is_text[rows][:, None] | layout.is_text[None, :]

    def estimated_density(self, layout, block_size):
        n = layout.num_blocks(block_size)
        return self.density(layout, block_size, torch.zeros((n, n)))


def topk_block_mask(
    scores: torch.Tensor | None, layout: TokenLayout, block_size: int, keep: float, prompt_keep: float | None = None
) -> torch.Tensor:
    """Boolean (…, nq, nk) block mask keeping, per query block, the top `keep` share of generation key blocks and,
    separately, the top `prompt_keep` (default `keep`) share of the other axis key blocks (prompt, or video), plus
    every key block that holds text. Query blocks holding text keep every key block (text queries attend everything)."""
    check_block_size(block_size)
    n = layout.num_blocks(block_size)
    if scores is None:
        raise ValueError("topk_blocks needs block scores: pass scores of shape (num_q_blocks, num_kv_blocks).")
    if scores.shape[-2:] != (n, n):
        raise ValueError(
            f"topk_blocks scores have shape {tuple(scores.shape)} but layout {layout} with block_size={block_size} "
            f"has {n} x {n} blocks; profile with the same layout and block size."
        )
    pad = n * block_size - layout.num_tokens
    per_block = lambda t: torch.nn.functional.pad(t, (0, pad)).view(n, block_size).any(dim=1)  # noqa: E731
    text_blocks = per_block(layout.is_text)
    gen_blocks = per_block(layout.is_generation)
    groups = [(gen_blocks & ~text_blocks, keep), (~gen_blocks & ~text_blocks, keep if prompt_keep is None else prompt_keep)]
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    scores = scores.float()
    for group, share in groups:
        count = int(group.sum())
        if count == 0:
            continue
        k = min(count, max(1, math.ceil(share * count)))
        masked = scores.masked_fill(~group, -math.inf)
        top = masked.topk(k, dim=-1).indices
        mask.scatter_(-1, top, True)
    mask |= text_blocks  # text keys always kept
    mask[..., text_blocks, :] = True  # text queries see everything
    return mask


_NAME_RE = re.compile(r"^([a-z]+)(-?[0-9.eE+-]+)$")


def get_pattern(spec: "str | Pattern") -> Pattern:
    """Parse a pattern name such as `diagonal_w1.5` (or pass a `Pattern` through).

    >>> get_pattern("multi_diagonal_w2")
    MultiDiagonal(w=2.0)
    """
    if isinstance(spec, Pattern):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"A pattern is a name like 'diagonal_w1' or a Pattern, not {spec!r}.")
    for kind in sorted(PATTERNS, key=len, reverse=True):
        if spec == kind or spec.startswith(kind + "_"):
            cls = PATTERNS[kind]
            break
    else:
        raise ValueError(f"Unknown pattern {spec!r}; known patterns: {', '.join(PATTERNS)} (e.g. 'diagonal_w1').")
    by_tag = {tag: field for field, tag in cls.params.items()}
    values: dict[str, float] = {}
    expected = ", ".join(f"{t}<number> ({f})" for t, f in by_tag.items()) or "no parameters"
    tokens = spec[len(kind) + 1 :].split("_") if spec != kind else []
    for token in tokens:
        if not token:
            raise ValueError(f"Pattern {spec!r} has an empty parameter (a stray '_'); {kind} takes {expected}, "
                             f"joined by single underscores as in {get_pattern(kind).name!r}.")
        m = _NAME_RE.match(token)
        if not m or m.group(1) not in by_tag:
            raise ValueError(f"Pattern {spec!r} has a bad parameter {token!r}; {kind} takes {expected}.")
        if by_tag[m.group(1)] in values:
            raise ValueError(f"Pattern {spec!r} gives parameter {m.group(1)!r} twice; give each parameter once, "
                             f"e.g. {kind}_{token}.")
        try:
            values[by_tag[m.group(1)]] = float(m.group(2))
        except ValueError:
            raise ValueError(f"Pattern {spec!r}: {token!r} is not a number.") from None
    return cls(**values)


def pattern_fields(pattern: Pattern) -> dict[str, float]:
    return {f.name: getattr(pattern, f.name) for f in fields(pattern)}
