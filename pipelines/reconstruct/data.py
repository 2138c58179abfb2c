"""SynthDeform4D: seeded synthetic deforming shapes with analytic occupancy and exact correspondences.

Each sequence is a canonical shape (sphere, ellipsoid or torus, in a random orientation) carried through `FRAMES`
frames by a time-varying map phi_t built from exactly invertible pieces, applied in this order:

1. twist about z: (x, y) rotated by the angle k(t) z;
2. taper: (x, y) scaled by 1 + alpha(t) z;
3. two shear waves: x += a(t) sin(w1 y + psi1), then z += b(t) sin(w2 x + psi2) (each inverse subtracts);
4. a rigid pose: a rotation about a fixed axis by an angle that sweeps linearly, then a translation.

The non-rigid amplitudes and the translation follow one signal g(t) = sin(2 pi f t / (FRAMES - 1) + phase), so frame
0 is already posed and deformed. Everything is a pure function of (split, index): `sequence()` only draws
parameters, and the ground truth (occupancy, surface samples, meshes) is computed from them on demand. Occupancy
at frame t is the canonical shape's analytic inside test at phi_t^-1(q), and surface samples and mesh vertices are
phi_t of fixed canonical points, so correspondences across frames are exact.

Units: the box [-0.5, 0.5]^3. Parameter ranges are chosen so that every frame of every sequence lies in the ball of
radius 0.45 (see `_FRAME_RADIUS_BOUND`), hence in [-0.45, 0.45]^3. Arrays returned are float32 (bool for labels).

Splits (the Motion2VecSets / OFlow D-FAUST setup in miniature): `train` and `val` draw from the seen ranges;
`unseen_motion` draws seen shapes with a temporal frequency and phase outside the seen ranges; `unseen_shape` draws
seen motions on ellipsoids and tori whose proportions (ellipsoid aspect, torus tube ratio) lie outside them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

FRAMES = 17
SPLITS = ("train", "val", "unseen_motion", "unseen_shape")
_SPLIT_SIZES = {"train": 512, "val": 32, "unseen_motion": 32, "unseen_shape": 32}
_SEED = 20240114  # mixed with (split, index) so every sequence has its own random stream

SHAPE_KINDS = ("sphere", "ellipsoid", "torus")
SHAPE_RADIUS = (0.25, 0.31)  # bounding radius of the canonical shape
ELLIPSOID_ASPECT = {"seen": (1.0, 1.8), "unseen": (2.0, 2.6)}  # longest / shortest semi-axis
TORUS_RATIO = {"seen": (0.25, 0.45), "unseen": (0.5, 0.7)}  # tube radius / major radius
FREQUENCY = {"seen": (0.5, 1.0), "unseen": (1.1, 1.5)}  # periods of g(t) over the sequence
PHASE = {"seen": (0.0, 1.5 * math.pi), "unseen": (1.5 * math.pi, 2.0 * math.pi)}  # radians
TWIST_MAX = 4.0  # radians per unit length of z: up to +-1.24 rad between a shape's top and its centre
TAPER_MAX = 1.0  # per unit length of z: |alpha z| <= 0.31 on a shape, < 0.95 anywhere in the box (inverse stays exact)
SHEAR_MAX = 0.035  # amplitude of each shear wave
WAVE_NUMBER = (4.0, 10.0)  # radians per unit length
TRANSLATION_MAX = 0.03
ROTATION_SWEEP_MAX = math.pi / 3  # total rigid rotation over the sequence


def _tapered_radius(rho: float, taper: float) -> float:
    """max |taper(p)| over |p| <= rho: the taper keeps z and scales the (x, y) radius sqrt(rho^2 - z^2) by 1 + taper z."""
    z = np.linspace(-rho, rho, 100_001)
    return float(np.sqrt((rho**2 - z**2) * (1 + abs(taper) * z) ** 2 + z**2).max()) + 1e-6  # + grid error


# For |p| <= rho: the twist and the rotation keep norms, the taper is bounded above and each shear wave moves a
# point by at most its amplitude, so every frame lies within this radius.
_FRAME_RADIUS_BOUND = _tapered_radius(SHAPE_RADIUS[1], TAPER_MAX) + 2 * SHEAR_MAX + TRANSLATION_MAX
assert _FRAME_RADIUS_BOUND <= 0.45, _FRAME_RADIUS_BOUND

# Partial input: an orthographic camera looking along VIEW_DIRECTION (camera -> object), yawed 45 degrees about z
# and tilted down, as the Motion2VecSets depth renders yaw the object by 45 degrees.
VIEW_DIRECTION = tuple((np.array([-1.0, -1.0, -0.6]) / np.linalg.norm([-1.0, -1.0, -0.6])).tolist())
DEPTH_RESOLUTION = 64  # z-buffer pixels per side over [-0.5, 0.5]^2 of the image plane
DEPTH_TOLERANCE = 2.0 / DEPTH_RESOLUTION  # a sample survives within this depth of its pixel's nearest sample
_PARTIAL_SAMPLES = 32768  # dense surface samples splatted per frame: ~9 per covered pixel, so few pixels stay empty


@dataclass(frozen=True)
class ShapeParams:
    """A canonical shape: its kind, its dimensions and its orientation.

    `dims` is (r,) for a sphere, the semi-axes (a, b, c) for an ellipsoid and (R, r) (major radius, tube radius,
    axis z) for a torus, in the shape's own frame; `orientation` is a rotation vector (axis times angle, radians)
    that turns the shape's own frame into the canonical frame.
    """

    kind: str
    dims: tuple[float, ...]
    orientation: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def bounding_radius(self) -> float:
        return sum(self.dims) if self.kind == "torus" else max(self.dims)

    def _rotation(self) -> np.ndarray:
        return Rotation.from_rotvec(self.orientation).as_matrix()  # canonical = local @ R.T

    def implicit(self, points: np.ndarray) -> np.ndarray:
        """Negative inside, zero on the surface, positive outside, in canonical coordinates (N, 3) -> (N,).

        The exact signed distance for the sphere and the torus; for the ellipsoid the first-order distance
        k0 (k0 - 1) / k1 with k0 = |p / axes|, k1 = |p / axes^2|, whose zero set is exact.
        """
        p = np.asarray(points, dtype=np.float64) @ self._rotation()  # (N, 3) in the shape's own frame
        if self.kind == "sphere":
            return np.linalg.norm(p, axis=1) - self.dims[0]
        if self.kind == "ellipsoid":
            axes = np.asarray(self.dims)
            k0 = np.linalg.norm(p / axes, axis=1)
            k1 = np.maximum(np.linalg.norm(p / axes**2, axis=1), 1e-12)
            return k0 * (k0 - 1.0) / k1
        if self.kind == "torus":
            major, tube = self.dims
            return np.hypot(np.hypot(p[:, 0], p[:, 1]) - major, p[:, 2]) - tube
        raise ValueError(f"Unknown shape kind {self.kind!r}; expected one of {SHAPE_KINDS}.")

    def inside(self, points: np.ndarray) -> np.ndarray:
        """The analytic inside test in canonical coordinates: (N, 3) -> bool (N,)."""
        return self.implicit(points) < 0.0

    def sample_surface(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n points uniform by area on the exact surface, canonical coordinates, float64 (n, 3)."""
        out, have = [], 0
        while have < n:  # rejection sampling for the ellipsoid and torus: keep drawing until n are accepted
            batch = self._sample_surface_batch(int(1.3 * (n - have)) + 64, rng)  # acceptance is 0.6-1
            out.append(batch)
            have += len(batch)
        return np.concatenate(out)[:n] @ self._rotation().T

    def _sample_surface_batch(self, m: int, rng: np.random.Generator) -> np.ndarray:
        if self.kind in ("sphere", "ellipsoid"):
            u = rng.standard_normal((m, 3))
            u /= np.linalg.norm(u, axis=1, keepdims=True)
            axes = np.broadcast_to(np.asarray(self.dims), (3,))
            # The map u -> axes * u stretches the sphere's area element by |det D| |D^-1 u|; accept in proportion.
            stretch = np.linalg.norm(u / axes, axis=1) * axes.min()
            return (u * axes)[rng.random(m) < stretch]
        major, tube = self.dims
        a, b = rng.uniform(0.0, 2 * math.pi, (2, m))
        keep = rng.random(m) < (major + tube * np.cos(b)) / (major + tube)  # area element (R + r cos b)
        a, b = a[keep], b[keep]
        ring = major + tube * np.cos(b)
        return np.stack([ring * np.cos(a), ring * np.sin(a), tube * np.sin(b)], axis=1)

    def mesh(self) -> tuple[np.ndarray, np.ndarray]:
        """The canonical mesh, vertices on the exact surface: float64 (V, 3) and int64 (F, 3), faces outward."""
        vertices, faces = _canonical_mesh(self)
        return vertices.copy(), faces.copy()


@functools.lru_cache(maxsize=1)
def _unit_icosphere() -> tuple[np.ndarray, np.ndarray]:
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=4)  # 2562 vertices, 5120 faces
    return np.asarray(sphere.vertices, dtype=np.float64), np.asarray(sphere.faces, dtype=np.int64)


@functools.lru_cache(maxsize=64)
def _canonical_mesh(shape: ShapeParams) -> tuple[np.ndarray, np.ndarray]:
    import trimesh

    if shape.kind == "torus":
        torus = trimesh.creation.torus(*shape.dims, major_sections=64, minor_sections=32)  # 2048 vertices
        local, faces = np.asarray(torus.vertices, dtype=np.float64), np.asarray(torus.faces, dtype=np.int64)
    else:
        unit, faces = _unit_icosphere()
        local = unit * np.broadcast_to(np.asarray(shape.dims), (3,))
    return local @ shape._rotation().T, faces


@dataclass(frozen=True)
class MotionParams:
    """The deformation phi_t: amplitudes at g = 1, the signal g's frequency and phase, and the rigid pose.

    frequency: periods of g(t) = sin(2 pi frequency t / (frames - 1) + phase) over the sequence.
    twist: k(t) = twist g(t), radians per unit z. taper: alpha(t) = taper g(t), per unit z.
    shear: peak amplitudes (a, b) of x += a(t) sin(w1 y + psi1) and z += b(t) sin(w2 x + psi2), with
    wave_number (w1, w2) and wave_phase (psi1, psi2).
    The rigid pose rotates about `rotation_axis` (unit) by rotation_start + rotation_sweep t / (frames - 1),
    then translates by translation g(t).
    """

    frequency: float
    phase: float
    twist: float
    taper: float
    shear: tuple[float, float]
    wave_number: tuple[float, float]
    wave_phase: tuple[float, float]
    rotation_axis: tuple[float, float, float]
    rotation_start: float
    rotation_sweep: float
    translation: tuple[float, float, float]

    def signal(self, t: int, frames: int) -> float:
        return math.sin(2 * math.pi * self.frequency * t / (frames - 1) + self.phase)

    def rotation(self, t: int, frames: int) -> np.ndarray:
        angle = self.rotation_start + self.rotation_sweep * t / (frames - 1)
        return Rotation.from_rotvec(np.asarray(self.rotation_axis) * angle).as_matrix()


@dataclass(frozen=True)
class DeformingSequence:
    """One sequence: a canonical shape, its motion, and the ground truth of every frame computed from them."""

    shape: ShapeParams
    motion: MotionParams
    frames: int = FRAMES

    def _check_frame(self, t: int) -> None:
        if not isinstance(t, (int, np.integer)) or not 0 <= t < self.frames:
            raise ValueError(f"Frame t={t!r} is out of range; expected an integer in [0, {self.frames - 1}].")

    def forward(self, points: np.ndarray, t: int) -> np.ndarray:
        """phi_t: canonical points (N, 3) -> their positions at frame t, float32 (N, 3)."""
        self._check_frame(t)
        p = _as_points(points).copy()
        m, g = self.motion, self.motion.signal(t, self.frames)
        angle = m.twist * g * p[:, 2]
        c, s = np.cos(angle), np.sin(angle)
        p[:, 0], p[:, 1] = c * p[:, 0] - s * p[:, 1], s * p[:, 0] + c * p[:, 1]
        p[:, :2] *= (1.0 + m.taper * g * p[:, 2])[:, None]
        p[:, 0] += m.shear[0] * g * np.sin(m.wave_number[0] * p[:, 1] + m.wave_phase[0])
        p[:, 2] += m.shear[1] * g * np.sin(m.wave_number[1] * p[:, 0] + m.wave_phase[1])
        p = p @ m.rotation(t, self.frames).T + np.asarray(m.translation) * g
        return p.astype(np.float32)

    def inverse(self, points: np.ndarray, t: int) -> np.ndarray:
        """phi_t^-1: points at frame t (N, 3) -> canonical points, float32 (N, 3). Exact wherever the taper's
        1 + alpha(t) z stays positive, which holds for every point within distance 0.9 of the origin (the box)."""
        self._check_frame(t)
        return self._inverse64(points, t).astype(np.float32)

    def _inverse64(self, points: np.ndarray, t: int) -> np.ndarray:
        m, g = self.motion, self.motion.signal(t, self.frames)
        p = (_as_points(points) - np.asarray(m.translation) * g) @ m.rotation(t, self.frames)
        p[:, 2] -= m.shear[1] * g * np.sin(m.wave_number[1] * p[:, 0] + m.wave_phase[1])
        p[:, 0] -= m.shear[0] * g * np.sin(m.wave_number[0] * p[:, 1] + m.wave_phase[0])
        p[:, :2] /= (1.0 + m.taper * g * p[:, 2])[:, None]
        angle = -m.twist * g * p[:, 2]
        c, s = np.cos(angle), np.sin(angle)
        p[:, 0], p[:, 1] = c * p[:, 0] - s * p[:, 1], s * p[:, 0] + c * p[:, 1]
        return p

    def transfer(self, points: np.ndarray, source: int, target: int) -> np.ndarray:
        """Points at frame `source` (N, 3) -> the same material points at frame `target`, float32 (N, 3)."""
        self._check_frame(source)
        return self.forward(self._inverse64(points, source), target)

    def occupancy(self, points: np.ndarray, t: int) -> np.ndarray:
        """Analytic occupancy at frame t: bool (N,), True inside."""
        self._check_frame(t)
        return self.shape.inside(self._inverse64(points, t))

    def surface(self, n: int, seed: int) -> np.ndarray:
        """The same n canonical surface samples (drawn from `seed`) at every frame: float32 (T, n, 3); row i of
        every frame is the same material point."""
        canonical = self.shape.sample_surface(n, np.random.default_rng(seed))
        return np.stack([self.forward(canonical, t) for t in range(self.frames)])

    def mesh(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """The ground-truth mesh at frame t: float32 vertices (V, 3) and int64 faces (F, 3), the same faces and
        vertex order at every frame (2562 vertices for spheres and ellipsoids, 2048 for tori)."""
        vertices, faces = self.shape.mesh()
        return self.forward(vertices, t), faces

    def volume_points(self, n: int, seed: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        """n points uniform in the box (drawn from (seed, t)) and their occupancy at frame t: float32 (n, 3), bool (n,)."""
        self._check_frame(t)
        points = np.random.default_rng([seed, t]).uniform(-0.5, 0.5, (n, 3)).astype(np.float32)
        return points, self.occupancy(points, t)

    def near_surface_points(self, n: int, seed: int, t: int, sigma: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
        """n frame-t surface samples plus Gaussian noise of std `sigma` (drawn from (seed, t)), clipped to the box,
        and their occupancy: float32 (n, 3), bool (n,)."""
        self._check_frame(t)
        rng = np.random.default_rng([seed, t, 1])
        surface = self.forward(self.shape.sample_surface(n, rng), t)
        points = np.clip(surface + rng.normal(0.0, sigma, surface.shape), -0.5, 0.5).astype(np.float32)
        return points, self.occupancy(points, t)


def _as_points(points: np.ndarray) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"Expected points of shape (N, 3), got {p.shape}; pass one point per row.")
    return p


def split_size(split: str) -> int:
    """The number of sequences in a split: train 512, val 32, unseen_motion 32, unseen_shape 32."""
    if split not in _SPLIT_SIZES:
        raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
    return _SPLIT_SIZES[split]


def sequence(split: str, index: int) -> DeformingSequence:
    """Sequence `index` of `split`, a pure function of the two (only parameters are drawn: this is cheap)."""
    size = split_size(split)
    if not isinstance(index, (int, np.integer)) or not 0 <= index < size:
        raise ValueError(
            f"Index {index!r} is out of range for split {split!r}; expected an integer in [0, {size - 1}]."
        )
    rng = np.random.default_rng([_SEED, SPLITS.index(split), int(index)])
    shape = _draw_shape(rng, "unseen" if split == "unseen_shape" else "seen")
    motion = _draw_motion(rng, "unseen" if split == "unseen_motion" else "seen")
    return DeformingSequence(shape, motion)


def _draw_shape(rng: np.random.Generator, ranges: str) -> ShapeParams:
    # Spheres have no proportions to hold out, so the unseen-shape split draws only ellipsoids and tori.
    kind = str(rng.choice(SHAPE_KINDS if ranges == "seen" else ("ellipsoid", "torus")))
    rho = rng.uniform(*SHAPE_RADIUS)
    orientation = tuple(Rotation.from_quat(_unit(rng.standard_normal(4))).as_rotvec().tolist())
    if kind == "sphere":
        dims = (rho,)
    elif kind == "ellipsoid":
        aspect = rng.uniform(*ELLIPSOID_ASPECT[ranges])
        dims = (rho, rho * rng.uniform(1.0 / aspect, 1.0), rho / aspect)
    else:
        ratio = rng.uniform(*TORUS_RATIO[ranges])
        dims = (rho / (1.0 + ratio), rho * ratio / (1.0 + ratio))
    return ShapeParams(kind, tuple(float(d) for d in dims), orientation)


def _draw_motion(rng: np.random.Generator, ranges: str) -> MotionParams:
    return MotionParams(
        frequency=float(rng.uniform(*FREQUENCY[ranges])),
        phase=float(rng.uniform(*PHASE[ranges])),
        twist=float(rng.uniform(-TWIST_MAX, TWIST_MAX)),
        taper=float(rng.uniform(-TAPER_MAX, TAPER_MAX)),
        shear=tuple(rng.uniform(-SHEAR_MAX, SHEAR_MAX, 2).tolist()),
        wave_number=tuple(rng.uniform(*WAVE_NUMBER, 2).tolist()),
        wave_phase=tuple(rng.uniform(0.0, 2 * math.pi, 2).tolist()),
        rotation_axis=tuple(_unit(rng.standard_normal(3)).tolist()),
        rotation_start=float(rng.uniform(0.0, 2 * math.pi)),
        rotation_sweep=float(rng.uniform(-ROTATION_SWEEP_MAX, ROTATION_SWEEP_MAX)),
        translation=tuple((_unit(rng.standard_normal(3)) * rng.uniform(0.0, TRANSLATION_MAX)).tolist()),
    )


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def sparse_input(seq: DeformingSequence, n_points: int = 128, noise: float = 0.003, seed: int = 0) -> np.ndarray:
    """Sparse input: the same n surface points in every frame (`seq.surface(n_points, seed)`, so row i is one
    material point throughout) plus Gaussian noise of std `noise`, clipped to the box: float32 (T, n, 3)."""
    points = seq.surface(n_points, seed)
    if noise > 0:
        points = points + np.random.default_rng([seed, 1]).normal(0.0, noise, points.shape)
    return np.clip(points, -0.5, 0.5).astype(np.float32)


def partial_input(seq: DeformingSequence, n_points: int = 128, noise: float = 0.003, seed: int = 0) -> np.ndarray:
    """Partial input: what an orthographic depth camera looking along VIEW_DIRECTION sees, float32 (T, n, 3).

    Each frame draws its own dense surface samples, splats them into a DEPTH_RESOLUTION^2 z-buffer over
    [-0.5, 0.5]^2 of the image plane, keeps those within DEPTH_TOLERANCE of their pixel's nearest sample, draws
    n of them and adds Gaussian noise of std `noise`. Rows do not correspond across frames.
    """
    view = np.asarray(VIEW_DIRECTION)
    right = _unit(np.cross(view, [0.0, 0.0, 1.0]))
    up = np.cross(right, view)
    frames = []
    for t in range(seq.frames):
        rng = np.random.default_rng([seed, t, 2])
        dense = seq.forward(seq.shape.sample_surface(max(_PARTIAL_SAMPLES, 16 * n_points), rng), t)
        depth = dense @ view
        pixel = np.clip(((dense @ np.stack([right, up], axis=1)) + 0.5) * DEPTH_RESOLUTION, 0, DEPTH_RESOLUTION - 1)
        pixel = pixel.astype(np.int64) @ np.array([DEPTH_RESOLUTION, 1])
        nearest = np.full(DEPTH_RESOLUTION**2, np.inf)
        np.minimum.at(nearest, pixel, depth)
        visible = np.flatnonzero(depth <= nearest[pixel] + DEPTH_TOLERANCE)
        chosen = rng.choice(visible, n_points, replace=len(visible) < n_points)
        frames.append(dense[chosen] + rng.normal(0.0, noise, (n_points, 3)) if noise > 0 else dense[chosen])
    return np.clip(np.stack(frames), -0.5, 0.5).astype(np.float32)
