"""The FlexAttention backend against the spec reference: BlockMask structure, eager and compiled outputs, runtime."""

import logging

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from sparsediff.kernels import flex_sparse, log
from sparsediff.kernels.flex_sparse import build_block_mask, compile_unsupported, flex_block_mask, flex_sparse_attention
from sparsediff.kernels.reference import spec_reference_attention
from sparsediff.layout import TokenLayout
from sparsediff.patterns import get_pattern
from sparsediff.runtime import SparseAttention, build_spec

KINDS = ["diagonal_w1", "multi_diagonal_w1", "vertical_stripe_f1", "topk_blocks_k0.25"]
# (layout, block_size): 97, 130 and 191 tokens (ragged tails), text first and text last
CASES = [("video:97x1x1", 16), ("video:5x2x13", 32), ("text:11+video:3x6x10", 16), ("video:3x6x10+text:11", 32)]
G = 2  # heads per group
needs_compile = pytest.mark.skipif(
    compile_unsupported(torch.empty(0)) is not None, reason="compiled flex_attention needs AVX2 on this CPU"
)


def make_spec(name: str, layout: str, block_size: int, seed: int = 0):
    layout = TokenLayout.parse(layout)
    pattern = get_pattern(name)
    n = layout.num_blocks(block_size)
    scores = torch.rand((G, n, n), generator=torch.Generator().manual_seed(seed)) if pattern.needs_scores else None
    return build_spec(pattern, layout, block_size, scores)


def qkv(S: int, D: int = 64, B: int = 2, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, G, S, D, generator=g).to(dtype) for _ in range(3)]


def dense_blocks(num: torch.Tensor, index: torch.Tensor, nk: int) -> torch.Tensor:
    """(1, G', nq) counts and (1, G', nq, width) indices -> (G', nq, nk) bool, reading only the first `count`."""
    valid = torch.arange(index.shape[-1]) < num[..., None]
    out = torch.zeros((*index.shape[:-1], nk + 1), dtype=torch.bool)
    out.scatter_(-1, torch.where(valid, index.long(), nk), True)
    return out[0, ..., :nk]


def expand_blocks(blocks: torch.Tensor, block_size: int, S: int) -> torch.Tensor:
    """(G', nq, nk) block mask -> (G', S, S) token mask of whole tiles."""
    return blocks.repeat_interleave(block_size, dim=1).repeat_interleave(block_size, dim=2)[:, :S, :S]


@pytest.mark.parametrize("name", [*KINDS, "diagonal_w0.4"])
@pytest.mark.parametrize("layout, block_size", [*CASES, ("text:11+video:3x6x10", 64)])
def test_block_mask_is_the_spec_block_table_split_into_full_and_partial(name, layout, block_size):
    spec = make_spec(name, layout, block_size)
    S, n = spec.seq_len, spec.num_blocks
    bm = build_block_mask(spec)
    assert bm.shape == (1, spec.block_mask.shape[0], S, S)
    assert bm.BLOCK_SIZE == (block_size, block_size)
    for index in (bm.kv_indices, bm.full_kv_indices):  # no -1 padding: every entry is a real key block
        assert index.shape[-1] == n and int(index.min()) >= 0 and int(index.max()) < n
    partial = dense_blocks(bm.kv_num_blocks, bm.kv_indices, n)
    full = dense_blocks(bm.full_kv_num_blocks, bm.full_kv_indices, n)
    table_index, table_count = spec.block_table()
    assert not (partial & full).any()
    assert torch.equal(partial | full, dense_blocks(table_count[None], table_index[None], n))
    assert torch.equal(full, spec.full_block_mask())
    # what a block-sparse kernel computes: full tiles, plus mask_mod inside partial tiles, nothing elsewhere
    heads = spec.block_mask.shape[0]
    token_rule = create_mask(bm.mask_mod, 1, heads, S, S, device="cpu")[0]
    kernel_mask = expand_blocks(full, block_size, S) | (expand_blocks(partial, block_size, S) & token_rule)
    idx = torch.arange(S)
    truth = torch.stack([spec.token_allowed(idx, idx, head=h) for h in range(heads)])
    assert torch.equal(kernel_mask, truth)
    assert torch.equal(token_rule, truth)  # the eager path evaluates mask_mod everywhere


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("layout, block_size", CASES)
def test_eager_matches_spec_reference(name, layout, block_size):
    spec = make_spec(name, layout, block_size)
    q, k, v = qkv(spec.seq_len)
    out = flex_sparse_attention(q, k, v, spec, compiled=False)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, spec_reference_attention(q, k, v, spec), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["vertical_stripe_f1", "topk_blocks_k0.25"])
def test_eager_head_dim_128_and_custom_scale(name):
    spec = make_spec(name, "video:3x6x10+text:11", block_size=32)
    q, k, v = qkv(spec.seq_len, D=128)
    out = flex_sparse_attention(q, k, v, spec, scale=0.05, compiled=False)
    torch.testing.assert_close(out, spec_reference_attention(q, k, v, spec, scale=0.05), rtol=1e-5, atol=1e-5)


def test_sparsity_changes_the_output():
    spec = make_spec("diagonal_w0.4", "text:11+video:3x6x10", block_size=16)
    q, k, v = qkv(spec.seq_len)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (flex_sparse_attention(q, k, v, spec, compiled=False) - dense).abs().max() > 1e-2


@pytest.mark.slow  # compiles flex_attention (15 s on 2 cores)
@needs_compile
def test_compiled_matches_spec_reference_on_ragged_text_layout():
    """One compiled graph (band mode, G=2, S=191, D=64, block 16) serves diagonal and multi_diagonal specs."""
    for name in ["diagonal_w1", "multi_diagonal_w8"]:
        spec = make_spec(name, "text:11+video:3x6x10", block_size=16)
        bm = build_block_mask(spec)
        assert int(bm.kv_num_blocks.sum()) > 0 and int(bm.full_kv_num_blocks.sum()) > 0  # both tile kinds run
        q, k, v = qkv(spec.seq_len)
        out = flex_sparse_attention(q, k, v, spec)  # compiled is the default
        torch.testing.assert_close(out, spec_reference_attention(q, k, v, spec), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@needs_compile
@pytest.mark.parametrize("name", ["vertical_stripe_f1", "topk_blocks_k0.25"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_compiled_stripe_and_per_head_blocks(name, dtype, tol):
    spec = make_spec(name, "video:3x6x10+text:11", block_size=16)
    q, k, v = qkv(spec.seq_len, dtype=dtype)
    out = flex_sparse_attention(q, k, v, spec, compiled=True)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), spec_reference_attention(q, k, v, spec).float(), rtol=tol, atol=tol)


def test_block_mask_is_built_once_per_spec_and_device(monkeypatch):
    spec = make_spec("diagonal_w1", "video:5x2x13", block_size=16)
    builds = []
    monkeypatch.setattr(flex_sparse, "build_block_mask", lambda s, d: builds.append(d) or build_block_mask(s, d))
    q, k, v = qkv(spec.seq_len)
    first = flex_sparse_attention(q, k, v, spec, compiled=False)
    second = flex_sparse_attention(q, k, v, spec, compiled=False)
    assert len(builds) == 1 and torch.equal(first, second)
    assert flex_block_mask(spec, q.device) is flex_block_mask(spec, q.device)


def test_unsupported_compiled_dtype_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(log, "_warned", set())
    spec = make_spec("vertical_stripe_f1", "video:5x2x13", block_size=16)
    q, k, v = qkv(spec.seq_len, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger=flex_sparse.__name__):
        for _ in range(2):
            out = flex_sparse_attention(q, k, v, spec, compiled=True)
    warnings = [r.getMessage() for r in caplog.records if r.name == flex_sparse.__name__]
    assert len(warnings) == 1 and "torch.float64" in warnings[0] and "eagerly" in warnings[0]
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, spec_reference_attention(q, k, v, spec), rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    spec = make_spec("topk_blocks_k0.25", "video:5x2x13", block_size=16)  # per-head blocks for G = 2
    q, k, v = qkv(spec.seq_len)
    with pytest.raises(ValueError, match=r"one shape; got \(2, 2, 130, 64\), \(2, 2, 130, 32\)"):
        flex_sparse_attention(q, k[..., :32], v, spec, compiled=False)
    with pytest.raises(ValueError, match="share one dtype.*cast k and v"):
        flex_sparse_attention(q, k.half(), v, spec, compiled=False)
    with pytest.raises(ValueError, match="S=97 tokens but the spec was built for seq_len=130"):
        flex_sparse_attention(q[:, :, :97], k[:, :, :97], v[:, :, :97], spec, compiled=False)
    with pytest.raises(ValueError, match="block_mask has 2 heads but q has G=3"):
        q3 = torch.randn(1, 3, spec.seq_len, 64)
        flex_sparse_attention(q3, q3, q3, spec, compiled=False)
    with pytest.raises(ValueError, match="floating point"):
        flex_sparse_attention(q.long(), k.long(), v.long(), spec, compiled=False)


def test_runtime_flex_backend_equals_reference_backend(monkeypatch):
    monkeypatch.setattr(flex_sparse, "COMPILED", False)  # the eager path: no compile time in the default suite
    layout = TokenLayout.parse("text:11+video:3x6x10")
    patterns = ["full", "skip", "diagonal_w1", "multi_diagonal_w1", "vertical_stripe_f1", "topk_blocks_k0.25"]
    patterns.append("diagonal_w1")  # a second head in the diagonal group: one kernel call for G = 2
    g = torch.Generator().manual_seed(1)
    q, k, v = [torch.randn(2, len(patterns), layout.num_tokens, 64, generator=g) for _ in range(3)]
    flex = SparseAttention(backend="flex")
    out, stats = flex(q, k, v, layout, patterns, block_size=32)
    expect, _ = SparseAttention(backend="reference")(q, k, v, layout, patterns, block_size=32)
    assert stats.backend == "flex" and stats.heads_sparse == 5 and stats.heads_skipped == 1
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
