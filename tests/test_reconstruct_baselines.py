"""Nearest-neighbour tracking, the deformation baseline: vertices follow their nearest frame-0 input point."""

import numpy as np
import pytest

from sparsediff.pipelines.reconstruct.baselines import nearest_neighbour_tracking


def test_vertices_follow_their_nearest_input_point():
    points = np.array([[[0.0, 0, 0], [1, 0, 0]]] * 3, dtype=np.float32)  # (T=3, n=2, 3)
    points[1, 1] += [0, 0.5, 0]  # point 1 moves up at frame 1, then back and right at frame 2
    points[2, 1] += [0.25, 0, 0]
    vertices = np.array([[0.1, 0, 0], [0.9, 0, 0]], dtype=np.float32)
    moved = nearest_neighbour_tracking(vertices, points)
    assert moved.shape == (3, 2, 3) and np.array_equal(moved[0], vertices)
    assert np.allclose(moved[:, 0], vertices[0])  # its point never moves
    assert np.allclose(moved[1, 1], [0.9, 0.5, 0]) and np.allclose(moved[2, 1], [1.15, 0, 0])
    with pytest.raises(ValueError, match=r"shape \(2, 3\); expected \(T, n, 3\)"):
        nearest_neighbour_tracking(vertices, points[0])
