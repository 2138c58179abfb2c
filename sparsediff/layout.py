"""Token layouts: which token of a denoiser's sequence is text, which is video (frame, row, col), and its blocks.

A layout is an ordered list of segments. `text(n)` tokens are always attended by sparse patterns; the other
segments form the *axis* that patterns are written against:

- `video(frames, height, width)`: frame-major tokens after patchify; one frame is `height * width` tokens.
- `prompt(n)` / `generation(n)` (diffusion LMs): a 1-D axis, each token its own "frame" of one token.

The compact string form used by the CLI joins segments with `+`: `text:226+video:13x30x45`,
`prompt:512+generation:256`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

SEGMENT_KINDS = ("text", "video", "prompt", "generation")


@dataclass(frozen=True)
class Segment:
    """One run of tokens. `shape` is `(n,)` for text/prompt/generation and `(frames, height, width)` for video."""

    kind: str
    shape: tuple[int, ...]

    def __post_init__(self):
        if self.kind not in SEGMENT_KINDS:
            raise ValueError(f"Unknown segment kind {self.kind!r}; expected one of {', '.join(SEGMENT_KINDS)}.")
        want = 3 if self.kind == "video" else 1
        if len(self.shape) != want:
            raise ValueError(
                f"Segment {self.kind!r} needs {want} size(s) but got {self.shape}; "
                f"write it as {'video:FxHxW' if want == 3 else self.kind + ':N'}."
            )
        for size in self.shape:
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                raise ValueError(
                    f"Segment {self.kind}:{'x'.join(map(str, self.shape))} has size {size!r}; "
                    "every size must be a positive integer (zero frames or negative sizes are not a layout)."
                )

    @property
    def num_tokens(self) -> int:
        return math.prod(self.shape)

    def __str__(self) -> str:
        return f"{self.kind}:{'x'.join(map(str, self.shape))}"


def text(n: int) -> Segment:
    return Segment("text", (n,))


def video(frames: int, height: int, width: int) -> Segment:
    return Segment("video", (frames, height, width))


def prompt(n: int) -> Segment:
    return Segment("prompt", (n,))


def generation(n: int) -> Segment:
    return Segment("generation", (n,))


@dataclass(frozen=True)
class TokenLayout:
    """The token order of one attention call.

    Args:
        segments (tuple[Segment, ...]): the segments in sequence order. At most one `video` segment, and a
            layout either has a video segment or `prompt`/`generation` segments, not both.

    >>> layout = TokenLayout.parse("text:4+video:2x3x3")
    >>> layout.num_tokens, layout.frames, layout.tokens_per_frame
    (22, 2, 9)
    >>> layout.locate(13)
    ('video', 1, 0, 0)
    """

    segments: tuple[Segment, ...]

    def __post_init__(self):
        object.__setattr__(self, "segments", tuple(self.segments))
        if not self.segments:
            raise ValueError("A TokenLayout needs at least one segment, e.g. TokenLayout.parse('video:4x8x8').")
        kinds = [s.kind for s in self.segments]
        if kinds.count("video") > 1:
            raise ValueError(f"Layout {self} has {kinds.count('video')} video segments; at most one is supported.")
        if "video" in kinds and ({"prompt", "generation"} & set(kinds)):
            raise ValueError(f"Layout {self} mixes video with prompt/generation segments; use one or the other.")
        axis = [i for i, k in enumerate(kinds) if k != "text"]
        if axis and axis != list(range(axis[0], axis[-1] + 1)):
            raise ValueError(
                f"Layout {self} puts text between video/prompt/generation segments; text may only come "
                "before or after them (e.g. 'text:16+video:4x8x8+text:4')."
            )

    # ---- string form -------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, spec: str) -> "TokenLayout":
        """Parse the compact form, e.g. `text:226+video:13x30x45`."""
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"Layout {spec!r} is empty; write segments joined by '+', e.g. 'text:226+video:13x30x45'.")
        segments = []
        for part in spec.strip().split("+"):
            kind, sep, sizes = part.strip().partition(":")
            if not sep or kind not in SEGMENT_KINDS:
                raise ValueError(
                    f"Layout segment {part!r} in {spec!r} is not KIND:SIZES with KIND one of "
                    f"{', '.join(SEGMENT_KINDS)}; e.g. 'video:8x32x32' or 'text:226'."
                )
            try:
                shape = tuple(int(x) for x in sizes.split("x"))
            except ValueError:
                raise ValueError(f"Layout segment {part!r} in {spec!r} has non-integer sizes; e.g. 'video:8x32x32'.") from None
            segments.append(Segment(kind, shape))
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
        """Spatial tokens per frame; 1 for a 1-D (diffusion-LM) axis."""
        for s in self.segments:
            if s.kind == "video":
                return s.shape[1] * s.shape[2]
        return 1

    @property
    def frames(self) -> int:
        """Frames on the axis; for a 1-D axis every token is a frame."""
        return self.num_axis_tokens // self.tokens_per_frame

    # ---- token maps ---------------------------------------------------------------------------------------
    def locate(self, index: int) -> tuple[str, int, int, int]:
        """Token index -> (segment kind, frame, row, col). Text/prompt/generation tokens give (kind, i, 0, 0)
        with i the position inside their segment."""
        if not 0 <= index < self.num_tokens:
            raise IndexError(f"Token {index} is outside layout {self} of {self.num_tokens} tokens.")
        for seg, start in zip(self.segments, self.offsets):
            if index < start + seg.num_tokens:
                local = index - start
                if seg.kind != "video":
                    return seg.kind, local, 0, 0
                _, h, w = seg.shape
                return seg.kind, local // (h * w), (local // w) % h, local % w
        raise AssertionError("unreachable")

    def index(self, segment: int, frame: int, row: int = 0, col: int = 0) -> int:
        """(segment number, frame, row, col) -> token index; inverse of `locate`."""
        seg = self.segments[segment]
        if seg.kind == "video":
            f, h, w = seg.shape
            if not (0 <= frame < f and 0 <= row < h and 0 <= col < w):
                raise IndexError(f"({frame}, {row}, {col}) is outside {seg}.")
            return self.offsets[segment] + (frame * h + row) * w + col
        if not 0 <= frame < seg.num_tokens:
            raise IndexError(f"Position {frame} is outside {seg}.")
        return self.offsets[segment] + frame

    @cached_property
    def is_text(self) -> torch.Tensor:
        """(S,) bool: token is text (always attended)."""
        return torch.cat([torch.full((s.num_tokens,), s.kind == "text") for s in self.segments])

    @cached_property
    def axis_index(self) -> torch.Tensor:
        """(S,) int64: position on the pattern axis (frame-major), -1 for text."""
        out = torch.full((self.num_tokens,), -1, dtype=torch.long)
        out[~self.is_text] = torch.arange(self.num_axis_tokens)
        return out

    @cached_property
    def is_generation(self) -> torch.Tensor:
        """(S,) bool: token belongs to a `generation` segment (diffusion LMs)."""
        return torch.cat([torch.full((s.num_tokens,), s.kind == "generation") for s in self.segments])

    @cached_property
    def token_major_order(self) -> torch.Tensor:
        """(S,) permutation: token-major (row, col, frame) order of the axis tokens, text kept in place.

        `x[:, :, order]` reorders, `x[:, :, inverse]` with `inverse = order.argsort()` undoes it. After the
        reorder, the same spatial position in consecutive frames is adjacent, so `multi_diagonal` is a band.
        """
        order = torch.arange(self.num_tokens)
        axis_positions = torch.nonzero(~self.is_text).flatten()
        a = torch.arange(self.num_axis_tokens)
        frame, spatial = a // self.tokens_per_frame, a % self.tokens_per_frame
        token_major = spatial * self.frames + frame  # rank of each axis token in token-major order
        order[axis_positions[token_major]] = axis_positions
        return order

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
