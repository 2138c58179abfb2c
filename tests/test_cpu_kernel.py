"""The compiled CPU kernel: its key ranges, every rule against the dense reference at sizes that cross its chunks,
and when the torch backend uses it (and when it falls back to pure torch)."""

import pytest
import torch

import sparsediff.kernels.torch_sparse as torch_sparse
from sparsediff.kernels import cpu_kernel
from sparsediff.kernels.reference import spec_reference_attention
from sparsediff.kernels.spec import SparseSpec
from sparsediff.kernels.torch_sparse import torch_sparse_attention


@pytest.fixture
def kernel():
    if cpu_kernel.load() is None:
        pytest.skip(f"the compiled CPU kernel did not load here: {cpu_kernel.reason()}")
    return cpu_kernel


def qkv(S, heads=3, batch=2, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, S, dim, generator=g) for _ in range(3)]


def dense_mask(S, bs):
    n = -(-S // bs)
    return torch.ones(1, n, n, dtype=torch.bool)


def test_block_ranges_join_neighbouring_blocks_and_clip_the_ragged_tail():
    mask = torch.tensor([[[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 1, 1], [1, 1, 1, 1]]], dtype=torch.bool)
    spec = SparseSpec("blocks", 58, 16, 0, 58, 0, mask)
    ranges, counts = cpu_kernel.key_ranges(spec, 16)
    assert counts.tolist() == [[2, 0, 2, 1]]
    assert ranges[0, 0, :2].tolist() == [[0, 32], [48, 58]]
    assert ranges[0, 2, :2].tolist() == [[0, 16], [32, 58]]
    assert ranges[0, 3, :1].tolist() == [[0, 58]]
    with pytest.raises(ValueError, match="block_size=16"):
        cpu_kernel.key_ranges(spec, 32)


def test_band_and_stripe_ranges_cover_the_rows_keys_and_text():
    band = SparseSpec("band", 100, 10, 20, 90, 7, dense_mask(100, 10))
    ranges, counts = cpu_kernel.key_ranges(band, 10)
    assert ranges[0, 0, : counts[0, 0]].tolist() == [[0, 100]]  # text queries see everything
    assert ranges[0, 4, : counts[0, 4]].tolist() == [[0, 20], [33, 57], [90, 100]]  # axis rows 40-49: keys 33-56
    assert ranges[0, 2, : counts[0, 2]].tolist() == [[0, 37], [90, 100]]  # the band joins the text before it
    stripe = SparseSpec("stripe", 100, 10, 20, 90, 15, dense_mask(100, 10))
    ranges, counts = cpu_kernel.key_ranges(stripe, 10)
    assert ranges[0, 5, : counts[0, 5]].tolist() == [[0, 35], [90, 100]]


CASES = [
    ("band", 13, 9, 200),  # text before and after, radius around the chunk size
    ("band", 0, 0, 230),  # the diagonal alone
    ("band", 120, 0, 230),  # a band wider than a chunk
    ("stripe", 40, 17, 220),
    ("stripe", 300, 0, 230),  # a stripe wider than the axis: dense
]


@pytest.mark.parametrize("mode, radius, a0, a1", CASES)
@pytest.mark.parametrize("rows, chunk", [(16, 24), (32, 64), (64, 1024)])
@pytest.mark.parametrize("suffix", [None, 37])
def test_bands_and_stripes_match_the_reference(kernel, monkeypatch, mode, radius, a0, a1, rows, chunk, suffix):
    monkeypatch.setattr(cpu_kernel, "KV_CHUNK", chunk)  # chunks cut ranges and join pieces of several ranges
    S = 230
    spec = SparseSpec(mode, S, 16, a0, a1, radius, dense_mask(S, 16))
    q, k, v = qkv(S)
    q = q if suffix is None else q[:, :, -suffix:]  # a decoder's canvas: only the last queries run
    got = cpu_kernel.sparse_attention(q, k, v, spec, None, rows)
    torch.testing.assert_close(got, spec_reference_attention(q, k, v, spec), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("chunk", [24, 1024])
@pytest.mark.parametrize("suffix", [None, 50])
def test_blocks_match_the_reference_with_empty_rows_and_a_ragged_tail(kernel, monkeypatch, per_head, chunk, suffix):
    monkeypatch.setattr(cpu_kernel, "KV_CHUNK", chunk)
    S, bs, heads = 203, 16, 3
    n = -(-S // bs)
    mask = torch.rand(heads if per_head else 1, n, n, generator=torch.Generator().manual_seed(3)) < 0.4
    mask[:, 2] = False  # a query block with no key: its rows are zeros, as the reference's
    mask[:, :, n - 1] |= mask[:, :, 0]  # the ragged last key block in many rows
    spec = SparseSpec("blocks", S, bs, 0, S, 0, mask)
    q, k, v = qkv(S, heads=heads, dim=48, seed=1)
    q = q if suffix is None else q[:, :, -suffix:]
    got = cpu_kernel.sparse_attention(q, k, v, spec, 0.3, bs)
    expect = spec_reference_attention(q, k, v, spec, 0.3)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    if suffix is None:
        assert torch.equal(got[:, :, 2 * bs : 3 * bs], torch.zeros_like(got[:, :, 2 * bs : 3 * bs]))


def test_k_transposed_sits_in_a_padded_buffer_that_nearby_lengths_share(kernel):
    """K^T's row stride is rounded (oneDNN's micro-kernels are compiled per leading dimension) and kept off multiples
    of 4 KiB; the kernel reads only the first S columns, so the padding's contents do not matter."""
    assert cpu_kernel.kt_columns(8192) == cpu_kernel.kt_columns(8100) == 8208
    for S in (1, 255, 256, 1000, 4096, 8229):
        cols = cpu_kernel.kt_columns(S)
        assert S + 16 <= cols < S + 272 and cols % 1024 != 0
    S = 300
    spec = SparseSpec("band", S, 16, 10, 290, 40, dense_mask(S, 16))
    q, k, v = qkv(S)
    plain = torch.empty_like(q)
    cpu_kernel.attend_into(plain, (q, k.transpose(-1, -2).contiguous(), v), torch.arange(3), spec, None, 16)
    q, kt, v = cpu_kernel.prepare(q, k, v)
    assert kt.shape[-1] == cpu_kernel.kt_columns(S) and torch.equal(kt[..., :S], k.transpose(-1, -2))
    kt[..., S:] = float("nan")  # never read
    padded = torch.empty_like(q)
    cpu_kernel.attend_into(padded, (q, kt, v), torch.arange(3), spec, None, 16)
    torch.testing.assert_close(padded, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(padded, spec_reference_attention(q, k, v, spec), rtol=1e-5, atol=1e-5)


def test_results_do_not_depend_on_the_thread_count(kernel):
    """Each query block runs whole on one thread, in a fixed order: the same inputs give the same bits."""
    S = 300
    spec = SparseSpec("band", S, 16, 10, 290, 40, dense_mask(S, 16))
    q, k, v = qkv(S)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernel.sparse_attention(q, k, v, spec, None, 16)
        torch.set_num_threads(max(2, threads))
        many = cpu_kernel.sparse_attention(q, k, v, spec, None, 16)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_the_torch_backend_runs_the_kernel_where_it_can_and_pure_torch_elsewhere(kernel, monkeypatch):
    calls = []
    run = cpu_kernel.sparse_attention
    monkeypatch.setattr(cpu_kernel, "sparse_attention", lambda *a: calls.append(a[3].mode) or run(*a))
    S = 160
    spec = SparseSpec("band", S, 16, 0, S, 20, dense_mask(S, 16))
    q, k, v = qkv(S)
    expect = spec_reference_attention(q, k, v, spec)
    torch.testing.assert_close(torch_sparse_attention(q, k, v, spec), expect, rtol=1e-5, atol=1e-5)
    assert calls == ["band"]
    with cpu_kernel.disabled():  # the switch the pure-torch tests use
        torch.testing.assert_close(torch_sparse_attention(q, k, v, spec), expect, rtol=1e-5, atol=1e-5)
    out = torch_sparse_attention(q.double(), k.double(), v.double(), spec)  # other dtypes: pure torch
    assert out.dtype == torch.float64
    with pytest.raises(RuntimeError, match="same dtype"):  # mixed dtypes: pure torch, whose SDPA says what is wrong
        torch_sparse_attention(q, k.bfloat16(), v, spec)
    grad = torch_sparse_attention(q.clone().requires_grad_(), k, v, spec)  # gradients: pure torch (differentiable)
    grad.sum().backward()
    assert calls == ["band"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["band", "stripe", "blocks"])
def test_16_bit_inputs_run_the_kernel_in_float32(kernel, monkeypatch, dtype, mode):
    """bfloat16 / float16 inputs are widened once and computed in float32: the result is the float32 kernel's on the
    same (rounded) inputs, rounded once to the input dtype, so it is as close to the reference as that rounding."""
    monkeypatch.setattr(cpu_kernel, "native_16bit", lambda dtype: False)  # as on a CPU without AMX or AVX512-BF16
    monkeypatch.setattr(cpu_kernel, "amx", lambda dtype: False)  # (with AMX, SDPA would take 16-bit calls)
    calls = []
    run = cpu_kernel.attend_into
    monkeypatch.setattr(cpu_kernel, "attend_into", lambda *a, **kw: calls.append(a[0].dtype) or run(*a, **kw))
    S = 200
    mask = torch.rand(1, 13, 13, generator=torch.Generator().manual_seed(1)) < 0.5
    a0, a1 = (0, S) if mode == "blocks" else (8, 192)  # blocks mode: text rows and columns are in the block mask
    spec = SparseSpec(mode, S, 16, a0, a1, 30, mask | torch.eye(13, dtype=torch.bool))
    q, k, v = (x.to(dtype) for x in qkv(S))
    out = torch_sparse_attention(q, k, v, spec)
    assert out.dtype == dtype and calls == [torch.float32]
    wide = torch_sparse_attention(q.float(), k.float(), v.float(), spec)  # the float32 kernel on the same inputs
    assert torch.equal(out, wide.to(dtype))
    expect = spec_reference_attention(q.double(), k.double(), v.double(), spec)
    torch.testing.assert_close(out, expect.to(dtype))  # within the dtype's own rounding (its default tolerances)


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_state", {})
    monkeypatch.setenv(cpu_kernel.ENV, "0")
    assert cpu_kernel.load() is None
    assert cpu_kernel.reason() == f"${cpu_kernel.ENV}=0"
    q = torch.randn(1, 1, 32, 16)
    assert not cpu_kernel.usable(q, q, q)


def test_the_target_instruction_set_can_be_chosen_and_names_the_build(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    builds = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: builds.append(kw))
    cpu_kernel._build()
    monkeypatch.setenv(cpu_kernel.MARCH_ENV, "x86-64-v3")
    cpu_kernel._build()
    (native, v3) = builds
    assert "-march=native" in native["extra_cflags"] and "-march=x86-64-v3" in v3["extra_cflags"]
    assert native["name"] != v3["name"]  # two builds side by side, neither loaded for the other
    monkeypatch.setattr(cpu_kernel, "_state", {"module": object(), "brgemm": True, "reason": None})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert cpu_kernel.status() == "brgemm, -march=x86-64-v3, ONEDNN_MAX_CPU_ISA=AVX2"  # what benchmark records say


def test_16_bit_inputs_take_sdpa_on_a_cpu_with_amx_where_the_16_bit_entry_fails(kernel, monkeypatch):
    """Where the CPU multiplies 16-bit natively (AMX) but the kernel's 16-bit entry fails its self-check, 16-bit calls
    take the pure-torch paths (SDPA on AMX is ~3x faster than the kernel's float32 compute); float32 still runs the
    kernel. Bands there run in wider windows."""
    from sparsediff.kernels import torch_sparse

    monkeypatch.setattr(cpu_kernel, "amx", lambda dtype: dtype == torch.bfloat16)
    monkeypatch.setattr(cpu_kernel, "_self_check_16bit", lambda module, dtype: False)
    monkeypatch.setitem(cpu_kernel._state, "native", {})
    calls, windows = [], []
    run, exact = cpu_kernel.sparse_attention, torch_sparse._band_exact
    monkeypatch.setattr(cpu_kernel, "sparse_attention", lambda *a: calls.append(a[0].dtype) or run(*a))
    monkeypatch.setattr(torch_sparse, "_band_exact", lambda *a: windows.append(a[-1]) or exact(*a))
    monkeypatch.setattr(torch_sparse, "WIDE_RADIUS", 40)  # (768 at full size) so that a small case takes 512 rows
    S, R = 1200, 40  # 2R + 2 x 512 <= S: 512-row windows
    spec = SparseSpec("band", S, 16, 0, S, R, dense_mask(S, 16))
    q, k, v = qkv(S, batch=1)
    q16, k16, v16 = (x.bfloat16() for x in (q, k, v))
    out = torch_sparse_attention(q16, k16, v16, spec)
    assert calls == [] and windows == [512]  # pure torch, wide windows
    with cpu_kernel.disabled():
        assert torch.equal(out, torch_sparse_attention(q16, k16, v16, spec))  # the pure path itself
    expect = spec_reference_attention(q16.double(), k16.double(), v16.double(), spec)
    torch.testing.assert_close(out, expect.bfloat16(), atol=1e-2, rtol=2e-2)  # 16-bit SDPA's own rounding
    monkeypatch.setattr(torch_sparse, "BAND_ROWS", 512)  # the wide windows are exact: in float32 they match the
    with cpu_kernel.disabled():  # reference to float32 rounding
        wide = torch_sparse_attention(q, k, v, spec)
    assert windows[-1] == 512
    torch.testing.assert_close(wide, spec_reference_attention(q, k, v, spec), rtol=1e-5, atol=1e-5)
    short = SparseSpec("band", 700, 16, 0, 700, R, dense_mask(700, 16))  # 512 does not fit: 256
    torch_sparse_attention(*(x[:, :, :700].bfloat16() for x in (q, k, v)), short)
    assert windows[-1] == 256
    narrow = SparseSpec("band", S, 16, 0, S, R - 1, dense_mask(S, 16))  # below WIDE_RADIUS: 256
    torch_sparse_attention(q16, k16, v16, narrow)
    assert windows[-1] == 256
    torch_sparse_attention(q.half(), k.half(), v.half(), spec)  # float16 without AMX-FP16: still the kernel
    torch_sparse_attention(q, k, v, spec)  # float32: the kernel
    assert calls == [torch.float16, torch.float32]
    from sparsediff.search.cost import compiled_full

    assert not compiled_full("torch", "cpu", torch.bfloat16) and compiled_full("torch", "cpu", torch.float32)
    assert "bfloat16 through SDPA (AMX)" in cpu_kernel.status()


@pytest.fixture
def entry_16bit(kernel, monkeypatch):
    """The kernel's 16-bit entry for bfloat16, which runs where the CPU has AMX or AVX512-BF16: there it must pass its
    self-check; elsewhere it is never used, and never called here (oneDNN has no bfloat16 micro-kernels for such
    CPUs)."""
    if not cpu_kernel.native_16bit(torch.bfloat16):
        pytest.skip("the CPU has neither AMX nor AVX512-BF16: the compiled kernel's bfloat16 entry is not used here")
    why: list = []
    if not cpu_kernel.uses_brgemm() or not cpu_kernel._self_check_16bit(cpu_kernel.load(), torch.bfloat16, why):
        unit = "AMX" if cpu_kernel.amx(torch.bfloat16) else "AVX512-BF16"
        if unit == "AVX512-BF16" and why and why[0].startswith("unavailable"):
            # checked on AMD Zen 5 only: where this oneDNN build has no bfloat16 micro-kernels for such a CPU, calls
            # fall back to the float32 compute (tested elsewhere) and there is no entry to test
            pytest.skip(f"the bfloat16 entry is unavailable on this AVX512-BF16 CPU ({why[0]})")
        pytest.fail(f"the compiled kernel's bfloat16 entry fails its self-check on a CPU with {unit}: {why or 'no brgemm'}")
    monkeypatch.setattr(cpu_kernel, "native_16bit", lambda dtype: dtype == torch.bfloat16)
    monkeypatch.setitem(cpu_kernel._state, "native", {torch.bfloat16: True})
    return cpu_kernel


@pytest.mark.parametrize("mode, radius, a0, a1", CASES[:4])
@pytest.mark.parametrize("S, rows, chunk", [(230, 16, 24), (231, 32, 64), (231, 64, 1024)])
@pytest.mark.parametrize("suffix", [None, 37])
def test_the_16_bit_entry_matches_the_reference(entry_16bit, monkeypatch, mode, radius, a0, a1, S, rows, chunk, suffix):
    """bfloat16 in the 16-bit entry (VNNI-packed K^T and V, odd lengths, ranges with odd bounds cut into chunks):
    within bfloat16's rounding of the float64 reference on the same inputs."""
    monkeypatch.setattr(cpu_kernel, "KV_CHUNK_16BIT", chunk)
    spec = SparseSpec(mode, S, 16, a0, min(a1, S), radius, dense_mask(S, 16))
    q, k, v = (x.bfloat16() for x in qkv(S))
    q = q if suffix is None else q[:, :, -suffix:]
    packed = []
    pack = cpu_kernel._pack
    monkeypatch.setattr(cpu_kernel, "_pack", lambda *a: packed.append(1) or pack(*a))
    got = cpu_kernel.sparse_attention(q, k, v, spec, None, rows)
    assert packed and got.dtype == torch.bfloat16
    expect = spec_reference_attention(q.double(), k.double(), v.double(), spec)
    torch.testing.assert_close(got, expect.bfloat16(), atol=1e-2, rtol=2e-2)


@pytest.mark.parametrize("chunk", [24, 1024])
@pytest.mark.parametrize("mode", ["band", "blocks"])
def test_float32_moves_its_shift_when_later_keys_score_far_higher(kernel, monkeypatch, mode, chunk):
    """float32 shifts a row's exponentials by its running maximum too, and where later scores exceed it by more than
    e^8 (here by far more than float32's exponent range) raises it and rescales what it already wrote: with chunks of
    24 keys the shift of an earlier chunk meets the large scores (disabling the raise fails this case); with 1024,
    one chunk's own maximum sets it. Either way the reference's result."""
    monkeypatch.setattr(cpu_kernel, "KV_CHUNK", chunk)
    S = 200
    n = -(-S // 16)
    spec = SparseSpec(mode, S, 16, 0, S, 60, torch.ones(1, n, n, dtype=torch.bool))
    q, k, v = qkv(S)
    k[:, :, 120:] *= 60
    got = cpu_kernel.sparse_attention(q, k, v, spec, None, 16)
    assert got.isfinite().all()
    torch.testing.assert_close(got, spec_reference_attention(q, k, v, spec), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["band", "blocks"])
def test_the_16_bit_entry_moves_its_shift_when_later_keys_score_far_higher(entry_16bit, monkeypatch, mode):
    """The entry shifts a row's exponentials by its running maximum and moves the shift only when a chunk's scores
    exceed it by more than e^8: keys that score far higher late in the row (by well over 88 in scaled units, where
    exponentials under a stale shift overflow float32) take that path and still match the reference."""
    monkeypatch.setattr(cpu_kernel, "KV_CHUNK_16BIT", 24)
    S = 200
    n = -(-S // 16)
    spec = SparseSpec(mode, S, 16, 0, S, 60, torch.ones(1, n, n, dtype=torch.bool))
    q, k, v = qkv(S)
    k[:, :, 120:] *= 60  # scores grow 60x from key 120 on
    q, k, v = (x.bfloat16() for x in (q, k, v))
    got = cpu_kernel.sparse_attention(q, k, v, spec, None, 16)
    expect = spec_reference_attention(q.double(), k.double(), v.double(), spec)
    assert got.isfinite().all()
    torch.testing.assert_close(got, expect.bfloat16(), atol=1e-2, rtol=2e-2)


@pytest.mark.parametrize("chunk", [24, 1024])
def test_the_16_bit_entry_runs_blocks_with_empty_rows(entry_16bit, monkeypatch, chunk):
    monkeypatch.setattr(cpu_kernel, "KV_CHUNK_16BIT", chunk)
    S, bs, heads = 203, 16, 3
    n = -(-S // bs)
    mask = torch.rand(heads, n, n, generator=torch.Generator().manual_seed(3)) < 0.4
    mask[:, 2] = False
    spec = SparseSpec("blocks", S, bs, 0, S, 0, mask)
    q, k, v = (x.bfloat16() for x in qkv(S, heads=heads, dim=48, seed=1))
    got = cpu_kernel.sparse_attention(q, k, v, spec, 0.3, bs)
    expect = spec_reference_attention(q.double(), k.double(), v.double(), spec, 0.3)
    torch.testing.assert_close(got, expect.bfloat16(), atol=1e-2, rtol=2e-2)
    assert torch.equal(got[:, :, 2 * bs : 3 * bs], torch.zeros_like(got[:, :, 2 * bs : 3 * bs]))


def test_a_mixed_bfloat16_layer_runs_the_16_bit_entry(entry_16bit, monkeypatch):
    """A layer of every kind (the multi-diagonal head through its swapped copies) in bfloat16: every group in the
    16-bit entry, the layer within bfloat16's rounding of the float64 reference; an odd head size takes SDPA on AMX and
    the kernel's float32 compute elsewhere."""
    from sparsediff.layout import TokenLayout
    from sparsediff.runtime import SparseAttention

    calls = []
    real = cpu_kernel.load().sparse_attention_16bit
    monkeypatch.setattr(cpu_kernel.load(), "sparse_attention_16bit", lambda *a: calls.append(a[4].numel()) or real(*a))
    layout = TokenLayout.parse("text:7+video:4x6x8+text:3")
    patterns = ["full", "skip", "diagonal_w1", "multi_diagonal_w1", "vertical_stripe_f1", "topk_blocks_k0.3"]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, layout.num_tokens, 32, generator=g).bfloat16() for _ in range(3))
    out, stats = SparseAttention(backend="torch")(q, k, v, layout, patterns, block_size=16)
    assert out.dtype == torch.bfloat16 and calls == [1, 1, 1, 1, 1]  # full, 3 sparse kinds, multi-diagonal
    from test_runtime import token_masks

    from sparsediff.kernels.reference import reference_attention
    from sparsediff.patterns import get_pattern

    masks = token_masks(stats.groups, layout, [get_pattern(p) for p in patterns], 16)  # top-k: the blocks it chose
    expect = reference_attention(q.double(), k.double(), v.double(), masks)
    torch.testing.assert_close(out, expect.bfloat16(), atol=1e-2, rtol=2e-2)
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    calls.clear()
    q5, k5, v5 = (x[..., :31] for x in (q, k, v))  # an odd head size: the packed pairs run along it, so no entry
    monkeypatch.setattr(cpu_kernel, "amx", lambda dtype: True)
    assert not cpu_kernel.usable(q5, k5, v5)  # on AMX: SDPA
    SparseAttention(backend="torch")(q5, k5, v5, layout, patterns, block_size=16)
    monkeypatch.setattr(cpu_kernel, "amx", lambda dtype: False)
    assert cpu_kernel.usable(q5, k5, v5) and cpu_kernel.compute_dtype(torch.bfloat16, 31) == torch.float32
    wide = []  # elsewhere (AVX512-BF16): the kernel's float32 compute
    f32 = cpu_kernel.load().sparse_attention
    monkeypatch.setattr(cpu_kernel.load(), "sparse_attention", lambda *a: wide.append(a[0].dtype) or f32(*a))
    out5, stats5 = SparseAttention(backend="torch")(q5, k5, v5, layout, patterns, block_size=16)
    assert calls == [] and wide == [torch.float32] * 5
    masks = token_masks(stats5.groups, layout, [get_pattern(p) for p in patterns], 16)
    expect = reference_attention(q5.double(), k5.double(), v5.double(), masks)
    torch.testing.assert_close(out5, expect.bfloat16(), atol=1e-2, rtol=2e-2)


@pytest.mark.parametrize("bf16_dot", [False, True])
def test_amx_is_read_from_torch_and_respects_onednns_isa_limit(monkeypatch, bf16_dot):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16_dot)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert cpu_kernel.amx(torch.bfloat16) and not cpu_kernel.amx(torch.float16)
    assert cpu_kernel.native_16bit(torch.bfloat16) and not cpu_kernel.native_16bit(torch.float16)
    assert not cpu_kernel.native_16bit(torch.float32)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # oneDNN (torch's 16-bit GEMMs) kept off AMX
    assert not cpu_kernel.amx(torch.bfloat16)
    assert cpu_kernel.native_16bit(torch.bfloat16) == bf16_dot  # AVX512-BF16's dot products still allowed
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")  # below them: neither
    assert not cpu_kernel.native_16bit(torch.bfloat16)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert cpu_kernel.amx(torch.bfloat16) and cpu_kernel.native_16bit(torch.bfloat16)


def test_avx512_bf16_without_amx_runs_the_16_bit_entry_or_else_the_float32_compute(kernel, monkeypatch):
    """On a CPU with AVX512-BF16 but no AMX (AMD Zen 4 and later), bfloat16 calls run the kernel's 16-bit entry; where
    it fails its self-check they fall back to the kernel's float32 compute (bfloat16 SDPA is slow there), not SDPA."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setitem(cpu_kernel._state, "native", {torch.bfloat16: True})
    assert cpu_kernel.takes(torch.bfloat16) and cpu_kernel.compute_dtype(torch.bfloat16) == torch.bfloat16
    assert "bfloat16 native (AVX512-BF16)" in cpu_kernel.status()
    monkeypatch.setitem(cpu_kernel._state, "native", {torch.bfloat16: False})  # as if its self-check failed
    assert cpu_kernel.takes(torch.bfloat16) and cpu_kernel.compute_dtype(torch.bfloat16) == torch.float32
    assert "bfloat16 in float32 (the AVX512-BF16 entry is off)" in cpu_kernel.status()
    monkeypatch.setenv(cpu_kernel.ENV_16BIT, "0")
    assert not cpu_kernel.native(torch.bfloat16) and cpu_kernel.takes(torch.bfloat16)


def test_a_build_is_announced_and_a_cached_load_is_silent(monkeypatch, caplog):
    import logging

    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setattr(cpp_extension, "load", lambda **kw: object())
    monkeypatch.setattr(cpu_kernel, "_self_check", lambda module: True)
    for cached in (False, True):
        monkeypatch.setattr(cpu_kernel, "_state", {})
        monkeypatch.setattr(cpu_kernel, "_built", lambda name: cached)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sparsediff"):
            assert cpu_kernel.load() is not None
        said = [r.getMessage() for r in caplog.records]
        if cached:
            assert said == []
        else:
            assert "building the compiled CPU kernel" in said[0] and "built in" in said[1]


def test_a_layers_groups_write_into_one_output_and_a_layer_of_full_heads_runs_there_too(kernel, monkeypatch):
    """On the compiled path every group of a layer (full heads too) runs from the call's own q, K^T, v into one
    output; a reordered group (multi_diagonal) takes its own copies; a layer of full heads alone is one dense call
    (the model's own SDPA runs where the plan says dense: tests/test_accelerate_pipelines.py)."""
    monkeypatch.setattr(cpu_kernel, "native_16bit", lambda dtype: False)  # bfloat16 through the kernel, as without AMX
    monkeypatch.setattr(cpu_kernel, "amx", lambda dtype: False)
    from sparsediff.kernels.reference import reference_attention
    from sparsediff.layout import TokenLayout
    from sparsediff.runtime import SparseAttention

    calls = []
    attend = cpu_kernel.attend_into
    monkeypatch.setattr(cpu_kernel, "attend_into", lambda out, prep, heads, spec, *a: calls.append(
        (heads.tolist(), None if spec is None else spec.mode)) or attend(out, prep, heads, spec, *a))
    layout = TokenLayout.parse("text:5+video:4x6x8")
    patterns = ["full", "diagonal_w1", "skip", "full", "topk_blocks_k0.5", "multi_diagonal_w1", "vertical_stripe_f1",
                "multi_diagonal_w1"]
    q, k, v = qkv(layout.num_tokens, heads=len(patterns))
    attn = SparseAttention(backend="torch")
    out, stats = attn(q, k, v, layout, patterns, block_size=16)
    # the reordered group's swapped copies of heads 5 and 7 run as a call of their own
    assert sorted(calls, key=repr) == [([0, 1], "band"), ([0, 3], None), ([1], "band"), ([4], "blocks"), ([6], "stripe")]
    assert stats.heads_full == 2 and stats.heads_sparse == 5 and stats.heads_skipped == 1
    assert torch.equal(out[:, 2], torch.zeros_like(out[:, 2]))
    with cpu_kernel.disabled():  # the same layer through pure torch (SDPA for the full heads)
        pure, _ = SparseAttention(backend="torch")(q, k, v, layout, patterns, block_size=16)
    torch.testing.assert_close(out, pure, rtol=1e-5, atol=1e-5)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out[:, [0, 3]], reference_attention(q[:, [0, 3]], k[:, [0, 3]], v[:, [0, 3]], None))
    calls.clear()
    out, _ = attn(q, k, v, layout, ["full"] * len(patterns), block_size=16)
    assert calls == [(list(range(len(patterns))), None)]  # one dense call for the layer
    torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=1e-5)
    calls.clear()
    # bfloat16: the same groups in float32 from the widened inputs, one rounding at the end
    q16, k16, v16 = (x.bfloat16() for x in (q, k, v))
    out16, _ = attn(q16, k16, v16, layout, patterns, block_size=16)
    assert out16.dtype == torch.bfloat16 and len(calls) == 5
    wide, _ = attn(q16.float(), k16.float(), v16.float(), layout, patterns, block_size=16)
    assert torch.equal(out16, wide.bfloat16())
    out16, _ = attn(q16, k16, v16, layout, ["full"] * len(patterns), block_size=16)
    wide, _ = attn(q16.float(), k16.float(), v16.float(), layout, ["full"] * len(patterns), block_size=16)
    assert torch.equal(out16, wide.bfloat16())  # a layer of full heads the same way


def test_a_layer_of_reordered_heads_only_makes_no_shared_inputs(kernel, monkeypatch):
    """The layer's shared q, K^T, v are made for the first group that reads them: a layer whose heads are all
    multi_diagonal (their own transposed copies) never makes them."""
    from sparsediff import runtime
    from sparsediff.layout import TokenLayout

    made = []
    prepare = cpu_kernel.prepare
    monkeypatch.setattr(cpu_kernel, "prepare", lambda q, *a, **kw: made.append(q.shape[1]) or prepare(q, *a, **kw))
    layout = TokenLayout.parse("video:4x6x8")
    q, k, v = qkv(layout.num_tokens, heads=4)
    attn = runtime.SparseAttention(backend="torch")
    out, _ = attn(q, k, v, layout, ["multi_diagonal_w1"] * 4, block_size=16)
    assert made == [4]  # the swapped copies of the four heads, once
    made.clear()
    mixed, _ = attn(q, k, v, layout, ["multi_diagonal_w1"] * 3 + ["diagonal_w1"], block_size=16)
    assert sorted(made) == [3, 4]  # the copies of three heads, and the shared inputs for the band head
    with cpu_kernel.disabled():
        pure, _ = runtime.SparseAttention(backend="torch")(q, k, v, layout, ["multi_diagonal_w1"] * 4, block_size=16)
    torch.testing.assert_close(out, pure, rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("S", [37, 64])
def test_16_bit_packing_is_the_same_through_32_bit_words_and_elementwise(S):
    """K^T's VNNI packing moves pairs of 16-bit values as 32-bit words where K's layout allows it (even strides and
    offset) and element by element elsewhere (here: a view at an odd offset): both give the same buffer, and V's
    pairs of rows are interleaved as the entry reads them."""
    g = torch.Generator().manual_seed(3)
    big = torch.randn(2, 3, S, 17, generator=g).bfloat16()
    odd = big[..., 1:17]  # odd offset and row stride: the element-wise path
    even = odd.contiguous()  # the word path
    assert odd.storage_offset() % 2 == 1 and even.storage_offset() == 0
    (_, kp_odd, vp_odd, _), (_, kp_even, vp_even, _) = (cpu_kernel._pack(x, x, x, cpu_kernel._fresh) for x in (odd, even))
    assert torch.equal(kp_odd[..., :S, :], kp_even[..., :S, :]) and torch.equal(vp_odd, vp_even)
    expect = even.unflatten(-1, (8, 2)).transpose(2, 3)  # element (d, j) of K^T at [d // 2, j, d % 2]
    assert torch.equal(kp_even[..., :S, :], expect)
    pairs = S // 2  # V: element (j, d) at [j // 2, d, j % 2], the pad of an odd S zero
    assert torch.equal(vp_even[:, :, :pairs], even[:, :, : 2 * pairs].unflatten(2, (pairs, 2)).transpose(-1, -2))
    if S % 2:
        assert torch.equal(vp_even[:, :, -1, :, 0], even[:, :, -1]) and not vp_even[:, :, -1, :, 1].any()


def test_the_16_bit_self_check_says_whether_the_entry_is_missing_or_wrong():
    class Raises:
        def sparse_attention_16bit(self, *args):
            raise RuntimeError("no bfloat16 micro-kernels")

    class Wrong:
        def sparse_attention_16bit(self, q, kt, v, out, *args):
            out.zero_()

    for module, want in ((Raises(), "unavailable: no bfloat16 micro-kernels"), (Wrong(), "wrong: off by")):
        why: list = []
        assert not cpu_kernel._self_check_16bit(module, torch.bfloat16, why)
        assert len(why) == 1 and why[0].startswith(want)
