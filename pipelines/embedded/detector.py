"""Automatic checks of generated shape clips: which colour, shape, direction and modifier each object shows, and how
the camera moves.

`detect(frames)` finds the objects of one clip (numpy (F, H, W, 3) in [0, 1], as `ShapesVideoPipeline` returns
them): backgrounds are greys of low saturation, so foreground is what is saturated (or brighter than any background)
by more than `SATURATION` / `BRIGHTNESS`, and each foreground pixel takes the nearest palette colour of
`data.COLOURS`. A colour with
enough pixels is an object; its centroid track gives the direction (the larger of the net x and y displacements), its
fill of its bounding box gives the shape (square ~1, circle ~pi/4, triangle ~1/2), and its area and the track across
the motion give the modifier (growing quadruples the area, bouncing hops across the motion). `camera(frames)` reads
the camera from the background alone: the camera motion (of the caption grammar's seven) that best carries the first
frame's background onto the last one's. `score` compares one clip with its caption and
`accuracy` averages over clips.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .data import CAMERAS, COLOURS, ShapeMotion, camera_view, parse_camera, parse_caption

SATURATION = 0.3  # max - min of RGB: backgrounds have under 0.1, the palette over 0.6 (white aside)
BRIGHTNESS = 0.75  # brighter than any background (<= 0.55): white objects
MIN_OBJECT_SHARE = 0.15  # a colour needs this share of the foreground pixels to count as an object
FIELDS = ("colour", "shape", "direction", "modifier", "camera")


@dataclass
class Detection:
    """One object found in a clip; `track` holds its centroid (x, y) per frame in frame fractions (NaN if unseen)."""

    colour: str
    shape: str
    direction: str
    modifier: str | None
    pixels: int
    track: np.ndarray


def frames_from_clip(clip: torch.Tensor) -> np.ndarray:
    """A `data.render` clip (3, F, H, W) in [-1, 1] as detector input (F, H, W, 3) in [0, 1]."""
    return ((clip.clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).cpu().numpy()


def _shape(fill: float) -> str:
    return "square" if fill > 0.9 else "circle" if fill > 0.63 else "triangle"


def _describe(colour: str, masks: np.ndarray) -> Detection:
    """Direction, shape and modifier of the object whose per-frame masks are `masks` (F, H, W)."""
    frames, height, width = masks.shape
    scale = float(max(height, width))
    ys, xs = np.mgrid[0:height, 0:width]
    areas = masks.sum(axis=(1, 2))
    track = np.full((frames, 2), np.nan)
    fills = []
    for f in np.flatnonzero(areas >= 3):
        y, x = np.nonzero(masks[f])
        track[f] = ((x.mean() + 0.5) / scale, (y.mean() + 0.5) / scale)
        fills.append(areas[f] / ((x.max() - x.min() + 1) * (y.max() - y.min() + 1)))
    seen = np.flatnonzero(~np.isnan(track[:, 0]))
    if len(seen) < 2:
        return Detection(colour, _shape(float(np.median(fills))) if fills else "circle", "none", None, int(areas.sum()), track)
    (dx, dy) = track[seen[-1]] - track[seen[0]]
    if abs(dx) >= abs(dy):
        direction, across = ("right" if dx > 0 else "left"), track[seen, 1]
    else:
        direction, across = ("down" if dy > 0 else "up"), track[seen, 0]
    first, last = areas[seen[0]], areas[seen[-1]]
    if last > 2.0 * first:
        modifier = "growing"
    elif np.ptp(across) > 0.05:
        modifier = "bouncing"
    else:
        modifier = None
    return Detection(colour, _shape(float(np.median(fills))), direction, modifier, int(areas.sum()), track)


def _foreground(frames: np.ndarray) -> np.ndarray:
    """(F, H, W) bool: saturated or bright pixels (objects), not the grey background."""
    return (frames.max(axis=-1) - frames.min(axis=-1) > SATURATION) | (frames.min(axis=-1) > BRIGHTNESS)


def camera(frames: np.ndarray) -> str:
    """The camera motion of one clip (F, H, W, 3) in [0, 1]: the one of `data.CAMERAS` under which the first frame's
    background, moved as that camera moves it (`data.PAN`, `data.ZOOM`), best matches the last frame's background
    (mean squared difference over pixels that are background in both, objects and their edges left out)."""
    from scipy.ndimage import binary_dilation, map_coordinates

    frames = np.asarray(frames, dtype=np.float32)
    grey = frames.mean(axis=-1)
    keep = ~binary_dilation(_foreground(frames), structure=np.ones((1, 5, 5), dtype=bool))  # background, with a margin
    F, H, W = grey.shape
    scale = float(max(H, W))
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    u, v = (xs + 0.5) / scale - W / scale / 2, (ys + 0.5) / scale - H / scale / 2  # last frame, centred frame units
    errors = {}
    for name in CAMERAS:
        x0, y0, w0 = camera_view(name, 0.0)
        x1, y1, w1 = camera_view(name, 1.0)
        # the world point the last frame shows at (u, v), where the first frame showed it
        fu, fv = (u * w1 + x1 - x0) / w0, (v * w1 + y1 - y0) / w0
        cols, rows = (fu + W / scale / 2) * scale - 0.5, (fv + H / scale / 2) * scale - 0.5
        inside = (cols >= 0) & (cols <= W - 1) & (rows >= 0) & (rows <= H - 1)
        moved = map_coordinates(grey[0], [rows, cols], order=1, mode="nearest")
        moved_keep = map_coordinates(keep[0].astype(np.float32), [rows, cols], order=0, mode="nearest") > 0.5
        valid = inside & moved_keep & keep[-1]
        errors[name] = float(np.mean((moved - grey[-1])[valid] ** 2)) if valid.sum() >= 0.1 * H * W else np.inf
    return min(errors, key=errors.get)


def detect(frames: np.ndarray, max_objects: int = 3) -> list[Detection]:
    """The objects in one clip (F, H, W, 3) in [0, 1], largest first."""
    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"detect expects one clip of shape (F, H, W, 3), got {frames.shape}; pass pipeline output frames[i].")
    foreground = _foreground(frames)
    palette = np.asarray(list(COLOURS.values()), dtype=np.float32)  # (C, 3)
    nearest = np.linalg.norm(frames[..., None, :] - palette, axis=-1).argmin(axis=-1)  # (F, H, W)
    counts = np.bincount(nearest[foreground], minlength=len(palette))
    total = max(int(counts.sum()), 1)
    names = list(COLOURS)
    found = [c for c in np.argsort(-counts) if counts[c] >= MIN_OBJECT_SHARE * total and counts[c] > 0][:max_objects]
    return [_describe(names[c], foreground & (nearest == c)) for c in found]


def score(frames: np.ndarray, caption: str, seen_camera: str | None = None) -> dict[str, bool]:
    """Per field, whether the clip shows what the caption says (every object of it). Only as many objects are
    detected as the caption names (largest first), so stray colours in a noisy clip earn nothing. An object is matched
    to the detection of its colour; failing that (wrong colour), to the largest detection not matched yet, so that the
    motion is judged even when the colour is wrong."""
    expected = parse_caption(caption)
    detections = detect(frames, max_objects=len(expected))
    result = dict.fromkeys(FIELDS, True)
    result["camera"] = (seen_camera or camera(frames)) == parse_camera(caption)  # `seen_camera`: camera(frames), if known
    unmatched = list(detections)
    for obj in sorted(expected, key=lambda o: not any(d.colour == o.colour for d in detections)):
        match = next((d for d in unmatched if d.colour == obj.colour), unmatched[0] if unmatched else None)
        if match is None:
            return {**dict.fromkeys(FIELDS, False), "camera": result["camera"]}
        unmatched.remove(match)
        for field in FIELDS[:-1]:
            result[field] &= getattr(match, field) == getattr(obj, field)
    return result


def accuracy(videos, captions: list[str]) -> dict:
    """Share of clips right per field, and the per-clip predictions; `videos` is (B, F, H, W, 3) or a list of clips."""
    if len(videos) != len(captions):
        raise ValueError(f"Got {len(videos)} clips but {len(captions)} captions; pass one caption per clip.")
    clips = []
    for frames, caption in zip(videos, captions):
        found = detect(frames)
        seen = camera(frames)
        clips.append({"caption": caption, "predicted": [_phrase(d) for d in found], "predicted_camera": seen, **score(frames, caption, seen)})
    return {**{field: float(np.mean([c[field] for c in clips])) for field in FIELDS}, "clips": clips}


def _phrase(d: Detection) -> str:
    return ShapeMotion(d.shape, d.colour, d.direction, d.modifier).phrase()


def eval_prompts(count: int = 32) -> list[str]:
    """`count` one-object prompts: every colour with every direction (8 x 4 = 32), the shape cycling through them and
    the camera through `data.CAMERAS` (static, four pans, two zooms)."""
    from .data import DIRECTIONS, SHAPES

    pairs = [(colour, direction) for colour in COLOURS for direction in DIRECTIONS]
    prompts = []
    for i in range(count):
        colour, direction = pairs[i % len(pairs)]
        words = f"a {colour} {SHAPES[i % len(SHAPES)]} moving {direction}"
        view = CAMERAS[i % len(CAMERAS)]
        prompts.append(words if view == "static" else f"{words} with camera {view}")
    return prompts


def generate_clips(pipe, prompts: list[str], batch_size: int = 8, seed: int = 0, **call_kwargs) -> list[np.ndarray]:
    """One clip per prompt with `pipe`, in batches seeded `seed + start`: the same clips for the same arguments."""
    videos = []
    for start in range(0, len(prompts), batch_size):
        generator = torch.Generator().manual_seed(seed + start)
        videos.extend(pipe(prompts[start : start + batch_size], generator=generator, output_type="np", **call_kwargs).frames)
    return videos


def evaluate(pipe, prompts: list[str], batch_size: int = 8, seed: int = 0, **call_kwargs) -> dict:
    """Generate one clip per prompt with `pipe` (see `generate_clips`) and score them; see `accuracy`."""
    return accuracy(generate_clips(pipe, prompts, batch_size, seed, **call_kwargs), prompts)
