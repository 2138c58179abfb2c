"""Structure-aware fine-tuning of the embedded model (pipelines/embedded/structured.py) and its training phase."""

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from sparsediff.layout import TokenLayout
from sparsediff.patterns import get_pattern
from sparsediff.pipelines.embedded.pipeline import EmbeddedModelConfig, build_pipeline
from sparsediff.pipelines.embedded.structured import (
    AUTO_CANDIDATES,
    StructureController,
    StructuredHeads,
    check_head_patterns,
    choose_patterns,
    probe_head_errors,
    sparse_step,
)
from sparsediff.pipelines.embedded.train import TrainConfig, Trainer
from sparsediff.pipelines.processor import SparseAttnProcessor

from training_checks import assert_resume_repeats

TWO = EmbeddedModelConfig(num_layers=2, num_heads=2, head_dim=12, ffn_dim=32, text_dim=16, text_layers=1)
FRAMES, HEIGHT, WIDTH = 4, 8, 8  # 4 x 4 x 4 = 64 tokens


@pytest.fixture()
def pipe():
    return build_pipeline(TWO, seed=3)


def forward(pipe, seed=0):
    x = torch.randn(1, 3, FRAMES, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(seed))
    text = pipe.encode_prompt(["a red circle moving right"], 8, "cpu")
    return pipe.transformer(hidden_states=x, timestep=torch.tensor([700.0]), encoder_hidden_states=text, return_dict=False)[0]


def test_all_full_heads_reproduce_the_model_and_remove_restores_it(pipe):
    with torch.no_grad():
        before = forward(pipe)
        heads = StructuredHeads(pipe.transformer, [["full", "full"], ["full", "full"]])
        assert all(isinstance(b.attn1.processor, SparseAttnProcessor) for b in pipe.transformer.blocks)
        during = forward(pipe)
        heads.set_sparse(True)  # nothing to swap in: no head has a pattern
        swapped = forward(pipe)
        heads.remove()
        after = forward(pipe)
    assert torch.allclose(during, before, atol=1e-6, rtol=0)
    assert torch.equal(swapped, during)
    assert torch.equal(after, before)
    assert all(isinstance(b.attn1.processor, WanAttnProcessor) for b in pipe.transformer.blocks)
    assert float(heads.take_consistency()) == 0.0  # no patterned head: no loss collected


def test_consistency_is_the_relative_error_of_the_patterned_heads(pipe):
    heads = StructuredHeads(pipe.transformer, [["diagonal_w0.25", "full"], ["full", "vertical_stripe_f0.25"]])
    out = forward(pipe)
    loss = heads.take_consistency()
    assert float(loss.detach()) > 0.0 and torch.isfinite(loss)
    assert float(heads.take_consistency()) == 0.0  # taken: the list is empty again
    # a band wider than the clip covers every key: sparse equals dense, up to rounding
    heads.remove()
    wide = StructuredHeads(pipe.transformer, [["diagonal_w8", "full"], ["full", "full"]])
    forward(pipe)
    assert float(wide.take_consistency().detach()) < 1e-10
    wide.remove()
    # the loss pulls on the patterned heads' projections
    heads = StructuredHeads(pipe.transformer, [["diagonal_w0.25", "full"], ["full", "full"]])
    pipe.transformer.zero_grad()
    forward(pipe)
    heads.take_consistency().backward()
    grad = pipe.transformer.blocks[0].attn1.to_q.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert pipe.transformer.blocks[1].attn1.to_q.weight.grad is None  # layer 1 has no patterned head
    heads.remove()
    assert out.shape == (1, 3, FRAMES, HEIGHT, WIDTH)


def test_sparse_mode_passes_exactly_the_patterned_heads_sparse_output_on(pipe):
    layout = TokenLayout.parse(f"video:{FRAMES}x{HEIGHT // 2}x{WIDTH // 2}")
    seen = []
    heads = StructuredHeads(pipe.transformer, [["multi_diagonal_w1", "full"], ["full", "full"]])
    heads.set_sparse(True)
    controller = heads.shared

    def spy(layer, dense, q, k, v, layout, scale=None):  # the controller's own step, with its inputs and output kept
        out = StructureController.structured(controller, layer, dense, q, k, v, layout, scale)
        seen.append((dense, q, k, v, out))
        return out

    controller.structured = spy
    with torch.no_grad():
        forward(pipe)
    dense, q, k, v, out = seen[0]
    mask = get_pattern("multi_diagonal_w1").token_mask(layout)  # layout order
    scores = (q[:, 0] @ k[:, 0].transpose(-1, -2)) * q.shape[-1] ** -0.5
    expected = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v[:, 0]
    assert torch.allclose(out[:, 0], expected, atol=1e-5)
    assert torch.equal(out[:, 1], dense[:, 1])  # the full head is untouched
    assert not torch.allclose(out[:, 0], dense[:, 0], atol=1e-4)
    heads.remove()


@pytest.mark.parametrize(
    "patterns, match",
    [
        ([["full", "full"]], "2 layers of 2 heads"),
        ([["full"], ["full"]], "2 layers of 2 heads"),
        ([["topk_blocks_k0.25", "full"], ["full", "full"]], "cannot be trained"),
        ([["skip", "full"], ["full", "full"]], "cannot be trained"),
        ([["wobbly", "full"], ["full", "full"]], "wobbly"),
    ],
)
def test_bad_head_patterns_name_the_problem(patterns, match):
    with pytest.raises(ValueError, match=match):
        check_head_patterns(patterns, 2, 2)


def test_auto_candidates_are_cheap_at_the_generation_size():
    layout = TokenLayout.parse("video:8x32x32")
    assert check_head_patterns([AUTO_CANDIDATES], 1, len(AUTO_CANDIDATES))
    for name in AUTO_CANDIDATES:
        assert get_pattern(name).density(layout, 64) < 0.08


def test_probe_measures_each_head_and_the_choice_follows_it(pipe):
    before = forward(pipe)
    # a band wider than the clip is exact; a one-token stripe is not
    errors = probe_head_errors(pipe.transformer, lambda: forward(pipe), ["diagonal_w8", "vertical_stripe_f0.01"])
    assert errors.shape == (2, 2, 2)
    assert errors[..., 0].max() < 1e-5 and errors[..., 1].min() > 1e-3
    assert all(isinstance(b.attn1.processor, WanAttnProcessor) for b in pipe.transformer.blocks)  # removed again
    assert torch.equal(forward(pipe), before)
    # the exact band wins everywhere; layer 1's full head is the one whose band error (rounding noise) is larger
    worst = int(errors[1, :, 0].argmax())
    layer1 = tuple("full" if h == worst else "diagonal_w8" for h in range(2))
    assert choose_patterns(errors, ["diagonal_w8", "vertical_stripe_f0.01"], [0, 1]) == (("diagonal_w8",) * 2, layer1)
    with pytest.raises(ValueError, match="do not match"):
        choose_patterns(errors, ["diagonal_w8"], [0, 1])


def auto_run(**changes) -> TrainConfig:
    settings = dict(
        steps=4, batch_size=2, low_res=(2, 8, 8), full_res=(4, 8, 8), full_res_every=2, full_res_batch_size=1,
        warmup=1, checkpoint_every=2, model=TWO, seed=1, head_patterns="auto", structured_from=2,
        auto_candidates=("diagonal_w0.5", "vertical_stripe_f0.25"),
    )  # fmt: skip
    return TrainConfig(**{**settings, **changes})


def test_auto_assignment_is_probed_at_its_step_and_resumes_exactly(tmp_path):
    config = auto_run()
    assert config.auto_full_heads == (0, 0)  # default: one full head in every layer but the first and the last
    straight = Trainer(config, tmp_path / "straight")
    straight.run()
    assert ["consistency" in h for h in straight.history] == [False, False, True, True]
    assignment = straight.assignment
    assert len(assignment) == 2 and all(name in config.auto_candidates for layer in assignment for name in layer)
    errors = torch.tensor(straight.probe_errors)
    assert errors.shape == (2, 2, 2) and choose_patterns(errors, config.auto_candidates, (0, 0)) == assignment
    # stopped before the probe (it runs on resume at the same step) and after it (the assignment comes back)
    assert assert_resume_repeats(straight, tmp_path / "before", stop_at=1).assignment == assignment
    assert assert_resume_repeats(straight, tmp_path / "after", stop_at=3).assignment == assignment


def test_auto_assignment_settings_are_checked():
    with pytest.raises(ValueError, match="auto_full_heads"):
        auto_run(auto_full_heads=(0, 3))
    with pytest.raises(ValueError, match="structured_from"):
        auto_run(structured_from=4)
    with pytest.raises(ValueError, match="topk"):
        auto_run(auto_candidates=("topk_blocks_k0.25",))


def test_structure_training_flows_gradients_through_compiled_models(pipe):
    """Under torch.compile the processor calls a differentiable controller eagerly behind a graph break (the
    `sparsediff::attention` op has no backward): the loss reaches the attention projections, as it does eagerly."""
    heads = StructuredHeads(pipe.transformer, [["diagonal_w0.25", "full"], ["full", "vertical_stripe_f0.25"]])
    heads.set_sparse(True)
    eager = forward(pipe)
    eager.square().mean().backward()
    grad = pipe.transformer.blocks[0].attn1.to_q.weight.grad.clone()
    pipe.transformer.zero_grad()
    heads.take_consistency()
    pipe.transformer.compile(backend="eager", dynamic=False)
    try:
        compiled = forward(pipe)
        compiled.square().mean().backward()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(pipe.transformer.blocks[0].attn1.to_q.weight.grad, grad)
    assert float(heads.take_consistency().detach()) > 0


def test_sparse_steps_are_a_function_of_seed_and_step():
    draws = [sparse_step(1, s, 0.5) for s in range(200)]
    assert draws == [sparse_step(1, s, 0.5) for s in range(200)]
    assert 60 < sum(draws) < 140
    assert not any(sparse_step(1, s, 0.0) for s in range(50)) and all(sparse_step(1, s, 1.0) for s in range(50))


def fine_tune_run(init_from) -> TrainConfig:
    return TrainConfig(
        steps=4, batch_size=2, low_res=(2, 8, 8), full_res=(4, 8, 8), full_res_every=2, full_res_batch_size=1,
        warmup=1, checkpoint_every=2, model=TWO, seed=1, init_from=str(init_from),
        head_patterns=(("diagonal_w0.5", "full"), ("full", "multi_diagonal_w1")), sparse_prob=0.5,
    )  # fmt: skip


def test_fine_tuning_starts_from_saved_weights_and_resumes_exactly(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "base")
    config = fine_tune_run(tmp_path / "base")
    straight = Trainer(config, tmp_path / "straight")
    for a, b in zip(straight.pipe.transformer.parameters(), pipe.transformer.parameters()):
        assert torch.equal(a, b)
    straight.run()
    assert all("consistency" in h and h["consistency"] > 0 for h in straight.history)
    assert [h["sparse"] for h in straight.history] == [sparse_step(1, s, 0.5) for s in range(4)]

    assert_resume_repeats(straight, tmp_path / "resumed")
    # the shipped model is a plain Wan model: no training processors in it
    shipped = straight.ema_pipeline()
    assert all(isinstance(b.attn1.processor, WanAttnProcessor) for b in shipped.transformer.blocks)


def test_fine_tuning_refuses_weights_of_another_size(pipe, tmp_path):
    build_pipeline(EmbeddedModelConfig(num_layers=1, num_heads=2, head_dim=12, ffn_dim=32, text_dim=16, text_layers=1)).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="does not fit this run's model sizes"):
        Trainer(fine_tune_run(tmp_path / "other"), tmp_path / "run")


def test_loss_plot_shows_the_consistency_term(tmp_path):
    from sparsediff.pipelines.embedded.train import plot_loss

    history = [{"step": s, "loss": 1.0 / s, "consistency": 0.5 / s} for s in range(1, 30)]
    plot_loss(history, tmp_path / "loss.png", window=5)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_structured_heads_refuse_a_model_that_is_not_wan():
    with pytest.raises(ValueError, match="trains Wan self-attention; got a Linear"):
        StructuredHeads(torch.nn.Linear(2, 2), [["full"]])
    with pytest.raises(ValueError, match="probes Wan self-attention; got a Linear"):
        probe_head_errors(torch.nn.Linear(2, 2), lambda: None)
