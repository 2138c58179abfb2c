"""Generating with a pipeline, dense or under a plan, and showing the difference: videos, frame strips, PSNR/SSIM.

`generate_video` runs one prompt and writes an MP4 (a GIF when no ffmpeg is available). `run_demo` generates the
same prompts dense and with the embedded model's shipped plan, writes a side-by-side MP4 and a PNG strip of frames
with the difference image, and returns one table of figures (time, speedup, PSNR, SSIM, density, detector
accuracy for both).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .metrics import psnr, ssim

logger = logging.getLogger(__name__)


# ---- files -----------------------------------------------------------------------------------------------
def video_target(out: "str | os.PathLike") -> Path:
    """The file `write_video(frames, out)` writes: `out` as .mp4, or as .gif where ffmpeg (imageio-ffmpeg) is missing."""
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return Path(out).with_suffix(".gif")
    return Path(out).with_suffix(".mp4")


def _refuse_existing(target: Path, force: bool) -> None:
    if not force and target.exists():
        raise ValueError(f"{str(target)!r} already exists; pass --force to overwrite, or choose another --out.")


def write_video(frames: np.ndarray, out: "str | os.PathLike", fps: int = 8, force: bool = True) -> Path:
    """Write (F, H, W, 3) frames in [0, 1] as MP4 (H.264 through imageio-ffmpeg) or, when ffmpeg is missing, as a
    GIF next to the requested name. Returns the path written. Frames are upscaled to at least 128 px high so players
    show them; the file is written to a temporary name first, so a failure leaves an existing file as it was.
    With `force=False` an existing file at the path to be written is refused (ValueError) before anything is written."""
    import imageio.v2 as imageio

    if fps <= 0:
        raise ValueError(f"fps={fps!r} is not a positive frame rate; pass fps=8, for example.")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    video = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    scale = max(1, -(-128 // video.shape[1]))
    video = video.repeat(scale, axis=1).repeat(scale, axis=2)
    video = np.pad(video, ((0, 0), (0, (-video.shape[1]) % 16), (0, (-video.shape[2]) % 16), (0, 0)))  # codec blocks
    try:
        import imageio_ffmpeg  # noqa: F401

        target = out.with_suffix(".mp4")
        _refuse_existing(target, force)
        tmp = target.with_name(f".{target.name}.tmp.mp4")
        imageio.mimwrite(tmp, list(video), fps=fps, codec="libx264", quality=8, macro_block_size=16)
    except (ImportError, RuntimeError) as e:
        logger.warning("sparsediff: writing a GIF instead of MP4 because ffmpeg is unavailable (%s).", e)
        target = out.with_suffix(".gif")
        _refuse_existing(target, force)
        tmp = target.with_name(f".{target.name}.tmp.gif")
        imageio.mimwrite(tmp, list(video), duration=1000 / fps, loop=0)
    os.replace(tmp, target)
    return target


def frame_strip(dense: np.ndarray, sparse: np.ndarray, out: "str | os.PathLike", gain: float = 4.0) -> Path:
    """PNG: dense frames on top, sparse frames below, |sparse - dense| x gain at the bottom. Written to a temporary
    name first, so a failure leaves an existing file as it was."""
    from PIL import Image

    diff = np.clip(np.abs(sparse - dense) * gain, 0, 1)
    rows = [np.concatenate(list(x), axis=1) for x in (dense, sparse, diff)]
    img = (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)
    scale = max(1, -(-96 // dense.shape[1]))
    img = img.repeat(scale, axis=0).repeat(scale, axis=1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    Image.fromarray(img).save(tmp, format="PNG")
    os.replace(tmp, out)
    return out


# ---- generation ------------------------------------------------------------------------------------------
@dataclass
class Generation:
    frames: np.ndarray  # (B, F, H, W, 3) in [0, 1]
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)


def generate(pipe, prompts: list[str], plan="auto", backend: str | None = None, seed: int = 0, **call) -> Generation:
    """Run `pipe` on `prompts` (one seeded generator) under `plan` (see `sparsediff.api.resolve_plan`: "auto" is the
    model's shipped plan, else dense); a dense plan runs the pipeline untouched."""
    from .api import accelerate, resolve_plan

    plan = resolve_plan(pipe, plan)
    handle = None if plan is None else accelerate(pipe, plan, backend=backend)
    try:
        start = time.perf_counter()
        out = pipe(prompts, generator=torch.Generator().manual_seed(seed), output_type="np", **call)
        seconds = time.perf_counter() - start
        stats = handle.summary() if handle is not None else {"dense": True}
    finally:
        if handle is not None:
            handle.remove()
    return Generation(np.asarray(out.frames), seconds, stats)


@dataclass
class TextGeneration:
    texts: list[str]  # one per prompt (decoded with the pipeline's tokenizer)
    sequences: torch.Tensor  # (B, gen_length) generated token ids
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)


def generate_text(pipe, prompts: list[str], plan="auto", backend: str | None = None, seed: int = 0, **call) -> TextGeneration:
    """Run a text diffusion pipeline (diffusers' `LLaDA2Pipeline`) on `prompts` under `plan` (as `generate`). The
    prompts are tokenized as plain text (no chat template) and right-padded, which the adapter keeps apart per row."""
    from .api import accelerate, resolve_plan

    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"{type(pipe).__name__} has no tokenizer, so it cannot take text prompts; save the pipeline with one.")
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError("The pipeline's tokenizer has no pad token, which batched prompts need; give it one and save it again.")
    tokenizer.padding_side = "right"  # the adapter runs right-padded rows on their valid tokens
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    plan = resolve_plan(pipe, plan)
    handle = None if plan is None else accelerate(pipe, plan, backend=backend)
    try:
        start = time.perf_counter()
        out = pipe(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_chat_template=False,
                   generator=torch.Generator().manual_seed(seed), output_type="text", **call)
        seconds = time.perf_counter() - start
        stats = handle.summary() if handle is not None else {"dense": True}
    finally:
        if handle is not None:
            handle.remove()
    return TextGeneration(list(out.texts or []), out.sequences.cpu(), seconds, stats)


@dataclass
class DemoResult:
    prompts: list[str]
    steps: int
    dense_seconds: float
    sparse_seconds: float
    psnr: float
    ssim: float
    density: float  # mean attention density of the steps that ran sparse
    run_density: float  # over the whole run, the dense steps counted as 1
    accuracy_dense: dict[str, float]
    accuracy_sparse: dict[str, float]
    files: dict[str, str]
    dtype: str = "float32"  # the model's weights and activations (the plan was searched in float32)
    prompt_psnr: list[float] = field(default_factory=list)  # each prompt's own; `psnr` is of all frames together

    @property
    def speedup(self) -> float:
        return self.dense_seconds / self.sparse_seconds

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": self.speedup}

    def table(self) -> str:
        rows = [  # the correctness check first, then the speed it bought
            ("PSNR sparse vs dense", f"{self.psnr:.1f} dB"),
            *([("PSNR per prompt", " / ".join(f"{p:.1f}" for p in self.prompt_psnr) + " dB")] if len(self.prompt_psnr) > 1 else []),
            ("SSIM sparse vs dense", f"{self.ssim:.3f}"),
            ("denoising time dense", f"{self.dense_seconds:.1f} s"),
            ("denoising time sparse", f"{self.sparse_seconds:.1f} s"),
            ("speedup", f"{self.speedup:.2f}x"),
            ("attention density: sparse steps / whole run", f"{self.density:.3f} / {self.run_density:.3f}"),
            ("efficiency (speedup x run density)", f"{self.speedup * self.run_density:.2f}"),
        ]
        for key in (k for k, v in self.accuracy_dense.items() if isinstance(v, float)):  # not the per-clip list
            rows.append((f"detector {key} dense / sparse", f"{self.accuracy_dense[key]:.0%} / {self.accuracy_sparse[key]:.0%}"))
        from .render import aligned_rows

        return aligned_rows(rows)


def side_by_side(dense: np.ndarray, sparse: np.ndarray, gap: int = 2) -> np.ndarray:
    """(F, B*H + gaps, 2*W + gap, 3): each prompt's dense clip left of its sparse clip, prompts stacked."""
    B, Fr, H, W, _ = dense.shape
    white = lambda h, w: np.ones((Fr, h, w, 3))  # noqa: E731
    rows = []
    for b in range(B):
        rows += [np.concatenate([dense[b], white(H, gap), sparse[b]], axis=2), white(gap, 2 * W + gap)]
    return np.concatenate(rows[:-1], axis=1)


def demo_prompts(n: int) -> list[str]:
    """The demo's first `n` prompts: a stride of 9 through the detector's 32 evaluation prompts, a new colour and a new
    direction each time."""
    from .pipelines.embedded import detector

    pool = detector.eval_prompts(32)
    return [pool[(9 * i) % len(pool)] for i in range(n)]


def run_demo(
    out_dir: "str | os.PathLike" = "demo",
    prompts: "list[str] | None" = None,
    num_prompts: int = 3,
    steps: int = 12,
    seed: int = 0,
    backend: str | None = None,
    height: int = 64,
    width: int = 64,
    num_frames: int = 8,
    dtype: "str | torch.dtype | None" = None,
) -> DemoResult:
    """The embedded model, dense and with its shipped plan, on the same prompts and seeds (see the module doc).
    The default size, 8 x 64 x 64 pixels, is 8192 tokens; smaller sizes are for quick checks. `dtype` ("bfloat16",
    say) loads the model in it for both runs (default float32)."""
    from .api import load_pipeline
    from .pipelines.embedded import detector

    pipe = load_pipeline("embedded", dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    plan = pipe.shipped_plan()
    if plan is None:
        raise ValueError("The embedded model has no shipped plan yet; make one with `python samples/ship_embedded_plan.py`.")
    prompts = prompts or demo_prompts(num_prompts)
    size = dict(height=height, width=width, num_frames=num_frames)
    # warm-up, dense and sparse (3 steps: one dense, then one in each half of the plan's step ranges), so that one-off
    # costs (oneDNN's micro-kernels JIT-compiled per shape, the compiled kernel's load) stay out of the timings
    generate(pipe, prompts[:1], None, num_inference_steps=2, **size)
    generate(pipe, prompts[:1], plan, backend=backend, num_inference_steps=3, **size)
    # one prompt at a time, dense and sparse interleaved (the first of the pair alternating), so that a slow spell of
    # the machine falls on both sides of the ratio
    runs: dict[bool, list[Generation]] = {False: [], True: []}
    for i, prompt in enumerate(prompts):
        for sparse_run in ((False, True) if i % 2 == 0 else (True, False)):
            runs[sparse_run].append(generate(pipe, [prompt], plan if sparse_run else None, backend=backend,
                                             num_inference_steps=steps, seed=seed + i, **size))
    dense, sparse = (Generation(np.concatenate([r.frames for r in runs[k]]), sum(r.seconds for r in runs[k])) for k in (False, True))
    stats = [r.stats for r in runs[True]]
    run_density = [(s["dense_calls"] + (s["calls"] - s["dense_calls"]) * s["sparse_density"]) / s["calls"] for s in stats]
    out_dir = Path(out_dir)
    files = {
        "side_by_side": str(write_video(side_by_side(dense.frames, sparse.frames), out_dir / "dense_vs_sparse.mp4")),
        "strip": str(frame_strip(dense.frames[0], sparse.frames[0], out_dir / "frames_dense_sparse_diff.png")),
    }
    return DemoResult(
        prompts=prompts,
        steps=steps,
        dense_seconds=dense.seconds,
        sparse_seconds=sparse.seconds,
        psnr=psnr(sparse.frames, dense.frames, data_range=1.0),
        ssim=ssim(sparse.frames, dense.frames),
        density=float(np.mean([s["sparse_density"] for s in stats])),
        run_density=float(np.mean(run_density)),
        accuracy_dense=detector.accuracy(list(dense.frames), prompts),
        accuracy_sparse=detector.accuracy(list(sparse.frames), prompts),
        files=files,
        dtype=str(pipe.dtype).removeprefix("torch."),
        prompt_psnr=[psnr(s, d, data_range=1.0) for s, d in zip(sparse.frames, dense.frames)],
    )
