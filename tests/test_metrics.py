"""PSNR, pooled PSNR and SSIM: the cap, hand-computed values, agreement with scikit-image, and the errors."""

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from sparsediff.metrics import PSNR_CAP, psnr, ssim


def clip(seed=0, frames=5, h=32, w=48):
    return np.random.default_rng(seed).random((frames, h, w, 3))


def test_identical_inputs_give_the_cap_and_ssim_one():
    a = clip()
    assert psnr(a, a) == PSNR_CAP and psnr(torch.from_numpy(a), a, data_range=1.0) == PSNR_CAP
    assert ssim(a, a) == pytest.approx(1.0)


def test_psnr_matches_hand_computed_values():
    a = clip()
    assert psnr(a + 0.1, a, data_range=1.0) == pytest.approx(20.0)  # mse 0.01 at peak 1
    latents = torch.linspace(-2.0, 2.0, 64)  # range 4: the default peak
    assert psnr(latents + 0.1, latents) == pytest.approx(10 * np.log10(16 / 0.01))
    assert psnr(torch.ones(8) + 0.1, torch.ones(8)) == pytest.approx(20.0)  # a constant reference: peak 1


def test_psnr_is_computed_in_float64():
    ref = torch.rand(4096, generator=torch.Generator().manual_seed(0))
    x = ref + 1e-3 * torch.rand(4096, generator=torch.Generator().manual_seed(1))
    # a float32 mean of the squared errors would be off by about 1e-7 relative
    expected = 10 * np.log10(1.0 / np.mean((x.double().numpy() - ref.double().numpy()) ** 2))
    assert psnr(x, ref, data_range=1.0) == pytest.approx(expected, rel=1e-12)


def test_ssim_agrees_with_skimage_and_orders_noise_levels():
    a = clip(0)
    noisy = np.clip(a + np.random.default_rng(1).normal(0, 0.05, a.shape), 0, 1)
    expected = np.mean([
        structural_similarity(x, r, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
                              channel_axis=-1)
        for x, r in zip(noisy, a)
    ])
    assert ssim(noisy, a) == pytest.approx(expected, abs=1e-12)
    assert ssim(torch.from_numpy(noisy).float(), torch.from_numpy(a).float()) == pytest.approx(expected, abs=1e-6)
    assert ssim(noisy, a) < ssim(np.clip(a + 0.01, 0, 1), a) < 1.0
    assert 20 < psnr(noisy, a, data_range=1.0) < 30


def test_ssim_flattens_leading_axes_into_frames():
    a, b = clip(0), clip(1)
    batch = ssim(np.stack([a, b]), np.stack([b, a]))
    assert batch == pytest.approx((ssim(a, b) + ssim(b, a)) / 2)


@pytest.mark.parametrize("side", [4, 7, 8])
def test_ssim_on_frames_smaller_than_the_window(side):
    a = clip(0, frames=2, h=side, w=side + 5)
    noisy = np.clip(a + 0.05, 0, 1)
    assert ssim(a, a) == pytest.approx(1.0)
    assert 0.0 < ssim(noisy, a) < 1.0


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"psnr needs equal shapes; got \(2, 3\) and \(3, 2\)"):
        psnr(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"ssim needs equal shapes; got \(1, 8, 8, 3\) and \(1, 8, 9, 3\)"):
        ssim(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 9, 3)))


def test_psnr_rejects_a_non_positive_data_range():
    with pytest.raises(ValueError, match="positive data_range; got 0"):
        psnr(np.zeros(3), np.ones(3), data_range=0)


def test_pooled_psnr_is_the_psnr_of_the_outputs_together():
    from sparsediff.metrics import pooled_psnr

    g = torch.Generator().manual_seed(0)
    reference = torch.rand(3, 4, 8, 8, 3, generator=g, dtype=torch.float64)
    outputs = reference + torch.randn(reference.shape, generator=g, dtype=torch.float64) * torch.tensor([0.01, 0.03, 0.1]).view(3, 1, 1, 1, 1)
    each = [psnr(o, r, data_range=1.0) for o, r in zip(outputs, reference)]
    together = psnr(outputs, reference, data_range=1.0)
    assert pooled_psnr(each) == pytest.approx(together, rel=1e-12)
    assert pooled_psnr(each) < sum(each) / 3 - 5  # the noisiest output dominates: far under the mean of the dB values
    assert pooled_psnr([31.7]) == 31.7 and pooled_psnr([30.0, 30.0]) == pytest.approx(30.0) and pooled_psnr([PSNR_CAP] * 2) == PSNR_CAP
    assert pooled_psnr([32.0, 26.0]) == pytest.approx(-10 * math.log10((10**-3.2 + 10**-2.6) / 2))
    for bad in ([], [float("nan")]):
        with pytest.raises(ValueError, match="pooled_psnr needs one or more PSNR values"):
            pooled_psnr(bad)
