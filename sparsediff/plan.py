"""The plan: which pattern each (step range, layer, head) uses, as a small JSON file that validates on load.

A plan covers the denoising trajectory as *progress*, a fraction in [0, 1): step `i` of `n` is at `i / n`,
so a plan searched with 10 steps applies to 50. Its `ranges` tile [0, 1) without gaps or overlaps; each
gives one pattern name per head per layer. The first `dense_steps` steps always run dense (a count of
leading steps, or a fraction of them), and so do `dense_layers`.

>>> plan = SparsePlan.dense(ModelFingerprint("MyDenoiser", 2, 4, 64, "cafe"))
>>> plan.layer_patterns(step=3, num_steps=10, layer=1)[0].name
'full'
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .layout import TokenLayout
from .patterns import Pattern, get_pattern
from .version import __version__

SCHEMA_VERSION = 1


def _short(value: Any, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters so a huge field stays one readable sentence."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _expect(value: Any, kind: "type | tuple[type, ...]", name: str, expected: str) -> Any:
    """`value` when it is a `kind` (never a bool standing in for a number); otherwise a ValueError naming the field."""
    if isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool):
        return value
    raise ValueError(f"Plan field {name!r} is {_short(value)}; it must be {expected}. Fix the file or re-create it "
                     "with `sparsediff search`.")


# Config entries that say how a model was loaded, not what it is: transformers' `to_dict()` writes the dtype the
# model was loaded in and the running transformers version. A plan holds across both, so they are not hashed.
LOADING_KEYS = frozenset({"dtype", "torch_dtype", "transformers_version"})


@dataclass(frozen=True)
class ModelFingerprint:
    """What a plan was made for: the denoiser class, its attention shape and a hash of its config."""

    model_class: str
    num_layers: int
    num_heads: int
    head_dim: int
    config_hash: str
    # The hash sparsediff gave the same config before `LOADING_KEYS` were left out: plans and profiles saved then
    # still match (in the dtype they were made in). Neither saved nor compared.
    earlier_hash: str | None = field(default=None, compare=False, repr=False)

    @staticmethod
    def hash_config(config: dict[str, Any]) -> str:
        """The config's hash, without private (`_`) entries and `LOADING_KEYS`."""
        return ModelFingerprint._hash({k: v for k, v in config.items() if k not in LOADING_KEYS})

    @staticmethod
    def _hash(config: dict[str, Any]) -> str:
        text = json.dumps({k: v for k, v in sorted(config.items()) if not k.startswith("_")}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def of(cls, model_class: str, num_layers: int, num_heads: int, head_dim: int, config: dict[str, Any]) -> "ModelFingerprint":
        """The fingerprint of a live model (an adapter's `fingerprint`), with its config's earlier hash."""
        return cls(model_class, num_layers, num_heads, head_dim, cls.hash_config(config), cls._hash(config))

    def to_dict(self) -> dict[str, Any]:
        """The fields a plan or profile file holds."""
        return {k: v for k, v in asdict(self).items() if k != "earlier_hash"}

    def mismatch(self, other: "ModelFingerprint") -> str | None:
        """A sentence naming the first field where `other` (the live model's) differs, or None when they match. A
        `config_hash` saved by an earlier sparsediff matches the model's `earlier_hash`."""
        for key, mine in self.to_dict().items():
            theirs = getattr(other, key)
            if mine != theirs and not (key == "config_hash" and mine == other.earlier_hash):
                return f"model.{key} is {mine!r} in the plan but {theirs!r} for this model"
        return None


@dataclass(frozen=True)
class StepRange:
    """Patterns for progress in [start, end): `layers[l][h]` is the pattern of head h in layer l (a `Pattern` or its
    name; names are parsed here, so a bad one is refused when the range is built)."""

    start: float
    end: float
    layers: tuple[tuple[Pattern, ...], ...]

    def __post_init__(self):
        if isinstance(self.layers, (list, tuple)) and all(isinstance(layer, (list, tuple)) for layer in self.layers):
            object.__setattr__(self, "layers", tuple(tuple(get_pattern(p) for p in layer) for layer in self.layers))


@dataclass
class SparsePlan:
    """A per (step range, layer, head) sparse-attention plan.

    Args:
        model (ModelFingerprint): the model the plan was made for; another model is refused.
        block_size (int, defaults to 64): tokens per block of the block masks.
        ranges (list[StepRange]): tile progress [0, 1).
        dense_steps (int | float, defaults to 0): leading steps kept dense; an int counts steps, a float in
            [0, 1] is a fraction of the steps of the run.
        dense_layers (tuple[int, ...], defaults to ()): layers kept dense at every step.
        layout (str, optional): the calibration layout the plan was searched on (for summaries).
        min_tokens (int, optional): attention calls over fewer tokens run dense (the model's own attention, exact).
            A plan is searched and validated at one length; far below it top-k shares keep a block or two and
            attention is a small share of the time (measured on the embedded DLM: its 8k plan lost answers at 256
            to 2 048 tokens and ran no faster at 1 024). None applies the plan at every length.
        search (dict): metadata of the search (error budget, quality, device of the cost model).
    """

    model: ModelFingerprint
    ranges: list[StepRange]
    block_size: int = 64
    dense_steps: int | float = 0
    dense_layers: tuple[int, ...] = ()
    layout: str | None = None
    min_tokens: int | None = None
    search: dict[str, Any] = field(default_factory=dict)
    sparsediff_version: str = __version__
    schema_version: int = SCHEMA_VERSION

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def dense(cls, model: ModelFingerprint, block_size: int = 64) -> "SparsePlan":
        """A plan that runs every head dense (output equals the model's own)."""
        return cls.uniform(model, "full", block_size=block_size)

    @classmethod
    def uniform(cls, model: ModelFingerprint, pattern: "str | Pattern", **kwargs) -> "SparsePlan":
        """Every head of every layer at every step uses `pattern` (outside dense steps/layers)."""
        p = get_pattern(pattern)
        layers = tuple(tuple(p for _ in range(model.num_heads)) for _ in range(model.num_layers))
        return cls(model=model, ranges=[StepRange(0.0, 1.0, layers)], **kwargs)

    # ---- lookup ---------------------------------------------------------------------------------------
    def num_dense_steps(self, num_steps: int) -> int:
        if isinstance(self.dense_steps, float):
            return math.ceil(self.dense_steps * num_steps - 1e-9)
        return self.dense_steps

    def is_dense_step(self, step: int, num_steps: int) -> bool:
        return step < self.num_dense_steps(num_steps)

    def layer_patterns(self, step: int, num_steps: int, layer: int) -> tuple[Pattern, ...]:
        """Per-head patterns of `layer` at `step` of `num_steps` (all `full` in dense steps and layers)."""
        if self.is_dense_step(step, num_steps) or layer in self.dense_layers:
            return (get_pattern("full"),) * self.model.num_heads
        progress = step / max(num_steps, 1)
        for r in self.ranges:
            if r.start <= progress < r.end:
                return r.layers[layer]
        return self.ranges[-1].layers[layer]

    @property
    def is_all_dense(self) -> bool:
        return all(p.kind == "full" for r in self.ranges for layer in r.layers for p in layer)

    # ---- serialisation --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "sparsediff_version": self.sparsediff_version,
            "model": self.model.to_dict(),
            "block_size": self.block_size,
            "dense_steps": self.dense_steps,
            "dense_layers": list(self.dense_layers),
            "layout": self.layout,
            "min_tokens": self.min_tokens,
            "ranges": [
                {"start": r.start, "end": r.end, "layers": [[p.name for p in layer] for layer in r.layers]}
                for r in self.ranges
            ],
            "search": self.search,
        }

    def save(self, path: "str | os.PathLike") -> Path:
        """Write the plan as JSON atomically (a failed write leaves an existing file as it was)."""
        path = Path(path)
        self.validate()
        text = json.dumps(self.to_dict(), indent=1)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: "str | os.PathLike", model: ModelFingerprint | None = None) -> "SparsePlan":
        """Read and validate a plan; with `model`, refuse a plan made for another model."""
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"SparsePlan.load takes the path of a plan JSON file, not {path!r}; pass a str or Path.")
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"Plan file {str(path)!r} does not exist; make one with `sparsediff search` or SparsePlan.save.")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"Plan file {str(path)!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                             f"{e.start}); pass a plan JSON file written by `sparsediff search`.") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"Plan file {str(path)!r} is not valid JSON ({e}); re-create it with `sparsediff search`.") from None
        except RecursionError:
            raise ValueError(f"Plan file {str(path)!r} nests JSON too deeply to read; a plan is a few levels deep, so "
                             "re-create it with `sparsediff search`.") from None
        try:
            plan = cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"Plan file {str(path)!r}: {e}") from None
        if model is not None:
            plan.check_model(model)
        return plan

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SparsePlan":
        if not isinstance(data, dict):
            raise ValueError(f"A plan is a JSON object, not {type(data).__name__}; pass a plan written by `sparsediff search`.")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"Plan field 'schema_version' is {version!r} but this sparsediff reads schema {SCHEMA_VERSION}; "
                "re-run `sparsediff search` with this version to make a new plan."
            )
        for key in ("model", "ranges", "block_size"):
            if key not in data:
                raise ValueError(f"Plan field {key!r} is missing; a plan needs schema_version, model, block_size and ranges.")
        m = data["model"]
        try:
            model = ModelFingerprint(**m)
        except TypeError:
            want = ", ".join(k for k in ModelFingerprint.__dataclass_fields__ if k != "earlier_hash")
            raise ValueError(f"Plan field 'model' is {_short(m)}; it needs exactly the keys {want}.") from None
        for key in ("model_class", "config_hash"):
            _expect(getattr(model, key), str, f"model.{key}", "a string")
        ranges = []
        for i, r in enumerate(_expect(data["ranges"], list, "ranges", "a list of {start, end, layers} objects")):
            if not isinstance(r, dict) or not {"start", "end", "layers"} <= set(r):
                raise ValueError(f"Plan field 'ranges[{i}]' is {_short(r)}; it needs 'start', 'end' and 'layers'.")
            bounds = [_expect(r[key], (int, float), f"ranges[{i}].{key}", "a number in [0, 1]") for key in ("start", "end")]
            layers = []
            for li, layer in enumerate(_expect(r["layers"], list, f"ranges[{i}].layers", "a list with one list of head patterns per layer")):
                heads = []
                for hi, name in enumerate(_expect(layer, list, f"ranges[{i}].layers[{li}]", "a list of pattern names, one per head")):
                    try:
                        heads.append(get_pattern(name))
                    except ValueError as e:
                        raise ValueError(f"Plan field 'ranges[{i}].layers[{li}][{hi}]': {e}") from None
                layers.append(tuple(heads))
            ranges.append(StepRange(float(bounds[0]), float(bounds[1]), tuple(layers)))
        dense_layers = _expect(data.get("dense_layers", []), list, "dense_layers", "a list of layer indices such as [0, 1]")
        layout = data.get("layout")
        if layout is not None:
            _expect(layout, str, "layout", "a layout string such as 'video:4x8x8', or null")
        plan = cls(
            model=model,
            ranges=ranges,
            block_size=data["block_size"],
            dense_steps=data.get("dense_steps", 0),
            dense_layers=tuple(dense_layers),
            layout=layout,
            min_tokens=data.get("min_tokens"),
            search=_expect(data.get("search", {}), dict, "search", "an object of search metadata"),
            sparsediff_version=data.get("sparsediff_version", "unknown"),
            schema_version=version,
        )
        plan.validate()
        return plan

    # ---- validation -----------------------------------------------------------------------------------
    def validate(self) -> "SparsePlan":
        """Raise ValueError naming the first bad field and its fix; return self when the plan is sound."""
        m = self.model
        for key in ("num_layers", "num_heads", "head_dim"):
            value = getattr(m, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Plan field 'model.{key}' is {value!r}; it must be a positive integer.")
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size <= 0:
            raise ValueError(f"Plan field 'block_size' is {self.block_size!r}; use a positive integer such as 64.")
        ds = self.dense_steps
        if isinstance(ds, bool) or not isinstance(ds, (int, float)) or not 0 <= ds or (isinstance(ds, float) and not ds <= 1):
            raise ValueError(
                f"Plan field 'dense_steps' is {ds!r}; give a count of leading steps (int >= 0) or a fraction in [0, 1]."
            )
        mt = self.min_tokens
        if mt is not None and (not isinstance(mt, int) or isinstance(mt, bool) or mt < 1):
            raise ValueError(f"Plan field 'min_tokens' is {mt!r}; give a positive token count such as 4096, or null.")
        for layer in self.dense_layers:
            if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < m.num_layers:
                raise ValueError(
                    f"Plan field 'dense_layers' holds {layer!r}; layers are integers in [0, {m.num_layers - 1}]."
                )
        if not self.ranges:
            raise ValueError("Plan field 'ranges' is empty; give at least one range covering progress [0, 1).")
        expect = 0.0
        for i, r in enumerate(self.ranges):
            if not math.isclose(r.start, expect, abs_tol=1e-9):
                what = "overlaps the previous range" if r.start < expect else "leaves a gap after the previous range"
                raise ValueError(
                    f"Plan field 'ranges[{i}].start' is {r.start} and {what}, which ends at {expect}; "
                    "ranges must tile [0, 1) in order."
                )
            if not r.end > r.start:
                raise ValueError(f"Plan field 'ranges[{i}].end' is {r.end}; it must be greater than start {r.start}.")
            expect = r.end
            if len(r.layers) != m.num_layers:
                raise ValueError(
                    f"Plan field 'ranges[{i}].layers' has {len(r.layers)} layers but model.num_layers is "
                    f"{m.num_layers}; give one list of head patterns per layer."
                )
            for li, layer in enumerate(r.layers):
                if len(layer) != m.num_heads:
                    raise ValueError(
                        f"Plan field 'ranges[{i}].layers[{li}]' has {len(layer)} heads but model.num_heads is "
                        f"{m.num_heads}; give one pattern per head."
                    )
        if not math.isclose(expect, 1.0, abs_tol=1e-9):
            raise ValueError(
                f"Plan field 'ranges[{len(self.ranges) - 1}].end' is {expect}; the last range must end at 1.0 "
                "so every step has a pattern."
            )
        if self.layout is not None:
            TokenLayout.parse(self.layout)
        return self

    def check_model(self, model: ModelFingerprint) -> None:
        problem = self.model.mismatch(model)
        if problem:
            raise ValueError(
                f"This plan was made for another model: {problem}. Search a plan for this model with "
                "`sparsediff search`, or load the plan that belongs to it."
            )

    # ---- summary --------------------------------------------------------------------------------------
    def layer_densities(self, layout: TokenLayout, progress: float = 1.0 - 1e-9) -> list[float]:
        """Mean head density of each layer in the range holding `progress` (topk_blocks at its keep ratio)."""
        r = next((r for r in self.ranges if r.start <= progress < r.end), self.ranges[-1])
        cache: dict[str, float] = {}
        out = []
        for li, layer in enumerate(r.layers):
            if li in self.dense_layers:
                out.append(1.0)
                continue
            for p in layer:
                if p.name not in cache:
                    cache[p.name] = p.estimated_density(layout, self.block_size)
            out.append(sum(cache[p.name] for p in layer) / len(layer))
        return out

    def predicted_flops_share(self, layout: TokenLayout, num_steps: int) -> float:
        """Attention FLOPs of a run of `num_steps` steps relative to dense (dense steps count as 1)."""
        total = 0.0
        for step in range(num_steps):
            if self.is_dense_step(step, num_steps):
                total += 1.0
            else:
                d = self.layer_densities(layout, step / num_steps)
                total += sum(d) / len(d)
        return total / num_steps

    def summary(self, layout: TokenLayout | None = None, num_steps: int = 50) -> dict[str, Any]:
        """Per-layer density on `layout` (the plan's calibration layout by default) and the predicted share of
        dense attention FLOPs over `num_steps` steps."""
        if layout is None:
            if self.layout is None:
                raise ValueError("This plan has no calibration layout; pass layout=TokenLayout.parse('video:FxHxW').")
            layout = TokenLayout.parse(self.layout)
        counts: dict[str, int] = {}
        for r in self.ranges:
            for layer in r.layers:
                for p in layer:
                    counts[p.kind] = counts.get(p.kind, 0) + 1
        return {
            "model": self.model.model_class,
            "layout": str(layout),
            "block_size": self.block_size,
            "dense_steps": self.num_dense_steps(num_steps),
            "num_steps": num_steps,
            "dense_layers": list(self.dense_layers),
            "layer_density": [round(d, 4) for d in self.layer_densities(layout)],
            "predicted_flops_share": round(self.predicted_flops_share(layout, num_steps), 4),
            "pattern_counts": counts,
        }
