"""Bad input at the CLI: one sentence naming the value, no traceback, a non-zero exit, before any model is loaded,
and nothing of the user's overwritten without --force."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import sparsediff.api
from sparsediff.cli import main

SENTINEL = b"the user's own bytes\n"
LOAD_PIPELINE = sparsediff.api.load_pipeline  # the real one, for the tests of --model folders


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    """Every refusal here must come before a pipeline is loaded: loading one fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a pipeline was loaded before the bad input was refused")

    monkeypatch.setattr(sparsediff.api, "load_pipeline", refuse)


def _run(argv, capsys) -> tuple[int, str]:
    """Exit code and stderr of `sparsediff argv`, whether argparse exits or `main` returns."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


GENERATE = ["generate", "video", "--prompt", "a red square"]


# ---- item 1: nothing the user already has is replaced without --force ---------------------------------------
@pytest.mark.parametrize(
    "existing, argv",
    [
        ("clip.mp4", [*GENERATE, "--out", "{tmp}/clip.mp4"]),
        ("clip.mp4", [*GENERATE, "--out", "{tmp}/clip.avi"]),  # the suffix it rewrites lands on an existing MP4
        ("mask.png", ["show", "--pattern", "diagonal_w1", "--layout", "video:2x4x4", "--out", "{tmp}/mask.png"]),
        ("prof", ["profile", "--model", "{tmp}/model", "--out", "{tmp}/prof"]),
        ("plan.json", ["search", "--model", "{tmp}/model", "--profile", "{tmp}/prof", "--out", "{tmp}/plan.json"]),
    ],
)
def test_existing_output_is_refused_without_force(tmp_path, capsys, monkeypatch, existing, argv):
    import sparsediff.generate

    monkeypatch.setattr(sparsediff.generate, "video_target", lambda out: Path(out).with_suffix(".mp4"))
    target = tmp_path / existing
    if existing == "prof":
        target.mkdir()
        target = target / "profile.json"
    target.write_bytes(SENTINEL)
    code, err = _run([a.format(tmp=tmp_path) for a in argv], capsys)
    assert code != 0
    assert existing in err and "pass --force to overwrite, or choose another --out" in err
    assert target.read_bytes() == SENTINEL


def test_show_profile_refuses_its_existing_errors_png(tmp_path, capsys):
    from sparsediff.render import render_profile

    class Profile:  # just what render_profile reads before it draws
        layers, steps = [0, 1], [0, 1]

    companion = tmp_path / "maps_errors.png"
    companion.write_bytes(SENTINEL)
    with pytest.raises(ValueError, match=r"maps_errors\.png' already exists; pass --force"):
        render_profile(Profile(), tmp_path / "maps.png", force=False)
    assert companion.read_bytes() == SENTINEL and not (tmp_path / "maps.png").exists()


def test_show_force_overwrites_and_leaves_no_temporary_file(tmp_path, capsys):
    out = tmp_path / "existing.png"
    out.write_bytes(SENTINEL)
    assert main(["show", "--pattern", "diagonal_w1", "--layout", "video:2x4x4", "--out", str(out), "--force", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(out)
    assert out.read_bytes().startswith(b"\x89PNG") and [p.name for p in tmp_path.iterdir()] == ["existing.png"]


def test_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    from PIL import Image

    from sparsediff.layout import TokenLayout
    from sparsediff.patterns import get_pattern
    from sparsediff.render import render_pattern

    out = tmp_path / "mask.png"
    out.write_bytes(SENTINEL)

    def interrupted(self, fp, *args, **kwargs):
        open(fp, "wb").write(b"half a PNG")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        render_pattern(get_pattern("diagonal_w1"), TokenLayout.parse("video:2x4x4"), out)
    assert out.read_bytes() == SENTINEL and [p.name for p in tmp_path.iterdir()] == ["mask.png"]


# ---- item 2: a path of the user's at fault: one sentence, no traceback; --debug shows it -----------------------
@pytest.mark.parametrize(
    "argv",
    [
        [*GENERATE, "--out", "{tmp}/afile/clip.mp4"],
        ["show", "--pattern", "diagonal_w1", "--layout", "video:2x4x4", "--out", "{tmp}/afile/deeper/mask.png"],
        ["profile", "--model", "{tmp}/model", "--out", "{tmp}/afile/prof"],
        ["search", "--model", "{tmp}/model", "--profile", "{tmp}/prof", "--out", "{tmp}/afile/plan.json"],
    ],
)
def test_out_under_a_file_is_refused(tmp_path, capsys, argv):
    (tmp_path / "afile").write_bytes(SENTINEL)
    code, err = _run([a.format(tmp=tmp_path) for a in argv], capsys)
    assert code != 0
    assert f"its parent {str(tmp_path / 'afile')!r} is a file" in err and err.count("\n") == 1
    assert (tmp_path / "afile").read_bytes() == SENTINEL


def test_out_that_is_a_file_where_a_folder_goes_and_vice_versa(tmp_path, capsys):
    (tmp_path / "afile").write_bytes(SENTINEL)
    code, err = _run(["profile", "--model", str(tmp_path), "--out", str(tmp_path / "afile"), "--force"], capsys)
    assert code != 0 and "is a file, not a folder" in err and (tmp_path / "afile").read_bytes() == SENTINEL
    code, err = _run(["show", "--pattern", "diagonal_w1", "--layout", "video:2x4x4", "--out", str(tmp_path), "--force"], capsys)
    assert code != 0 and "is a folder, not a file" in err


def test_os_errors_are_one_sentence_and_debug_shows_the_traceback(tmp_path, capsys):
    missing = tmp_path / "no-such-prompts.txt"
    argv = ["profile", "--model", str(tmp_path), "--prompts", str(missing), "--out", str(tmp_path / "prof")]
    code, err = _run(argv, capsys)
    assert code != 0 and str(missing) in err and "check that path" in err
    with pytest.raises(FileNotFoundError):
        main(["--debug", *argv])
    with pytest.raises(ValueError, match="needs --layout"):
        main(["--debug", "show", "--pattern", "diagonal_w1", "--out", str(tmp_path / "x.png")])


# ---- item 3: nonsense numbers refused by argparse, naming the value ------------------------------------------
@pytest.mark.parametrize(
    "argv, flag, value",
    [
        ([*GENERATE, "--out", "x.mp4", "--steps", "0"], "--steps", "0"),
        ([*GENERATE, "--out", "x.mp4", "--steps", "-3"], "--steps", "-3"),
        ([*GENERATE, "--out", "x.mp4", "--steps", "two"], "--steps", "two"),
        ([*GENERATE, "--out", "x.mp4", "--frames", "0"], "--frames", "0"),
        ([*GENERATE, "--out", "x.mp4", "--fps", "0"], "--fps", "0"),
        ([*GENERATE, "--out", "x.mp4", "--height", "-64"], "--height", "-64"),
        ([*GENERATE, "--out", "x.mp4", "--width", "-64"], "--width", "-64"),
        (["show", "--pattern", "diagonal_w1", "--layout", "video:2x4x4", "--out", "x.png", "--scale", "0"], "--scale", "0"),
        (["show", "--pattern", "diagonal_w1", "--layout", "video:2x4x4", "--out", "x.png", "--scale", "-3"], "--scale", "-3"),
        (["show", "--pattern", "diagonal_w1", "--layout", "video:2x4x4", "--out", "x.png", "--block-size", "0"], "--block-size", "0"),
        (["search", "--model", "m", "--profile", "p", "--out", "x.json", "--target-speedup", "-1"], "--target-speedup", "-1"),
        (["search", "--model", "m", "--profile", "p", "--out", "x.json", "--target-speedup", "0"], "--target-speedup", "0"),
        (["search", "--model", "m", "--profile", "p", "--out", "x.json", "--trials", "0"], "--trials", "0"),
        (["search", "--model", "m", "--profile", "p", "--out", "x.json", "--min-psnr", "nan"], "--min-psnr", "nan"),
        (["search", "--model", "m", "--profile", "p", "--out", "x.json", "--min-psnr", "inf"], "--min-psnr", "inf"),
        (["search", "--model", "m", "--profile", "p", "--out", "x.json", "--timeout", "-5"], "--timeout", "-5"),
        (["search", "--model", "m", "--profile", "p", "--out", "x.json", "--ranges", "0"], "--ranges", "0"),
        (["search", "--model", "m", "--profile", "p", "--out", "x.json", "--refine", "-1"], "--refine", "-1"),
        (["search", "--model", "m", "--profile", "p", "--out", "x.json", "--prune-ahead", "-2"], "--prune-ahead", "-2"),
        (["search", "--model", "m", "--profile", "p", "--out", "x.json", "--range-scales", "0,1"], "--range-scales", "0,1"),
        (["search", "--model", "m", "--profile", "p", "--out", "x.json", "--range-scales", "1,x"], "--range-scales", "1,x"),
        (["search", "--model", "m", "--profile", "p", "--out", "x.json", "--allowance", "0.05,0.01"], "--allowance", "0.05,0.01"),
        (["search", "--model", "m", "--profile", "p", "--out", "x.json", "--allowance", "0,0.1"], "--allowance", "0,0.1"),
        (["search", "--model", "m", "--profile", "p", "--out", "x.json", "--allowance", "0.01"], "--allowance", "0.01"),
        (["profile", "--model", "m", "--out", "p", "--steps", "0"], "--steps", "0"),
        (["profile", "--model", "m", "--out", "p", "--block-size", "-8"], "--block-size", "-8"),
    ],
)
def test_nonsense_numbers_are_refused_by_the_parser(tmp_path, capsys, monkeypatch, argv, flag, value):
    monkeypatch.chdir(tmp_path)
    code, err = _run(argv, capsys)
    assert code == 2
    assert f"argument {flag}: {value!r}" in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_negative_seed_is_fine_for_the_parser():
    from sparsediff.cli import build_parser

    args = build_parser().parse_args([*GENERATE, "--out", "x.mp4", "--seed", "-1"])
    assert args.seed == -1 and args.force is False


# ---- item 4: devices ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "device, expected",
    [
        ("gpu", "is not a device name; pass --device cpu"),
        ("tpu", "pass --device cpu"),
        ("cuda:banana", "is not a device name; pass --device cpu"),
        ("cuda:99", "pass --device cuda:0, or --device cpu"),
    ],
)
def test_bad_device_is_refused_before_loading(tmp_path, capsys, monkeypatch, device, expected):
    if device == "cuda:99" and not torch.cuda.is_available():
        expected = "has no CUDA device; pass --device cpu"
    for argv in ([*GENERATE, "--out", str(tmp_path / "clip.mp4")], ["profile", "--model", "m", "--out", str(tmp_path / "p")]):
        code, err = _run([*argv, "--device", device], capsys)
        assert code != 0 and repr(device) in err and expected in err


def test_cuda_without_cuda_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = _run([*GENERATE, "--out", str(tmp_path / "clip.mp4"), "--device", "cuda"], capsys)
    assert code != 0 and "--device 'cuda' asks for CUDA but this machine has no CUDA device; pass --device cpu." in err


# ---- item 5: plan files that are not plans: one sentence naming the file and the field -----------------------
def _plan_dict() -> dict:
    from sparsediff.plan import ModelFingerprint, SparsePlan

    return SparsePlan.uniform(ModelFingerprint("Toy", 2, 2, 8, "cafe"), "diagonal_w1").to_dict()


def _edited(path, **edits):
    data = _plan_dict()
    for key, value in edits.items():
        target, *keys = key.split("__")
        node = data
        for k in [target, *keys][:-1]:
            node = node[int(k) if k.isdigit() else k]
        last = [target, *keys][-1]
        node[int(last) if last.isdigit() else last] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "write, words",
    [
        (lambda p: _edited(p, ranges=None), "Plan field 'ranges' is None; it must be a list"),
        (lambda p: _edited(p, ranges__0__layers=7), "Plan field 'ranges[0].layers' is 7; it must be a list"),
        (lambda p: _edited(p, ranges__0__layers__1=None), "Plan field 'ranges[0].layers[1]' is None; it must be a list"),
        (lambda p: _edited(p, ranges__0__layers__1__0=5), "Plan field 'ranges[0].layers[1][0]': A pattern is a name"),
        (lambda p: _edited(p, ranges__0__start=None), "Plan field 'ranges[0].start' is None; it must be a number"),
        (lambda p: _edited(p, dense_layers=None), "Plan field 'dense_layers' is None; it must be a list"),
        (lambda p: _edited(p, dense_layers=3), "Plan field 'dense_layers' is 3; it must be a list"),
        (lambda p: _edited(p, block_size="64"), "Plan field 'block_size' is '64'; use a positive integer"),
        (lambda p: _edited(p, ranges__0__layers__0__0="diagonal_w1_w2"), "gives parameter 'w' twice"),
        (lambda p: p.write_bytes(b"\xff\xfe\x00garbage"), "is not UTF-8 text (byte 0xff at offset 0)"),
        (lambda p: p.write_bytes(b"[" * 200_000), "nests JSON too deeply to read"),
        (lambda p: p.write_bytes(b"not json at all"), "is not valid JSON"),
        (lambda p: p.write_bytes(b"42"), "A plan is a JSON object, not int"),
    ],
)
def test_show_a_broken_plan_names_the_file_and_field(tmp_path, capsys, write, words):
    plan = tmp_path / "plan.json"
    write(plan)
    before = plan.read_bytes()
    code, err = _run(["show", str(plan), "--out", str(tmp_path / "x.png")], capsys)
    assert code == 2 and err.startswith(f"error: Plan file {str(plan)!r}") and words in err
    assert err.count("\n") == 1 and plan.read_bytes() == before and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "name, words",
    [
        ("diagonal_w1_w2", "'diagonal_w1_w2' gives parameter 'w' twice"),
        ("topk_blocks_k0.5_k0.5", "gives parameter 'k' twice"),
        ("diagonal__w1", "'diagonal__w1' has an empty parameter"),
        ("diagonal_w-1", "w=-1"),
        ("spiral_w2", "Unknown pattern 'spiral_w2'"),
    ],
)
def test_show_a_malformed_pattern_name_is_named(tmp_path, capsys, name, words):
    code, err = _run(["show", "--pattern", name, "--layout", "video:2x4x4", "--out", str(tmp_path / "m.png")], capsys)
    assert code == 2 and words in err and err.count("\n") == 1 and not (tmp_path / "m.png").exists()


# ---- item 6: sizes too large for memory: drawn downsampled without the S x S mask, absurd ones refused ---------
def test_show_at_real_wan_size_draws_a_downsampled_token_mask(tmp_path, capsys):
    from PIL import Image

    from sparsediff.render import MAX_MASK_CELLS

    out = tmp_path / "m.png"
    code, err = _run(["show", "--pattern", "diagonal_w1", "--layout", "video:21x45x80", "--out", str(out)], capsys)
    assert code == 0, err
    side = -(-75600 // -(-75600 // MAX_MASK_CELLS))  # 37 tokens per pixel
    assert Image.open(out).size == (side, side) and out.stat().st_size < 5_000_000


@pytest.mark.parametrize(
    "layout, name, block_size",
    [
        ("video:3x5x7", "diagonal_w1", None),
        ("text:5+video:2x6x9", "diagonal_w0.5", None),
        ("text:5+video:2x6x9", "multi_diagonal_w1", None),  # position-major kernel order: pooled in row chunks
        ("axis:4x25:position", "vertical_stripe_f1", None),
        ("video:3x5x7", "full", None),
        ("video:3x5x7", "multi_diagonal_w1", 3),
        ("text:5+video:2x6x9", "vertical_stripe_f1", 2),
    ],
)
def test_downsampled_mask_is_any_over_each_pixels_cells(monkeypatch, layout, name, block_size):
    import sparsediff.render as render
    from sparsediff.layout import TokenLayout
    from sparsediff.patterns import get_pattern

    monkeypatch.setattr(render, "MAX_MASK_CELLS", 16)
    layout, pattern = TokenLayout.parse(layout), get_pattern(name)
    full = pattern.block_mask(layout, block_size) if block_size else pattern.token_mask(layout)
    factor = -(-full.shape[0] // 16)
    assert factor > 1
    assert torch.equal(render.pattern_image_mask(pattern, layout, block_size), render._any_pool(full, factor))


def test_a_large_layout_in_another_order_draws_the_block_mask_and_says_so(tmp_path, monkeypatch, caplog):
    import sparsediff.render as render
    from sparsediff.layout import TokenLayout
    from sparsediff.patterns import get_pattern

    monkeypatch.setattr(render, "MAX_MASK_CELLS", 16)
    monkeypatch.setattr(render, "MAX_POOLED_TOKENS", 64)
    layout, pattern = TokenLayout.parse("video:3x5x7"), get_pattern("multi_diagonal_w1")
    with caplog.at_level("WARNING", logger="sparsediff.render"):
        mask = render.pattern_image_mask(pattern, layout)
    assert torch.equal(mask, pattern.block_mask(layout, 7))
    assert "drawn as its block mask in kernel order, 7 tokens per pixel" in caplog.text


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--pattern", "diagonal_w1", "--layout", "video:2x4x4", "--scale", "100000"],
         "The image would be 3200000 x 3200000 pixels (32 cells x scale 100000), over the limit of 8192 pixels per side; pass --scale 256 or less."),
        (["--pattern", "diagonal_w1", "--layout", "video:21x45x80", "--scale", "5"],
         "(2044 cells x scale 5), over the limit of 8192 pixels per side; pass --scale 4 or less."),
        (["--pattern", "diagonal_w1", "--layout", "video:1000x1000x1000"],
         "Layout 'video:1000x1000x1000' has 1000000000 tokens, over the limit of 16777216 that can be drawn"),
        (["--pattern", "topk_blocks_k0.25", "--layout", "video:21x45x80", "--block-size", "2"],
         "has 37800 blocks of 2 tokens per side, over the limit of 16384 for 'topk_blocks_k0.25'"),
    ],
)
def test_show_refuses_absurd_sizes_naming_size_and_limit(tmp_path, capsys, argv, words):
    out = tmp_path / "m.png"
    out.write_bytes(SENTINEL)
    code, err = _run(["show", *argv, "--out", str(out), "--force"], capsys)
    assert code == 2 and words in err and err.count("\n") == 1
    assert out.read_bytes() == SENTINEL and [p.name for p in tmp_path.iterdir()] == ["m.png"]


def test_show_skips_the_density_of_a_huge_block_mask_and_says_so(tmp_path, capsys, caplog):
    out = tmp_path / "m.png"
    argv = ["show", "--pattern", "diagonal_w1", "--layout", "video:21x45x80", "--block-size", "4", "--out", str(out), "--json"]
    with caplog.at_level("WARNING", logger="sparsediff"):
        assert main(argv) == 0
    assert "density" not in json.loads(capsys.readouterr().out) and out.is_file()
    assert "density not computed: 18900 blocks per side is over 4096" in caplog.text


# ---- item 7: --model folders: a broken model_index.json is named; the embedded pipeline's own folder loads -------
@pytest.mark.parametrize(
    "index, words",
    [
        (b"\xff\xfe garbage", "model_index.json' is not a JSON object of pipeline components; save the pipeline again"),
        (b"{not json", "is not a JSON object of pipeline components"),
        (b"[1, 2]", "is not a JSON object of pipeline components"),
        (b"[" * 100_000, "is not a JSON object of pipeline components"),
        (b'{"_class_name": "NoSuchPipeline"}', "names the pipeline class 'NoSuchPipeline', which diffusers"),
        (b'{"_class_name": 5}', "names the pipeline class 5"),
        (b'{"scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}', "names the pipeline class None"),
        (b'{"_class_name": "ShapesVideoPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]}',
         "could not be loaded as a ShapesVideoPipeline"),
        (b'{"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]}',
         "could not be loaded as a WanPipeline"),
    ],
)
def test_a_broken_model_folder_is_one_sentence(tmp_path, capsys, monkeypatch, index, words):
    monkeypatch.setattr(sparsediff.api, "load_pipeline", LOAD_PIPELINE)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_bytes(index)
    code, err = _run([*GENERATE, "--model", str(model), "--out", str(tmp_path / "clip.mp4"), "--device", "cpu"], capsys)
    last = err.rstrip("\n").split("\n")[-1]  # diffusers may draw its loading bar first
    assert code == 2 and last.startswith("error: ") and words in last, err
    assert (model / "model_index.json").read_bytes() == index and not (tmp_path / "clip.mp4").exists()


def test_the_embedded_pipeline_saved_by_path_loads_back(tmp_path):
    from sparsediff.pipelines.embedded.pipeline import EmbeddedModelConfig, ShapesVideoPipeline, build_pipeline

    pipe = build_pipeline(EmbeddedModelConfig(num_layers=2, num_heads=2, head_dim=12, text_dim=16, ffn_dim=32))
    pipe.save_pretrained(tmp_path / "saved")
    loaded = LOAD_PIPELINE(str(tmp_path / "saved"), "cpu")
    assert isinstance(loaded, ShapesVideoPipeline)
    for name in ("transformer", "text_encoder"):
        saved, back = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
    call = dict(prompt="a red circle moving right", num_frames=3, height=8, width=12, num_inference_steps=2,
                output_type="np")
    expected = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
    got = loaded(**call, generator=torch.Generator().manual_seed(0)).frames
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


# ---- item 8: a corrupt or incomplete profile folder: one sentence naming it, before the model loads -------------
def _damage_meta(edit):
    def damage(folder):
        meta = json.loads((folder / "profile.json").read_text())
        edit(meta)
        (folder / "profile.json").write_text(json.dumps(meta))
    return damage


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda f: (f / "profile.json").unlink(), "is not a profile directory (profile.json is missing;"),
        (lambda f: (f / "tensors.safetensors").unlink(), "is not a profile directory (tensors.safetensors is missing;"),
        (lambda f: [p.unlink() for p in f.iterdir()], "(profile.json and tensors.safetensors are missing;"),
        (lambda f: (f / "profile.json").write_bytes(b"{garbage"), "holds a profile.json that is not a JSON object"),
        (lambda f: (f / "profile.json").write_bytes(b"\xff\xfe\x00"), "holds a profile.json that is not a JSON object"),
        (lambda f: (f / "profile.json").write_bytes(b"[" * 100_000), "holds a profile.json that is not a JSON object"),
        (lambda f: (f / "profile.json").write_bytes(b"[]"), "holds a profile.json that is not a JSON object"),
        (lambda f: (f / "tensors.safetensors").write_bytes(b"not tensors"), "holds a damaged tensors.safetensors"),
        (lambda f: (f / "tensors.safetensors").write_bytes(b""), "holds a damaged tensors.safetensors"),
        (_damage_meta(lambda m: m.pop("layout")), "profile.json lacks the field 'layout'"),
        (_damage_meta(lambda m: m.__setitem__("steps", None)), "holds an unreadable profile"),
        (_damage_meta(lambda m: m.__setitem__("model", 3)), "holds an unreadable profile"),
        (_damage_meta(lambda m: m.__setitem__("candidates", ["full"])), "holds an unreadable profile (Profile tensor 'errors' has shape"),
    ],
)
def test_search_with_a_broken_profile_names_the_folder(tmp_path, capsys, damage, words):
    from search_fixtures import synthetic_profile

    folder = synthetic_profile().save(tmp_path / "prof")
    damage(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for argv in (["search", "--model", str(tmp_path / "model"), "--profile", str(folder), "--out", str(tmp_path / "plan.json")],
                 ["show", str(folder), "--out", str(tmp_path / "maps.png")]):
        code, err = _run(argv, capsys)
        assert code == 2 and words in err and str(folder) in err and err.count("\n") == 1, err
        assert "record it again with `sparsediff profile --out DIR`" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prof"]


def test_an_interrupted_profile_save_leaves_the_old_files(tmp_path, monkeypatch):
    import safetensors.torch
    from search_fixtures import synthetic_profile

    folder = synthetic_profile().save(tmp_path / "prof")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def interrupted(tensors, filename, *args, **kwargs):
        open(filename, "wb").write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synthetic_profile(seed=1).save(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


# ---- item 9: prompt files that are not text, and an SQLite --storage in a missing folder ------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["profile", "--model", "{tmp}/model", "--out", "{tmp}/prof", "--prompts", "{tmp}/prompts.bin"],
        ["search", "--model", "{tmp}/model", "--profile", "{tmp}/prof", "--out", "{tmp}/plan.json", "--prompts", "{tmp}/prompts.bin"],
        ["search", "--model", "{tmp}/model", "--profile", "{tmp}/prof", "--out", "{tmp}/plan.json",
         "--validate-prompts", "{tmp}/prompts.bin"],
    ],
)
def test_binary_prompts_are_named(tmp_path, capsys, argv):
    prompts = tmp_path / "prompts.bin"
    prompts.write_bytes(b"a red circle\n\x89PNG\r\n\x1a\n\x00\xff")
    code, err = _run([a.format(tmp=tmp_path) for a in argv], capsys)
    flag = argv[-2]
    assert code == 2 and err.count("\n") == 1
    assert f"{flag} {str(prompts)!r} is not UTF-8 text (byte 0x89 at offset 13); pass a text file with one prompt per line." in err
    assert prompts.read_bytes() == b"a red circle\n\x89PNG\r\n\x1a\n\x00\xff" and sorted(p.name for p in tmp_path.iterdir()) == ["prompts.bin"]


@pytest.mark.parametrize(
    "storage, folder",
    [
        ("sqlite:///{tmp}/missing/folder/x.db", "{tmp}/missing/folder"),
        ("sqlite:///{tmp}/afile/x.db", "{tmp}/afile"),
        ("sqlite:///{tmp}/missing/x.db?timeout=10", "{tmp}/missing"),
    ],
)
def test_sqlite_storage_in_a_missing_folder_is_refused_before_the_search(tmp_path, capsys, storage, folder):
    (tmp_path / "afile").write_bytes(SENTINEL)
    storage, folder = storage.format(tmp=tmp_path), folder.format(tmp=tmp_path)
    argv = ["search", "--model", str(tmp_path / "model"), "--profile", str(tmp_path / "prof"),
            "--out", str(tmp_path / "plan.json"), "--storage", storage]
    code, err = _run(argv, capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"--storage {storage!r} puts the study in {folder!r}, which is not a folder; create that folder first" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and (tmp_path / "afile").read_bytes() == SENTINEL


def test_storage_check_lets_real_folders_and_other_urls_through():
    from sparsediff.cli import _check_storage

    for storage in (None, "sqlite:///x.db", "sqlite:///:memory:", "postgresql://user@host/db", "sqlite://"):
        _check_storage(storage)


def test_generate_refuses_a_bad_plan_file_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import sparsediff.api

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the plan was checked")

    monkeypatch.setattr(sparsediff.api, "load_pipeline", no_model)
    bad = tmp_path / "plan.json"
    bad.write_text('{"ranges": 7}')
    assert main(["generate", "video", "--prompt", "x", "--plan", str(bad), "--out", str(tmp_path / "c.mp4")]) != 0
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err


def test_an_accelerated_pipeline_refuses_zero_steps_and_remove_lifts_the_guard():
    import pipeline_factories
    import sparsediff

    pipe, call_kwargs = pipeline_factories.make("wan")
    with sparsediff.accelerate(pipe):
        with pytest.raises(ValueError, match=r"num_inference_steps=0: an accelerated pipeline needs at least one"):
            pipe(**call_kwargs(num_inference_steps=0))
        assert pipe(**call_kwargs()).frames.isfinite().all()  # a normal run is untouched
    assert "set_timesteps" not in vars(pipe.scheduler)
