"""The measured cost model: kernel latency of each candidate pattern on *this* machine, layout and backend.

A layer's time is predicted as the sum over its fused head groups (one kernel call per group, skipped heads
free). Each candidate is timed through the runtime at group sizes 1, 2, 4, ... up to all heads, and a group of
n heads is predicted by interpolating linearly between the measured sizes (time is not linear in n: a small
group parallelises less well); dense heads likewise. Tables are cached as JSON per device, backend,
dtype and shape under the user's cache directory (`$SPARSEDIFF_CACHE_DIR`, default
`~/.cache/sparsediff/costs`), and a table for another device or shape is never reused.

>>> from sparsediff.layout import TokenLayout
>>> model = CostModel.measure(TokenLayout.parse("video:4x8x8"), num_heads=4, head_dim=16, block_size=16,
...                           candidates=["diagonal_w1"], repeats=1)
>>> model.layer_time(["diagonal_w1", "skip", "full", "diagonal_w1"]) > 0
True
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsediff.layout import TokenLayout
from sparsediff.patterns import Pattern, get_pattern
from sparsediff.runtime import SparseAttention, group_heads, resolve_backend
from sparsediff.timing import device_name, median_ms

COST_SCHEMA = 2
# Full heads in a sparse step: on the torch backend's compiled CPU path they run dense through the compiled kernel,
# beside other groups or a layer of them alone (the dense steps and layers of a plan run SDPA, the model's own
# attention: `dense_layer_time`); timed as their own curve (the name is the one cached tables have).
FULL_BESIDE = "full beside sparse"


def compiled_full(backend: str, device: "torch.device | str", dtype: torch.dtype) -> bool:
    """Whether full heads beside sparse ones run through the compiled CPU kernel in this setting."""
    return cpu_path(backend, device, dtype).startswith("compiled")


def cpu_path(backend: str, device: "torch.device | str", dtype: torch.dtype, head_dim: int | None = None) -> str:
    """Which path the torch backend runs on the CPU for `dtype` (and `head_dim`): "compiled" (the compiled kernel,
    computing in float32), "compiled-16bit" (its 16-bit entry: `cpu_kernel.native`, even head sizes) or "pure" (pure
    torch); "" for other backends and devices."""
    from sparsediff.kernels import cpu_kernel

    if backend != "torch" or torch.device(device).type != "cpu":
        return ""
    if not cpu_kernel.runs(dtype):
        return "pure"
    return "compiled-16bit" if cpu_kernel.compute_dtype(dtype, head_dim) != torch.float32 else "compiled"


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSEDIFF_CACHE_DIR", Path.home() / ".cache" / "sparsediff")) / "costs"


@dataclass(frozen=True)
class CostKey:
    """Everything a latency depends on; a table is only reused when all of it matches."""

    device: str
    backend: str
    dtype: str
    layout: str
    num_heads: int
    head_dim: int
    batch: int
    block_size: int
    torch_version: str
    # the torch backend's CPU path for this dtype ("compiled", "compiled-16bit" or "pure", see `cpu_path`): switching
    # it (a CPU with AMX takes 16-bit through SDPA, the 16-bit entry on or off, $SPARSEDIFF_CPU_KERNEL=0, no compiler)
    # changes every latency; "" elsewhere and in tables from before the field, which are then re-measured
    cpu_path: str = ""

    @classmethod
    def for_setting(
        cls, layout: TokenLayout, num_heads: int, head_dim: int, block_size: int = 64, backend: str | None = None,
        dtype: torch.dtype = torch.float32, device: str = "cpu", batch: int = 1,
    ) -> "CostKey":
        dev = torch.device(device)
        backend = resolve_backend(backend, dev)
        return cls(device_name(dev), backend, str(dtype).removeprefix("torch."), str(layout),
                   num_heads, head_dim, batch, block_size, torch.__version__, cpu_path(backend, dev, dtype, head_dim))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class CostModel:
    """Measured latency (ms) per pattern name: `points[name] = [(heads, ms), ...]`, ascending in heads."""

    key: CostKey
    points: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    # ---- prediction -----------------------------------------------------------------------------------
    def group_time(self, pattern: "Pattern | str", heads: int) -> float:
        p = get_pattern(pattern)
        if p.kind == "skip" or heads == 0:
            return 0.0
        if p.name not in self.points:
            raise ValueError(f"The cost model has no measurement for {p.name!r}; measure it with candidates=[..., {p.name!r}].")
        return interpolate(self.points[p.name], heads)

    def layer_time(self, patterns: Sequence["Pattern | str"]) -> float:
        """Predicted ms of one layer call of a sparse step: the sum over its fused groups (full heads on the compiled
        kernel's curve where one was measured)."""
        groups = group_heads([get_pattern(x) for x in patterns])
        compiled = FULL_BESIDE in self.points
        return sum(interpolate(self.points[FULL_BESIDE], len(h)) if compiled and p.kind == "full" else self.group_time(p, len(h))
                   for p, h in groups)

    def dense_layer_time(self) -> float:
        return self.group_time("full", self.key.num_heads)

    # ---- measurement ----------------------------------------------------------------------------------
    @classmethod
    def measure(
        cls,
        layout: TokenLayout,
        num_heads: int,
        head_dim: int,
        candidates: Iterable["Pattern | str"],
        block_size: int = 64,
        backend: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        batch: int = 1,
        repeats: int = 3,
        progress: bool = False,
    ) -> "CostModel":
        """Time every candidate (and dense) through the runtime at group sizes 1, 2, 4, ... and H."""
        dev = torch.device(device)
        key = CostKey.for_setting(layout, num_heads, head_dim, block_size, backend, dtype, device, batch)
        backend = key.backend
        names = ["full", *(get_pattern(c).name for c in candidates)]
        names = [n for n in dict.fromkeys(names) if get_pattern(n).kind != "skip"]
        sizes = sorted({*(2**i for i in range(num_heads.bit_length()) if 2**i <= num_heads), num_heads})
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(batch, num_heads, layout.num_tokens, head_dim, generator=g, device=dev, dtype=dtype) for _ in range(3))
        model = cls(key)
        from tqdm import tqdm

        for name in tqdm(names, desc="cost model", disable=not progress, leave=False):
            pattern = get_pattern(name)
            points = []
            for n in sizes:
                runtime = SparseAttention(backend=backend)
                qs, ks, vs = q[:, :n].contiguous(), k[:, :n].contiguous(), v[:, :n].contiguous()
                if pattern.kind == "full":
                    fn = lambda: F.scaled_dot_product_attention(qs, ks, vs)  # noqa: E731
                else:
                    fn = lambda: runtime(qs, ks, vs, layout, [pattern] * n, block_size)  # noqa: E731
                points.append((n, median_ms({name: fn}, repeats, dev)[name]))
            model.points[name] = points
        if compiled_full(backend, dev, dtype):
            from sparsediff.kernels import cpu_kernel

            points = []
            for n in sizes:
                qs, ks, vs = q[:, :n].contiguous(), k[:, :n].contiguous(), v[:, :n].contiguous()
                fn = lambda: cpu_kernel.dense_attention(qs, ks, vs)  # noqa: E731
                points.append((n, median_ms({FULL_BESIDE: fn}, repeats, dev)[FULL_BESIDE]))
            model.points[FULL_BESIDE] = points
        model.points = monotone_in_density(model.points, layout, block_size)
        return model

    @classmethod
    def load_or_measure(cls, layout: TokenLayout, num_heads: int, head_dim: int, candidates, **kwargs) -> "CostModel":
        """The cached table for this key when it has every candidate, else a fresh measurement (then cached)."""
        setting = {k: kwargs[k] for k in ("block_size", "backend", "dtype", "device", "batch") if k in kwargs}
        key = CostKey.for_setting(layout, num_heads, head_dim, **setting)
        path = cache_dir() / f"{key.digest()}.json"
        wanted = {get_pattern(c).name for c in candidates if get_pattern(c).kind != "skip"} | {"full"}
        if compiled_full(key.backend, kwargs.get("device", "cpu"), kwargs.get("dtype", torch.float32)):
            wanted.add(FULL_BESIDE)
        if path.is_file():
            cached = cls.load(path)
            if cached.key == key and wanted <= set(cached.points):
                return cached
        model = cls.measure(layout, num_heads, head_dim, candidates, **kwargs)
        model.save(path)
        return model

    # ---- storage --------------------------------------------------------------------------------------
    def save(self, path: "str | os.PathLike") -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"schema": COST_SCHEMA, "key": asdict(self.key), "points": self.points}, indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: "str | os.PathLike") -> "CostModel":
        data = json.loads(Path(path).read_text())
        if data.get("schema") != COST_SCHEMA:
            raise ValueError(f"Cost table {str(path)!r} has schema {data.get('schema')!r}, not {COST_SCHEMA}; delete it to re-measure.")
        return cls(CostKey(**data["key"]), {k: [tuple(p) for p in v] for k, v in data["points"].items()})

    def check_key(self, key: CostKey) -> None:
        """Refuse a table measured for another device, backend, dtype or shape."""
        if key != self.key:
            diff = [f"{f} {getattr(self.key, f)!r} vs {getattr(key, f)!r}" for f in asdict(key) if getattr(key, f) != getattr(self.key, f)]
            raise ValueError(f"This cost table was measured for another setting ({'; '.join(diff)}); re-measure it here.")


def interpolate(points: list[tuple[int, float]], heads: int) -> float:
    """Piecewise-linear time of `heads` heads through the measured (heads, ms) points; beyond the last point
    it grows in proportion to the heads."""
    if heads <= points[0][0]:
        return points[0][1] * heads / points[0][0]
    for (n0, t0), (n1, t1) in zip(points, points[1:]):
        if heads <= n1:
            return t0 + (t1 - t0) * (heads - n0) / (n1 - n0)
    n, t = points[-1]
    return t * heads / n


def monotone_in_density(
    points: dict[str, list[tuple[int, float]]], layout: TokenLayout, block_size: int
) -> dict[str, list[tuple[int, float]]]:
    """Within each pattern kind, a denser candidate must not be predicted faster than a sparser one.

    Timing noise can invert two close candidates; pooling adjacent violators (isotonic regression) at every
    measured group size, candidates ordered by density, removes such inversions while keeping every real
    difference; interpolation between monotone points stays monotone.
    """
    out = dict(points)
    by_kind: dict[str, list[tuple[float, str]]] = {}
    for name in points:
        if name == FULL_BESIDE:
            continue
        p = get_pattern(name)
        if p.kind not in ("full", "skip"):
            by_kind.setdefault(p.kind, []).append((p.estimated_density(layout, block_size), name))
    for members in by_kind.values():
        names = [n for _, n in sorted(members)]
        sizes = [n for n, _ in points[names[0]]]
        pooled = [_pool_adjacent_violators([dict(points[name])[n] for name in names]) for n in sizes]
        for i, name in enumerate(names):
            out[name] = [(n, pooled[j][i]) for j, n in enumerate(sizes)]
    return out


def _pool_adjacent_violators(values: list[float]) -> list[float]:
    """The closest non-decreasing sequence (least squares)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, c2 = blocks.pop()
            m1, c1 = blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    return [m for m, c in blocks for _ in range(int(c))]

