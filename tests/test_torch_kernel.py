"""The torch backend against the dense reference, for every pattern kind and layout shape: each test runs twice,
through the compiled CPU kernel and through the pure-torch paths (the fallback on other dtypes, devices and
machines without a compiler)."""

import contextlib

import pytest
import torch

import sparsediff.kernels.torch_sparse as torch_sparse
from sparsediff.kernels import cpu_kernel
from sparsediff.kernels.reference import spec_reference_attention
from sparsediff.kernels.spec import block_order, block_table
from sparsediff.kernels.torch_sparse import torch_sparse_attention
from sparsediff.layout import TokenLayout
from sparsediff.patterns import get_pattern
from sparsediff.runtime import build_spec

SPARSE = ["diagonal_w0.5", "diagonal_w3", "multi_diagonal_w1", "vertical_stripe_f1", "vertical_stripe_f0.2",
          "topk_blocks_k0.3", "topk_blocks_k0.7"]


@pytest.fixture(autouse=True, params=["compiled", "pure"])
def path(request):
    if request.param == "compiled" and cpu_kernel.load() is None:
        pytest.skip(f"the compiled CPU kernel did not load here: {cpu_kernel.reason()}")
    with cpu_kernel.disabled() if request.param == "pure" else contextlib.nullcontext():
        yield request.param


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # exercise the chunk loops (interior and edge chunks, several gathers) at test sizes
    monkeypatch.setattr(torch_sparse, "BAND_CHUNK_MIN", 16)
    monkeypatch.setattr(torch_sparse, "BAND_CHUNK_MAX", 16)
    monkeypatch.setattr(torch_sparse, "BAND_ROWS", 8)  # the batched band's windows, the chunked ends around them
    monkeypatch.setattr(torch_sparse, "GATHER_BYTES", 1 << 14)


def make_spec(name, layout, block_size, heads=3, seed=0):
    pattern = get_pattern(name)
    n = layout.num_blocks(block_size)
    scores = torch.rand((heads, n, n), generator=torch.Generator().manual_seed(seed)) if pattern.needs_scores else None
    return build_spec(pattern, layout, block_size, scores)


def qkv(layout, heads=3, batch=2, dim=16, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, layout.num_tokens, dim, generator=g).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("name", SPARSE)
@pytest.mark.parametrize("block_size", [16, 32])
def test_matches_reference_fp32(ragged_layout, name, block_size):
    spec = make_spec(name, ragged_layout, block_size)
    q, k, v = qkv(ragged_layout)
    torch.testing.assert_close(
        torch_sparse_attention(q, k, v, spec), spec_reference_attention(q, k, v, spec), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("name", ["diagonal_w1", "multi_diagonal_w1", "vertical_stripe_f1", "topk_blocks_k0.3"])
def test_matches_reference_half_precision(name, dtype, tol):
    layout = TokenLayout.parse("text:9+video:3x5x8")
    spec = make_spec(name, layout, 16)
    q, k, v = qkv(layout, dtype=dtype)
    out = torch_sparse_attention(q, k, v, spec)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), spec_reference_attention(q, k, v, spec).float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("name", ["diagonal_w1", "topk_blocks_k0.4", "vertical_stripe_f1"])
def test_head_dims(dim, name):
    layout = TokenLayout.parse("video:4x6x8+text:5")
    spec = make_spec(name, layout, 32)
    q, k, v = qkv(layout, dim=dim)
    torch.testing.assert_close(
        torch_sparse_attention(q, k, v, spec), spec_reference_attention(q, k, v, spec), rtol=1e-5, atol=1e-5
    )


def test_shared_and_per_head_topk_tables():
    layout = TokenLayout.parse("prompt:50+generation:30")
    q, k, v = qkv(layout, heads=4)
    n = layout.num_blocks(16)
    shared = build_spec(get_pattern("topk_blocks_k0.5"), layout, 16, torch.rand(n, n))
    assert shared.block_mask.shape[0] == 1
    torch.testing.assert_close(
        torch_sparse_attention(q, k, v, shared), spec_reference_attention(q, k, v, shared), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("path", ["pure"], indirect=True)  # a test of the pure-torch band only
@pytest.mark.parametrize("layout_spec", ["video:4x6x8", "text:7+video:4x6x8+text:5"])
@pytest.mark.parametrize("name", ["diagonal_w0.4", "diagonal_w1", "multi_diagonal_w2"])
def test_exact_band_matches_the_reference_and_the_chunked_form(layout_spec, name, monkeypatch, path):
    """Every query runs: the exact band (windows, causal ends, text keys merged) runs and matches the reference;
    the last Sq queries only (a decoder's canvas) and calls with gradients run the chunked form and agree."""
    layout = TokenLayout.parse(layout_spec)
    spec = make_spec(name, layout, 16)
    q, k, v = qkv(layout)
    n = spec.axis_end - spec.axis_start
    assert n >= 2 * spec.radius + 2 * 8 and spec.radius > 0  # windows and both causal ends run
    calls = []
    exact = torch_sparse._band_exact
    monkeypatch.setattr(torch_sparse, "_band_exact", lambda *a: calls.append(1) or exact(*a))
    expect = spec_reference_attention(q, k, v, spec)
    torch.testing.assert_close(torch_sparse_attention(q, k, v, spec), expect, rtol=1e-5, atol=1e-5)
    assert len(calls) == 1
    heads_last = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]  # strided, as (B, S, H, D) storage
    torch.testing.assert_close(torch_sparse_attention(*heads_last, spec), expect, rtol=1e-5, atol=1e-5)
    tail = q[:, :, -61:]
    torch.testing.assert_close(torch_sparse_attention(tail, k, v, spec), expect[:, :, -61:], rtol=1e-5, atol=1e-5)
    chunked = torch_sparse_attention(q.requires_grad_(), k, v, spec)
    assert len(calls) == 2  # the strided call ran exact too; the tail and the differentiable call did not
    torch.testing.assert_close(chunked, expect, rtol=1e-5, atol=1e-5)
    chunked.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("rows", [8, 16, 24])
@pytest.mark.parametrize("radius", [0, 1, 7, 8, 20])
def test_exact_band_at_every_radius_and_window(rows, radius, monkeypatch):
    """Radii below, at and above the window size, with and without rows left over after the last full window."""
    monkeypatch.setattr(torch_sparse, "BAND_ROWS", rows)
    from sparsediff.kernels.spec import SparseSpec

    S = 2 * radius + 2 * rows + 5
    spec = SparseSpec("band", S, 16, 0, S, radius, torch.ones(1, -(-S // 16), -(-S // 16), dtype=torch.bool))
    q, k, v = qkv(TokenLayout.parse(f"video:{S}x1x1"), heads=2, batch=1)
    torch.testing.assert_close(torch_sparse_attention(q, k, v, spec), spec_reference_attention(q, k, v, spec), rtol=1e-5, atol=1e-5)


def test_wrong_length_is_refused():
    layout = TokenLayout.parse("video:4x4x4")
    spec = make_spec("diagonal_w1", layout, 16)
    q = torch.randn(1, 2, 60, 16)
    with pytest.raises(ValueError, match="S=60 tokens but the spec was built for 64"):
        torch_sparse_attention(q, q, q, spec)


@pytest.mark.parametrize("name", ["diagonal_w0.5", "diagonal_w2", "multi_diagonal_w1", "vertical_stripe_f0.5", "vertical_stripe_f2"])
@pytest.mark.parametrize("block_size", [16, 32])
def test_full_blocks_are_exactly_the_blocks_without_a_masked_pair(ragged_layout, name, block_size):
    spec = make_spec(name, ragged_layout, block_size)
    S = spec.seq_len
    idx = torch.arange(S)
    allowed = spec.token_allowed(idx, idx)
    n = spec.num_blocks
    expect = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            expect[i, j] = allowed[i * block_size : (i + 1) * block_size, j * block_size : (j + 1) * block_size].all()
    assert torch.equal(spec.full_block_mask()[0], expect & spec.block_mask[0])


def test_block_table_and_block_order_list_kept_blocks_ascending():
    mask = torch.tensor([[[False, True, False, True], [True, True, True, True], [False, False, False, False]]])
    index, count = block_table(mask)
    assert count.tolist() == [[2, 4, 0]]
    assert index.tolist() == [[[1, 3, -1, -1], [0, 1, 2, 3], [-1, -1, -1, -1]]]  # padded with -1 to the longest list
    order, same_count = block_order(mask)
    assert torch.equal(same_count, count) and order.dtype == index.dtype == torch.int32
    assert order.tolist() == [[[1, 3, 0, 2], [0, 1, 2, 3], [0, 1, 2, 3]]]  # each row continued with the blocks left out
