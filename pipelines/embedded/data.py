"""Procedural training clips for the embedded model: coloured shapes moving over a plain or textured background.

Every clip is a pure function of its seed (`clip_spec(seed)`), and its caption is written from the same parameters
(`"a red circle moving right"`, `"a blue square moving up and growing and a white triangle moving left"`), so the
caption is the ground truth that `detector.py` checks generated clips against. Positions, sizes and speeds are
fractions of the frame, so one spec renders at any resolution: frames are float tensors in [-1, 1] of shape
(3, F, H, W).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # saturated RGB in [0, 1]; backgrounds stay dark, so every object stands out
    "red": (0.95, 0.15, 0.15),
    "green": (0.15, 0.85, 0.2),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (0.95, 0.9, 0.15),
    "white": (0.95, 0.95, 0.95),
    "purple": (0.65, 0.2, 0.9),
    "orange": (1.0, 0.55, 0.1),
    "cyan": (0.1, 0.85, 0.9),
}
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # (dx, dy), y down
MODIFIERS = ("bouncing", "growing")  # bouncing: hops across the motion; growing: the size doubles over the clip
TEXTURES = ("plain", "noise", "stripes")
# Every word a caption can use, in a fixed order (the tokenizer's vocabulary is built from it).
CAPTION_WORDS = ("a", "moving", "and", *SHAPES, *COLOURS, *DIRECTIONS, *MODIFIERS)


@dataclass(frozen=True)
class ShapeMotion:
    """One object: what it is and how it moves; the caption states exactly these fields."""

    shape: str
    colour: str
    direction: str
    modifier: str | None = None
    # Placement, as fractions of the frame: where it starts (centre), its radius, and how far it travels.
    start: tuple[float, float] = (0.5, 0.5)
    size: float = 0.14
    travel: float = 0.45

    def phrase(self) -> str:
        words = f"a {self.colour} {self.shape} moving {self.direction}"
        return f"{words} and {self.modifier}" if self.modifier else words


@dataclass(frozen=True)
class ClipSpec:
    """A whole clip: its objects (one or two, of different colours) and the background they move over."""

    objects: tuple[ShapeMotion, ...]
    background: tuple[float, float, float]
    texture: str = "plain"
    texture_seed: int = 0

    @property
    def caption(self) -> str:
        return " and ".join(obj.phrase() for obj in self.objects)


# Where a path runs: it starts on the far side of its direction, centred across it (two objects take the thirds),
# with a little jitter. The caption then fixes the path almost exactly: a model trained for 90 minutes on two CPU
# cores learns a caption -> clip mapping of low entropy; with starts drawn over the whole frame (the first design)
# its samples stayed a speckled cloud of the right colour, with no committed position or motion.
START_JITTER = 0.05
ACROSS = {1: (0.5,), 2: (0.32, 0.68)}


def _motion(rng: random.Random, colour: str, across_centre: float = 0.5) -> ShapeMotion:
    direction = rng.choice(list(DIRECTIONS))
    modifier = rng.choice([None, None, *MODIFIERS])  # half the clips plain, a quarter each modifier
    size = rng.uniform(0.11, 0.17) * (0.7 if modifier == "growing" else 1.0)
    dx, dy = DIRECTIONS[direction]
    margin = size * (2.0 if modifier == "growing" else 1.0) + 0.03
    travel = min(rng.uniform(0.4, 0.5), 1.0 - 2 * margin - START_JITTER)  # the whole path stays inside the frame
    along = margin + rng.uniform(0.0, START_JITTER)
    across = min(max(across_centre + rng.uniform(-START_JITTER, START_JITTER), margin + 0.08), 1.0 - margin - 0.08)
    if dx:
        start = (along if dx > 0 else 1.0 - along, across)
    else:
        start = (across, along if dy > 0 else 1.0 - along)
    return ShapeMotion(rng.choice(SHAPES), colour, direction, modifier, start, size, travel)


def _centre(obj: ShapeMotion, t: float) -> tuple[float, float]:
    dx, dy = DIRECTIONS[obj.direction]
    return obj.start[0] + dx * obj.travel * t, obj.start[1] + dy * obj.travel * t


def _paths_meet(a: ShapeMotion, b: ShapeMotion) -> bool:
    reach = sum(o.size * (2.0 if o.modifier == "growing" else 1.35) + (0.12 if o.modifier == "bouncing" else 0.0) for o in (a, b))
    return any(np.hypot(*np.subtract(_centre(a, t), _centre(b, t))) < reach for t in np.linspace(0, 1, 9))


def clip_spec(seed: int, two_object_prob: float = 0.0) -> ClipSpec:
    """The clip for `seed`: same seed, same clip and caption, at any resolution."""
    rng = random.Random(seed)
    count = 2 if rng.random() < two_object_prob else 1
    colours = rng.sample(list(COLOURS), count)
    objects = tuple(_motion(rng, colour, across) for colour, across in zip(colours, ACROSS[count]))
    for _ in range(100 if count == 2 else 0):  # two objects never overlap, so each stays visible and trackable
        if not _paths_meet(*objects):
            break
        objects = (objects[0], _motion(rng, colours[1], ACROSS[2][1]))
    else:
        objects = objects[:1]  # no room for a second path next to the first: a one-object clip
    background = tuple(rng.uniform(0.0, 0.22) for _ in range(3))
    return ClipSpec(objects, background, rng.choice(TEXTURES), rng.randrange(2**31))


def parse_caption(caption: str) -> tuple[ShapeMotion, ...]:
    """The objects a caption names (placement left at defaults); the inverse of `ClipSpec.caption`."""
    words = caption.strip().lower().split()
    objects, i = [], 0
    while i < len(words):
        if words[i : i + 1] == ["and"]:
            i += 1
        if len(words) < i + 5 or words[i] != "a" or words[i + 3] != "moving":
            raise ValueError(f"Caption {caption!r} does not follow the grammar 'a <colour> <shape> moving <direction> [and bouncing|growing]'; write it that way.")
        colour, shape, direction = words[i + 1], words[i + 2], words[i + 4]
        if colour not in COLOURS or shape not in SHAPES or direction not in DIRECTIONS:
            raise ValueError(f"Caption {caption!r} names an unknown colour, shape or direction; use {list(COLOURS)}, {list(SHAPES)}, {list(DIRECTIONS)}.")
        i += 5
        modifier = None
        if words[i : i + 2] and words[i] == "and" and i + 1 < len(words) and words[i + 1] in MODIFIERS:
            modifier, i = words[i + 1], i + 2
        objects.append(ShapeMotion(shape, colour, direction, modifier))
    return tuple(objects)


def _coverage(obj: ShapeMotion, t: float, xs: np.ndarray, ys: np.ndarray, scale: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of `obj` at time t in [0, 1] (pixel centres xs, ys in frame fractions)."""
    dx, dy = DIRECTIONS[obj.direction]
    cx, cy = _centre(obj, t)
    size = obj.size * (1.0 + t if obj.modifier == "growing" else 1.0)
    if obj.modifier == "bouncing":  # hop across the motion: |sin| makes it bounce off a baseline twice per clip
        hop = 0.12 * abs(np.sin(2.0 * np.pi * t))
        cx, cy = cx - abs(dy) * hop, cy - abs(dx) * hop
    u, v = xs - cx, ys - cy
    if obj.shape == "circle":
        distance = np.sqrt(u**2 + v**2) - size
    elif obj.shape == "square":
        distance = np.maximum(np.abs(u), np.abs(v)) - size * 0.9
    else:  # upward equilateral triangle, apex at -1.25 size and base at +0.75 size: max over its edge half-planes
        side = (1.732 * np.abs(u) - (v + 1.25 * size)) / 2.0
        distance = np.maximum(v - 0.75 * size, side)
    return np.clip(0.5 - distance * scale, 0.0, 1.0)  # scale = pixels per frame unit: a 1-pixel soft edge


def _background(spec: ClipSpec, height: int, width: int) -> np.ndarray:
    image = np.broadcast_to(np.asarray(spec.background, dtype=np.float32)[:, None, None], (3, height, width)).copy()
    if spec.texture == "noise":  # smooth low-amplitude blotches: bilinear upsampling of a coarse random grid
        coarse = np.random.default_rng(spec.texture_seed).uniform(-0.06, 0.06, (1, 1, 6, 6)).astype(np.float32)
        smooth = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(height, width), mode="bilinear", align_corners=True)
        image += smooth[0].numpy()
    elif spec.texture == "stripes":
        rng = np.random.default_rng(spec.texture_seed)
        period, angle = rng.uniform(0.15, 0.35), rng.uniform(0, np.pi)
        ys, xs = np.mgrid[0:height, 0:width] / np.float32(max(height, width))
        image += 0.05 * np.sin(2 * np.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / period).astype(np.float32)
    return image


def render(spec: ClipSpec, num_frames: int = 8, height: int = 64, width: int = 64) -> torch.Tensor:
    """The clip as a float tensor in [-1, 1], shape (3, F, H, W)."""
    if num_frames < 2 or height < 8 or width < 8:
        raise ValueError(f"A clip of {num_frames} frames of {height}x{width} is too small to show motion; use at least 2 frames of 8x8.")
    scale = float(max(height, width))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    xs, ys = (xs + 0.5) / scale, (ys + 0.5) / scale  # square pixels: fractions of the longer side
    background = _background(spec, height, width)
    frames = np.empty((3, num_frames, height, width), dtype=np.float32)
    for f in range(num_frames):
        image = background.copy()
        for obj in spec.objects:
            alpha = _coverage(obj, f / (num_frames - 1), xs, ys, scale)[None]
            image = image * (1 - alpha) + np.asarray(COLOURS[obj.colour], dtype=np.float32)[:, None, None] * alpha
        frames[:, f] = image
    return torch.from_numpy(np.clip(frames, 0.0, 1.0) * 2.0 - 1.0)


def batch(seeds: list[int], num_frames: int, height: int, width: int, two_object_prob: float = 0.0) -> tuple[torch.Tensor, list[str]]:
    """Clips for `seeds` stacked to (B, 3, F, H, W), with their captions."""
    specs = [clip_spec(seed, two_object_prob) for seed in seeds]
    return torch.stack([render(s, num_frames, height, width) for s in specs]), [s.caption for s in specs]
