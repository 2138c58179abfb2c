import pytest
import torch

from sparsediff.layout import Segment, TokenLayout, axis, generation, prompt, text, video


@pytest.mark.parametrize(
    "spec",
    [
        "text:226+video:13x30x45",
        "video:8x32x32",
        "video:3x4x5+text:7",
        "prompt:512+generation:256",
        "generation:9",
        "text:1",
        "axis:17x512",
        "axis:17x512:position",
        "text:7+axis:4x13:position+text:2",
        "axis:1x1",
    ],
)
def test_string_form_round_trips(spec):
    layout = TokenLayout.parse(spec)
    assert str(layout) == spec
    assert TokenLayout.parse(str(layout)) == layout


def test_frame_order_suffix_is_the_default():
    layout = TokenLayout.parse("axis:17x512:frame")
    assert layout == TokenLayout.parse("axis:17x512") and str(layout) == "axis:17x512"
    assert TokenLayout.parse("axis:17x512:position") != layout


def test_constructors_match_parse():
    assert TokenLayout((text(4), video(2, 3, 3))) == TokenLayout.parse("text:4+video:2x3x3")
    assert TokenLayout((prompt(5), generation(3))).num_tokens == 8
    assert TokenLayout((axis(17, 512),)) == TokenLayout.parse("axis:17x512")
    assert TokenLayout((text(3), axis(17, 512, "position"))) == TokenLayout.parse("text:3+axis:17x512:position")
    assert axis(2, 3) == Segment("axis", (2, 3), "frame")


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
        ("axis:17", "axis:TxN"),
        ("axis:17x512x3", "needs 2 size"),
        ("axis:0x512", "positive integer"),
        ("axis:17x512:spatial", "token order 'spatial'; expected 'frame'"),
        ("axis:17x512:", "token order ''"),
        ("video:2x2x2:position", "only axis segments take a token order"),
        ("text:4:position", "only axis segments take a token order"),
        ("axis:2x4+axis:2x4", "2 axis segments; at most one"),
        ("video:2x2x2+axis:2x4", "mixes video with axis"),
        ("axis:2x4+generation:3", "mixes axis with prompt/generation"),
        ("prompt:3+axis:2x4:position", "mixes axis with prompt/generation"),
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


@pytest.mark.parametrize("spec", ["text:3+axis:4x5+text:2", "text:3+axis:4x5:position+text:2", "axis:1x6:position"])
def test_locate_and_index_are_inverse_on_axis_segments(spec):
    layout = TokenLayout.parse(spec)
    segment = next(i for i, s in enumerate(layout.segments) if s.kind == "axis")
    frames, positions = layout.segments[segment].shape
    coordinates = {(f, p): layout.index(segment, f, p) for f in range(frames) for p in range(positions)}
    assert sorted(coordinates.values()) == list(range(*layout.axis_range))  # a bijection onto the axis tokens
    for (f, p), i in coordinates.items():
        assert layout.locate(i) == ("axis", f, p, 0)
    with pytest.raises(IndexError):
        layout.index(segment, frames, 0)
    with pytest.raises(IndexError):
        layout.index(segment, 0, positions)


def test_axis_token_order_follows_the_segment_order():
    frame_major = TokenLayout.parse("text:3+axis:4x5")
    position_major = TokenLayout.parse("text:3+axis:4x5:position")
    assert frame_major.locate(3 + 1) == ("axis", 0, 1, 0)  # the next position of frame 0
    assert position_major.locate(3 + 1) == ("axis", 1, 0, 0)  # the next frame of position 0
    assert position_major.index(1, 2, 3) == 3 + 3 * 4 + 2
    for layout in (frame_major, position_major):
        assert layout.frames == 4 and layout.tokens_per_frame == 5 and layout.num_axis_tokens == 20
        assert not layout.has_video and layout.axis_range == (3, 23)
    assert frame_major.is_frame_major and not frame_major.is_position_major
    assert position_major.is_position_major and not position_major.is_frame_major


def test_axis_and_frames():
    layout = TokenLayout.parse("text:5+video:3x4x6")
    assert layout.frames == 3 and layout.tokens_per_frame == 24 and layout.num_axis_tokens == 72
    assert layout.axis_index[:5].tolist() == [-1] * 5
    assert layout.axis_index[5:].tolist() == list(range(72))
    dlm = TokenLayout.parse("prompt:10+generation:6")
    assert dlm.frames == 16 and dlm.tokens_per_frame == 1
    assert dlm.is_generation.sum() == 6
    assert dlm.is_frame_major and dlm.is_position_major  # a 1-D axis is both


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


@pytest.mark.parametrize(
    "frame_spec, position_spec",
    [("text:2+axis:3x4+text:1", "text:2+axis:3x4:position+text:1"), ("axis:5x7", "axis:5x7:position")],
)
def test_orders_map_between_frame_major_and_position_major_storage(frame_spec, position_spec):
    """Place i of one storage order holds the token that the other storage keeps at `order[i]`."""
    by_frame, by_position = TokenLayout.parse(frame_spec), TokenLayout.parse(position_spec)
    S = by_frame.num_tokens
    to_frame_major, to_position_major = by_position.frame_major_order, by_frame.position_major_order
    for i in range(S):
        assert by_position.locate(int(to_frame_major[i])) == by_frame.locate(i)
        assert by_frame.locate(int(to_position_major[i])) == by_position.locate(i)
    # a layout's own order is the identity; text stays in place in every order
    assert torch.equal(by_frame.frame_major_order, torch.arange(S))
    assert torch.equal(by_position.position_major_order, torch.arange(S))
    text_tokens = torch.nonzero(by_frame.is_text).flatten()
    for order in (to_frame_major, to_position_major):
        assert torch.equal(order[text_tokens], text_tokens)
        assert torch.equal(order.sort().values, torch.arange(S))


@pytest.mark.parametrize("spec", ["prompt:5+generation:3", "axis:6x1:position", "axis:1x6:position", "video:1x2x3"])
def test_a_1d_axis_or_single_frame_is_in_both_orders(spec):
    layout = TokenLayout.parse(spec)
    assert layout.is_frame_major and layout.is_position_major
    assert torch.equal(layout.frame_major_order, torch.arange(layout.num_tokens))
    assert torch.equal(layout.position_major_order, torch.arange(layout.num_tokens))


def test_token_major_order_is_the_position_major_order():
    layout = TokenLayout.parse("text:2+video:3x2x2")
    assert torch.equal(layout.token_major_order, layout.position_major_order)


def test_text_only_before_or_after_the_axis():
    with pytest.raises(ValueError, match="text between"):
        TokenLayout.parse("prompt:4+text:3+generation:4")
    assert TokenLayout.parse("text:3+video:2x2x2+text:1").axis_range == (3, 11)
