"""The runtime: head grouping, skip/full handling, caching, backend choice, a mixed layer vs the reference."""

import logging

import pytest
import torch
import torch.nn.functional as F

import sparsediff.runtime as runtime
from sparsediff.kernels.reference import reference_attention
from sparsediff.layout import TokenLayout
from sparsediff.patterns import get_pattern
from sparsediff.runtime import SparseAttention, group_heads, resolve_backend

MIXED = ["full", "skip", "diagonal_w1", "multi_diagonal_w1", "vertical_stripe_f1", "topk_blocks_k0.3", "diagonal_w1", "skip"]


def qkv(layout, heads, batch=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, layout.num_tokens, dim, generator=g) for _ in range(3)]


def token_masks(groups, layout, patterns, block_size):
    """Per-head token masks in the layout's order; topk heads use the block masks the runtime selected."""
    masks = [None] * len(patterns)
    for g in groups:
        for i, h in enumerate(g.heads.tolist()):
            p = g.pattern
            if p.needs_scores:
                blocks = g.spec.block_mask[i]
                idx = torch.arange(layout.num_tokens) // block_size
                masks[h] = blocks[idx][:, idx] | layout.is_text[:, None] | layout.is_text[None, :]
            else:
                masks[h] = p.token_mask(layout)
    return torch.stack(masks)


@pytest.mark.parametrize("layout", ["text:7+video:4x5x6+text:3", "video:3x6x10+text:11", "prompt:61+generation:36"])
def test_mixed_layer_matches_reference(layout):
    layout = TokenLayout.parse(layout)
    q, k, v = qkv(layout, len(MIXED))
    attn = SparseAttention(backend="torch")
    out, stats = attn(q, k, v, layout, MIXED, block_size=16)
    expect = reference_attention(q, k, v, token_masks(stats.groups, layout, [get_pattern(p) for p in MIXED], 16))
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1])) and torch.equal(out[:, 7], torch.zeros_like(out[:, 7]))
    assert stats.heads_skipped == 2 and stats.heads_full == 1 and stats.heads_sparse == 5 and not stats.dense
    assert 0.0 < stats.density < 1.0


def test_a_slice_of_heads_runs_the_plans_patterns_for_those_heads():
    """A caller holding global heads [a, b) of a layer (a context-parallel rank) gets exactly those heads of the
    whole layer's output, and its stats name the global heads."""
    layout = TokenLayout.parse("text:7+video:4x5x6+text:3")
    q, k, v = qkv(layout, len(MIXED))
    whole, _ = SparseAttention(backend="torch")(q, k, v, layout, MIXED, block_size=16)
    for start, end in ((0, 4), (4, 8), (2, 5)):
        part, stats = SparseAttention(backend="torch")(
            q[:, start:end], k[:, start:end], v[:, start:end], layout, MIXED, block_size=16, head_start=start
        )
        torch.testing.assert_close(part, whole[:, start:end], rtol=1e-6, atol=1e-6)
        assert sorted(h for g in stats.groups for h in g.heads.tolist()) == list(range(start, end))
        assert stats.heads_skipped == sum(1 for p in MIXED[start:end] if p == "skip")
    with pytest.raises(ValueError, match=r"holds heads \[6, 10\) but the layer has 8"):
        SparseAttention()(q[:, :4], k[:, :4], v[:, :4], layout, MIXED, head_start=6)


def test_an_all_full_layer_is_sdpa_unless_the_compiled_kernel_runs_it():
    from sparsediff.kernels import cpu_kernel

    layout = TokenLayout.parse("video:3x4x4")
    q, k, v = qkv(layout, 4)
    sdpa = F.scaled_dot_product_attention(q, k, v)
    with cpu_kernel.disabled():  # no compiled kernel: SDPA, bit for bit, and nothing to gain from the runtime
        runtime = SparseAttention(backend="torch")
        out, stats = runtime(q, k, v, layout, ["full"] * 4)
        assert not runtime.runs_full_layers(q, k, v)
    assert torch.equal(out, sdpa)
    assert stats.dense and stats.density == 1.0 and stats.heads_full == 4
    runtime = SparseAttention(backend="torch")
    assert runtime.runs_full_layers(q, k, v) == cpu_kernel.usable(q, k, v)
    assert not SparseAttention(backend="reference").runs_full_layers(q, k, v)
    out, stats = runtime(q, k, v, layout, ["full"] * 4)
    torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=1e-5)
    assert stats.density == 1.0 and stats.heads_full == 4 and stats.dense == (not cpu_kernel.usable(q, k, v))


@pytest.mark.parametrize("compiled", [False, True])
def test_heads_sharing_a_pattern_run_in_one_kernel_call(monkeypatch, compiled):
    from sparsediff.kernels import cpu_kernel

    if compiled and cpu_kernel.load() is None:
        pytest.skip(f"the compiled CPU kernel did not load here: {cpu_kernel.reason()}")
    layout = TokenLayout.parse("video:4x4x4")
    q, k, v = qkv(layout, 6)
    calls = []
    real, attend = runtime._kernel("torch"), cpu_kernel.attend_into
    monkeypatch.setattr(runtime, "_kernel", lambda b: lambda q, k, v, spec, scale: calls.append(q.shape[1]) or real(q, k, v, spec, scale))
    monkeypatch.setattr(cpu_kernel, "attend_into", lambda out, prep, heads, *a: calls.append(len(heads)) or attend(out, prep, heads, *a))
    if not compiled:
        monkeypatch.setattr(cpu_kernel, "_state", {"off": True})
    SparseAttention(backend="torch")(q, k, v, layout, ["diagonal_w1", "skip", "diagonal_w1", "vertical_stripe_f1", "diagonal_w1", "skip"], 16)
    assert sorted(calls) == [1, 3]  # one call with the 3 diagonal heads, one with the stripe head; skips cost nothing


def test_specs_are_built_once_and_topk_scores_reused(monkeypatch):
    layout = TokenLayout.parse("video:4x4x4")
    q, k, v = qkv(layout, 2)
    built = []
    real = runtime.build_spec
    monkeypatch.setattr(runtime, "build_spec", lambda *a, **kw: built.append(1) or real(*a, **kw))
    attn = SparseAttention(backend="torch")
    first, _ = attn(q, k, v, layout, ["topk_blocks_k0.3", "diagonal_w1"], 16)
    q2, k2, v2 = qkv(layout, 2, seed=5)
    attn(q2, k2, v2, layout, ["topk_blocks_k0.3", "diagonal_w1"], 16)
    assert len(built) == 2  # two groups, built at the first call only
    attn.reset()
    attn(q2, k2, v2, layout, ["topk_blocks_k0.3", "diagonal_w1"], 16)
    assert len(built) == 4
    assert first.isfinite().all()


def test_group_heads_keeps_first_appearance_order():
    groups = group_heads([get_pattern(n) for n in ["skip", "diagonal_w1", "skip", "full"]])
    assert [(p.name, h.tolist()) for p, h in groups] == [("skip", [0, 2]), ("diagonal_w1", [1]), ("full", [3])]


def test_backend_choice(monkeypatch, caplog):
    cpu = torch.device("cpu")
    monkeypatch.delenv("SPARSEDIFF_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend(None, cpu) == "torch"
    monkeypatch.setenv("SPARSEDIFF_BACKEND", "reference")
    assert resolve_backend(None, cpu) == "reference"
    assert resolve_backend("torch", cpu) == "torch"  # the argument wins
    monkeypatch.setenv("SPARSEDIFF_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match=r"\$SPARSEDIFF_BACKEND='cuda-magic' is not a sparsediff backend"):
        resolve_backend(None, cpu)
    from sparsediff.kernels import log

    log._warned.clear()
    with caplog.at_level(logging.WARNING, logger="sparsediff.runtime"):
        assert resolve_backend("triton", cpu) == "torch"
        assert resolve_backend("triton", cpu) == "torch"
    warnings = [r for r in caplog.records if "falling back from the triton backend" in r.message]
    assert len(warnings) == 1 and "need CUDA" in warnings[0].message


def test_bad_calls_raise():
    layout = TokenLayout.parse("video:4x4x4")
    q, k, v = qkv(layout, 2)
    with pytest.raises(ValueError, match="Got 3 head patterns for 2 heads"):
        SparseAttention()(q, k, v, layout, ["full"] * 3)
    with pytest.raises(ValueError, match="has 48 tokens but q has S=64"):
        SparseAttention()(q, k, v, TokenLayout.parse("video:3x4x4"), ["full"] * 2)


@pytest.mark.parametrize("layout", ["text:7+video:4x5x6+text:3", "video:3x6x10+text:11", "video:8x4x4"])
def test_a_videos_reorder_runs_as_a_transpose_and_equals_the_gather(layout, monkeypatch):
    """multi_diagonal's position-major order on a frame-major video is a (frames, positions) transpose of the axis:
    the runtime copies it through strided views instead of gathering, with the same output bit for bit."""
    layout = TokenLayout.parse(layout)
    order = layout.position_major_order
    spec = runtime.build_spec(get_pattern("multi_diagonal_w1"), layout, 16)
    a0, r, c = runtime._transpose_shape(order, spec).tolist()
    assert (a0, r, c) == (spec.axis_start, layout.frames, layout.tokens_per_frame)
    x = torch.randn(2, 3, layout.num_tokens, 8)
    assert torch.equal(runtime._swap(x, a0, r, c), x[:, :, order])
    assert torch.equal(runtime._swap(runtime._swap(x, a0, r, c), a0, c, r), x)
    assert not len(runtime._transpose_shape(torch.randperm(layout.num_tokens, generator=torch.Generator().manual_seed(0)), spec))
    patterns = ["multi_diagonal_w1", "multi_diagonal_w0.5", "full"]
    q, k, v = qkv(layout, len(patterns))
    swapped, _ = SparseAttention(backend="torch")(q, k, v, layout, patterns, block_size=16)
    monkeypatch.setattr(runtime, "_transpose_shape", lambda order, spec: torch.empty(0, dtype=torch.long))
    gathered, _ = SparseAttention(backend="torch")(q, k, v, layout, patterns, block_size=16)
    assert torch.equal(swapped, gathered)
