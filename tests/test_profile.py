"""profile(): documented shapes, errors against full attention, the directory format, the CLI and `show`."""

import json

import pytest
import torch
from PIL import Image

import pipeline_factories
import sparsediff
from sparsediff.cli import main
from sparsediff.layout import TokenLayout
from sparsediff.search.profile import AttentionProfile, ProfileRecorder, candidate_errors, relative_l2_error

CANDIDATES = ["full", "skip", "diagonal_w1", "multi_diagonal_w4", "topk_blocks_k0.25"]


@pytest.fixture(scope="module")
def wan():
    return pipeline_factories.make("wan")


def test_profile_pipeline_shapes_errors_and_exactness(wan, tmp_path):
    pipe, call_kwargs = wan
    reference = pipe(**call_kwargs()).frames
    before = [m.processor for m in pipe.transformer.modules() if hasattr(m, "processor")]
    prof = sparsediff.profile(pipe, [call_kwargs(), call_kwargs()], candidates=CANDIDATES, block_size=8, progress=False, out=tmp_path / "p")
    T, L, H, C = 3, 2, 2, len(CANDIDATES)
    nb = TokenLayout.parse("video:3x4x4").num_blocks(8)
    assert str(prof.layout) == "video:3x4x4" and prof.steps == [0, 1, 2] and prof.layers == [0, 1] and prof.num_steps == 3
    assert prof.mass.shape == (T, L, H, nb, nb) and prof.errors.shape == (T, L, H, C) and prof.calls.shape == (T, L)
    assert (prof.calls == 4).all()  # 2 prompts x (cond, uncond)
    torch.testing.assert_close(prof.mass.sum(-1), torch.ones(T, L, H, nb))  # each query block's mass sums to 1
    assert (prof.errors[..., 0] == 0).all()  # full
    torch.testing.assert_close(prof.errors[..., 1], torch.ones(T, L, H))  # skip: zero output
    assert ((prof.errors[..., 2:] > 0) & (prof.errors[..., 2:] < 2)).all()
    # the model ran dense and got its processors back
    assert torch.equal(pipe(**call_kwargs()).frames, reference)
    assert all(a is b for a, b in zip([m.processor for m in pipe.transformer.modules() if hasattr(m, "processor")], before))
    loaded = AttentionProfile.load(tmp_path / "p")
    assert loaded.metadata() == prof.metadata()
    assert torch.equal(loaded.mass, prof.mass) and torch.equal(loaded.errors, prof.errors) and torch.equal(loaded.calls, prof.calls)
    assert json.loads((tmp_path / "p" / "profile.json").read_text())["candidates"] == CANDIDATES


def test_profile_joint_text_with_padding_and_chosen_steps_layers():
    pipe, call_kwargs = pipeline_factories.make("hunyuan_video")
    prof = sparsediff.profile(pipe, call_kwargs(), candidates=["full", "diagonal_w1"], steps=[1, 2], layers=[1], block_size=8, progress=False)
    assert str(prof.layout) == "video:3x4x4+text:9"  # the cond call's valid text, after the video
    assert prof.steps == [1, 2] and prof.layers == [1] and (prof.calls == 2).all()
    assert prof.errors.shape == (2, 1, 2, 2) and (prof.errors[..., 0] == 0).all()


def test_candidate_errors_match_a_direct_computation():
    torch.manual_seed(0)
    layout = TokenLayout.parse("text:5+video:3x4x4")
    q, k, v = (torch.randn(2, 3, layout.num_tokens, 8) for _ in range(3))
    errors = candidate_errors(q, k, v, layout, ["full", "diagonal_w1"], block_size=8, backend="reference")
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    from sparsediff.kernels.reference import reference_attention

    mask = sparsediff.get_pattern("diagonal_w1").token_mask(layout)
    sparse = reference_attention(q, k, v, mask.expand(3, -1, -1))
    expect = ((sparse - full).pow(2).sum(dim=(0, 2, 3)) / full.pow(2).sum(dim=(0, 2, 3))).sqrt()
    torch.testing.assert_close(errors[:, 1], expect, atol=1e-5, rtol=1e-4)
    assert (errors[:, 0] == 0).all()
    assert torch.equal(relative_l2_error(full, full), torch.zeros(3))


def test_mass_blocks_are_capped_and_empty_profiles_refused():
    layout = TokenLayout.parse("video:4x8x8")  # 256 tokens = 32 blocks of 8
    recorder = ProfileRecorder(num_heads=2, candidates=["full"], block_size=8, max_mass_blocks=10, backend="reference")
    with pytest.raises(ValueError, match="no attention call was observed"):
        recorder.result(sparsediff.ModelFingerprint("M", 1, 2, 8, "h"))
    q = torch.randn(1, 2, 256, 8)
    recorder.observe(step=0, num_steps=1, layer=0, query=q, key=q, value=q, layout=layout)
    prof = recorder.result(sparsediff.ModelFingerprint("M", 1, 2, 8, "h"))
    assert prof.mass_block_size == 32 and prof.mass.shape[-2:] == (8, 8)


def test_cli_profile_and_show(tmp_path, capsys):
    pipe, _ = pipeline_factories.wan_with_text_encoder()
    pipe.save_pretrained(tmp_path / "wan-tiny")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red panda climbs\n\na cat walks on grass\n")
    out = tmp_path / "profile"
    args = ["profile", "--model", str(tmp_path / "wan-tiny"), "--prompts", str(prompts), "--steps", "2", "--height", "64",
            "--width", "64", "--frames", "9", "--out", str(out), "--candidates", "full,skip,diagonal_w1", "--block-size", "8", "--json"]
    assert main(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["prompts"] == 2 and info["layout"] == "video:3x4x4"
    assert info["mass_shape"] == [2, 2, 2, 6, 6] and info["errors_shape"] == [2, 2, 2, 3]
    assert info["mean_errors"]["full"] == 0.0 and info["mean_errors"]["skip"] == 1.0
    png = tmp_path / "maps.png"
    assert main(["show", str(out), "--out", str(png), "--layers", "1", "--steps", "0,1", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    loaded = AttentionProfile.load(out)
    assert info["concentration"] == shown["concentration"] == loaded.concentration_summary()
    assert list(shown["concentration"]["by_layer"]) == ["0", "1"] and shown["concentration"]["heads"] == 4
    assert Image.open(png).size[1] > 100 and Image.open(shown["errors_out"]).size[0] > 100
    assert Image.open(shown["preferred_out"]).size[0] > 100
    assert main(["show", str(out), "--out", str(png), "--layers", "7"]) == 2
    assert "no layers [7]; it recorded layers [0, 1]" in capsys.readouterr().err


def test_head_preferences_pick_the_cheapest_pattern_within_the_tolerance():
    from sparsediff.render import head_preferences

    class Profile:  # what head_preferences reads: candidates, layout, block size and errors (T, L, H, C)
        candidates = ["full", "skip", "diagonal_w1", "diagonal_w0.25"]
        layout = TokenLayout.parse("video:4x8x8")
        block_size = 8
        errors = torch.tensor([[[[0.0, 1.0, 0.05, 0.08], [0.0, 1.0, 0.3, 0.5], [0.0, 0.02, 0.01, 0.01]]]])

    chosen = head_preferences(Profile(), tolerance=0.1)
    # head 0: the narrower diagonal fits; head 1: nothing sparse fits, so full; head 2: skip is cheapest of all
    assert chosen.tolist() == [[[3, 0, 1]]]
    assert head_preferences(Profile(), tolerance=0.06).tolist() == [[[2, 0, 1]]]


def test_cli_profile_model_errors(tmp_path, capsys):
    assert main(["profile", "--model", str(tmp_path), "--out", str(tmp_path / "p")]) == 2
    assert "not a saved diffusers pipeline" in capsys.readouterr().err


def _profile_with_mass(mass: torch.Tensor) -> AttentionProfile:
    T, L, H, n, _ = mass.shape
    layout = TokenLayout.parse(f"video:1x1x{n * 8}")
    return AttentionProfile(sparsediff.ModelFingerprint("M", L, H, 8, "h"), layout, 8, 8, 4, steps=list(range(T)),
                            num_steps=T, layers=list(range(L)), candidates=["full"], mass=mass,
                            errors=torch.zeros(T, L, H, 1), calls=torch.ones(T, L, dtype=torch.long))


def test_concentration_reads_even_spread_as_the_share_and_one_block_as_one():
    n = 20  # the 10% most attended key blocks: 2 of 20
    mass = torch.full((2, 2, 3, n, n), 1.0 / n)  # every head even ...
    mass[:, 0, 1] = torch.eye(n)  # ... but layer 0 head 1 puts each query block's mass on one key block
    mass[:, 1, 2] = 0.0
    mass[:, 1, 2, :, :4] = 0.25  # and layer 1 head 2 on 4 key blocks: its top 2 hold half
    prof = _profile_with_mass(mass)
    c = prof.concentration(0.1)
    assert c.shape == (2, 2, 3)
    torch.testing.assert_close(c[:, 0, 0], torch.full((2,), 0.1))
    torch.testing.assert_close(c[:, 0, 1], torch.ones(2))
    torch.testing.assert_close(c[:, 1, 2], torch.full((2,), 0.5))
    summary = prof.concentration_summary(0.1)
    assert summary["heads"] == 6 and summary["diffuse_heads"] == 4  # 0.1 < 0.2; 0.5 and 1.0 are not diffuse
    assert summary["by_layer"] == {"0": [0.1, 1.0, 0.1], "1": [0.1, 0.1, 0.5]} and summary["even"] == 0.1
    with pytest.raises(ValueError, match=r"share=0 must be in \(0, 1\]"):
        prof.concentration(0)


def test_concentration_ignores_unobserved_steps_and_warns_when_most_heads_are_even(tmp_path, capsys, caplog):
    n = 10
    mass = torch.full((2, 1, 2, n, n), 1.0 / n)
    mass[1] = 0.0  # step 1 was not observed: no rows recorded
    prof = _profile_with_mass(mass)
    c = prof.concentration(0.1)
    assert c[1].isnan().all() and not c[0].isnan().any()
    assert prof.concentration_summary(0.1)["by_layer"] == {"0": [0.1, 0.1]}  # the observed step only
    prof.save(tmp_path / "p")
    with caplog.at_level("WARNING", logger="sparsediff"):
        assert main(["show", str(tmp_path / "p"), "--out", str(tmp_path / "m.png"), "--json"]) == 0
    assert "2 of 2 heads spread their attention almost evenly" in caplog.text
    assert json.loads(capsys.readouterr().out)["concentration"]["diffuse_heads"] == 2
