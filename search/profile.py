"""Attention profiles: per (step, layer, head) block attention mass and each candidate pattern's error, on disk.

A profile is what the search reads. For every observed attention call it holds, per head, the block-level attention
mass (estimated from a sample of query rows, so memory stays O(rows x S) at long sequences) and, for each candidate
pattern, the relative L2 error of the head's output against full attention on the same q, k, v:
`||o_candidate - o_full|| / ||o_full||` over batch, tokens and channels (0 for `full`, 1 for `skip`). Calls at the
same (step, layer), such as the cond and uncond branches or several prompts, are averaged.

Format: a directory with two files.

- `profile.json`: `schema_version` (1), `sparsediff_version`, `model` (the fingerprint: model_class, num_layers,
  num_heads, head_dim, config_hash), `layout` (e.g. `text:226+video:13x30x45`), `block_size` (of the errors'
  block masks), `mass_block_size` (tokens per block of `mass`; `block_size` times a factor keeping at most
  `max_mass_blocks` blocks per side), `rows_per_block`, `steps` (recorded step indices), `num_steps` (steps of
  the profiled runs), `layers` (recorded layer indices), `candidates` (pattern names), `meta` (free-form: prompts,
  runs, backend).
- `tensors.safetensors`:
  - `mass` float32 `(T, L, H, nq, nk)`: mean softmax mass each query block puts on each key block (rows sum to 1)
    on `layout` at `mass_block_size`; averaged over the calls on `layout` (calls on other layouts, e.g. Mochi's
    per-sample text lengths, count for the errors only).
  - `errors` float32 `(T, L, H, C)`: mean relative L2 error per candidate; NaN where nothing was observed.
  - `calls` int64 `(T, L)`: attention calls averaged into `errors` (0 where nothing was observed).

  T indexes `steps`, L `layers`, H heads, C `candidates`.

>>> import torch
>>> from sparsediff.layout import TokenLayout
>>> recorder = ProfileRecorder(num_heads=2, candidates=["full", "diagonal_w1"], block_size=16, backend="reference")
>>> q = k = v = torch.randn(1, 2, 64, 8)
>>> recorder.observe(step=0, num_steps=1, layer=0, query=q, key=k, value=v, layout=TokenLayout.parse("video:4x4x4"))
>>> prof = recorder.result(ModelFingerprint("M", 1, 2, 8, "h"))
>>> tuple(prof.mass.shape), tuple(prof.errors.shape), float(prof.errors[0, 0, 0, 0])
((1, 1, 2, 4, 4), (1, 1, 2, 2), 0.0)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..kernels.block_mass import block_attention_mass
from ..layout import TokenLayout
from ..patterns import get_pattern
from ..plan import ModelFingerprint
from ..runtime import SparseAttention

SCHEMA_VERSION = 1
META_FILE = "profile.json"
TENSOR_FILE = "tensors.safetensors"

DEFAULT_CANDIDATES = (
    "full",
    "skip",
    "diagonal_w0.5",
    "diagonal_w1",
    "diagonal_w2",
    "multi_diagonal_w1",
    "multi_diagonal_w4",
    "multi_diagonal_w16",
    "vertical_stripe_f0.5",
    "vertical_stripe_f1",
    "topk_blocks_k0.1",
    "topk_blocks_k0.25",
    "topk_blocks_k0.5",
)

# Elements of one (B, heads, sampled rows, S) probability slab when estimating block mass; bounds memory at long S.
_MASS_ELEMENTS = 1 << 26


def _version() -> str:
    from .. import __version__

    return __version__


def relative_l2_error(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(H,) per-head `||out - ref|| / ||ref||` over batch, tokens and channels of (B, H, S, D) outputs."""
    diff = (out.float() - ref.float()).pow(2).sum(dim=(0, 2, 3)).sqrt()
    norm = ref.float().pow(2).sum(dim=(0, 2, 3)).sqrt()
    return diff / norm.clamp_min(torch.finfo(torch.float32).tiny)


def candidate_errors(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: TokenLayout,
    candidates: Sequence[str],
    block_size: int,
    scale: float | None = None,
    backend: str | None = None,
    runtimes: dict[str, SparseAttention] | None = None,
) -> torch.Tensor:
    """(H, C) relative L2 error of every head under each candidate (all heads at once) against full attention.

    `runtimes` (one per candidate name, filled on first use) keeps kernel specs cached across calls; a candidate
    that needs scores (`topk_blocks`) is reset first, so it picks its blocks from these very q and k."""
    runtimes = {} if runtimes is None else runtimes
    H = query.shape[1]
    full, _ = runtimes.setdefault("full", SparseAttention(backend=backend))(query, key, value, layout, ["full"] * H, block_size, scale)
    errors = []
    for name in candidates:
        runtime = runtimes.setdefault(name, SparseAttention(backend=backend))
        if get_pattern(name).needs_scores:
            runtime.reset()
        out, _ = runtime(query, key, value, layout, [name] * H, block_size, scale)
        errors.append(relative_l2_error(out, full))
    return torch.stack(errors, dim=-1).cpu()


def block_mass(query: torch.Tensor, key: torch.Tensor, block_size: int, rows_per_block: int, scale: float | None) -> torch.Tensor:
    """(H, nq, nk) block attention mass, a few heads at a time so the sampled rows' probabilities stay bounded."""
    B, H, S, _ = query.shape
    rows = -(-S // max(1, block_size // rows_per_block))
    chunk = max(1, _MASS_ELEMENTS // (B * rows * S))
    parts = [
        block_attention_mass(query[:, h : h + chunk], key[:, h : h + chunk], block_size, rows_per_block, scale).cpu()
        for h in range(0, H, chunk)
    ]
    return torch.cat(parts)


@dataclass
class AttentionProfile:
    """A recorded profile; see the module docstring for the fields and the on-disk format."""

    model: ModelFingerprint
    layout: TokenLayout
    block_size: int
    mass_block_size: int
    rows_per_block: int
    steps: list[int]
    num_steps: int | None
    layers: list[int]
    candidates: list[str]
    mass: torch.Tensor  # (T, L, H, nq, nk)
    errors: torch.Tensor  # (T, L, H, C)
    calls: torch.Tensor  # (T, L)
    meta: dict[str, Any] = field(default_factory=dict)
    sparsediff_version: str = field(default_factory=_version)

    def __post_init__(self):
        T, L, H, C = len(self.steps), len(self.layers), self.model.num_heads, len(self.candidates)
        n = self.layout.num_blocks(self.mass_block_size)
        checks = {"mass": (self.mass, (T, L, H, n, n)), "errors": (self.errors, (T, L, H, C)), "calls": (self.calls, (T, L))}
        for name, (tensor, shape) in checks.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"Profile tensor {name!r} has shape {tuple(tensor.shape)} but steps, layers, heads, candidates and "
                    f"layout give {shape}; re-record the profile with `sparsediff profile`."
                )

    @property
    def num_heads(self) -> int:
        return self.model.num_heads

    def error(self, step: int, layer: int, candidate: str) -> torch.Tensor:
        """(H,) errors of `candidate` at recorded step index `step` and layer index `layer`."""
        return self.errors[self.steps.index(step), self.layers.index(layer), :, self.candidates.index(candidate)]

    def mean_errors(self) -> dict[str, float]:
        """Mean error of each candidate over every observed (step, layer, head)."""
        observed = self.errors[self.calls > 0]  # (N, H, C)
        return {c: round(float(observed[..., i].mean()), 6) for i, c in enumerate(self.candidates)}

    def concentration(self, share: float = 0.1) -> torch.Tensor:
        """(T, L, H): how much of a head's attention falls on its most attended key blocks. Per query block, the mass
        of the `share` of key blocks it attends most (at least one block), averaged over query blocks: about `share`
        when the head spreads its attention evenly, 1.0 when all of it falls on those blocks. Read from `mass` (sampled
        rows, averaged over the calls on the profile's layout), so calls that look at different places lower it. NaN
        where nothing was observed."""
        if not 0.0 < share <= 1.0:
            raise ValueError(f"share={share!r} must be in (0, 1], e.g. 0.1 for the 10% most attended key blocks.")
        top = self.mass.float().topk(self._top_blocks(share), dim=-1).values.sum(-1)  # (T, L, H, nq)
        rows = self.mass.float().sum(-1) > 0  # query blocks with a recorded row
        out = (top * rows).sum(-1) / rows.sum(-1).clamp(min=1)
        return out.masked_fill(~rows.any(-1), float("nan"))

    def _top_blocks(self, share: float) -> int:
        """Key blocks in the `share` most attended (at least one)."""
        return max(1, math.ceil(share * self.mass.shape[-1]))

    def concentration_summary(self, share: float = 0.1, diffuse_below: float = 2.0) -> dict[str, Any]:
        """`concentration(share)` per layer and head (mean over observed steps), and how many heads are diffuse:
        under `diffuse_below` times `share` (within twice the even spread, by default). A sparse pattern on a diffuse
        head keeps little of its attention and works only as far as its values are alike, so its error depends on the
        content more than a concentrated head's does: validate such plans on held-out prompts."""
        per_head = self.concentration(share).nanmean(0)  # (L, H)
        observed = ~per_head.isnan()
        diffuse = int(((per_head < diffuse_below * share) & observed).sum())
        return {"share": share, "even": round(self._top_blocks(share) / self.mass.shape[-1], 6),
                "by_layer": {str(layer): [round(float(x), 3) for x in row] for layer, row in zip(self.layers, per_head)},
                "diffuse_heads": diffuse, "heads": int(observed.sum()), "diffuse_below": round(diffuse_below * share, 6)}

    def metadata(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "sparsediff_version": self.sparsediff_version,
            "model": self.model.to_dict(),
            "layout": str(self.layout),
            "block_size": self.block_size,
            "mass_block_size": self.mass_block_size,
            "rows_per_block": self.rows_per_block,
            "steps": self.steps,
            "num_steps": self.num_steps,
            "layers": self.layers,
            "candidates": self.candidates,
            "meta": self.meta,
        }

    def save(self, directory: "str | os.PathLike") -> Path:
        """Write `profile.json` and `tensors.safetensors` into `directory` (created if needed)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"mass": self.mass.float().contiguous(), "errors": self.errors.float().contiguous(), "calls": self.calls.long().contiguous()}
        # each file is written under a temporary name, then renamed: an interrupted save leaves the old one whole
        tmp_tensors, tmp_meta = directory / f".{TENSOR_FILE}.tmp", directory / f".{META_FILE}.tmp"
        try:
            save_file(tensors, str(tmp_tensors))
            tmp_meta.write_text(json.dumps(self.metadata(), indent=1) + "\n")
            os.replace(tmp_tensors, directory / TENSOR_FILE)
            os.replace(tmp_meta, directory / META_FILE)
        finally:
            tmp_tensors.unlink(missing_ok=True)
            tmp_meta.unlink(missing_ok=True)
        return directory

    @classmethod
    def load(cls, directory: "str | os.PathLike") -> "AttentionProfile":
        """Read a profile folder written by `save`; a missing, damaged or incomplete one is a ValueError naming it."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not isinstance(directory, (str, os.PathLike)):
            raise ValueError(f"A profile is the path of a folder from `sparsediff profile`, not {directory!r}; pass a str or Path.")
        directory = Path(directory)
        again = "record it again with `sparsediff profile --out DIR`"
        missing = [name for name in (META_FILE, TENSOR_FILE) if not (directory / name).is_file()]
        if missing:
            where = "it does not exist" if not directory.exists() else "it is a file" if not directory.is_dir() else \
                f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
            raise ValueError(f"{str(directory)!r} is not a profile directory ({where}; it needs {META_FILE} and "
                             f"{TENSOR_FILE}); {again}.")
        try:
            meta = json.loads((directory / META_FILE).read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            meta = None
        if not isinstance(meta, dict):
            raise ValueError(f"Profile folder {str(directory)!r} holds a {META_FILE} that is not a JSON object; {again}.")
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"Profile field 'schema_version' is {meta.get('schema_version')!r} but this sparsediff reads schema "
                f"{SCHEMA_VERSION}; re-record the profile with `sparsediff profile`."
            )
        try:
            tensors = load_file(str(directory / TENSOR_FILE))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"Profile folder {str(directory)!r} holds a damaged {TENSOR_FILE} ({e}); {again}.") from None
        try:
            return cls(
                model=ModelFingerprint(**meta["model"]),
                layout=TokenLayout.parse(meta["layout"]),
                block_size=meta["block_size"],
                mass_block_size=meta["mass_block_size"],
                rows_per_block=meta["rows_per_block"],
                steps=list(meta["steps"]),
                num_steps=meta["num_steps"],
                layers=list(meta["layers"]),
                candidates=list(meta["candidates"]),
                mass=tensors["mass"],
                errors=tensors["errors"],
                calls=tensors["calls"],
                meta=meta.get("meta", {}),
                sparsediff_version=meta.get("sparsediff_version", "unknown"),
            )
        except KeyError as e:
            what = f"{TENSOR_FILE} lacks the tensor {e.args[0]!r}" if e.args and e.args[0] in ("mass", "errors", "calls") \
                else f"{META_FILE} lacks the field {e.args[0]!r}" if e.args else f"{META_FILE} is incomplete"
            raise ValueError(f"Profile folder {str(directory)!r}: {what}; {again}.") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"Profile folder {str(directory)!r} holds an unreadable profile ({e}); {again}.") from None


class ProfileRecorder:
    """Accumulates observed attention calls into an `AttentionProfile`.

    Args:
        num_heads (int): heads per layer.
        candidates (Sequence[str], defaults to DEFAULT_CANDIDATES): pattern names to measure.
        block_size (int, defaults to 64): block size of the candidates' block masks.
        rows_per_block (int, defaults to 4): query rows sampled per mass block.
        max_mass_blocks (int, defaults to 128): most mass blocks per side; coarser blocks beyond.
        backend (str, optional): kernel backend of the candidates' runtime.
        steps (Sequence[int], optional): step indices to record (default: all).
        layers (Sequence[int], optional): layer indices to record (default: all).
    """

    def __init__(
        self,
        num_heads: int,
        candidates: Sequence[str] = DEFAULT_CANDIDATES,
        block_size: int = 64,
        rows_per_block: int = 4,
        max_mass_blocks: int = 128,
        backend: str | None = None,
        steps: Sequence[int] | None = None,
        layers: Sequence[int] | None = None,
    ):
        self.candidates = [get_pattern(c).name for c in candidates]
        if not self.candidates:
            raise ValueError("candidates is empty; give at least one pattern name, e.g. ['full', 'diagonal_w1'].")
        self.num_heads = num_heads
        self.block_size = block_size
        self.rows_per_block = rows_per_block
        self.max_mass_blocks = max_mass_blocks
        self.backend = backend
        self.steps = None if steps is None else sorted(set(steps))
        self.layers = None if layers is None else sorted(set(layers))
        self.layout: TokenLayout | None = None
        self.mass_block_size = block_size
        self.num_steps: int | None = None
        self._acc: dict[tuple[int, int], dict[str, Any]] = {}
        self._runtimes: dict[str, SparseAttention] = {}

    def wants(self, step: int, layer: int) -> bool:
        return (self.steps is None or step in self.steps) and (self.layers is None or layer in self.layers)

    def observe(self, step: int, num_steps: int | None, layer: int, query, key, value, layout: TokenLayout, scale=None, **_) -> None:
        """Record one attention call's (B, H, S, D) q, k, v on `layout`."""
        if self.layout is None:
            self.layout = layout
            factor = math.ceil(layout.num_blocks(self.block_size) / self.max_mass_blocks)
            self.mass_block_size = self.block_size * factor
        if num_steps is not None:
            self.num_steps = max(self.num_steps or 0, num_steps)
        acc = self._acc.setdefault((step, layer), {"errors": 0.0, "calls": 0, "mass": 0.0, "mass_calls": 0})
        errors = candidate_errors(query, key, value, layout, self.candidates, self.block_size, scale, self.backend, self._runtimes)
        acc["errors"] = acc["errors"] + errors
        acc["calls"] += 1
        if layout == self.layout:
            acc["mass"] = acc["mass"] + block_mass(query, key, self.mass_block_size, self.rows_per_block, scale)
            acc["mass_calls"] += 1

    def result(self, model: ModelFingerprint, meta: dict[str, Any] | None = None) -> AttentionProfile:
        if self.layout is None:
            raise ValueError("Nothing was profiled: no attention call was observed; check the inputs, steps and layers.")
        steps = self.steps or sorted({s for s, _ in self._acc})
        layers = self.layers or list(range(model.num_layers))
        H, C, n = self.num_heads, len(self.candidates), self.layout.num_blocks(self.mass_block_size)
        mass = torch.zeros(len(steps), len(layers), H, n, n)
        errors = torch.full((len(steps), len(layers), H, C), math.nan)
        calls = torch.zeros(len(steps), len(layers), dtype=torch.long)
        for (step, layer), acc in self._acc.items():
            t, l = steps.index(step), layers.index(layer)
            errors[t, l] = acc["errors"] / acc["calls"]
            calls[t, l] = acc["calls"]
            if acc["mass_calls"]:
                mass[t, l] = acc["mass"] / acc["mass_calls"]
        return AttentionProfile(
            model=model,
            layout=self.layout,
            block_size=self.block_size,
            mass_block_size=self.mass_block_size,
            rows_per_block=self.rows_per_block,
            steps=steps,
            num_steps=self.num_steps,
            layers=layers,
            candidates=self.candidates,
            mass=mass,
            errors=errors,
            calls=calls,
            meta={"backend": self.backend, **(meta or {})},
        )
