"""The public face: `accelerate` a pipeline (or its denoiser) with a sparse plan, `profile` it, `search_plan` for it.

Everything model-specific goes through the model's adapter (`sparsediff.pipelines.adapter`): `accelerate` installs it
into every denoiser with a plan controller, and the returned `SparsediffHandle` reports per-step stats and
`.remove()` restores the model exactly. `profile` installs the same machinery in observe mode and records the block
attention mass and every candidate pattern's error per (step, layer, head). `search_plan` turns a profile into a plan
with costs measured on this machine.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .plan import SparsePlan
from .runtime import check_backend, release_scratch

logger = logging.getLogger("sparsediff")


@dataclass
class AccelerateConfig:
    """How `accelerate` plugs sparse attention into a pipeline or denoiser.

    Args:
        plan (SparsePlan | str | dict | None, defaults to None): the resolved plan (see `resolve_plan`), a path to its
            JSON, or None (dense: every attention call the model's own, bit for bit; an all-`full` plan does the same).
            For Wan 2.2 A14B one plan applies to both `transformer` and `transformer_2` (each step runs on one of them,
            and the plan is indexed by step); a dict `{"transformer": plan, "transformer_2": plan}` gives each its
            own, and a denoiser left out runs dense.
        backend (str, defaults to None): kernel backend ("torch", "triton", "flex", "reference"); automatic when None.
        num_steps (int, defaults to None): denoising steps per run, needed only for a bare transformer with a sparse
            plan (a pipeline's scheduler knows its steps).

    >>> AccelerateConfig(plan=None, backend="torch").backend
    'torch'
    """

    plan: Any = None
    backend: str | None = None
    num_steps: int | None = None

    def __post_init__(self):
        check_backend(self.backend)
        if self.num_steps is not None and (not isinstance(self.num_steps, int) or self.num_steps <= 0):
            raise ValueError(f"num_steps={self.num_steps!r} must be a positive integer (the denoising steps of one run).")


class SparsediffHandle:
    """sparsediff inside a pipeline or denoiser.

    `.stats` lists one `AttentionStats` per (denoiser, cache context, step) of the latest run (see
    `sparsediff.runtime.AttentionStats`); `.summary()` folds them into one dict; `.reset()` forgets the current
    run (stats, step counters, top-k scores); `.remove()` restores the original processors and hooks. Also a
    context manager that removes itself on exit.
    """

    def __init__(self, installations: list, log, config: AccelerateConfig | None = None):
        self._installations = installations
        self._log = log
        self.config = config
        self._removed = False

    @property
    def models(self) -> list[str]:
        return [inst.name for inst in self._installations]

    @property
    def stats(self) -> list:
        return self._log.stats()

    def summary(self) -> dict[str, Any]:
        """Steps, dense steps, mean density of the sparse steps, heads skipped and attention time of the last run."""
        stats = self.stats
        sparse = [s for s in stats if not s.dense]
        return {
            "models": self.models,
            "calls": len(stats),
            "dense_calls": len(stats) - len(sparse),
            "sparse_density": round(sum(s.density for s in sparse) / len(sparse), 4) if sparse else 1.0,
            "heads_skipped": sum(s.heads_skipped for s in stats),
            "attention_ms": round(sum(s.attention_ms for s in stats), 3),
        }

    def reset(self) -> None:
        for inst in self._installations:
            inst.reset()
        self._log.reset()

    def remove(self) -> None:
        if self._removed:
            return
        for inst in self._installations:
            inst.remove()
        self._removed = True
        release_scratch()  # the compiled CPU path's buffers (another active handle's next call makes its own again)

    def __enter__(self) -> "SparsediffHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "active"
        return f"SparsediffHandle({', '.join(self.models)}, {state})"


PLAN_CHOICES = '"auto" (the model\'s shipped plan, else dense), "dense", a plan JSON path, a SparsePlan or None (dense)'


def resolve_plan(pipe_or_model: Any, plan: Any = "auto") -> Any:
    """The one rule for what a plan argument means, in Python and the CLI alike.

    `"auto"`: the plan the model ships with (sparsediff's own models keep one beside their weights), else dense;
    `"dense"` or None: dense; a path: that plan file; a `SparsePlan`: itself; a dict keyed by denoiser name (Wan 2.2
    A14B): each value resolved the same way. Returns a `SparsePlan`, a dict of them, or None for dense."""
    if isinstance(plan, dict):
        return {name: resolve_plan(pipe_or_model, p) for name, p in plan.items()}
    if plan is None or plan == "dense":
        return None
    if plan == "auto":
        from .pipelines.adapter import adapter_for

        shipped = adapter_for(pipe_or_model).shipped_plan(pipe_or_model)
        if shipped is not None:
            logger.info("sparsediff: using the plan shipped with %s; pass plan='dense' for the exact dense model.", type(pipe_or_model).__name__)
        return shipped
    if isinstance(plan, SparsePlan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        return SparsePlan.load(plan)
    raise ValueError(f"plan={plan!r} is not a plan; give {PLAN_CHOICES}.")


def _plans_for(plan: Any, names: list[str]) -> dict[str, SparsePlan | None]:
    if not isinstance(plan, dict):
        return {name: plan for name in names}
    unknown = sorted(set(plan) - set(names))
    if unknown:
        raise ValueError(f"plan names {unknown}, but the denoisers here are {names}; key the dict by those names.")
    return {name: plan.get(name) for name in names}


def _prepare_kernels(model: torch.nn.Module, plan: SparsePlan | None, backend: str | None) -> None:
    """Load (on a new machine: build, ~20-40 s) the compiled CPU kernel now, when a sparse plan will run on the CPU
    through the torch backend, so that the one-off cost falls here and not in the first denoising step (or inside a
    caller's timing of a generation)."""
    from .kernels import cpu_kernel
    from .runtime import resolve_backend

    if plan is None or plan.is_all_dense:
        return
    param = next(model.parameters(), None)
    if param is not None and param.device.type == "cpu" and resolve_backend(backend, param.device) == "torch":
        cpu_kernel.runs(param.dtype)  # loads it where calls of the model's dtype run in it


def _check_plan(adapter, model: torch.nn.Module, plan: SparsePlan | None, config: AccelerateConfig, is_pipeline: bool) -> None:
    from .pipelines.controllers import layout_bound_patterns

    if plan is None:
        return
    plan.check_model(adapter.fingerprint(model))
    bound = layout_bound_patterns(plan)
    if bound and plan.layout is None:
        raise ValueError(
            f"The plan's patterns {', '.join(bound)} are tied to one layout, but the plan records no calibration "
            "layout; re-create it with `sparsediff search`, which stores the layout."
        )
    if not is_pipeline and not plan.is_all_dense and config.num_steps is None:
        raise ValueError(
            f"Accelerating a bare {type(model).__name__} with a sparse plan needs num_steps (the denoising steps of one "
            "run) to place each call in the plan; pass num_steps=, or accelerate the pipeline, whose scheduler knows it."
        )


def accelerate(pipe_or_model: Any, plan: Any = "auto", backend: str | None = None, *, num_steps: int | None = None) -> SparsediffHandle:
    """Make a pipeline (or its bare denoiser) run sparse attention from a plan, through the model's adapter.

    Args:
        pipe_or_model: a `WanPipeline` (2.1 or 2.2), `CogVideoXPipeline`, `HunyuanVideoPipeline`, `LTXPipeline`,
            `MochiPipeline`, or one of their transformers (see `sparsediff.pipelines.adapter.supported()`).
        plan (str | SparsePlan | dict | None, defaults to "auto"): the model's shipped plan if it has one (sparsediff's
            embedded model does), else dense; `"dense"` or None runs every call as the model's own; a path or a
            `SparsePlan`; a dict per denoiser (see `AccelerateConfig.plan`).
        backend (str, defaults to None): see `AccelerateConfig.backend`.
        num_steps (int, defaults to None): see `AccelerateConfig.num_steps`.

    Returns:
        SparsediffHandle: `.stats`, `.summary()`, `.reset()`, `.remove()`.

    >>> import torch, sparsediff
    >>> from diffusers import WanTransformer3DModel
    >>> model = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=12, text_dim=32, ffn_dim=32, num_layers=2)
    >>> x, text = torch.randn(1, 16, 2, 8, 8), torch.randn(1, 4, 32)
    >>> before = model(x, torch.tensor([500]), text).sample
    >>> with sparsediff.accelerate(model) as handle:
    ...     after = model(x, torch.tensor([500]), text).sample
    >>> torch.equal(before, after), handle.stats[0].dense
    (True, True)
    """
    from .pipelines.adapter import adapter_for, install_all
    from .pipelines.controllers import PlanController
    from .pipelines.state import RunLog

    adapter = adapter_for(pipe_or_model)
    config = AccelerateConfig(plan=resolve_plan(pipe_or_model, plan), backend=backend, num_steps=num_steps)
    denoisers = adapter.denoisers(pipe_or_model)
    is_pipeline = not isinstance(pipe_or_model, torch.nn.Module)
    plans = _plans_for(config.plan, list(denoisers))
    for name, model in denoisers.items():
        _check_plan(adapter, model, plans[name], config, is_pipeline)
        _prepare_kernels(model, plans[name], config.backend)
    log = RunLog()
    make = lambda name, n: PlanController(plans[name], n, log, config.backend)  # noqa: E731
    installations = install_all(pipe_or_model, make, log, num_steps=config.num_steps)
    return SparsediffHandle(installations, log, config)


def profile(
    pipe_or_model: Any,
    inputs: "dict | list[dict]",
    *,
    out: "str | os.PathLike | None" = None,
    steps: "list[int] | None" = None,
    layers: "list[int] | None" = None,
    candidates: "list[str] | None" = None,
    block_size: int = 64,
    rows_per_block: int = 4,
    max_mass_blocks: int = 128,
    backend: str | None = None,
    progress: bool = True,
    meta: "dict[str, Any] | None" = None,
):
    """Record, per (step, layer, head), block attention mass and each candidate pattern's error against full attention.

    The model runs dense throughout (its outputs are unchanged); each observed attention call is measured on the
    same q, k, v. See `sparsediff.search.profile` for the returned `AttentionProfile` and its directory format.

    Args:
        pipe_or_model: a supported pipeline or bare transformer (see `accelerate`).
        inputs (dict | list[dict]): pipeline call kwargs, one dict per calibration prompt (each a full run); for a
            bare transformer, forward kwargs, one dict per denoising step in order.
        out (str, defaults to None): directory to save the profile to.
        steps (list[int], defaults to None): step indices to record; all when None.
        layers (list[int], defaults to None): layer indices to record; all when None.
        candidates (list[str], defaults to None): pattern names to measure; `DEFAULT_CANDIDATES` when None.
        block_size (int, defaults to 64): block size of the candidates' block masks.
        rows_per_block (int, defaults to 4): query rows sampled per block for the attention mass.
        max_mass_blocks (int, defaults to 128): most mass blocks per side (coarser blocks beyond).
        backend (str, defaults to None): kernel backend for the candidates.
        progress (bool, defaults to True): show a progress bar on stderr.
        meta (dict, defaults to None): extra metadata saved with the profile (the CLI stores its calibration calls
            here, which `sparsediff search` reuses).

    >>> import torch, sparsediff
    >>> from diffusers import WanTransformer3DModel
    >>> model = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=12, text_dim=32, ffn_dim=32, num_layers=2)
    >>> step = dict(hidden_states=torch.randn(1, 16, 2, 8, 8), timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(1, 4, 32))
    >>> prof = sparsediff.profile(model, [step, step], candidates=["full", "skip"], block_size=8, progress=False)
    >>> tuple(prof.errors.shape), float(prof.errors[..., 0].max())
    ((2, 2, 2, 2), 0.0)
    """
    from tqdm.auto import tqdm

    from .pipelines.adapter import adapter_for, check_not_installed, install_all
    from .pipelines.controllers import ObserveController
    from .pipelines.state import RunLog
    from .search.profile import DEFAULT_CANDIDATES, ProfileRecorder

    check_backend(backend)
    inputs = [inputs] if isinstance(inputs, dict) else list(inputs or [])
    if not inputs or not all(isinstance(i, dict) for i in inputs):
        raise ValueError("profile needs inputs: a dict of call kwargs or a non-empty list of them (one per prompt, or per step for a bare model).")
    adapter = adapter_for(pipe_or_model)
    denoisers = adapter.denoisers(pipe_or_model)
    is_pipeline = not isinstance(pipe_or_model, torch.nn.Module)
    prints = {name: adapter.fingerprint(model) for name, model in denoisers.items()}
    first = next(iter(prints.values()))
    for name, fp in prints.items():
        check_not_installed(adapter, name, denoisers[name])
        if fp != first:
            raise ValueError(f"The denoisers {list(prints)} differ ({first.mismatch(fp)}); profile each bare transformer on its own.")
    recorder = ProfileRecorder(
        first.num_heads, candidates or DEFAULT_CANDIDATES, block_size, rows_per_block, max_mass_blocks, backend, steps, layers
    )
    runs = len(inputs)
    per_run = len(steps) if steps else (inputs[0].get("num_inference_steps") if is_pipeline else len(inputs))
    total = None if per_run is None else (runs if is_pipeline else 1) * per_run * len(layers or range(first.num_layers))
    bar = tqdm(total=total, desc="profile", unit="layer", disable=not progress)
    seen: set = set()

    def observe(**call):
        recorder.observe(**call)
        key = (run, call["step"], call["layer"])
        if key not in seen:
            seen.add(key)
            bar.update()

    log = RunLog()
    installed = []
    try:
        make = lambda name, n: ObserveController(log, observe, recorder.wants)  # noqa: E731
        installed = install_all(pipe_or_model, make, log, num_steps=None if is_pipeline else len(inputs))
        with torch.no_grad():
            for run, call in enumerate(inputs if is_pipeline else [None]):
                if is_pipeline:
                    pipe_or_model(**call)
                else:
                    for step_inputs in inputs:
                        pipe_or_model(**step_inputs)
    finally:
        for inst in installed:
            inst.remove()
        bar.close()
    meta = {"runs": runs if is_pipeline else 1, "models": list(denoisers), "source": type(pipe_or_model).__name__, **(meta or {})}
    result = recorder.result(first, meta)
    if out is not None:
        result.save(out)
        logger.info("profile saved to %s", out)
    return result


def load_pipeline(model: str, device: "str | None" = None, kind: str = "video", dtype: "str | torch.dtype | None" = None):
    """A pipeline by name: `embedded` (sparsediff's own trained model of that `kind`, "video", "text" or "reconstruct", shipped in
    the package) or the path of a locally saved diffusers pipeline (`save_pretrained` directory); on `device` (CUDA
    when available), in `dtype` (every component, as diffusers' `from_pretrained(dtype=...)`; None: each library's
    default, float32 for diffusers models)."""
    from .bench import DTYPES

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}; pass --dtype bfloat16, say.")
        dtype = DTYPES[dtype]
    loading = {} if dtype is None else {"dtype": dtype}
    if model == "embedded" and kind in ("text", "reconstruct"):  # saved pipelines, loaded like a user's below
        if kind == "text":
            from .pipelines.embedded_text.model import embedded_text_path as where

            name, how = "embedded text model", "samples/train_embedded_text.py --ship"
        else:
            from .pipelines.reconstruct.pipeline import reconstruct_path as where

            name, how = "embedded reconstructor", "samples/train_reconstruct.py"
        if not (where() / "model_index.json").is_file():
            raise ValueError(f"The {name} is missing from {str(where())!r}; reinstall sparsediff, or train it with `python {how}`.")
        model = str(where())
    elif model == "embedded":
        from .pipelines.embedded.pipeline import ShapesVideoPipeline, embedded_path

        path = embedded_path()
        if not (path / "model_index.json").is_file():
            raise ValueError(
                f"The embedded model is missing from {str(path)!r}; reinstall sparsediff, or train it with "
                "`python samples/train_embedded.py`."
            )
        return ShapesVideoPipeline.from_pretrained(str(path), **loading).to(device)
    path = Path(model)
    index = path / "model_index.json"
    if not index.is_file():
        raise ValueError(
            f"--model {model!r} is not a saved diffusers pipeline (no model_index.json there); pass a directory written by "
            "pipe.save_pretrained()."
        )
    import json

    again = "save the pipeline again with pipe.save_pretrained(DIR), or pass another --model"
    try:
        class_name = json.loads(index.read_bytes().decode("utf-8")).get("_class_name")
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, AttributeError):
        raise ValueError(f"{str(index)!r} is not a JSON object of pipeline components; {again}.") from None
    import diffusers

    from .pipelines.embedded.pipeline import ShapesVideoPipeline

    if class_name == ShapesVideoPipeline.__name__:  # sparsediff's own pipelines, not diffusers classes
        pipeline_class = ShapesVideoPipeline
    elif class_name == "Motion2VecSetsPipeline":
        from .pipelines.reconstruct.pipeline import Motion2VecSetsPipeline as pipeline_class
    elif isinstance(class_name, str) and isinstance(getattr(diffusers, class_name, None), type):
        pipeline_class = diffusers.DiffusionPipeline
    else:
        raise ValueError(
            f"{str(index)!r} names the pipeline class {class_name!r}, which diffusers {diffusers.__version__} does not "
            f"have; upgrade diffusers, or {again}."
        )
    try:
        components = _components_diffusers_skips(path, json.loads(index.read_text()), pipeline_class, class_name, dtype)
        pipe = pipeline_class.from_pretrained(str(path), local_files_only=True, **loading, **components)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--model {model!r} could not be loaded as a {class_name} ({reason}); {again}.") from e
    return pipe.to(device)


def _components_diffusers_skips(path: Path, index: dict, pipeline_class, class_name: str,
                                dtype: "torch.dtype | None" = None) -> dict:
    """Components to load ourselves: diffusers 0.42.1 passes a pipeline's saved components through unloaded (as
    their `[library, class]` entries) when its `__init__` types them `Any`, as `LLaDA2Pipeline` does; loading each with
    its own library's `from_pretrained` and handing it in is the documented way to give a pipeline its components."""
    import importlib
    import inspect
    from typing import Any as AnyType

    cls = getattr(importlib.import_module("diffusers"), class_name, None) if pipeline_class.__name__ == "DiffusionPipeline" else pipeline_class
    if cls is None:
        return {}
    parameters = inspect.signature(cls.__init__).parameters
    out = {}
    for name, entry in index.items():
        annotation = parameters[name].annotation if name in parameters else None
        untyped = annotation in (AnyType, "Any", "Any | None") or str(annotation).startswith("typing.Any")
        if not untyped or not isinstance(entry, list) or len(entry) != 2 or None in entry:
            continue
        library, component = entry
        loader = getattr(importlib.import_module(library), component)
        kwargs = {} if dtype is None or not issubclass(loader, torch.nn.Module) else {"dtype": dtype}  # tokenizers take none
        out[name] = loader.from_pretrained(str(path / name), local_files_only=True, **kwargs)
    return out


def search_plan(
    pipe: Any,
    profile: Any,
    calls: "list[dict] | None" = None,
    *,
    out: "str | os.PathLike | None" = None,
    min_psnr: float = 30.0,
    target_speedup: "float | None" = None,
    trials: int = 20,
    timeout: "float | None" = None,
    storage: "str | None" = None,
    backend: "str | None" = None,
    block_sizes: "tuple[int, ...] | None" = None,
    force: bool = False,
    progress: bool = True,
    log=None,
    return_summary: bool = False,
    output_type: str = "np",
    validation_calls: "list[dict] | None" = None,
    choose: bool = True,
    ranges: int = 2,
    allowance: "tuple[float, float] | None" = None,
    refine: int = 4,
    prune_ahead: int = 3,
    range_scales: "tuple[float, ...] | None" = None,
    validation_min_psnr: "float | None" = None,
):
    """Search the fastest plan for `pipe` on this machine that meets a quality floor (or a speed target).

    Costs are kernel latencies measured here (cached per device, backend, dtype and shape); quality is the PSNR of
    the calibration runs under the plan against the dense runs (for video, of all their frames together, as
    `sparsediff demo` measures: one prompt the plan spoils is not made up for by another it keeps; the adapter's
    `combine`). See `sparsediff.search.optimize` for the study.

    Args:
        pipe: a supported diffusers video pipeline (not accelerated).
        profile (AttentionProfile | str): the profile, or its directory, recorded on this model.
        calls (list[dict], defaults to None): calibration pipeline arguments, one dict per run, each with
            `num_inference_steps` and optionally `seed`; None uses the calls stored in the profile by `sparsediff profile`.
        out (str, defaults to None): where to save the plan; with `search_report.png` beside it. An existing file is
            refused unless `force`.
        min_psnr (float, defaults to 30.0): the quality floor in dB; trials falling below it are pruned.
        target_speedup (float, defaults to None): choose the best-quality plan reaching this predicted speedup instead.
        trials (int, defaults to 20): trials in the study, shared by every worker on the same storage (processes on
            one machine share the default SQLite file; machines share a PostgreSQL URL). A worker that dies mid-trial
            leaves the study usable: its trial is failed and retried once by another worker.
        timeout (float, defaults to None): stop starting trials after this many seconds.
        storage (str, defaults to None): SQLAlchemy URL of the study, e.g. `postgresql://user@host/db` for workers on
            several machines; default an SQLite file beside `out`.
        backend (str, defaults to None): kernel backend to cost and run ("torch", "triton", "flex"); automatic when None.
        block_sizes (tuple[int, ...], defaults to None): block sizes to try; default the profile's.
        force (bool, defaults to False): overwrite an existing plan file and report.
        progress (bool, defaults to True): progress bars on stderr.
        log (Callable[[str], None], defaults to None): one line per trial (default: the `sparsediff` logger).
        return_summary (bool, defaults to False): also return a summary dict (trials, pruned, Pareto front, chosen).
        output_type (str, defaults to "np"): compare decoded frames ("np") or latents ("latent") for the final PSNR.
        validation_calls (list[dict], defaults to None): held-out pipeline arguments (other prompts or seeds, the same
            `num_inference_steps`): the floor must also hold on them. The Pareto plans meeting it on the calibration
            calls are run on these, fastest first, and the first that holds it is chosen (`plan.search["validation"]`).
        choose (bool, defaults to True): False makes this call a worker that only runs its share of the trials
            (until the study holds `trials`) and returns None; another call on the storage chooses and saves.
        ranges (int, defaults to 2): step ranges of the plan (equal shares of the run); each gives every head its
            own pattern from the profile's worst error inside it. More ranges follow the heads more closely along the
            trajectory (fewer heads kept dense for one bad step elsewhere) at the price of a larger plan fitted to
            fewer profiled steps each (at most the run's steps).
        allowance (tuple[float, float], defaults to None): range of the per-head error allowance (relative L2) the
            trials draw from, log scale; None is `SearchSpace`'s (0.01, 1.0). Trials above the errors that hold the floor are spent on plans that fail
            it; a narrower range spends them where the floor is crossed.
        refine (int, defaults to 4): the budget's last trials (at most this many) bisect the allowance of the fastest
            trial meeting the floor, its other knobs kept, towards the loosest one known to fail it: the plan worth
            having sits just under the floor, where random draws rarely land; once it is bracketed, one step range's
            or layer's multiplier at a time (`SearchSpace.refine`). 0 leaves every trial to the sampler.
        prune_ahead (int, defaults to 3): once this many trials have completed, a trial is pruned as soon as its
            running PSNR less 90% of the smallest loss any of them had from that step to the end, plus 1 dB of slack, falls
            below the floor (it would end below it); 0 prunes only when the running PSNR itself falls below the floor.
        range_scales (tuple[float, ...], defaults to None): choices of a per-step-range multiplier of the allowance,
            one drawn per range by each trial (e.g. (0.75, 1.0, 1.5, 2.0)): errors cost more quality in some parts of
            the run than in others. None: every range 1, no such knob. Another setting is another study.
        validation_min_psnr (float, defaults to None): the floor on the `validation_calls` (None: `min_psnr`).
            `min_psnr` steers the search on the calibration calls, this one is the verdict on the held-out ones
            (recorded in `plan.search["validation"]["min_psnr"]`); choosing again at another floor reuses the
            stored validations that still decide it.

    Returns:
        SparsePlan: the chosen plan (its `search` field records the study, trial, PSNR and speedups), or
        `(plan, summary)` with `return_summary=True`.

    >>> # see tests/test_search.py::test_search_on_a_tiny_wan_pipeline for a complete run
    """
    from .pipelines.adapter import adapter_for
    from .render import render_search_report
    from .search.cost import CostModel
    from .search.optimize import PlanSearch, SearchSpace
    from .search.profile import AttentionProfile
    from .search.quality import PipelineEvaluator

    out = Path(out) if out is not None else None
    report_path = out.with_name("search_report.png") if out is not None else None
    if out is not None and not force and choose:  # a worker that does not choose writes nothing
        for existing in (out, report_path):
            if existing.exists():
                raise ValueError(f"{str(existing)!r} already exists; pass force=True (--force) to overwrite it, or choose another --out.")
    if isinstance(profile, (str, os.PathLike)):
        profile = AttentionProfile.load(profile)
    check_backend(backend)
    adapter = adapter_for(pipe)
    model = next(iter(adapter.denoisers(pipe).values()))
    problem = profile.model.mismatch(adapter.fingerprint(model))
    if problem:
        raise ValueError(f"The profile was recorded on another model ({problem}); profile this one with `sparsediff profile`.")
    if len(profile.layers) != profile.model.num_layers:
        raise ValueError(
            f"The profile recorded layers {profile.layers} of {profile.model.num_layers}; the search needs every layer, so "
            "re-record it without --layers."
        )
    calls = calls if calls is not None else profile.meta.get("calls")
    if not calls:
        raise ValueError("No calibration calls: pass calls=[{...pipeline arguments...}], or record the profile with `sparsediff profile`, which stores them.")
    if validation_min_psnr is not None and not validation_calls:  # before anything runs
        raise ValueError(f"validation_min_psnr={validation_min_psnr} needs validation_calls (--validate-prompts) to apply to.")
    if validation_calls is not None:
        wanted = {c.get("num_inference_steps") for c in calls}
        given = {c.get("num_inference_steps") for c in validation_calls}
        if not validation_calls or given != wanted:
            raise ValueError(
                f"The validation calls need the calibration's num_inference_steps {sorted(map(str, wanted))}; got "
                f"{sorted(map(str, given)) or 'no calls'}. Give held-out prompts with the same steps (a plan's step ranges "
                "are fractions of the run, but its quality was measured at that step count)."
            )
    param = next(model.parameters())
    block_sizes = tuple(block_sizes or (profile.block_size,))
    space = SearchSpace(block_sizes=block_sizes, num_ranges=ranges, allowance=tuple(allowance or SearchSpace.allowance),
                        refine=refine, prune_ahead=prune_ahead, range_scales=tuple(range_scales or SearchSpace.range_scales))
    run_steps = [c.get("num_inference_steps") for c in calls]
    if None not in run_steps:  # (calls without it are refused by the evaluator, naming them)
        space.check(min(run_steps))  # before any cost is measured
    costs = {
        b: CostModel.load_or_measure(profile.layout, profile.model.num_heads, profile.model.head_dim, profile.candidates,
                                     block_size=b, backend=backend, dtype=param.dtype, device=str(param.device))
        for b in block_sizes
    }
    evaluator = PipelineEvaluator(pipe, calls, apply=lambda p, plan: accelerate(p, plan, backend=backend), adapter=adapter,
                                  output_type=output_type)
    if storage is None:
        storage = f"sqlite:///{(out.with_suffix('.optuna.db') if out is not None else Path('sparsediff_search.db')).resolve()}"
    run = PlanSearch(profile, costs, evaluator, space, min_psnr=min_psnr, storage=storage,
                     quality=(adapter.quality_name, adapter.quality_unit))
    run.run(trials, timeout, log=log or logger.info, progress=progress)
    if not choose:
        return None
    validator = None
    if validation_calls:
        validator = PipelineEvaluator(pipe, validation_calls, apply=evaluator.apply, adapter=adapter, output_type=output_type,
                                      warmup=False)
    chosen, plan = run.choose(target_speedup, validator=validator, log=log or logger.info, validation_floor=validation_min_psnr)
    outcomes = run.outcomes()
    summary = {
        "study": run.study_name,
        "storage": storage,
        "trials": len(outcomes),
        "pruned": sum(o.state == "pruned" for o in outcomes),
        "pareto_front": [o.__dict__ for o in run.pareto_front()],
        "chosen": {**chosen.__dict__, "measured_speedup": plan.search.get("measured_speedup"),
                   **({"scales": plan.search["scales"]} if "scales" in plan.search else {})},
        "dense_seconds": evaluator.dense_seconds,
    }
    if "validation" in plan.search:
        summary["validation"] = plan.search["validation"]
    if out is not None:
        plan.save(out)
        render_search_report(outcomes, run.pareto_front(), chosen, plan, report_path, min_psnr)
        summary.update(plan=str(out), report=str(report_path))
    return (plan, summary) if return_summary else plan
