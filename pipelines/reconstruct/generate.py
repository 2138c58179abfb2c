"""`sparsediff generate reconstruct`: a mesh sequence from a point-cloud sequence, written as files, with metrics when
the ground truth is known (a `--sample SPLIT:INDEX` of SynthDeform4D)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import data

def parse_sample(text: str) -> tuple[str, int]:
    """`SPLIT:INDEX`, e.g. `unseen_motion:3`."""
    split, _, index = text.partition(":")
    if split not in data.SPLITS or not index.isdigit():
        raise ValueError(f"--sample {text!r} is not SPLIT:INDEX with SPLIT one of {', '.join(data.SPLITS)}; e.g. unseen_motion:0.")
    size = data.split_size(split)
    if int(index) >= size:
        raise ValueError(f"--sample {text!r}: the {split} split has {size} sequences; give an index below {size}.")
    return split, int(index)


def sample_points(split: str, index: int, input_type: str, n_points: int = 128, seed: int = 0) -> np.ndarray:
    """The (T, n, 3) input of a SynthDeform4D sequence: sparse (corresponding) or partial (single view) points."""
    seq = data.sequence(split, index)
    make = data.sparse_input if input_type == "sparse" else data.partial_input
    return make(seq, n_points=n_points, seed=seed)


def read_points(path: str) -> np.ndarray:
    """A (T, n, 3) point-cloud sequence from `.npy` (the array) or `.npz` (its `points` array)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--input {path!r} does not exist; give a .npy or .npz file holding a (T, n, 3) array.")
    try:
        loaded = np.load(p, allow_pickle=False)
        points = loaded["points"] if isinstance(loaded, np.lib.npyio.NpzFile) else loaded
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"--input {path!r} is not a .npy array or a .npz with a 'points' array ({e}).") from None
    if points.ndim != 3 or points.shape[-1] != 3 or points.shape[0] < 2:
        raise ValueError(f"--input {path!r} holds an array of shape {points.shape}; expected (T, n, 3) with T >= 2 frames.")
    return points.astype(np.float32)


@dataclass
class Reconstruction:
    vertices: np.ndarray  # (T, V, 3)
    faces: np.ndarray  # (F, 3)
    seconds: float
    timings: dict
    stats: dict = field(default_factory=dict)


def reconstruct(pipe, points: np.ndarray, plan="auto", backend: str | None = None, seed: int = 0,
                steps: int = 18, mesh_resolution: int = 64) -> Reconstruction:
    """One reconstruction under `plan` (as `generate`: "auto", "dense", a path or a `SparsePlan`)."""
    from sparsediff.api import accelerate, resolve_plan

    plan = resolve_plan(pipe, plan)
    handle = None if plan is None else accelerate(pipe, plan, backend=backend)
    try:
        start = time.perf_counter()
        out = pipe(points, input_type=pipe.deformation_denoiser.config.input_type, num_inference_steps=steps,
                   generator=torch.Generator().manual_seed(seed), mesh_resolution=mesh_resolution)
        seconds = time.perf_counter() - start
        stats = handle.summary() if handle is not None else {"dense": True}
    finally:
        if handle is not None:
            handle.remove()
    return Reconstruction(out.vertices[0], out.faces[0], seconds, out.timings, stats)


def write_outputs(result: Reconstruction, points: np.ndarray, out_dir: Path, mesh_format: str = "ply") -> dict:
    """Meshes per frame (`frame_XX.ply`, shared faces) and `sequence.mp4` (the mesh beside the input points)."""
    from .geometry import render_sequence, write_mesh

    out_dir.mkdir(parents=True, exist_ok=True)
    meshes = []
    for t, vertices in enumerate(result.vertices):
        path = out_dir / f"frame_{t:02d}.{mesh_format}"
        write_mesh(path, vertices, result.faces)
        meshes.append(str(path))
    video = out_dir / "sequence.mp4"
    render_sequence(video, result.vertices, result.faces, inputs_seq=points)
    return {"meshes": meshes, "video": str(video)}


@dataclass
class ReconstructDemoResult:
    """The reconstruction section of `sparsediff demo`: one held-out sequence through the shipped pipeline."""

    sample: str
    seconds: float
    timings: dict
    metrics: dict
    files: dict
    plan: str

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    def table(self) -> str:
        rows = [  # the quality against the ground truth first, then where the time went
            ("IoU / Chamfer-L1 / correspondence L2", f"{self.metrics['iou']:.3f} / {self.metrics['chamfer_l1']:.4f} / "
                                                     f"{self.metrics['correspondence_l2']:.4f}"),
            ("reconstruction time", f"{self.seconds:.1f} s"),
            *((f"  {part}", f"{seconds:.2f} s") for part, seconds in self.timings.items()),
            ("plan", self.plan),
        ]
        from sparsediff.render import aligned_rows

        return aligned_rows(rows)


def run_reconstruct_demo(out_dir: Path, sample: str = "unseen_motion:1", seed: int = 0,
                         metric_points: int = 20_000) -> ReconstructDemoResult:
    """The shipped reconstructor on one held-out sequence (unseen motion, sparse input): meshes, MP4, metrics. It
    runs with its shipped plan when it has one, else dense (it ships none: every attention plan on it is bounded by
    1.03x, BENCHMARKS §8)."""
    from sparsediff.api import load_pipeline, resolve_plan

    from .geometry import sequence_metrics

    pipe = load_pipeline("embedded", "cpu", kind="reconstruct")
    pipe.set_progress_bar_config(disable=True)
    split, index = parse_sample(sample)
    points = sample_points(split, index, pipe.deformation_denoiser.config.input_type, seed=seed)
    plan = resolve_plan(pipe, "auto")
    result = reconstruct(pipe, points, plan, seed=seed)
    files = write_outputs(result, points, Path(out_dir) / "reconstruct")
    metrics = sequence_metrics(result.vertices, result.faces, data.sequence(split, index), n_points=metric_points)
    return ReconstructDemoResult(sample, result.seconds, result.timings,
                                 {k: metrics[k] for k in ("iou", "chamfer_l1", "correspondence_l2")},
                                 {"video": files["video"], "first_mesh": files["meshes"][0]},
                                 "dense (none ships)" if plan is None else "shipped")
