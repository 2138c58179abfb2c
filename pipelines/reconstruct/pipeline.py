"""`Motion2VecSetsPipeline`: a mesh sequence with correspondences from 17 sparse or partial point clouds.

Two EDM solves, as in Motion2VecSets (notes §1, §4):
1. the shape DM samples the first frame's shape latents from its input points; the shape autoencoder decodes them to
   an occupancy field and marching cubes (`geometry.extract_mesh`) gives the frame-0 mesh;
2. the synchronized deformation DM samples the deformation latents of all later frames jointly, conditioned on the
   shape latents and the (first frame, frame t) inputs; the deformation autoencoder moves every frame-0 vertex to
   its position at frame t, so all frames share the frame-0 faces.

The sampler is EDM's deterministic Heun (S_churn = 0) on the Karras sigmas of `EDMEulerScheduler` (0.002 -> 80,
rho 7, a final 0): 18 steps are 35 network evaluations per solve.

>>> pipe = build_pipeline(ReconstructModelConfig.tiny())
>>> out = pipe(torch.rand(17, 32, 3) - 0.5, num_inference_steps=2, mesh_resolution=16)
>>> out.vertices[0].shape[0], out.deformation_latents.shape
(17, torch.Size([1, 16, 8, 16]))
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, EDMEulerScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .geometry import extract_mesh
from .models import (
    INPUT_TYPES,
    DeformationAutoencoder,
    DeformationDenoiser,
    ShapeAutoencoder,
    ShapeDenoiser,
    edm_denoise,
)

OUTPUT_TYPES = ("mesh", "latent")


@dataclass
class ReconstructModelConfig:
    """Sizes of the four networks (notes §11; the original's are in the comments).

    Args:
        num_latents (int, defaults to 64): M latent tokens per set (512).
        ae_width (int, defaults to 96): token width of both autoencoders (512).
        ae_blocks (int, defaults to 4): latent decoder blocks of both autoencoders (24).
        shape_channels (int, defaults to 8): C of the shape latents (8).
        deformation_channels (int, defaults to 16): C of the deformation latents (32).
        dm_width (int, defaults to 96): token width of both denoisers (512).
        dm_blocks (int, defaults to 3): blocks of both denoisers (12).
        heads (int, defaults to 4): attention heads (8).
        head_dim (int, defaults to 32): channels per head (64).
        input_type (str, defaults to "sparse"): the deformation DM's condition, "sparse" or "partial".
        space_time (str, defaults to "interleaved"): the deformation DM's block, "interleaved" or "joint".

    >>> ReconstructModelConfig.tiny().num_latents
    8
    """

    num_latents: int = 64
    ae_width: int = 96
    ae_blocks: int = 4
    shape_channels: int = 8
    deformation_channels: int = 16
    dm_width: int = 96
    dm_blocks: int = 3
    heads: int = 4
    head_dim: int = 32
    input_type: str = "sparse"
    space_time: str = "interleaved"

    @classmethod
    def tiny(cls, **changes) -> ReconstructModelConfig:
        """Sizes for tests: every element, a few thousand parameters per network."""
        return cls(**{**dict(num_latents=8, ae_width=32, ae_blocks=1, dm_width=32, dm_blocks=1, heads=2, head_dim=16), **changes})


def build_pipeline(config: ReconstructModelConfig | None = None, seed: int = 0) -> Motion2VecSetsPipeline:
    """A pipeline of freshly initialised networks (seeded) with `config`'s sizes."""
    config = config or ReconstructModelConfig()
    torch.manual_seed(seed)
    common = dict(heads=config.heads, head_dim=config.head_dim)
    pipe = Motion2VecSetsPipeline(
        shape_autoencoder=ShapeAutoencoder(config.num_latents, config.ae_width, config.shape_channels, config.ae_blocks, **common),
        deformation_autoencoder=DeformationAutoencoder(config.num_latents, config.ae_width, config.deformation_channels, config.ae_blocks, **common),
        shape_denoiser=ShapeDenoiser(config.shape_channels, config.dm_width, config.dm_blocks, **common),
        deformation_denoiser=DeformationDenoiser(
            config.deformation_channels, config.shape_channels, config.dm_width, config.dm_blocks,
            input_type=config.input_type, space_time=config.space_time, **common,
        ),
        scheduler=EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=1.0, rho=7.0, prediction_type="epsilon"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class Motion2VecSetsPipelineOutput(BaseOutput):
    """The reconstruction of B sequences of T frames.

    vertices: per sequence a float32 array (T, V, 3); vertex v is the same surface point in every frame.
    faces: per sequence an int array (F, 3), shared by all its frames (frame 0's mesh).
    shape_latents: (B, M, C_s) sampled shape latents of frame 0.
    deformation_latents: (B, T - 1, M, C_d) sampled deformation latents of frames 1..T-1.
    timings: seconds spent in "shape_dm", "deformation_dm", "meshing" and "deformation_decode".
    For output_type="latent" vertices and faces are None."""

    vertices: list[np.ndarray] | None
    faces: list[np.ndarray] | None
    shape_latents: torch.Tensor
    deformation_latents: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)


class Motion2VecSetsPipeline(DiffusionPipeline):
    """4D reconstruction of a deforming object from a sequence of point clouds (Motion2VecSets, small).

    Args:
        shape_autoencoder (`ShapeAutoencoder`): decodes shape latents to occupancy.
        deformation_autoencoder (`DeformationAutoencoder`): decodes deformation latents to point motion.
        shape_denoiser (`ShapeDenoiser`): the shape DM's network.
        deformation_denoiser (`DeformationDenoiser`): the deformation DM's network; its `input_type` config says which
            input it was trained on.
        scheduler (`EDMEulerScheduler`): supplies the Karras sigmas and sigma_data of the EDM Heun sampler.
    """

    model_cpu_offload_seq = "shape_denoiser->shape_autoencoder->deformation_denoiser->deformation_autoencoder"

    def __init__(self, shape_autoencoder: ShapeAutoencoder, deformation_autoencoder: DeformationAutoencoder, shape_denoiser: ShapeDenoiser, deformation_denoiser: DeformationDenoiser, scheduler: EDMEulerScheduler):
        super().__init__()
        self.register_modules(
            shape_autoencoder=shape_autoencoder, deformation_autoencoder=deformation_autoencoder,
            shape_denoiser=shape_denoiser, deformation_denoiser=deformation_denoiser, scheduler=scheduler,
        )

    def check_inputs(self, points: torch.Tensor, input_type: str, num_inference_steps: int, output_type: str) -> None:
        if points.dim() != 4 or points.shape[-1] != 3 or points.shape[1] < 2:
            raise ValueError(f"points has shape {tuple(points.shape)}; expected (T, n, 3) or (B, T, n, 3) with T >= 2 frames of n xyz points each.")
        if input_type not in INPUT_TYPES:
            raise ValueError(f"input_type={input_type!r} is not one of {INPUT_TYPES}.")
        trained = self.deformation_denoiser.config.input_type
        if input_type != trained:
            raise ValueError(f"input_type={input_type!r}, but this pipeline's deformation denoiser was trained on {trained!r} input; pass input_type={trained!r} or load a pipeline trained for {input_type!r}.")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps}; the Heun sampler needs at least 1 step (the original uses 18).")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not one of {OUTPUT_TYPES}.")

    def sample_edm(self, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape: tuple[int, ...], num_inference_steps: int, generator, progress_bar) -> torch.Tensor:
        """EDM's deterministic Heun sampler (`edm_sampler` with S_churn = 0) from sigma_max to 0.

        Written here because no diffusers scheduler is Heun on these sigmas: `EDMEulerScheduler.step` is first
        order, `HeunDiscreteScheduler` takes its sigmas from a discrete beta schedule (not 0.002 -> 80) and
        `EDMDPMSolverMultistepScheduler` is DPM-Solver++. The sigmas are `EDMEulerScheduler`'s Karras schedule."""
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        sigmas = self.scheduler.sigmas.to(self.device)
        x = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32) * sigmas[0]
        for sigma, sigma_next in itertools.pairwise(sigmas):
            slope = (x - denoise(x, sigma)) / sigma
            x_next = x + (sigma_next - sigma) * slope
            if sigma_next > 0:  # second-order correction, skipped on the last step to sigma = 0 (34 + 1 evaluations)
                slope = 0.5 * (slope + (x_next - denoise(x_next, sigma_next)) / sigma_next)
                x_next = x + (sigma_next - sigma) * slope
            x = x_next
            progress_bar.update()
        return x

    @torch.no_grad()
    def __call__(
        self,
        points: torch.Tensor | np.ndarray,
        input_type: str = "sparse",
        num_inference_steps: int = 18,
        generator: torch.Generator | list[torch.Generator] | None = None,
        deformation_steps: int | None = None,
        mesh_resolution: int = 64,
        output_type: str = "mesh",
        return_dict: bool = True,
    ) -> Motion2VecSetsPipelineOutput | tuple:
        """Reconstruct mesh sequences from point-cloud sequences.

        Args:
            points (tensor or array (T, n, 3) or (B, T, n, 3)): the input clouds in [-0.5, 0.5]^3, frame 0 first.
                "sparse" input has the same surface points (same order) in every frame; "partial" input needs no
                correspondence, only the same count n per frame.
            input_type (str, defaults to "sparse"): "sparse" or "partial"; must be what the deformation denoiser was
                trained on.
            num_inference_steps (int, defaults to 18): Heun steps per solve (2 steps - 1 network evaluations).
            deformation_steps (int, optional): Heun steps of the deformation solve when it differs from the shape's
                (1 for a one-step deformation regressor after a sampled shape); defaults to `num_inference_steps`.
            generator (torch.Generator or a list of B, optional): seeds the starting noise of both solves.
            mesh_resolution (int, defaults to 64): marching-cubes grid of the frame-0 mesh.
            output_type (str, defaults to "mesh"): "mesh", or "latent" to stop after the two solves.
            return_dict (bool, defaults to True): return a `Motion2VecSetsPipelineOutput`, else a tuple of its fields.
        """
        points = torch.as_tensor(points, dtype=torch.float32, device=self.device)
        if points.dim() == 3:
            points = points[None]
        deformation_steps = num_inference_steps if deformation_steps is None else deformation_steps
        self.check_inputs(points, input_type, min(num_inference_steps, deformation_steps), output_type)
        batch, frames = points.shape[:2]
        sigma_data = self.scheduler.config.sigma_data
        num_latents = self.shape_autoencoder.config.num_latents
        timings = {}

        with self.progress_bar(total=num_inference_steps + deformation_steps) as progress_bar:
            started = time.perf_counter()
            shape_latents = self.sample_edm(
                lambda x, sigma: edm_denoise(self.shape_denoiser, x, sigma.expand(batch), sigma_data, points=points[:, 0]),
                (batch, num_latents, self.shape_denoiser.config.latent_channels), num_inference_steps, generator, progress_bar,
            )
            timings["shape_dm"] = time.perf_counter() - started

            started = time.perf_counter()
            condition = dict(shape_latents=shape_latents, source_points=points[:, 0], target_points=points[:, 1:])
            deformation_latents = self.sample_edm(
                lambda x, sigma: edm_denoise(self.deformation_denoiser, x, sigma.expand(batch), sigma_data, **condition),
                (batch, frames - 1, self.deformation_autoencoder.config.num_latents, self.deformation_denoiser.config.latent_channels),
                deformation_steps, generator, progress_bar,
            )
            timings["deformation_dm"] = time.perf_counter() - started

        if output_type == "latent":
            output = Motion2VecSetsPipelineOutput(None, None, shape_latents, deformation_latents, timings)
            return output if return_dict else output.to_tuple()

        vertices, faces = [], []  # extract_mesh raises, naming the value range, when frame 0's field has no surface
        timings["meshing"] = timings["deformation_decode"] = 0.0
        for index in range(batch):
            started = time.perf_counter()
            hidden = self.shape_autoencoder.decode(shape_latents[index : index + 1])
            first_vertices, first_faces = extract_mesh(self.occupancy_logits_fn(hidden), resolution=mesh_resolution)
            timings["meshing"] += time.perf_counter() - started
            started = time.perf_counter()
            vertices.append(self.deform_vertices(np.asarray(first_vertices, dtype=np.float32), deformation_latents[index]))
            faces.append(np.asarray(first_faces))
            timings["deformation_decode"] += time.perf_counter() - started

        self.maybe_free_model_hooks()
        output = Motion2VecSetsPipelineOutput(vertices, faces, shape_latents, deformation_latents, timings)
        return output if return_dict else output.to_tuple()

    def occupancy_logits_fn(self, hidden: torch.Tensor) -> Callable[[np.ndarray], np.ndarray]:
        """Occupancy logits (N,) of (N, 3) points from one sequence's decoded shape tokens (1, M, W);
        `extract_mesh` calls it in batches."""

        def logits(query_points: np.ndarray) -> np.ndarray:
            query = torch.as_tensor(query_points, dtype=torch.float32, device=self.device)
            return self.shape_autoencoder.occupancy(hidden, query[None])[0].float().cpu().numpy()

        return logits

    def deform_vertices(self, first_vertices: np.ndarray, deformation_latents: torch.Tensor, chunk: int = 8192) -> np.ndarray:
        """Frame-0 vertices (V, 3) moved by each later frame's deformation latents (T - 1, M, C): (T, V, 3)."""
        later = deformation_latents.shape[0]
        hidden = self.deformation_autoencoder.decode(deformation_latents)  # (T - 1, M, W)
        source = torch.as_tensor(first_vertices, device=self.device)
        moved = torch.cat([self.deformation_autoencoder.deform(hidden, part.expand(later, -1, -1)) for part in source[None].split(chunk, dim=1)], dim=1)
        return np.concatenate([first_vertices[None], moved.float().cpu().numpy()], axis=0)


def reconstruct_path() -> Path:
    """Where the trained reconstruction pipeline ships inside the package (load it with
    `Motion2VecSetsPipeline.from_pretrained(reconstruct_path(), dtype=torch.float32)`; it is stored in float16)."""
    return Path(__file__).resolve().parents[1] / "assets" / "reconstruct"
