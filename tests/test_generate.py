"""Generation helpers and `sparsediff generate video`: real video files and frame strips (PSNR/SSIM: test_metrics.py)."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from sparsediff.cli import main
from sparsediff.generate import frame_strip, side_by_side, write_video
from sparsediff.metrics import pooled_psnr


def clip(seed=0, frames=5, h=32, w=48):
    return np.random.default_rng(seed).random((frames, h, w, 3))


def test_write_video_is_a_playable_mp4_with_every_frame(tmp_path):
    path = write_video(clip(), tmp_path / "clip.mp4", fps=8)
    assert path.suffix == ".mp4"
    frames = iio.imread(path)
    assert frames.shape[0] == 5  # every frame, upscaled to >= 128 px high (and to whole codec blocks)
    assert frames.shape[1] >= 128 and frames.shape[1] % 16 == 0 and frames.shape[2] % 16 == 0


def test_write_video_leaves_an_existing_file_on_failure(tmp_path):
    target = tmp_path / "clip.mp4"
    target.write_bytes(b"keep me")
    with pytest.raises(Exception):
        write_video(np.zeros((0, 8, 8, 3)), target)
    assert target.read_bytes() == b"keep me"


def test_frame_strip_and_side_by_side_shapes(tmp_path):
    dense, sparse = clip(0), clip(1)
    img = Image.open(frame_strip(dense, sparse, tmp_path / "strip.png"))
    scale = -(-96 // 32)
    assert img.size == (5 * 48 * scale, 3 * 32 * scale)
    both = side_by_side(np.stack([dense, dense]), np.stack([sparse, sparse]))
    assert both.shape == (5, 2 * 32 + 2, 2 * 48 + 2, 3)


def test_cli_generate_video_dense_and_with_a_plan(tmp_path, capsys):
    from sparsediff.pipelines.adapter import fingerprint
    from sparsediff.plan import SparsePlan
    from tests import pipeline_factories

    pipe, _ = pipeline_factories.wan_with_text_encoder()
    pipe.save_pretrained(tmp_path / "wan-tiny")
    plan = SparsePlan.uniform(fingerprint(pipe.transformer), "diagonal_w1", block_size=8)
    plan.save(tmp_path / "plan.json")
    base = ["generate", "video", "--model", str(tmp_path / "wan-tiny"), "--prompt", "a red panda climbs", "--steps", "2",
            "--height", "64", "--width", "64", "--frames", "9", "--json"]
    assert main([*base, "--plan", "dense", "--out", str(tmp_path / "dense.mp4")]) == 0
    dense = json.loads(capsys.readouterr().out)
    assert main([*base, "--plan", str(tmp_path / "plan.json"), "--backend", "torch", "--out", str(tmp_path / "sparse.mp4")]) == 0
    sparse = json.loads(capsys.readouterr().out)
    assert dense["frames"] == 9 and dense["height"] == 64 and dense["width"] == 64
    assert iio.imread(tmp_path / "dense.mp4").shape[0] == 9
    assert sparse["sparse_density"] < 1.0 and sparse["calls"] > sparse["dense_calls"]
    assert dense["dtype"] == sparse["dtype"] == "float32"
    # bfloat16, as a diffusers user loads a video pipeline: the same plan runs (on the CPU through the compiled kernel, or SDPA on AMX)
    assert main([*base, "--plan", str(tmp_path / "plan.json"), "--backend", "torch", "--dtype", "bfloat16",
                 "--out", str(tmp_path / "bf16.mp4")]) == 0
    bf16 = json.loads(capsys.readouterr().out)
    assert bf16["dtype"] == "bfloat16" and bf16["sparse_density"] == sparse["sparse_density"]
    assert iio.imread(tmp_path / "bf16.mp4").shape[0] == 9


@pytest.mark.slow  # the shipped model end to end
def test_demo_on_the_shipped_model_at_a_small_size(tmp_path, capsys):
    """`sparsediff demo` end to end on the embedded model and its shipped plan (2048 tokens, 7 steps, 2 prompts): the
    table's figures, a playable side-by-side video of both prompts, the strip; the sparse half really sparse."""
    from sparsediff.api import load_pipeline

    dense_steps = load_pipeline("embedded").shipped_plan().num_dense_steps(7)
    assert 0 <= dense_steps < 7  # (the shipped plan has none: every step runs sparse)
    from sparsediff.pipelines.embedded_text.model import embedded_text_path

    text_plan = embedded_text_path() / "plan.json"
    # the text section at the shortest length its plan runs sparse at (shorter calls run the model's own attention)
    text_length = (json.loads(text_plan.read_text()).get("min_tokens") or 512) if text_plan.is_file() else 512
    assert main(["demo", "--out", str(tmp_path / "demo"), "--prompts", "2", "--steps", "7", "--height", "32", "--width", "32",
                 "--text-tasks", "2", "--text-length", str(text_length), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["prompts"]) == 2 and result["prompts"][0] != result["prompts"][1]
    assert result["dense_seconds"] > 0 and result["sparse_seconds"] > 0
    assert result["speedup"] == pytest.approx(result["dense_seconds"] / result["sparse_seconds"])
    assert 0.0 < result["density"] <= result["run_density"] < 1.0  # the sparse steps ran sparse; dense ones, if any, dense
    assert result["run_density"] == pytest.approx((dense_steps + (7 - dense_steps) * result["density"]) / 7, abs=1e-3)
    assert 10.0 < result["psnr"] < 99.0 and 0.0 < result["ssim"] < 1.0  # close to dense, not identical
    assert len(result["prompt_psnr"]) == 2 and min(result["prompt_psnr"]) <= result["psnr"] <= max(result["prompt_psnr"])
    assert result["psnr"] == pytest.approx(pooled_psnr(result["prompt_psnr"]), abs=1e-9)  # one size: frames together
    assert set(result["accuracy_dense"]) == set(result["accuracy_sparse"]) >= {"colour", "direction"}
    assert result["dtype"] == "float32"  # the default, as the plan was searched
    video = iio.imread(result["files"]["side_by_side"])
    assert video.shape[0] == 8 and video.shape[1] >= 2 * 32  # 8 frames; both prompts stacked
    assert Image.open(result["files"]["strip"]).size[0] == 8 * 32 * 3  # 8 frames of 32 px, upscaled 3x
    recon = result["reconstruct"]  # the 4D reconstructor's section: one held-out sequence against its ground truth
    assert 0.0 <= recon["metrics"]["iou"] <= 1.0 and recon["metrics"]["chamfer_l1"] > 0
    assert iio.imread(recon["files"]["video"]).shape[0] == 17 and recon["seconds"] > 0
    text = result["text"]  # the embedded DLM's section: two held-out tasks, dense vs its shipped plan
    if not text_plan.is_file():
        assert "no embedded diffusion LM" in text["skipped"]  # said in the output, not silently left out
    else:
        assert (text["tasks"], text["length"], text["dtype"]) == (2, text_length, "float32")
        assert 0.0 <= text["accuracy_sparse"] <= 1.0 and 0.0 <= text["agreement"] <= 1.0
        assert 0.0 < text["density"] < 1.0 and text["speedup"] == pytest.approx(text["dense_seconds"] / text["sparse_seconds"])
    # the table `make demo` prints (text mode): the correctness check first, every detector field; here in bfloat16,
    # which the header names, the sparse steps still sparse
    assert main(["demo", "--out", str(tmp_path / "demo"), "--prompts", "1", "--steps", "6", "--height", "32", "--width", "32",
                 "--text-tasks", "0", "--reconstruct", "", "--dtype", "bfloat16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "bfloat16" in lines[0]
    density = next(line for line in lines if line.startswith("attention density")).split()[-3:]
    assert 0.0 < float(density[0]) <= float(density[2]) < 1.0  # sparse steps, then the whole run (dense steps, if any)
    assert lines[1].startswith("PSNR sparse vs dense") and lines[2].startswith("SSIM sparse vs dense")
    assert [line.split()[1] for line in lines if line.startswith("detector")] == ["colour", "shape", "direction", "modifier", "camera"]
    assert any(line.startswith("side_by_side: ") for line in lines)
