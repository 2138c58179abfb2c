"""The embedded shape-video model: its clips and captions, pipeline, detector, training loop and sparsediff hook-up."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from sparsediff.pipelines.embedded import data, detector
from sparsediff.pipelines.embedded.pipeline import EmbeddedModelConfig, ShapesVideoPipeline, build_pipeline
from sparsediff.pipelines.embedded.train import TrainConfig, Trainer, flow_matching_loss, step_batch

from training_checks import assert_resume_repeats

TINY = EmbeddedModelConfig(num_layers=1, num_heads=2, head_dim=12, ffn_dim=32, text_dim=16, text_layers=1)
SMALL_CALL = dict(num_frames=3, height=8, width=12, num_inference_steps=3, guidance_scale=3.0)


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline(TINY)


def generate(pipe, prompt="a red circle moving right", seed=0, **kwargs):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **{**SMALL_CALL, **kwargs}).frames


# Data


def test_clips_are_a_pure_function_of_the_seed():
    a, b = data.render(data.clip_spec(7, 0.5), 8, 32, 32), data.render(data.clip_spec(7, 0.5), 8, 32, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, data.render(data.clip_spec(8, 0.5), 8, 32, 32))
    assert a.shape == (3, 8, 32, 32) and a.min() >= -1 and a.max() <= 1


def test_captions_state_the_clip_parameters():
    for seed in range(50):
        spec = data.clip_spec(seed, multi_object_prob=0.5)
        stated = data.parse_caption(spec.caption)
        fields = lambda o: (o.shape, o.colour, o.direction, o.modifier)  # noqa: E731
        assert [fields(o) for o in stated] == [fields(o) for o in spec.objects], spec.caption


def test_bad_caption_names_the_grammar():
    with pytest.raises(ValueError, match="grammar"):
        data.parse_caption("a red blob")
    with pytest.raises(ValueError, match="unknown colour"):
        data.parse_caption("a teal circle moving left")


# Pipeline


def test_every_caption_word_is_in_the_vocabulary(pipe):
    unk = pipe.tokenizer.unk_token_id
    for seed in range(50):
        ids = pipe.tokenizer(data.clip_spec(seed, 0.5).caption).input_ids
        assert unk not in ids and ids[-1] == pipe.tokenizer.eos_token_id


def test_output_shapes_follow_the_request(pipe):
    frames = generate(pipe, ["a red circle moving right", "a blue square moving up"], num_videos_per_prompt=2)
    assert frames.shape == (4, 3, 8, 12, 3) and frames.dtype == np.float32
    assert frames.min() >= 0 and frames.max() <= 1
    assert generate(pipe, output_type="pt").shape == (1, 3, 3, 8, 12)  # (B, F, C, H, W)
    assert generate(pipe, output_type="latent").shape == (1, 3, 3, 8, 12)  # (B, C, F, H, W)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        generate(pipe, height=9)


def test_pipeline_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "ShapesVideoPipeline" and "vae" not in index
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists()
    loaded = ShapesVideoPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    for name in ("transformer", "text_encoder"):
        saved, back = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
    # the loaded weights sit in safetensors' buffers, at other alignments, where BLAS may take other kernels (measured up
    # to 4.5e-7 apart on AMD CPUs): equal weights, outputs equal to rounding
    np.testing.assert_allclose(generate(loaded), generate(pipe), rtol=0, atol=1e-5)
    assert loaded.tokenizer("a red circle").input_ids == pipe.tokenizer("a red circle").input_ids


def test_callback_sees_and_replaces_latents_every_step(pipe):
    seen = []

    def callback(p, step, timestep, tensors):
        seen.append((step, tensors["latents"].shape))
        return {"latents": torch.zeros_like(tensors["latents"])} if step == SMALL_CALL["num_inference_steps"] - 1 else {}

    frames = generate(pipe, callback_on_step_end=callback)
    assert seen == [(i, (1, 3, 3, 8, 12)) for i in range(3)]
    assert np.all(frames == 0.5)  # zero latents are mid-grey pixels
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        generate(pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise_pred"])


def test_denoiser_calls_carry_cache_contexts_and_steps(pipe):
    """As in WanPipeline: each call inside cache_context("cond"/"uncond", step_index=i), timestep t over the batch."""
    contexts, timesteps = [], []
    original = pipe.transformer.cache_context

    def spy(name, **kwargs):
        contexts.append((name, kwargs["step_index"]))
        return original(name, **kwargs)

    pipe.transformer.cache_context = spy
    hook = pipe.transformer.register_forward_pre_hook(lambda m, args, kwargs: timesteps.append(kwargs["timestep"].tolist()), with_kwargs=True)
    try:
        generate(pipe, ["a red circle moving right", "a blue square moving up"])
    finally:
        hook.remove()
        del pipe.transformer.cache_context
    assert contexts == [(name, i) for i in range(3) for name in ("cond", "uncond")]
    assert timesteps == [[t, t] for t in pipe.scheduler.timesteps.tolist() for _ in range(2)]


def test_flow_matching_target_is_what_the_scheduler_integrates(pipe):
    """With the exact velocity noise - x0, the sampler lands on x0: training and sampling agree on conventions."""
    x0 = data.render(data.clip_spec(1), 3, 8, 12)[None]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    scheduler = pipe.scheduler
    scheduler.set_timesteps(5)
    scheduler.set_begin_index(0)
    latents = noise.clone()  # the first sigma is 1: pure noise
    for t in scheduler.timesteps:
        latents = scheduler.step(noise - x0, t, latents, return_dict=False)[0]
    torch.testing.assert_close(latents, x0, atol=1e-5, rtol=0)


# Detector


@pytest.mark.parametrize("size", [(8, 64, 64), (8, 32, 32)])
def test_detector_is_right_on_ground_truth_clips(size):
    specs = [data.clip_spec(seed, multi_object_prob=0.3) for seed in range(1000, 1060)]
    result = detector.accuracy([detector.frames_from_clip(data.render(s, *size)) for s in specs], [s.caption for s in specs])
    for field in detector.FIELDS:
        assert result[field] >= 0.95, (field, result[field])


def test_detector_notices_a_wrong_clip():
    spec = data.clip_spec(5)
    frames = detector.frames_from_clip(data.render(spec, 8, 32, 32))
    assert all(detector.score(frames, spec.caption).values())
    assert not detector.score(frames[::-1], spec.caption)["direction"]  # played backwards
    other = next(c for c in data.COLOURS if c != spec.objects[0].colour)
    assert not detector.score(frames, spec.caption.replace(spec.objects[0].colour, other, 1))["colour"]


def test_eval_prompts_cover_every_colour_and_direction():
    prompts = detector.eval_prompts()
    assert len(set(prompts)) == 32
    parsed = [data.parse_caption(p)[0] for p in prompts]
    assert {o.colour for o in parsed} == set(data.COLOURS) and {o.direction for o in parsed} == set(data.DIRECTIONS)
    assert {data.parse_camera(p) for p in prompts} == set(data.CAMERAS)


def test_camera_motion_is_in_the_caption_and_the_detector_reads_it():
    specs = [data.clip_spec(seed) for seed in range(40)]
    assert {s.camera for s in specs} == set(data.CAMERAS)
    for spec in specs:
        assert data.parse_camera(spec.caption) == spec.camera
        assert [o.colour for o in data.parse_caption(spec.caption)] == [o.colour for o in spec.objects]
    with pytest.raises(ValueError, match="with camera"):
        data.parse_camera("a red circle moving left with camera spinning")
    # a pan moves the background against the camera: played backwards, a pan left reads as a pan right
    spec = next(s for s in specs if s.camera == "panning left")
    frames = detector.frames_from_clip(data.render(spec, 8, 64, 64))
    assert detector.camera(frames) == "panning left" and detector.camera(frames[::-1]) == "panning right"
    spec = next(s for s in specs if s.camera == "zooming in")
    frames = detector.frames_from_clip(data.render(spec, 8, 64, 64))
    assert detector.camera(frames) == "zooming in" and detector.camera(frames[::-1]) == "zooming out"


def test_backgrounds_are_textured_and_move_with_the_camera():
    static = next(s for s in map(data.clip_spec, range(100)) if s.camera == "static")
    clip = data.render(static, 8, 32, 32)
    background = clip[:, :, :4, :4]  # a corner no object reaches at the start
    assert background.std() > 0.01  # not a flat colour
    empty = data.ClipSpec((), static.background, static.texture, static.texture_seed, "panning right")
    moving = data.render(empty, 8, 32, 32)
    assert not torch.equal(moving[:, 0], moving[:, -1])
    still = data.render(data.ClipSpec((), static.background, static.texture, static.texture_seed), 8, 32, 32)
    assert torch.equal(still[:, 0], still[:, -1])


def test_some_clips_have_three_objects_that_may_cross():
    specs = [data.clip_spec(seed, multi_object_prob=1.0) for seed in range(60)]
    counts = {len(s.objects) for s in specs}
    assert counts <= {1, 2, 3} and {2, 3} <= counts


# Training


def tiny_run() -> TrainConfig:
    return TrainConfig(
        steps=4, batch_size=2, low_res=(2, 8, 8), full_res=(2, 16, 16), full_res_every=2, full_res_batch_size=1,
        warmup=1, checkpoint_every=2, model=TINY,
    )


def test_a_resumed_run_may_be_lengthened_but_not_cut(tmp_path):
    first = Trainer(tiny_run(), tmp_path)
    first.train_step()
    first.save_checkpoint()
    longer = Trainer(replace(tiny_run(), steps=6), tmp_path, log=open(tmp_path / "log.txt", "w"))
    assert longer.resume() and longer.lengthened == [{"step": 1, "from": 4, "to": 6}]
    longer.run()
    assert longer.step == 6 and len(longer.history) == 6
    assert "lengthened from 4 to 6 steps at step 1" in (tmp_path / "log.txt").read_text()
    with pytest.raises(ValueError, match="at step 6; steps=5 would end the run before it"):
        Trainer(replace(tiny_run(), steps=5), tmp_path).resume()
    with pytest.raises(ValueError, match="another configuration"):
        Trainer(replace(tiny_run(), steps=8, lr=0.5), tmp_path).resume()


def test_resumed_training_repeats_the_uninterrupted_run(tmp_path):
    config = tiny_run()
    straight = Trainer(config, tmp_path / "straight")
    straight.run()
    assert (tmp_path / "straight" / "checkpoint.pt").exists()
    assert [h["clips"] for h in straight.history] == ["2x2x8x8", "1x2x16x16"] * 2

    assert_resume_repeats(straight, tmp_path / "resumed")

    with pytest.raises(ValueError, match="another configuration"):
        Trainer(TrainConfig(**{**config.__dict__, "lr": 0.5}), tmp_path / "resumed").resume()
    old = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    del old["lr_scheduler"]  # as the trainer wrote it before the schedule had a state
    torch.save(old, tmp_path / "straight" / "checkpoint.pt")
    with pytest.raises(ValueError, match="older trainer .* new work directory"):
        Trainer(config, tmp_path / "straight").resume()


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    config = TrainConfig(steps=30, batch_size=2, low_res=(2, 8, 8), full_res_every=0, warmup=1, lr=3e-3, model=TINY)
    trainer = Trainer(config, "unused")
    clips, captions, _ = step_batch(config, 0)
    loss = lambda: flow_matching_loss(trainer.pipe, clips, captions, torch.Generator().manual_seed(0)).item()  # noqa: E731
    before = loss()
    for _ in range(30):
        trainer.optimizer.zero_grad()
        flow_matching_loss(trainer.pipe, clips, captions, torch.Generator().manual_seed(0)).backward()
        trainer.optimizer.step()
    assert loss() < 0.5 * before


def test_ema_pipeline_carries_the_averaged_weights(tmp_path):
    trainer = Trainer(tiny_run(), tmp_path)
    trainer.train_step()  # the first update copies the weights
    after_first = [p.detach().clone() for p in trainer.modules.parameters()]
    trainer.train_step()
    decay = 2 / 11  # EMAModel's warm-up (1 + s) / (10 + s) at its second update, below ema_decay
    assert trainer.ema.cur_decay_value == pytest.approx(decay)
    for average, first, p in zip(trainer.ema.shadow_params, after_first, trainer.modules.parameters(), strict=True):
        torch.testing.assert_close(average, decay * first + (1 - decay) * p)
    shipped = trainer.ema_pipeline()
    params = list(shipped.transformer.parameters()) + list(shipped.text_encoder.parameters())
    assert all(torch.equal(p, e) for p, e in zip(params, trainer.ema.shadow_params, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(params, trainer.modules.parameters()))  # not the training weights


def test_learning_rate_warms_up_linearly_then_falls_by_cosine_to_a_tenth(tmp_path):
    config = replace(tiny_run(), steps=6, warmup=2, lr=1e-3)
    trainer = Trainer(config, tmp_path)
    used = []
    for _ in range(config.steps):
        used.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.train_step()
    expected = [5e-4, 1e-3] + [1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * i / 4))) for i in range(4)]
    assert used == pytest.approx(expected)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)  # the schedule's end, step == steps


# sparsediff


def test_accelerate_without_a_plan_leaves_outputs_unchanged(pipe):
    api = pytest.importorskip("sparsediff.api")
    before = generate(pipe, output_type="pt")
    with api.accelerate(pipe, plan=None) as handle:
        after = generate(pipe, output_type="pt")
        stats = handle.stats
    assert torch.equal(before, after)
    assert {(s.context, s.source) for s in stats} == {("cond", "cache_context"), ("uncond", "cache_context")}
    assert sorted({s.step for s in stats}) == [0, 1, 2]


def test_eval_script_compares_dense_and_a_plan_on_the_same_seeds(capsys):
    """samples/eval_embedded.py --plan shipped: both accuracies from the same seeds, their difference, the PSNR."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "samples" / "eval_embedded.py"
    spec = importlib.util.spec_from_file_location("eval_embedded", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    small = ["--prompts", "2", "--steps", "7", "--height", "32", "--width", "32", "--batch-size", "2", "--json"]
    module.main([*small, "--plan", "shipped"])
    result = json.loads(capsys.readouterr().out)
    assert set(result["dense"]) >= set(detector.FIELDS) and set(result["sparse"]) >= set(detector.FIELDS)
    for field in detector.FIELDS:
        assert result["difference_points"][field] == pytest.approx(100 * (result["sparse"][field] - result["dense"][field]), abs=0.05)
    assert 10.0 < result["psnr"] < 99.0 and 0.0 < result["sparse_density"] < 1.0  # sparse in its last two steps
    module.main(small)  # dense alone: the same clips as the dense half above
    dense = json.loads(capsys.readouterr().out)
    assert [c["predicted"] for c in dense["clips"]] == [c["predicted"] for c in result["dense"]["clips"]]
    assert dense["settings"]["model"] == "pipelines/assets/embedded"  # saved results name no machine path
    with pytest.raises(SystemExit, match="--compile is for dense runs only"):
        module.main([*small, "--plan", "shipped", "--compile"])


def test_validate_script_reports_each_prompt_and_the_pooled_psnr(capsys):
    """samples/validate_embedded_plan.py: the shipped plan on the calibration prompts, prompt by prompt and pooled."""
    import importlib.util
    from pathlib import Path

    from sparsediff.metrics import pooled_psnr

    path = Path(__file__).resolve().parents[1] / "samples" / "validate_embedded_plan.py"
    spec = importlib.util.spec_from_file_location("validate_embedded_plan", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--set", "calibration", "--steps", "3", "--height", "32", "--width", "32", "--backend", "torch"])
    assert json.loads(capsys.readouterr().out) == result and result["prompts"] == module.SETS["calibration"]
    each = result["prompt_psnr"]
    assert len(each) == 2 and all(10.0 < v < 99.0 for v in each)  # sparse in some step: close to dense, not equal
    assert result["worst"] == min(each) and result["pooled_psnr"] == pytest.approx(pooled_psnr(each), abs=0.01)
    assert result["worst"] <= result["pooled_psnr"] <= result["mean_of_db"]
    # the held-out set runs as `sparsediff search --validate-prompts` runs it: calibration settings, seeds from 1000
    from sparsediff.cli import held_out_calls

    assert held_out_calls(["a", "b"], [{"prompt": "c", "seed": 0, "height": 32}, {"prompt": "d", "seed": 1, "height": 32}]) == [
        {"height": 32, "prompt": "a", "seed": 1000}, {"height": 32, "prompt": "b", "seed": 1001}]


def test_perturbation_floor_script_perturbs_self_attention_and_removes_its_hooks(capsys):
    """samples/perturbation_floor.py: a perturbed run differs from dense (finite PSNR), the bfloat16 rounding far
    less than 1% noise, and the pipeline runs as it did once the script is done."""
    import importlib.util
    from pathlib import Path

    import torch

    from sparsediff.api import load_pipeline
    from sparsediff.metrics import pooled_psnr

    path = Path(__file__).resolve().parents[1] / "samples" / "perturbation_floor.py"
    spec = importlib.util.spec_from_file_location("perturbation_floor", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pipe = load_pipeline("embedded")
    settings = dict(num_inference_steps=2, height=32, width=32, num_frames=4, output_type="np")
    before = pipe("a red circle moving right", generator=torch.Generator().manual_seed(0), **settings).frames
    result = module.main(["--set", "demo", "--steps", "2", "--size", "32", "--frames", "4", "--json"], pipe=pipe)
    assert json.loads(capsys.readouterr().out) == result
    rows = result["demo"]["prompts"]
    assert len(rows) == 3 and all(20.0 < r["noise_1pct"] < r["bfloat16"] < 150.0 for r in rows)
    assert result["demo"]["pooled"]["bfloat16"] == pytest.approx(pooled_psnr([r["bfloat16"] for r in rows]))
    assert not any(block.attn1._forward_hooks for block in pipe.transformer.blocks)  # its hooks are gone
    after = pipe("a red circle moving right", generator=torch.Generator().manual_seed(0), **settings).frames
    assert torch.equal(torch.as_tensor(after), torch.as_tensor(before))  # same process, same kernels, same inputs
