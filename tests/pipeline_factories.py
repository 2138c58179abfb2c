"""Tiny offline diffusers video pipelines, built in code the way diffusers' own tests build them.

Nothing is downloaded: text encoders and tokenizers are left out and the pipelines get precomputed prompt
embeddings. Sizes are chosen so each denoiser sees a few dozen video tokens (enough for several blocks of 8).
`make(family)` returns `(pipe, call_kwargs)`; `call_kwargs()` gives fresh inputs (a new generator) each call.
"""

from __future__ import annotations

import torch

FAMILIES = ("wan", "wan22", "cogvideox", "hunyuan_video", "ltx", "mochi")


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _embeds(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def wan_transformer(num_layers: int = 2, heads: int = 2, head_dim: int = 12, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def wan(two_transformers: bool = False):
    """Wan 2.1 T2V, or Wan 2.2 A14B-style with `transformer_2` (switch at boundary_ratio=0.5)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        transformer=wan_transformer(seed=0),
        transformer_2=wan_transformer(seed=1) if two_transformers else None,
        boundary_ratio=0.5 if two_transformers else None,
    )
    pipe.set_progress_bar_config(disable=True)

    def call_kwargs(**overrides):
        kwargs = dict(
            prompt_embeds=_embeds(1, 16, 32, seed=1),
            negative_prompt_embeds=_embeds(1, 16, 32, seed=2),
            height=64,
            width=64,
            num_frames=9,  # latent 3 x 8 x 8 -> 3 x 4 x 4 = 48 tokens
            num_inference_steps=4 if two_transformers else 3,
            guidance_scale=5.0,
            generator=_generator(),
            output_type="latent",
        )
        return {**kwargs, **overrides}

    return pipe, call_kwargs


def cogvideox():
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel, DDIMScheduler

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=32,
        num_layers=2,
        sample_width=8,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
    )
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)

    def call_kwargs(**overrides):
        kwargs = dict(
            prompt_embeds=_embeds(1, 16, 32, seed=1),
            negative_prompt_embeds=_embeds(1, 16, 32, seed=2),
            height=64,
            width=64,
            num_frames=9,  # latent 3 x 8 x 8 -> 3 x 4 x 4 = 48 video tokens after 16 text tokens
            num_inference_steps=3,
            guidance_scale=6.0,
            generator=_generator(),
            output_type="latent",
        )
        return {**kwargs, **overrides}

    return pipe, call_kwargs


def hunyuan_video():
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    torch.manual_seed(0)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    )
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    pipe = HunyuanVideoPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=None,
        tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)

    def call_kwargs(**overrides):
        mask = torch.ones(1, 12, dtype=torch.long)
        mask[:, 9:] = 0  # 3 padded text tokens: the joint attention gets a padding mask
        negative_mask = torch.ones(1, 12, dtype=torch.long)
        negative_mask[:, 6:] = 0
        kwargs = dict(
            prompt_embeds=_embeds(1, 12, 16, seed=1),
            pooled_prompt_embeds=_embeds(1, 8, seed=2),
            prompt_attention_mask=mask,
            negative_prompt_embeds=_embeds(1, 12, 16, seed=3),
            negative_pooled_prompt_embeds=_embeds(1, 8, seed=4),
            negative_prompt_attention_mask=negative_mask,
            true_cfg_scale=2.0,  # separate "cond" and "uncond" calls
            height=32,
            width=32,
            num_frames=9,  # latent 3 x 4 x 4 = 48 video tokens before the text
            num_inference_steps=3,
            generator=_generator(),
            output_type="latent",
        )
        return {**kwargs, **overrides}

    return pipe, call_kwargs


def ltx():
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=2,
        caption_channels=32,
    )
    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        spatio_temporal_scaling=(True, True, False, False),
        layers_per_block=(1, 1, 1, 1, 1),
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)

    def call_kwargs(**overrides):
        kwargs = dict(
            prompt_embeds=_embeds(1, 16, 32, seed=1),
            prompt_attention_mask=torch.ones(1, 16, dtype=torch.long),
            negative_prompt_embeds=_embeds(1, 16, 32, seed=2),
            negative_prompt_attention_mask=torch.ones(1, 16, dtype=torch.long),
            height=32,
            width=32,
            num_frames=9,  # latent 3 x 8 x 8 = 192 tokens (the tiny VAE compresses 4x in space and time)
            num_inference_steps=3,
            guidance_scale=3.0,
            generator=_generator(),
            output_type="latent",
        )
        return {**kwargs, **overrides}

    return pipe, call_kwargs


def mochi_transformer():
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(0)
    transformer = MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=12,
        out_channels=None,
        qk_norm="rms_norm",
        text_embed_dim=32,
        time_embed_dim=4,
        activation_fn="swiglu",
        max_sequence_length=16,
    )
    return transformer


def mochi():
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLMochi(
        latent_channels=12,
        out_channels=3,
        encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32),
        layers_per_block=(1, 1, 1, 1, 1),
    )
    pipe = MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=mochi_transformer()
    )
    pipe.set_progress_bar_config(disable=True)

    def call_kwargs(**overrides):
        mask = torch.ones(1, 16, dtype=torch.long)
        negative_mask = torch.zeros(1, 16, dtype=torch.long)
        negative_mask[:, :5] = 1  # cond and uncond keep different numbers of valid text tokens
        mask[:, 11:] = 0
        kwargs = dict(
            prompt_embeds=_embeds(1, 16, 32, seed=1),
            prompt_attention_mask=mask,
            negative_prompt_embeds=_embeds(1, 16, 32, seed=2),
            negative_prompt_attention_mask=negative_mask,
            height=64,
            width=64,
            num_frames=13,  # latent 3 x 8 x 8 -> 3 x 4 x 4 = 48 video tokens before the valid text
            num_inference_steps=3,
            guidance_scale=4.5,
            generator=_generator(),
            output_type="latent",
        )
        return {**kwargs, **overrides}

    return pipe, call_kwargs


def make(family: str):
    builders = {
        "wan": wan,
        "wan22": lambda: wan(two_transformers=True),
        "cogvideox": cogvideox,
        "hunyuan_video": hunyuan_video,
        "ltx": ltx,
        "mochi": mochi,
    }
    return builders[family]()


def wan_with_text_encoder():
    """A Wan pipeline that encodes prompts itself, for `save_pretrained` and the CLI: a word-level tokenizer and a
    tiny UMT5 encoder, both built in code (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = "a the red panda climbs mossy tree in rain cinematic lighting cat walks on grass".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4, relative_attention_num_buckets=8)
    )
    pipe, call_kwargs = wan()
    pipe.register_modules(tokenizer=tokenizer, text_encoder=text_encoder)
    return pipe, call_kwargs
