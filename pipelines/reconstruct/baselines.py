"""Baselines of the 4D reconstructor's deformation stage (the OFlow / CaDeX comparisons, small).

`nearest_neighbour_tracking`: each frame-0 vertex follows its nearest input point of frame 0 through the sequence
(sparse input corresponds across frames, so that point's displacement is known at every frame). It uses the same
frame-0 mesh as the pipeline, so the two differ only in how the mesh moves.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def nearest_neighbour_tracking(vertices0: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(T, V, 3) vertices: `vertices0` (V, 3) moved by the displacement of their nearest frame-0 input point, for
    input `points` (T, n, 3) whose row i is the same surface point in every frame."""
    if points.ndim != 3 or points.shape[-1] != 3:
        raise ValueError(f"points has shape {points.shape}; expected (T, n, 3) corresponding points.")
    _, nearest = cKDTree(points[0]).query(vertices0)
    displacement = points[:, nearest] - points[0, nearest]  # (T, V, 3)
    return (vertices0[None] + displacement).astype(np.float32)
