"""The 4D reconstructor's networks, EDM pieces, pipeline and training: shapes, FPS, preconditioning, the space-time
block's attention structure, the sparse-attention seam, save/load and resume, and a small fitting floor."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import EDMEulerScheduler
from sparsediff.pipelines.reconstruct import data, train
from sparsediff.pipelines.reconstruct.models import (
    ATTENTION_KINDS,
    DeformationAutoencoder,
    DeformationBlock,
    DeformationDenoiser,
    LatentAttention,
    ShapeAutoencoder,
    ShapeDenoiser,
    edm_denoise,
    edm_loss,
    edm_preconditioning,
    farthest_point_sample,
)
from sparsediff.pipelines.reconstruct.pipeline import (
    Motion2VecSetsPipeline,
    ReconstructModelConfig,
    build_pipeline,
)

TINY = dict(width=32, heads=2, head_dim=16)


@pytest.fixture(autouse=True)
def one_thread():
    """These networks are small: two threads on a CPU shared with other work ran the tests up to 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cloud(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) - 0.5


# Shapes


def test_autoencoder_shapes():
    shape_ae = ShapeAutoencoder(num_latents=8, num_decoder_blocks=1, **TINY)
    posterior = shape_ae.encode(cloud(2, 64, 3))
    assert posterior.mean.shape == posterior.logvar.shape == (2, 8, 8)
    assert shape_ae.decode(posterior.sample()).shape == (2, 8, 32)
    logits, kl = shape_ae(cloud(2, 64, 3), cloud(2, 50, 3))
    assert logits.shape == (2, 50) and kl.shape == (2,) and (kl >= 0).all()

    deform_ae = DeformationAutoencoder(num_latents=8, num_decoder_blocks=1, **TINY)
    source = cloud(2, 64, 3)
    assert deform_ae.encode(source, source + 0.1).mean.shape == (2, 8, 16)
    positions, kl = deform_ae(source, source + 0.1, cloud(2, 30, 3))
    assert positions.shape == (2, 30, 3) and kl.shape == (2,)
    with pytest.raises(ValueError, match="paired by index"):
        deform_ae.encode(source, source[:, :10])


@pytest.mark.parametrize("input_type", ["sparse", "partial"])
@pytest.mark.parametrize("space_time", ["interleaved", "joint"])
def test_denoiser_shapes(input_type, space_time):
    shape_dm = ShapeDenoiser(num_blocks=1, **TINY)
    assert shape_dm(torch.randn(3, 8, 8), torch.zeros(3), points=cloud(3, 20, 3)).shape == (3, 8, 8)
    deform_dm = DeformationDenoiser(num_blocks=2, input_type=input_type, space_time=space_time, **TINY)
    for frames in (1, 5, 16):  # no frame encoding: any number of frames
        out = deform_dm(torch.randn(2, frames, 8, 16), torch.zeros(2), shape_latents=torch.randn(2, 8, 8), source_points=cloud(2, 20, 3), target_points=cloud(2, frames, 20, 3))
        assert out.shape == (2, frames, 8, 16)
    kinds = {m.kind for m in deform_dm.modules() if isinstance(m, LatentAttention)}
    assert kinds == {"encoder", "cross_shape", "cross_condition"} | ({"spatial", "temporal"} if space_time == "interleaved" else {"joint"})


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="space_time='both'"):
        DeformationDenoiser(space_time="both")
    with pytest.raises(ValueError, match="input_type='dense'"):
        DeformationDenoiser(input_type="dense")
    with pytest.raises(ValueError, match="kind='self'"):
        LatentAttention(8, "self")
    with pytest.raises(ValueError, match="num_samples=11"):
        farthest_point_sample(cloud(1, 10, 3), 11)


# Farthest point sampling


def test_fps_picks_distinct_points_covering_the_set():
    centres = torch.tensor([[x, y, z] for x in (-0.4, 0.4) for y in (-0.4, 0.4) for z in (-0.4, 0.4)])
    points = (centres[:, None] + 0.01 * cloud(8, 40, 3, seed=1)).reshape(1, 320, 3)[:, torch.randperm(320, generator=torch.Generator().manual_seed(2))]
    picked = farthest_point_sample(points, 8)[0]
    assert len(set(picked.tolist())) == 8
    clusters = (points[0, picked][:, None] - centres[None]).norm(dim=-1).argmin(1)
    assert sorted(clusters.tolist()) == list(range(8))  # one pick in each of the 8 clusters

    uniform = cloud(3, 200, 3, seed=3)
    index = farthest_point_sample(uniform, 200)
    assert all(sorted(row.tolist()) == list(range(200)) for row in index)  # all N: a permutation
    index = farthest_point_sample(uniform, 32)
    covering = lambda idx: torch.cdist(uniform[0], uniform[0, idx]).min(1).values.max()
    random_picks = [covering(torch.randperm(200, generator=torch.Generator().manual_seed(s))[:32]) for s in range(20)]
    assert covering(index[0]) < min(random_picks)  # covers the set better than random subsets


# EDM


def test_edm_preconditioning_identities():
    sigma = torch.tensor([0.002, 0.5, 1.0, 3.0, 80.0])
    c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma)
    torch.testing.assert_close(edm_preconditioning(torch.tensor([1.0])), (torch.tensor([0.5]), torch.tensor([0.5**0.5]), torch.tensor([0.5**0.5]), torch.tensor([0.0])))
    torch.testing.assert_close(c_skip + c_out.square(), torch.ones(5))  # sigma_data = 1
    torch.testing.assert_close(c_in, c_out / sigma)
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    # the same numbers as diffusers' EDM scheduler with sigma_data = 1 (the pipeline's sigmas come from it)
    scheduler = EDMEulerScheduler(sigma_data=1.0)
    x, raw = torch.randn(5, 4), torch.randn(5, 4)
    torch.testing.assert_close(c_skip[:, None] * x + c_out[:, None] * raw, scheduler.precondition_outputs(x, raw, sigma[:, None]))
    torch.testing.assert_close(c_in[:, None] * x, scheduler.precondition_inputs(x, sigma[:, None]))
    torch.testing.assert_close(c_noise, scheduler.precondition_noise(sigma))
    scheduler.set_timesteps(18)
    assert len(scheduler.sigmas) == 19 and scheduler.sigmas[0] == 80.0 and scheduler.sigmas[-1] == 0.0
    assert scheduler.sigmas[-2].item() == pytest.approx(0.002)


def test_edm_denoise_and_loss_on_known_networks():
    x, sigma = torch.randn(3, 4, 2), torch.tensor([0.1, 1.0, 10.0])
    c_skip, _, c_in, _ = edm_preconditioning(sigma)
    zero = lambda sample, c_noise: torch.zeros_like(sample)
    torch.testing.assert_close(edm_denoise(zero, x, sigma), c_skip[:, None, None] * x)
    seen = {}

    def record(sample, c_noise, **condition):
        seen.update(sample=sample, c_noise=c_noise, **condition)
        return sample

    edm_denoise(record, x, sigma, points="cond")
    torch.testing.assert_close(seen["sample"], c_in[:, None, None] * x)
    assert seen["points"] == "cond"
    # a network whose D(x) is exactly the clean latents has zero loss; one sigma per sample, shared over all frames
    clean = torch.randn(4, 5, 3, 2)

    def oracle(sample, c_noise):
        sigma = (4 * c_noise).exp().view(-1, 1, 1, 1)
        skip, out, c_in, _ = edm_preconditioning(sigma)
        return (clean - skip * sample / c_in) / out

    assert edm_loss(oracle, clean, torch.Generator().manual_seed(0)).abs().max() < 1e-4
    assert edm_loss(zero, clean, torch.Generator().manual_seed(0)).shape == (4,)


# The space-time block


def only(block: DeformationBlock, keep: str) -> DeformationBlock:
    """The block with every residual sub-layer but `keep` zeroed out (its output layer is 0, so x + 0)."""
    for name in ("self_attn", "shape_attn", "condition_attn", "temporal_attn", "ff"):
        if name != keep and getattr(block, name) is not None:
            out = getattr(block, name).attn.to_out if name != "ff" else block.ff.ff.net[-1]
            torch.nn.init.zeros_(out.weight)
            torch.nn.init.zeros_(out.bias)
    return block


def run_block(block, x):
    batch, frames = x.shape[:2]
    conditions = (torch.randn(batch * frames, 6, 32, generator=torch.Generator().manual_seed(1)),)
    return block(x, torch.randn(batch, 32, generator=torch.Generator().manual_seed(2)), torch.randn(batch * frames, 8, 32), conditions)


@torch.no_grad()
def test_spatial_attention_stays_within_each_frame():
    block = only(DeformationBlock(32, 2, 16, "sparse", "interleaved"), "self_attn")
    x = torch.randn(2, 4, 8, 32)
    changed = x.clone()
    changed[1, 2, 5] += torch.randn(32)  # one latent of frame 2 of sequence 1 (not a constant: LayerNorm removes those)
    delta = (run_block(block, changed) - run_block(block, x)).abs().amax(-1)  # (B, T, M)
    assert (delta[1, 2] > 1e-3).all()  # the whole frame sees it
    delta[1, 2] = 0
    assert delta.max() < 1e-6  # no other frame, no other sequence


@torch.no_grad()
def test_temporal_attention_stays_within_each_latent_index():
    block = only(DeformationBlock(32, 2, 16, "sparse", "interleaved"), "temporal_attn")
    x = torch.randn(2, 4, 8, 32)
    changed = x.clone()
    changed[0, 1, 3] += torch.randn(32)  # latent 3 of frame 1 of sequence 0
    delta = (run_block(block, changed) - run_block(block, x)).abs().amax(-1)
    assert (delta[0, :, 3] > 1e-3).all()  # latent 3 in every frame sees it
    delta[0, :, 3] = 0
    assert delta.max() < 1e-6  # no other latent index, no other sequence


@torch.no_grad()
def test_joint_attention_mixes_all_frames_of_one_sequence_only():
    block = only(DeformationBlock(32, 2, 16, "sparse", "joint"), "self_attn")
    x = torch.randn(2, 4, 8, 32)
    changed = x.clone()
    changed[1, 2, 5] += torch.randn(32)
    delta = (run_block(block, changed) - run_block(block, x)).abs().amax(-1)
    assert (delta[1] > 1e-3).all() and delta[0].max() < 1e-6


# The sparse-attention seam


@torch.no_grad()
def test_sparse_site_is_called_and_its_output_used():
    model = DeformationDenoiser(num_blocks=1, space_time="joint", **TINY)
    torch.nn.init.normal_(model.proj_out.weight)  # zero-initialised, which would hide every change
    inputs = (torch.randn(1, 3, 8, 16), torch.zeros(1)), dict(shape_latents=torch.randn(1, 8, 8), source_points=cloud(1, 20, 3), target_points=cloud(1, 3, 20, 3))
    dense = model(*inputs[0], **inputs[1])
    joint = next(m for m in model.modules() if isinstance(m, LatentAttention) and m.kind == "joint")
    calls = []

    def exact(module, q, k, v, scale):
        calls.append((module, q.shape, k.shape, scale))
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    joint.sparse_site = exact
    assert torch.equal(model(*inputs[0], **inputs[1]), dense)
    assert calls == [(joint, (1, 2, 24, 16), (1, 2, 24, 16), 16**-0.5)]  # (B, H, T x M, D), frame-major

    outputs = []
    joint.register_forward_hook(lambda module, args, out: outputs.append(out))
    joint.sparse_site = lambda module, q, k, v, scale: torch.zeros_like(q)
    assert not torch.equal(model(*inputs[0], **inputs[1]), dense)
    torch.testing.assert_close(outputs[-1], joint.to_out.bias.expand(1, 24, 32))  # attention output 0 -> bias only


def test_every_attention_has_a_known_kind_and_no_site():
    pipe = build_pipeline(ReconstructModelConfig.tiny())
    modules = [m for component in (pipe.shape_autoencoder, pipe.deformation_autoencoder, pipe.shape_denoiser, pipe.deformation_denoiser) for m in component.modules()]
    attentions = [m for m in modules if isinstance(m, LatentAttention)]
    assert {m.kind for m in attentions} <= set(ATTENTION_KINDS) and all(m.sparse_site is None for m in attentions)
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in modules)


# Pipeline


@pytest.fixture(scope="module")
def sequence_input():
    return data.sparse_input(data.sequence("val", 0), n_points=32)


def pipeline_with_a_surface(sequence_input, seed=0):
    """A tiny random pipeline whose frame-0 occupancy field crosses 0 inside the box (the occupancy bias is moved to
    the median logit), so a mesh comes out."""
    pipe = build_pipeline(ReconstructModelConfig.tiny())
    latents = pipe(sequence_input, num_inference_steps=3, generator=torch.Generator().manual_seed(seed), output_type="latent").shape_latents
    with torch.no_grad():
        ae = pipe.shape_autoencoder
        ae.to_logit.bias -= ae.occupancy(ae.decode(latents), 0.8 * cloud(1, 4096, 3)).median()
    return pipe


def test_pipeline_save_load_round_trip(tmp_path, sequence_input):
    pipe = pipeline_with_a_surface(sequence_input)
    first = pipe(sequence_input, num_inference_steps=3, generator=torch.Generator().manual_seed(0), mesh_resolution=24)
    pipe.save_pretrained(tmp_path)
    loaded = Motion2VecSetsPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    second = loaded(sequence_input, num_inference_steps=3, generator=torch.Generator().manual_seed(0), mesh_resolution=24)
    # to float tolerance: a reloaded tensor may take another BLAS path (alignment) on some CPUs
    torch.testing.assert_close(second.shape_latents, first.shape_latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second.deformation_latents, first.deformation_latents, rtol=1e-5, atol=1e-5)
    assert first.vertices[0].shape == second.vertices[0].shape and first.vertices[0].shape[0] == 17
    assert np.allclose(first.vertices[0], second.vertices[0], atol=1e-4) and np.array_equal(first.faces[0], second.faces[0])
    other = pipe(sequence_input, num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="latent")
    assert not torch.equal(other.shape_latents, first.shape_latents) and other.vertices is None


def test_pipeline_batches_and_refuses_bad_input(sequence_input):
    pipe = build_pipeline(ReconstructModelConfig.tiny())
    batched = torch.as_tensor(np.stack([sequence_input, sequence_input[:, ::-1].copy()]))
    out = pipe(batched, num_inference_steps=2, generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)], output_type="latent")
    assert out.shape_latents.shape == (2, 8, 8) and out.deformation_latents.shape == (2, 16, 8, 16)
    single = pipe(sequence_input, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent")
    torch.testing.assert_close(out.shape_latents[0], single.shape_latents[0])
    with pytest.raises(ValueError, match="trained on 'sparse' input; pass input_type='sparse'"):
        pipe(sequence_input, input_type="partial")
    with pytest.raises(ValueError, match=r"expected \(T, n, 3\) or \(B, T, n, 3\)"):
        pipe(sequence_input[0])
    with pytest.raises(ValueError, match="output_type='np'"):
        pipe(sequence_input, output_type="np")


def test_heun_sampler_takes_two_evaluations_per_step_but_the_last():
    pipe = build_pipeline(ReconstructModelConfig.tiny())
    sigmas_seen = []

    def denoise(x, sigma):
        sigmas_seen.append(sigma.item())
        return torch.zeros_like(x)  # D = 0: the ODE is dx/dsigma = x / sigma, so x scales with sigma

    class Bar:
        update = staticmethod(lambda: None)

    x = pipe.sample_edm(denoise, (1, 4, 2), 18, torch.Generator().manual_seed(0), Bar())
    assert len(sigmas_seen) == 35 and sigmas_seen[0] == pytest.approx(80.0) and min(sigmas_seen) == pytest.approx(0.002)
    assert x.abs().max() < 1e-5  # the last step to sigma = 0 lands on D


# Training


def test_training_resumes_exactly(tmp_path):
    config = train.TrainConfig(model=ReconstructModelConfig.tiny(), train_sequences=4, val_sequences=2, batch_size={"shape_ae": 2, "deform_ae": 2, "shape_dm": 2, "deform_dm": 2})
    dataset = train.load_dataset(tmp_path, "train", 4, config, "sparse")

    def trainer(folder):
        t = train.StageTrainer("deform_ae", config, folder, dataset, dataset)
        t.set_plan(4)
        return t

    straight = trainer(tmp_path / "straight")
    losses = [straight.train_step() for _ in range(4)]
    first = trainer(tmp_path / "split")
    first.train_step(), first.train_step()
    first.save_checkpoint()
    second = trainer(tmp_path / "split")
    assert second.resume() and second.step == 2
    assert [second.train_step(), second.train_step()] == pytest.approx(losses[2:], rel=1e-5)
    for a, b in zip(straight.model.parameters(), second.model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(straight.ema.shadow_params, second.ema.shadow_params, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert second.lr_scheduler.get_last_lr() == straight.lr_scheduler.get_last_lr()


def fit_one_sequence(folder, stage, steps, seed=0):
    """An autoencoder (M=32, width 64, one decoder block) trained `steps` steps on sequence 0 of the train split (a
    sphere), batch 8, peak learning rate 2e-3; returns the model, the data, the config and the step losses."""
    recipe = train.SAME_RECIPE.get(stage, stage)  # the ablation trains with the shape AE's hyperparameters
    config = train.TrainConfig(
        model=ReconstructModelConfig(num_latents=32, ae_width=64, ae_blocks=1), seed=seed, train_sequences=1,
        surface_points=512, ae_input_points=256, query_points=512, batch_size={recipe: 8}, lr={recipe: 2e-3},
    )
    dataset = {key: torch.from_numpy(value) for key, value in train.build_dataset("train", 1, config, "sparse").items()}
    trainer = train.StageTrainer(stage, config, folder, dataset, dataset)
    trainer.set_plan(steps)
    losses = [trainer.train_step() for _ in range(steps)]
    return trainer.model.eval(), dataset, config, losses


@torch.no_grad()
def occupancy_iou(model, dataset, config):
    """IoU over all occupancy samples (volume and near-surface) of the frames with samples."""
    predicted, truth = [], []
    for slot, frame in enumerate(dataset["shape_frames"].tolist()):
        hidden = model.decode(model.encode(dataset["surface"][:, frame, : config.ae_input_points]).mean)
        predicted.append(model.occupancy(hidden, dataset["occupancy_points"][:, slot]) > 0)
        truth.append(dataset["occupancy_labels"][:, slot])
    predicted, truth = torch.cat(predicted), torch.cat(truth)
    return ((predicted & truth).sum() / (predicted | truth).sum()).item()


@pytest.mark.parametrize("stage", ["shape_ae", "deform_ae", "shape_ae_global"])
def test_autoencoder_losses_fall_on_one_sequence(tmp_path, stage):
    _, _, _, losses = fit_one_sequence(tmp_path, stage, 40)
    assert np.mean(losses[-5:]) < 0.5 * losses[0]


def test_global_latent_ablation_has_one_latent_of_the_sets_size_and_saves(tmp_path):
    model, dataset, config, _ = fit_one_sequence(tmp_path, "shape_ae_global", 5)
    surface = dataset["surface"][:, 0, : config.ae_input_points]
    posterior = model.encode(surface)
    assert posterior.mean.shape == (1, 1, config.model.num_latents * config.model.shape_channels)
    hidden = model.decode(posterior.mean)
    logits = model.occupancy(hidden, dataset["occupancy_points"][:, 0])
    assert logits.shape == dataset["occupancy_points"].shape[:1] + dataset["occupancy_points"].shape[2:3]
    assert logits.std() > 0  # one code, yet a different value per point (unlike a cross-attention over one token)
    model.save_pretrained(tmp_path / "shape_ae_global" / "model")
    loaded = train.load_stage_model(tmp_path, "shape_ae_global")
    torch.testing.assert_close(loaded.occupancy(loaded.decode(posterior.mean), dataset["occupancy_points"][:, 0]), logits)


@pytest.mark.slow
def test_shape_autoencoder_fits_one_sequence(tmp_path):
    """The point-query autoencoder learns one shape slowly from scratch: on this sphere the IoU over volume and
    near-surface samples was 0.27 after 500 steps (predicting all inside gives 0.26) and 0.83 after 1000 (about 55 s)."""
    model, dataset, config, _ = fit_one_sequence(tmp_path, "shape_ae", 1000)
    assert occupancy_iou(model, dataset, config) > 0.7


@pytest.mark.slow
def test_deformation_autoencoder_fits_one_sequence(tmp_path):
    model, dataset, config, _ = fit_one_sequence(tmp_path, "deform_ae", 500)
    motion = (dataset["surface"][0] - dataset["surface"][0, :1]).norm(dim=-1).mean().item()  # the error of "no motion"
    assert train.deform_ae_l2(model, dataset, config) < 0.7 * motion


def test_shipped_pipeline_reconstructs_a_held_out_sphere():
    """The trained pipeline in pipelines/assets/reconstruct on a validation sphere from sparse input (measured: IoU
    0.89 / 0.87 / 0.83 at frames 0 / 8 / 16, correspondence L2 0.036; tori do far worse, see the training notes)."""
    from sparsediff.pipelines.reconstruct import geometry
    from sparsediff.pipelines.reconstruct.pipeline import reconstruct_path

    pipe = Motion2VecSetsPipeline.from_pretrained(reconstruct_path(), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    seq = data.sequence("val", 1)
    assert seq.shape.kind == "sphere"
    out = pipe(data.sparse_input(seq, seed=0), generator=torch.Generator().manual_seed(0), mesh_resolution=32)
    vertices, faces = out.vertices[0], out.faces[0]
    assert vertices.shape[0] == 17 and faces.max() < vertices.shape[1]
    ious = [geometry.mesh_iou(vertices[t], faces, *seq.volume_points(20000, 0, t)) for t in (0, 16)]
    assert ious[0] > 0.8 and ious[1] > 0.7
    assert geometry.correspondence_l2(vertices, seq.surface(5000, 0)) < 0.06


def test_fixed_sigma_loss_is_the_one_step_regression_error():
    """At a fixed sigma every sample sees that noise level; at sigma_max D(noise) is (almost) the network's output
    alone, so the loss is the regression error of the network's guess from pure noise."""
    clean = torch.randn(4, 5, 3, 2)
    seen = []

    def net(sample, c_noise):
        seen.append(c_noise)
        return torch.zeros_like(sample)

    loss = edm_loss(net, clean, torch.Generator().manual_seed(0), fixed_sigma=80.0)
    torch.testing.assert_close(seen[0], torch.full((4,), math.log(80.0) / 4))
    # D = c_skip * (clean + noise): tiny at sigma 80, so the loss is about the mean square of the clean latents
    torch.testing.assert_close(loss, clean.square().flatten(1).mean(1), rtol=0.05, atol=0.02)


def test_regressor_stage_trains_the_denoiser_network_and_exports_a_one_step_pipeline(tmp_path):
    config = train.TrainConfig(model=ReconstructModelConfig.tiny(), train_sequences=4, val_sequences=2,
                               batch_size={"shape_ae": 2, "deform_ae": 2, "shape_dm": 2, "deform_dm": 2})
    for stage in ("shape_ae", "deform_ae", "shape_dm", "deform_dm", "shape_reg", "deform_reg"):
        trainer = train.train_stage(stage, config, tmp_path, minutes=0.05, resume=False)
        assert trainer.step >= 1
    reg = train.load_stage_model(tmp_path, "deform_reg")
    assert type(reg) is type(train.load_stage_model(tmp_path, "deform_dm"))
    assert any(not torch.equal(a, b) for a, b in zip(reg.parameters(), train.load_stage_model(tmp_path, "deform_dm").parameters()))
    pipe = train.export_pipeline(tmp_path, tmp_path / "reg", config, regressor="both")
    for a, b in zip(pipe.deformation_denoiser.parameters(), reg.parameters()):
        torch.testing.assert_close(a, b.half().float())
    # one step of the sampler is one evaluation of the regressor at sigma_max, from the generator's noise
    points = torch.from_numpy(data.sparse_input(data.sequence("unseen_motion", 0), seed=0))[None]
    out = pipe(points, num_inference_steps=1, generator=torch.Generator().manual_seed(3), output_type="latent")
    noise = torch.randn(out.shape_latents.shape, generator=torch.Generator().manual_seed(3)) * train.SIGMA_MAX
    expected = edm_denoise(pipe.shape_denoiser, noise, torch.tensor([train.SIGMA_MAX]), points=points[:, 0])
    torch.testing.assert_close(out.shape_latents, expected, rtol=1e-4, atol=1e-4)
    # the deformation regressor after a sampled shape: its own step count
    pipe = train.export_pipeline(tmp_path, tmp_path / "reg_deform", config, regressor="deformation")
    for a, b in zip(pipe.shape_denoiser.parameters(), train.load_stage_model(tmp_path, "shape_dm").parameters()):
        torch.testing.assert_close(a, b.half().float())
    calls = []
    pipe.deformation_denoiser.register_forward_pre_hook(lambda module, args: calls.append(1))
    pipe(points, num_inference_steps=3, deformation_steps=1, generator=torch.Generator().manual_seed(3), output_type="latent")
    assert len(calls) == 1
    with pytest.raises(ValueError, match="regressor='shape'"):
        train.export_pipeline(tmp_path, tmp_path / "bad", config, regressor="shape")
