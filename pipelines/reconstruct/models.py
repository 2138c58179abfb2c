"""The networks of the Motion2VecSets-style 4D reconstructor: two KL autoencoders and two EDM latent-set denoisers.

Every architectural element of Motion2VecSets (CVPR 2024, `VVeiCao/Motion2VecSets`, on top of 3DShape2VecSet) is
kept; only widths, depths and token counts are small:

- `PointEmbed`: NeRF-style Fourier features of xyz (8 frequencies 2^k pi per axis, sin and cos, plus xyz) -> Linear.
- `farthest_point_sample`: the latent queries are input points picked by FPS (torch_cluster.fps in the original).
- `ShapeAutoencoder`: FPS queries -> 1-head cross-attention encoder -> KL bottleneck (C=8) -> self-attention latent
  decoder -> 1-head cross-attention from Fourier-embedded query points -> occupancy logit.
- `DeformationAutoencoder`: source and target clouds embedded and paired by point index -> FPS on the source ->
  the same encoder, KL (C=16) and decoder -> absolute target positions of source-frame query points.
- `edm_preconditioning` / `edm_denoise` / `edm_loss`: EDM (Karras et al. 2022) with sigma_data = 1,
  ln sigma ~ N(-1.2, 1.2^2), one sigma per sequence.
- `ShapeDenoiser`: AdaLN blocks of self-attention over the shape latents -> cross-attention to the condition tokens
  of the first frame's points -> GEGLU feed-forward.
- `DeformationDenoiser`: the synchronized deformation DM. Its block runs spatial self-attention within each frame
  -> cross-attention to the first frame's shape latents -> cross-attention to the condition (paired source/target
  tokens for sparse input with correspondences, or two separate token sets for partial input) -> temporal
  self-attention (latent i across frames, no frame positional encoding) -> feed-forward. `space_time="joint"`
  replaces the spatial and temporal attentions by one self-attention over all T x M latents (frame-major), the
  layout sparsediff accelerates with per-head plans.

Every attention runs through `LatentAttention`, whose `kind` names its role and whose `sparse_site`, when set, is
called instead of `F.scaled_dot_product_attention`: the seam where sparsediff plugs in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNorm
from torch import nn

ATTENTION_KINDS = ("spatial", "temporal", "joint", "cross_shape", "cross_condition", "occupancy_head", "encoder")
INPUT_TYPES = ("sparse", "partial")
SPACE_TIME = ("interleaved", "joint")

# A sparse site gets the module, q, k, v as (B, H, S, D) and the softmax scale, and returns the (B, H, S_q, D) output.
SparseSite = Callable[["LatentAttention", torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


class PointEmbed(nn.Module):
    """Fourier features of points in [-0.5, 0.5]^3: sin and cos of xyz at frequencies 2^k pi (k < num_freqs) per
    axis, plus xyz itself (6 num_freqs + 3 = 51 channels for 8), mapped by a Linear to `dim`."""

    def __init__(self, dim: int, num_freqs: int = 8):
        super().__init__()
        basis = (2.0 ** torch.arange(num_freqs)) * math.pi  # (K,)
        self.register_buffer("basis", torch.block_diag(basis, basis, basis), persistent=False)  # (3, 3K)
        self.proj = nn.Linear(6 * num_freqs + 3, dim)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        angles = points @ self.basis.to(points.dtype)  # (..., 3K)
        return self.proj(torch.cat([angles.sin(), angles.cos(), points], dim=-1))


@torch.no_grad()
def farthest_point_sample(points: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Indices (B, num_samples) of farthest point sampling in each (B, N, 3) cloud, starting from point 0.

    Each pick is the point farthest from all picked so far, so the picks are distinct while num_samples <= N."""
    batch, count, _ = points.shape
    if num_samples > count:
        raise ValueError(f"farthest_point_sample got num_samples={num_samples} for clouds of {count} points; ask for at most {count} (or give more points).")
    picked = torch.zeros(batch, num_samples, dtype=torch.long, device=points.device)
    nearest = torch.full((batch, count), float("inf"), dtype=points.dtype, device=points.device)
    last = torch.zeros(batch, dtype=torch.long, device=points.device)
    rows = torch.arange(batch, device=points.device)
    for i in range(num_samples):
        picked[:, i] = last
        distance = (points - points[rows, last][:, None]).square().sum(-1)  # (B, N)
        nearest = torch.minimum(nearest, distance)
        last = nearest.argmax(-1)
    return picked


def gather_points(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor (B, N, C) at index (B, M) -> (B, M, C)."""
    return torch.gather(tensor, 1, index[..., None].expand(-1, -1, tensor.shape[-1]))


class LatentAttention(nn.Module):
    """Multi-head attention of `x` (B, S, query_dim) over `context` (B, S_kv, context_dim), or over itself.

    The one attention module of these models. q, k and v are (B, H, S, D); with `sparse_site` None the output is
    `F.scaled_dot_product_attention`, else `sparse_site(self, q, k, v, scale)`, so an adapter can replace the
    attention of chosen modules (picked by `kind`) without touching the projections."""

    def __init__(self, query_dim: int, kind: str, heads: int = 4, head_dim: int = 32, context_dim: int | None = None):
        super().__init__()
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"LatentAttention got kind={kind!r}; expected one of {ATTENTION_KINDS}.")
        self.kind = kind
        self.heads = heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.sparse_site: SparseSite | None = None
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        batch = x.shape[0]
        q, k, v = (
            proj(source).view(batch, -1, self.heads, self.head_dim).transpose(1, 2)  # (B, H, S, D)
            for proj, source in ((self.to_q, x), (self.to_k, context), (self.to_v, context))
        )
        if self.sparse_site is None:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            out = self.sparse_site(self, q, k, v, self.scale)
        return self.to_out(out.transpose(1, 2).reshape(batch, -1, self.heads * self.head_dim))


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention plus a GEGLU feed-forward, both residual: the 1-head encoder of the autoencoders and
    of the condition points (`Scan2latent` in the original)."""

    def __init__(self, dim: int, kind: str, heads: int = 1, head_dim: int | None = None, context_dim: int | None = None):
        super().__init__()
        self.norm_x = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(context_dim or dim)
        self.attn = LatentAttention(dim, kind, heads, head_dim or dim // heads, context_dim)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mult=4, activation_fn="geglu")

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_x(x), self.norm_context(context))
        return x + self.ff(self.norm_ff(x))


class SelfAttentionBlock(nn.Module):
    """Pre-norm self-attention plus GEGLU feed-forward: a block of the autoencoders' latent decoder."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = LatentAttention(dim, "spatial", heads, head_dim)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mult=4, activation_fn="geglu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_attn(x))
        return x + self.ff(self.norm_ff(x))


@dataclass
class LatentPosterior:
    """The diagonal Gaussian of a KL bottleneck: mean and log-variance (B, M, C), log-variance clamped to [-30, 20]."""

    mean: torch.Tensor
    logvar: torch.Tensor

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + (0.5 * self.logvar).exp() * noise

    def kl(self) -> torch.Tensor:
        """KL to N(0, 1) per sample, averaged over tokens and channels as in the original: (B,)."""
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar).mean(dim=(1, 2))


class LatentSetAutoencoder(nn.Module):
    """What both autoencoders share: the 1-head cross-attention encoder from FPS-picked tokens, the KL bottleneck,
    the self-attention latent decoder and the 1-head cross-attention query head."""

    def __init__(self, width: int, latent_channels: int, num_decoder_blocks: int, heads: int, head_dim: int, num_freqs: int):
        super().__init__()
        self.encoder = CrossAttentionBlock(width, "encoder")
        self.to_moments = nn.Linear(width, 2 * latent_channels)
        self.from_latents = nn.Linear(latent_channels, width)
        self.decoder = nn.ModuleList(SelfAttentionBlock(width, heads, head_dim) for _ in range(num_decoder_blocks))
        self.query_embed = PointEmbed(width, num_freqs)
        self.query_norm = nn.LayerNorm(width)
        self.latent_norm = nn.LayerNorm(width)
        self.query_attn = LatentAttention(width, "occupancy_head", heads=1, head_dim=width)

    def encode_tokens(self, tokens: torch.Tensor, query_index: torch.Tensor) -> LatentPosterior:
        queries = gather_points(tokens, query_index)  # (B, M, W)
        mean, logvar = self.to_moments(self.encoder(queries, tokens)).chunk(2, dim=-1)
        return LatentPosterior(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        hidden = self.from_latents(latents)
        for block in self.decoder:
            hidden = block(hidden)
        return hidden  # (B, M, W)

    def query(self, hidden: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Features (B, Q, W) of query points (B, Q, 3) read from decoded latents (B, M, W)."""
        return self.query_attn(self.query_norm(self.query_embed(points)), self.latent_norm(hidden))


class ShapeAutoencoder(ModelMixin, ConfigMixin):
    """The shape vector-set KL autoencoder (`kl_d512_m512_l8` in Motion2VecSets, here small).

    Args:
        num_latents (int, defaults to 64): M, latent tokens picked by FPS among the input points.
        width (int, defaults to 128): token width.
        latent_channels (int, defaults to 8): C of the KL bottleneck.
        num_decoder_blocks (int, defaults to 4): self-attention blocks of the latent decoder.
        heads (int, defaults to 4): heads of the decoder blocks (the encoder and the query head have one).
        head_dim (int, defaults to 32): channels per decoder head.
        num_freqs (int, defaults to 8): Fourier frequencies of `PointEmbed`.

    >>> ae = ShapeAutoencoder(num_latents=8, width=32, num_decoder_blocks=1, heads=2, head_dim=16)
    >>> ae(torch.rand(2, 64, 3) - 0.5, torch.rand(2, 10, 3) - 0.5)[0].shape
    torch.Size([2, 10])
    """

    @register_to_config
    def __init__(self, num_latents: int = 64, width: int = 128, latent_channels: int = 8, num_decoder_blocks: int = 4, heads: int = 4, head_dim: int = 32, num_freqs: int = 8):
        super().__init__()
        self.point_embed = PointEmbed(width, num_freqs)
        self.net = LatentSetAutoencoder(width, latent_channels, num_decoder_blocks, heads, head_dim, num_freqs)
        self.to_logit = nn.Linear(width, 1)

    def encode(self, points: torch.Tensor) -> LatentPosterior:
        """Posterior (B, M, C) of surface clouds (B, N, 3)."""
        index = farthest_point_sample(points, self.config.num_latents)
        return self.net.encode_tokens(self.point_embed(points), index)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decoded latent tokens (B, M, W) of latents (B, M, C); read them with `occupancy`."""
        return self.net.decode(latents)

    def occupancy(self, hidden: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Occupancy logits (B, Q) of points (B, Q, 3) from decoded tokens."""
        return self.to_logit(self.net.query(hidden, points)).squeeze(-1)

    def forward(self, points: torch.Tensor, queries: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Occupancy logits (B, Q) of `queries` from surface `points` through a posterior sample, and the KL (B,)."""
        posterior = self.encode(points)
        return self.occupancy(self.decode(posterior.sample(generator)), queries), posterior.kl()


class ConditionedPointBlock(nn.Module):
    """A residual MLP block over query points that adds the shape code at its input (OccNet's decoder, with
    addition in place of conditional batch norm)."""

    def __init__(self, width: int):
        super().__init__()
        self.code = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.ff = FeedForward(width, mult=2, activation_fn="geglu")

    def forward(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        return x + self.ff(self.norm(x + self.code(code)))


class GlobalShapeAutoencoder(ModelMixin, ConfigMixin):
    """The ablation of the latent *set*: one global latent vector for the whole shape (as OccNet / OFlow have),
    with the set autoencoder's point embedding and cross-attention encoder (one learned query instead of M FPS
    points) and the same number of latent floats (M x C as one vector). Its occupancy decoder cannot be the set's
    cross-attention head — over one token that returns the same feature for every point — so the code conditions
    an MLP over each query point's Fourier embedding instead.

    Args:
        latent_size (int, defaults to 512): floats of the global latent (the set's M x C = 64 x 8).
        width (int, defaults to 128): feature width.
        num_decoder_blocks (int, defaults to 4): code MLP blocks and conditioned point blocks each.
        num_freqs (int, defaults to 8): Fourier frequencies of `PointEmbed`.

    >>> ae = GlobalShapeAutoencoder(latent_size=16, width=32, num_decoder_blocks=1)
    >>> ae(torch.rand(2, 64, 3) - 0.5, torch.rand(2, 10, 3) - 0.5)[0].shape
    torch.Size([2, 10])
    """

    @register_to_config
    def __init__(self, latent_size: int = 512, width: int = 128, num_decoder_blocks: int = 4, num_freqs: int = 8):
        super().__init__()
        self.point_embed = PointEmbed(width, num_freqs)
        self.query = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.encoder = CrossAttentionBlock(width, "encoder")
        self.to_moments = nn.Linear(width, 2 * latent_size)
        self.from_latents = nn.Linear(latent_size, width)
        self.code_blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), FeedForward(width, mult=4, activation_fn="geglu")) for _ in range(num_decoder_blocks)
        )
        self.query_embed = PointEmbed(width, num_freqs)
        self.point_blocks = nn.ModuleList(ConditionedPointBlock(width) for _ in range(num_decoder_blocks))
        self.out_norm = nn.LayerNorm(width)
        self.to_logit = nn.Linear(width, 1)

    def encode(self, points: torch.Tensor) -> LatentPosterior:
        """Posterior (B, 1, latent_size) of surface clouds (B, N, 3)."""
        tokens = self.point_embed(points)
        pooled = self.encoder(self.query.expand(len(points), -1, -1), tokens)
        mean, logvar = self.to_moments(pooled).chunk(2, dim=-1)
        return LatentPosterior(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The shape code (B, 1, W) of latents (B, 1, latent_size)."""
        hidden = self.from_latents(latents)
        for block in self.code_blocks:
            hidden = hidden + block(hidden)
        return hidden

    def occupancy(self, hidden: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Occupancy logits (B, Q) of points (B, Q, 3) given the code (B, 1, W)."""
        x = self.query_embed(points)
        for block in self.point_blocks:
            x = block(x, hidden)
        return self.to_logit(self.out_norm(x)).squeeze(-1)

    def forward(self, points: torch.Tensor, queries: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Occupancy logits (B, Q) of `queries` from surface `points` through a posterior sample, and the KL (B,)."""
        posterior = self.encode(points)
        return self.occupancy(self.decode(posterior.sample(generator)), queries), posterior.kl()


class DeformationAutoencoder(ModelMixin, ConfigMixin):
    """The deformation vector-set KL autoencoder (`de_kl_d512_m512_l32` in Motion2VecSets, here small).

    Source and target clouds with the same point order are embedded at width/2 each and concatenated per index; the
    latent tokens sit at FPS picks of the source cloud. The decoder maps source-frame query points to their absolute
    positions in the target frame.

    Args:
        num_latents (int, defaults to 64): M, latent tokens picked by FPS on the source cloud.
        width (int, defaults to 128): token width (each cloud's embedding is width / 2).
        latent_channels (int, defaults to 16): C of the KL bottleneck.
        num_decoder_blocks (int, defaults to 4): self-attention blocks of the latent decoder.
        heads (int, defaults to 4): heads of the decoder blocks.
        head_dim (int, defaults to 32): channels per decoder head.
        num_freqs (int, defaults to 8): Fourier frequencies of `PointEmbed`.

    >>> ae = DeformationAutoencoder(num_latents=8, width=32, num_decoder_blocks=1, heads=2, head_dim=16)
    >>> source = torch.rand(2, 64, 3) - 0.5
    >>> ae(source, source + 0.1, source[:, :5])[0].shape
    torch.Size([2, 5, 3])
    """

    @register_to_config
    def __init__(self, num_latents: int = 64, width: int = 128, latent_channels: int = 16, num_decoder_blocks: int = 4, heads: int = 4, head_dim: int = 32, num_freqs: int = 8):
        super().__init__()
        if width % 2:
            raise ValueError(f"DeformationAutoencoder got width={width}; it must be even (source and target take half each).")
        self.point_embed = PointEmbed(width // 2, num_freqs)
        self.net = LatentSetAutoencoder(width, latent_channels, num_decoder_blocks, heads, head_dim, num_freqs)
        self.to_position = nn.Linear(width, 3)

    def encode(self, source: torch.Tensor, target: torch.Tensor) -> LatentPosterior:
        """Posterior (B, M, C) of the deformation between index-paired clouds (B, N, 3)."""
        if source.shape != target.shape:
            raise ValueError(f"DeformationAutoencoder.encode got source {tuple(source.shape)} and target {tuple(target.shape)}; they must be the same points (paired by index) in two frames.")
        tokens = torch.cat([self.point_embed(source), self.point_embed(target)], dim=-1)  # (B, N, W)
        return self.net.encode_tokens(tokens, farthest_point_sample(source, self.config.num_latents))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decoded latent tokens (B, M, W) of latents (B, M, C); read them with `deform`."""
        return self.net.decode(latents)

    def deform(self, hidden: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Target-frame positions (B, Q, 3) of source-frame points (B, Q, 3) from decoded tokens."""
        return self.to_position(self.net.query(hidden, points))

    def forward(self, source: torch.Tensor, target: torch.Tensor, queries: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Target positions (B, Q, 3) of source-frame `queries` through a posterior sample, and the KL (B,)."""
        posterior = self.encode(source, target)
        return self.deform(self.decode(posterior.sample(generator)), queries), posterior.kl()


# EDM (Karras et al. 2022), as EDMPrecond / EDMLoss of Motion2VecSets.


def edm_preconditioning(sigma: torch.Tensor, sigma_data: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in, c_noise) at noise levels `sigma`: D(x) = c_skip x + c_out F(c_in x, c_noise)."""
    total = sigma.square() + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), 1.0 / total.sqrt(), sigma.log() / 4.0


def edm_denoise(model: nn.Module, noisy: torch.Tensor, sigma: torch.Tensor, sigma_data: float = 1.0, **condition) -> torch.Tensor:
    """The EDM denoiser D(x; sigma) of `model` (called as model(c_in x, c_noise, **condition)); sigma is (B,)."""
    c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma, sigma_data)
    expand = (-1,) + (1,) * (noisy.dim() - 1)
    raw = model(noisy * c_in.view(expand), c_noise, **condition)
    return c_skip.view(expand) * noisy + c_out.view(expand) * raw


def edm_loss(model: nn.Module, latents: torch.Tensor, generator: torch.Generator | None = None, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 1.0, fixed_sigma: float | None = None, **condition) -> torch.Tensor:
    """EDM training loss per sample (B,): ln sigma ~ N(p_mean, p_std^2), one sigma per sample (shared by all frames
    of a sequence), weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 on the squared error of D.

    With `fixed_sigma` every sample is at that noise level instead: at the sampler's sigma_max the input is almost
    pure noise, so D learns the posterior mean of the latents given the condition, i.e. the same network trained as
    a one-step regressor (the pipeline with `num_inference_steps=1` evaluates it exactly there)."""
    batch = latents.shape[0]
    if fixed_sigma is None:
        sigma = (torch.randn(batch, generator=generator, device=latents.device) * p_std + p_mean).exp()
    else:
        sigma = torch.full((batch,), float(fixed_sigma), device=latents.device)
    weight = (sigma.square() + sigma_data**2) / (sigma * sigma_data).square()
    expand = (-1,) + (1,) * (latents.dim() - 1)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device) * sigma.view(expand)
    denoised = edm_denoise(model, latents + noise, sigma, sigma_data, **condition)
    return weight * (denoised - latents).square().flatten(1).mean(1)


class NoiseEmbedding(nn.Module):
    """c_noise -> sinusoidal features -> two Linear+SiLU layers (the denoisers' conditioning vector)."""

    def __init__(self, width: int, num_channels: int = 128):
        super().__init__()
        self.sinusoid = Timesteps(num_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = TimestepEmbedding(num_channels, width, act_fn="silu", out_dim=width)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        return F.silu(self.mlp(self.sinusoid(c_noise).to(self.mlp.linear_1.weight.dtype)))


class ConditionEncoder(nn.Module):
    """`Scan2latent` without FPS: every input point is a query of one 1-head cross-attention block over all of them.
    Paired mode embeds a source and a target point per token (width / 2 each), like `Scan2latent_deform_timeatt`."""

    def __init__(self, width: int, paired: bool, num_freqs: int = 8):
        super().__init__()
        self.paired = paired
        self.embed = PointEmbed(width // 2 if paired else width, num_freqs)
        self.block = CrossAttentionBlock(width, "encoder")

    def forward(self, points: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.embed(points)
        if self.paired:
            tokens = torch.cat([tokens, self.embed(target)], dim=-1)
        return self.block(tokens, tokens)


class AdaLNAttention(nn.Module):
    """x + attention(AdaLN(x, emb), context): one residual sub-layer of the denoisers."""

    def __init__(self, width: int, kind: str, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        self.norm = AdaLayerNorm(width, output_dim=2 * width, chunk_dim=1)
        self.attn = LatentAttention(width, kind, heads, head_dim, context_dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.attn(self.norm(x, temb=emb), context)


class AdaLNFeedForward(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = AdaLayerNorm(width, output_dim=2 * width, chunk_dim=1)
        self.ff = FeedForward(width, mult=4, activation_fn="geglu")

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return x + self.ff(self.norm(x, temb=emb))


class ShapeBlock(nn.Module):
    """Self-attention over the latents -> cross-attention to the condition tokens -> feed-forward, all AdaLN."""

    def __init__(self, width: int, heads: int, head_dim: int):
        super().__init__()
        self.self_attn = AdaLNAttention(width, "spatial", heads, head_dim)
        self.cross_attn = AdaLNAttention(width, "cross_condition", heads, head_dim)
        self.ff = AdaLNFeedForward(width)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.ff(self.cross_attn(self.self_attn(x, emb), emb, condition), emb)


class ShapeDenoiser(ModelMixin, ConfigMixin):
    """The shape latent-set denoiser F of the EDM shape DM (`LatentArrayTransformer` with `Scan2latent`).

    Called as model(c_in x, c_noise, points=...) on latents (B, M, C) and the first frame's input points (B, n, 3);
    wrap it with `edm_denoise` for the denoised latents.

    Args:
        latent_channels (int, defaults to 8): C of the shape latents.
        width (int, defaults to 128): token width.
        num_blocks (int, defaults to 4): AdaLN blocks.
        heads (int, defaults to 4): attention heads.
        head_dim (int, defaults to 32): channels per head.
        num_freqs (int, defaults to 8): Fourier frequencies of the condition points.

    >>> dm = ShapeDenoiser(width=32, num_blocks=1, heads=2, head_dim=16)
    >>> dm(torch.randn(2, 16, 8), torch.zeros(2), points=torch.rand(2, 20, 3)).shape
    torch.Size([2, 16, 8])
    """

    @register_to_config
    def __init__(self, latent_channels: int = 8, width: int = 128, num_blocks: int = 4, heads: int = 4, head_dim: int = 32, num_freqs: int = 8):
        super().__init__()
        self.proj_in = nn.Linear(latent_channels, width)
        self.noise_embed = NoiseEmbedding(width)
        self.condition = ConditionEncoder(width, paired=False, num_freqs=num_freqs)
        self.blocks = nn.ModuleList(ShapeBlock(width, heads, head_dim) for _ in range(num_blocks))
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, latent_channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        emb = self.noise_embed(timestep.expand(sample.shape[0]))
        condition = self.condition(points)
        x = self.proj_in(sample)
        for block in self.blocks:
            x = block(x, emb, condition)
        return self.proj_out(self.norm_out(x))


class DeformationBlock(nn.Module):
    """The interleaved space-time block of the synchronized deformation DM (or its joint variant), on x (B, T, M, W):

    1. self-attention: within each frame ("spatial"), or over all T x M latents frame-major ("joint");
    2. cross-attention to the first frame's shape latents ("cross_shape");
    3. cross-attention to the condition tokens of each frame ("cross_condition"; two for partial input: the source
       frame's tokens, then the target frame's);
    4. interleaved only: self-attention of latent i across the frames ("temporal"), no frame positional encoding;
    5. GEGLU feed-forward.
    """

    def __init__(self, width: int, heads: int, head_dim: int, input_type: str, space_time: str):
        super().__init__()
        self.space_time = space_time
        self.self_attn = AdaLNAttention(width, "spatial" if space_time == "interleaved" else "joint", heads, head_dim)
        self.shape_attn = AdaLNAttention(width, "cross_shape", heads, head_dim)
        self.condition_attn = AdaLNAttention(width, "cross_condition", heads, head_dim)
        self.target_attn = AdaLNAttention(width, "cross_condition", heads, head_dim) if input_type == "partial" else None
        self.temporal_attn = AdaLNAttention(width, "temporal", heads, head_dim) if space_time == "interleaved" else None
        self.ff = AdaLNFeedForward(width)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, shape: torch.Tensor, conditions: tuple[torch.Tensor, ...]) -> torch.Tensor:
        batch, frames, count, width = x.shape
        per_frame = emb.repeat_interleave(frames, dim=0)  # (B T, W)
        if self.space_time == "interleaved":
            x = self.self_attn(x.reshape(batch * frames, count, width), per_frame)  # (B T, M, W)
        else:
            x = self.self_attn(x.reshape(batch, frames * count, width), emb).reshape(batch * frames, count, width)
        x = self.shape_attn(x, per_frame, shape)
        x = self.condition_attn(x, per_frame, conditions[0])
        if self.target_attn is not None:
            x = self.target_attn(x, per_frame, conditions[1])
        if self.temporal_attn is not None:
            x = x.view(batch, frames, count, width).transpose(1, 2).reshape(batch * count, frames, width)  # (B M, T, W)
            x = self.temporal_attn(x, emb.repeat_interleave(count, dim=0))
            x = x.view(batch, count, frames, width).transpose(1, 2).reshape(batch * frames, count, width)
        return self.ff(x, per_frame).view(batch, frames, count, width)


class DeformationDenoiser(ModelMixin, ConfigMixin):
    """The synchronized deformation latent-set denoiser F of the EDM deformation DM.

    Called as model(c_in x, c_noise, shape_latents=..., source_points=..., target_points=...) on the deformation
    latents x (B, T, M, C) of T target frames, the shape latents of the source (first) frame (B, M_s, C_s), the
    source frame's input points (B, n, 3) and each target frame's input points (B, T, n, 3). The frames are an
    unordered set (no frame encoding), so T may differ between training and sampling.

    Args:
        latent_channels (int, defaults to 16): C of the deformation latents.
        shape_channels (int, defaults to 8): C_s of the shape latents.
        width (int, defaults to 128): token width.
        num_blocks (int, defaults to 4): space-time blocks.
        heads (int, defaults to 4): attention heads.
        head_dim (int, defaults to 32): channels per head.
        input_type (str, defaults to "sparse"): "sparse" pairs each source point with the same-index target point
            in one token (the inputs correspond across frames); "partial" encodes source and target points as two
            token sets, attended one after the other (no correspondences).
        space_time (str, defaults to "interleaved"): "interleaved" is the original block (spatial attention within
            each frame, temporal attention per latent across frames); "joint" is one self-attention over all T x M
            latents, frame-major.
        num_freqs (int, defaults to 8): Fourier frequencies of the condition points.

    >>> dm = DeformationDenoiser(width=32, num_blocks=1, heads=2, head_dim=16)
    >>> dm(torch.randn(1, 3, 16, 16), torch.zeros(1), shape_latents=torch.randn(1, 16, 8),
    ...    source_points=torch.rand(1, 20, 3), target_points=torch.rand(1, 3, 20, 3)).shape
    torch.Size([1, 3, 16, 16])
    """

    @register_to_config
    def __init__(self, latent_channels: int = 16, shape_channels: int = 8, width: int = 128, num_blocks: int = 4, heads: int = 4, head_dim: int = 32, input_type: str = "sparse", space_time: str = "interleaved", num_freqs: int = 8):
        super().__init__()
        if input_type not in INPUT_TYPES:
            raise ValueError(f"DeformationDenoiser got input_type={input_type!r}; expected one of {INPUT_TYPES}.")
        if space_time not in SPACE_TIME:
            raise ValueError(f"DeformationDenoiser got space_time={space_time!r}; expected one of {SPACE_TIME}.")
        self.proj_in = nn.Linear(latent_channels, width)
        self.shape_in = nn.Linear(shape_channels, width)
        self.noise_embed = NoiseEmbedding(width)
        if input_type == "sparse":
            self.condition = ConditionEncoder(width, paired=True, num_freqs=num_freqs)
        else:
            self.condition = ConditionEncoder(width, paired=False, num_freqs=num_freqs)
            self.target_condition = ConditionEncoder(width, paired=False, num_freqs=num_freqs)
        self.blocks = nn.ModuleList(DeformationBlock(width, heads, head_dim, input_type, space_time) for _ in range(num_blocks))
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, latent_channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def encode_condition(self, source_points: torch.Tensor, target_points: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Condition tokens per frame, (B T, n, W) each: one paired set (sparse) or source and target sets (partial)."""
        batch, frames, count, _ = target_points.shape
        target = target_points.reshape(batch * frames, count, 3)
        if self.config.input_type == "sparse":
            if source_points.shape[1] != count:
                raise ValueError(f"Sparse input pairs points by index, but the source frame has {source_points.shape[1]} points and the target frames {count}; give the same points in every frame (or use input_type='partial').")
            return (self.condition(source_points.repeat_interleave(frames, dim=0), target),)
        source = self.condition(source_points).repeat_interleave(frames, dim=0)
        return source, self.target_condition(target)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, shape_latents: torch.Tensor, source_points: torch.Tensor, target_points: torch.Tensor) -> torch.Tensor:
        batch, frames = sample.shape[:2]
        emb = self.noise_embed(timestep.expand(batch))
        shape = self.shape_in(shape_latents).repeat_interleave(frames, dim=0)  # (B T, M_s, W)
        conditions = self.encode_condition(source_points, target_points)
        x = self.proj_in(sample)
        for block in self.blocks:
            x = block(x, emb, shape, conditions)
        return self.proj_out(self.norm_out(x))
