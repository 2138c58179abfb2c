"""SynthDeform4D: determinism, split ranges, exact inverses and correspondences, analytic surfaces, box bounds,
sparse and partial inputs, and the errors."""

import math
import time

import numpy as np
import pytest
import trimesh

from sparsediff.pipelines.reconstruct import data
from sparsediff.pipelines.reconstruct.data import FRAMES, SPLITS, partial_input, sequence, sparse_input, split_size

ALL = [(split, index) for split in SPLITS for index in range(split_size(split))]


def box_points(n=4000, seed=0):
    return np.random.default_rng(seed).uniform(-0.5, 0.5, (n, 3)).astype(np.float32)


def held_out_shape_value(shape):
    if shape.kind == "ellipsoid":
        return max(shape.dims) / min(shape.dims)
    if shape.kind == "torus":
        return shape.dims[1] / shape.dims[0]
    return None


def examples():
    """One sequence of each shape kind from the seen ranges, and two from each held-out split."""
    seen = {}
    for index in range(split_size("train")):
        seen.setdefault(sequence("train", index).shape.kind, sequence("train", index))
    return [*seen.values(), *(sequence(split, i) for split in ("unseen_motion", "unseen_shape") for i in range(2))]


def test_split_sizes_and_frames():
    assert [split_size(s) for s in SPLITS] == [512, 32, 32, 32]
    assert sequence("val", 0).frames == FRAMES == 17
    assert sorted({sequence("train", i).shape.kind for i in range(64)}) == ["ellipsoid", "sphere", "torus"]


def test_sequences_are_deterministic_and_distinct():
    a, b = sequence("train", 7), sequence("train", 7)
    assert a == b
    np.testing.assert_array_equal(a.surface(256, seed=3), b.surface(256, seed=3))
    np.testing.assert_array_equal(partial_input(a, seed=1), partial_input(b, seed=1))
    np.testing.assert_array_equal(sparse_input(a, seed=1), sparse_input(b, seed=1))
    np.testing.assert_array_equal(a.volume_points(500, 2, 4)[0], b.volume_points(500, 2, 4)[0])
    assert sequence("train", 8) != a and sequence("val", 7) != a  # another index, another split
    assert not np.allclose(sequence("train", 8).surface(256, seed=3), a.surface(256, seed=3))
    assert not np.allclose(a.surface(256, seed=4), a.surface(256, seed=3))
    assert len({sequence(split, i) for split, i in ALL}) == len(ALL)


def test_splits_hold_out_disjoint_parameter_ranges():
    motions = {split: [sequence(split, i).motion for i in range(split_size(split))] for split in SPLITS}
    seen_motion = motions["train"] + motions["val"] + motions["unseen_shape"]
    assert max(m.frequency for m in seen_motion) < min(m.frequency for m in motions["unseen_motion"])
    assert max(m.phase for m in seen_motion) < min(m.phase for m in motions["unseen_motion"])
    assert max(m.phase for m in motions["unseen_motion"]) <= 2 * math.pi

    shapes = {split: [sequence(split, i).shape for i in range(split_size(split))] for split in SPLITS}
    seen_shapes = shapes["train"] + shapes["val"] + shapes["unseen_motion"]
    for kind in ("ellipsoid", "torus"):
        seen = [held_out_shape_value(s) for s in seen_shapes if s.kind == kind]
        unseen = [held_out_shape_value(s) for s in shapes["unseen_shape"] if s.kind == kind]
        assert seen and unseen, kind
        assert max(seen) < min(unseen), kind
    assert {s.kind for s in shapes["unseen_shape"]} == {"ellipsoid", "torus"}


@pytest.mark.parametrize("t", [0, 5, 16])
def test_inverse_undoes_forward_in_the_whole_box(t):
    p = box_points()
    for seq in examples():
        np.testing.assert_allclose(seq.inverse(seq.forward(p, t), t), p, atol=1e-5)
        np.testing.assert_allclose(seq.forward(seq.inverse(p, t), t), p, atol=1e-5)
        moved = np.linalg.norm(seq.forward(p, t) - p, axis=1).mean()
        assert moved > 0.01  # phi_t is not the identity


def test_occupancy_follows_the_material():
    for seq in examples():
        points, labels = seq.near_surface_points(4000, seed=0, t=0)  # about half inside
        assert 0.3 < labels.mean() < 0.7
        np.testing.assert_array_equal(seq.occupancy(points, 0), labels)
        for t in (4, 16):
            carried = seq.forward(seq.inverse(points, 0), t)
            np.testing.assert_allclose(carried, seq.transfer(points, 0, t), atol=1e-6)
            np.testing.assert_array_equal(seq.occupancy(carried, t), labels)
            assert (seq.occupancy(points, t) != labels).mean() > 0.01  # without carrying, the labels change


def test_surface_samples_lie_on_the_analytic_surface_and_correspond():
    for seq in examples():
        surface = seq.surface(2048, seed=0)
        assert surface.shape == (FRAMES, 2048, 3) and surface.dtype == np.float32
        canonical = seq.inverse(surface[0], 0)
        for t in range(FRAMES):
            assert np.abs(seq.shape.implicit(seq.inverse(surface[t], t))).max() < 1e-5
            np.testing.assert_allclose(seq.inverse(surface[t], t), canonical, atol=1e-5)  # row i: one material point
        # The implicit is signed: points pushed off the surface along the radius change sign.
        assert (seq.shape.implicit(canonical * 0.9) < 0).mean() > 0.95 or seq.shape.kind == "torus"
        assert (seq.shape.implicit(canonical * 1.1) > 0).mean() > 0.95 or seq.shape.kind == "torus"


def test_surface_samples_are_uniform_by_area():
    torus = data.ShapeParams("torus", (0.2, 0.08))
    local = torus.sample_surface(200_000, np.random.default_rng(0))
    outer = np.hypot(local[:, 0], local[:, 1]) > 0.2  # cos(v) > 0
    expected = (math.pi * 0.2 + 2 * 0.08) / (2 * math.pi * 0.2)  # integral of (R + r cos v) over the outer half
    assert outer.mean() == pytest.approx(expected, abs=0.005)

    ellipsoid = data.ShapeParams("ellipsoid", (0.3, 0.15, 0.1), (0.3, -0.2, 0.5))
    samples = ellipsoid.sample_surface(200_000, np.random.default_rng(0))
    vertices, faces = ellipsoid.mesh()
    mesh = trimesh.Trimesh(vertices, faces)
    axis = ellipsoid._rotation()[:, 0]  # the long semi-axis in canonical coordinates
    tips = np.abs(mesh.triangles_center @ axis) > 0.15
    assert (np.abs(samples @ axis) > 0.15).mean() == pytest.approx(mesh.area_faces[tips].sum() / mesh.area, abs=0.01)


def test_every_frame_stays_in_the_box():
    largest = 0.0
    for split, index in ALL:
        seq = sequence(split, index)
        largest = max(largest, np.abs(seq.surface(128, seed=index)).max())
        if split != "train":
            largest = max(largest, max(np.abs(seq.mesh(t)[0]).max() for t in (0, 8, 16)))
    assert largest <= 0.45
    assert largest > 0.3  # the shapes use the box
    seq = sequence("val", 3)
    for arrays in (
        seq.volume_points(2000, 0, 3)[0],
        seq.near_surface_points(2000, 0, 3, sigma=0.2)[0],
        sparse_input(seq, noise=0.2),
        partial_input(seq, noise=0.2),
    ):
        assert arrays.dtype == np.float32 and np.abs(arrays).max() <= 0.5


def test_mesh_has_fixed_faces_and_vertices_on_the_surface():
    for seq in examples():
        vertices0, faces = seq.mesh(0)
        assert vertices0.dtype == np.float32 and faces.dtype == np.int64
        assert len(vertices0) in (2048, 2562)
        for t in (0, 9, 16):
            vertices, faces_t = seq.mesh(t)
            np.testing.assert_array_equal(faces_t, faces)
            assert np.abs(seq.shape.implicit(seq.inverse(vertices, t))).max() < 1e-5
            mesh = trimesh.Trimesh(vertices, faces, process=False)
            assert mesh.is_watertight and mesh.volume > 0  # closed, faces wound outward
            points, labels = seq.volume_points(20_000, seed=t, t=t)
            assert (mesh.contains(points) == labels).mean() > 0.995


def test_volume_points_label_a_plausible_fraction():
    seq = sequence("train", 0)
    points, labels = seq.volume_points(50_000, seed=0, t=2)
    assert points.shape == (50_000, 3) and labels.dtype == bool
    assert np.all(np.abs(points) <= 0.5)
    vertices, faces = seq.mesh(2)
    volume = trimesh.Trimesh(vertices, faces).volume
    assert labels.mean() == pytest.approx(volume, rel=0.1)  # the box has volume 1


def test_sparse_input_keeps_the_same_surface_points_in_every_frame():
    seq = sequence("unseen_motion", 4)
    clean = sparse_input(seq, n_points=100, noise=0.0, seed=5)
    np.testing.assert_array_equal(clean, seq.surface(100, seed=5))
    for t in (1, 16):
        np.testing.assert_allclose(seq.transfer(clean[0], 0, t), clean[t], atol=1e-5)
    noisy = sparse_input(seq, n_points=100, noise=0.003, seed=5)
    assert noisy.shape == (FRAMES, 100, 3) and noisy.dtype == np.float32
    assert (noisy - clean).std() == pytest.approx(0.003, rel=0.1)


def clear_line_of_sight(seq, points, t):
    """Which points see the camera: no point of the shape on the ray from the point towards it."""
    towards_camera = -np.asarray(data.VIEW_DIRECTION, dtype=np.float32)
    steps = np.linspace(0.01, 0.9, 90, dtype=np.float32)
    ray = points[:, None, :] + steps[None, :, None] * towards_camera  # (n, steps, 3)
    return ~seq.occupancy(ray.reshape(-1, 3), t).reshape(len(points), len(steps)).any(axis=1)


def test_partial_input_sees_one_side_without_correspondences():
    for seq in examples():
        partial = partial_input(seq, n_points=200, noise=0.0, seed=0)
        assert partial.shape == (FRAMES, 200, 3) and partial.dtype == np.float32
        for t in (0, 16):
            assert np.abs(seq.shape.implicit(seq.inverse(partial[t], t))).max() < 1e-5
            assert clear_line_of_sight(seq, partial[t], t).mean() > 0.95
            everywhere = seq.surface(200, seed=t)[t]
            assert clear_line_of_sight(seq, everywhere, t).mean() < 0.8  # the check can fail
        # No correspondence: row i of frame 1 is not where frame 0's row i went.
        assert np.linalg.norm(seq.transfer(partial[0], 0, 1) - partial[1], axis=1).mean() > 0.05
    assert partial_input(sequence("val", 0), n_points=7).shape == (FRAMES, 7, 3)


def test_surface_sampling_is_fast():
    seq = sequence("train", 1)
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        seq.surface(2048, seed=0)
        best = min(best, time.perf_counter() - start)
    assert best < 0.1


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match=r"'tets'.*\('train'"):
        sequence("tets", 0)
    with pytest.raises(ValueError, match=r"'tets'"):
        split_size("tets")
    with pytest.raises(ValueError, match=r"Index 512 .*'train'.*\[0, 511\]"):
        sequence("train", 512)
    with pytest.raises(ValueError, match=r"Index -1 .*\[0, 31\]"):
        sequence("val", -1)
    with pytest.raises(ValueError, match=r"Index 1.5"):
        sequence("val", 1.5)
    seq = sequence("val", 0)
    with pytest.raises(ValueError, match=r"t=17 .*\[0, 16\]"):
        seq.forward(box_points(4), 17)
    with pytest.raises(ValueError, match=r"t=-1"):
        seq.occupancy(box_points(4), -1)
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        seq.inverse(np.zeros((4, 2)), 0)
