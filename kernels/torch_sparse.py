"""Sparse attention in plain torch (CPU, and the fallback anywhere): pattern-specialised calls into fused SDPA.

Each mode avoids materialising S x S masks and gathers K/V only where the pattern is not contiguous:

- `stripe`: the stripe is a contiguous key range, so the axis queries run one SDPA call against
  [text keys, first `radius` axis keys]; no mask at all.
- `band`: the axis queries run in windows of `BAND_ROWS` rows. The band of a window whose keys stay inside the
  sequence splits into three shift-invariant pieces: the middle keys every row of the window sees (no mask) and the
  two edge triangles (a small cached mask each), so every interior window runs in three batched calls of
  `aten::_scaled_dot_product_flash_attention_for_cpu` over overlapping strided views of K and V (no copy, no
  gather) and the pieces are merged through their log-sum-exps. It computes the band at the block granularity of
  `BAND_ROWS` with no mask on the bulk; the windows at the sequence ends, other devices and calls that need
  gradients run the chunked form instead: chunks of `band_chunk(radius)` rows, each over the contiguous key range
  its band touches (plus text keys) with an additive mask for the band's edges.
- `blocks`: per query block, its key blocks are gathered (`index_select` on the block table) and attended in
  batches of query blocks; query blocks whose row is dense (text queries) run one dense call.

Text queries (outside [axis_start, axis_end)) attend every key, in one dense call.

q may hold only the last Sq of the spec's S tokens (a decoder's canvas over a cache plus itself): only those rows
run; in `blocks` mode the first query block they touch is padded at its front (at most `block_size - 1` rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec import SparseSpec, block_table

# Query rows per band chunk: about a third of the radius keeps the (chunk + 2 * radius) key range close to
# the band's own area, bounded so each SDPA call stays large enough to run near peak (chunks of 128-512
# were timed at radii 384, 1024 and 2304 on a 2-core CPU; this rule picked the best or near-best each time).
BAND_CHUNK_MIN, BAND_CHUNK_MAX = 192, 512


def band_chunk(radius: int) -> int:
    return int(min(BAND_CHUNK_MAX, max(BAND_CHUNK_MIN, round(radius / 3 / 64) * 64)))


# Query rows per window of the batched band: the smaller, the less of the edge triangles is computed and masked
# (the band is exact to this many rows), the larger, the faster each window's calls run. Swept at S = 8192, 8 heads
# x 64, float32, radii 384-2304, on one core of a 2-core AMD EPYC (64 / 128 / 256 / 384 rows): 64 was best or within
# the run-to-run noise (+-0.05 efficiency) of the best everywhere.
BAND_ROWS = 64
# Gathered K bytes per batch of query blocks in `blocks` mode: bounds memory at long sequences and keeps
# the gathered blocks in cache while SDPA reads them (measured: 16 MiB is near the best on a 2-core CPU).
GATHER_BYTES = 16 << 20


def torch_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: SparseSpec, scale: float | None = None
) -> torch.Tensor:
    """Attention of one head group under `spec`; k, v are (B, G, S, D) in kernel order, q and the result (B, G, Sq, D):
    the last Sq <= S tokens' queries."""
    if q.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3] or v.shape[:3] != k.shape[:3] or q.shape[2] > k.shape[2]:
        raise ValueError(f"q, k, v must be (B, G, S, D) of one shape (q may hold only the last tokens); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")
    if k.shape[2] != spec.seq_len:
        raise ValueError(f"k has S={k.shape[2]} tokens but the spec was built for {spec.seq_len}; rebuild it for this layout.")
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
    C = BAND_ROWS
    lo, hi = max(-(-first // C), -(-R // C)), (n - R - C) // C + 1  # interior windows: keys inside the axis
    differentiable = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if q.device.type != "cpu" or differentiable or 2 * R < C or hi - lo < 2:
        _band_chunked(q, k, v, spec, scale, out, q0, first, n)
        return
    _band_windows(q, k, v, spec, scale, out, q0, C, lo, hi)
    if lo * C > first:
        _band_chunked(q, k, v, spec, scale, out, q0, first, lo * C)
    if hi * C < n:
        _band_chunked(q, k, v, spec, scale, out, q0, hi * C, n)


_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # SDPA's CPU kernel, with its log-sum-exp


def _windows(x: torch.Tensor, start: int, count: int, length: int, stride: int) -> torch.Tensor:
    """(B * G, count, length, D) overlapping views of rows start + i * stride ... + length of a contiguous (B, G, S, D)."""
    B, G, S, D = x.shape
    flat = x.view(B * G, S, D)
    return flat.as_strided((B * G, count, length, D), (S * D, stride * D, D, 1), flat.storage_offset() + start * D)


def _band_windows(q, k, v, spec, scale, out, q0, C, lo, hi):
    """Axis queries [lo * C, hi * C) (windows of C rows whose band keys are all axis keys): middle keys without a
    mask, the two edge triangles with one, text keys in a fourth piece, merged by their log-sum-exps."""
    B, G, Sq, D = q.shape
    a0, a1, R = spec.axis_start, spec.axis_end, spec.radius
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    m = hi - lo
    start = a0 + lo * C  # the first query's token
    qw = q.view(B * G, Sq, D)[:, start - q0 : start - q0 + m * C].view(B * G, m, C, D)
    left, right = spec.cached(f"band_triangles_{C}_{q.dtype}", q.device, lambda: _triangles(C, q.dtype))
    pieces = [  # each (out (BG, m, C, D), lse (BG, m, C)); window i: rows [s, s + C) with s = start + i * C
        _flash_cpu(qw, _windows(k, start - R, m, C, C), _windows(v, start - R, m, C, C), attn_mask=left, scale=scale),
        _flash_cpu(qw, _windows(k, start + R, m, C, C), _windows(v, start + R, m, C, C), attn_mask=right, scale=scale),
    ]
    if 2 * R > C:  # keys [s + C - R, s + R) are within R of every row of the window
        pieces.append(_flash_cpu(qw, _windows(k, start + C - R, m, 2 * R - C, C), _windows(v, start + C - R, m, 2 * R - C, C), scale=scale))
    if spec.text_before or spec.text_after:
        kt, vt = (torch.cat([x[:, :, :a0], x[:, :, a1:]], dim=2) for x in (k, v))
        o, lse = _flash_cpu(qw.reshape(B, G, m * C, D), kt, vt, scale=scale)
        pieces.append((o.reshape(B * G, m, C, D), lse.reshape(B * G, m, C)))
    total = torch.stack([lse for _, lse in pieces]).logsumexp(dim=0)
    merged = None
    for o, lse in pieces:
        weight = (lse - total).exp_().unsqueeze(-1).to(o.dtype)
        merged = o * weight if merged is None else merged.addcmul_(o, weight)
    out[:, :, start - q0 : start - q0 + m * C] = merged.view(B, G, m * C, D)


def _triangles(C: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive (C, C) masks of a window's edge keys: the left edge (keys s - R + j) is seen by rows r <= j, the
    right edge (keys s + R + j) by rows r >= j."""
    r = torch.arange(C)
    left = torch.zeros(C, C, dtype=dtype).masked_fill_(r[None, :] < r[:, None], float("-inf"))
    right = torch.zeros(C, C, dtype=dtype).masked_fill_(r[None, :] > r[:, None], float("-inf"))
    return left, right


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
