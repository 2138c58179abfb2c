"""accelerate() on every supported family, through the real pipelines (tiny, offline): exactness, sparsity, steps."""

import pytest
import torch

import sparsediff
from sparsediff.layout import TokenLayout
from sparsediff.patterns import get_pattern
from sparsediff.pipelines.adapter import fingerprint
from sparsediff.plan import SparsePlan

import pipeline_factories

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")  # Mochi's RoPE, harmless on CPU

BLOCK = 8
PATTERN = "diagonal_w0.5"

# Layouts of the joint attention per (family, cache context), from the factories' sizes and text masks.
LAYOUTS = {
    "wan": {"cond": ["video:3x4x4"], "uncond": ["video:3x4x4"]},
    "wan22": {"cond": ["video:3x4x4"], "uncond": ["video:3x4x4"]},
    "cogvideox": {"cond_uncond": ["text:16+video:3x4x4"]},
    "hunyuan_video": {"cond": ["video:3x4x4+text:9"], "uncond": ["video:3x4x4+text:6"]},
    "ltx": {"cond_uncond": ["video:3x8x8"]},
    "mochi": {"cond_uncond": ["video:3x4x4+text:5", "video:3x4x4+text:11"]},  # one SDPA call per sample
}
SOURCES = {"wan": "cache_context", "wan22": "cache_context"}  # the others match the timestep to the scheduler


@pytest.fixture(scope="module", params=pipeline_factories.FAMILIES)
def family(request):
    pipe, call_kwargs = pipeline_factories.make(request.param)
    reference = pipe(**call_kwargs()).frames
    return request.param, pipe, call_kwargs, reference


def processors(pipe):
    return [m.processor for name in ("transformer", "transformer_2") if getattr(pipe, name, None) is not None
            for m in getattr(pipe, name).modules() if hasattr(m, "processor")]


def test_all_full_plan_is_exact_and_remove_restores(family):
    name, pipe, call_kwargs, reference = family
    before = processors(pipe)
    for plan in (None, SparsePlan.dense(fingerprint(pipe.transformer), block_size=BLOCK)):
        handle = sparsediff.accelerate(pipe, plan)
        assert processors(pipe) != before
        assert torch.equal(pipe(**call_kwargs()).frames, reference)
        assert handle.stats and all(s.dense and s.density == 1.0 for s in handle.stats)
        handle.remove()
        assert all(a is b for a, b in zip(processors(pipe), before, strict=True))
        assert pipe.transformer._diffusers_hook.get_hook("sparsediff") is None
        assert "forward" not in vars(pipe.transformer)  # the class's forward again
    assert torch.equal(pipe(**call_kwargs()).frames, reference)


def test_sparse_plan_runs_sparse_after_dense_steps(family):
    name, pipe, call_kwargs, reference = family
    plan = SparsePlan.uniform(fingerprint(pipe.transformer), PATTERN, block_size=BLOCK, dense_steps=1)
    with sparsediff.accelerate(pipe, plan) as handle:
        out = pipe(**call_kwargs()).frames
        stats = handle.stats
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, reference)
    num_steps = call_kwargs()["num_inference_steps"]
    for s in stats:
        layer_density = sum(get_pattern(PATTERN).density(TokenLayout.parse(l), BLOCK) for l in LAYOUTS[name][s.context])
        layer_density /= len(LAYOUTS[name][s.context])
        assert s.num_steps == num_steps
        if s.step == 0:
            assert s.dense and s.density == 1.0 and s.heads_sparse == 0
        else:
            assert not s.dense and s.density == pytest.approx(layer_density, abs=1e-6)
            assert s.heads_sparse == s.layers * pipe.transformer.config.num_attention_heads
        assert s.attention_ms > 0
    assert torch.equal(pipe(**call_kwargs()).frames, reference)


def test_guidance_branches_count_steps(family):
    name, pipe, call_kwargs, reference = family
    with sparsediff.accelerate(pipe) as handle:
        pipe(**call_kwargs())
        first = [(s.model, s.context, s.step) for s in handle.stats]
        pipe(**call_kwargs())  # a second run starts a fresh log
        stats = handle.stats
    assert [(s.model, s.context, s.step) for s in stats] == first
    num_steps = call_kwargs()["num_inference_steps"]
    assert {s.source for s in stats} == {SOURCES.get(name, "timestep")}
    for context in LAYOUTS[name]:
        steps = [s.step for s in stats if s.context == context]
        assert steps == list(range(num_steps)), context
    if name == "wan22":  # high-noise steps on transformer, the rest on transformer_2
        models = [s.model for s in stats if s.context == "cond"]
        assert models[0] == "transformer" and models[-1] == "transformer_2"
        assert models == sorted(models)


@pytest.mark.parametrize("name", pipeline_factories.FAMILIES)
def test_every_family_runs_in_bfloat16(name):
    """As diffusers users load them: the whole pipeline in bfloat16. An all-full plan leaves it bit for bit as it was;
    a sparse plan runs sparse (on the CPU through the compiled kernel in float32, rounded back, or through SDPA on a CPU
    with AMX) and stays finite."""
    pipe, call_kwargs = pipeline_factories.make(name)
    pipe.to(dtype=torch.bfloat16)

    def call():  # the factories' precomputed prompt embeddings are float32
        return {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in call_kwargs().items()}

    with torch.no_grad():
        reference = pipe(**call()).frames
        with sparsediff.accelerate(pipe, SparsePlan.dense(fingerprint(pipe.transformer), block_size=BLOCK)):
            assert torch.equal(pipe(**call()).frames, reference)
        plan = SparsePlan.uniform(fingerprint(pipe.transformer), PATTERN, block_size=BLOCK, dense_steps=1)
        with sparsediff.accelerate(pipe, plan, backend="torch") as handle:
            out = pipe(**call()).frames
            stats = handle.stats
    assert torch.isfinite(torch.as_tensor(out)).all()
    assert any(not s.dense and s.heads_sparse > 0 for s in stats)
