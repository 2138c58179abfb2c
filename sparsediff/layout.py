"""Token layouts: which token of a denoiser's sequence is text and which lies on the pattern axis (frame, position).

A layout is an ordered list of segments. `text(n)` tokens are always attended by sparse patterns; the other
segments form the *axis* that patterns are written against: `frames` frames of `tokens_per_frame` positions.

- `video(frames, height, width)` (video DiTs): frame-major tokens after patchify; one frame is `height * width`
  positions.
- `axis(frames, positions, order)`: any other T x N grid, e.g. a sequence of latent sets (T frames of N latent
  tokens, N ordered spatially). `order="frame"` (the default) stores it frame-major like a video, token
  `frame * N + position`; `order="position"` stores it position-major, token `position * T + frame` (every
  frame of position 0 first).
- `prompt(n)` / `generation(n)` (diffusion LMs): a 1-D axis, each token its own frame of one position.

A layout's axis is one video segment, one axis segment, or prompt/generation segments, with text only before
and after it; so every axis segment of a layout has the same positions per frame.

The compact string form used by the CLI joins segments with `+`: `text:226+video:13x30x45`,
`prompt:512+generation:256`, `axis:17x512`. An axis segment stored position-major adds the suffix `:position`
(`axis:17x512:position`); `:frame` may be written too and is the default, so `str()` leaves it out.
`TokenLayout.parse(str(layout)) == layout` for every layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

SEGMENT_KINDS = ("text", "video", "axis", "prompt", "generation")
# Token orders of a segment: frame-major (token = frame * N + position) or position-major (position * T + frame).
TOKEN_ORDERS = ("frame", "position")
_SIZES_SYNTAX = {"video": "video:FxHxW", "axis": "axis:TxN or axis:TxN:position"}


@dataclass(frozen=True)
class Segment:
    """One run of tokens. `shape` is `(n,)` for text/prompt/generation, `(frames, height, width)` for video and
    `(frames, positions)` for axis. `order` ("frame" or "position", defaults to "frame") is how an axis segment
    stores its tokens; every other kind is frame-major."""

    kind: str
    shape: tuple[int, ...]
    order: str = "frame"

    def __post_init__(self):
        if self.kind not in SEGMENT_KINDS:
            raise ValueError(f"Unknown segment kind {self.kind!r}; expected one of {', '.join(SEGMENT_KINDS)}.")
        want = {"video": 3, "axis": 2}.get(self.kind, 1)
        if len(self.shape) != want:
            raise ValueError(
                f"Segment {self.kind!r} needs {want} size(s) but got {self.shape}; "
                f"write it as {_SIZES_SYNTAX.get(self.kind, self.kind + ':N')}."
            )
        for size in self.shape:
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                raise ValueError(
                    f"Segment {self.kind}:{'x'.join(map(str, self.shape))} has size {size!r}; "
                    "every size must be a positive integer (zero frames or negative sizes are not a layout)."
                )
        if self.order not in TOKEN_ORDERS:
            raise ValueError(
                f"Segment {self.kind}:{'x'.join(map(str, self.shape))} has token order {self.order!r}; expected "
                "'frame' (frame-major, the default) or 'position' (position-major), e.g. 'axis:17x512:position'."
            )
        if self.order != "frame" and self.kind != "axis":
            raise ValueError(
                f"Segment {self.kind}:{'x'.join(map(str, self.shape))} has token order {self.order!r}, but only axis "
                "segments take a token order (video is frame-major after patchify, text/prompt/generation are "
                "1-D); describe position-major tokens as 'axis:TxN:position'."
            )

    @property
    def num_tokens(self) -> int:
        return math.prod(self.shape)

    @property
    def frames(self) -> int:
        """Frames of the segment; a 1-D segment has one frame per token."""
        return self.shape[0]

    @property
    def positions(self) -> int:
        """Positions per frame: `height * width` for video, N for axis, 1 for a 1-D segment."""
        return self.num_tokens // self.shape[0]

    def __str__(self) -> str:
        suffix = f":{self.order}" if self.order != "frame" else ""
        return f"{self.kind}:{'x'.join(map(str, self.shape))}{suffix}"


def text(n: int) -> Segment:
    return Segment("text", (n,))


def video(frames: int, height: int, width: int) -> Segment:
    return Segment("video", (frames, height, width))


def axis(frames: int, positions: int, order: str = "frame") -> Segment:
    """T frames x N positions stored frame-major (`order="frame"`) or position-major (`order="position"`)."""
    return Segment("axis", (frames, positions), order)


def prompt(n: int) -> Segment:
    return Segment("prompt", (n,))


def generation(n: int) -> Segment:
    return Segment("generation", (n,))


@dataclass(frozen=True)
class TokenLayout:
    """The token order of one attention call.

    Args:
        segments (tuple[Segment, ...]): the segments in sequence order. The non-text segments are one `video`
            segment, one `axis` segment, or `prompt`/`generation` segments, and text lies only before and after
            them.

    >>> layout = TokenLayout.parse("text:4+video:2x3x3")
    >>> layout.num_tokens, layout.frames, layout.tokens_per_frame
    (22, 2, 9)
    >>> layout.locate(13)
    ('video', 1, 0, 0)
    >>> TokenLayout.parse("axis:3x4:position").locate(1)  # position-major: frame 1 of position 0
    ('axis', 1, 0, 0)
    """

    segments: tuple[Segment, ...]

    def __post_init__(self):
        object.__setattr__(self, "segments", tuple(self.segments))
        if not self.segments:
            raise ValueError("A TokenLayout needs at least one segment, e.g. TokenLayout.parse('video:4x8x8').")
        kinds = [s.kind for s in self.segments]
        for kind in ("video", "axis"):
            if kinds.count(kind) > 1:
                raise ValueError(
                    f"Layout {self} has {kinds.count(kind)} {kind} segments; at most one is supported "
                    f"(describe the tokens as one {kind} segment)."
                )
        families = [f for f in ("video", "axis", "prompt/generation") if set(f.split("/")) & set(kinds)]
        if len(families) > 1:
            raise ValueError(
                f"Layout {self} mixes {families[0]} with {families[1]} segments; the non-text tokens of a layout are "
                "one video segment, one axis segment or prompt/generation segments, so use one or the other."
            )
        on_axis = [i for i, k in enumerate(kinds) if k != "text"]
        if on_axis and on_axis != list(range(on_axis[0], on_axis[-1] + 1)):
            raise ValueError(
                f"Layout {self} puts text between prompt/generation segments; text may only come "
                "before or after them (e.g. 'text:16+video:4x8x8+text:4')."
            )

    # ---- string form -------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, spec: str) -> "TokenLayout":
        """Parse the compact form, e.g. `text:226+video:13x30x45` or `axis:17x512:position`."""
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"Layout {spec!r} is empty; write segments joined by '+', e.g. 'text:226+video:13x30x45'.")
        segments = []
        for part in spec.strip().split("+"):
            kind, sep, rest = part.strip().partition(":")
            if not sep or kind not in SEGMENT_KINDS:
                raise ValueError(
                    f"Layout segment {part!r} in {spec!r} is not KIND:SIZES with KIND one of "
                    f"{', '.join(SEGMENT_KINDS)}; e.g. 'video:8x32x32', 'axis:17x512:position' or 'text:226'."
                )
            sizes, has_order, order = rest.partition(":")
            try:
                shape = tuple(int(x) for x in sizes.split("x"))
            except ValueError:
                raise ValueError(f"Layout segment {part!r} in {spec!r} has non-integer sizes; e.g. 'video:8x32x32'.") from None
            segments.append(Segment(kind, shape, order) if has_order else Segment(kind, shape))
        return cls(tuple(segments))

    @classmethod
    def video_only(cls, frames: int, height: int, width: int) -> "TokenLayout":
        return cls((video(frames, height, width),))

    def __str__(self) -> str:
        return "+".join(str(s) for s in self.segments)

    # ---- sizes --------------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.segments)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Start token of each segment."""
        starts, at = [], 0
        for s in self.segments:
            starts.append(at)
            at += s.num_tokens
        return tuple(starts)

    @property
    def has_video(self) -> bool:
        return any(s.kind == "video" for s in self.segments)

    @property
    def num_text_tokens(self) -> int:
        return sum(s.num_tokens for s in self.segments if s.kind == "text")

    @property
    def num_axis_tokens(self) -> int:
        """Tokens that patterns act on (everything but text)."""
        return self.num_tokens - self.num_text_tokens

    @property
    def axis_range(self) -> tuple[int, int]:
        """[start, end) of the axis tokens, which are contiguous; text lies before and after."""
        start = next((o for s, o in zip(self.segments, self.offsets) if s.kind != "text"), 0)
        return start, start + self.num_axis_tokens

    @property
    def tokens_per_frame(self) -> int:
        """Positions per frame of the axis: `height * width` for video, N for `axis:TxN`, 1 for a 1-D axis."""
        return next((s.positions for s in self.segments if s.kind != "text"), 1)

    @property
    def frames(self) -> int:
        """Frames on the axis; for a 1-D axis every token is a frame."""
        return self.num_axis_tokens // self.tokens_per_frame

    @property
    def is_frame_major(self) -> bool:
        """The axis tokens already lie frame-major (true for a 1-D axis and for a single frame)."""
        return self.tokens_per_frame == 1 or self.frames == 1 or all(s.order == "frame" for s in self.segments)

    @property
    def is_position_major(self) -> bool:
        """The axis tokens already lie position-major (true for a 1-D axis and for a single frame)."""
        return self.tokens_per_frame == 1 or self.frames == 1 or all(
            s.order == "position" for s in self.segments if s.kind != "text"
        )

    # ---- token maps ---------------------------------------------------------------------------------------
    def locate(self, index: int) -> tuple[str, int, int, int]:
        """Token index -> (segment kind, frame, row, col). An axis token gives (kind, frame, position, 0);
        text/prompt/generation tokens give (kind, i, 0, 0) with i the position inside their segment."""
        if not 0 <= index < self.num_tokens:
            raise IndexError(f"Token {index} is outside layout {self} of {self.num_tokens} tokens.")
        for seg, start in zip(self.segments, self.offsets):
            if index < start + seg.num_tokens:
                local = index - start
                if seg.kind == "video":
                    _, h, w = seg.shape
                    return seg.kind, local // (h * w), (local // w) % h, local % w
                if seg.kind == "axis":
                    t, n = seg.shape
                    frame, position = (local % t, local // t) if seg.order == "position" else divmod(local, n)
                    return seg.kind, frame, position, 0
                return seg.kind, local, 0, 0
        raise AssertionError("unreachable")

    def index(self, segment: int, frame: int, row: int = 0, col: int = 0) -> int:
        """(segment number, frame, row, col) -> token index; inverse of `locate`. For an axis segment `row` is
        the position within the frame."""
        seg = self.segments[segment]
        if seg.kind == "video":
            f, h, w = seg.shape
            if not (0 <= frame < f and 0 <= row < h and 0 <= col < w):
                raise IndexError(f"({frame}, {row}, {col}) is outside {seg}.")
            return self.offsets[segment] + (frame * h + row) * w + col
        if seg.kind == "axis":
            t, n = seg.shape
            if not (0 <= frame < t and 0 <= row < n and col == 0):
                raise IndexError(f"(frame {frame}, position {row}, col {col}) is outside {seg}.")
            return self.offsets[segment] + (row * t + frame if seg.order == "position" else frame * n + row)
        if not 0 <= frame < seg.num_tokens:
            raise IndexError(f"Position {frame} is outside {seg}.")
        return self.offsets[segment] + frame

    @cached_property
    def is_text(self) -> torch.Tensor:
        """(S,) bool: token is text (always attended)."""
        return torch.cat([torch.full((s.num_tokens,), s.kind == "text") for s in self.segments])

    @cached_property
    def axis_index(self) -> torch.Tensor:
        """(S,) int64: place on the axis of the token at each index, -1 for text.

        It counts places, not tokens, so it reads the same in the layout's order and in a pattern's kernel order
        (`Pattern.order` moves axis tokens among the axis places and keeps text in place)."""
        out = torch.full((self.num_tokens,), -1, dtype=torch.long)
        out[~self.is_text] = torch.arange(self.num_axis_tokens)
        return out

    @cached_property
    def is_generation(self) -> torch.Tensor:
        """(S,) bool: token belongs to a `generation` segment (diffusion LMs)."""
        return torch.cat([torch.full((s.num_tokens,), s.kind == "generation") for s in self.segments])

    @cached_property
    def _axis_coordinates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(frame, position) of each axis token, in layout order; frames count on across prompt/generation."""
        frames, positions, first = [torch.empty(0, dtype=torch.long)], [torch.empty(0, dtype=torch.long)], 0
        for s in self.segments:
            if s.kind == "text":
                continue
            local = torch.arange(s.num_tokens)
            if s.order == "position":
                frame, position = local % s.frames, local // s.frames
            else:
                frame, position = local // s.positions, local % s.positions
            frames.append(frame + first)
            positions.append(position)
            first += s.frames
        return torch.cat(frames), torch.cat(positions)

    def _axis_order(self, rank: torch.Tensor) -> torch.Tensor:
        """The permutation that moves the t-th axis token (in layout order) to axis place `rank[t]`, text kept in
        place."""
        start, end = self.axis_range
        order = torch.arange(self.num_tokens)
        order[start + rank] = torch.arange(start, end)
        return order

    @cached_property
    def frame_major_order(self) -> torch.Tensor:
        """(S,) permutation: frame-major (frame, position) order of the axis tokens, text kept in place.

        `x[..., order, :]` reorders, `x[..., order.argsort(), :]` undoes it. The identity unless the layout holds a
        position-major axis segment (see `is_frame_major`). After it, `diagonal` is a band.
        """
        frame, position = self._axis_coordinates
        return self._axis_order(frame * self.tokens_per_frame + position)

    @cached_property
    def position_major_order(self) -> torch.Tensor:
        """(S,) permutation: position-major (position, frame) order of the axis tokens, text kept in place.

        `x[..., order, :]` reorders, `x[..., order.argsort(), :]` undoes it. After the reorder, the same position
        in consecutive frames is adjacent, so `multi_diagonal` is a band.
        """
        frame, position = self._axis_coordinates
        return self._axis_order(position * self.frames + frame)

    @property
    def token_major_order(self) -> torch.Tensor:
        """Alias of `position_major_order` (the name from when the axis was always a video)."""
        return self.position_major_order

    # ---- blocks -------------------------------------------------------------------------------------------
    def num_blocks(self, block_size: int) -> int:
        check_block_size(block_size)
        return -(-self.num_tokens // block_size)

    def block_lengths(self, block_size: int) -> torch.Tensor:
        """(num_blocks,) tokens in each block; the last may be shorter (ragged tail)."""
        n = self.num_blocks(block_size)
        lengths = torch.full((n,), block_size, dtype=torch.long)
        lengths[-1] = self.num_tokens - (n - 1) * block_size
        return lengths


def check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
        raise ValueError(f"block_size={block_size!r} must be a positive integer, e.g. 64 or 128.")
