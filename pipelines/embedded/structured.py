"""Structure-aware fine-tuning of the embedded model: teach chosen heads to live inside a sparse pattern.

Large video DiTs end up with heads that attend a local window, the same place in other frames or a few global
columns (Sparse-vDiT measured most heads of HunyuanVideo and Wan this way); a 5 MB model trained for an hour on a
2-core CPU does not (the v2 profile: the cheapest structured pattern of every head lost 9-27% of its output). This
module fine-tunes the model so that chosen heads carry their information inside a chosen pattern, the way STA and
Sparse-vDiT adapt models to sparse attention, while the model stays a dense model:

* every self-attention layer computes its dense attention as usual, and for the chosen heads also the sparse
  attention of their pattern, through sparsediff's own torch runtime (the code that runs them at inference);
* the relative squared difference of the two (per head: |sparse - dense|^2 / |dense|^2) is added to the loss with
  weight `consistency_weight`, which pulls the dense head towards its pattern;
* in a share `sparse_prob` of the steps the layer passes the sparse output on instead of the dense one, so the
  layers after it learn to work from it.

Which pattern each head gets is the training recipe's choice (`DEFAULT_HEAD_PATTERNS`); the search does not read it
and must find the structure itself from a profile. Heads left `full` keep global attention (motion needs some).

>>> from sparsediff.pipelines.embedded.pipeline import EmbeddedModelConfig, build_pipeline
>>> pipe = build_pipeline(EmbeddedModelConfig(num_layers=2, num_heads=2, head_dim=12, text_dim=16, ffn_dim=32))
>>> heads = StructuredHeads(pipe.transformer, [["diagonal_w0.5", "full"], ["full", "vertical_stripe_f1"]])
>>> x = torch.randn(1, 3, 2, 8, 8)
>>> text = pipe.encode_prompt(["a red circle"], 8, "cpu")
>>> _ = pipe.transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text)
>>> float(heads.take_consistency().detach()) > 0
True
>>> heads.remove()
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import _get_qkv_projections

from ...layout import TokenLayout, video
from ...patterns import get_pattern
from ...runtime import SparseAttention
from ..families import family_of

# The recipe-v3 assignment for the default 4 x 4 model. Each layer mixes a local window (`diagonal`: the same frame and
# its neighbours' near rows), the same place across all frames (`multi_diagonal`: carries motion along a row) and the
# first frame's columns (`vertical_stripe`: the attention sink the v2 profile showed); layers 1 and 2 keep one global
# head each, for motion across rows and between far frames. Each pattern covers about 1/8 of the 8192 x 8192 scores.
DEFAULT_HEAD_PATTERNS: tuple[tuple[str, ...], ...] = (
    ("diagonal_w0.5", "diagonal_w0.5", "multi_diagonal_w64", "vertical_stripe_f1"),
    ("diagonal_w0.5", "multi_diagonal_w64", "multi_diagonal_w64", "full"),
    ("diagonal_w0.5", "vertical_stripe_f1", "multi_diagonal_w64", "full"),
    ("diagonal_w0.5", "multi_diagonal_w64", "vertical_stripe_f1", "diagonal_w0.5"),
)


def check_head_patterns(head_patterns: Sequence[Sequence[str]], num_layers: int, num_heads: int) -> tuple[tuple[str, ...], ...]:
    """The assignment as a tuple of tuples, after checking its shape and every pattern name."""
    rows = tuple(tuple(str(p) for p in layer) for layer in head_patterns)
    if len(rows) != num_layers or any(len(layer) != num_heads for layer in rows):
        shape = [len(layer) for layer in rows]
        raise ValueError(f"head_patterns must give {num_layers} layers of {num_heads} heads; got layers of {shape} heads.")
    for layer in rows:
        for name in layer:
            pattern = get_pattern(name)  # raises on unknown names
            if pattern.kind == "skip" or pattern.needs_scores:
                raise ValueError(f"{name!r} cannot be trained into a head: use full or a fixed pattern (diagonal, multi_diagonal, vertical_stripe).")
    return rows


class _Shared:
    """What the processors of one model share during a forward: the mixing switch and the collected losses."""

    def __init__(self):
        self.use_sparse = False
        self.losses: list[torch.Tensor] = []
        self.layout: TokenLayout | None = None  # the token grid of the current input, set by a pre-forward hook


class StructuredSelfAttnProcessor:
    """Wan self-attention (projections, RMS norms, RoPE and output as `WanAttnProcessor`) whose chosen heads are also
    run under their pattern: adds their consistency loss to the shared list and, when `use_sparse` is set, passes
    their sparse output on. Self-attention only (no image context, no context parallelism)."""

    def __init__(self, patterns: Sequence[str], shared: _Shared):
        self.patterns = tuple(patterns)
        self.shared = shared
        self.heads = torch.tensor([h for h, p in enumerate(self.patterns) if p != "full"], dtype=torch.long)
        self.runtime = SparseAttention(backend="torch")

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attn.add_k_proj is not None or attention_mask is not None:
            raise ValueError("StructuredSelfAttnProcessor handles unmasked self-attention only.")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, H, S, D)
        out = F.scaled_dot_product_attention(q, k, v)
        if len(self.heads):
            out = self._structured(out, q, k, v)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    @torch.compiler.disable
    def _structured(self, dense, q, k, v):
        layout = self.shared.layout
        if layout is None or layout.num_tokens != q.shape[2]:
            raise ValueError(f"No token grid for {q.shape[2]} tokens: call the transformer itself, which sets it.")
        h = self.heads.to(q.device)
        sparse, _ = self.runtime(q[:, h].contiguous(), k[:, h].contiguous(), v[:, h].contiguous(), layout, [self.patterns[i] for i in self.heads.tolist()])
        target = dense[:, h]
        error = (sparse - target).pow(2).sum(dim=(2, 3)) / target.pow(2).sum(dim=(2, 3)).clamp_min(1e-12)
        self.shared.losses.append(error.mean())
        if not self.shared.use_sparse:
            return dense
        return dense.index_copy(1, h, sparse)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding (as in `WanAttnProcessor`)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class StructuredHeads:
    """Installs `StructuredSelfAttnProcessor` on every block's self-attention of a `WanTransformer3DModel`.

    Args:
        transformer: the model (its patch size gives the token grid of each input).
        head_patterns: one pattern name per head per layer ("full" for heads left alone).

    `take_consistency()` returns the mean consistency loss of the forward(s) since the last call; `remove()` puts the
    model's own processors back.
    """

    def __init__(self, transformer: torch.nn.Module, head_patterns: Sequence[Sequence[str]]):
        self._family = family_of(transformer)
        if self._family is None or self._family.name != "wan":
            raise ValueError(f"StructuredHeads trains Wan self-attention; got a {type(transformer).__name__}.")
        blocks = transformer.blocks
        self.head_patterns = check_head_patterns(head_patterns, len(blocks), blocks[0].attn1.heads)
        self.transformer = transformer
        self.shared = _Shared()
        self._originals = [block.attn1.processor for block in blocks]
        for block, patterns in zip(blocks, self.head_patterns):
            block.attn1.set_processor(StructuredSelfAttnProcessor(patterns, self.shared))
        self._hook = transformer.register_forward_pre_hook(self._note_grid, with_kwargs=True)

    def _note_grid(self, module, args, kwargs):  # the grid as sparsediff reads it for Wan at inference
        frames, height, width = self._family.grid(module, self._family.forward_inputs(module, args, kwargs))
        self.shared.layout = TokenLayout((video(frames, height, width),))

    def set_sparse(self, use_sparse: bool) -> None:
        self.shared.use_sparse = bool(use_sparse)

    def take_consistency(self) -> torch.Tensor:
        losses, self.shared.losses = self.shared.losses, []
        return torch.stack(losses).mean() if losses else torch.zeros(())

    def remove(self) -> None:
        for block, original in zip(self.transformer.blocks, self._originals):
            block.attn1.set_processor(original)
        self._hook.remove()


def sparse_step(seed: int, step: int, prob: float) -> bool:
    """Whether `step` passes the sparse outputs on: a function of (seed, step), so a resumed run repeats it."""
    return random.Random(seed * 7_919 + step * 104_729 + 1).random() < prob
