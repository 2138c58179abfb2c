"""`sparsediff bench attention`: the correctness check and the table's arithmetic (no timing asserted)."""

import json

import pytest

from sparsediff import bench
from sparsediff.cli import main
from sparsediff.layout import TokenLayout


def test_bench_json_reports_small_errors_and_consistent_ratios(capsys):
    args = ["bench", "attention", "--layout", "text:5+video:4x6x6", "--heads", "6", "--head-dim", "16",
            "--block-size", "16", "--pattern", "full,skip,diagonal_w1,multi_diagonal_w2,vertical_stripe_f1,topk_blocks_k0.3",
            "--backend", "torch,reference", "--repeats", "1", "--json"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    (r,) = data["results"]
    assert data["config"]["layout"] == "text:5+video:4x6x6"
    assert set(r["ms"]) == {"torch", "reference"}
    assert all(e < 1e-5 for e in r["max_error"].values())
    assert 0.0 < r["density"] < 1.0
    for b in r["ms"]:
        assert r["speedup"][b] == pytest.approx(r["dense_ms"] / r["ms"][b], rel=1e-2)
        assert r["efficiency"][b] == pytest.approx(r["speedup"][b] * r["density"], rel=1e-2)
    assert set(r["groups_alone_ms"]) == {"torch", "reference"}


def test_bench_table_prints_correctness_before_times(capsys):
    assert main(["bench", "attention", "--seq-len", "256", "--heads", "2", "--head-dim", "16", "--block-size", "16",
                 "--density", "0.25", "--kinds", "diagonal", "--backend", "torch", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert out.index("correctness") < out.index("dense ms")


def test_band_cases_time_the_plain_sdpa_loop_anchor(capsys):
    assert main(["bench", "attention", "--seq-len", "512", "--heads", "2", "--head-dim", "16", "--block-size", "16",
                 "--pattern", "multi_diagonal_w4", "--backend", "torch", "--repeats", "1", "--json"]) == 0
    (r,) = json.loads(capsys.readouterr().out)["results"]
    assert r["anchor_ms"] > 0
    assert r["anchor_efficiency"] == pytest.approx(r["dense_ms"] / r["anchor_ms"] * r["density"], rel=1e-6)
    assert main(["bench", "attention", "--seq-len", "512", "--heads", "2", "--head-dim", "16", "--block-size", "16",
                 "--pattern", "vertical_stripe_f1", "--backend", "torch", "--repeats", "1", "--json"]) == 0
    (r,) = json.loads(capsys.readouterr().out)["results"]
    assert r["anchor_ms"] is None  # a stripe has no band to loop over


def test_sdpa_loop_is_full_attention_when_the_radius_covers_everything():
    import torch

    q, k, v = (torch.randn(1, 2, 100, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    torch.testing.assert_close(bench.sdpa_loop(q, k, v, radius=100, rows=32), torch.nn.functional.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("kind", ["diagonal", "multi_diagonal", "vertical_stripe", "topk_blocks"])
def test_pattern_for_density_hits_the_target(kind):
    layout = TokenLayout.parse("video:8x16x16")
    p = bench.pattern_for_density(kind, 0.25, layout, 32)
    assert p.kind == kind and abs(p.estimated_density(layout, 32) - 0.25) < 0.04


def test_video_layout_for_has_exact_length():
    assert bench.video_layout_for(8192) == TokenLayout.parse("video:8x32x32")
    assert bench.video_layout_for(1000).num_tokens == 1000


def test_bench_errors(capsys):
    assert main(["bench", "attention", "--heads", "2", "--pattern", "diagonal_w1,skip,full"]) == 2
    assert "lists 3 head patterns but --heads is 2" in capsys.readouterr().err
    assert main(["bench", "attention", "--backend", "warp-drive", "--pattern", "full"]) == 2
    assert "'warp-drive' is not a sparsediff backend" in capsys.readouterr().err


def test_bench_cost_compares_prediction_with_measurement(capsys):
    assert main(["bench", "cost", "--layout", "video:4x8x8", "--heads", "4", "--head-dim", "16", "--block-size", "16",
                 "--layers", "2", "--repeats", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["layers"]) == 2 and report["key"]["layout"] == "video:4x8x8"
    for row in report["layers"]:
        assert len(row["patterns"]) == 4 and row["measured_ms"] > 0
        assert row["error"] == pytest.approx(row["predicted_ms"] / row["measured_ms"] - 1)
    assert report["max_abs_error"] == pytest.approx(max(abs(r["error"]) for r in report["layers"]))
