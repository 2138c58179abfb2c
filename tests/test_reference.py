import pytest
import torch

from sparsediff.kernels.reference import dense_sdpa, reference_attention
from sparsediff.layout import TokenLayout
from sparsediff.patterns import get_pattern


def qkv(B=2, H=3, S=40, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=g) for _ in range(3)]


def test_no_mask_equals_sdpa():
    q, k, v = qkv()
    torch.testing.assert_close(reference_attention(q, k, v, None), dense_sdpa(q, k, v), rtol=1e-5, atol=1e-5)


def test_masked_heads_match_per_head_sdpa_and_skip_is_zero():
    layout = TokenLayout.parse("text:4+video:3x3x4")
    q, k, v = qkv(S=layout.num_tokens)
    patterns = [get_pattern(n) for n in ["diagonal_w0.5", "skip", "full"]]
    masks = torch.stack([p.token_mask(layout) for p in patterns])
    out = reference_attention(q, k, v, masks)
    expect0 = torch.nn.functional.scaled_dot_product_attention(q[:, :1], k[:, :1], v[:, :1], attn_mask=masks[0])
    torch.testing.assert_close(out[:, :1], expect0, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    torch.testing.assert_close(out[:, 2], dense_sdpa(q, k, v)[:, 2], rtol=1e-5, atol=1e-5)


def test_bad_shapes_raise():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="masks must be"):
        reference_attention(q, k, v, torch.ones(2, 40, 40, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(B, H, S, D\)"):
        reference_attention(q[0], k[0], v[0], None)
