import math

import pytest
import torch

from sparsediff.layout import TokenLayout
from sparsediff.patterns import PATTERNS, Pattern, get_pattern, topk_block_mask
from sparsediff.runtime import build_spec

EXAMPLES = [
    "full",
    "skip",
    "diagonal_w0.5",
    "diagonal_w1",
    "multi_diagonal_w0",
    "multi_diagonal_w1.5",
    "vertical_stripe_f1",
    "vertical_stripe_f0.3",
    "topk_blocks_k0.25",
    "topk_blocks_k0.6",
]


def scores_for(layout, block_size, seed=0):
    n = layout.num_blocks(block_size)
    return torch.rand((n, n), generator=torch.Generator().manual_seed(seed))


def reduce_per_block(mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """The definition of a block mask, written the slow way: any allowed pair in the tile."""
    S = mask.shape[0]
    n = -(-S // block_size)
    out = torch.zeros((n, n), dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            out[i, j] = mask[i * block_size : (i + 1) * block_size, j * block_size : (j + 1) * block_size].any()
    return out


def test_every_registered_pattern_has_an_example():
    assert {get_pattern(n).kind for n in EXAMPLES} == set(PATTERNS)


@pytest.mark.parametrize("name", EXAMPLES)
@pytest.mark.parametrize("block_size", [16, 32, 48])
def test_block_mask_is_token_mask_reduced_per_block(ragged_layout, name, block_size):
    pattern = get_pattern(name)
    scores = scores_for(ragged_layout, block_size) if pattern.needs_scores else None
    token = pattern.kernel_token_mask(ragged_layout, block_size, scores)
    block = pattern.block_mask(ragged_layout, block_size, scores)
    assert token.shape == (ragged_layout.num_tokens,) * 2
    assert torch.equal(block, reduce_per_block(token, block_size))
    # density: the area of computed blocks, counted directly
    S = ragged_layout.num_tokens
    covered = sum(
        min(block_size, S - i * block_size) * min(block_size, S - j * block_size)
        for i, j in block.nonzero().tolist()
    )
    assert math.isclose(pattern.density(ragged_layout, block_size, scores), covered / S**2, rel_tol=1e-12)


def test_block_mask_chunking_matches_on_a_long_layout(monkeypatch):
    import sparsediff.patterns as patterns

    layout = TokenLayout.parse("text:13+video:6x9x10")
    whole = get_pattern("multi_diagonal_w1").block_mask(layout, 32)
    monkeypatch.setattr(patterns, "_ROW_CHUNK_ELEMENTS", 1)  # one block row at a time
    assert torch.equal(get_pattern("multi_diagonal_w1").block_mask(layout, 32), whole)


def test_text_is_always_attended():
    layout = TokenLayout.parse("text:5+video:4x4x4+text:3")
    text = layout.is_text
    for name in ["diagonal_w0.5", "multi_diagonal_w0", "vertical_stripe_f0.5", "topk_blocks_k0.1"]:
        p = get_pattern(name)
        m = p.token_mask(layout, 8, scores_for(layout, 8) if p.needs_scores else None)
        assert m[text].all() and m[:, text].all(), name
        assert not m.all(), name


def test_diagonal_is_a_band_in_frame_major_order():
    layout = TokenLayout.parse("video:4x3x3")
    m = get_pattern("diagonal_w1").token_mask(layout)
    i, j = torch.meshgrid(torch.arange(36), torch.arange(36), indexing="ij")
    assert torch.equal(m, (i - j).abs() <= 9)


def test_multi_diagonal_sees_same_position_in_every_frame():
    layout = TokenLayout.parse("video:5x4x4")
    m = get_pattern("multi_diagonal_w1").token_mask(layout)
    q = layout.index(0, 2, 1, 3)
    for f in range(5):
        assert m[q, layout.index(0, f, 1, 3)]
    assert not m[q, layout.index(0, 2, 3, 0)]  # far away in the same frame


def test_vertical_stripe_keeps_first_frames():
    layout = TokenLayout.parse("video:4x2x5")
    m = get_pattern("vertical_stripe_f1.5").token_mask(layout)
    assert torch.equal(m, torch.arange(40)[None, :].expand(40, -1) < 15)


@pytest.mark.parametrize("name", ["diagonal_w1", "diagonal_w0.4", "multi_diagonal_w1", "vertical_stripe_f1.5"])
def test_axis_patterns_mean_the_same_in_either_storage_order(name):
    """The same (query, key) pairs, by (frame, position), whether the latent sets are stored frame-major or
    position-major: map the position-major tokens to frame-major places and compare."""
    by_frame = TokenLayout.parse("text:3+axis:4x6+text:2")
    by_position = TokenLayout.parse("text:3+axis:4x6:position+text:2")
    pattern = get_pattern(name)
    to_frame_major = by_position.frame_major_order
    expect = pattern.token_mask(by_frame)
    assert torch.equal(pattern.token_mask(by_position)[to_frame_major][:, to_frame_major], expect)
    assert not expect.all()


def test_patterns_reorder_only_when_the_storage_order_differs():
    by_frame, by_position = TokenLayout.parse("axis:4x6"), TokenLayout.parse("text:2+axis:4x6:position")
    diagonal, multi, stripe = (get_pattern(n) for n in ["diagonal_w1", "multi_diagonal_w1", "vertical_stripe_f1"])
    assert multi.order(by_position) is None  # already a band in position-major order
    assert torch.equal(multi.order(by_frame), by_frame.position_major_order)
    assert diagonal.order(by_frame) is None and stripe.order(by_frame) is None
    assert torch.equal(diagonal.order(by_position), by_position.frame_major_order)
    assert torch.equal(stripe.order(by_position), by_position.frame_major_order)
    for one_d in ("prompt:6+generation:4", "axis:9x1:position", "video:1x3x3"):
        layout = TokenLayout.parse(one_d)
        assert all(p.order(layout) is None for p in (diagonal, multi, stripe)), one_d


def test_multi_diagonal_on_position_major_latent_sets():
    layout = TokenLayout.parse("axis:5x8:position")
    m = get_pattern("multi_diagonal_w1").token_mask(layout)
    i, j = torch.meshgrid(torch.arange(40), torch.arange(40), indexing="ij")
    assert torch.equal(m, (i - j).abs() <= 5)  # a band of one position's worth of frames, no reorder
    q = layout.index(0, 2, 3)
    assert all(m[q, layout.index(0, f, 3)] for f in range(5))  # the same position in every frame
    assert not m[q, layout.index(0, 2, 6)]  # far away in the same frame


def test_vertical_stripe_on_position_major_keeps_first_frames():
    layout = TokenLayout.parse("text:2+axis:4x5:position")
    m = get_pattern("vertical_stripe_f2").token_mask(layout)
    coordinates = map(layout.locate, range(layout.num_tokens))
    first_frames = torch.tensor([kind == "text" or f < 2 for kind, f, _, _ in coordinates])
    assert torch.equal(m, first_frames[None, :].expand(layout.num_tokens, -1) | layout.is_text[:, None])


@pytest.mark.parametrize("name", ["diagonal_w1", "diagonal_w0.3", "multi_diagonal_w1", "vertical_stripe_f1"])
def test_kernel_spec_rule_is_the_kernel_order_token_mask(ragged_layout, name):
    """What kernels are told (band or stripe on axis places, in kernel order) is the pattern's token mask."""
    pattern = get_pattern(name)
    spec = build_spec(pattern, ragged_layout, 16)
    idx = torch.arange(ragged_layout.num_tokens)
    assert torch.equal(spec.token_allowed(idx, idx), pattern.kernel_token_mask(ragged_layout))


def test_topk_selects_prompt_and_generation_separately():
    layout = TokenLayout.parse("prompt:64+generation:32")
    block_size = 16  # 4 prompt blocks, 2 generation blocks
    scores = torch.zeros(6, 6)
    scores[:, :4] = 10.0  # prompt keys dominate the raw scores
    scores[:, 5] = 1.0
    m = topk_block_mask(scores, layout, block_size, keep=0.25)
    # each group keeps ceil(0.25 * n) of its own blocks: 1 prompt block + 1 generation block per query block
    assert m[:, :4].sum(dim=1).tolist() == [1] * 6
    assert m[:, 4:].sum(dim=1).tolist() == [1] * 6
    assert m[:, 5].all()  # the higher-scored generation block wins
    batched = topk_block_mask(torch.stack([scores, -scores]), layout, block_size, keep=0.5)
    assert batched.shape == (2, 6, 6) and torch.equal(batched[0], topk_block_mask(scores, layout, block_size, 0.5))


def test_density_is_near_the_parameter_on_a_long_video():
    layout = TokenLayout.parse("video:8x32x32")
    assert abs(get_pattern("diagonal_w1").density(layout, 64) - 0.25) < 0.03
    assert abs(get_pattern("vertical_stripe_f2").density(layout, 64) - 0.25) < 1e-9
    assert abs(get_pattern("topk_blocks_k0.25").estimated_density(layout, 64) - 0.25) < 1e-9
    assert get_pattern("full").density(layout, 64) == 1.0 and get_pattern("skip").density(layout, 64) == 0.0


@pytest.mark.parametrize("name", EXAMPLES)
def test_names_round_trip(name):
    p = get_pattern(name)
    assert get_pattern(p.name) == p
    assert isinstance(p, Pattern)


@pytest.mark.parametrize(
    "name, words",
    [
        ("diagonal_w-1", "w=-1.0"),
        ("topk_blocks_k0", "keep=0.0"),
        ("topk_blocks_k1.5", "keep=1.5"),
        ("vertical_stripe_f0", "f=0.0"),
        ("diagonal_x2", "bad parameter 'x2'"),
        ("circle_r3", "Unknown pattern 'circle_r3'"),
    ],
)
def test_bad_pattern_names_raise_clear_errors(name, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        get_pattern(name)


def test_topk_scores_of_wrong_shape_are_refused():
    layout = TokenLayout.parse("video:4x4x4")
    with pytest.raises(ValueError, match="profile with the same layout"):
        get_pattern("topk_blocks_k0.5").block_mask(layout, 16, torch.rand(3, 3))


@pytest.mark.parametrize("name", EXAMPLES)
def test_kernel_order_mask_is_the_token_mask_reordered(ragged_layout, name):
    pattern = get_pattern(name)
    scores = scores_for(ragged_layout, 16) if pattern.needs_scores else None
    order = pattern.order(ragged_layout)
    kernel = pattern.kernel_token_mask(ragged_layout, 16, scores)
    original = pattern.token_mask(ragged_layout, 16, scores)
    if order is None:
        assert torch.equal(kernel, original)
    else:
        assert torch.equal(kernel, original[order][:, order])


@pytest.mark.parametrize("name", ["diagonal_w1", "multi_diagonal_w1", "vertical_stripe_f1"])
def test_analytic_block_masks_match_the_generic_reduction(ragged_layout, name):
    pattern = get_pattern(name)
    for block_size in (16, 48):
        generic = Pattern.block_mask(pattern, ragged_layout, block_size)  # chunked token-mask reduction
        assert torch.equal(pattern.block_mask(ragged_layout, block_size), generic)


@pytest.mark.parametrize(
    "name, words",
    [
        ("diagonal_w1_w2", "gives parameter 'w' twice; give each parameter once, e.g. diagonal_w2"),
        ("diagonal_w1_w1", "gives parameter 'w' twice"),
        ("topk_blocks_k0.5_k0.25", "gives parameter 'k' twice"),
        ("multi_diagonal_w2_w1", "gives parameter 'w' twice"),
        ("diagonal_", "has an empty parameter (a stray '_')"),
        ("diagonal__w1", "has an empty parameter (a stray '_'); diagonal takes w<number> (w), joined by single underscores as in 'diagonal_w1'"),
        ("diagonal_w1_", "has an empty parameter"),
        ("skip_", "has an empty parameter (a stray '_'); skip takes no parameters"),
        ("diagonal_w", "has a bad parameter 'w'"),
        ("diagonal_wnan", "has a bad parameter 'wnan'"),
        ("diagonal_k1", "has a bad parameter 'k1'; diagonal takes w<number> (w)"),
        ("Diagonal_w1", "Unknown pattern 'Diagonal_w1'"),
        ("diagonal_w1e999", "w=inf"),
    ],
)
def test_malformed_names_are_refused_naming_the_part(name, words):
    import re

    with pytest.raises(ValueError, match=re.escape(words)) as info:
        get_pattern(name)
    assert repr(name) in str(info.value) or "w=inf" in words


def test_topk_blocks_keeps_its_own_share_of_prompt_and_generation_keys():
    """SparseD selects prompt and generation key blocks separately; `p` gives the prompt keys their own share."""
    layout = TokenLayout.parse("prompt:64+generation:32")  # 8 prompt blocks, 4 generation blocks of 8
    scores = torch.rand(12, 12, generator=torch.Generator().manual_seed(0))
    same = get_pattern("topk_blocks_k0.5")
    split = get_pattern("topk_blocks_k0.5_p0.25")
    assert split.name == "topk_blocks_k0.5_p0.25" and get_pattern(split.name) == split and same.prompt_keep is None
    for pattern, prompt_kept in ((same, 4), (split, 2)):
        mask = pattern.block_mask(layout, 8, scores)
        assert (mask[:, :8].sum(dim=1) == prompt_kept).all() and (mask[:, 8:].sum(dim=1) == 2).all()
        top = scores[:, :8].topk(prompt_kept, dim=1).indices  # the highest-scoring prompt blocks, per query block
        assert mask[:, :8].gather(1, top).all()
    with pytest.raises(ValueError, match="prompt_keep"):
        get_pattern("topk_blocks_k0.5_p0")
