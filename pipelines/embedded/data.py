"""Procedural training clips for the embedded model: coloured shapes moving over textured, camera-moved backgrounds.

Clips have the statistics that make real video DiTs' heads sparse (issue 16): a structured background (a gradient,
value noise of several octaves, tiles or stripes; low in saturation so the objects stay detectable) seen through a
camera that pans or zooms, so a patch is best predicted from its neighbourhood and from the same place, slightly
moved, in nearby frames; and one to three objects with their own motion, which may occlude each other.

Every clip is a pure function of its seed (`clip_spec(seed)`), and its caption is written from the same parameters
(`"a red circle moving right"`, `"a blue square moving up and growing and a green triangle moving left with camera
panning down"`), so the caption is the ground truth that `detector.py` checks generated clips against. Positions,
sizes and speeds are fractions of the frame, so one spec renders at any resolution: frames are float tensors in
[-1, 1] of shape (3, F, H, W).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # saturated RGB in [0, 1]; backgrounds are greys of low saturation, so every object stands out
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
# Camera motion, stated at the end of a caption ("with camera panning left"); "static" is not stated.
CAMERAS = ("static", "panning left", "panning right", "panning up", "panning down", "zooming in", "zooming out")
CAMERA_WEIGHTS = (0.3, 0.125, 0.125, 0.125, 0.125, 0.1, 0.1)
PAN = 0.3  # a pan moves the view by this share of the frame over the clip
ZOOM = 1.5  # a zoom scales the view by this factor over the clip
TEXTURES = ("noise", "tiles", "stripes")  # every background has a gradient and value noise; tiles or stripes on top
# Every word a caption can use, in a fixed order (the tokenizer's vocabulary is built from it).
CAPTION_WORDS = ("a", "moving", "and", *SHAPES, *COLOURS, *DIRECTIONS, *MODIFIERS, "with", "camera", "panning", "zooming", "in", "out")


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
    """A whole clip: its objects (one to three, of different colours, drawn in order so later ones occlude earlier
    ones), the background they move over and the camera that films the background."""

    objects: tuple[ShapeMotion, ...]
    background: tuple[float, float, float]
    texture: str = "noise"
    texture_seed: int = 0
    camera: str = "static"

    @property
    def caption(self) -> str:
        words = " and ".join(obj.phrase() for obj in self.objects)
        return words if self.camera == "static" else f"{words} with camera {self.camera}"


# Where a path runs: it starts on the far side of its direction, centred across it (two or three objects take their
# share of the frame), with a little jitter. The caption then fixes the path almost exactly: a model trained for
# 90 minutes on two CPU cores learns a caption -> clip mapping of low entropy; with starts drawn over the whole frame
# (the first design) its samples stayed a speckled cloud of the right colour, with no committed position or motion.
START_JITTER = 0.05
ACROSS = {1: (0.5,), 2: (0.32, 0.68), 3: (0.25, 0.5, 0.75)}


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


def _covers(a: ShapeMotion, b: ShapeMotion) -> bool:
    """Whether `a` and `b` sit on each other for most of the clip (then one would hide the other for good)."""
    reach = 0.6 * (a.size + b.size)
    return sum(np.hypot(*np.subtract(_centre(a, t), _centre(b, t))) < reach for t in np.linspace(0, 1, 9)) > 3


def clip_spec(seed: int, multi_object_prob: float = 0.0) -> ClipSpec:
    """The clip for `seed`: same seed, same clip and caption, at any resolution. A share `multi_object_prob` of clips
    has two or three objects (two in three of those two); their paths may cross, so one occludes the other for a
    while, but never for most of the clip."""
    rng = random.Random(seed)
    count = (2 if rng.random() < 2 / 3 else 3) if rng.random() < multi_object_prob else 1
    colours = rng.sample(list(COLOURS), count)
    across = list(ACROSS[count])
    rng.shuffle(across)
    objects = [_motion(rng, colour, where) for colour, where in zip(colours, across)]
    for i in range(1, count):  # redraw a path that would hide behind (or hide) an earlier one for most of the clip
        for _ in range(50):
            if not any(_covers(objects[i], other) for other in objects[:i]):
                break
            objects[i] = _motion(rng, colours[i], across[i])
    objects = [o for i, o in enumerate(objects) if not any(_covers(o, other) for other in objects[:i])]
    grey = rng.uniform(0.12, 0.38)
    background = tuple(grey + rng.uniform(-0.03, 0.03) for _ in range(3))  # a faint tint: low saturation
    camera = rng.choices(CAMERAS, weights=CAMERA_WEIGHTS)[0]
    return ClipSpec(tuple(objects), background, rng.choice(TEXTURES), rng.randrange(2**31), camera)


def parse_caption(caption: str) -> tuple[ShapeMotion, ...]:
    """The objects a caption names (placement left at defaults); the inverse of `ClipSpec.caption` for the objects
    (see `parse_camera` for the camera)."""
    words = caption.strip().lower().split()
    if "with" in words:
        words = words[: words.index("with")]
    objects, i = [], 0
    while i < len(words):
        if words[i : i + 1] == ["and"]:
            i += 1
        if len(words) < i + 5 or words[i] != "a" or words[i + 3] != "moving":
            raise ValueError(
                f"Caption {caption!r} does not follow the grammar 'a <colour> <shape> moving <direction> [and bouncing|growing]"
                " [and a ...] [with camera panning <direction>|zooming in|zooming out]'; write it that way."
            )
        colour, shape, direction = words[i + 1], words[i + 2], words[i + 4]
        if colour not in COLOURS or shape not in SHAPES or direction not in DIRECTIONS:
            raise ValueError(f"Caption {caption!r} names an unknown colour, shape or direction; use {list(COLOURS)}, {list(SHAPES)}, {list(DIRECTIONS)}.")
        i += 5
        modifier = None
        if words[i : i + 2] and words[i] == "and" and i + 1 < len(words) and words[i + 1] in MODIFIERS:
            modifier, i = words[i + 1], i + 2
        objects.append(ShapeMotion(shape, colour, direction, modifier))
    return tuple(objects)


def parse_camera(caption: str) -> str:
    """The camera motion a caption states ("static" when it states none)."""
    words = caption.strip().lower().split()
    if "with" not in words:
        return "static"
    rest = " ".join(words[words.index("with") + 1 :])
    camera = rest.removeprefix("camera ").strip()
    if not rest.startswith("camera ") or camera not in CAMERAS[1:]:
        raise ValueError(f"Caption {caption!r} ends in 'with {rest}'; write 'with camera' and one of {list(CAMERAS[1:])}.")
    return camera


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


WORLD = 2.0  # the background is a square of this many frame widths, centred on the frame; cameras stay inside it


def _world_texture(spec: ClipSpec, size: int) -> torch.Tensor:
    """The background over the whole world square, (1, 3, size, size): the base grey, a gradient, value noise of three
    octaves (bilinear upsampling of coarse random grids) and tiles or stripes; greys only, plus the base tint."""
    rng = np.random.default_rng(spec.texture_seed)
    ys, xs = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size * WORLD  # world units
    angle = rng.uniform(0, 2 * np.pi)
    grey = 0.08 * np.sin(angle) * (xs - WORLD / 2) + 0.08 * np.cos(angle) * (ys - WORLD / 2)
    for cells, amplitude in ((4, 0.08), (10, 0.05), (24, 0.035)):
        coarse = torch.from_numpy(rng.uniform(-amplitude, amplitude, (1, 1, cells, cells)).astype(np.float32))
        grey = grey + torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)[0, 0].numpy()
    if spec.texture == "tiles":  # a checkerboard of soft-edged tiles, a tenth to a fifth of the frame wide
        period = rng.uniform(0.1, 0.2)
        grey = grey + 0.06 * np.tanh(4 * np.sin(np.pi * xs / period) * np.sin(np.pi * ys / period))
    elif spec.texture == "stripes":
        period, theta = rng.uniform(0.12, 0.3), rng.uniform(0, np.pi)
        grey = grey + 0.06 * np.sin(2 * np.pi * (xs * np.cos(theta) + ys * np.sin(theta)) / period)
    image = np.asarray(spec.background, dtype=np.float32)[:, None, None] + grey[None]
    return torch.from_numpy(np.clip(image, 0.02, 0.55).astype(np.float32))[None]


def camera_view(camera: str, t: float) -> tuple[float, float, float]:
    """(centre x, centre y, width) of the frame in world units at time t in [0, 1]; the frame is 1 x 1 at rest."""
    c = WORLD / 2
    if camera.startswith("panning"):
        dx, dy = DIRECTIONS[camera.split()[1]]
        return c + dx * PAN * (t - 0.5), c + dy * PAN * (t - 0.5), 1.0
    if camera.startswith("zooming"):  # zooming in: the view narrows, so the background grows
        sign = -1.0 if camera == "zooming in" else 1.0
        return c, c, float(ZOOM ** (sign * (t - 0.5)))
    return c, c, 1.0


def _background(spec: ClipSpec, num_frames: int, height: int, width: int) -> np.ndarray:
    """The background of every frame, (F, 3, H, W): the world texture sampled through the camera's view."""
    scale = float(max(height, width))
    texture = _world_texture(spec, int(WORLD * scale * 2))  # two texels per pixel at rest: no aliasing on zoom-out
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    xs, ys = (xs + 0.5) / scale - width / scale / 2, (ys + 0.5) / scale - height / scale / 2  # frame units, centred
    grids = []
    for f in range(num_frames):
        cx, cy, view = camera_view(spec.camera, f / (num_frames - 1))
        gx, gy = (cx + xs * view) / WORLD * 2 - 1, (cy + ys * view) / WORLD * 2 - 1  # grid_sample's [-1, 1]
        grids.append(np.stack([gx, gy], axis=-1))
    grid = torch.from_numpy(np.stack(grids).astype(np.float32))
    frames = torch.nn.functional.grid_sample(texture.expand(num_frames, -1, -1, -1), grid, mode="bilinear", align_corners=False)
    return frames.numpy()


def render(spec: ClipSpec, num_frames: int = 8, height: int = 64, width: int = 64) -> torch.Tensor:
    """The clip as a float tensor in [-1, 1], shape (3, F, H, W)."""
    if num_frames < 2 or height < 8 or width < 8:
        raise ValueError(f"A clip of {num_frames} frames of {height}x{width} is too small to show motion; use at least 2 frames of 8x8.")
    scale = float(max(height, width))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    xs, ys = (xs + 0.5) / scale, (ys + 0.5) / scale  # square pixels: fractions of the longer side
    backgrounds = _background(spec, num_frames, height, width)
    frames = np.empty((3, num_frames, height, width), dtype=np.float32)
    for f in range(num_frames):
        image = backgrounds[f]
        for obj in spec.objects:  # in order: a later object covers an earlier one where they meet
            alpha = _coverage(obj, f / (num_frames - 1), xs, ys, scale)[None]
            image = image * (1 - alpha) + np.asarray(COLOURS[obj.colour], dtype=np.float32)[:, None, None] * alpha
        frames[:, f] = image
    return torch.from_numpy(np.clip(frames, 0.0, 1.0) * 2.0 - 1.0)


def batch(seeds: list[int], num_frames: int, height: int, width: int, multi_object_prob: float = 0.0) -> tuple[torch.Tensor, list[str]]:
    """Clips for `seeds` stacked to (B, 3, F, H, W), with their captions."""
    specs = [clip_spec(seed, multi_object_prob) for seed in seeds]
    return torch.stack([render(s, num_frames, height, width) for s in specs]), [s.caption for s in specs]
