"""The project's one PSNR and one SSIM: every comparison of a sparse output with the dense one goes through these.

`psnr` takes tensors or arrays of any shape (latents, frames); `pooled_psnr` combines several outputs' PSNRs into
the PSNR of them all together. `ssim` is the SSIM of Wang et al. (2004) as papers
report it: scikit-image's `structural_similarity` with an 11-px Gaussian window (sigma 1.5) and population
covariances, per frame, averaged over frames.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from skimage.metrics import structural_similarity

PSNR_CAP = 99.0  # identical outputs; keeps objectives finite for the search's sampler and for JSON


def psnr(x: "torch.Tensor | np.ndarray", reference: "torch.Tensor | np.ndarray", data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio of `x` against `reference` in dB, computed in float64, capped at `PSNR_CAP`.

    Args:
        x, reference: tensors or arrays of equal shape.
        data_range (float, defaults to None): the peak; None takes the reference's range (max - min, or 1.0 for a
            constant reference), which suits latents. Pass 1.0 for frames in [0, 1].
    """
    x = torch.as_tensor(x).detach().double()
    reference = torch.as_tensor(reference).detach().to(x.device, torch.float64)
    if x.shape != reference.shape:
        raise ValueError(f"psnr needs equal shapes; got {tuple(x.shape)} and {tuple(reference.shape)}.")
    if data_range is None:
        data_range = float(reference.max() - reference.min()) or 1.0
    elif data_range <= 0:
        raise ValueError(f"psnr needs a positive data_range; got {data_range}. Pass the peak, such as 1.0 for frames in [0, 1].")
    mse = float((x - reference).pow(2).mean())
    if mse == 0.0:
        return PSNR_CAP
    return min(PSNR_CAP, 10 * math.log10(data_range**2 / mse))


def pooled_psnr(values: "Sequence[float]") -> float:
    """The PSNR of several outputs' mean squared error, from their PSNRs (each against its own peak), capped at
    `PSNR_CAP`: for outputs of one size and one peak, the `psnr` of them all taken together, as `sparsediff demo`
    reports its prompts. Never above the mean of the dB values, and below it whenever they differ: one bad output
    costs what it costs in the pooled frames, where a mean of dB lets a good one make up for it.

    >>> round(pooled_psnr([30.0, 30.0]), 6), round(pooled_psnr([32.0, 26.0]), 2)
    (30.0, 28.04)
    """
    values = [float(v) for v in values]
    if not values or any(math.isnan(v) for v in values):
        raise ValueError(f"pooled_psnr needs one or more PSNR values in dB; got {values}.")
    if len(values) == 1:  # its own PSNR exactly (the round trip through the MSE may move the last bit)
        return min(values[0], PSNR_CAP)
    mse = sum(10 ** (-v / 10) for v in values) / len(values)  # relative to the peak squared
    return PSNR_CAP if mse == 0.0 else min(PSNR_CAP, -10 * math.log10(mse))


def ssim(x: "torch.Tensor | np.ndarray", reference: "torch.Tensor | np.ndarray", data_range: float = 1.0) -> float:
    """Mean SSIM of (..., H, W, C) frames against `reference`, the leading axes flattened into frames.

    Args:
        x, reference: tensors or arrays of equal shape, channels last.
        data_range (float, defaults to 1.0): the range the frames span (1.0 for frames in [0, 1]).
    """
    x, reference = _frames(x), _frames(reference)
    if x.shape != reference.shape:
        raise ValueError(f"ssim needs equal shapes; got {x.shape} and {reference.shape}.")
    if x.ndim < 3:
        raise ValueError(f"ssim needs (..., H, W, C) frames; got shape {x.shape}. Add a channel axis for grey frames.")
    side = min(x.shape[-3:-1])
    # skimage sizes the Gaussian window at 11 px and raises for smaller frames. The filter itself stays the Gaussian
    # (reflect-padded); win_size only sets the border cropped before averaging, so the largest odd size that fits
    # keeps the standard figure for tiny frames.
    win_size = min(11, side if side % 2 else side - 1)
    x, reference = x.reshape(-1, *x.shape[-3:]), reference.reshape(-1, *reference.shape[-3:])
    per_frame = [
        structural_similarity(a, b, win_size=win_size, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                              data_range=data_range, channel_axis=-1)
        for a, b in zip(x, reference)
    ]
    return float(np.mean(per_frame))


def _frames(x: "torch.Tensor | np.ndarray") -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)
