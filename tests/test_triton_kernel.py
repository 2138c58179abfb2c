"""The Triton block-sparse kernel against the dense masked reference: every pattern kind, ragged lengths, text
first and last, three dtypes, two head dims, and the runtime end to end. Without a GPU it runs on Triton's CPU
interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the CPU cases stay small."""

import pytest
import torch

pytest.importorskip("triton")

from sparsediff.kernels import triton_sparse  # noqa: E402
from sparsediff.kernels.reference import spec_reference_attention  # noqa: E402
from sparsediff.kernels.spec import SparseSpec  # noqa: E402
from sparsediff.kernels.triton_sparse import triton_sparse_attention  # noqa: E402
from sparsediff.layout import TokenLayout  # noqa: E402
from sparsediff.patterns import get_pattern  # noqa: E402
from sparsediff.runtime import SparseAttention, build_spec  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PATTERNS = ["diagonal_w1", "multi_diagonal_w1", "vertical_stripe_f1", "topk_blocks_k0.25"]
# (atol, rtol) against the float32 reference cast to the dtype
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def make_spec(name: str, layout: str, block_size: int, heads: int, seed: int = 0) -> SparseSpec:
    """The spec the runtime would build; topk_blocks gets random per-head scores (heads, nq, nk)."""
    pattern, layout = get_pattern(name), TokenLayout.parse(layout)
    scores = None
    if pattern.needs_scores:
        n = layout.num_blocks(block_size)
        scores = torch.rand((heads, n, n), generator=torch.Generator().manual_seed(seed))
    return build_spec(pattern, layout, block_size, scores)


def qkv(B: int, G: int, S: int, D: int, dtype=torch.float32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, G, S, D, generator=g).to(DEVICE, dtype) for _ in range(3)]


def check(spec: SparseSpec, B=2, G=2, D=64, dtype=torch.float32, seed=0, **kwargs):
    """The kernel on random (B, G, S, D) inputs, taken as already in the spec's kernel order, vs the reference."""
    q, k, v = qkv(B, G, spec.seq_len, D, dtype, seed)
    out = triton_sparse_attention(q, k, v, spec, **kwargs)
    expect = spec_reference_attention(q, k, v, spec)
    assert out.shape == q.shape and out.dtype == dtype
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expect.float(), atol=atol, rtol=rtol)


# ---- CPU (interpreter) and GPU -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize(
    "layout",
    [
        "text:11+video:3x6x10",  # 191 tokens, text first
        "video:3x6x10+text:11",  # 191 tokens, text last
        "video:5x2x13",  # 130 tokens, no text
        "video:97x1x1",  # 97 tokens, one token per frame
    ],
)
def test_matches_reference_on_ragged_layouts(name, layout):
    heads = 2 if get_pattern(name).needs_scores else 1  # per-head block tables for topk; others share one
    check(make_spec(name, layout, block_size=32, heads=heads), B=2, G=heads)


@pytest.mark.parametrize("name", PATTERNS)
def test_block_size_16_text_on_both_sides_three_heads(name):
    # 16-token blocks (no key sub-tiles), three per-head topk tables
    check(make_spec(name, "text:7+video:4x5x6+text:3", block_size=16, heads=3), B=1, G=3, seed=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["diagonal_w1", "topk_blocks_k0.25"])
def test_half_precision(name, dtype):
    check(make_spec(name, "text:11+video:3x6x10", block_size=32, heads=2), dtype=dtype)


@pytest.mark.parametrize("name", ["multi_diagonal_w1", "vertical_stripe_f0.5"])
def test_head_dim_128(name):
    check(make_spec(name, "text:5+video:2x4x8", block_size=32, heads=1), B=1, G=2, D=128)


def test_custom_scale_and_strided_inputs():
    spec = make_spec("diagonal_w0.5", "video:3x6x10+text:11", block_size=32, heads=1)
    S = spec.seq_len
    g = torch.Generator().manual_seed(2)
    # (B, S, G, D) storage viewed as (B, G, S, D), the layout attention processors hand over; D not contiguous in v
    q, k = [torch.randn(2, S, 2, 32, generator=g).to(DEVICE).transpose(1, 2) for _ in range(2)]
    v = torch.randn(2, 2, 32, S, generator=g).to(DEVICE).transpose(2, 3)
    out = triton_sparse_attention(q, k, v, spec, scale=0.3)
    torch.testing.assert_close(out, spec_reference_attention(q, k, v, spec, scale=0.3), atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter reducing poisoned rows
def test_skipped_blocks_are_never_read():
    """Poison one key block with NaN: query blocks whose table skips it must come out exact and finite."""
    spec = make_spec("topk_blocks_k0.25", "video:5x2x13", block_size=32, heads=1)
    poisoned = 2
    clean_rows = ~spec.block_mask[0, :, poisoned]  # query blocks that never visit the poisoned key block
    assert clean_rows.any() and (~clean_rows).any()
    q, k, v = qkv(1, 1, spec.seq_len, 32)
    expect = spec_reference_attention(q, k, v, spec)
    k[:, :, poisoned * 32 : (poisoned + 1) * 32] = float("nan")
    v[:, :, poisoned * 32 : (poisoned + 1) * 32] = float("nan")
    out = triton_sparse_attention(q, k, v, spec)
    rows = clean_rows.repeat_interleave(32)[: spec.seq_len].to(DEVICE)
    assert torch.isfinite(out[:, :, rows]).all()
    torch.testing.assert_close(out[:, :, rows], expect[:, :, rows], atol=1e-4, rtol=1e-4)
    assert torch.isnan(out[:, :, ~rows]).any()  # and the poison does reach the rows that read it


def test_runtime_triton_backend_equals_reference_backend():
    layout = TokenLayout.parse("text:11+video:3x6x10")
    patterns = ["full", "skip", "diagonal_w1", "multi_diagonal_w1", "vertical_stripe_f1", "topk_blocks_k0.25"]
    q, k, v = qkv(2, len(patterns), layout.num_tokens, 32, seed=3)
    triton_attn, reference_attn = SparseAttention(backend="triton"), SparseAttention(backend="reference")
    out, stats = triton_attn(q, k, v, layout, patterns, block_size=32)
    expect, _ = reference_attn(q, k, v, layout, patterns, block_size=32)
    assert stats.backend == "triton"
    assert (stats.heads_skipped, stats.heads_sparse, stats.heads_full) == (1, 4, 1)
    torch.testing.assert_close(out, expect, atol=1e-4, rtol=1e-4)
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))


@pytest.mark.parametrize("block_size", [16, 32, 48, 64, 128, 256])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_autotune_configs_divide_the_block_size(block_size, head_dim):
    kept = [c for c in triton_sparse._candidate_configs() if triton_sparse._config_fits(c, block_size, head_dim)]
    assert 1 <= len(kept) <= 10  # something to run, and few enough to benchmark
    for config in kept:
        assert block_size % config.kwargs["BLOCK_M"] == 0 and block_size % config.kwargs["BLOCK_N"] == 0
        tile = config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"]
        # at D = 128 a 128 x 128 score tile needs 8 warps of registers (allowed since the H200 run: bands got faster)
        assert tile <= (128 * 64 if head_dim >= 128 and config.num_warps < 8 else 128 * 128)
    configs = triton_sparse._sparse_attn_fwd.configs
    chosen = triton_sparse._prune_configs(configs, {}, BLOCK_SIZE=block_size, HEAD_DIM=head_dim)
    if triton_sparse.INTERPRET:  # one config: the interpreter never benchmarks
        assert len(chosen) == 1 and block_size % chosen[0].kwargs["BLOCK_N"] == 0
    else:
        assert chosen == kept


@pytest.mark.parametrize("name", ["diagonal_w0.5", "vertical_stripe_f0.5", "topk_blocks_k0.5"])
def test_full_blocks_need_no_mask_and_tables_cover_the_block_mask(name):
    spec = make_spec(name, "text:11+video:3x6x10", block_size=16, heads=2)
    full, partial = triton_sparse.full_and_partial_blocks(spec)
    assert torch.equal(full | partial, spec.block_mask) and not (full & partial).any()
    bs, S = spec.block_size, spec.seq_len
    for h, qb, kb in full.nonzero().tolist():  # every token pair of a full block is allowed and inside S
        rows, cols = torch.arange(qb * bs, min(S, (qb + 1) * bs)), torch.arange(kb * bs, (kb + 1) * bs)
        assert cols[-1] < S and spec.token_allowed(rows, cols, head=h).all()
    if spec.mode != "blocks":  # band and stripe have partial blocks inside the sequence, not only the tail
        assert partial[..., :-1].any()


# ---- input checks -------------------------------------------------------------------------------------------


def test_bad_inputs_raise_with_the_fix():
    spec = make_spec("diagonal_w1", "video:97x1x1", block_size=32, heads=1)
    q, k, v = qkv(1, 2, 97, 64)
    with pytest.raises(ValueError, match="one of float16, bfloat16 or float32"):
        triton_sparse_attention(q.double(), k.double(), v.double(), spec)
    with pytest.raises(ValueError, match=r"Head dim D=48 is not supported.*backend='torch'"):
        triton_sparse_attention(q[..., :48], k[..., :48], v[..., :48], spec)
    with pytest.raises(ValueError, match=r"S=96 tokens but the spec was built for seq_len=97"):
        triton_sparse_attention(q[:, :, :96], k[:, :, :96], v[:, :, :96], spec)
    with pytest.raises(ValueError, match=r"\(B, G, S, D\) of one shape"):
        triton_sparse_attention(q[0], k[0], v[0], spec)
    odd = make_spec("diagonal_w1", "video:97x1x1", block_size=24, heads=1)
    with pytest.raises(ValueError, match="block_size=24 is not a multiple of 16"):
        triton_sparse_attention(q, k, v, odd)
    per_head = make_spec("topk_blocks_k0.5", "video:97x1x1", block_size=32, heads=3)
    with pytest.raises(ValueError, match="block_mask has 3 heads but q has G=2"):
        triton_sparse_attention(q, k, v, per_head)


# ---- the Hopper path (TMA descriptors), run by the interpreter on the CPU -------------------------------------


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize(
    "layout",
    ["text:32+video:2x8x16", "video:3x7x9+text:20"],  # text first / text last, both ragged at block size 64
)
def test_tma_path_matches_reference(name, layout, monkeypatch):
    monkeypatch.setattr(triton_sparse, "_sparse_attn_fwd", None)  # the pointer kernel must not be what runs
    check(make_spec(name, layout, block_size=64, heads=2), B=2, G=2, D=32, dtype=torch.float16, tma=True)


@pytest.mark.parametrize("name", ["diagonal_w1", "multi_diagonal_w1", "vertical_stripe_f1", "topk_blocks_k0.5"])
def test_tma_path_even_sequences_use_descriptors_for_every_tile(name, monkeypatch):
    """S a multiple of the block size: Q, the output and the masked loop go through descriptors too; bands and
    stripes over a video axis take the contiguous full loop, top-k the indexed one."""
    monkeypatch.setattr(triton_sparse, "_sparse_attn_fwd", None)
    spec = make_spec(name, "video:4x8x16", block_size=64, heads=2)  # 8 blocks: top-k 4 of them leaves gaps
    expect_contiguous = not name.startswith("topk")
    assert triton_sparse._full_table_is_contiguous(spec) == expect_contiguous
    check(spec, B=1, G=2, D=32, dtype=torch.float16, tma=True)


def test_contiguous_runs_are_told_from_gaps():
    index = torch.tensor([[[3, 4, 5], [0, -1, -1], [2, 4, -1]]], dtype=torch.int32)
    count = torch.tensor([[3, 1, 2]], dtype=torch.int32)
    assert not triton_sparse.runs_are_contiguous(index, count)
    assert triton_sparse.runs_are_contiguous(index[:, :2], count[:, :2])
    assert triton_sparse.runs_are_contiguous(index[:, 1:2], torch.zeros((1, 1), dtype=torch.int32))


@pytest.mark.parametrize("name", ["diagonal_w1", "topk_blocks_k0.5"])
def test_tma_path_bfloat16_block_128_head_dim_64(name):
    check(make_spec(name, "video:2x8x16", block_size=128, heads=1), B=1, G=2, D=64, dtype=torch.bfloat16, tma=True)


def test_tma_path_is_chosen_only_where_it_can_run():
    spec = make_spec("diagonal_w1", "video:2x8x8", block_size=64, heads=1)
    q, k, v = qkv(1, 1, 128, 32, torch.float16)
    if DEVICE == "cpu":  # the CPU is no Hopper GPU: auto = pointers
        assert "not Hopper" in triton_sparse.tma_unavailable(q, k, v, spec)
    assert triton_sparse.tma_unavailable(q, k, v, spec, check_device=False) is None
    with pytest.raises(ValueError, match=r"tma=True.*dtype torch.float32.*Pass tma=None"):
        triton_sparse_attention(q.float(), k.float(), v.float(), spec, tma=True)
    with pytest.raises(ValueError, match="not contiguous"):
        triton_sparse_attention(q.transpose(2, 3).contiguous().transpose(2, 3), k, v, spec, tma=True)
    small = make_spec("diagonal_w1", "video:2x8x8", block_size=32, heads=1)
    with pytest.raises(ValueError, match="block_size=32 is not a multiple of 64"):
        triton_sparse_attention(q, k, v, small, tma=True)


@pytest.mark.parametrize("block_size", [64, 128, 192, 256])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_tma_configs_divide_the_block_size(block_size, head_dim):
    kept = [c for c in triton_sparse._tma_configs() if triton_sparse._tma_config_fits(c, block_size, head_dim)]
    assert 1 <= len(kept) <= 15  # each is compiled and timed once per shape
    for config in kept:
        assert block_size % config.kwargs["BLOCK_M"] == 0 and block_size % config.kwargs["BLOCK_N"] == 0
        tile = config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"]
        assert config.num_warps == 4 or tile >= 128 * 128  # 8 warps only on 128x128 tiles
        assert config.num_warps == 8 or tile < 128 * 128 or head_dim < 128  # D = 128 on 128x128: 8 warps
    args = {**kept[0].kwargs, "HEAD_DIM": head_dim, **{f"desc_{x}": type("D", (), {})() for x in "qkvo"}}
    kept[0].pre_hook(args)
    assert args["desc_k"].block_shape == args["desc_v"].block_shape == [args["BLOCK_N"], head_dim]
    assert args["desc_q"].block_shape == args["desc_o"].block_shape == [args["BLOCK_M"], head_dim]


def test_cpu_tensors_without_the_interpreter_raise(monkeypatch):
    monkeypatch.setattr(triton_sparse, "INTERPRET", False)
    spec = make_spec("diagonal_w1", "video:97x1x1", block_size=32, heads=1)
    q = torch.randn(1, 1, 97, 64)
    with pytest.raises(ValueError, match="needs a CUDA device; move q, k, v to CUDA"):
        triton_sparse_attention(q, q, q, spec)


# ---- GPU only: realistic sizes ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["diagonal_w1", "multi_diagonal_w4", "vertical_stripe_f1", "topk_blocks_k0.25"])
def test_gpu_long_sequence_bf16_head_dim_128(name):
    check(make_spec(name, "text:64+video:8x32x32", block_size=128, heads=2), B=1, G=2, D=128, dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_ragged_long_sequence(dtype):
    check(make_spec("diagonal_w0.5", "text:77+video:7x30x45", block_size=64, heads=1), B=2, G=2, D=64, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["diagonal_w1", "vertical_stripe_f1", "topk_blocks_k0.25"])
def test_gpu_tma_path_long_sequence(name):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA path needs compute capability >= 9")
    spec = make_spec(name, "text:64+video:8x32x32", block_size=128, heads=2)
    check(spec, B=1, G=2, D=128, dtype=torch.bfloat16, tma=True)
    even = make_spec(name, "video:8x32x32", block_size=128, heads=2)  # S a multiple of the block: all-TMA tiles
    check(even, B=1, G=2, D=128, dtype=torch.bfloat16, tma=True)
    check(spec, B=1, G=2, D=128, dtype=torch.bfloat16, tma=False)


@pytest.mark.gpu
def test_gpu_runtime_matches_reference_bf16():
    layout = TokenLayout.parse("text:32+video:4x32x32")
    patterns = ["full", "skip", "diagonal_w1", "multi_diagonal_w2", "vertical_stripe_f1", "topk_blocks_k0.25"] * 2
    q, k, v = qkv(1, len(patterns), layout.num_tokens, 128, torch.bfloat16, seed=4)
    out, _ = SparseAttention(backend="triton")(q, k, v, layout, patterns, block_size=128)
    expect, _ = SparseAttention(backend="reference")(q, k, v, layout, patterns, block_size=128)
    atol, rtol = TOLERANCE[torch.bfloat16]
    torch.testing.assert_close(out.float(), expect.float(), atol=atol, rtol=rtol)
