"""Block-sparse flash-attention forward in Triton: one launch runs one head group's `SparseSpec` for all B * G heads.

Each program owns a BLOCK_M tile of queries of one (batch, head) and walks only the key blocks listed for its
query block, in BLOCK_N sub-tiles, with an online softmax accumulated in float32. Fully masked blocks are never
read. The listed blocks come in two tables, walked by two flat loops: "full" blocks, where every token pair is
allowed, run without any mask; "partial" blocks (the band's edges, the stripe's last block, the ragged tail of
the sequence) apply the exact token rule of `sparsediff.kernels.spec`. Two kernels do this: a portable one that
loads tiles through pointers, and on Hopper and later GPUs one that loads them through TMA tensor descriptors
(chosen automatically; see `triton_sparse_attention`'s `tma`).

Triton runs on CUDA devices, or on the CPU through its interpreter (slow; for tests): set TRITON_INTERPRET=1
before this module is imported, because Triton reads it when the kernels below are decorated.

>>> import torch
>>> from sparsediff.kernels.spec import SparseSpec
>>> spec = SparseSpec("band", 40, 16, 0, 40, 3, torch.ones((1, 3, 3), dtype=torch.bool))
>>> q = k = v = torch.randn(1, 2, 40, 16, device="cuda")  # doctest: +SKIP
>>> triton_sparse_attention(q, k, v, spec).shape  # doctest: +SKIP
torch.Size([1, 2, 40, 16])
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .spec import SparseSpec, block_table

try:  # host-side tensor descriptors (TMA on Hopper and later), Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the pointer kernel only
    TensorDescriptor = None

# ---- capabilities -----------------------------------------------------------------------------------------

INTERPRET = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 32, 64, 128)
MODE_IDS = {"band": 0, "stripe": 1, "blocks": 2}
# Tiles are powers of two that divide the spec's block size; tl.dot needs at least 16 rows and columns.
TILES = (16, 32, 64, 128)
MIN_TILE = TILES[0]
# The Hopper path (K and V tiles through TMA): 16-bit inputs, key tiles of 64 or 128 rows.
TMA_DTYPES = (torch.float16, torch.bfloat16)
TMA_TILES = (64, 128)


def _largest_tile(block_size: int) -> int:
    """The largest tile in TILES that divides block_size (block_size is a multiple of MIN_TILE)."""
    return max(t for t in TILES if block_size % t == 0)


# ---- inner loop: the key blocks of one table, in BLOCK_N sub-tiles ------------------------------------------


@triton.jit
def _allowed(offs_m, offs_n, S, axis_start, axis_end, radius, MODE: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: the spec's token rule, and key inside the sequence."""
    text_q = (offs_m < axis_start) | (offs_m >= axis_end)
    text_k = (offs_n < axis_start) | (offs_n >= axis_end)
    if MODE == 0:  # band: |a_i - a_j| <= radius, and a_i - a_j = i - j
        rule = tl.abs(offs_m[:, None] - offs_n[None, :]) <= radius
    elif MODE == 1:  # stripe: the first `radius` axis keys
        rule = (offs_n - axis_start < radius)[None, :]
    else:  # blocks: a listed block is allowed as a whole
        rule = (offs_n >= 0)[None, :]
    allowed = rule | text_q[:, None] | text_k[None, :]  # broadcasts to (BLOCK_M, BLOCK_N)
    return allowed & (offs_n < S)[None, :]


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,  # running state (BLOCK_M, HEAD_DIM), (BLOCK_M,), (BLOCK_M,) and the query tile
    k_head, v_head, stride_ks, stride_vs,
    block_index, block_count,  # this query block's row of one block table, and how many entries it has
    offs_m, offs_d, qk_scale,
    S, axis_start, axis_end, radius,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, MODE: tl.constexpr,
    MASKED: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Online softmax over the listed key blocks, BLOCK_N keys at a time; MASKED applies the token rule."""
    SUB_TILES: tl.constexpr = BLOCK_SIZE // BLOCK_N
    for i in range(0, block_count * SUB_TILES):  # one flat loop, so the compiler can pipeline across blocks
        start_n = tl.load(block_index + i // SUB_TILES) * BLOCK_SIZE + (i % SUB_TILES) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_head + offs_n[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = v_head + offs_n[:, None] * stride_vs + offs_d[None, :]
        if MASKED:  # the block may reach past S (ragged tail)
            k = tl.load(k_ptrs, mask=(offs_n < S)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        if DOT_FP32:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            qk = tl.where(_allowed(offs_m, offs_n, S, axis_start, axis_end, radius, MODE), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # a row with no allowed key so far keeps m = -inf; shift it by 0 so exp2 gives 0, not NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=(offs_n < S)[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        if DOT_FP32:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# ---- autotuning -------------------------------------------------------------------------------------------


def _candidate_configs() -> list[triton.Config]:
    """Every tile shape x num_warps x num_stages; `_config_fits` keeps those that suit the call's shapes."""
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m in TILES
        for n in TILES
        for w in (4, 8)
        for s in (2, 3)
    ]


def _config_fits(config: triton.Config, block_size: int, head_dim: int) -> bool:
    """Tiles divide the block size (the block tables' granularity), are as large as the block allows, and fit
    in registers. For any multiple of 16, (largest tile, min(largest tile, 64), 4 warps, 2 stages) fits."""
    m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    largest = _largest_tile(block_size)
    if block_size % m or block_size % n or n > m:
        return False
    if n < min(largest, 64):  # small tiles leave the tensor cores idle
        return False
    if head_dim >= 128 and m * n > 128 * 64 and config.num_warps < 8:  # 4 warps would spill registers
        return False
    if config.num_warps == 8 and m < 128:  # 8 warps only pay off on 128-row tiles
        return False
    return m >= 64 or config.num_stages == 2  # small blocks: nothing to pipeline, one config


def _interpreter_config(block_size: int) -> triton.Config:
    """The interpreter's one config (it never benchmarks): whole-block query tiles, which mean fewer programs
    to interpret, and key sub-tiles of half a block where possible, so the CPU tests run the sub-tile loop."""
    largest = _largest_tile(block_size)
    return triton.Config({"BLOCK_M": largest, "BLOCK_N": max(MIN_TILE, largest // 2)}, num_warps=4, num_stages=1)


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    args = {**named_args, **kwargs}
    if INTERPRET:
        return [_interpreter_config(args["BLOCK_SIZE"])]
    return [c for c in configs if _config_fits(c, args["BLOCK_SIZE"], args["HEAD_DIM"])]


# ---- outer kernel -----------------------------------------------------------------------------------------


@triton.autotune(
    configs=_candidate_configs(),
    key=["S", "HEAD_DIM", "BLOCK_SIZE", "MODE"],  # the autotuner adds the tensors' dtypes
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _sparse_attn_fwd(
    Q, K, V, Out,
    FULL_INDEX, FULL_COUNT, PARTIAL_INDEX, PARTIAL_COUNT,  # block tables (G, nq, max_k) int32 and (G, nq) int32
    sm_scale,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_fih, stride_fim, stride_fch,  # table strides: head (0 when the group shares one table), query block
    stride_pih, stride_pim, stride_pch,
    G, S, axis_start, axis_end, radius,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, MODE: tl.constexpr, PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,  # dot operands in float32 (only where the interpreter cannot multiply bfloat16)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // G).to(tl.int64)
    h = pid_bh % G
    q_block = (pid_m * BLOCK_M) // BLOCK_SIZE  # BLOCK_M divides BLOCK_SIZE
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)

    q_head = Q + b * stride_qb + h.to(tl.int64) * stride_qh
    k_head = K + b * stride_kb + h.to(tl.int64) * stride_kh
    v_head = V + b * stride_vb + h.to(tl.int64) * stride_vh
    q = tl.load(q_head + offs_m[:, None] * stride_qs + offs_d[None, :], mask=(offs_m < S)[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): the softmax runs on exp2

    # blocks where every token pair is allowed: no mask
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_head, v_head, stride_ks, stride_vs,
        FULL_INDEX + h * stride_fih + q_block * stride_fim, tl.load(FULL_COUNT + h * stride_fch + q_block),
        offs_m, offs_d, qk_scale, S, axis_start, axis_end, radius,
        BLOCK_N, BLOCK_SIZE, MODE, False, PRECISION, DOT_FP32,
    )
    # partial blocks: the token rule and the sequence end
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_head, v_head, stride_ks, stride_vs,
        PARTIAL_INDEX + h * stride_pih + q_block * stride_pim, tl.load(PARTIAL_COUNT + h * stride_pch + q_block),
        offs_m, offs_d, qk_scale, S, axis_start, axis_end, radius,
        BLOCK_N, BLOCK_SIZE, MODE, True, PRECISION, DOT_FP32,
    )

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # l = 0 only on padding rows: write 0, not NaN
    o_head = Out + b * stride_ob + h.to(tl.int64) * stride_oh
    o_ptrs = o_head + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m < S)[:, None])


# ---- Hopper path: tiles through tensor descriptors (TMA) -----------------------------------------------------
#
# Why a second kernel: on an H200 the pointer kernel above computes every block at 1.37-1.47x cuDNN's time
# (BENCHMARKS section 1b), bound by how tiles reach shared memory. Here K and V tiles come through TMA (tensor
# descriptors: one bulk copy per tile, issued ahead by the software pipeliner), and so do Q, the output and the
# masked loop's tiles when S is a multiple of the block size (otherwise those use the pointer kernel's masked loads,
# since a tile crossing S would read the next head's rows). The unmasked loop takes the softmax scale after the row
# max (one multiply-add per score, as in Triton's fused-attention tutorial) and needs no -inf guard (every key of a
# full block is allowed, so the running max is finite after the first tile); a table whose rows are single runs of
# consecutive blocks (bands and stripes over a video axis) is walked with no index load inside the loop. Measured
# on an H200: every block at 1.17x cuDNN's time (BENCHMARKS section 1b-i).


@triton.jit
def _attn_fwd_inner_tma(
    acc, l_i, m_i, q, desc_k, desc_v,
    row0, block_index, block_count, qk_scale,  # row0: this (batch, head)'s first row in the (B*G*S, D) view
    offs_m, S, axis_start, axis_end, radius,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, MODE: tl.constexpr, MASKED: tl.constexpr,
    CONTIGUOUS: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Online softmax over the listed blocks, K and V tiles loaded through descriptors. MASKED applies the token
    rule (only called so when S is a multiple of the block size: no tile crosses into the next head's rows).
    CONTIGUOUS: this table's blocks are consecutive in every row, so the loop reads only the first index and
    walks keys from there, with no index load inside the loop."""
    SUB_TILES: tl.constexpr = BLOCK_SIZE // BLOCK_N
    first = tl.load(block_index) * BLOCK_SIZE  # a row with count 0 reads its -1 padding and never uses it
    # Not warp-specialised: tl.range(..., warp_specialize=True) fails to compile this loop for sm_90 on Triton
    # 3.6 (an assertion in its WSLowerToken pass; BENCHMARKS section 1b), so the pipeliner alone overlaps loads.
    for i in tl.range(0, block_count * SUB_TILES):
        if CONTIGUOUS:
            start_n = first + i * BLOCK_N
        else:
            start_n = tl.load(block_index + i // SUB_TILES) * BLOCK_SIZE + (i % SUB_TILES) * BLOCK_N
        k = desc_k.load([row0 + start_n, 0])
        if DOT_FP32:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k))
        if MASKED:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            allowed = _allowed(offs_m, offs_n, S, axis_start, axis_end, radius, MODE)
            qk = tl.where(allowed, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no allowed key yet: exp2 gives 0, not NaN
            p = tl.math.exp2(qk - m_shift[:, None])
            alpha = tl.math.exp2(m_i - m_shift)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)  # 0 on the first tile, where m_i = -inf
        l_ij = tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = desc_v.load([row0 + start_n, 0])
        if DOT_FP32:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc)
        l_i = l_i * alpha + l_ij  # after the dot: fewer live registers across it
        m_i = m_new
    return acc, l_i, m_i


def _tma_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, pre_hook=_set_tma_block_shapes)
        for m in TMA_TILES
        for n in TMA_TILES
        for w in (4, 8)
        for s in (2, 3, 4)
    ]


def _set_tma_block_shapes(nargs: dict) -> None:
    """The descriptors' tile shapes are the config's tiles: set them before each launch of that config."""
    for name in ("desc_k", "desc_v"):
        nargs[name].block_shape = [nargs["BLOCK_N"], nargs["HEAD_DIM"]]
    for name in ("desc_q", "desc_o"):
        nargs[name].block_shape = [nargs["BLOCK_M"], nargs["HEAD_DIM"]]


def _tma_config_fits(config: triton.Config, block_size: int, head_dim: int) -> bool:
    """Tiles divide the block size; 8 warps only on 128x128 tiles (on Hopper smaller tiles leave 8 warps idle,
    as the fused-attention tutorial prunes), and 128x128 tiles at D = 128 only with 8 warps (4 would spill)."""
    m, n, w = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps
    if block_size % m or block_size % n:
        return False
    if w == 8 and m * n < 128 * 128:
        return False
    return not (head_dim >= 128 and m * n >= 128 * 128 and w < 8)


def _prune_tma_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    args = {**named_args, **kwargs}
    if INTERPRET:  # one config; key tiles of half the query tile where possible, so the sub-tile loop runs
        m = max(t for t in TMA_TILES if args["BLOCK_SIZE"] % t == 0)
        n = min(TMA_TILES)
        return [c for c in configs if c.kwargs["BLOCK_M"] == m and c.kwargs["BLOCK_N"] == n][:1]
    return [c for c in configs if _tma_config_fits(c, args["BLOCK_SIZE"], args["HEAD_DIM"])]


@triton.autotune(
    configs=_tma_configs(),
    # MODE only changes the masked loop, a small share of the work: one tuning per shape serves all modes
    key=["S", "HEAD_DIM", "BLOCK_SIZE", "EVEN", "CONTIGUOUS"],
    prune_configs_by={"early_config_prune": _prune_tma_configs},
)
@triton.jit
def _sparse_attn_fwd_tma(
    Q, K, V, Out, desc_q, desc_k, desc_v, desc_o,
    FULL_INDEX, FULL_COUNT, PARTIAL_INDEX, PARTIAL_COUNT,
    sm_scale,
    stride_fih, stride_fim, stride_fch,
    stride_pih, stride_pim, stride_pch,
    G, S, axis_start, axis_end, radius,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, MODE: tl.constexpr,
    EVEN: tl.constexpr,  # S is a multiple of BLOCK_SIZE: every tile lies inside its head's rows
    CONTIGUOUS: tl.constexpr,  # every row of the full table is one run of consecutive blocks
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """As `_sparse_attn_fwd`, for contiguous (B, G, S, D) 16-bit inputs: q, k, v, out share one layout. Q and
    the output go through descriptors too when EVEN; otherwise they and the masked loop use masked pointers."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    h = pid_bh % G
    q_block = (pid_m * BLOCK_M) // BLOCK_SIZE
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row0 = pid_bh * S  # int32: descriptor coordinates are 32-bit
    head = pid_bh.to(tl.int64) * S * HEAD_DIM
    if EVEN:
        q = desc_q.load([row0 + pid_m * BLOCK_M, 0])
    else:
        q = tl.load(Q + head + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=(offs_m < S)[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    acc, l_i, m_i = _attn_fwd_inner_tma(
        acc, l_i, m_i, q, desc_k, desc_v, row0,
        FULL_INDEX + h * stride_fih + q_block * stride_fim, tl.load(FULL_COUNT + h * stride_fch + q_block),
        qk_scale, offs_m, S, axis_start, axis_end, radius,
        BLOCK_N, BLOCK_SIZE, MODE, False, CONTIGUOUS, DOT_FP32,
    )
    partial_index = PARTIAL_INDEX + h * stride_pih + q_block * stride_pim
    partial_count = tl.load(PARTIAL_COUNT + h * stride_pch + q_block)
    if EVEN:
        acc, l_i, m_i = _attn_fwd_inner_tma(
            acc, l_i, m_i, q, desc_k, desc_v, row0, partial_index, partial_count,
            qk_scale, offs_m, S, axis_start, axis_end, radius,
            BLOCK_N, BLOCK_SIZE, MODE, True, False, DOT_FP32,
        )
    else:  # tiles may cross S: the pointer loop masks the loads
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, K + head, V + head, HEAD_DIM, HEAD_DIM, partial_index, partial_count,
            offs_m, offs_d, qk_scale, S, axis_start, axis_end, radius,
            BLOCK_N, BLOCK_SIZE, MODE, True, "ieee" if DOT_FP32 else "tf32", DOT_FP32,
        )

    out = (acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]).to(Out.dtype.element_ty)
    if EVEN:
        desc_o.store([row0 + pid_m * BLOCK_M, 0], out)
    else:
        tl.store(Out + head + offs_m[:, None] * HEAD_DIM + offs_d[None, :], out, mask=(offs_m < S)[:, None])


# ---- block tables -----------------------------------------------------------------------------------------


def full_and_partial_blocks(spec: SparseSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(full, partial), each (G', nq, nk) bool, splitting `spec.block_mask`: full blocks need no mask at all,
    partial ones apply the token rule. The ragged last key block is never full: its padding lies past S."""
    full = spec.full_block_mask().expand_as(spec.block_mask).clone()
    if spec.seq_len % spec.block_size:
        full[..., -1] = False
    return full, spec.block_mask & ~full


def runs_are_contiguous(index: torch.Tensor, count: torch.Tensor) -> bool:
    """Whether every row of a block table (index (G, nq, max_k) padded with -1, count (G, nq)) lists one run of
    consecutive blocks: bands and stripes over a video axis do, top-k selections and text columns usually not."""
    steps = torch.arange(index.shape[-1], device=index.device)
    valid = steps < count[..., None]
    return bool(((index == index[..., :1] + steps) | ~valid).all())


def _full_and_partial(spec: SparseSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """`full_and_partial_blocks(spec)`, built once per spec (on the CPU) for the tables and the contiguity flag."""
    return spec.cached("triton_full_partial", torch.device("cpu"), lambda: full_and_partial_blocks(spec))


def _full_table_is_contiguous(spec: SparseSpec) -> bool:
    flag = spec.cached(
        "triton_full_contiguous", torch.device("cpu"),
        lambda: torch.tensor(runs_are_contiguous(*block_table(_full_and_partial(spec)[0]))),
    )
    return bool(flag)


def _block_tables(spec: SparseSpec, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(full index, full count, partial index, partial count) on `device`, built once per spec and device."""
    full, partial = _full_and_partial(spec)
    return (
        *spec.cached("triton_full_table", device, lambda: block_table(full)),
        *spec.cached("triton_partial_table", device, lambda: block_table(partial)),
    )


# ---- wrapper ----------------------------------------------------------------------------------------------


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: SparseSpec) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must be (B, G, S, D) of one shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}. "
            "Select the group's heads with q[:, heads] before calling the kernel."
        )
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k, v have dtypes {q.dtype}, {k.dtype}, {v.dtype}; the Triton kernel takes one of float16, bfloat16 "
            "or float32 for all three. Cast them, e.g. q.to(torch.bfloat16)."
        )
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v are on {q.device}, {k.device}, {v.device}; move them to one device.")
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"q is on {q.device.type}, and the Triton kernel needs a CUDA device; move q, k, v to CUDA, use "
            "backend='torch', or set TRITON_INTERPRET=1 before importing sparsediff.kernels.triton_sparse (tests)."
        )
    B, G, S, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(
            f"Head dim D={D} is not supported by the Triton kernel; it takes D in {HEAD_DIMS}. "
            "Use backend='torch' or 'flex' for this model."
        )
    if S != spec.seq_len:
        raise ValueError(
            f"q has S={S} tokens but the spec was built for seq_len={spec.seq_len}; build the spec from this layout."
        )
    if spec.block_size % MIN_TILE:
        raise ValueError(
            f"block_size={spec.block_size} is not a multiple of {MIN_TILE}, the Triton kernel's smallest tile; "
            "use a block size such as 64 or 128."
        )
    if spec.block_mask.shape[0] not in (1, G):
        raise ValueError(
            f"spec.block_mask has {spec.block_mask.shape[0]} heads but q has G={G}; "
            "give one block mask per head of the group, or one shared by all of them."
        )


def tma_unavailable(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: SparseSpec, check_device: bool = True
) -> str | None:
    """Why the Hopper (TMA) path cannot run these inputs, or None when it can. Under the interpreter,
    `check_device=False` lets tests run the path on the CPU."""
    if TensorDescriptor is None:
        return f"Triton {triton.__version__} has no host tensor descriptors (needs >= 3.4)"
    if q.dtype not in TMA_DTYPES:
        return f"dtype {q.dtype} (the TMA path takes float16 or bfloat16)"
    if not all(t.is_contiguous() for t in (q, k, v)):
        return "q, k or v is not contiguous (the TMA path views them as one (B*G*S, D) matrix)"
    if spec.block_size % min(TMA_TILES):
        return f"block_size={spec.block_size} is not a multiple of {min(TMA_TILES)}"
    if check_device and (q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] < 9):
        return "the device is not Hopper or later (compute capability >= 9)"
    return None


def triton_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: SparseSpec,
    scale: float | None = None,
    *,
    tma: bool | None = None,
) -> torch.Tensor:
    """Sparse attention for one head group with the Triton kernel.

    Args:
        q, k, v: (B, G, S, D) in the spec's kernel order; float16, bfloat16 or float32; D in 16..128.
        spec: the group's `SparseSpec` (block_mask with 1 or G heads; block_size a multiple of 16).
        scale: softmax scale, 1/sqrt(D) by default.
        tma: the Hopper path (tiles through TMA tensor descriptors). None: where `tma_unavailable` finds nothing
            against it (contiguous 16-bit inputs on compute capability >= 9, block size a multiple of 64);
            True: that path or a ValueError saying why not; False: the pointer kernel.
    Returns:
        (B, G, S, D) in q's dtype, equal to `spec_reference_attention(q, k, v, spec, scale)`.
    """
    _check_inputs(q, k, v, spec)
    if tma is not False:
        reason = tma_unavailable(q, k, v, spec, check_device=not (tma and INTERPRET))
        if tma and reason:
            raise ValueError(f"tma=True, but the Hopper path cannot run these inputs: {reason}. Pass tma=None.")
        tma = reason is None
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # the kernel assumes unit D stride
    B, G, S, D = q.shape
    scale = D**-0.5 if scale is None else scale
    # (G, nq, max_k) and (G, nq): a table shared by the group broadcasts with head stride 0
    tables = (t.expand(G, *t.shape[1:]) for t in _block_tables(spec, q.device))
    full_index, full_count, partial_index, partial_count = tables
    # Triton's interpreter (3.x) multiplies bfloat16 tiles as their raw 16-bit integers; it gets float32 operands
    upcast = INTERPRET and q.dtype == torch.bfloat16
    out = torch.empty((B, G, S, D), dtype=q.dtype, device=q.device)
    if tma:
        grid = lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * G)  # noqa: E731
        # block shapes are placeholders: each config's pre-hook sets its own tiles
        desc_q, desc_k, desc_v, desc_o = (
            TensorDescriptor.from_tensor(t.view(B * G * S, D), [min(TMA_TILES), D]) for t in (q, k, v, out)
        )
        _sparse_attn_fwd_tma[grid](
            q, k, v, out, desc_q, desc_k, desc_v, desc_o,
            full_index, full_count, partial_index, partial_count,
            scale,
            full_index.stride(0), full_index.stride(1), full_count.stride(0),
            partial_index.stride(0), partial_index.stride(1), partial_count.stride(0),
            G, S, spec.axis_start, spec.axis_end, spec.radius,
            HEAD_DIM=D, BLOCK_SIZE=spec.block_size, MODE=MODE_IDS[spec.mode],
            EVEN=S % spec.block_size == 0, CONTIGUOUS=_full_table_is_contiguous(spec),
            DOT_FP32=upcast,
        )
        return out
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * G)  # noqa: E731
    _sparse_attn_fwd[grid](
        q, k, v, out,
        full_index, full_count, partial_index, partial_count,
        scale,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        full_index.stride(0), full_index.stride(1), full_count.stride(0),
        partial_index.stride(0), partial_index.stride(1), partial_count.stride(0),
        G, S, spec.axis_start, spec.axis_end, spec.radius,
        HEAD_DIM=D, BLOCK_SIZE=spec.block_size, MODE=MODE_IDS[spec.mode],
        PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32", DOT_FP32=upcast,
    )
    return out
