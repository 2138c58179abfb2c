"""torch.compile(fullgraph=True) on an accelerated denoiser: what compiles today (issue 18 is only partly done)."""

import torch

import pipeline_factories
import sparsediff


def wan_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, 3, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 16, 32, generator=g)


def test_dense_accelerated_wan_compiles_with_fullgraph_and_matches_eager():
    """With no sparse step to run (plan "auto" on a model without a shipped plan, or "dense") the hook and the
    wrapped processors trace without a graph break: no timer and no function mode inside the graph."""
    model = pipeline_factories.wan_transformer()
    x, t, text = wan_inputs()
    with torch.no_grad():
        eager = model(x, t, text).sample
        torch._dynamo.reset()
        with sparsediff.accelerate(model) as handle:
            compiled = torch.compile(model, fullgraph=True)(x, t, text).sample
            assert handle.stats and all(s.dense for s in handle.stats)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
