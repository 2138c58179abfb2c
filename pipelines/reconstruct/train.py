"""Training of the 4D reconstructor in four stages, seeded and resumable: shape AE, deformation AE, shape DM, deformation DM.

The recipe is Motion2VecSets' (notes §2-§5) at small scale:
- shape AE: BCE on uniform volume points + 0.1 x BCE on near-surface points + KL; each example is one frame of a
  training sequence (every frame is a shape);
- deformation AE: MSE of the predicted absolute target positions of surface and near-surface points + KL; the
  source is frame 0 (the only source the pipeline uses), the target a random frame, frame 0 included;
- shape DM and deformation DM: the EDM loss (P_mean -1.2, P_std 1.2, sigma_data 1) on posterior samples of the frozen
  autoencoders. The posteriors (mean, log-variance) are encoded once per stage and a fresh sample drawn per step
  (notes §11), which keeps the targets' distribution. The deformation DM sees 5 random target frames per sequence
  (frame 0 may be one of them) and is sampled on all 16 later frames.
The KL weights keep the original's price per nat of latent information (see `TrainConfig.kl_weight`).
AdamW (weight decay 0.01) with warm-up and cosine decay, and an EMA of the weights (diffusers' `EMAModel`) that is
what each stage saves.

Everything random in a step (the examples, the point subsets, the posterior samples, sigma and noise) is drawn from
generators seeded by (seed, stage, step), so a resumed run repeats the steps an uninterrupted one would have taken.
A stage is given wall minutes, not steps: a fresh stage times a few steps on a throwaway copy of its model and plans
as many steps as fit, and the cosine schedule runs over that plan, which the checkpoint keeps.

Layout of `work_dir`: `data_<split>.npz` (the sampled training data, built once), per stage `<stage>/checkpoint.pt`,
`<stage>/history.json` and `<stage>/model/` (the EMA weights, `save_pretrained`); `export` assembles the four models into
a `Motion2VecSetsPipeline` saved in float16.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import EDMEulerScheduler
from diffusers.training_utils import EMAModel
from matplotlib.figure import Figure
from transformers import get_cosine_schedule_with_warmup

from . import data
from .geometry import NoSurfaceError, extract_mesh, sequence_metrics
from .models import (
    DeformationAutoencoder,
    DeformationDenoiser,
    GlobalShapeAutoencoder,
    LatentPosterior,
    ShapeAutoencoder,
    ShapeDenoiser,
    edm_loss,
)
from .pipeline import Motion2VecSetsPipeline, ReconstructModelConfig, build_pipeline

STAGES = ("shape_ae", "deform_ae", "shape_dm", "deform_dm")
# The one-step regressor baseline: the two denoisers' networks trained at sigma_max only (`edm_loss(fixed_sigma=)`),
# on the same autoencoders' latents; a pipeline of them is run with num_inference_steps=1.
REGRESSOR_STAGES = ("shape_reg", "deform_reg")
REGRESSES = {"shape_reg": "shape_dm", "deform_reg": "deform_dm"}  # the diffusion stage whose network each one reuses
STAGE_SHARE = {"shape_ae": 0.22, "deform_ae": 0.2, "shape_dm": 0.2, "deform_dm": 0.38}  # of --minutes for "all"
MODEL_CLASSES = {"shape_ae": ShapeAutoencoder, "deform_ae": DeformationAutoencoder, "shape_dm": ShapeDenoiser, "deform_dm": DeformationDenoiser}
MODEL_CLASSES.update({reg: MODEL_CLASSES[dm] for reg, dm in REGRESSES.items()})
# The ablation of the latent set: the shape autoencoder with one global latent (the same floats as the set), trained
# like the shape AE (its loss, data, batch, learning rate and KL price per latent float) and compared on its
# reconstructions (`samples/eval_reconstruct_ablation.py --global-ae DIR`).
ABLATION_STAGES = ("shape_ae_global",)
MODEL_CLASSES["shape_ae_global"] = GlobalShapeAutoencoder
SAME_RECIPE = {**REGRESSES, "shape_ae_global": "shape_ae"}  # a stage whose hyperparameters are another stage's
SIGMA_MAX = 80.0  # the sampler's (EDMEulerScheduler's) largest noise level


@dataclass
class TrainConfig:
    """One training run of all stages.

    Args:
        model (ReconstructModelConfig): the network sizes, the deformation DM's input type and space-time block.
        seed (int, defaults to 0): seeds the initial weights and every step's randomness.
        train_sequences (int or None, defaults to None): training sequences used (None: the whole train split).
        val_sequences (int, defaults to 16): validation sequences of the figures logged at each checkpoint.
        surface_points (int, defaults to 1024): corresponding surface points kept per frame; AE inputs are subsets.
        ae_input_points (int, defaults to 512): N, points an autoencoder encodes.
        query_points (int, defaults to 512): volume and near-surface query points each per AE example.
        shape_frames (int, defaults to 3): frames per sequence with occupancy samples for the shape AE (frame 0 first).
        sparse_points (int, defaults to 128): points per frame of the sparse input.
        input_variants (int, defaults to 4): partial inputs sampled per training sequence for the DMs.
        batch_size (dict): examples per step per stage (sequences for the deformation DM).
        lr (dict): peak AdamW learning rate per stage (a regressor stage uses its diffusion stage's, as it does its batch size).
        warmup_fraction (float, defaults to 0.03): share of a stage's planned steps spent warming up.
        kl_weight (dict): KL weight per AE stage. The original's 1e-3 multiplies a KL averaged over its M x C =
            512 x 8 (shape) and 512 x 32 (deformation) latent elements, so one nat of information costs 1e-3 / 4096
            and 1e-3 / 16384. With 64 x 8 and 64 x 16 elements the same weight would price each nat 8x and 16x
            higher (a first run with 1e-3 left the shape posteriors' std at 0.6 and val IoU at 0.56), so the
            weights here keep the original's price per nat: 1e-3 x 512 / 4096 and 1e-3 x 1024 / 16384.
        near_weight (float, defaults to 0.1): weight of the near-surface BCE of the shape AE.
        train_frames (int, defaults to 5): target frames per sequence in a deformation DM step.
        ema_decay (float, defaults to 0.998): EMA decay (EMAModel's warm-up decay is used while smaller).
        checkpoint_minutes (float, defaults to 3.0): wall minutes between checkpoints.

    >>> TrainConfig().batch_size["deform_dm"]
    8
    """

    model: ReconstructModelConfig = field(default_factory=ReconstructModelConfig)
    seed: int = 0
    train_sequences: int | None = None
    val_sequences: int = 16
    surface_points: int = 1024
    ae_input_points: int = 512
    query_points: int = 512
    shape_frames: int = 3
    sparse_points: int = 128
    input_variants: int = 4
    batch_size: dict = field(default_factory=lambda: {"shape_ae": 16, "deform_ae": 16, "shape_dm": 32, "deform_dm": 8})
    lr: dict = field(default_factory=lambda: {"shape_ae": 1e-3, "deform_ae": 1e-3, "shape_dm": 4e-4, "deform_dm": 4e-4})
    warmup_fraction: float = 0.03
    kl_weight: dict = field(default_factory=lambda: {"shape_ae": 1.25e-4, "deform_ae": 6.25e-5})
    near_weight: float = 0.1
    train_frames: int = 5
    ema_decay: float = 0.998
    checkpoint_minutes: float = 3.0


# Data: sampled once per split and kept as arrays.


def build_dataset(split: str, count: int, config: TrainConfig, input_type: str) -> dict[str, np.ndarray]:
    """Arrays of `count` sequences of `split`: corresponding surface points (S, T, P, 3); frame-0 near-surface points
    and their positions in every frame (S, T, Q, 3); occupancy samples (points, labels) of `shape_frames` frames; for
    partial input `input_variants` sampled inputs (S, K, T, n, 3) (sparse input is drawn per step from the surface
    points: `data.sparse_input` is `surface` samples plus noise)."""
    frames = np.linspace(0, data.FRAMES - 1, config.shape_frames).round().astype(int)
    arrays: dict[str, list] = {key: [] for key in ("surface", "near_tracks", "occupancy_points", "occupancy_labels", "inputs")}
    for index in range(count):
        seq = data.sequence(split, index)
        seed = 1000 * index
        arrays["surface"].append(seq.surface(config.surface_points, seed=seed))
        near, _ = seq.near_surface_points(config.query_points, seed=seed + 1, t=0)
        arrays["near_tracks"].append(np.stack([seq.transfer(near, 0, t) for t in range(data.FRAMES)]))
        points, labels = [], []
        for t in frames:
            volume, volume_labels = seq.volume_points(config.query_points, seed=seed + 2, t=int(t))
            close, close_labels = seq.near_surface_points(config.query_points, seed=seed + 3, t=int(t))
            points.append(np.concatenate([volume, close]))
            labels.append(np.concatenate([volume_labels, close_labels]))
        arrays["occupancy_points"].append(np.stack(points))
        arrays["occupancy_labels"].append(np.stack(labels))
        if input_type == "partial":
            arrays["inputs"].append(np.stack([data.partial_input(seq, config.sparse_points, seed=seed + 4 + k) for k in range(config.input_variants)]))
    out = {key: np.stack(value).astype(bool if key == "occupancy_labels" else np.float32) for key, value in arrays.items() if value}
    out["shape_frames"] = frames
    return out


def condition_inputs(dataset: dict, sequences: torch.Tensor, config: TrainConfig, rng: np.random.Generator) -> torch.Tensor:
    """Inputs (B, T, n, 3) of `sequences`: a cached partial-input variant, or sparse input drawn like
    `data.sparse_input` (n of the surface points, the same in every frame, plus noise of std 0.003, clipped)."""
    if "inputs" in dataset:
        return dataset["inputs"][sequences, torch.from_numpy(rng.integers(dataset["inputs"].shape[1], size=len(sequences)))]
    picked = torch.stack([subset(dataset["surface"][s], config.sparse_points, rng) for s in sequences])
    noise = torch.from_numpy(rng.normal(0.0, 0.003, picked.shape).astype(np.float32))
    return (picked + noise).clamp(-0.5, 0.5)


def load_dataset(work_dir: Path, split: str, count: int, config: TrainConfig, input_type: str) -> dict[str, torch.Tensor]:
    """`build_dataset`, cached in `work_dir/data_<split>_<input_type>.npz` (rebuilt when the count differs)."""
    work_dir = Path(work_dir)
    path = work_dir / f"data_{split}_{input_type}_{count}.npz"
    if not path.exists():
        work_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        arrays = build_dataset(split, count, config, input_type)
        np.savez(path.with_suffix(".tmp.npz"), **arrays)
        os.replace(path.with_suffix(".tmp.npz"), path)
        log(f"built {path.name}: {count} sequences in {time.perf_counter() - started:.0f} s")
    with np.load(path) as arrays:
        return {key: torch.from_numpy(arrays[key]) for key in arrays.files}


def log(message: str) -> None:
    print(f"[reconstruct {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# One step of each stage: a loss from (models, data, generators).


def step_generators(seed: int, stage: str, step: int, validation: bool = False) -> tuple[np.random.Generator, torch.Generator]:
    """The numpy and torch generators of one step (or validation draw): a function of these arguments only."""
    key = [seed, STAGE_INDEX[stage], step, int(validation)]
    return np.random.default_rng(key), torch.Generator().manual_seed(int(np.random.default_rng(key + [1]).integers(2**62)))


def subset(points: torch.Tensor, count: int, rng: np.random.Generator) -> torch.Tensor:
    """`count` random points (the same indices along leading axes) of (..., P, 3)."""
    return points[..., torch.from_numpy(rng.choice(points.shape[-2], count, replace=False)), :]


def shape_ae_loss(model: ShapeAutoencoder, dataset: dict, config: TrainConfig, rng, generator) -> torch.Tensor:
    batch = config.batch_size["shape_ae"]
    sequences = torch.from_numpy(rng.integers(len(dataset["surface"]), size=batch))
    slots = torch.from_numpy(rng.integers(len(dataset["shape_frames"]), size=batch))
    frames = dataset["shape_frames"][slots]
    surface = torch.stack([subset(dataset["surface"][s, t], config.ae_input_points, rng) for s, t in zip(sequences, frames)])
    queries, labels = dataset["occupancy_points"][sequences, slots], dataset["occupancy_labels"][sequences, slots].float()
    logits, kl = model(surface, queries, generator)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    volume = config.query_points  # the first half of the queries are volume points, the rest near-surface
    return bce[:, :volume].mean() + config.near_weight * bce[:, volume:].mean() + config.kl_weight["shape_ae"] * kl.mean()


def deform_ae_loss(model: DeformationAutoencoder, dataset: dict, config: TrainConfig, rng, generator) -> torch.Tensor:
    batch = config.batch_size["deform_ae"]
    sequences = torch.from_numpy(rng.integers(len(dataset["surface"]), size=batch))
    targets = torch.from_numpy(rng.integers(data.FRAMES, size=batch))
    order = torch.from_numpy(np.stack([rng.permutation(config.surface_points) for _ in range(batch)]))
    surface = torch.stack([dataset["surface"][s][:, o] for s, o in zip(sequences, order)])  # (B, T, P, 3), shuffled points
    rows = torch.arange(batch)
    encoded, tracked = surface[:, :, : config.ae_input_points], surface[:, :, config.ae_input_points :][:, :, : config.query_points]
    near = dataset["near_tracks"][sequences]  # (B, T, Q, 3)
    queries = torch.cat([tracked[:, 0], near[:, 0]], dim=1)
    truth = torch.cat([tracked[rows, targets], near[rows, targets]], dim=1)
    predicted, kl = model(encoded[:, 0], encoded[rows, targets], queries, generator)
    return (predicted - truth).square().mean() + config.kl_weight["deform_ae"] * kl.mean()


def shape_dm_loss(model: ShapeDenoiser, dataset: dict, config: TrainConfig, rng, generator, fixed_sigma: float | None = None) -> torch.Tensor:
    batch = config.batch_size["shape_dm"]
    sequences = torch.from_numpy(rng.integers(len(dataset["shape_mean"]), size=batch))
    latents = LatentPosterior(dataset["shape_mean"][sequences], dataset["shape_logvar"][sequences]).sample(generator)
    return edm_loss(model, latents, generator, fixed_sigma=fixed_sigma, points=condition_inputs(dataset, sequences, config, rng)[:, 0]).mean()


def deform_dm_loss(model: DeformationDenoiser, dataset: dict, config: TrainConfig, rng, generator, fixed_sigma: float | None = None) -> torch.Tensor:
    batch, count = config.batch_size["deform_dm"], config.train_frames
    sequences = torch.from_numpy(rng.integers(len(dataset["deform_mean"]), size=batch))
    frames = torch.from_numpy(np.stack([rng.choice(data.FRAMES, count, replace=False) for _ in range(batch)]))  # frame 0 may be drawn
    rows = torch.arange(batch)[:, None]
    chosen = (sequences[:, None], frames)
    latents = LatentPosterior(dataset["deform_mean"][chosen], dataset["deform_logvar"][chosen]).sample(generator)  # (B, F, M, C)
    shape = LatentPosterior(dataset["shape_mean"][sequences], dataset["shape_logvar"][sequences]).sample(generator)
    inputs = condition_inputs(dataset, sequences, config, rng)  # (B, T, n, 3)
    return edm_loss(model, latents, generator, fixed_sigma=fixed_sigma, shape_latents=shape, source_points=inputs[:, 0], target_points=inputs[rows, frames]).mean()


STAGE_LOSS = {
    "shape_ae": shape_ae_loss, "deform_ae": deform_ae_loss, "shape_dm": shape_dm_loss, "deform_dm": deform_dm_loss,
    "shape_ae_global": shape_ae_loss,
    "shape_reg": functools.partial(shape_dm_loss, fixed_sigma=SIGMA_MAX), "deform_reg": functools.partial(deform_dm_loss, fixed_sigma=SIGMA_MAX),
}
STAGE_INDEX = {stage: i for i, stage in enumerate(STAGES + REGRESSOR_STAGES + ABLATION_STAGES)}  # seeds each stage's weights and steps


# Posterior caches of the frozen autoencoders and validation figures.


@torch.no_grad()
def encode_posteriors(dataset: dict, config: TrainConfig, shape_ae: ShapeAutoencoder, deform_ae: DeformationAutoencoder | None) -> dict:
    """Adds the frame-0 shape posteriors (S, M, C_s) and, given `deform_ae`, the (frame 0 -> t) deformation
    posteriors (S, T, M, C_d) of every sequence, from the first `ae_input_points` surface points."""
    surface = dataset["surface"][:, :, : config.ae_input_points]
    out = dict(dataset)
    means, logvars = [], []
    for part in surface.split(64):
        posterior = shape_ae.encode(part[:, 0])
        means.append(posterior.mean)
        logvars.append(posterior.logvar)
    out["shape_mean"], out["shape_logvar"] = torch.cat(means), torch.cat(logvars)
    if deform_ae is not None:
        means, logvars = [], []
        for sequence in surface:  # (T, N, 3)
            posterior = deform_ae.encode(sequence[:1].expand(data.FRAMES, -1, -1), sequence)
            means.append(posterior.mean)
            logvars.append(posterior.logvar)
        out["deform_mean"], out["deform_logvar"] = torch.stack(means), torch.stack(logvars)
    return out


@torch.no_grad()
def shape_ae_iou(model: ShapeAutoencoder, dataset: dict, config: TrainConfig) -> float:
    """Mean IoU, on the uniform volume samples (the OFlow protocol's points), of the occupancy decoded from the
    posterior means of every frame with occupancy samples."""
    ious = []
    volume = config.query_points
    for slot, frame in enumerate(dataset["shape_frames"].tolist()):
        posterior = model.encode(dataset["surface"][:, frame, : config.ae_input_points])
        predicted = model.occupancy(model.decode(posterior.mean), dataset["occupancy_points"][:, slot, :volume]) > 0
        truth = dataset["occupancy_labels"][:, slot, :volume]
        ious.append(((predicted & truth).sum(1) / (predicted | truth).sum(1).clamp(min=1)).float())
    return torch.cat(ious).mean().item()


@torch.no_grad()
def deform_ae_l2(model: DeformationAutoencoder, dataset: dict, config: TrainConfig) -> float:
    """Mean L2 distance between the predicted and true positions of the held-out surface points over all (0 -> t)."""
    surface = dataset["surface"]
    encoded, tracked = surface[:, :, : config.ae_input_points], surface[:, :, config.ae_input_points :]
    errors = []
    for sequence, points in zip(encoded, tracked):
        posterior = model.encode(sequence[:1].expand(data.FRAMES, -1, -1), sequence)
        predicted = model.deform(model.decode(posterior.mean), points[:1].expand(data.FRAMES, -1, -1))
        errors.append((predicted - points).norm(dim=-1).mean())
    return torch.stack(errors).mean().item()


@torch.no_grad()
def dm_validation_loss(stage: str, model: torch.nn.Module, dataset: dict, config: TrainConfig) -> float:
    """The EDM loss on validation data, averaged over 8 fixed draws."""
    return float(np.mean([STAGE_LOSS[stage](model, dataset, config, *step_generators(config.seed, stage, k, validation=True)).item() for k in range(8)]))


# The stage trainer.


class StageTrainer:
    """Trains one stage in `work_dir/<stage>`, resumable: `run(minutes)` trains until the planned steps are done or
    the minutes of this call are spent, checkpointing every `checkpoint_minutes` and at the end."""

    def __init__(self, stage: str, config: TrainConfig, work_dir: Path, dataset: dict, val_dataset: dict, plot_dir: Path | None = None):
        self.stage, self.config, self.dataset, self.val_dataset, self.plot_dir = stage, config, dataset, val_dataset, plot_dir
        self.folder = Path(work_dir) / stage
        self.folder.mkdir(parents=True, exist_ok=True)
        if stage == "shape_ae_global":
            torch.manual_seed(config.seed + STAGE_INDEX[stage])
            m = config.model
            self.model = GlobalShapeAutoencoder(latent_size=m.num_latents * m.shape_channels, width=m.ae_width, num_decoder_blocks=m.ae_blocks)
        else:
            pipe = build_pipeline(config.model, seed=config.seed + STAGE_INDEX[stage])  # all four, seeded; keep one
            self.model = {"shape_ae": pipe.shape_autoencoder, "deform_ae": pipe.deformation_autoencoder, "shape_dm": pipe.shape_denoiser, "deform_dm": pipe.deformation_denoiser}[REGRESSES.get(stage, stage)]
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr[SAME_RECIPE.get(stage, stage)], weight_decay=0.01)
        self.ema = EMAModel(self.model.parameters(), decay=config.ema_decay)
        self.lr_scheduler = None
        self.planned_steps = 0
        self.step = 0
        self.seconds = 0.0
        self.history: list[dict] = []

    @property
    def variant(self) -> str:
        """"" for the shipped configuration, else the suffix naming its input type and space-time block (a DM stage
        trained for partial input must not draw over the shipped stage's loss curve)."""
        if REGRESSES.get(self.stage, self.stage) not in ("shape_dm", "deform_dm"):
            return ""
        m = self.config.model
        return ("" if m.input_type == "sparse" else f"_{m.input_type}") + ("" if m.space_time == "interleaved" else f"_{m.space_time}")

    @property
    def checkpoint_path(self) -> Path:
        return self.folder / "checkpoint.pt"

    def loss(self, model: torch.nn.Module, step: int) -> torch.Tensor:
        return STAGE_LOSS[self.stage](model, self.dataset, self.config, *step_generators(self.config.seed, self.stage, step))

    def plan(self, minutes: float) -> None:
        """Times 3 steps of a throwaway copy (after one warm-up step) and plans the steps that fit in 85 % of
        `minutes` (the rest is for validation and checkpoints)."""
        model = copy.deepcopy(self.model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
        times = []
        for step in range(4):
            started = time.perf_counter()
            self.loss(model, step).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - started)
        self.set_plan(max(10, int(0.85 * minutes * 60 / np.mean(times[1:]))))
        log(f"{self.stage}: {np.mean(times[1:]):.2f} s/step, planning {self.planned_steps} steps for {minutes:.1f} min")

    def set_plan(self, steps: int) -> None:
        """Plans `steps` steps: the learning-rate schedule warms up and decays over them."""
        self.planned_steps = steps
        warmup = max(1, round(self.config.warmup_fraction * self.planned_steps))
        self.lr_scheduler = get_cosine_schedule_with_warmup(self.optimizer, warmup, self.planned_steps)

    def train_step(self) -> float:
        loss = self.loss(self.model, self.step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.model.parameters())
        self.step += 1
        return loss.item()

    def run(self, minutes: float) -> None:
        if self.lr_scheduler is None:
            self.plan(minutes)
        started = last_checkpoint = time.perf_counter()
        losses = []
        while self.step < self.planned_steps and time.perf_counter() - started < minutes * 60:
            step_started = time.perf_counter()
            losses.append(self.train_step())
            self.seconds += time.perf_counter() - step_started
            if len(losses) == 50 or self.step == self.planned_steps:
                self.history.append({"step": self.step, "loss": float(np.mean(losses)), "lr": self.lr_scheduler.get_last_lr()[0], "seconds": self.seconds})
                losses = []
            if time.perf_counter() - last_checkpoint > self.config.checkpoint_minutes * 60:
                self.save_checkpoint()
                last_checkpoint = time.perf_counter()
        self.save_checkpoint()
        self.save_model()

    def validate(self) -> dict:
        """The stage's validation figure with the EMA weights."""
        model = self.ema_model()
        if self.stage in ("shape_ae", "shape_ae_global"):
            return {"val_iou": shape_ae_iou(model, self.val_dataset, self.config)}
        if self.stage == "deform_ae":
            return {"val_l2": deform_ae_l2(model, self.val_dataset, self.config)}
        return {"val_loss": dm_validation_loss(self.stage, model, self.val_dataset, self.config)}

    def ema_model(self) -> torch.nn.Module:
        model = copy.deepcopy(self.model).eval()
        self.ema.copy_to(model.parameters())
        return model

    def save_checkpoint(self) -> None:
        if self.history:
            self.history[-1].update(self.validate())
            log(f"{self.stage} step {self.step}/{self.planned_steps}: " + ", ".join(f"{k} {v:.4g}" for k, v in self.history[-1].items() if k != "step"))
        state = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
            "ema": self.ema.state_dict(), "step": self.step, "planned_steps": self.planned_steps, "seconds": self.seconds,
            "history": self.history, "torch_rng": torch.get_rng_state(), "config": asdict(self.config),
        }
        torch.save(state, self.checkpoint_path.with_suffix(".tmp"))
        os.replace(self.checkpoint_path.with_suffix(".tmp"), self.checkpoint_path)
        (self.folder / "history.json").write_text(json.dumps(self.history, indent=1))
        if self.plot_dir is not None:
            plot_history(self.history, self.stage, Path(self.plot_dir) / f"reconstruct_loss_{self.stage}{self.variant}.png")

    def resume(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        state = torch.load(self.checkpoint_path, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.set_plan(state["planned_steps"])  # before the optimizer's state: a new schedule resets its learning rate
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.seconds, self.history = state["step"], state["seconds"], state["history"]
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["torch_rng"])
        return True

    def save_model(self) -> None:
        """Saves the EMA weights as the stage's model, also when the planned steps are not all done (a later stage
        can then run; --resume finishes the plan and saves again)."""
        self.ema_model().save_pretrained(self.folder / "model")
        done = "all planned steps" if self.step == self.planned_steps else f"{self.step} of {self.planned_steps} planned steps"
        log(f"{self.stage}: saved EMA weights after {done} ({self.seconds / 60:.1f} min of steps) to {self.folder / 'model'}")


def plot_history(history: list[dict], stage: str, path: Path) -> None:
    """The loss curve (and the validation figure at checkpoints) of a stage as a small PNG."""
    if not history:
        return
    figure = Figure(figsize=(5, 3.2), dpi=100)
    axes = figure.add_subplot()
    lines = axes.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss (mean of 50 steps)")
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_title(f"reconstruct {stage}")
    validated = [h for h in history if any(k.startswith("val_") for k in h)]
    if validated:
        key = next(k for k in validated[0] if k.startswith("val_"))
        twin = axes.twinx()
        lines += twin.plot([h["step"] for h in validated], [h[key] for h in validated], "o-", color="tab:orange", label=f"{key} (EMA weights)")
        twin.set_ylabel(key)
    figure.legend(handles=lines, loc="lower center", ncol=2, fontsize=7, frameon=False)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def load_stage_model(work_dir: Path, stage: str) -> torch.nn.Module:
    folder = Path(work_dir) / stage / "model"
    if not folder.exists():
        raise ValueError(f"Stage {stage!r} has no finished model in {folder}; train it first (--stage {stage}).")
    return MODEL_CLASSES[stage].from_pretrained(folder).eval()


def stage_datasets(stage: str, config: TrainConfig, work_dir: Path) -> tuple[dict, dict]:
    """Training and validation data of a stage; the DM stages get the frozen autoencoders' posteriors added."""
    input_type = config.model.input_type
    train_count = config.train_sequences or data.split_size("train")
    train = load_dataset(work_dir, "train", train_count, config, input_type)
    val = load_dataset(work_dir, "val", min(config.val_sequences, data.split_size("val")), config, input_type)
    if REGRESSES.get(stage, stage) in ("shape_dm", "deform_dm"):
        shape_ae = load_stage_model(work_dir, "shape_ae")
        deform_ae = load_stage_model(work_dir, "deform_ae") if REGRESSES.get(stage, stage) == "deform_dm" else None
        started = time.perf_counter()
        train, val = (encode_posteriors(d, config, shape_ae, deform_ae) for d in (train, val))
        log(f"{stage}: encoded posteriors in {time.perf_counter() - started:.0f} s")
    return train, val


def train_stage(stage: str, config: TrainConfig, work_dir: Path, minutes: float, resume: bool, plot_dir: Path | None = None, init_from: Path | None = None) -> StageTrainer:
    """Trains (or resumes) one stage for at most `minutes` of wall time in this call; loss curves go to `plot_dir`.
    A fresh stage may start from the weights of a saved stage model `init_from` (a second phase with its own
    schedule; the stage's `history.json` then covers this phase only)."""
    train, val = stage_datasets(stage, config, work_dir)
    trainer = StageTrainer(stage, config, work_dir, train, val, plot_dir)
    if trainer.checkpoint_path.exists() and not resume:
        raise ValueError(f"{trainer.checkpoint_path} exists; pass --resume to continue it, or choose another --out.")
    if resume and trainer.resume():
        log(f"{stage}: resumed at step {trainer.step}/{trainer.planned_steps}")
    elif init_from is not None:
        trainer.model.load_state_dict(MODEL_CLASSES[stage].from_pretrained(init_from).state_dict())
        trainer.ema = EMAModel(trainer.model.parameters(), decay=config.ema_decay)
        log(f"{stage}: starting from the weights in {init_from}")
    if trainer.step < trainer.planned_steps or trainer.lr_scheduler is None:
        trainer.run(minutes)
    elif not (trainer.folder / "model").exists():
        trainer.save_model()
    return trainer


def export_pipeline(work_dir: Path, destination: Path, config: TrainConfig, regressor: str | None = None) -> Motion2VecSetsPipeline:
    """The four stages' EMA models as one pipeline, saved in float16 safetensors to `destination`. With
    `regressor="both"` the one-step regressors take both denoisers' places, with "deformation" only the deformation
    denoiser's (the shape still sampled by diffusion); run such a pipeline with num_inference_steps=1."""
    if regressor not in (None, "both", "deformation"):
        raise ValueError(f"regressor={regressor!r}; pass None, 'both' or 'deformation'.")
    shape_dm = "shape_reg" if regressor == "both" else "shape_dm"
    deform_dm = "deform_reg" if regressor else "deform_dm"
    pipe = Motion2VecSetsPipeline(
        shape_autoencoder=load_stage_model(work_dir, "shape_ae"), deformation_autoencoder=load_stage_model(work_dir, "deform_ae"),
        shape_denoiser=load_stage_model(work_dir, shape_dm), deformation_denoiser=load_stage_model(work_dir, deform_dm),
        scheduler=EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=1.0, rho=7.0, prediction_type="epsilon"),
    )
    for component in (pipe.shape_autoencoder, pipe.deformation_autoencoder, pipe.shape_denoiser, pipe.deformation_denoiser):
        component.half()  # not .to(): ModelMixin.to warns about modules to keep in float32 (these have none)
    pipe.save_pretrained(destination)
    return Motion2VecSetsPipeline.from_pretrained(destination, dtype=torch.float32)


@torch.no_grad()
def oracle_reconstruction(pipe: Motion2VecSetsPipeline, seq: data.DeformingSequence, points: int = 512, mesh_resolution: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The mesh sequence (T, V, 3), faces (F, 3) that the autoencoders give from ground-truth latents (posterior means
    of `points` GT surface points per frame) instead of sampled ones: the end-to-end figures with no diffusion error."""
    surface = torch.from_numpy(seq.surface(points, seed=12345))  # (T, N, 3)
    shape_latents = pipe.shape_autoencoder.encode(surface[:1]).mean
    deformation_latents = pipe.deformation_autoencoder.encode(surface[:1].expand(len(surface) - 1, -1, -1), surface[1:]).mean
    vertices, faces = extract_mesh(pipe.occupancy_logits_fn(pipe.shape_autoencoder.decode(shape_latents)), resolution=mesh_resolution)
    return pipe.deform_vertices(np.asarray(vertices, dtype=np.float32), deformation_latents), np.asarray(faces)


def mean_of_scalars(rows: list[dict]) -> dict:
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0] if np.isscalar(rows[0][key])}


@torch.no_grad()
def evaluate_pipeline(pipe: Motion2VecSetsPipeline, split: str, count: int, input_type: str, mesh_resolution: int = 64, seed: int = 0, oracle: bool = True, first: int = 0,
                      num_inference_steps: int = 18, deformation_steps: int | None = None) -> dict:
    """End-to-end metrics (`geometry.sequence_metrics`, averaged over sequences) and mean stage timings on `count`
    sequences of `split` from index `first`, inputs sampled with `seed` and one generator per sequence; with `oracle`
    also the metrics of `oracle_reconstruction` (the autoencoders' share of the error).

    A sequence whose frame-0 occupancy has no surface (a one-step regressor's average shape can be all outside) is
    listed in `no_surface`; the metric means are over the others, and `iou_no_surface_as_0` counts it as IoU 0."""
    make_input = data.sparse_input if input_type == "sparse" else data.partial_input
    metrics, timings, oracles, no_surface = [], [], [], []
    for index in range(first, first + count):
        seq = data.sequence(split, index)
        try:
            out = pipe(make_input(seq, seed=seed), input_type=input_type, generator=torch.Generator().manual_seed(seed + index), mesh_resolution=mesh_resolution,
                       num_inference_steps=num_inference_steps, deformation_steps=deformation_steps)
        except NoSurfaceError as error:
            no_surface.append(index)
            log(f"{split} {index}: no surface ({error})")
            continue
        metrics.append(sequence_metrics(out.vertices[0], out.faces[0], seq))
        timings.append(out.timings)
        if oracle:
            oracles.append(sequence_metrics(*oracle_reconstruction(pipe, seq, mesh_resolution=mesh_resolution), seq))
        log(f"{split} {index}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics[-1].items() if np.isscalar(v)) + f", {sum(out.timings.values()):.1f} s")
    result = {"split": split, "sequences": list(range(first, first + count)), "input_type": input_type, "num_inference_steps": num_inference_steps,
              "deformation_steps": deformation_steps or num_inference_steps, "no_surface": no_surface, **(mean_of_scalars(metrics) if metrics else {}), "seconds": mean_of_scalars(timings) if timings else {}}
    result["iou_no_surface_as_0"] = float(sum(m["iou"] for m in metrics) / count)
    if oracles:
        result["oracle"] = mean_of_scalars(oracles)
    return result
