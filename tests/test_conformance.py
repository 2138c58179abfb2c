"""Adapter conformance: every registered adapter, on every model family it serves, keeps the contract of the seam.

For each case (an adapter and one tiny pipeline of a family it serves, built once per module): the adapter is found
and reads the model's shape; dense plans are bit-exact; `.remove()` gives back the very processors, hooks and
diffusers attention settings; a second `accelerate` is refused and changes nothing; an exception in the middle of a
run leaves nothing behind; and a plan mixing patterns and skipped heads runs the same on the torch backend as on the
reference one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

import sparsediff
from sparsediff.api import resolve_plan
from sparsediff.patterns import get_pattern
from sparsediff.pipelines.adapter import ADAPTERS, adapter_for, fingerprint, supported
from sparsediff.pipelines.families import FAMILIES, family_of
from sparsediff.pipelines.processor import SparseAttnProcessor
from sparsediff.plan import SparsePlan, StepRange

import pipeline_factories

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")  # Mochi's RoPE, harmless on CPU

BLOCK = 8
MIXED = ("diagonal_w0.5", "skip", "vertical_stripe_f1", "multi_diagonal_w1", "full")  # cycled over heads and layers
# torch vs reference kernels differ by < 5e-6 on these outputs (|x| <= 6); one head on another pattern moves them by
# > 1e-2. The tolerance sits between, with a margin of 20x on either side.
ATOL = RTOL = 1e-4
ALREADY = r"already accelerated or profiled by sparsediff; call \.remove\(\) on the existing handle first"
HOOK = "sparsediff"
MISSING = object()


def embedded():
    """sparsediff's own pipeline (a Wan transformer in pixel space), untrained and tiny: 2 x 8 x 8 = 128 tokens."""
    from sparsediff.pipelines.embedded.pipeline import EmbeddedModelConfig, build_pipeline

    pipe = build_pipeline(EmbeddedModelConfig(num_layers=2, num_heads=2, head_dim=12, text_dim=16, ffn_dim=32))

    def call_kwargs(**overrides):
        kwargs = dict(
            prompt=["a red circle moving right"],
            num_inference_steps=3,
            height=16,
            width=16,
            num_frames=2,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",  # raw pixels: "np" would clamp differences away
        )
        return {**kwargs, **overrides}

    return pipe, call_kwargs


@dataclass(frozen=True)
class Case:
    """One pipeline an adapter serves, with the shape its factory gave each denoiser (layers, heads, head dim)."""

    adapter: str
    family: str
    name: str
    denoisers: tuple[str, ...]
    shape: tuple[int, int, int]
    build: Callable[[], tuple[Any, Callable[..., dict]]]

    @property
    def id(self) -> str:
        return f"{self.adapter}-{self.name}"


def _factory(name: str):
    return lambda: pipeline_factories.make(name)


CASES = [
    Case("diffusers_video", "wan", "wan", ("transformer",), (2, 2, 12), _factory("wan")),
    Case("diffusers_video", "wan", "wan22", ("transformer", "transformer_2"), (2, 2, 12), _factory("wan22")),
    Case("diffusers_video", "cogvideox", "cogvideox", ("transformer",), (2, 4, 8), _factory("cogvideox")),
    # HunyuanVideo: one dual-stream and one single-stream block.
    Case("diffusers_video", "hunyuan_video", "hunyuan_video", ("transformer",), (2, 2, 10), _factory("hunyuan_video")),
    Case("diffusers_video", "ltx", "ltx", ("transformer",), (2, 4, 8), _factory("ltx")),
    Case("diffusers_video", "mochi", "mochi", ("transformer",), (2, 2, 8), _factory("mochi")),
    Case("diffusers_video", "wan", "embedded", ("transformer",), (2, 2, 12), embedded),
]


@dataclass
class Subject:
    case: Case
    pipe: Any
    call: Callable[..., dict]
    reference: torch.Tensor  # the unwrapped pipeline's output

    @property
    def models(self) -> dict[str, torch.nn.Module]:
        return {name: getattr(self.pipe, name) for name in self.case.denoisers}

    @property
    def num_steps(self) -> int:
        return self.call()["num_inference_steps"]

    def run(self, **overrides) -> torch.Tensor:
        out = self.pipe(**self.call(**overrides)).frames
        assert torch.is_tensor(out)
        return out

    @functools.cached_property
    def sparse(self) -> tuple[torch.Tensor, list]:
        """Output and stats of one clean run under `plan_for(self)` on the torch backend (the tests compare to it)."""
        with sparsediff.accelerate(self.pipe, plan_for(self), backend="torch") as handle:
            return self.run(), handle.stats


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.id)
def subject(request) -> Subject:
    pipe, call = request.param.build()
    subject = Subject(request.param, pipe, call, reference=None)
    subject.reference = subject.run()
    return subject


# ---- helpers ---------------------------------------------------------------------------------------------------------


def mixed_plan(fp, change: tuple[int, int, str] | None = None) -> SparsePlan:
    """Head h of layer l runs MIXED[(l * heads + h) % 5]; `change=(layer, head, pattern)` puts one head on another."""
    layers = [[MIXED[(l * fp.num_heads + h) % len(MIXED)] for h in range(fp.num_heads)] for l in range(fp.num_layers)]
    if change is not None:
        layer, head, pattern = change
        layers[layer][head] = pattern
    patterns = tuple(tuple(get_pattern(p) for p in layer) for layer in layers)
    return SparsePlan(model=fp, ranges=[StepRange(0.0, 1.0, patterns)], block_size=BLOCK, dense_steps=1).validate()


def plan_for(subject: Subject) -> SparsePlan:
    return mixed_plan(fingerprint(subject.pipe.transformer))


def snapshot(subject: Subject) -> dict:
    """What `.remove()` must give back, per denoiser: each attention module's processor object and that processor's
    instance attributes (diffusers' `_attention_backend` / `_parallel_config` among them), the hook registry object
    and its hook names, and the instance `forward` (a hook's) if any."""
    state = {}
    for name, model in subject.models.items():
        registry = getattr(model, "_diffusers_hook", MISSING)
        state[name] = {
            "processors": [(m, m.processor, dict(vars(m.processor))) for m in model.modules() if hasattr(m, "processor")],
            "registry": registry,
            "hooks": list(registry.hooks) if registry is not MISSING else None,
            "forward": vars(model).get("forward", MISSING),
        }
    return state


def assert_same_state(subject: Subject, before: dict) -> None:
    after = snapshot(subject)
    for name, want in before.items():
        got = after[name]
        assert len(got["processors"]) == len(want["processors"]), name
        for (module, processor, attrs), (_, now, now_attrs) in zip(want["processors"], got["processors"]):
            assert now is processor, f"{name}: {type(module).__name__} has {type(now).__name__}, not its own back"
            assert now_attrs.keys() == attrs.keys(), f"{name}: processor attributes {sorted(now_attrs)} != {sorted(attrs)}"
            assert all(now_attrs[k] is v for k, v in attrs.items()), f"{name}: processor attributes {now_attrs} != {attrs}"
        change = "created" if want["registry"] is MISSING else "replaced or deleted"
        assert got["registry"] is want["registry"], f"{name}: _diffusers_hook {change}"
        assert got["hooks"] == want["hooks"], name
        assert got["forward"] is want["forward"], f"{name}: instance forward changed"


def assert_clean(subject: Subject) -> None:
    """No trace of sparsediff in any denoiser."""
    adapter = adapter_for(subject.pipe)
    for name, model in subject.models.items():
        assert not adapter.is_installed(model), name
        registry = getattr(model, "_diffusers_hook", None)
        assert registry is None or registry.get_hook(HOOK) is None, name
        assert not any(isinstance(m.processor, SparseAttnProcessor) for m in model.modules() if hasattr(m, "processor")), name


def steps_per_context(stats) -> dict[str, list[int]]:
    """Step indices recorded per cache context, in run order (Wan 2.2 splits a context over two denoisers)."""
    steps: dict[str, list[int]] = {}
    for s in stats:
        steps.setdefault(s.context, []).append(s.step)
    return steps


def keys(stats) -> list[tuple]:
    return [(s.model, s.context, s.step, s.dense, s.heads_skipped, s.heads_sparse, s.heads_full, s.layers) for s in stats]


class StopAt(Exception):
    pass


def stop_at(step: int):
    def callback(pipe, i, t, tensors):
        if i == step:
            raise StopAt(f"stopped at step {i}")
        return tensors

    return dict(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"])


class CountingHook(ModelHook):
    """Another library's hook on the denoiser: counts forwards, changes nothing."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


# ---- 0. every adapter and family has a case --------------------------------------------------------------------------


def test_every_registered_adapter_and_family_has_a_case():
    supported()  # loads the built-in adapters
    # The transformers adapter's models are not video pipelines (no frames, no processors): the same contract is
    # checked for it on a bidirectional Llama in tests/test_transformers_adapter.py, and for the latent-set adapter
    # (the reconstructor's deformation denoiser) in tests/test_reconstruct_adapter.py.
    assert {c.adapter for c in CASES} | {"transformers", "latent_sets"} == set(ADAPTERS)
    served = {c.family for c in CASES if c.adapter == "diffusers_video"}
    assert served == set(FAMILIES), f"families without a conformance case: {sorted(set(FAMILIES) - served)}"


# ---- 1. the adapter is found and reads the model ---------------------------------------------------------------------


def test_adapter_is_registered_matches_and_fingerprints(subject):
    case, pipe = subject.case, subject.pipe
    adapter = adapter_for(pipe)
    assert adapter.name == case.adapter and ADAPTERS[adapter.name] is adapter
    assert adapter.matches(pipe)
    denoisers = adapter.denoisers(pipe)
    assert list(denoisers) == list(case.denoisers)
    layers, heads, head_dim = case.shape
    for name, model in denoisers.items():
        assert model is getattr(pipe, name)
        assert adapter.matches(model) and adapter_for(model) is adapter
        assert family_of(model).name == case.family
        fp = fingerprint(model)
        assert fp == adapter.fingerprint(model)
        assert (fp.model_class, fp.num_layers, fp.num_heads, fp.head_dim) == (type(model).__name__, layers, heads, head_dim)
    assert adapter.shipped_plan(pipe) is None  # built in code: nothing shipped,
    assert resolve_plan(pipe, "auto") is None  # so plan="auto" is dense


# ---- 2. dense plans are bit-exact ------------------------------------------------------------------------------------


@pytest.mark.parametrize("plan", ["dense", None, "all_full"])
def test_dense_plans_are_bit_exact(subject, plan):
    if plan == "all_full":
        fp = fingerprint(subject.pipe.transformer)
        full = tuple(tuple(get_pattern("full") for _ in range(fp.num_heads)) for _ in range(fp.num_layers))
        plan = SparsePlan(model=fp, ranges=[StepRange(0.0, 1.0, full)], block_size=BLOCK)
    with sparsediff.accelerate(subject.pipe, plan) as handle:
        out = subject.run()
        stats = handle.stats
    assert torch.equal(out, subject.reference)
    assert stats and all(s.dense and s.density == 1.0 and s.heads_skipped == s.heads_sparse == 0 for s in stats)
    assert {s.model for s in stats} == set(subject.case.denoisers)
    assert_clean(subject)


# ---- 3. .remove() restores exactly -----------------------------------------------------------------------------------


def test_remove_restores_processors_hooks_and_output(subject):
    """Whether or not the denoiser had diffusers' `_diffusers_hook` before (pipelines that run it in
    `cache_context`, as Wan's do, create an empty one on their first call)."""
    adapter, sparse = adapter_for(subject.pipe), subject.sparse[0]
    for model in subject.models.values():
        if hasattr(model, "_diffusers_hook"):
            assert not model._diffusers_hook.hooks
            del model._diffusers_hook
        assert "forward" not in vars(model)
    before = snapshot(subject)
    handle = sparsediff.accelerate(subject.pipe, plan_for(subject), backend="torch")
    try:
        assert all(adapter.is_installed(m) for m in subject.models.values())
        for name, state in snapshot(subject).items():
            pairs = zip(state["processors"], before[name]["processors"])
            wrapped = [(now, original) for (_, now, _), (_, original, _) in pairs if now is not original]
            assert len(wrapped) == subject.case.shape[0]  # each video self-attention layer, nothing else
            assert all(isinstance(p, SparseAttnProcessor) and p.original is original for p, original in wrapped)
        assert torch.equal(subject.run(), sparse)
    finally:
        handle.remove()
    assert_same_state(subject, before)  # `_diffusers_hook` absent again
    assert_clean(subject)
    assert torch.equal(subject.run(), subject.reference)
    handle.remove()  # a second remove is a no-op
    assert_clean(subject)

    for model in subject.models.values():  # now with a registry there before
        HookRegistry.check_if_exists_or_initialize(model)
    before = snapshot(subject)
    with sparsediff.accelerate(subject.pipe, plan_for(subject), backend="torch"):
        subject.run()
    assert_same_state(subject, before)  # the same registry object, and no instance forward
    assert_clean(subject)


def test_remove_keeps_another_hook(subject):
    """A hook another library put on the denoiser first stays, with its forward, and keeps running."""
    others = {}
    for name, model in subject.models.items():
        others[name] = CountingHook()
        HookRegistry.check_if_exists_or_initialize(model).register_hook(others[name], "other")
    try:
        before = snapshot(subject)
        with sparsediff.accelerate(subject.pipe, plan_for(subject), backend="torch"):
            subject.run()
        assert_same_state(subject, before)
        assert_clean(subject)
        counts = {name: hook.calls for name, hook in others.items()}
        assert torch.equal(subject.run(), subject.reference)
        assert all(hook.calls > counts[name] for name, hook in others.items())
    finally:
        for model in subject.models.values():
            model._diffusers_hook.remove_hook("other", recurse=False)
            vars(model).pop("forward", None)
            del model._diffusers_hook


def test_remove_restores_the_users_attention_backend(subject):
    """diffusers' `set_attention_backend` before accelerating: dense calls keep that backend, and `.remove()` hands
    it back on the very processor objects."""
    model = subject.pipe.transformer
    processor = family_of(model).self_attention(model)[0][1].processor
    if not hasattr(processor, "_attention_backend"):
        pytest.skip(
            f"{type(processor).__name__} has no _attention_backend (it calls F.scaled_dot_product_attention itself), "
            "so diffusers' set_attention_backend does not reach its video self-attention"
        )
    active = _AttentionBackendRegistry._active_backend  # set_attention_backend sets it process-wide too
    processors = [m.processor for pm in subject.models.values() for m in pm.modules() if hasattr(m, "processor")]
    saved = [(p, dict(vars(p))) for p in processors]
    try:
        for m in subject.models.values():
            m.set_attention_backend("_native_math")
        math_reference = subject.run()
        before = snapshot(subject)
        with sparsediff.accelerate(subject.pipe, "dense"):
            assert torch.equal(subject.run(), math_reference)  # dense calls run the user's backend
        assert_same_state(subject, before)
        with sparsediff.accelerate(subject.pipe, plan_for(subject), backend="torch"):
            subject.run()
        assert_same_state(subject, before)
        for m in subject.models.values():
            for _, module in family_of(m).self_attention(m):
                assert vars(module.processor)["_attention_backend"] is AttentionBackendName("_native_math")
                assert "_parallel_config" not in vars(module.processor)
        assert torch.equal(subject.run(), math_reference)
    finally:
        for p, attrs in saved:
            vars(p).clear()
            vars(p).update(attrs)
        _AttentionBackendRegistry.set_active_backend(active)


# ---- 4. a second accelerate is refused --------------------------------------------------------------------------------


def test_second_accelerate_is_refused_and_changes_nothing(subject):
    plan, sparse = plan_for(subject), subject.sparse[0]
    clean = snapshot(subject)
    with sparsediff.accelerate(subject.pipe, plan, backend="torch") as first:
        out = subject.run()
        stats = keys(first.stats)
        assert torch.equal(out, sparse)
        installed = snapshot(subject)
        for target in (subject.pipe, *subject.models.values()):
            with pytest.raises(ValueError, match=ALREADY):
                sparsediff.accelerate(target, "dense")
        assert_same_state(subject, installed)
        assert torch.equal(subject.run(), out)
        assert keys(first.stats) == stats
    assert_same_state(subject, clean)


def test_accelerate_installs_into_every_denoiser_or_none(subject):
    """With the last denoiser already accelerated on its own, accelerating the pipeline is refused before it
    touches any other denoiser."""
    *rest, last = subject.case.denoisers
    clean = snapshot(subject)
    with sparsediff.accelerate(getattr(subject.pipe, last), "dense"):
        with pytest.raises(ValueError, match=ALREADY):
            sparsediff.accelerate(subject.pipe, plan_for(subject), backend="torch")
        for name in rest:
            assert_same_state(subject, {name: clean[name]})
            assert not adapter_for(subject.pipe).is_installed(getattr(subject.pipe, name))
    assert_same_state(subject, clean)


# ---- 5. an exception in the middle of a run --------------------------------------------------------------------------


def test_exception_mid_run_leaves_a_fresh_log_and_a_clean_remove(subject):
    plan = plan_for(subject)
    sparse, clean_stats = subject.sparse[0], keys(subject.sparse[1])
    assert all(steps == list(range(subject.num_steps)) for steps in steps_per_context(subject.sparse[1]).values())

    before = snapshot(subject)
    handle = sparsediff.accelerate(subject.pipe, plan, backend="torch")
    try:
        with pytest.raises(StopAt):
            subject.run(**stop_at(1))
        assert all(steps == [0, 1] for steps in steps_per_context(handle.stats).values())
        assert torch.equal(subject.run(), sparse)  # still accelerated, and the next run starts afresh
        assert keys(handle.stats) == clean_stats
        with pytest.raises(StopAt):
            subject.run(**stop_at(1))
    finally:
        handle.remove()
    assert_same_state(subject, before)
    assert_clean(subject)
    for model in subject.models.values():
        assert "forward" not in vars(model)
    assert torch.equal(subject.run(), subject.reference)


# ---- 6. a mixed sparse plan: torch backend == reference backend --------------------------------------------------------


def test_mixed_plan_matches_the_reference_backend(subject):
    fp = fingerprint(subject.pipe.transformer)
    plan = mixed_plan(fp)
    outs, stats = {"torch": subject.sparse[0]}, {"torch": subject.sparse[1]}
    with sparsediff.accelerate(subject.pipe, plan, backend="reference") as handle:
        outs["reference"] = subject.run()
        stats["reference"] = handle.stats
    torch.testing.assert_close(outs["torch"], outs["reference"], atol=ATOL, rtol=RTOL)
    assert keys(stats["torch"]) == keys(stats["reference"])

    # The tolerance tells patterns apart: dense, or one head on another pattern, falls outside it.
    assert not torch.allclose(outs["torch"], subject.reference, atol=ATOL, rtol=RTOL)
    last = plan.ranges[0].layers[-1][-1].name
    one_head_off = mixed_plan(fp, (fp.num_layers - 1, fp.num_heads - 1, "full" if last != "full" else "skip"))
    with sparsediff.accelerate(subject.pipe, one_head_off, backend="torch"):
        assert not torch.allclose(subject.run(), outs["reference"], atol=ATOL, rtol=RTOL)

    names = [p.name for layer in plan.ranges[0].layers for p in layer]
    skipped, full = names.count("skip"), names.count("full")
    sparse_heads = len(names) - skipped - full
    assert skipped > 0
    for s in stats["torch"]:
        if s.step < plan.dense_steps:
            assert s.dense and s.heads_skipped == 0 and s.density == 1.0
        else:
            assert not s.dense and 0.0 < s.density < 1.0
            # Head counts are summed over attention calls: one per layer, or (may be) one per sample where a model
            # loops over its batch, as Mochi does for cond and uncond.
            calls, rest = divmod(s.layers, fp.num_layers)
            assert rest == 0 and (calls == 1 or (subject.case.family == "mochi" and calls == 2)), s.layers
            assert (s.heads_skipped, s.heads_sparse, s.heads_full) == (calls * skipped, calls * sparse_heads, calls * full)
    assert {s.step for s in stats["torch"]} == set(range(subject.num_steps))
