"""torch.compile(fullgraph=True) on an accelerated denoiser: it traces, matches eager, and does not recompile per step.

The fast tests compile with the `aot_eager` backend: Dynamo traces exactly as for Inductor (a graph break fails
`fullgraph=True` either way) without generating C++ on a 2-core CPU; the slow tests use Inductor, the default.
"""

import pytest
import torch

import pipeline_factories
import sparsediff
from sparsediff.patterns import get_pattern
from sparsediff.pipelines.adapter import fingerprint
from sparsediff.plan import SparsePlan, StepRange

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")

MIX = ["diagonal_w0.5", "skip", "vertical_stripe_f1", "multi_diagonal_w1", "full"]


def mixed_plan(model, ranges=((0.0, 1.0),)) -> SparsePlan:
    """Patterns cycling over heads, shifted per layer and per range; skip heads included."""
    fp = fingerprint(model)
    out = []
    for r, (start, end) in enumerate(ranges):
        layers = tuple(tuple(get_pattern(MIX[(h + layer + r) % len(MIX)]) for h in range(fp.num_heads))
                       for layer in range(fp.num_layers))
        out.append(StepRange(start, end, layers))
    return SparsePlan(model=fp, ranges=out, block_size=8)


def wan_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, 3, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 16, 32, generator=g)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("plan", ["auto", "mixed"])
def test_accelerated_wan_compiles_with_fullgraph_and_matches_eager(plan, backend):
    model = pipeline_factories.wan_transformer(heads=5)
    plan = mixed_plan(model) if plan == "mixed" else plan
    x, t, text = wan_inputs()
    torch._dynamo.reset()
    with torch.no_grad(), sparsediff.accelerate(model, plan, backend="torch", num_steps=1) as handle:
        eager = model(x, t, text).sample
        compiled = torch.compile(model, fullgraph=True, backend=backend)(x, t, text).sample
        stats = handle.stats
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    if plan != "auto":  # the op ran the plan: heads skipped, sparse density recorded
        assert any(not s.dense and s.heads_skipped > 0 for s in stats)


def test_a_compiled_pipeline_run_with_two_plan_ranges_compiles_once():
    """The step decides the patterns at run time inside the op, so a run over several steps and two ranges (and the
    dense first step, and two guidance branches) reuses one graph, and equals the eager run."""
    from torch._dynamo.utils import counters

    pipe, call_kwargs = pipeline_factories.wan()
    plan = mixed_plan(pipe.transformer, ranges=((0.0, 0.5), (0.5, 1.0)))
    plan.dense_steps = 1
    with torch.no_grad(), sparsediff.accelerate(pipe, plan, backend="torch") as handle:
        eager = pipe(**call_kwargs(num_inference_steps=4)).frames
        eager_stats = [(s.context, s.step, s.dense, s.density) for s in handle.stats]
        torch._dynamo.reset()
        counters.clear()
        original = pipe.transformer
        pipe.transformer = torch.compile(original, fullgraph=True, backend="aot_eager")
        try:
            compiled = pipe(**call_kwargs(num_inference_steps=4)).frames
        finally:
            pipe.transformer = original
        compiled_stats = [(s.context, s.step, s.dense, s.density) for s in handle.stats]
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert compiled_stats == eager_stats  # the same steps ran dense and sparse, at the same densities
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # one compile per family and plan, about 20 s each on 2 cores
@pytest.mark.parametrize("plan_kind", ["auto", "mixed"])
@pytest.mark.parametrize("family", [f for f in pipeline_factories.FAMILIES if f != "wan22"])
def test_every_family_compiles_with_fullgraph_with_no_plan_and_a_mixed_plan(family, plan_kind):
    pipe, call_kwargs = pipeline_factories.make(family)
    plan = mixed_plan(pipe.transformer) if plan_kind == "mixed" else "auto"
    with torch.no_grad(), sparsediff.accelerate(pipe, plan, backend="torch"):
        eager = pipe(**call_kwargs()).frames
        torch._dynamo.reset()
        original = pipe.transformer
        pipe.transformer = torch.compile(original, fullgraph=True)
        try:
            compiled = pipe(**call_kwargs()).frames
        finally:
            pipe.transformer = original
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
