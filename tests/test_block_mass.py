"""Block attention mass, the score top-k block selection (SparseD) reads: exact against the full matrix, chunked."""

import torch

from sparsediff.kernels.block_mass import block_attention_mass
from sparsediff.layout import TokenLayout
from sparsediff.patterns import get_pattern


def full_block_mass(q, k, block_size):
    """The reference: the whole S x S softmax, summed per key block and averaged per query block."""
    B, H, S, D = q.shape
    n = -(-S // block_size)
    probs = torch.softmax(q @ k.transpose(-1, -2) * D**-0.5, dim=-1)
    probs = torch.nn.functional.pad(probs, (0, n * block_size - S, 0, n * block_size - S))
    per_key = probs.view(B, H, n * block_size, n, block_size).sum(-1)  # (B, H, S', n)
    counts = torch.full((n,), block_size)
    counts[-1] = S - (n - 1) * block_size
    return (per_key.view(B, H, n, block_size, n).sum(3) / counts[:, None]).mean(0)


def test_every_row_gives_the_exact_block_mass_in_chunks_of_any_size():
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 97, 16, generator=g) for _ in range(2))
    expect = full_block_mass(q, k, 16)
    for max_elements in (1, 2 * 3 * 97 * 5, 1 << 24):  # one row at a time, 5 rows, all at once
        got = block_attention_mass(q, k, 16, rows_per_block=16, max_elements=max_elements)
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)


def test_top_k_selection_from_the_exact_mass_equals_the_reference_selection():
    g = torch.Generator().manual_seed(1)
    layout = TokenLayout.parse("prompt:61+generation:36")
    q, k = (torch.randn(1, 2, layout.num_tokens, 16, generator=g) for _ in range(2))
    pattern = get_pattern("topk_blocks_k0.4")
    got = pattern.block_mask(layout, 16, block_attention_mass(q, k, 16, rows_per_block=16, max_elements=4096))
    expect = pattern.block_mask(layout, 16, full_block_mass(q, k, 16))
    assert torch.equal(got, expect)


def test_the_runtime_selects_top_k_blocks_from_the_calls_exact_attention():
    """By default the runtime scores key blocks with every query row: its selection is the full-matrix one."""
    from sparsediff.runtime import SparseAttention

    g = torch.Generator().manual_seed(2)
    layout = TokenLayout.parse("prompt:61+generation:36")
    q, k, v = (torch.randn(1, 2, layout.num_tokens, 16, generator=g) for _ in range(3))
    names = ["topk_blocks_k0.4_p0.25", "topk_blocks_k0.4_p0.25"]
    _, stats = SparseAttention(backend="torch")(q, k, v, layout, names, block_size=16)
    expect = get_pattern(names[0]).block_mask(layout, 16, full_block_mass(q, k, 16))
    assert torch.equal(stats.groups[0].spec.block_mask, expect)
