"""The latent-set adapter: sparsediff inside the reconstructor's deformation denoiser (joint and interleaved)."""

import pytest
import torch

import sparsediff
from sparsediff.pipelines.adapter import adapter_for, fingerprint
from sparsediff.pipelines.reconstruct.pipeline import ReconstructModelConfig, build_pipeline
from sparsediff.plan import SparsePlan, StepRange


def pipeline(space_time):
    pipe = build_pipeline(ReconstructModelConfig.tiny(space_time=space_time, num_latents=16))
    torch.manual_seed(1)
    torch.nn.init.normal_(pipe.deformation_denoiser.proj_out.weight, std=0.05)  # zero-initialised: the output would not depend on attention
    return pipe


def latents(pipe, steps=3):
    points = torch.rand(6, 32, 3, generator=torch.Generator().manual_seed(0)) - 0.5
    return pipe(points, num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0)).deformation_latents


@pytest.mark.parametrize("space_time, layers", [("joint", 1), ("interleaved", 2)])
def test_dense_plan_is_exact_and_remove_restores(space_time, layers):
    pipe = pipeline(space_time)
    assert adapter_for(pipe).name == "latent_sets"
    fp = fingerprint(pipe.deformation_denoiser)
    assert (fp.num_layers, fp.num_heads, fp.head_dim) == (layers, 2, 16)
    reference = latents(pipe)
    with sparsediff.accelerate(pipe, "dense") as handle:
        assert torch.equal(latents(pipe), reference)
    assert all(s.dense for s in handle.stats)
    plan = SparsePlan.uniform(fp, "skip", block_size=16)
    handle = sparsediff.accelerate(pipe, plan, backend="torch")
    with pytest.raises(ValueError, match="already accelerated"):
        sparsediff.accelerate(pipe, plan)
    skipped = latents(pipe)
    handle.remove()
    assert not torch.equal(skipped, reference)  # the plan reached the attention
    assert all(m.sparse_site is None for m in pipe.deformation_denoiser.modules() if hasattr(m, "sparse_site"))
    assert not pipe.deformation_denoiser._forward_pre_hooks
    assert torch.equal(latents(pipe), reference)


def test_steps_are_network_evaluations_and_a_new_run_starts_again():
    """Heun: 3 steps are 5 evaluations; `dense_steps=2` keeps the first two dense, in each of two runs."""
    pipe = pipeline("joint")
    plan = SparsePlan.uniform(fingerprint(pipe.deformation_denoiser), "diagonal_w1", block_size=16, dense_steps=2)
    with sparsediff.accelerate(pipe, plan, backend="torch") as handle:
        for _ in range(2):
            latents(pipe)
            assert [(s.step, s.num_steps, s.dense) for s in handle.stats] == [(i, 5, i < 2) for i in range(5)]
            assert all(0.0 < s.density < 1.0 for s in handle.stats[2:])  # frames 0-1 apart of 5 frames: a band


def test_a_mixed_joint_plan_equals_the_reference_backend():
    """Per-head patterns on the T x M layout (same latent across frames, nearby frames, first frame, full) through the
    torch kernels equal the dense-masked reference, and differ from dense."""
    pipe = pipeline("joint")
    fp = fingerprint(pipe.deformation_denoiser)
    heads = (("multi_diagonal_w0.2", "vertical_stripe_f1"),)
    plan = SparsePlan(model=fp, ranges=[StepRange(0.0, 1.0, heads)], block_size=16)
    dense = latents(pipe)
    out = {}
    for backend in ("torch", "reference"):
        with sparsediff.accelerate(pipe, plan, backend=backend):
            out[backend] = latents(pipe)
    assert torch.allclose(out["torch"], out["reference"], rtol=1e-4, atol=1e-4)
    assert (out["torch"] - dense).abs().max() > 1e-3


def test_cli_generate_reconstruct_writes_meshes_video_and_metrics(tmp_path, capsys, monkeypatch):
    """`generate reconstruct` on a saved (tiny, untrained) pipeline: 17 meshes sharing frame 0's faces, a playable
    MP4 of 17 frames, and the protocol metrics for a sample whose ground truth is known; bad inputs are refused."""
    import json

    import imageio.v3 as iio
    import numpy as np
    import trimesh

    from sparsediff.cli import main

    from sparsediff.pipelines.reconstruct.pipeline import Motion2VecSetsPipeline

    pipe = pipeline("joint")
    pipe.save_pretrained(tmp_path / "pipe")
    # an untrained shape decoder's field need not cross zero: frame 0's field is a sphere here (the files, the shared
    # faces, the video and the metrics are what this test checks; the networks' quality is BENCHMARKS §8's)
    sphere = lambda self, hidden: (lambda p: 0.3 - np.linalg.norm(p, axis=1))  # noqa: E731
    monkeypatch.setattr(Motion2VecSetsPipeline, "occupancy_logits_fn", sphere)
    args = ["generate", "reconstruct", "--model", str(tmp_path / "pipe"), "--sample", "unseen_motion:1", "--steps", "2",
            "--resolution", "16", "--points", "32", "--metric-points", "2000", "--device", "cpu", "--json"]
    code = main(args + ["--out", str(tmp_path / "out")])
    assert code == 0
    info = json.loads(capsys.readouterr().out)
    assert info["frames"] == 17 and len(info["meshes"]) == 17
    first = trimesh.load(info["meshes"][0], process=False)
    last = trimesh.load(info["meshes"][-1], process=False)
    assert len(first.vertices) == info["vertices"] and np.array_equal(first.faces, last.faces)  # shared topology
    assert iio.imread(info["video"]).shape[0] == 17
    assert 0.0 <= info["iou"] <= 1.0 and info["chamfer_l1"] > 0 and info["correspondence_l2"] > 0
    refusals = [
        (args + ["--out", str(tmp_path / "out")], "already exists; pass --force"),
        (["generate", "reconstruct", "--model", str(tmp_path / "pipe"), "--input", str(tmp_path / "bad.npy"), "--out",
          str(tmp_path / "o2")], "shape (17, 3); expected (T, n, 3)"),
        (["generate", "reconstruct", "--sample", "test:1", "--out", str(tmp_path / "o3")],
         "SPLIT one of train, val, unseen_motion, unseen_shape"),
    ]
    np.save(tmp_path / "bad.npy", np.zeros((17, 3)))
    for argv, message in refusals:
        assert main(argv) != 0
        assert message in capsys.readouterr().err
