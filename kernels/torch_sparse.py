"""Sparse attention on the CPU (and the fallback anywhere): the compiled CPU kernel, else pattern-specialised calls
into fused SDPA.

On the CPU without gradients (float32; bfloat16 / float16 computed in float32, or natively on AMX in the kernel's
16-bit entry where it passes its self-check), every mode runs in the compiled kernel (`cpu_kernel`, `csrc/sparse_cpu.cpp`): one call per head group that walks each query block's key ranges in
place (no gathers, no windows wider than the band). Everywhere else (other devices, gradients, no C++ compiler),
plain torch: each mode avoids materialising S x S masks and gathers K/V only where the pattern is not contiguous:

- `stripe`: the stripe is a contiguous key range, so the axis queries run one SDPA call against
  [text keys, first `radius` axis keys]; no mask at all.
- `band`: when every axis query runs (and on the CPU, without gradients), `_band_exact`: the rows whose band lies
  inside the axis run in windows of `BAND_ROWS` rows, all in one call of
  `aten::_scaled_dot_product_flash_attention_for_cpu` over overlapping strided views of K and V (no copy, no gather)
  with one shared (rows, 2 * radius + rows) mask; the first and last `radius` rows run as an unmasked call plus a
  causal one (SDPA skips the causal tiles it does not need); text keys and the pieces of one row merge through their
  log-sum-exps. Otherwise (other devices, gradients, only the last queries of a canvas) the chunked form: chunks of
  `band_chunk(radius)` rows, each over the contiguous key range its band touches (plus text keys) with an additive
  mask for the band's edges.
- `blocks`: per query block, its key blocks are gathered (`index_select` on the block table) and attended in
  batches of query blocks; query blocks whose row is dense (text queries) run one dense call.

Text queries (outside [axis_start, axis_end)) attend every key, in one dense call.

q may hold only the last Sq of the spec's S tokens (a decoder's canvas over a cache plus itself): only those rows
run; in `blocks` mode the first query block they touch is padded at its front (at most `block_size - 1` rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_kernel
from .spec import SparseSpec, block_table

# Query rows per band chunk: about a third of the radius keeps the (chunk + 2 * radius) key range close to
# the band's own area, bounded so each SDPA call stays large enough to run near peak (chunks of 128-512
# were timed at radii 384, 1024 and 2304 on a 2-core CPU; this rule picked the best or near-best each time).
BAND_CHUNK_MIN, BAND_CHUNK_MAX = 192, 512


def band_chunk(radius: int) -> int:
    return int(min(BAND_CHUNK_MAX, max(BAND_CHUNK_MIN, round(radius / 3 / 64) * 64)))


# Query rows per window of the exact band: the smaller, the less outside the band is computed (2R + BAND_ROWS keys
# per row for a band of 2R + 1), the larger, the faster each window runs. At S = 8192, 8 heads x 64, float32, radii
# 192-2304, two threads of a 2-core AMD EPYC: 64 rows beat 128 at every radius (by 1-8%), and beat the three-piece
# windows of the previous kernel (an unmasked middle and two masked triangles, merged) by 3-20%.
BAND_ROWS = 64
# ... and for 16-bit inputs on a CPU whose SDPA multiplies them natively (AMX), where the compiled kernel's 16-bit
# entry does not run (`cpu_kernel.native`): there SDPA packs each window's keys for its tiles, which larger windows amortise: 512 rows from radius 768 (where they fit, 2R + 2C <= n), else 256.
# At S = 8192, 8 heads x 64, bfloat16, two threads of an Intel Xeon with AMX (efficiency, one run each unless noted):
# radius 1024: 0.27 / 0.41 / 0.50-0.53 (4 runs) / 0.57 / 0.54-0.62 (3 runs) / 0.53 at 64 / 128 / 256 / 384 / 512 /
# 1024 rows; radius 2304: 0.55 / 0.64 / 0.62 at 256 / 512 / 1024; radius 384: 0.33 / 0.49-0.53 / 0.42-0.52 at 128 /
# 256 / 512 (two sweeps: 256 rows ahead at radius 384, diagonal and multi-diagonal alike; 512 at 1024-2304).
BAND_ROWS_NATIVE_16BIT = (256, 512)  # (rows, rows from WIDE_RADIUS)
WIDE_RADIUS = 768
# Gathered K bytes per batch of query blocks in `blocks` mode: bounds memory at long sequences and keeps the
# gathered blocks in cache while SDPA reads them. Swept at S = 8192, 8 heads x 64, keep 0.25, two threads of a 2-core
# AMD EPYC (0.5-64 MiB, two runs): 0.5-8 MiB within 2% of each other, 16 MiB 6-10% slower, 64 MiB 20% slower.
GATHER_BYTES = 4 << 20


def torch_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: SparseSpec, scale: float | None = None
) -> torch.Tensor:
    """Attention of one head group under `spec`; k, v are (B, G, S, D) in kernel order, q and the result (B, G, Sq, D):
    the last Sq <= S tokens' queries."""
    if q.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3] or v.shape[:3] != k.shape[:3] or q.shape[2] > k.shape[2]:
        raise ValueError(f"q, k, v must be (B, G, S, D) of one shape (q may hold only the last tokens); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")
    if k.shape[2] != spec.seq_len:
        raise ValueError(f"k has S={k.shape[2]} tokens but the spec was built for {spec.seq_len}; rebuild it for this layout.")
    if cpu_kernel.usable(q, k, v):
        return cpu_kernel.sparse_attention(q, k, v, spec, scale)
    q0 = spec.seq_len - q.shape[2]  # the first query's token
    out = torch.empty_like(q)
    if spec.mode == "blocks":  # text query blocks are dense rows of the block mask
        _blocks(q, k, v, spec, scale, out, q0)
        return out
    a0, a1 = spec.axis_start, spec.axis_end
    for lo, hi in ((max(0, q0), a0), (max(a1, q0), spec.seq_len)):  # text queries see everything
        if hi > lo:
            out[:, :, lo - q0 : hi - q0] = F.scaled_dot_product_attention(q[:, :, lo - q0 : hi - q0], k, v, scale=scale)
    if a1 > max(a0, q0):
        (_stripe if spec.mode == "stripe" else _band)(q, k, v, spec, scale, out, q0)
    return out


def _with_text(x: torch.Tensor, spec: SparseSpec, lo: int, hi: int) -> torch.Tensor:
    """Keys/values [text before, axis tokens lo:hi (absolute), text after]; a view when there is no text."""
    a0, a1, S = spec.axis_start, spec.axis_end, spec.seq_len
    if a0 == 0 and a1 == S:
        return x[:, :, lo:hi]
    return torch.cat([x[:, :, :a0], x[:, :, lo:hi], x[:, :, a1:]], dim=2)


def _stripe(q, k, v, spec, scale, out, q0):
    a0, a1 = spec.axis_start, spec.axis_end
    hi, r0 = a0 + min(spec.radius, a1 - a0), max(a0, q0)
    out[:, :, r0 - q0 : a1 - q0] = F.scaled_dot_product_attention(
        q[:, :, r0 - q0 : a1 - q0], _with_text(k, spec, a0, hi), _with_text(v, spec, a0, hi), scale=scale
    )


def _band_mask(spec: SparseSpec, c0: int, c1: int, k0: int, k1: int, dtype, device) -> torch.Tensor:
    """Additive (c1 - c0, text + k1 - k0) mask for axis queries [c0, c1) over axis keys [k0, k1)."""
    rows = torch.arange(c0, c1)[:, None]
    cols = torch.arange(k0, k1)[None, :]
    allowed = (rows - cols).abs() <= spec.radius
    text = spec.text_before, spec.text_after
    allowed = torch.cat([torch.ones(c1 - c0, text[0], dtype=torch.bool), allowed, torch.ones(c1 - c0, text[1], dtype=torch.bool)], 1)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf")).to(device)


def _band(q, k, v, spec, scale, out, q0):
    a0, n, R = spec.axis_start, spec.axis_end - spec.axis_start, spec.radius
    first = max(0, q0 - a0)  # the first axis query that runs
    differentiable = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    rows = BAND_ROWS
    if q.dtype != torch.float32 and cpu_kernel.amx(q.dtype):
        narrow, wide = BAND_ROWS_NATIVE_16BIT
        rows = wide if R >= WIDE_RADIUS and n >= 2 * R + 2 * wide else narrow
    if q.device.type != "cpu" or differentiable or first > 0 or n < 2 * R + 2 * rows:
        _band_chunked(q, k, v, spec, scale, out, q0, first, n)
        return
    _band_exact(q, k, v, spec, scale, out, q0, rows)


_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # SDPA's CPU kernel, with its log-sum-exp


def _windows(x: torch.Tensor, start: int, count: int, length: int, stride: int) -> torch.Tensor:
    """(B * G, count, length, D) overlapping views of rows start + i * stride ... + length of a contiguous (B, G, S, D)."""
    B, G, S, D = x.shape
    flat = x.view(B * G, S, D)
    return flat.as_strided((B * G, count, length, D), (S * D, stride * D, D, 1), flat.storage_offset() + start * D)


def _merge(pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of disjoint key sets from each set's (out, log-sum-exp): (out, log-sum-exp)."""
    total = torch.stack([lse for _, lse in pieces]).logsumexp(dim=0)
    merged = None
    for o, lse in pieces:
        weight = (lse - total).exp_().unsqueeze(-1).to(o.dtype)
        merged = o * weight if merged is None else merged.addcmul_(o, weight)
    return merged, total


def _band_exact(q, k, v, spec, scale, out, q0, C):
    """Every axis query of a band (2R + 2C <= n axis tokens, all of them run), exactly, in SDPA's CPU kernel:

    - rows [R, n - R), whose keys [r - R, r + R] lie inside the axis, in windows of C rows: window i's keys are the
      2R + C axis keys from its first row - R, an overlapping strided view of K and V (no copy), and the band within
      them is the same (C, 2R + C) mask for every window, so all windows run in one call (plus one for the rows
      left over, a window ending at n - R);
    - rows [0, R) see keys [0, r + R]: keys [0, R) unmasked, keys [R, 2R) causal (`is_causal` skips the upper blocks);
    - rows [n - R, n) see keys [r - R, n): keys [n - R, n) unmasked, keys [n - 2R, n - R) causal on reversed rows;
    - text keys (if any) in one more unmasked call; pieces of one row merge through their log-sum-exps.

    Computed area per row: 2R + C in the windows (the band is 2R + 1), about 1.5R plus SDPA's causal tiles at the
    ends; no gathers, no masks beyond the one shared window mask."""
    B, G, Sq, D = q.shape
    a0, a1, R = spec.axis_start, spec.axis_end, spec.radius
    n, L = a1 - a0, 2 * R + C
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    qa = q[:, :, a0 - q0 : a1 - q0]  # the axis queries (q0 <= a0 here)
    ka, va = k[:, :, a0:a1], v[:, :, a0:a1]
    text = bool(spec.text_before or spec.text_after)
    # without text keys the pieces are final: write them straight into `out` (contiguous, like q) and drop the lse
    o = q.new_empty(B, G, n, D) if text else out[:, :, a0 - q0 : a1 - q0]
    lse = q.new_empty(B, G, n, dtype=torch.float32)
    mask = spec.cached(f"band_window_{C}_{q.dtype}", q.device, lambda: _window_mask(C, R, q.dtype))
    m = (n - 2 * R) // C
    qw = _windows(q, a0 - q0 + R, m, C, C)
    ow, lw = _flash_cpu(qw, _windows(k, a0, m, L, C), _windows(v, a0, m, L, C), attn_mask=mask, scale=scale)[:2]
    o[:, :, R : R + m * C] = ow.view(B, G, m * C, D)
    lse[:, :, R : R + m * C] = lw.reshape(B, G, m * C)
    if R + m * C < n - R:  # the rows left over: one more window, ending at n - R (it recomputes some rows alike)
        s = n - R - C
        o[:, :, s : s + C], lse[:, :, s : s + C] = _flash_cpu(
            qa[:, :, s : s + C], ka[:, :, s - R : s - R + L], va[:, :, s - R : s - R + L], attn_mask=mask, scale=scale
        )[:2]
    if R > 0:
        head = [_flash_cpu(qa[:, :, :R], ka[:, :, :R], va[:, :, :R], scale=scale)[:2],
                _flash_cpu(qa[:, :, :R], ka[:, :, R : 2 * R], va[:, :, R : 2 * R], is_causal=True, scale=scale)[:2]]
        o[:, :, :R], lse[:, :, :R] = _merge(head)
        back = _flash_cpu(qa[:, :, n - R :].flip(2), ka[:, :, n - 2 * R : n - R].flip(2), va[:, :, n - 2 * R : n - R].flip(2),
                          is_causal=True, scale=scale)[:2]
        tail = [_flash_cpu(qa[:, :, n - R :], ka[:, :, n - R :], va[:, :, n - R :], scale=scale)[:2],
                (back[0].flip(2), back[1].flip(2))]
        o[:, :, n - R :], lse[:, :, n - R :] = _merge(tail)
    if text:
        kt, vt = (torch.cat([x[:, :, :a0], x[:, :, a1:]], dim=2) for x in (k, v))
        out[:, :, a0 - q0 : a1 - q0] = _merge([(o, lse), _flash_cpu(qa, kt, vt, scale=scale)[:2]])[0]


def _window_mask(C: int, R: int, dtype) -> torch.Tensor:
    """Additive (C, 2R + C) mask of a band window: row r (token s + r) sees keys s - R + j with |r - (j - R)| <= R."""
    r = torch.arange(C)[:, None]
    j = torch.arange(2 * R + C)[None, :]
    return torch.zeros(C, 2 * R + C, dtype=dtype).masked_fill_((r - j + R).abs() > R, float("-inf"))


def _band_chunked(q, k, v, spec, scale, out, q0, first, end):
    """Axis queries [first, end) in chunks of `band_chunk(radius)` rows, each over its key range with a mask."""
    a0, n, R = spec.axis_start, spec.axis_end - spec.axis_start, spec.radius
    C = min(band_chunk(R), n)
    for c0 in range(first, end, C):  # chunks from the first query on; the interior mask is shift-invariant
        c1 = min(c0 + C, end)
        k0, k1 = max(0, c0 - R), min(n, c1 + R)
        interior = c0 - R >= 0 and c1 + R <= n and c1 - c0 == C
        key = ("band_mask", "interior" if interior else (c0, c1, k0, k1), q.dtype)
        mask = spec.cached(str(key), q.device, lambda: _band_mask(spec, c0, c1, k0, k1, q.dtype, q.device))
        out[:, :, a0 + c0 - q0 : a0 + c1 - q0] = F.scaled_dot_product_attention(
            q[:, :, a0 + c0 - q0 : a0 + c1 - q0],
            _with_text(k, spec, a0 + k0, a0 + k1),
            _with_text(v, spec, a0 + k0, a0 + k1),
            attn_mask=mask,
            scale=scale,
        )


def _blocks(q, k, v, spec, scale, out, q0):
    B, G, Sq, D = q.shape
    S, bs, n = spec.seq_len, spec.block_size, spec.num_blocks
    b0, lead = divmod(q0, bs)  # the first query block that runs, and the rows before q0 in it
    # query blocks whose row is dense for every head (text queries) run one dense call; the rest gather
    dense_rows = spec.cached("dense_rows", q.device, lambda: spec.block_mask.all(dim=-1).all(dim=0))  # (nq,)
    table = spec.cached("sparse_rows_table", q.device, lambda: _sparse_rows_table(spec))  # (G', nq, max_k)
    pad = n * bs - S
    kb = F.pad(k, (0, 0, 0, pad)).view(B, G, n, bs, D)
    vb = F.pad(v, (0, 0, 0, pad)).view(B, G, n, bs, D)
    qb = F.pad(q, (0, 0, lead, pad)).view(B, G, n - b0, bs, D)  # query blocks b0..n-1
    ob = torch.empty_like(qb)
    token_valid = torch.ones(n, bs, dtype=torch.bool, device=q.device)  # the ragged tail's padding is not a key
    if pad:
        token_valid[-1, bs - pad :] = False
    # flat block indices into (B*G*n, bs, D) views: one index_select gathers a batch of query blocks' keys
    idx = table.expand(G, -1, -1).long()  # (G, nq, max_k), -1 = padding slot
    max_k = idx.shape[-1]
    base = (torch.arange(B, device=q.device)[:, None, None, None] * G + torch.arange(G, device=q.device)[None, :, None, None]) * n
    kf, vf = kb.reshape(B * G * n, bs, D), vb.reshape(B * G * n, bs, D)
    sparse_q = torch.nonzero(~dense_rows[b0:]).flatten() + b0
    step = max(2, GATHER_BYTES // (B * G * max_k * bs * D * q.element_size()))
    kbuf = q.new_empty(B * G * min(step, len(sparse_q)) * max_k, bs, D)
    vbuf = torch.empty_like(kbuf)
    for s0 in range(0, len(sparse_q), step):
        qblocks = sparse_q[s0 : s0 + step]
        m = len(qblocks)
        sel = idx[:, qblocks]  # (G, m, max_k)
        safe = sel.clamp(min=0)
        flat = (base + safe[None]).reshape(-1)  # (B * G * m * max_k,)
        kg = torch.index_select(kf, 0, flat, out=kbuf[: len(flat)]).view(B * G * m, 1, max_k * bs, D)
        vg = torch.index_select(vf, 0, flat, out=vbuf[: len(flat)]).view(B * G * m, 1, max_k * bs, D)
        valid = (sel >= 0)[..., None] & token_valid[safe]  # (G, m, max_k, bs)
        mask = None
        if not bool(valid.all()):
            mask = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill_(~valid, float("-inf"))
            mask = mask.view(1, G * m, 1, max_k * bs).expand(B, -1, -1, -1).reshape(B * G * m, 1, 1, max_k * bs)
        qg = qb[:, :, qblocks - b0].reshape(B * G * m, 1, bs, D)
        ob[:, :, qblocks - b0] = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale).view(B, G, m, bs, D)
    if bool(dense_rows[b0:].any()):
        rows = torch.nonzero(dense_rows[b0:]).flatten()
        qd = qb[:, :, rows].reshape(B, G, len(rows) * bs, D)
        ob[:, :, rows] = F.scaled_dot_product_attention(qd, k, v, scale=scale).view(B, G, len(rows), bs, D)
    out.copy_(ob.view(B, G, (n - b0) * bs, D)[:, :, lead : lead + Sq])


def _sparse_rows_table(spec: SparseSpec) -> torch.Tensor:
    """Block table of the query blocks that are not dense rows (-1 padded); dense rows get no entries."""
    mask = spec.block_mask.clone()
    mask[:, mask.all(dim=-1).all(dim=0)] = False
    return block_table(mask)[0]
