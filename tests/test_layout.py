import pytest
import torch

from sparsediff.layout import TokenLayout, generation, prompt, text, video


@pytest.mark.parametrize(
    "spec", ["text:226+video:13x30x45", "video:8x32x32", "video:3x4x5+text:7", "prompt:512+generation:256", "text:1"]
)
def test_string_form_round_trips(spec):
    layout = TokenLayout.parse(spec)
    assert str(layout) == spec
    assert TokenLayout.parse(str(layout)) == layout


def test_constructors_match_parse():
    assert TokenLayout((text(4), video(2, 3, 3))) == TokenLayout.parse("text:4+video:2x3x3")
    assert TokenLayout((prompt(5), generation(3))).num_tokens == 8


@pytest.mark.parametrize(
    "spec, words",
    [
        ("video:0x4x4", "positive integer"),
        ("video:4x-1x4", "positive integer"),
        ("audio:16", "audio"),
        ("video:4x4", "needs 3 size"),
        ("video:axbxc", "non-integer"),
        ("", "empty"),
        ("video:2x2x2+video:2x2x2", "at most one"),
        ("prompt:4+video:2x2x2", "mixes video"),
        ("text226", "KIND:SIZES"),
    ],
)
def test_bad_layouts_raise_clear_errors(spec, words):
    with pytest.raises(ValueError, match=words):
        TokenLayout.parse(spec)


def test_locate_and_index_are_inverse_on_text_plus_video():
    layout = TokenLayout.parse("text:5+video:3x4x6+text:2")
    seen = set()
    for i in range(layout.num_tokens):
        kind, f, r, c = layout.locate(i)
        seg = [s.kind for s in layout.segments].index(kind) if kind == "video" else (0 if i < 5 else 2)
        assert layout.index(seg, f, r, c) == i
        seen.add((kind, f, r, c, seg))
    assert len(seen) == layout.num_tokens
    assert layout.locate(5) == ("video", 0, 0, 0)
    assert layout.locate(5 + 24 + 6 + 1) == ("video", 1, 1, 1)
    assert layout.locate(layout.num_tokens - 1) == ("text", 1, 0, 0)
    with pytest.raises(IndexError):
        layout.locate(layout.num_tokens)


def test_axis_and_frames():
    layout = TokenLayout.parse("text:5+video:3x4x6")
    assert layout.frames == 3 and layout.tokens_per_frame == 24 and layout.num_axis_tokens == 72
    assert layout.axis_index[:5].tolist() == [-1] * 5
    assert layout.axis_index[5:].tolist() == list(range(72))
    dlm = TokenLayout.parse("prompt:10+generation:6")
    assert dlm.frames == 16 and dlm.tokens_per_frame == 1
    assert dlm.is_generation.sum() == 6


def test_blocks_have_a_ragged_tail():
    layout = TokenLayout.parse("video:97x1x1")
    assert layout.num_blocks(32) == 4
    assert layout.block_lengths(32).tolist() == [32, 32, 32, 1]
    with pytest.raises(ValueError, match="block_size"):
        layout.num_blocks(0)


def test_token_major_order_puts_same_position_of_each_frame_together():
    layout = TokenLayout.parse("text:2+video:3x2x2")
    order = layout.token_major_order
    # text stays in place; then spatial 0 of frames 0,1,2, spatial 1 of frames 0,1,2, ...
    assert order.tolist() == [0, 1, 2, 6, 10, 3, 7, 11, 4, 8, 12, 5, 9, 13]
    assert torch.equal(order[order.argsort()], torch.arange(layout.num_tokens))


def test_text_only_before_or_after_the_axis():
    with pytest.raises(ValueError, match="text between"):
        TokenLayout.parse("prompt:4+text:3+generation:4")
    assert TokenLayout.parse("text:3+video:2x2x2+text:1").axis_range == (3, 11)
