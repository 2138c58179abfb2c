"""Shared fixtures: the ragged layouts every fast path is checked on."""

import os

import pytest
import torch

from sparsediff.layout import TokenLayout

# Without a GPU, Triton kernels run on Triton's CPU interpreter. Triton reads TRITON_INTERPRET when a kernel is
# decorated, so it is set here, before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Ragged lengths (97, 130, 191 tokens), text first and text last, diffusion-LM layouts and axis segments stored
# frame-major and position-major.
RAGGED_LAYOUTS = [
    "video:97x1x1",  # 97 tokens, one token per frame
    "video:5x2x13",  # 130 tokens
    "text:11+video:3x6x10",  # 191 tokens, text first (CogVideoX)
    "video:3x6x10+text:11",  # 191 tokens, text last (HunyuanVideo, Mochi)
    "text:7+video:4x5x6+text:3",
    "prompt:61+generation:36",  # 97 tokens
    "axis:5x19",  # 95 tokens, a sequence of latent sets, frame-major
    "text:7+axis:4x13:position",  # 59 tokens, position-major after text
    "axis:6x17:position+text:9",  # 111 tokens, position-major before text
    "axis:3x1",  # 3 tokens, shorter than one block
]


@pytest.fixture(params=RAGGED_LAYOUTS)
def ragged_layout(request) -> TokenLayout:
    return TokenLayout.parse(request.param)


def gpu_available() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
