"""accelerate() on bare transformers, its error messages, diffusers' switches, and the padded-text attention path."""

from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

import pipeline_factories
import sparsediff
from sparsediff.kernels.reference import reference_attention
from sparsediff.patterns import PATTERNS, Diagonal, get_pattern, register_pattern
from sparsediff.pipelines.controllers import PlanController
from sparsediff.pipelines.processor import token_groups
from sparsediff.pipelines.adapter import fingerprint
from sparsediff.pipelines.state import CallState, RunLog
from sparsediff.plan import SparsePlan, StepRange


@pytest.fixture(scope="module")
def wan_model():
    return pipeline_factories.wan_transformer()


def wan_inputs(seed=0, frames=3, size=8):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 16, frames, size, size, generator=g),  # -> frames x size/2 x size/2 tokens
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 16, 32, generator=g),
    )


def run_step(model, context, seed=0):
    with model.cache_context(context):
        return model(**wan_inputs(seed), return_dict=False)[0]


def test_bare_model_counts_steps_per_context_and_wraps(wan_model):
    plan = SparsePlan.uniform(fingerprint(wan_model), "skip", block_size=8, dense_steps=1)
    with sparsediff.accelerate(wan_model, plan, num_steps=2) as handle:
        for _ in range(2):
            run_step(wan_model, "cond")
            run_step(wan_model, "uncond")
        seen = [(s.context, s.step, s.dense, s.heads_skipped, s.source) for s in handle.stats]
        assert seen == [("cond", 0, True, 0, "count"), ("uncond", 0, True, 0, "count"),
                        ("cond", 1, False, 4, "count"), ("uncond", 1, False, 4, "count")]
        assert all(s.density == 0.0 for s in handle.stats if not s.dense)
        run_step(wan_model, "cond")  # the count wraps at num_steps: a new run begins
        assert [(s.context, s.step) for s in handle.stats] == [("cond", 0)]
        handle.reset()
        assert handle.stats == []
        run_step(wan_model, "uncond")
        assert [(s.context, s.step) for s in handle.stats] == [("uncond", 0)]
        assert handle.summary()["calls"] == 1


def test_dense_layers_of_the_plan_stay_dense(wan_model):
    plan = SparsePlan.uniform(fingerprint(wan_model), "skip", block_size=8, dense_layers=(0,))
    with sparsediff.accelerate(wan_model, plan, num_steps=1) as handle:
        run_step(wan_model, "cond")
        (s,) = handle.stats
    assert not s.dense and s.density == 0.5 and s.heads_skipped == 2 and s.layers == 2  # layer 0 full, layer 1 skipped


def test_a_layer_the_plan_made_all_full_runs_in_the_compiled_kernel_but_a_dense_layer_is_the_models_own(wan_model):
    """In a sparse step, a layer whose heads the search left all `full` runs dense through the compiled CPU kernel (as
    full heads beside sparse ones do: its GEMMs are at least as fast as SDPA's); the plan's dense steps and layers,
    and every call without the kernel, stay the model's own attention, bit for bit."""
    from sparsediff.kernels import cpu_kernel

    fp = fingerprint(wan_model)
    full, skip = ((get_pattern(n),) * fp.num_heads for n in ("full", "skip"))
    assigned = SparsePlan(model=fp, ranges=[StepRange(0.0, 1.0, (full, skip))], block_size=8)
    dense_layer = SparsePlan(model=fp, ranges=[StepRange(0.0, 1.0, (skip, skip))], block_size=8, dense_layers=(0,))

    def run(plan):
        with sparsediff.accelerate(wan_model, plan, num_steps=1) as handle, torch.no_grad():  # as pipelines run
            out = run_step(wan_model, "cond")
            (s,) = handle.stats
        return out, s

    own, s = run(dense_layer)
    assert s.heads_full == 0 and s.heads_skipped == fp.num_heads  # layer 0: the model's own call (no runtime stats)
    out, s = run(assigned)
    assert s.heads_full == (fp.num_heads if cpu_kernel.runs(torch.float32) else 0) and s.heads_skipped == fp.num_heads
    torch.testing.assert_close(out, own, rtol=1e-4, atol=1e-5)
    with cpu_kernel.disabled():
        out, s = run(assigned)
    assert s.heads_full == 0 and torch.equal(out, own)  # without the kernel the runtime would run SDPA: the model's own


def test_bare_model_all_full_is_exact_and_remove_restores_identity(wan_model):
    before = [m.processor for m in wan_model.modules() if hasattr(m, "processor")]
    reference = run_step(wan_model, "cond")
    handle = sparsediff.accelerate(wan_model)
    assert torch.equal(run_step(wan_model, "cond"), reference)
    handle.remove()
    handle.remove()  # a second remove is a no-op
    after = [m.processor for m in wan_model.modules() if hasattr(m, "processor")]
    assert all(a is b for a, b in zip(after, before, strict=True))


def test_remove_releases_the_compiled_cpu_paths_scratch_buffers(wan_model):
    from sparsediff import runtime
    from sparsediff.kernels import cpu_kernel

    if cpu_kernel.load() is None:
        pytest.skip(f"the compiled CPU kernel did not load here: {cpu_kernel.reason()}")
    runtime.release_scratch()
    plan = SparsePlan.uniform(fingerprint(wan_model), "diagonal_w1", block_size=8)
    with torch.no_grad(), sparsediff.accelerate(wan_model, plan, num_steps=1, backend="torch") as handle:
        run_step(wan_model, "cond")
        assert not handle.stats[0].dense
        held = dict(runtime._scratch_pool)
        assert held  # the layer's K^T, kept for the next call
    assert runtime._scratch_pool == {} and runtime.release_scratch() == 0


def test_accelerate_loads_the_compiled_cpu_kernel_before_the_first_step(wan_model, monkeypatch):
    # the one-off build (20-40 s on a new machine) must fall in accelerate(), not in a timed or first denoising step
    from sparsediff.kernels import cpu_kernel

    monkeypatch.setattr(cpu_kernel, "_state", {})  # as in a new process: nothing loaded yet
    fp = fingerprint(wan_model)
    with sparsediff.accelerate(wan_model, SparsePlan.dense(fp, block_size=8), backend="torch"):
        assert "module" not in cpu_kernel._state  # a dense plan never needs it
    with sparsediff.accelerate(wan_model, SparsePlan.uniform(fp, "diagonal_w1", block_size=8), backend="flex", num_steps=1):
        assert "module" not in cpu_kernel._state  # nor another backend
    with sparsediff.accelerate(wan_model, SparsePlan.uniform(fp, "diagonal_w1", block_size=8), backend="torch", num_steps=1):
        assert "module" in cpu_kernel._state  # loaded (or its failure recorded) before any forward


def test_attention_backend_switch_reaches_the_original_processor(wan_model):
    from diffusers.models.attention_dispatch import AttentionBackendName

    reference = run_step(wan_model, "cond")
    original = wan_model.blocks[0].attn1.processor
    handle = sparsediff.accelerate(wan_model)
    wan_model.set_attention_backend("native")
    assert wan_model.blocks[0].attn1.processor._attention_backend == AttentionBackendName.NATIVE
    assert torch.equal(run_step(wan_model, "cond"), reference)
    handle.remove()
    assert wan_model.blocks[0].attn1.processor is original
    assert original._attention_backend == AttentionBackendName.NATIVE  # the user's choice survives remove()
    wan_model.reset_attention_backend()


def test_accelerating_twice_raises_with_the_fix(wan_model):
    with sparsediff.accelerate(wan_model):
        with pytest.raises(ValueError, match=r"already accelerated .*call \.remove\(\) on the existing handle first"):
            sparsediff.accelerate(wan_model)
        with pytest.raises(ValueError, match="already accelerated"):
            sparsediff.profile(wan_model, wan_inputs(), progress=False)


def test_unsupported_models_name_the_supported_families():
    with pytest.raises(ValueError, match=r"no adapter for Linear; it supports the diffusers pipelines WanPipeline.*MochiPipeline.*MochiTransformer3DModel"):
        sparsediff.accelerate(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"no adapter for SimpleNamespace \(its transformer is a Linear\)"):
        sparsediff.accelerate(SimpleNamespace(transformer=torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"no adapter for SimpleNamespace \(its unet is a Linear\); it supports .*HunyuanVideoPipeline"):
        sparsediff.accelerate(SimpleNamespace(unet=torch.nn.Linear(2, 2)))


def test_plan_for_another_model_is_refused(wan_model):
    other = pipeline_factories.wan_transformer(num_layers=3)
    plan = SparsePlan.uniform(fingerprint(other), "diagonal_w1", block_size=8)
    with pytest.raises(ValueError, match=r"made for another model: model.num_layers is 3 in the plan but 2 for this model"):
        sparsediff.accelerate(wan_model, plan, num_steps=2)
    registry = getattr(wan_model, "_diffusers_hook", None)
    assert registry is None or registry.get_hook("sparsediff") is None  # nothing was installed


def test_bad_options_raise_one_sentence(wan_model, tmp_path):
    plan = SparsePlan.uniform(fingerprint(wan_model), "diagonal_w1", block_size=8)
    with pytest.raises(ValueError, match=r"needs num_steps .*pass num_steps="):
        sparsediff.accelerate(wan_model, plan)
    with pytest.raises(ValueError, match=r"backend='cuda' is not a sparsediff backend"):
        sparsediff.accelerate(wan_model, backend="cuda")
    with pytest.raises(ValueError, match=r"plan names \['transformer_3'\]"):
        sparsediff.accelerate(wan_model, {"transformer_3": plan})
    with pytest.raises(ValueError, match="does not exist"):
        sparsediff.accelerate(wan_model, tmp_path / "missing.json")
    path = plan.save(tmp_path / "plan.json")  # a path works as well as a plan
    with sparsediff.accelerate(wan_model, str(path), num_steps=1) as handle:
        run_step(wan_model, "cond")
        assert not handle.stats[0].dense


@dataclass(frozen=True)
class FixedWindow(Diagonal):
    """A test pattern whose parameters only hold on its calibration layout (registered inside its test only)."""

    kind: ClassVar[str] = "fixed_window"
    layout_bound: ClassVar[bool] = True


def test_layout_bound_plan_refuses_another_layout(wan_model):
    register_pattern(FixedWindow)
    try:
        fp = fingerprint(wan_model)
        with pytest.raises(ValueError, match="records no calibration layout"):
            sparsediff.accelerate(wan_model, SparsePlan.uniform(fp, FixedWindow(1.0), block_size=8), num_steps=1)
        plan = SparsePlan.uniform(fp, FixedWindow(1.0), block_size=8, layout="video:3x4x4")
        with sparsediff.accelerate(wan_model, plan, num_steps=1) as handle:
            run_step(wan_model, "cond")  # the calibration layout runs
            assert not handle.stats[0].dense
            with pytest.raises(ValueError, match=r"tied to its calibration layout video:3x4x4, but the model now runs on layout video:3x8x8"):
                with wan_model.cache_context("cond"):
                    wan_model(**wan_inputs(size=16))
    finally:
        PATTERNS.pop(FixedWindow.kind)


def test_padded_text_groups_match_the_masked_reference():
    """HunyuanVideo's key-padding mask: rows grouped by valid length, padded queries attend valid keys densely."""
    torch.manual_seed(0)
    state = CallState(model="transformer", text="after", grid=(2, 2, 4))  # 16 video tokens, then text
    B, H, S, D = 3, 2, 24, 8
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    lengths = [20, 24, 20]
    mask = (torch.arange(S)[None] < torch.tensor(lengths)[:, None])[:, None, None]  # (B, 1, 1, S)
    patterns = (get_pattern("full"), get_pattern("diagonal_w0.5"))
    layers = ((patterns[0], patterns[1]),)
    plan = SparsePlan(model=fingerprint_like(H, D), ranges=[StepRange(0.0, 1.0, layers)], block_size=4)
    groups = token_groups(state, q, mask)
    assert [(None if rows is None else rows.tolist(), str(layout)) for rows, layout in groups] == [
        ([0, 2], "video:2x2x4+text:4"), ([1], "video:2x2x4+text:8")
    ]
    state.num_steps = 1
    out, replaced = PlanController(plan, 1, RunLog(), backend="reference").attend(0, state, q, k, v, groups)
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    for b, n in enumerate(lengths):
        layout = state.layout(n)
        masks = torch.stack([p.token_mask(layout, 4) for p in patterns])
        expect = reference_attention(q[b : b + 1, :, :n], k[b : b + 1, :, :n], v[b : b + 1, :, :n], masks)
        torch.testing.assert_close(out[b : b + 1, :, :n], expect, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[b, :, n:], masked[b, :, n:], atol=1e-5, rtol=1e-5)  # padded queries
    torch.testing.assert_close(out[:, 0], masked[:, 0], atol=1e-5, rtol=1e-5)  # the full head is the masked SDPA
    assert replaced.heads_sparse == 1 and 0.5 < replaced.density < 1.0


def fingerprint_like(heads, head_dim):
    from sparsediff.plan import ModelFingerprint

    return ModelFingerprint("HunyuanVideoTransformer3DModel", 1, heads, head_dim, "test")


def test_wan22_plan_per_transformer():
    pipe, call_kwargs = pipeline_factories.make("wan22")
    plan = SparsePlan.uniform(fingerprint(pipe.transformer_2), "skip", block_size=8)
    with sparsediff.accelerate(pipe, {"transformer_2": plan}) as handle:
        pipe(**call_kwargs())
        by_model = {(s.model, s.dense) for s in handle.stats}
    assert by_model == {("transformer", True), ("transformer_2", False)}  # the high-noise expert left dense


def test_plan_resolution_is_one_rule(wan_model, tmp_path):
    """"auto": the model's shipped plan, else dense; "dense"/None: dense; a path or a SparsePlan; bad values named."""
    from sparsediff.api import resolve_plan

    plan = SparsePlan.uniform(fingerprint(wan_model), "diagonal_w1", block_size=8)
    assert resolve_plan(wan_model, "auto") is None and resolve_plan(wan_model, "dense") is None
    assert resolve_plan(wan_model, None) is None and resolve_plan(wan_model, plan) is plan
    plan.save(tmp_path / "plan.json")
    assert resolve_plan(wan_model, str(tmp_path / "plan.json")) == plan
    shipping = SimpleNamespace(transformer=wan_model, shipped_plan=lambda: plan)
    assert resolve_plan(shipping, "auto") is plan and resolve_plan(shipping, "dense") is None
    assert resolve_plan(shipping, {"transformer": "auto"}) == {"transformer": plan}
    with pytest.raises(ValueError, match=r"plan=3 is not a plan; give \"auto\""):
        resolve_plan(wan_model, 3)
    with sparsediff.accelerate(shipping) as handle:  # accelerate's default is "auto": the shipped plan
        assert handle.config.plan is plan


def test_a_plan_applies_at_another_size(wan_model, caplog):
    """Pattern parameters are in layout units (frames, spatial tokens), so one plan runs at any resolution or frame
    count: at each size every head runs its pattern on that size's layout, as the reference backend computes it. At a
    size other than the searched one a warning says its quality was checked only there (once per layout)."""
    import logging

    from sparsediff.layout import TokenLayout

    names = ["diagonal_w1", "multi_diagonal_w1"]
    layers = tuple(tuple(get_pattern(n) for n in names) for _ in range(2))
    plan = SparsePlan(model=fingerprint(wan_model), ranges=[StepRange(0.0, 1.0, layers)], block_size=8,
                      layout="video:3x4x4")  # searched at the small size
    for frames, size in ((3, 8), (5, 16)):
        layout = TokenLayout.parse(f"video:{frames}x{size // 2}x{size // 2}")
        outs = {}
        caplog.clear()
        for backend in ("torch", "reference"):
            with caplog.at_level(logging.WARNING, logger="sparsediff"):
                with sparsediff.accelerate(wan_model, plan, backend=backend, num_steps=1) as handle:
                    with wan_model.cache_context("cond"):
                        outs[backend] = wan_model(**wan_inputs(frames=frames, size=size), return_dict=False)[0]
                    stats = handle.stats[0]
        warned = [r.getMessage() for r in caplog.records if "was searched on video layout 3x4x4" in r.getMessage()]
        assert len(warned) == (0 if str(layout) == plan.layout else 1), warned
        assert not warned or f"now runs on {layout}" in warned[0]
        expect = sum(get_pattern(n).density(layout, 8) for n in names) / len(names)
        assert not stats.dense and stats.density == pytest.approx(expect, abs=1e-9)
        torch.testing.assert_close(outs["torch"], outs["reference"], rtol=1e-4, atol=1e-5)
