"""sparsediff: per-head sparse attention for diffusion transformers (profile -> search a plan -> accelerate)."""

from __future__ import annotations

import importlib

from .version import __version__

# Public names, imported lazily so `import sparsediff` stays cheap and the core never pulls in diffusers.
_LAZY = {
    "TokenLayout": "sparsediff.layout",
    "SparsePlan": "sparsediff.plan",
    "ModelFingerprint": "sparsediff.plan",
    "get_pattern": "sparsediff.patterns",
    "PATTERNS": "sparsediff.patterns",
    "accelerate": "sparsediff.api",
    "profile": "sparsediff.api",
    "search_plan": "sparsediff.api",
    "AttentionStats": "sparsediff.runtime",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in ("search", "kernels", "pipelines"):  # subpackages
        return importlib.import_module(f"sparsediff.{name}")
    raise AttributeError(f"module 'sparsediff' has no attribute {name!r}")
