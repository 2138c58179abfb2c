"""Meshes from occupancy fields, the OFlow / Motion2VecSets evaluation metrics, and mesh files and videos.

`extract_mesh` runs marching cubes on a dense grid over the box [-0.5, 0.5]^3 (the original uses MISE at 128^3
effective resolution with padding 0.1; a plain grid at 64^3 is this project's stated deviation). The metrics follow
`im2mesh/eval.py` (`MeshEvaluator`): IoU from a containment test of the GT occupancy points in the predicted mesh,
Chamfer-L1 as half the sum of accuracy and completeness with unsquared distances, and correspondence L2 from each
predicted frame-0 vertex's nearest GT frame-0 surface point. All distances are in box units.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from .data import DeformingSequence

logger = logging.getLogger(__name__)

_CONTAINS_CHUNK = 20_000  # points per containment query: trimesh's ray fallback holds (points x hits) arrays


class NoSurfaceError(ValueError):
    """The occupancy field is all inside or all outside: there is no surface to mesh."""


def extract_mesh(
    occupancy_logits_fn: Callable[[np.ndarray], np.ndarray],
    resolution: int = 64,
    threshold: float = 0.0,
    batch: int = 65536,
) -> tuple[np.ndarray, np.ndarray]:
    """The level set {f = threshold} of a field over [-0.5, 0.5]^3, inside where f > threshold.

    `occupancy_logits_fn` maps float32 (M, 3) points to (M,) values; it is called on a resolution^3 grid (corners
    on the box faces, no padding) in batches of at most `batch` points. Returns float32 vertices (V, 3) in box
    coordinates and int64 faces (F, 3) with outward normals. The grid is padded with one layer of outside
    values, so the mesh is closed even where the shape reaches the box faces (a model's bad sample often does):
    an open mesh has no inside, and trimesh's containment test on one can run for many minutes.
    """
    if resolution < 2:
        raise ValueError(f"resolution={resolution!r} gives no grid cells; pass resolution=64, for example.")
    from skimage.measure import marching_cubes

    axis = np.linspace(-0.5, 0.5, resolution, dtype=np.float32)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)  # (R^3, 3), x slowest
    values = np.empty(len(grid), dtype=np.float32)
    for i in range(0, len(grid), batch):
        chunk = np.asarray(occupancy_logits_fn(grid[i : i + batch]), dtype=np.float32)
        if chunk.shape != (len(grid[i : i + batch]),):
            raise ValueError(
                f"occupancy_logits_fn returned shape {chunk.shape} for {len(grid[i : i + batch])} points; "
                "it must return one value per point, shape (M,)."
            )
        values[i : i + batch] = chunk
    inside = int((values > threshold).sum())
    if inside in (0, len(grid)):
        where = "outside" if inside == 0 else "inside"
        raise NoSurfaceError(
            f"The field has no level set at threshold={threshold}: all {len(grid)} grid points are {where} "
            f"(values in [{values.min():.4g}, {values.max():.4g}]); check the model output or the threshold."
        )
    step = 1.0 / (resolution - 1)
    # far below the level: the closing faces land on the box faces (interpolated ~1e-6 of a step outside them)
    outside = threshold - 1e6 * (abs(float(values.max()) - threshold) + 1.0)
    padded = np.pad(values.reshape(resolution, resolution, resolution), 1, constant_values=outside)
    # gradient_direction="ascent": the inside holds the larger values, and the faces wind outward.
    vertices, faces, _, _ = marching_cubes(padded, level=threshold, spacing=(step,) * 3, gradient_direction="ascent")
    return (vertices - 0.5 - step).astype(np.float32), faces.astype(np.int64)  # the pad shifted the grid by a step


@functools.lru_cache(maxsize=1)
def _warn_slow_containment() -> None:
    import trimesh

    if not trimesh.ray.has_embree:
        logger.warning(
            "sparsediff: mesh containment uses trimesh's pure-Python ray test because embreex is not installed; "
            "IoU will be slow (install embreex where a wheel exists)."
        )


def contains(vertices: np.ndarray, faces: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Which points lie inside a watertight mesh (trimesh's ray-parity test, embree-accelerated): bool (N,)."""
    import trimesh

    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    inside = np.zeros(len(points), dtype=bool)
    if len(faces) == 0:
        return inside
    _warn_slow_containment()
    mesh = trimesh.Trimesh(np.asarray(vertices, dtype=np.float64), np.asarray(faces), process=False)
    for i in range(0, len(points), _CONTAINS_CHUNK):
        inside[i : i + _CONTAINS_CHUNK] = mesh.contains(points[i : i + _CONTAINS_CHUNK])
    return inside


def mesh_iou(vertices: np.ndarray, faces: np.ndarray, points: np.ndarray, labels: np.ndarray) -> float:
    """Volumetric IoU of a watertight mesh against occupancy labels at `points` (the ONet/OFlow protocol).

    Two empty sets (nothing inside the mesh, no point labelled inside) count as a perfect match, 1.0.
    """
    labels = np.asarray(labels, dtype=bool).reshape(-1)
    if len(labels) != len(points):
        raise ValueError(f"Got {len(points)} points but {len(labels)} labels; pass one label per point.")
    inside = contains(vertices, faces, points)
    union = int((inside | labels).sum())
    return 1.0 if union == 0 else float((inside & labels).sum() / union)


def chamfer_l1(
    vertices: np.ndarray, faces: np.ndarray, gt_points: np.ndarray, n_samples: int = 100_000, seed: int = 0
) -> float:
    """Chamfer-L1 in the ONet convention: 0.5 (accuracy + completeness), unsquared Euclidean distances.

    Accuracy is the mean distance from `n_samples` points drawn uniformly (by area, from `seed`) on the predicted
    mesh to the GT surface cloud; completeness the mean distance from the GT cloud to those samples.
    """
    import trimesh

    if len(faces) == 0:
        raise ValueError("The predicted mesh has no faces, so Chamfer distance is undefined; check the extraction.")
    mesh = trimesh.Trimesh(np.asarray(vertices, dtype=np.float64), np.asarray(faces), process=False)
    samples, _ = trimesh.sample.sample_surface(mesh, n_samples, seed=seed)
    gt_points = np.asarray(gt_points, dtype=np.float64).reshape(-1, 3)
    accuracy = cKDTree(gt_points).query(samples)[0].mean()
    completeness = cKDTree(samples).query(gt_points)[0].mean()
    return float(0.5 * (accuracy + completeness))


def correspondence_l2(pred_vertices_seq: np.ndarray, gt_surface_seq: np.ndarray) -> float:
    """Correspondence L2 (OFlow protocol): pred (T, V, 3) and GT surface points (T, N, 3) with rows that correspond
    across frames. Each predicted frame-0 vertex is matched to its nearest GT frame-0 point; the error is the mean
    over frames and vertices of ||v_t - gt_t[match]||."""
    pred = np.asarray(pred_vertices_seq, dtype=np.float64)
    gt = np.asarray(gt_surface_seq, dtype=np.float64)
    if pred.ndim != 3 or gt.ndim != 3 or pred.shape[0] != gt.shape[0] or pred.shape[2] != 3 or gt.shape[2] != 3:
        raise ValueError(f"Expected pred (T, V, 3) and gt (T, N, 3) with the same T, got {pred.shape} and {gt.shape}.")
    match = cKDTree(gt[0]).query(pred[0])[1]  # (V,)
    return float(np.linalg.norm(pred - gt[:, match], axis=-1).mean())


def sequence_metrics(
    pred_vertices_seq: np.ndarray,
    faces: np.ndarray,
    seq: DeformingSequence,
    n_points: int = 100_000,
    seed: int = 0,
) -> dict:
    """IoU, Chamfer-L1 and correspondence L2 of a fixed-topology mesh sequence (T, V, 3) against `seq`'s ground
    truth, averaged over frames, with the per-frame IoU and Chamfer lists (to show drift).

    GT per frame: `n_points` uniform occupancy points (`seq.volume_points(n_points, seed, t)`) and the
    corresponding surface cloud `seq.surface(n_points, seed)`; the predicted mesh is sampled with `n_points`.
    """
    pred = np.asarray(pred_vertices_seq)
    if pred.ndim != 3 or pred.shape[0] != seq.frames:
        raise ValueError(f"Expected predicted vertices of shape ({seq.frames}, V, 3), got {pred.shape}.")
    gt_surface = seq.surface(n_points, seed)
    ious, chamfers = [], []
    for t in range(seq.frames):
        points, labels = seq.volume_points(n_points, seed, t)
        ious.append(mesh_iou(pred[t], faces, points, labels))
        chamfers.append(chamfer_l1(pred[t], faces, gt_surface[t], n_samples=n_points, seed=seed + t))
    return {
        "iou": float(np.mean(ious)),
        "chamfer_l1": float(np.mean(chamfers)),
        "correspondence_l2": correspondence_l2(pred, gt_surface),
        "per_frame": {"iou": ious, "chamfer_l1": chamfers},
    }


def write_mesh(path: str | os.PathLike, vertices: np.ndarray, faces: np.ndarray) -> None:
    """Write a mesh as PLY or OBJ, chosen by the suffix of `path`."""
    import trimesh

    path = Path(path)
    if path.suffix.lower() not in (".ply", ".obj"):
        raise ValueError(f"Cannot write a mesh to {str(path)!r}: the suffix must be .ply or .obj.")
    trimesh.Trimesh(np.asarray(vertices), np.asarray(faces), process=False).export(path)


_LIGHT = np.array([0.4, -0.5, 0.77]) / np.linalg.norm([0.4, -0.5, 0.77])  # towards the light, from the front left
_MESH_COLOUR = np.array([0.55, 0.7, 0.95])
_VIEW = {"elev": 20.0, "azim": -60.0}


def render_sequence(
    path_mp4: str | os.PathLike,
    vertices_seq: np.ndarray,
    faces: np.ndarray,
    inputs_seq: np.ndarray | None = None,
    size: int = 256,
    fps: int = 8,
) -> None:
    """Write an MP4 of a fixed-topology mesh sequence (T, V, 3), Lambert-shaded, beside the input points of each
    frame (T, n, 3) when `inputs_seq` is given; each panel is `size` pixels square, over the box [-0.5, 0.5]^3."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    from ...generate import write_video

    vertices_seq = np.asarray(vertices_seq, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    if vertices_seq.ndim != 3 or vertices_seq.shape[2] != 3:
        raise ValueError(f"Expected vertices of shape (T, V, 3), got {vertices_seq.shape}.")
    if inputs_seq is not None and len(inputs_seq) != len(vertices_seq):
        raise ValueError(f"Got {len(inputs_seq)} input frames for {len(vertices_seq)} mesh frames; pass one per frame.")
    panels = 1 if inputs_seq is None else 2
    dpi = 100
    fig = Figure(figsize=(panels * size / dpi, size / dpi), dpi=dpi)
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1, wspace=0)
    canvas = FigureCanvasAgg(fig)
    frames = []
    for t, vertices in enumerate(vertices_seq):
        fig.clear()
        axes = [fig.add_subplot(1, panels, i + 1, projection="3d") for i in range(panels)]
        for ax in axes:
            ax.set(xlim=(-0.45, 0.45), ylim=(-0.45, 0.45), zlim=(-0.45, 0.45))
            ax.set_box_aspect((1, 1, 1), zoom=1.25)
            ax.view_init(**_VIEW)
            ax.set_axis_off()
        triangles = vertices[faces]  # (F, 3, 3)
        normals = np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0])
        normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
        shade = 0.25 + 0.75 * np.clip(normals @ _LIGHT, 0.0, 1.0)
        axes[0].add_collection3d(
            Poly3DCollection(triangles, facecolors=shade[:, None] * _MESH_COLOUR, linewidths=0, antialiased=False)
        )
        axes[0].text2D(0.05, 0.92, f"frame {t}", transform=axes[0].transAxes, fontsize=8)
        if inputs_seq is not None:
            p = np.asarray(inputs_seq[t])
            axes[1].scatter(p[:, 0], p[:, 1], p[:, 2], s=2, c=p[:, 2], cmap="viridis", depthshade=False)
            axes[1].text2D(0.05, 0.92, "input", transform=axes[1].transAxes, fontsize=8)
        canvas.draw()
        frames.append(np.asarray(canvas.buffer_rgba())[..., :3].astype(np.float32) / 255.0)
    write_video(np.stack(frames), path_mp4, fps=fps)
