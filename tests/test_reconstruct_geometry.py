"""Meshing and the reconstruction metrics: hand-computed values on spheres and cubes, a SynthDeform4D sequence against
its own ground truth, mesh files and videos, and the errors."""

import math

import imageio.v3 as iio
import numpy as np
import pytest
import trimesh

from sparsediff.pipelines.reconstruct import data
from sparsediff.pipelines.reconstruct.geometry import (
    chamfer_l1,
    correspondence_l2,
    extract_mesh,
    mesh_iou,
    render_sequence,
    sequence_metrics,
    write_mesh,
)


def sphere_field(radius):
    return lambda p: radius - np.linalg.norm(p, axis=1)  # positive inside, like occupancy logits


def sphere_points(radius, n=100_000, seed=1):
    u = np.random.default_rng(seed).standard_normal((n, 3))
    return radius * u / np.linalg.norm(u, axis=1, keepdims=True)


def box_points(n=50_000, seed=0):
    return np.random.default_rng(seed).uniform(-0.5, 0.5, (n, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def sphere_03():
    return extract_mesh(sphere_field(0.3))


def test_extract_mesh_of_an_analytic_sphere(sphere_03):
    vertices, faces = sphere_03
    assert vertices.dtype == np.float32 and faces.dtype == np.int64 and faces.shape[1] == 3
    assert np.abs(np.linalg.norm(vertices, axis=1) - 0.3).max() < 1e-3
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * 0.3**3, rel=0.01)  # positive: faces wound outward
    assert np.abs(vertices.mean(axis=0)).max() < 1e-3  # box coordinates, centred like the field
    coarse, _ = extract_mesh(sphere_field(0.3), resolution=24, batch=1000)  # batching does not change the grid
    assert np.abs(np.linalg.norm(coarse, axis=1) - 0.3).max() < 5e-3


def test_extract_mesh_threshold_and_offset_centre():
    vertices, _ = extract_mesh(lambda p: 0.5 - np.linalg.norm(p - [0.1, 0.0, -0.05], axis=1), threshold=0.3)
    np.testing.assert_allclose(vertices.mean(axis=0), [0.1, 0.0, -0.05], atol=1e-3)
    assert np.linalg.norm(vertices - [0.1, 0.0, -0.05], axis=1).mean() == pytest.approx(0.2, abs=1e-3)


def test_a_shape_reaching_the_box_faces_still_gives_a_closed_mesh():
    """A bad sample often fills the box to its faces; the mesh must stay closed (else it has no inside and
    containment crawls): the half-box x < 0.1 becomes a closed box of the right volume, and IoU against its labels
    is exact up to the grid."""
    vertices, faces = extract_mesh(lambda p: 0.1 - p[:, 0], resolution=33)
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(0.6, rel=0.02)  # x in [-0.5, 0.1] of the unit box, faces wound outward
    points = box_points()
    assert mesh_iou(vertices, faces, points, points[:, 0] < 0.1) > 0.97


def test_extract_mesh_refuses_an_empty_level_set():
    with pytest.raises(ValueError, match="all 32768 grid points are outside"):
        extract_mesh(lambda p: -np.ones(len(p)), resolution=32)
    with pytest.raises(ValueError, match="are inside.*threshold"):
        extract_mesh(lambda p: np.ones(len(p)), resolution=32)
    with pytest.raises(ValueError, match="one value per point"):
        extract_mesh(lambda p: np.ones((len(p), 2)), resolution=8)
    with pytest.raises(ValueError, match="resolution=1"):
        extract_mesh(sphere_field(0.3), resolution=1)


def test_iou_and_chamfer_of_a_sphere_against_itself(sphere_03):
    vertices, faces = sphere_03
    points = box_points()
    assert mesh_iou(vertices, faces, points, np.linalg.norm(points, axis=1) < 0.3) >= 0.99
    # The GT cloud's own spacing (100k points on area 1.13: mean nearest-neighbour distance ~0.002) bounds it.
    assert chamfer_l1(vertices, faces, sphere_points(0.3)) < 0.003


def test_concentric_spheres_give_hand_computed_values():
    inner_vertices, inner_faces = extract_mesh(sphere_field(0.2))
    points = box_points(100_000)
    labels = np.linalg.norm(points, axis=1) < 0.3
    assert mesh_iou(inner_vertices, inner_faces, points, labels) == pytest.approx((0.2 / 0.3) ** 3, abs=0.01)
    # 20k points: a k-d tree answers queries 0.1 away from its cloud slowly (each has many near-equal candidates).
    chamfer = chamfer_l1(inner_vertices, inner_faces, sphere_points(0.3, n=20_000), n_samples=20_000)
    assert chamfer == pytest.approx(0.1, abs=0.002)


def test_iou_of_overlapping_cubes_is_exact():
    cube = trimesh.creation.box(extents=(0.4, 0.4, 0.4))  # [-0.2, 0.2]^3
    axis = -0.49 + 0.02 * np.arange(50)  # cell centres of a 50^3 grid, none on a cube face
    points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    shifted = np.all(np.abs(points - [0.1, 0.0, 0.0]) < 0.2, axis=1)  # [-0.1, 0.3] x [-0.2, 0.2]^2
    assert mesh_iou(cube.vertices, cube.faces, points, shifted) == pytest.approx(15 / 25, abs=1e-12)
    assert mesh_iou(cube.vertices, cube.faces, points, np.all(np.abs(points) < 0.2, axis=1)) == 1.0
    assert mesh_iou(cube.vertices, cube.faces, points, np.zeros(len(points), bool)) == 0.0
    with pytest.raises(ValueError, match="125000 points but 3 labels"):
        mesh_iou(cube.vertices, cube.faces, points, np.zeros(3, bool))


def test_correspondence_l2_matches_nearest_frame_zero_points():
    gt = data.sequence("val", 1).surface(3000, seed=0)  # (T, N, 3)
    assert correspondence_l2(gt, gt) == 0.0
    rows = np.random.default_rng(0).choice(3000, 500, replace=False)
    pred = gt[:, rows].copy()
    assert correspondence_l2(pred, gt) == 0.0
    pred[1:] += [0.03, -0.04, 0.0]  # frames 1..16 off by 0.05; frame 0 still matches exactly
    assert correspondence_l2(pred, gt) == pytest.approx(0.05 * 16 / 17, rel=1e-5)
    with pytest.raises(ValueError, match=r"same T.*\(3, 500, 3\)"):
        correspondence_l2(pred[:3], gt)


def test_sequence_metrics_of_the_ground_truth_and_of_a_frozen_mesh():
    seq = data.sequence("unseen_motion", 2)
    faces = seq.mesh(0)[1]
    truth = np.stack([seq.mesh(t)[0] for t in range(seq.frames)])
    metrics = sequence_metrics(truth, faces, seq, n_points=20_000)
    assert set(metrics) == {"iou", "chamfer_l1", "correspondence_l2", "per_frame"}
    assert len(metrics["per_frame"]["iou"]) == len(metrics["per_frame"]["chamfer_l1"]) == seq.frames
    assert metrics["iou"] >= 0.97 and min(metrics["per_frame"]["iou"]) >= 0.95
    assert metrics["chamfer_l1"] < 0.005
    assert metrics["correspondence_l2"] < 0.005  # mesh vertices vs their nearest of 20k surface samples
    assert metrics["iou"] == pytest.approx(np.mean(metrics["per_frame"]["iou"]))

    frozen = sequence_metrics(np.repeat(truth[:1], seq.frames, axis=0), faces, seq, n_points=20_000)
    assert frozen["per_frame"]["iou"][0] == pytest.approx(metrics["per_frame"]["iou"][0])
    assert frozen["iou"] < metrics["iou"] - 0.05
    assert frozen["correspondence_l2"] > 5 * metrics["correspondence_l2"]
    with pytest.raises(ValueError, match=r"\(17, V, 3\)"):
        sequence_metrics(truth[:4], faces, seq)


def test_marching_cubes_of_ground_truth_occupancy_matches_it():
    seq = data.sequence("unseen_shape", 0)
    vertices, faces = extract_mesh(lambda p: seq.occupancy(p, 5).astype(np.float32) - 0.5)
    points, labels = seq.volume_points(50_000, seed=0, t=5)
    assert mesh_iou(vertices, faces, points, labels) > 0.9


@pytest.mark.parametrize("suffix", [".ply", ".obj"])
def test_write_mesh_round_trips(tmp_path, sphere_03, suffix):
    vertices, faces = sphere_03
    path = tmp_path / f"sphere{suffix}"
    write_mesh(path, vertices, faces)
    loaded = trimesh.load(path, process=False)
    assert loaded.vertices.shape == vertices.shape and loaded.faces.shape == faces.shape
    np.testing.assert_allclose(loaded.vertices, vertices, atol=1e-5)


def test_write_mesh_refuses_other_suffixes(tmp_path, sphere_03):
    with pytest.raises(ValueError, match=r"sphere\.stl.*\.ply or \.obj"):
        write_mesh(tmp_path / "sphere.stl", *sphere_03)


def test_render_sequence_writes_a_playable_mp4(tmp_path):
    seq = data.sequence("val", 2)
    sphere = trimesh.creation.icosphere(subdivisions=2)  # a light mesh keeps the test fast
    canonical = seq.inverse(0.25 * np.asarray(sphere.vertices, dtype=np.float32), 0)
    vertices = np.stack([seq.forward(canonical, t) for t in range(5)])
    inputs = data.sparse_input(seq, n_points=64)[:5]
    path = tmp_path / "clip.mp4"
    render_sequence(path, vertices, sphere.faces, inputs, size=128, fps=4)
    frames = iio.imread(path)
    assert frames.shape == (5, 128, 256, 3)
    assert frames.std() > 10  # not a blank image
    assert np.abs(frames[0].astype(int) - frames[4]).mean() > 0.5  # the mesh moves
    render_sequence(tmp_path / "mesh_only.mp4", vertices, sphere.faces, size=128)
    assert iio.imread(tmp_path / "mesh_only.mp4").shape == (5, 128, 128, 3)
    with pytest.raises(ValueError, match="3 input frames for 5 mesh frames"):
        render_sequence(tmp_path / "bad.mp4", vertices, sphere.faces, inputs[:3])
