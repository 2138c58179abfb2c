"""`ShapesVideoPipeline`: sparsediff's own small text-to-video model, a pixel-space Wan transformer built offline.

The denoiser is a diffusers `WanTransformer3DModel`, so `sparsediff.accelerate()` serves it through the Wan adapter,
and the denoising loop follows `WanPipeline` (cache contexts "cond"/"uncond" with the step index, `timestep` as the
scheduler's timestep expanded over the batch, `callback_on_step_end` with `latents`). It works in pixel space, with
no VAE: a VAE would need its own training and adds nothing to the attention study, and the patchified pixel grid
gives the token count directly (8 frames x 64 x 64 pixels, patch (1, 2, 2) -> 8 x 32 x 32 = 8192 video tokens).

The text side is built offline too: a word-level tokenizer over the caption grammar of `data.py` (saved as
`tokenizer.json`, so `from_pretrained` needs no hub) and a tiny `T5EncoderModel` trained with the transformer.

>>> pipe = build_pipeline(EmbeddedModelConfig(num_layers=1, num_heads=2, head_dim=12, text_dim=16, ffn_dim=32))
>>> pipe("a red circle moving right", num_frames=2, height=8, width=8, num_inference_steps=2).frames.shape
(1, 2, 8, 8, 3)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

from .data import CAPTION_WORDS

SPECIAL_TOKENS = ("<pad>", "<unk>", "</s>")


@dataclass
class EmbeddedModelConfig:
    """Sizes of the embedded model.

    Args:
        num_layers (int, defaults to 4): transformer blocks.
        num_heads (int, defaults to 6): attention heads per block (issue 16: more heads than v1's 4, so that they
            can specialise; 24 heads in all).
        head_dim (int, defaults to 24): channels per head; Wan splits them over RoPE's (t, h, w) axes as 8 / 8 / 8
            (at 16, each spatial axis would get 4 channels: two frequencies, too few to express a local window).
        ffn_dim (int, defaults to 512): feed-forward width.
        text_dim (int, defaults to 64): width of the text encoder and of `encoder_hidden_states`.
        text_layers (int, defaults to 2): text encoder layers.
        freq_dim (int, defaults to 64): sinusoidal timestep channels (Wan uses 256; 64 resolve 1000 steps here).
        shift (float, defaults to 3.0): the flow-matching timestep shift, in training and in the scheduler.
        max_sequence_length (int, defaults to 32): text tokens; the longest caption (three objects and a camera
            motion) has 27 words and the end token.

    >>> EmbeddedModelConfig().num_heads * EmbeddedModelConfig().head_dim
    144
    """

    num_layers: int = 4
    num_heads: int = 6
    head_dim: int = 24
    ffn_dim: int = 512
    text_dim: int = 64
    text_layers: int = 2
    freq_dim: int = 64
    shift: float = 3.0
    max_sequence_length: int = 32


@dataclass
class ShapesVideoPipelineOutput(BaseOutput):
    """frames: numpy (B, F, H, W, 3) in [0, 1] for "np", a tensor (B, F, 3, H, W) in [0, 1] for "pt", or the raw
    pixel latents (B, 3, F, H, W) in about [-1, 1] for "latent"."""

    frames: Any


def build_tokenizer(max_sequence_length: int = 32) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the caption vocabulary; each caption ends with `</s>`, so "" still has a token."""
    vocab = {word: i for i, word in enumerate((*SPECIAL_TOKENS, *CAPTION_WORDS))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="</s>", model_max_length=max_sequence_length
    )


def build_pipeline(config: EmbeddedModelConfig | None = None, seed: int = 0) -> "ShapesVideoPipeline":
    """A freshly initialised (untrained) pipeline of the given sizes."""
    config = config or EmbeddedModelConfig()
    tokenizer = build_tokenizer(config.max_sequence_length)
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=config.text_dim,
            d_kv=config.text_dim // 4,
            d_ff=config.text_dim * 2,
            num_layers=config.text_layers,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=config.max_sequence_length,
            dropout_rate=0.0,  # no dropout: a resumed run replays the uninterrupted one exactly
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim,
        in_channels=3,
        out_channels=3,
        text_dim=config.text_dim,
        freq_dim=config.freq_dim,
        ffn_dim=config.ffn_dim,
        num_layers=config.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=config.shift)
    pipe = ShapesVideoPipeline(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class ShapesVideoPipeline(DiffusionPipeline):
    """Text-to-video in pixel space with a small Wan transformer; see the module docstring.

    Args:
        transformer (WanTransformer3DModel): the denoiser (3 input and output channels, patch (1, 2, 2)).
        scheduler (FlowMatchEulerDiscreteScheduler): the flow-matching sampler.
        text_encoder (T5EncoderModel): encodes captions into `encoder_hidden_states`.
        tokenizer (PreTrainedTokenizerFast): word-level, over the caption grammar.
    """

    model_cpu_offload_seq = "text_encoder->transformer"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(self, transformer: WanTransformer3DModel, scheduler: FlowMatchEulerDiscreteScheduler, text_encoder: T5EncoderModel, tokenizer: PreTrainedTokenizerFast):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)

    def encode_prompt(self, prompt: str | list[str], max_sequence_length: int | None = None, device: torch.device | None = None) -> torch.Tensor:
        """(B, max_sequence_length, text_dim) embeddings, zero after each caption's last token (as Wan pads); the
        length defaults to the tokenizer's `model_max_length` (the model's `max_sequence_length`)."""
        max_sequence_length = max_sequence_length or self.tokenizer.model_max_length
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        device = device or self._execution_device
        tokens = self.tokenizer([p.lower().strip() for p in prompt], padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(device)
        hidden = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask).last_hidden_state
        return hidden * mask[..., None].to(hidden.dtype)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    def check_inputs(self, prompt, prompt_embeds, num_frames: int, height: int, width: int, callback_on_step_end_tensor_inputs) -> None:
        _, ph, pw = self.transformer.config.patch_size
        if height % ph or width % pw:
            raise ValueError(f"height={height} and width={width} must be multiples of the patch size ({ph}, {pw}); round them to one.")
        if num_frames < 1:
            raise ValueError(f"num_frames={num_frames} must be at least 1.")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("Pass exactly one of `prompt` and `prompt_embeds`.")
        unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs names {unknown}; choose from {self._callback_tensor_inputs}.")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_frames: int = 8,
        height: int = 64,
        width: int = 64,
        num_inference_steps: int = 20,
        guidance_scale: float = 4.0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int | None = None,
    ):
        """Generate clips for `prompt`; see `ShapesVideoPipelineOutput` for what each `output_type` returns."""
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(prompt, prompt_embeds, num_frames, height, width, callback_on_step_end_tensor_inputs)
        if output_type not in ("np", "pt", "latent"):
            raise ValueError(f'output_type={output_type!r} is not supported; use "np", "pt" or "latent".')
        self._guidance_scale = guidance_scale
        device = self._execution_device

        # 1. Text: the caption, and "" (or the negative prompt) for the unconditional branch.
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt(prompt, max_sequence_length, device)
        batch_size = prompt_embeds.shape[0]
        if self.do_classifier_free_guidance and negative_prompt_embeds is None:
            negative = negative_prompt or ""
            negative = [negative] * batch_size if isinstance(negative, str) else negative
            negative_prompt_embeds = self.encode_prompt(negative, max_sequence_length, device)
        dtype = self.transformer.dtype
        prompt_embeds = prompt_embeds.repeat_interleave(num_videos_per_prompt, dim=0).to(dtype)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_videos_per_prompt, dim=0).to(dtype)

        # 2. Timesteps and the starting noise, in pixel space: (B, 3, F, H, W).
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        shape = (batch_size * num_videos_per_prompt, self.transformer.config.in_channels, num_frames, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)} but this call needs {shape}; pass latents of that shape or none.")
        latents = latents.to(device, torch.float32)
        self.scheduler.set_begin_index(0)

        # 3. Denoising loop, as in WanPipeline.
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                latent_model_input = latents.to(dtype)
                timestep = t.expand(latents.shape[0])
                cache_context_kwargs = {"step_index": i, "sigma": float(self.scheduler.sigmas[i]), "num_inference_steps": self._num_timesteps}
                def predict(branch: str, embeds: torch.Tensor) -> torch.Tensor:
                    with self.transformer.cache_context(branch, **cache_context_kwargs):
                        return self.transformer(
                            hidden_states=latent_model_input,
                            timestep=timestep,
                            encoder_hidden_states=embeds,
                            attention_kwargs=attention_kwargs,
                            return_dict=False,
                        )[0]

                noise_pred = predict("cond", prompt_embeds)
                if self.do_classifier_free_guidance:
                    noise_uncond = predict("uncond", negative_prompt_embeds)
                    noise_pred = noise_uncond + guidance_scale * (noise_pred - noise_uncond)

                latents = self.scheduler.step(noise_pred.float(), t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:  # a loop, not a comprehension: locals() of this frame
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                progress_bar.update()

        # 4. Pixels out.
        if output_type == "latent":
            video = latents
        else:
            video = ((latents.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4)  # (B, F, 3, H, W) in [0, 1]
            if output_type == "np":
                video = video.permute(0, 1, 3, 4, 2).cpu().numpy().astype(np.float32)  # (B, F, H, W, 3)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return ShapesVideoPipelineOutput(frames=video)

    def shipped_plan(self):
        """The sparse plan searched for this model and saved beside its weights (`plan.json`), or None."""
        from sparsediff.plan import SparsePlan

        folder = getattr(self.config, "_name_or_path", None)  # set by from_pretrained; absent when built in code
        path = Path(folder) / PLAN_FILE if folder else None
        return SparsePlan.load(path) if path is not None and path.is_file() else None


PLAN_FILE = "plan.json"


def embedded_path() -> Path:
    """Where the trained embedded pipeline ships inside the package."""
    return Path(__file__).resolve().parents[1] / "assets" / "embedded"
