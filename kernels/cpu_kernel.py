"""The compiled CPU kernel (`csrc/sparse_cpu.cpp`): sparse attention that reads K and V in place.

Plain torch cannot skip blocks inside one SDPA call, so its `blocks` mode gathers each query block's key blocks
and its bands compute whole windows. This kernel walks each query block's key *ranges* itself (a flash-attention
loop whose small GEMMs are oneDNN's JIT micro-kernels, `at::native::cpublas::brgemm`, or torch's BLAS), so the
gathered copies disappear and only the ranges' keys are computed. float32 runs in float32; bfloat16 and float16
run widened to float32, except on CPUs that multiply them natively (AMX; for bfloat16 also AVX512-BF16), where the
kernel's 16-bit entry packs K and V for oneDNN's 16-bit micro-kernels (`native`; `SPARSEDIFF_CPU_KERNEL_16BIT=0`
sends them to SDPA on AMX, to the float32 compute elsewhere).

It is built on first use with `torch.utils.cpp_extension.load` (a C++ compiler and ninja; 20-45 s, once per
machine: the build is named by a hash of the source, torch's version and the CPU's model and flags, since it is
compiled for the machine's own instruction set; `SPARSEDIFF_CPU_KERNEL_MARCH=x86-64-v3`, say, compiles it for another).
If the build or its self-check fails, `load()` returns None, says why once, and the torch backend keeps its pure-torch
paths. `SPARSEDIFF_CPU_KERNEL=0` turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .log import warn_once
from .spec import SparseSpec, block_axis_ranges, block_table

logger = logging.getLogger("sparsediff")

ENV = "SPARSEDIFF_CPU_KERNEL"
# The instruction set the kernel is compiled for (GCC's -march): the machine's own by default; e.g. x86-64-v3 (AVX2)
# for a build that runs on older x86 CPUs, or to measure such a CPU's code path on a newer one.
MARCH_ENV = "SPARSEDIFF_CPU_KERNEL_MARCH"
# "0" keeps 16-bit calls off the kernel's 16-bit entry (`native`): on a CPU with AMX they take the pure-torch paths
# (SDPA on AMX), elsewhere the kernel's float32 compute, as before it existed, for comparison or as a way out.
ENV_16BIT = "SPARSEDIFF_CPU_KERNEL_16BIT"
SOURCE = Path(__file__).with_name("csrc") / "sparse_cpu.cpp"
RULES = {"blocks": 0, "band": 1, "stripe": 2}
# Keys per online-softmax update (a 64-row score tile of 1024 floats is 256 KiB, in L2). Swept 128-2048 at S = 8192,
# 8 heads x 64, float32, two threads of a 2-core AMD EPYC (top-k 0.25, bands of radius 384 and 1024; two runs):
# 1024 best or within 2% everywhere, 512 within 3% (one run: 12% on the wide band), 128 8-15% slower.
KV_CHUNK = 1024
# Query rows per block for bands, stripes and dense heads (`blocks` mode uses the spec's block size). At S = 8192,
# 8 heads x 64, float32, two threads of a 2-core AMD EPYC: 64 rows were fastest on the narrowest band (radius 384: 7%
# ahead of 128, 19% of 256) and within 2% of the others elsewhere; dense, 64 / 128 / 256 within 1%.
ROWS = 64
# The 16-bit entry's: its AMX GEMMs are ~5x faster than float32 ones, so the softmax between them weighs more and a
# score tile that stays in L1/L2 pays. Dense attention at S = 8192, 8 heads x 64, bfloat16, two threads of an Intel
# Xeon with AMX (ms; rows x keys per chunk): 64 x 1024 265, 64 x 512 263, 64 x 256 234, 64 x 128 283, 128 x 256 226,
# 256 x 256 216, 256 x 128 247, 256 x 512 259, 512 x 256 220 (SDPA 185-200 in the same runs). Dense heads run 256
# rows; bands keep `ROWS` (the six diagonal and multi-diagonal cases of the sweep, two rounds each in alternating
# order: 128 rows within 0.03 of 64 on every case, neither ahead).
KV_CHUNK_16BIT = 256
ROWS_DENSE_16BIT = 256

_state: dict = {}


def load():
    """The compiled module, or None (disabled, no compiler, or the self-check failed: `reason()` says which)."""
    if "module" in _state:
        return _state["module"]
    module, reason = None, None
    if os.environ.get(ENV, "1") == "0":
        reason = f"${ENV}=0"
    else:
        try:
            start = time.perf_counter()
            module = _build()
            _state["brgemm"] = _self_check(module)
            if _state.get("built"):
                logger.info("sparsediff: compiled CPU kernel built in %.0f s (later processes load it from torch's "
                            "extension cache)", time.perf_counter() - start)
        except Exception as exc:  # no compiler, no ninja, a failed build or a wrong result: keep the torch paths
            module, reason = None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            warn_once(logger, f"sparsediff: the compiled CPU kernel is unavailable ({reason}); the torch backend uses its pure-torch paths.")
    _state["module"], _state["reason"] = module, reason
    return module


def reason() -> str | None:
    """Why `load()` returned None (None when it did not, or before it was called)."""
    return _state.get("reason")


def uses_brgemm() -> bool:
    """Whether the loaded kernel runs oneDNN's micro-kernels (else torch's BLAS)."""
    return bool(_state.get("brgemm"))


def _build():
    from torch.utils.cpp_extension import load as load_extension

    if shutil.which("ninja") is None:  # the pip package's binary, when the venv's bin is not on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")

    march = os.environ.get(MARCH_ENV, "native")
    # -march=native code must not run on another CPU: the build's name hashes the source, torch, the CPU's flags and
    # the target instruction set
    identity = SOURCE.read_bytes() + torch.__version__.encode() + _cpu_identity().encode()
    identity += b"" if march == "native" else march.encode()
    tag = hashlib.sha256(identity).hexdigest()[:12]
    # -fopenmp: at::parallel_for is a header template, parallel only where the including code is built with OpenMP;
    # -fno-trapping-math: lets GCC vectorise the exponential's floor and conversions (no FP traps are relied on)
    flags = ["-O3", f"-march={march}", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
    _state["built"] = not _built(f"sparsediff_cpu_{tag}")
    if _state["built"]:
        logger.info("sparsediff: building the compiled CPU kernel for this CPU (once, ~20-40 s on 2 cores)")
    return load_extension(name=f"sparsediff_cpu_{tag}", sources=[str(SOURCE)], extra_cflags=flags,
                          extra_ldflags=["-fopenmp"], verbose=False)


def _built(name: str) -> bool:
    """Whether torch's extension cache holds a build of `name` (then `load_extension` only loads it)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return any(root.glob(f"**/{name}/{name}*.so"))


def _cpu_identity() -> str:
    """The CPU's model and instruction-set flags (Linux), else torch's capability name and the platform."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))][:2]  # the first CPU's
        return "\n".join(lines) or text[:4096]
    except OSError:
        import platform

        return torch.backends.cpu.get_cpu_capability() + platform.processor() + platform.machine()


def _self_check(module) -> bool:
    """Run one small case through the micro-kernel path and the BLAS path against SDPA; the first that matches is
    used. Raises if neither does (then the kernel stays off)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 80, 32, generator=g) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    ranges = torch.tensor([[[[0, 80]]] * 2], dtype=torch.int32)
    counts = torch.ones(1, 2, dtype=torch.int32)
    failures = []
    for brgemm in (True, False):
        try:
            got = torch.empty_like(q)
            module.sparse_attention(q, k.transpose(-1, -2).contiguous(), v, got, torch.arange(2), ranges, counts, 64,
                                    32**-0.5, 0, 0, 0, 80, 48, brgemm)
        except Exception as exc:  # oneDNN's micro-kernels are missing on some builds and CPUs
            failures.append(f"{'brgemm' if brgemm else 'BLAS'}: {exc}")
            continue
        if torch.allclose(got, want, atol=1e-5, rtol=1e-4):
            return brgemm
        failures.append(f"{'brgemm' if brgemm else 'BLAS'}: off by {(got - want).abs().max().item():.2e}")
    raise RuntimeError("self-check failed (" + "; ".join(failures) + ")")


def _self_check_16bit(module, dtype: torch.dtype, why: list | None = None) -> bool:
    """The 16-bit entry on a small case in `dtype` (an odd S, ranges with odd bounds split across score chunks, which
    take its padded pairs) against float32 SDPA of the same rounded inputs; False (and why, at debug level and in
    `why` if given: "unavailable" or "wrong") if it raises or misses."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 81, 32, generator=g).to(dtype) for _ in range(3))
    nqb = -(-81 // 16)
    ranges = torch.zeros(1, nqb, 2, 2, dtype=torch.int32)
    ranges[0, ::2, 0] = torch.tensor([0, 81], dtype=torch.int32)  # even query blocks: every key
    ranges[0, 1::2] = torch.tensor([[3, 50], [51, 81]], dtype=torch.int32)  # odd ones: two ranges, odd bounds
    counts = torch.tensor([[1, 2] * (nqb // 2) + [1] * (nqb % 2)], dtype=torch.int32)
    allowed = torch.zeros(81, 81, dtype=torch.bool)
    for blk in range(nqb):
        for j0, j1 in ranges[0, blk, : counts[0, blk]].tolist():
            allowed[blk * 16 : (blk + 1) * 16, j0:j1] = True
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed)
    got = torch.empty(q.shape, dtype=torch.float32)
    try:
        qc, kp, vp, S = _pack(q, k, v, _fresh)
        module.sparse_attention_16bit(qc, kp, vp, got, torch.arange(2), ranges, counts, 16, 32**-0.5, 0, 0, 0, 81, 48, S)
    except Exception as exc:  # oneDNN's 16-bit micro-kernels are missing on some builds and CPUs
        logger.debug("sparsediff: the compiled kernel's %s entry is unavailable (%s)", dtype, exc)
        if why is not None:
            why.append(f"unavailable: {exc}")
        return False
    err = (got - want).abs().max().item()
    if err > 2e-2:
        logger.debug("sparsediff: the compiled kernel's %s entry is off by %.2e", dtype, err)
        if why is not None:
            why.append(f"wrong: off by {err:.2e}")
    return err <= 2e-2


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within it, `usable` says no: the torch backend runs its pure-torch paths (tests of those paths, comparisons)."""
    before = _state.get("off", False)
    _state["off"] = True
    try:
        yield
    finally:
        _state["off"] = before


# Input dtypes the kernel takes. Where the CPU has no native 16-bit GEMMs it computes in float32: 16-bit inputs are
# widened once per call in `prepare` (one copy of q, K^T and v: 1 / S of the attention's work) and the output rounded
# back, so a bfloat16 or float16 call runs at the float32 kernel's speed and is at least as accurate as torch's 16-bit
# SDPA on such a CPU, which at S = 8192, 8 heads x 64 is slower than its own float32 (BENCHMARKS §1a-iv). Where it has
# them (`native_16bit`: AMX, or AVX512-BF16 for bfloat16), the kernel's 16-bit entry multiplies in the input's type
# (`native`).
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# oneDNN's instruction-set names (ONEDNN_MAX_CPU_ISA) that include AVX512-BF16's dot products, below AMX.
_BF16_DOT_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX10_2_512")


def _isa_allows(*prefixes: str) -> bool:
    """Whether ONEDNN_MAX_CPU_ISA (unset or ALL: no limit) leaves oneDNN AMX or an instruction set named by one of
    `prefixes`."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return not isa or isa == "ALL" or "AMX" in isa or isa.startswith(prefixes)


def amx(dtype: torch.dtype) -> bool:
    """Whether this CPU has AMX tiles for `dtype` (bfloat16 on Intel Xeon 4th generation and later, float16 from the
    6th), where torch's own 16-bit SDPA runs on them, ~3-5x faster than in float32: there a 16-bit call the kernel's
    16-bit entry cannot take goes to SDPA, not to the kernel's float32 compute. Respects a ONEDNN_MAX_CPU_ISA that
    leaves AMX out (oneDNN runs torch's 16-bit GEMMs)."""
    if not _isa_allows():
        return False
    try:
        if dtype == torch.bfloat16:
            return bool(torch.cpu._is_amx_tile_supported())
        if dtype == torch.float16:
            return bool(torch.cpu._is_amx_fp16_supported())
    except AttributeError:  # a torch without these probes: assume none (the float32 compute path stays)
        return False
    return False


def native_16bit(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` natively: AMX tiles (`amx`), or for bfloat16 AVX512-BF16's dot products
    (AMD Zen 4 and later, Intel Cooper Lake), where oneDNN's bfloat16 micro-kernels run ~1.8x faster than float32 ones
    (dense attention at S = 8192, 8 heads x 64, 2-core AMD EPYC family 26: 272 ms against 478, BENCHMARKS §1a-vii).
    There 16-bit calls run the kernel's 16-bit entry (`native`) if it passes its self-check. Respects
    ONEDNN_MAX_CPU_ISA."""
    if amx(dtype):
        return True
    if dtype != torch.bfloat16:
        return False
    if not _isa_allows(*_BF16_DOT_ISAS):
        return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False


def native(dtype: torch.dtype) -> bool:
    """Whether 16-bit calls of `dtype` run in the kernel's 16-bit entry (VNNI-packed operands, oneDNN's 16-bit
    micro-kernels, float32 softmax and accumulation): the CPU multiplies `dtype` natively (`native_16bit`), the kernel
    loads with oneDNN's micro-kernels, and the entry passes its self-check in `dtype` (checked once)."""
    if dtype not in (torch.bfloat16, torch.float16) or not native_16bit(dtype) or os.environ.get(ENV_16BIT, "1") == "0":
        return False
    checks = _state.setdefault("native", {})
    if dtype not in checks:
        module = load()
        checks[dtype] = module is not None and uses_brgemm() and _self_check_16bit(module, dtype)
    return checks[dtype]


def compute_dtype(dtype: torch.dtype, head_dim: int | None = None) -> torch.dtype:
    """The type the kernel's GEMM operands are prepared in for calls of `dtype` (and `head_dim`): the input's own in
    the 16-bit entry (`native`; its packed pairs run along the head dimension, so an even one), else float32."""
    even = head_dim is None or head_dim % 2 == 0
    return dtype if dtype != torch.float32 and even and native(dtype) else torch.float32


def takes(dtype: torch.dtype) -> bool:
    """Whether calls of `dtype` run in the kernel where it loads: float32; 16-bit in the kernel's 16-bit entry where it
    runs (`native`), else computed in float32, except on a CPU with AMX for `dtype`, where SDPA takes them (`amx`)."""
    return dtype == torch.float32 or (dtype in DTYPES and (not amx(dtype) or native(dtype)))


def runs(dtype: torch.dtype) -> bool:
    """Whether the torch backend's CPU calls of `dtype` (without gradients) run in the kernel: it `takes` the dtype,
    is not switched off and loads."""
    return not _state.get("off") and takes(dtype) and load() is not None


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether a call can run in the compiled kernel: CPU, a dtype it `takes` for all three, no gradients, and the
    kernel loads. A 16-bit call with an odd head size, which the 16-bit entry cannot pack, computes in float32, except
    on AMX, where SDPA takes it (`takes`)."""
    if _state.get("off"):
        return False
    if q.device.type != "cpu" or k.dtype != q.dtype or v.dtype != q.dtype or not takes(q.dtype):
        return False
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return False
    if q.shape[-1] % 2 and amx(q.dtype):
        return False
    return load() is not None


def status() -> str:
    """What the torch backend's CPU path is, for benchmark records: "brgemm", "blas" or "off (why)", with a target
    instruction set other than the machine's own and a limit on oneDNN's ("brgemm, -march=x86-64-v3,
    ONEDNN_MAX_CPU_ISA=AVX2")."""
    if load() is None:
        return f"off ({reason()})"
    notes = [f"-march={os.environ[MARCH_ENV]}"] if os.environ.get(MARCH_ENV, "native") != "native" else []
    notes += [f"ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']}"] if os.environ.get("ONEDNN_MAX_CPU_ISA") else []
    notes += [f"{name} {_16bit_status(dt)}" for name, dt in (("bfloat16", torch.bfloat16), ("float16", torch.float16))
              if native_16bit(dt)]
    return ", ".join(["brgemm" if uses_brgemm() else "blas", *notes])


def _16bit_status(dtype: torch.dtype) -> str:
    unit = "AMX" if amx(dtype) else "AVX512-BF16"
    if native(dtype):
        return f"native ({unit})"
    return "through SDPA (AMX)" if amx(dtype) else f"in float32 (the {unit} entry is off)"


def kt_columns(S: int) -> int:
    """The row stride of K^T's buffer for S keys: S rounded up to 256, plus 16. Rounding lets calls of nearby lengths
    (a decoder's growing cache) reuse oneDNN's JIT-compiled micro-kernels, which are made per leading dimension; the
    16 keeps the stride off multiples of 4 KiB, where the D rows of a K^T tile share cache sets. At S = 8192, 8 heads
    x 64, float32 (2-core AMD EPYC): 2-4% faster than a stride of S; at S = 8229, no change; a first call at a new
    length costs ~3 ms instead of ~4.5 on a band of ~35 ms."""
    return -(-S // 256) * 256 + 16


def _fresh(name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """`prepare`'s default scratch: a new tensor each call."""
    return torch.empty(shape, dtype=dtype)


Scratch = Callable[[str, tuple, torch.dtype], torch.Tensor]


def _pack(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scratch: Scratch) -> tuple:
    """The 16-bit entry's operands: (q contiguous, K^T as (B, H, D / 2, `kt_columns(S)`, 2), V as (B, H, S2 / 2, D, 2),
    S), K^T and V VNNI-packed (pairs of rows interleaved; `csrc/sparse_cpu.cpp`), V's pad row zero for an odd S."""
    B, H, S, D = k.shape
    kp = scratch("kt", (B, H, D // 2, kt_columns(S), 2), q.dtype)
    if k.stride(-1) == 1 and k.storage_offset() % 2 == 0 and all(st % 2 == 0 for st in k.stride()[:-1]):
        # a pair of 16-bit values is one 32-bit word in both layouts, so the packing is a 32-bit transpose: 3x faster
        # than moving 16-bit elements (S = 8192, 8 heads x 64: 1.5 ms against 4.5 on a 2-core AMD EPYC)
        words = kp.view(torch.int32).view(B, H, D // 2, kt_columns(S))
        words[..., :S].copy_(k.view(torch.int32).transpose(2, 3))
    else:
        kp[:, :, :, :S].copy_(k.unflatten(-1, (D // 2, 2)).transpose(2, 3))
    vp = scratch("v", (B, H, (S + 1) // 2, D, 2), q.dtype)
    even = S - S % 2
    rows = v[:, :, :even].unflatten(2, (even // 2, 2))
    for t in range(2):  # even rows, then odd ones: two strided copies, 1.4-2.2x faster than one interleaving copy
        vp[:, :, : even // 2, :, t].copy_(rows[:, :, :, t])
    if S % 2:
        vp[:, :, -1, :, 0].copy_(v[:, :, -1])
        vp[:, :, -1, :, 1].zero_()
    return q.contiguous(), kp, vp, S


def prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scratch: Scratch = _fresh):
    """A layer call's inputs as the kernel reads them, made once per call and shared by all its head groups (one
    copy of K and V: 1 / S of the attention's work). float32 compute: (q, K^T, v), float32, q and v contiguous, K
    transposed into a (B, H, D, `kt_columns(S)`) buffer (only its first S columns are written or read). The 16-bit
    entry (`native`): (q, K^T, V, S) in the input's type, K^T and V VNNI-packed (`csrc/sparse_cpu.cpp`). `scratch(name,
    shape, dtype)` gives the buffers ("q", "kt", "v"; the caller may reuse them across calls), fresh tensors without it."""
    B, H, S, D = k.shape
    if compute_dtype(q.dtype, D) != torch.float32:
        return _pack(q, k, v, scratch)
    kt = scratch("kt", (B, H, D, kt_columns(S)), torch.float32)
    kt[..., :S].copy_(k.transpose(-1, -2))
    if q.dtype == torch.float32:
        return q.contiguous(), kt, v.contiguous()
    return scratch("q", q.shape, torch.float32).copy_(q), kt, scratch("v", v.shape, torch.float32).copy_(v)


def rows_for(spec: SparseSpec | None) -> int:
    """Query rows per block: the spec's block size in `blocks` mode, else `ROWS`."""
    return spec.block_size if spec is not None and spec.mode == "blocks" else ROWS


def attend_into(out: torch.Tensor, prepared, heads: torch.Tensor, spec: SparseSpec | None, scale: float | None,
                qblock: int | None = None) -> None:
    """Write heads `heads` ((G,) int64 indices into the call's heads) of `out` ((B, H, Sq, D) float32, contiguous)
    with their attention under `spec` (None: dense). `prepared` is `prepare(q, k, v)` of the whole call, so a layer's
    groups run on the same tensors without slicing them or scattering their outputs."""
    q, kt, v, *packed = prepared  # (q, K^T, v) float32, or the 16-bit entry's (q, K^T, V, S)
    S = packed[0] if packed else v.shape[2]
    if qblock is None:
        qblock = ROWS_DENSE_16BIT if packed and spec is None else rows_for(spec)
    if spec is None:
        nqb = -(-S // qblock)
        ranges = torch.tensor([[0, S]], dtype=torch.int32).expand(1, nqb, 1, 2).contiguous()
        counts = torch.ones(1, nqb, dtype=torch.int32)
        rule = (0, 0, 0, S)
    else:
        ranges, counts = spec.cached(f"cpu_key_ranges_{qblock}", torch.device("cpu"), lambda: key_ranges(spec, qblock))
        rule = (RULES[spec.mode], spec.radius, spec.axis_start, spec.axis_end)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if packed:
        load().sparse_attention_16bit(q, kt, v, out, heads.to(torch.int64), ranges, counts, qblock, float(scale), *rule,
                                      KV_CHUNK_16BIT, S)
    else:
        load().sparse_attention(q, kt, v, out, heads.to(torch.int64), ranges, counts, qblock, float(scale), *rule,
                                KV_CHUNK, uses_brgemm())


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: SparseSpec | None, scale: float | None,
                     qblock: int | None = None) -> torch.Tensor:
    """One head group under `spec` (None: dense) in the compiled kernel (call `usable` first); shapes and dtype as
    `torch_sparse_attention` (16-bit inputs run in the 16-bit entry where `native`, else in float32; the float32
    output is rounded back)."""
    out = torch.empty(q.shape, dtype=torch.float32)
    attend_into(out, prepare(q, k, v), torch.arange(q.shape[1]), spec, scale, qblock)
    return out.to(q.dtype)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Dense attention through the compiled kernel (every query block over every key): what full heads beside sparse
    ones run, and the benchmarks' second anchor, separating what the kernel's GEMMs gain on a machine from what the
    sparsity gains."""
    return sparse_attention(q, k, v, None, scale)


def key_ranges(spec: SparseSpec, qblock: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ranges (G', nqb, max_r, 2) int32, counts (G', nqb) int32): the key ranges each query block of `qblock` rows
    visits, ascending and disjoint. `blocks`: the block table with neighbouring blocks joined (exact); `band` and
    `stripe`: the keys any of the block's queries may see (text keys, and the axis keys of the band or stripe; all
    keys if the block holds a text query), the rule applied per row inside the kernel."""
    S = spec.seq_len
    if spec.mode == "blocks":
        if qblock != spec.block_size:
            raise ValueError(f"blocks mode runs query blocks of the spec's block_size={spec.block_size}; got {qblock}.")
        mask = spec.block_mask
        off = torch.zeros_like(mask[..., :1])
        first = mask & ~torch.cat([off, mask[..., :-1]], dim=-1)  # a run of kept blocks starts here
        last = mask & ~torch.cat([mask[..., 1:], off], dim=-1)  # ... and ends here
        starts, count = block_table(first)
        ends, _ = block_table(last)
        ranges = torch.stack([starts * qblock, torch.clamp((ends + 1) * qblock, max=S)], dim=-1)
        ranges[starts < 0] = 0
        return ranges.to(torch.int32).contiguous(), count.to(torch.int32).contiguous()
    a0, a1, R = spec.axis_start, spec.axis_end, spec.radius
    lo, hi, _, _ = block_axis_ranges(S, a0, a1, qblock)
    rows = []
    for b in range(-(-S // qblock)):
        t0, t1 = b * qblock, min((b + 1) * qblock, S)
        if t0 < a0 or t1 > a1:  # a text query sees every key
            rows.append([(0, S)])
            continue
        if spec.mode == "band":
            axis = (max(a0, a0 + int(lo[b]) - R), min(a1, a0 + int(hi[b]) + R + 1))
        else:
            axis = (a0, a0 + min(R, a1 - a0))
        rows.append(_join([(0, a0), axis, (a1, S)]))
    ranges = torch.zeros(1, len(rows), max(len(r) for r in rows), 2, dtype=torch.int32)
    for b, rs in enumerate(rows):
        ranges[0, b, : len(rs)] = torch.tensor(rs, dtype=torch.int32)
    return ranges, torch.tensor([[len(r) for r in rows]], dtype=torch.int32)


def _join(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Ascending ranges with the empty ones dropped and touching ones joined."""
    out: list[list[int]] = []
    for s, e in ranges:
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]
