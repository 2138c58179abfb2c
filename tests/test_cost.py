"""The measured cost model: storage, cache keys, and predictions that follow the measurements."""

import json
from dataclasses import asdict

import pytest
import torch

from sparsediff.layout import TokenLayout
from sparsediff.search.cost import COST_SCHEMA, FULL_BESIDE, CostKey, CostModel, cache_dir, compiled_full, interpolate, monotone_in_density

LAYOUT = TokenLayout.parse("video:4x16x16")  # 1024 tokens: big enough that density shows in the time


@pytest.fixture(scope="module")
def model():
    return CostModel.measure(LAYOUT, num_heads=4, head_dim=32, block_size=64, repeats=5,
                             candidates=["diagonal_w0.25", "diagonal_w1", "diagonal_w2", "skip"])


def test_round_trip(model, tmp_path):
    path = model.save(tmp_path / "costs.json")
    assert CostModel.load(path) == model


def test_prediction_is_monotone_in_density(model):
    for heads in (1, 2, 3, 4):
        t = [model.layer_time([name] * heads) for name in ["diagonal_w0.25", "diagonal_w1", "diagonal_w2"]]
        assert t[0] <= t[1] * (1 + 1e-9) and t[1] <= t[2] * (1 + 1e-9)  # pooled ties may differ by rounding
    assert model.layer_time(["skip"] * 4) == 0.0


def test_noisy_inversions_are_pooled():
    layout = TokenLayout.parse("video:4x16x16")
    # w2 measured faster than w1 (noise): the pooled model predicts them equal, and keeps w0.25 below
    line = lambda a, b: [(n, a + b * n) for n in (1, 2, 4)]  # noqa: E731
    points = {"diagonal_w0.25": line(1.0, 1.0), "diagonal_w1": line(1.0, 3.0), "diagonal_w2": line(1.0, 2.0), "full": line(1.0, 9.0)}
    pooled = monotone_in_density(points, layout, 64)
    for n in (1, 2, 3, 4):
        assert interpolate(pooled["diagonal_w1"], n) == pytest.approx(interpolate(pooled["diagonal_w2"], n))
        assert interpolate(pooled["diagonal_w0.25"], n) < interpolate(pooled["diagonal_w1"], n)
    assert pooled["full"] == points["full"]
    assert [t for _, t in pooled["diagonal_w0.25"]] == pytest.approx([t for _, t in points["diagonal_w0.25"]])


def test_layer_time_is_the_sum_over_fused_groups(model):
    mixed = ["diagonal_w1", "full", "diagonal_w1", "skip"]
    # full heads of a sparse step take their own curve where the compiled CPU kernel runs them (measured then)
    full = (lambda n: interpolate(model.points[FULL_BESIDE], n)) if FULL_BESIDE in model.points else (lambda n: model.group_time("full", n))
    assert model.layer_time(mixed) == pytest.approx(model.group_time("diagonal_w1", 2) + full(1))
    assert model.layer_time(["full"] * 4) == pytest.approx(full(4))  # a layer of them alone too
    assert model.dense_layer_time() == model.group_time("full", 4)  # dense steps and layers: SDPA, the model's own
    assert (FULL_BESIDE in model.points) == compiled_full(model.key.backend, "cpu", torch.float32)


def test_full_heads_beside_sparse_ones_have_their_curve_in_every_dtype_the_kernel_takes():
    from sparsediff.kernels import cpu_kernel

    loads = cpu_kernel.load() is not None
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # AMX or AVX512-BF16: bfloat16 in the 16-bit entry
        assert compiled_full("torch", "cpu", dtype) == (loads and cpu_kernel.takes(dtype))
    assert cpu_kernel.takes(torch.float32) and not cpu_kernel.takes(torch.float64)
    assert not compiled_full("torch", "cpu", torch.float64)
    assert not compiled_full("flex", "cpu", torch.float32)


def test_unmeasured_pattern_is_refused(model):
    with pytest.raises(ValueError, match="no measurement for 'vertical_stripe_f1'"):
        model.layer_time(["vertical_stripe_f1"] * 4)


def test_cache_is_keyed_by_device_and_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEDIFF_CACHE_DIR", str(tmp_path))
    small = TokenLayout.parse("video:2x4x4")
    first = CostModel.load_or_measure(small, 2, 16, ["diagonal_w1"], block_size=16, repeats=1)
    assert len(list(cache_dir().glob("*.json"))) == 1
    again = CostModel.load_or_measure(small, 2, 16, ["diagonal_w1"], block_size=16, repeats=1)
    assert again == first  # reused from the cache file, not re-measured (times would differ)
    other_shape = CostModel.load_or_measure(TokenLayout.parse("video:2x4x8"), 2, 16, ["diagonal_w1"], block_size=16, repeats=1)
    assert other_shape.key.layout == "video:2x4x8" and len(list(cache_dir().glob("*.json"))) == 2
    foreign = CostKey("NVIDIA H200", "triton", "bfloat16", "video:2x4x4", 2, 16, 1, 16, torch.__version__)
    with pytest.raises(ValueError, match="another setting .*vs 'NVIDIA H200'; backend 'torch' vs 'triton'"):
        first.check_key(foreign)
    # a table for another device never answers for this one, even under the same file name
    path = cache_dir() / f"{first.key.digest()}.json"
    CostModel(foreign, {"full": [(1, 1.0)], "diagonal_w1": [(1, 0.1)]}).save(path)
    remeasured = CostModel.load_or_measure(small, 2, 16, ["diagonal_w1"], block_size=16, repeats=1)
    assert remeasured.key == first.key


def test_cache_is_keyed_by_the_cpu_path(tmp_path, monkeypatch):
    # the compiled kernel and pure torch run at different speeds: a table of one never answers for the other
    from sparsediff.kernels import cpu_kernel

    monkeypatch.setenv("SPARSEDIFF_CACHE_DIR", str(tmp_path))
    small = TokenLayout.parse("video:2x4x4")
    with cpu_kernel.disabled():
        pure = CostModel.load_or_measure(small, 2, 16, ["diagonal_w1"], block_size=16, repeats=1, backend="torch")
    assert pure.key.cpu_path == "pure"
    here = CostModel.load_or_measure(small, 2, 16, ["diagonal_w1"], block_size=16, repeats=1, backend="torch")
    assert here.key.cpu_path == ("compiled" if cpu_kernel.runs(torch.float32) else "pure")
    assert len(list(cache_dir().glob("*.json"))) == (2 if here.key.cpu_path == "compiled" else 1)
    assert CostKey.for_setting(small, 2, 16, 16, "flex").cpu_path == ""  # other backends: no such path
    if cpu_kernel.load() is not None:  # bfloat16 in the 16-bit entry and in the float32 compute: two tables
        monkeypatch.setattr(cpu_kernel, "amx", lambda dtype: False)
        monkeypatch.setitem(cpu_kernel._state, "native", {torch.bfloat16: True})
        monkeypatch.setattr(cpu_kernel, "native_16bit", lambda dtype: dtype == torch.bfloat16)
        entry = CostKey.for_setting(small, 2, 16, 16, "torch", torch.bfloat16)
        monkeypatch.setitem(cpu_kernel._state, "native", {torch.bfloat16: False})
        widened = CostKey.for_setting(small, 2, 16, 16, "torch", torch.bfloat16)
        assert (entry.cpu_path, widened.cpu_path) == ("compiled-16bit", "compiled")
        assert entry.digest() != widened.digest()
        monkeypatch.setitem(cpu_kernel._state, "native", {torch.bfloat16: True})
        assert CostKey.for_setting(small, 2, 15, 16, "torch", torch.bfloat16).cpu_path == "compiled"  # odd: float32
        assert compiled_full("torch", "cpu", torch.bfloat16)  # full heads beside sparse ones run in either
    # a table saved before the field existed loads with "" and is re-measured rather than reused
    old = dict(asdict(here.key)); del old["cpu_path"]
    path = cache_dir() / f"{here.key.digest()}.json"
    path.write_text(json.dumps({"schema": COST_SCHEMA, "key": old, "points": here.points}))
    assert CostModel.load(path).key.cpu_path == ""
    assert CostModel.load_or_measure(small, 2, 16, ["diagonal_w1"], block_size=16, repeats=1, backend="torch").key == here.key


def test_interpolation_between_measured_group_sizes():
    points = [(1, 3.0), (2, 5.0), (4, 7.0)]
    assert interpolate(points, 1) == 3.0 and interpolate(points, 3) == pytest.approx(6.0)
    assert interpolate(points, 8) == pytest.approx(14.0)  # proportional beyond the last point
    assert interpolate([(2, 4.0)], 1) == pytest.approx(2.0)
