"""The Optuna study that turns a profile and a measured cost model into a plan.

Each trial picks the knobs: how many leading steps stay dense, how many leading layers stay dense, the block
size, a global error allowance and a per-layer multiplier of it. It then builds a plan by giving every head,
in every step range, its cheapest candidate (by the measured cost model, head fusion counted) whose
profiled error is within the layer's allowance, predicts the plan's attention time from the cost model, and
measures its quality end to end (PSNR against the dense output) on the calibration inputs. Two objectives:
predicted time (down) and PSNR (up), with a multi-objective sampler. The evaluator reports per-step PSNR; a
trial whose running PSNR falls below the floor is pruned at once (errors only accumulate along the
trajectory), which Optuna's own pruners cannot do for multi-objective studies.

Studies live in any SQLAlchemy URL (default: an SQLite file beside the plan) and resume with
`load_if_exists=True`; several worker processes can share one storage (SQLite on one machine, PostgreSQL across
machines), and the trial budget is shared too. A running trial records a heartbeat; a trial whose worker died (a
killed process, a lost machine) goes stale after the grace period, is marked failed by the next worker that looks,
and is retried once with the same parameters (Optuna's `RetryFailedTrialCallback`), so it is never lost silently.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import optuna
import torch

from sparsediff.metrics import PSNR_CAP
from sparsediff.patterns import get_pattern
from sparsediff.plan import SparsePlan, StepRange

from .cost import CostModel
from .profile import AttentionProfile

logger = logging.getLogger(__name__)

# `SearchSpace.prune_ahead` prunes where the running quality less PRUNE_AHEAD_SHARE x (the least loss to the end seen)
# + PRUNE_AHEAD_SLACK is below the floor. The slack: on the embedded model's study a trial's loss fell up to 1.8 dB (6%)
# short of the least loss of the trials completed before it (BENCHMARKS.md §5), and refinement trials sit just above
# the floor.
PRUNE_AHEAD_SHARE, PRUNE_AHEAD_SLACK = 0.9, 1.0
# A refinement trial's own per-range and per-layer multipliers of the allowance (user attribute; `next_refinement`).
SCALES_ATTR = "scales"


@dataclass
class Evaluation:
    """End-to-end quality of one plan: final PSNR vs dense (the calls' combined), per-step PSNR (the worst call's),
    the wall time of the run, and each call's final PSNR."""

    psnr: float
    seconds: float
    step_psnr: list[float] = field(default_factory=list)
    call_psnr: list[float] = field(default_factory=list)


class Evaluator(Protocol):
    """Runs the calibration inputs with a plan and compares with the dense run (see search.quality)."""

    num_steps: int
    dense_seconds: float

    def __call__(self, plan: SparsePlan, report: Callable[[int, float], None]) -> Evaluation: ...


@dataclass
class SearchSpace:
    """What a trial may choose.

    Args:
        max_dense_steps (int, optional): most leading dense steps (default: half the steps).
        max_dense_layers (int, optional): most leading dense layers (default: a quarter of the layers).
        block_sizes (tuple[int, ...], defaults to (64,)): block sizes to try; each needs a cost model.
        allowance (tuple[float, float], defaults to (0.01, 1.0)): range of the global relative-L2 error allowance
            (log scale).
        layer_scales (tuple[float, ...], defaults to (0.5, 1.0, 2.0)): per-layer multipliers of the allowance.
        num_ranges (int, defaults to 2): step ranges of the plan (equal shares of the trajectory).
        sweep (int, defaults to 4): the study's first trials sweep the allowance over its range (log-spaced, lowest
            first), the other knobs cautious (a fifth of the steps dense, no dense layer, every layer's scale 1): a
            line through the most telling knob that gives the front a backbone where the sampler's first, random
            population scatters over every knob at once.
        refine (int, defaults to 4): the budget's last trials (at most this many) bisect the allowance of the fastest
            trial meeting the floor, its other knobs kept, between it and the loosest allowance known to fall below
            the floor with those knobs (or the range's top): the sampler's draws land anywhere in the range, while
            the plan worth having sits just under the floor. Midpoints whose plan equals a bracket's own plan are
            skipped without a run; it stops when the bracket narrows to a factor 1.1. Then the trial's per-range and
            per-layer multipliers, one at a time, the same way (`PlanSearch.next_refinement`).
        range_scales (tuple[float, ...], defaults to (1.0,)): per-step-range multipliers of the allowance, one drawn per
            range (one value: every range takes it, no knob): errors in some parts of the trajectory cost more quality than in others
            (on the embedded model the second quarter of the steps most, the last half least, BENCHMARKS.md §5).
        prune_ahead (int, defaults to 3): once this many trials have completed, a trial is also pruned at a step where
            its running PSNR, less 90% of the smallest loss any completed trial had from that step to its end plus
            1 dB of slack, is below the floor: errors only accumulate along the trajectory, so such a trial would end
            below it, and its remaining steps are saved. 0 prunes only at the floor itself.
    """

    max_dense_steps: int | None = None
    max_dense_layers: int | None = None
    block_sizes: tuple[int, ...] = (64,)
    allowance: tuple[float, float] = (0.01, 1.0)
    layer_scales: tuple[float, ...] = (0.5, 1.0, 2.0)
    num_ranges: int = 2
    sweep: int = 4
    refine: int = 4
    range_scales: tuple[float, ...] = (1.0,)
    prune_ahead: int = 3

    def check(self, num_steps: int) -> "SearchSpace":
        """Refuse what a search on a `num_steps`-step run cannot use, naming the flag (a range without a step would
        take every profiled step's worst)."""
        if not 1 <= self.num_ranges <= num_steps:
            raise ValueError(f"The plan cannot have {self.num_ranges} step ranges in a {num_steps}-step run; give between 1 "
                             f"and {num_steps} (--ranges).")
        lo, hi = self.allowance
        if not 0 < lo < hi:
            raise ValueError(f"The allowance range {lo},{hi} needs 0 < LO < HI; give e.g. 0.005,0.05 (--allowance).")
        if self.sweep < 1:
            raise ValueError(f"SearchSpace.sweep is {self.sweep}; give at least 1 (the cautious first trial).")
        if self.refine < 0:
            raise ValueError(f"The refinement budget is {self.refine} trials; give 0 (none) or more (--refine).")
        if not self.range_scales or any(not (x > 0) for x in self.range_scales):
            raise ValueError(f"The range scales {','.join(map(str, self.range_scales))} must be positive numbers; give e.g. "
                             "0.5,1,2 (--range-scales).")
        if self.prune_ahead < 0:
            raise ValueError(f"prune_ahead is {self.prune_ahead}; give 0 (prune at the floor only) or the completed trials "
                             "to learn from (--prune-ahead).")
        return self


def range_errors(profile: AttentionProfile, num_ranges: int, dense_steps: int, num_steps: int) -> list[torch.Tensor]:
    """Per step range, the (L, H, C) worst error over the profiled sparse steps inside it (all profiled steps when
    none fall inside). The worst case, because one bad step is enough to derail the rest of the trajectory."""
    observed = profile.calls > 0  # (T, L)
    errors = torch.where(observed[..., None, None], profile.errors, torch.zeros(()))  # unobserved -> no evidence
    recorded = profile.num_steps or num_steps
    out = []
    for r in range(num_ranges):
        lo, hi = r / num_ranges, (r + 1) / num_ranges
        inside = [t for t, s in enumerate(profile.steps) if lo <= s / recorded < hi and s >= dense_steps * recorded / num_steps]
        chosen = inside or list(range(len(profile.steps)))
        out.append(errors[chosen].nan_to_num(nan=math.inf).amax(dim=0))
    return out


def assign_heads(
    errors: torch.Tensor, candidates: Sequence[str], cost: CostModel, allowance: Sequence[float]
) -> list[tuple[str, ...]]:
    """Per layer, every head's cheapest candidate whose error is within the layer's allowance (else `full`).

    A head's cost is its share of a fully fused group, `t(pattern, H) / H`, from the measured cost model."""
    H = errors.shape[1]
    per_head = {c: (cost.group_time(c, H) / H if get_pattern(c).kind != "skip" else 0.0) for c in candidates}
    per_head["full"] = cost.group_time("full", H) / H
    layers = []
    for layer, allowed in enumerate(allowance):
        heads = []
        for h in range(H):
            ok = [c for i, c in enumerate(candidates) if float(errors[layer, h, i]) <= allowed]
            heads.append(min(ok + ["full"], key=lambda c: (per_head[c], c != "full")))
        layers.append(tuple(heads))
    return layers


def build_plan(
    profile: AttentionProfile,
    cost: CostModel,
    num_steps: int,
    dense_steps: int,
    dense_layers: int,
    allowance: Sequence[float],
    num_ranges: int = 2,
    block_size: int | None = None,
    range_scales: Sequence[float] | None = None,
) -> SparsePlan:
    """A plan for `num_steps` steps from the profile's errors and the measured costs. `range_scales` (one per range,
    default 1) multiply the allowance per step range (`SearchSpace.range_scales`; `samples/eval_plan_settings.py` asks
    where along the trajectory error hurts)."""
    L = profile.model.num_layers
    if len(allowance) != L:
        raise ValueError(f"allowance has {len(allowance)} entries but the model has {L} layers; give one per layer.")
    range_scales = [1.0] * num_ranges if range_scales is None else list(range_scales)
    if len(range_scales) != num_ranges:
        raise ValueError(f"range_scales has {len(range_scales)} entries for {num_ranges} step ranges; give one per range.")
    ranges = []
    for r, errors in enumerate(range_errors(profile, num_ranges, dense_steps, num_steps)):
        layers = assign_heads(errors, profile.candidates, cost, [a * range_scales[r] for a in allowance])
        ranges.append(StepRange(r / num_ranges, (r + 1) / num_ranges, tuple(tuple(get_pattern(n) for n in l) for l in layers)))
    return SparsePlan(
        model=profile.model,
        ranges=ranges,
        block_size=block_size or profile.block_size,
        dense_steps=dense_steps,
        dense_layers=tuple(range(dense_layers)),
        layout=str(profile.layout),
    ).validate()


def _least_looser(allowance: float, range_scales: Sequence[float], layer_scales: Sequence[float],
                  failed: list[list[float]], kind: str, index: int | None) -> float | None:
    """The least value of one coordinate (`kind` "allowance", or a "range" or "layer" multiplier at `index`) at which a
    point (`allowance` x range x layer multipliers) is at least as loose as the effective allowances `failed` (per range
    and layer) everywhere, or None when the other coordinates keep it tighter somewhere (`PlanSearch.next_refinement`)."""
    a, rs, ls = allowance, range_scales, layer_scales
    need = 0.0
    for r, row in enumerate(failed):
        for l, f in enumerate(row):
            if kind == "allowance":
                need = max(need, f / (rs[r] * ls[l]))
            elif (kind == "range" and r == index) or (kind == "layer" and l == index):
                need = max(need, f / (a * (ls[l] if kind == "range" else rs[r])))
            elif a * rs[r] * ls[l] < f * (1 - 1e-9):  # tighter here whatever the coordinate: never as loose
                return None
    return need


def predicted_time(plan: SparsePlan, cost: CostModel, num_steps: int) -> float:
    """Attention milliseconds of one run of `num_steps` steps under `plan`, from the cost model."""
    dense = cost.dense_layer_time()
    if plan.is_all_dense:
        return dense_time(plan, cost, num_steps)
    total = 0.0
    for step in range(num_steps):
        for layer in range(plan.model.num_layers):
            own = plan.is_dense_step(step, num_steps) or layer in plan.dense_layers  # the model's own attention
            total += dense if own else cost.layer_time(plan.layer_patterns(step, num_steps, layer))
    return total


def dense_time(plan: SparsePlan, cost: CostModel, num_steps: int) -> float:
    return cost.dense_layer_time() * plan.model.num_layers * num_steps


@dataclass
class TrialOutcome:
    number: int
    predicted_ms: float
    predicted_speedup: float
    psnr: float
    seconds: float
    params: dict[str, Any]
    state: str


def profile_digest(profile) -> str:
    """8 hex digits of the profile's candidates and measured errors: a study resumes only on the profile it was
    started on (same model config but retrained weights, or another calibration, gives another study)."""
    digest = hashlib.sha256(",".join(profile.candidates).encode())
    digest.update(profile.errors.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:8]


class _BelowFloor(Exception):
    """A validation run fell below the floor at a step (args: step, PSNR); it stops there."""


def _driver_url(storage: str) -> str:
    """`storage` with a PostgreSQL driver that is installed: SQLAlchemy 2.1 reads `postgresql://` as psycopg 3, the
    test extras install psycopg2 (`postgresql+psycopg2://`); a URL naming its driver is kept as given."""
    import importlib.util

    if storage.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
        return "postgresql+psycopg2://" + storage.removeprefix("postgresql://")
    return storage


class _Heartbeat:
    """Records a running trial's heartbeat every `interval` s in a thread, as `Study.optimize` does for its trials
    (the search asks and tells itself, so it keeps the heartbeat itself)."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int, interval: float):
        import threading

        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            self.storage.record_heartbeat(self.trial_id)
            if self.stop.wait(self.interval):
                return

    def __enter__(self) -> "_Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def _validation_key(validator: Evaluator, number: int) -> str:
    """The study attribute holding trial `number`'s validation on `validator`'s held-out calls."""
    return f"validation:{getattr(validator, 'key', 'default')}:{number}"


class PlanSearch:
    """One search: profile + cost models (one per block size) + an end-to-end evaluator + a study storage.

    >>> # see tests/test_search.py for a complete run on a tiny Wan pipeline
    """

    def __init__(
        self,
        profile: AttentionProfile,
        costs: dict[int, CostModel],
        evaluator: Evaluator,
        space: SearchSpace | None = None,
        min_psnr: float = 30.0,
        storage: str = "sqlite:///sparsediff_search.db",
        study_name: str | None = None,
        seed: int = 0,
        heartbeat_interval: int = 30,
        grace_period: int | None = None,
        quality: tuple[str, str] = ("PSNR", "dB"),
    ):
        self.profile, self.costs, self.evaluator = profile, costs, evaluator
        self.quality_label = quality  # the adapter's measure (name, unit) for messages: PSNR in dB, token agreement
        self.space = space or SearchSpace(block_sizes=tuple(sorted(costs)))
        missing = [b for b in self.space.block_sizes if b not in costs]
        if missing:
            raise ValueError(f"No cost model for block size(s) {missing}; measure one per block size in SearchSpace.block_sizes.")
        for b, c in costs.items():
            lacking = [n for n in profile.candidates if get_pattern(n).kind != "skip" and n not in c.points]
            if lacking:
                raise ValueError(f"The block-{b} cost model lacks the profile's candidates {lacking}; measure them too.")
        self.min_psnr = min_psnr
        self.num_steps = evaluator.num_steps
        self.space.check(self.num_steps)
        # the same trial parameters give another plan with another range count, and another allowance range draws
        # other trials: such a search is another study (the defaults keep the name studies had before either could
        # change, so they still resume)
        space = "" if self.space.num_ranges == 2 else f"-r{self.space.num_ranges}"
        if tuple(self.space.allowance) != SearchSpace.allowance:
            space += "-a{:g}-{:g}".format(*self.space.allowance)
        if tuple(self.space.range_scales) != SearchSpace.range_scales:  # another knob: another study
            space += "-s" + "-".join(f"{x:g}" for x in self.space.range_scales)
        combined = getattr(evaluator, "combined", "mean")  # another figure of the calls' quality: another study
        if combined != "mean":
            space += f"-{combined}"
        self.study_name = study_name or (f"sparsediff-{profile.model.model_class}-{profile.model.config_hash}-{profile.layout}-"
                                         f"{profile_digest(profile)}{space}")
        self.storage = storage
        self.seed = seed
        self.heartbeat_interval = heartbeat_interval
        if storage.startswith("sqlite:///"):  # a new file beside the plan: create its folder
            Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.study, created = self._open_study(storage, seed, heartbeat_interval, grace_period)
        with warnings.catch_warnings():  # experimental in Optuna, harmless
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.study.set_metric_names(["predicted_attention_ms", "psnr_db"])
        self.study_id = self.rdb.get_study_id_from_name(self.study_name)
        if created:  # the sweep (only the creator enqueues it: no duplicate); its first trial is the cautious anchor
            L, (lo, hi), n = profile.model.num_layers, self.space.allowance, self.space.sweep
            for i in range(n):
                self.study.enqueue_trial(
                    {"dense_steps": min(self.max_dense_steps, max(1, self.num_steps // 5)), "dense_layers": 0,
                     "block_size": self.space.block_sizes[0], "allowance": lo * (hi / lo) ** (i / max(n - 1, 1)),
                     **{f"layer_scale_{l}": 1.0 for l in range(L)}, **self._neutral_range_scales()}
                )

    def q(self, value: float, named: bool = True) -> str:
        """A quality value as the adapter names it ("PSNR 31.2 dB", "token agreement 0.958"; without the name: "31.2 dB")."""
        name, unit = self.quality_label
        text = f"{value:.1f} {unit}" if unit else f"{value:.3f}"
        return f"{name} {text}" if named else text

    def floor(self) -> str:
        name, unit = self.quality_label
        return f"{self.min_psnr} {unit}".rstrip()

    def _open_study(self, storage: str, seed: int, heartbeat_interval: int, grace_period: int | None) -> tuple[optuna.Study, bool]:
        """Create or load the study, and whether this worker created it; workers starting together on a new database
        may race to create its tables, so a failed first attempt is retried once the other worker has made them."""
        import time

        sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
        for attempt in range(3):
            try:
                with warnings.catch_warnings():  # heartbeats and their retry are experimental in Optuna, harmless
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    rdb = optuna.storages.RDBStorage(
                        _driver_url(storage), heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
                    )  # fmt: skip
                self.rdb = rdb
                try:
                    study = optuna.create_study(study_name=self.study_name, storage=rdb, directions=["minimize", "maximize"],
                                                sampler=sampler)
                    return study, True
                except optuna.exceptions.DuplicatedStudyError:
                    return optuna.load_study(study_name=self.study_name, storage=rdb, sampler=sampler), False
            except Exception as e:  # SQLAlchemy raises many kinds for a bad URL or an unreachable server
                if attempt < 2:  # a race with another worker (tables, schema version) or a hiccup: retry
                    time.sleep(0.5 * (attempt + 1))
                    continue
                raise ValueError(
                    f"Cannot open the study storage {storage!r} ({type(e).__name__}: {str(e).splitlines()[0]}); give a "
                    "reachable SQLAlchemy URL such as sqlite:///search.db."
                ) from None
        raise AssertionError("unreachable")

    @property
    def max_dense_steps(self) -> int:
        return self.space.max_dense_steps if self.space.max_dense_steps is not None else self.num_steps // 2

    @property
    def max_dense_layers(self) -> int:
        L = self.profile.model.num_layers
        return self.space.max_dense_layers if self.space.max_dense_layers is not None else L // 4

    # ---- one trial -----------------------------------------------------------------------------------
    def plan_for(self, trial: "optuna.Trial | optuna.trial.FrozenTrial") -> SparsePlan:
        """The trial's plan (a finished FrozenTrial answers the same suggestions from its stored params)."""
        s, L = self.space, self.profile.model.num_layers
        p = {
            "dense_steps": trial.suggest_int("dense_steps", 0, self.max_dense_steps),
            "dense_layers": trial.suggest_int("dense_layers", 0, self.max_dense_layers),
            "block_size": trial.suggest_categorical("block_size", list(s.block_sizes)),
            "allowance": trial.suggest_float("allowance", *s.allowance, log=True),
            **{f"layer_scale_{l}": trial.suggest_categorical(f"layer_scale_{l}", list(s.layer_scales)) for l in range(L)},
        }
        if len(s.range_scales) > 1:  # a knob (one value: every range takes it, nothing to draw)
            for r in range(s.num_ranges):
                trial.suggest_categorical(f"range_scale_{r}", list(s.range_scales))
        return self._plan(p, p["allowance"], *self.scales(trial))  # the drawn multipliers, or a refinement trial's own

    def scales(self, trial: "optuna.Trial | optuna.trial.FrozenTrial") -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The trial's per-range and per-layer multipliers of its allowance: drawn (or the single range scale), or a
        refinement trial's own (`next_refinement`). A running trial's once `plan_for` has drawn them."""
        refined = trial.user_attrs.get(SCALES_ATTR)
        if refined is not None:
            return tuple(refined["range"]), tuple(refined["layer"])
        s, L = self.space, self.profile.model.num_layers
        ranges = tuple(trial.params.get(f"range_scale_{r}", s.range_scales[0]) for r in range(s.num_ranges))
        return ranges, tuple(trial.params[f"layer_scale_{l}"] for l in range(L))

    def _neutral_range_scales(self) -> dict[str, float]:
        """The sweep's range scales: 1 where it is a choice (else the choice nearest it), none without the knob."""
        s = self.space
        if len(s.range_scales) <= 1:
            return {}
        neutral = min(s.range_scales, key=lambda x: (abs(math.log(x)), x))
        return {f"range_scale_{r}": neutral for r in range(s.num_ranges)}

    def objective(self, trial: optuna.Trial) -> tuple[float, float]:
        plan = self.plan_for(trial)
        cost = self.costs[plan.block_size]
        t = predicted_time(plan, cost, self.num_steps)
        speedup = dense_time(plan, cost, self.num_steps) / max(t, 1e-9)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # which machine and process ran it
        trial.set_user_attr("predicted_speedup", speedup)
        trial.set_user_attr("density", plan.predicted_flops_share(self.profile.layout, self.num_steps))

        losses = self.losses_to_end()

        def report(step: int, psnr: float) -> None:
            trial.set_user_attr(f"psnr_step_{step}", min(psnr, PSNR_CAP))
            if psnr < self.min_psnr:
                trial.set_user_attr("pruned_at_step", step)
                raise optuna.TrialPruned(f"{self.q(psnr)} at step {step} is below the floor {self.floor()}")
            loss, n = losses.get(step, (0.0, 0))
            bound = PRUNE_AHEAD_SHARE * loss - PRUNE_AHEAD_SLACK
            if bound > 0 and psnr - bound < self.min_psnr:
                trial.set_user_attr("pruned_at_step", step)
                trial.set_user_attr("pruned_ahead", bound)
                raise optuna.TrialPruned(
                    f"{self.q(psnr)} at step {step}, and every one of {n} completed trials lost at least "
                    f"{self.q(loss, named=False)} from this step to its end: less a slack, it would end below the floor "
                    f"{self.floor()}")

        result = self.evaluator(plan, report)
        trial.set_user_attr("seconds", result.seconds)
        trial.set_user_attr("measured_speedup", self.evaluator.dense_seconds / max(result.seconds, 1e-9))
        return t, min(result.psnr, PSNR_CAP)

    def losses_to_end(self) -> dict[int, tuple[float, int]]:
        """Per step, the smallest drop in quality from that step to the end over the completed trials, and their count
        (`SearchSpace.prune_ahead`): empty until that many have completed. Trials or steps at the PSNR cap (identical
        to dense) tell nothing about the drop and are left out."""
        if self.space.prune_ahead == 0:
            return {}
        done = [t for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if t.values is not None and t.values[1] < PSNR_CAP]
        if len(done) < self.space.prune_ahead:
            return {}
        drops: dict[int, list[float]] = {}
        for t in done:
            for key, value in t.user_attrs.items():
                if key.startswith("psnr_step_") and value < PSNR_CAP:
                    drops.setdefault(int(key.removeprefix("psnr_step_")), []).append(value - t.values[1])
        return {step: (min(d), len(d)) for step, d in drops.items() if len(d) >= self.space.prune_ahead}

    # ---- the loop ------------------------------------------------------------------------------------
    def finished(self, running: bool = True) -> int:
        """Trials done (complete or pruned), and with `running` those other workers (or this one) are running."""
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        states += (optuna.trial.TrialState.RUNNING,) if running else ()
        return len(self.study.get_trials(deepcopy=False, states=states))

    def run(self, trials: int, timeout: float | None = None, log: Callable[[str], None] = logger.info, progress: bool = True) -> None:
        """Run until the study holds `trials` done trials (shared by every worker on the storage) or `timeout` s pass.

        When the budget is taken but other workers still run trials, this worker waits for them: a dead worker's
        trial goes stale after the grace period and is retried here, so on return the budget is complete."""
        import time

        from tqdm import tqdm

        start, waited_for = time.monotonic(), None
        bar = tqdm(total=trials, initial=min(self.finished(), trials), desc="search", disable=not progress, leave=False)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # Optuna warns that heartbeats are meant for Study.optimize; this loop keeps them itself (`_Heartbeat`)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # fail_stale_trials: harmless
            while self.finished(running=False) < trials and (timeout is None or time.monotonic() - start < timeout):
                optuna.storages.fail_stale_trials(self.study)  # a dead worker's trial: failed, and queued again
                if self.finished() >= trials:  # the rest of the budget is running elsewhere: wait for it
                    running = [t.number for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
                    if running != waited_for:
                        waited_for = running
                        log(f"waiting for trial(s) {running} running in other workers; a trial whose worker died is "
                            f"retried here once it has been silent for the grace period (trials left RUNNING by a "
                            f"search without heartbeats never are: stop with Ctrl-C or --timeout)")
                    time.sleep(min(1.0, self.heartbeat_interval))
                    continue
                if self.finished() >= trials - self.space.refine:  # the budget's last trials: refine the best
                    self._queue_refinement(log)
                trial = self.study.ask()
                if self.finished() > trials:
                    # another worker took the last slot between our count and ask(): give this one back
                    trial.set_user_attr("reason", "trial budget already used by another worker")
                    self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    continue
                try:
                    trial_id = self.rdb.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)
                    with _Heartbeat(self.rdb, trial_id, self.heartbeat_interval):
                        values = self.objective(trial)
                    self.study.tell(trial, values)
                    log(f"trial {trial.number}: predicted {trial.user_attrs['predicted_speedup']:.2f}x attention, "
                        f"measured {trial.user_attrs['measured_speedup']:.2f}x run, {self.q(values[1])}")
                except optuna.TrialPruned as e:
                    self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    log(f"trial {trial.number}: pruned ({e})")
                except Exception as e:
                    if self._finished_elsewhere(trial, e):
                        # SQLite cannot lock rows (no SELECT ... FOR UPDATE), so two workers can pop the same queued
                        # trial from Optuna's RDB storage; the other one finished it first and its result stands
                        log(f"trial {trial.number}: finished by another worker meanwhile; its result stands")
                        continue
                    self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    raise
                bar.update(1)
        bar.close()

    def next_refinement(self) -> tuple[dict[str, Any], dict[str, Any], str] | None:
        """The next refinement trial's parameters, user attributes and why (see `SearchSpace.refine`), or None: the
        budget is spent, trials are queued already, no trial meets the floor yet, or every bracket is narrower than
        a factor 1.1.

        The fastest trial meeting the floor is the base. Its allowance is bisected first, its other knobs kept. Once
        that bracket is closed, one multiplier at a time: a step range's or a layer's (the trial's own `scales`,
        stored as the refinement trial's user attribute `scales`, not as a parameter the sampler would draw), the one
        whose next plan the cost model predicts fastest first; the next value doubles the multiplier until a trial
        falls below the floor, then bisects. A bracket's top is the least value at which the base, so changed, is
        looser everywhere than a trial below the floor with the same dense steps, dense layers and block size (looser
        allowances only lose quality: the assumption the bisection rests on), else the allowance range's top."""
        C, P, W = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.WAITING
        trials = self.study.get_trials(deepcopy=False)
        if any(t.state == W for t in trials) or sum("refine" in t.user_attrs for t in trials) >= self.space.refine:
            return None  # queued trials (the sweep, another worker's refinement) go first
        done = [t for t in trials if t.state in (C, P)]
        meets = lambda t: t.state == C and t.values[1] >= self.min_psnr  # noqa: E731  (pruned: below the floor)
        feasible = [t for t in done if meets(t)]
        if not feasible:
            return None
        # the fastest meeting the floor; on a tie (a looser allowance that changed no head) the loosest
        best = min(feasible, key=lambda t: (t.values[0], -self._looseness(t), t.number))
        knobs = lambda t: (t.params["dense_steps"], t.params["dense_layers"], t.params["block_size"])  # noqa: E731
        failed = [(t, self._effective(t)) for t in done if not meets(t) and knobs(t) == knobs(best)]
        taken = [(t.system_attrs.get("fixed_params"), t.user_attrs.get(SCALES_ATTR)) for t in trials]  # enqueued ones
        a, (rs, ls) = best.params["allowance"], self.scales(best)
        top = self.space.allowance[1]
        coordinates = [("allowance", None, a, top)]
        coordinates += [("range", r, rs[r], top / a) for r in range(len(rs))] if len(rs) > 1 else []
        coordinates += [("layer", l, ls[l], top / a) for l in range(len(ls))] if len(ls) > 1 else []
        options = []
        for kind, index, lo, hi in coordinates:
            def point(value: float, kind=kind, index=index) -> tuple[float, list[float], list[float]]:
                r_, l_ = list(rs), list(ls)
                if kind == "range":
                    r_[index] = value
                elif kind == "layer":
                    l_[index] = value
                return (value if kind == "allowance" else a), r_, l_

            upper = None  # the failed trial that sets the top
            for t, e in failed:
                v = _least_looser(a, rs, ls, e, kind, index)
                if v is not None and lo < v < hi:
                    hi, upper = v, t
            plan_at = lambda v, point=point: self._plan(best.params, *point(v)).to_dict()  # noqa: E731
            lo_plan, hi_plan = plan_at(lo), (plan_at(hi) if upper is not None else None)
            while hi / lo >= 1.1:
                mid = math.sqrt(lo * hi)
                if kind != "allowance" and upper is None:  # no failure known above: double (the range's top is far)
                    mid = min(mid, 2 * lo)
                plan = plan_at(mid)
                if plan == lo_plan:  # the same plan as the bracket's ends: its result is known, no run needed
                    lo = mid
                elif plan == hi_plan:
                    hi = mid
                else:
                    allowance, r_, l_ = point(mid)
                    params = {**best.params, "allowance": allowance}
                    scales = None if kind == "allowance" and best.user_attrs.get(SCALES_ATTR) is None else {"range": r_, "layer": l_}
                    if (params, scales) in taken:  # enqueued before (another worker runs it): its result decides
                        if kind == "allowance":
                            return None
                        break
                    name = "allowance" if kind == "allowance" else f"{kind} {index}'s scale"
                    above = (f"trial {upper.number}'s plan or looser, below the floor" if upper is not None
                             else "the allowance range's top")
                    why = (f"{name} {mid:.4g}, between {lo:.4g} (trial {best.number}'s plan, meeting the floor) and "
                           f"{hi:.4g} ({above})")
                    attrs = {"refine": why, **({SCALES_ATTR: scales} if scales is not None else {})}
                    cost = self.costs[best.params["block_size"]]
                    options.append((predicted_time(self._plan(best.params, allowance, r_, l_), cost, self.num_steps), len(options),
                                    params, attrs, why))
                    break
            if kind == "allowance" and options:
                break  # the allowance first, as long as its bracket is open
        if not options:
            return None
        _, _, params, attrs, why = min(options, key=lambda o: o[:2])
        return params, attrs, why

    def _effective(self, trial: "optuna.trial.FrozenTrial") -> list[list[float]]:
        """The trial's effective allowance per step range and layer."""
        (rs, ls), a = self.scales(trial), trial.params["allowance"]
        return [[a * r * l for l in ls] for r in rs]

    def _looseness(self, trial: "optuna.trial.FrozenTrial") -> float:
        return sum(math.log(x) for row in self._effective(trial) for x in row)

    def _plan(self, params: dict[str, Any], allowance: float, range_scales: Sequence[float],
              layer_scales: Sequence[float]) -> SparsePlan:
        """The plan of a trial's dense steps, dense layers and block size (`params`) at this allowance and multipliers."""
        return build_plan(self.profile, self.costs[params["block_size"]], self.num_steps, params["dense_steps"],
                          params["dense_layers"], [allowance * m for m in layer_scales], self.space.num_ranges,
                          params["block_size"], range_scales)

    def _queue_refinement(self, log: Callable[[str], None]) -> None:
        found = self.next_refinement()
        if found is not None:
            params, attrs, why = found
            self.study.enqueue_trial(params, user_attrs=attrs)
            log(f"refining: {why}")

    def _finished_elsewhere(self, trial, error: Exception) -> bool:
        """Whether `error` only says that another worker finished `trial` (completed or pruned) while this one ran it."""
        if not isinstance(error, (optuna.exceptions.UpdateFinishedTrialError, ValueError)):
            return False
        state = self.rdb.get_trial(self.rdb.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)).state
        return state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

    # ---- results -------------------------------------------------------------------------------------
    def outcomes(self) -> list[TrialOutcome]:
        out = []
        for t in self.study.get_trials(deepcopy=False):
            if t.state not in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
                continue
            complete = t.state == optuna.trial.TrialState.COMPLETE
            out.append(TrialOutcome(
                t.number,
                t.values[0] if complete else math.nan,
                t.user_attrs.get("predicted_speedup", math.nan),
                t.values[1] if complete else math.nan,
                t.user_attrs.get("seconds", math.nan),
                dict(t.params),
                t.state.name.lower(),
            ))
        return out

    def pareto_front(self) -> list[TrialOutcome]:
        numbers = {t.number for t in self.study.best_trials}
        return sorted((o for o in self.outcomes() if o.number in numbers), key=lambda o: o.predicted_ms)

    def validated_psnr(self, outcome: TrialOutcome, validator: Evaluator, log: Callable[[str], None] = logger.info,
                       floor: float | None = None) -> float:
        """The trial's plan run on the held-out calls of `validator`: the final PSNR, or the step PSNR at which it
        fell below `floor` (default the search's; the run stops there, as a search trial would be pruned). Stored in
        the study, keyed by the trial and the validator's calls, so choosing again costs nothing; a run stopped below
        one floor is not taken as the verdict on a lower one (it runs again)."""
        floor = self.min_psnr if floor is None else floor
        key = _validation_key(validator, outcome.number)
        stored = self.study.user_attrs.get(key)
        if isinstance(stored, dict):  # a run stopped at a step below the floor it had then
            if floor >= stored["stopped_below"]:
                return float(stored["psnr"])
        elif stored is not None:  # a complete run (or, stored before floors were recorded, either)
            return float(stored)
        trial = next(t for t in self.study.get_trials(deepcopy=False) if t.number == outcome.number)

        def report(step: int, psnr: float) -> None:
            if psnr < floor:
                raise _BelowFloor(step, psnr)

        try:
            result = validator(self.plan_for(trial), report)
            value = min(result.psnr, PSNR_CAP)
            worst = f" (worst call {self.q(min(result.call_psnr), named=False)})" if len(result.call_psnr) > 1 else ""
            log(f"validation of trial {outcome.number}: {self.q(value)} on the held-out calls{worst}")
            self.study.set_user_attr(key, float(value))
        except _BelowFloor as e:
            step, value = e.args
            log(f"validation of trial {outcome.number}: {self.q(value)} at step {step}, below the floor {self.q(floor, named=False)}")
            self.study.set_user_attr(key, {"psnr": float(value), "step": int(step), "stopped_below": float(floor)})
        return float(value)

    def held_out_gap(self, validator: Evaluator, tried: dict[int, float]) -> float | None:
        """The most quality any of the `tried` trials (number -> held-out figure) lost from the calibration calls to
        the held-out ones, over complete validations (a run stopped below a floor saw only part of the run); None
        without one."""
        by_number = {o.number: o for o in self.outcomes()}
        losses = [by_number[n].psnr - value for n, value in tried.items()
                  if not isinstance(self.study.user_attrs.get(_validation_key(validator, n)), dict)]
        return round(max(losses), 4) if losses else None

    def _gap_advice(self, gap: float | None, held_floor: float) -> str:
        """A calibration floor that allows for `gap` (`held_out_gap`), as a sentence (empty when none applies): the
        search's refinement then works at that floor, near plans that hold the held-out one."""
        if gap is None or gap <= 0:
            return ""
        unit = self.quality_label[1]
        step = 0.1 if unit else 0.001
        floor = math.ceil((held_floor + gap) / step - 1e-9) * step
        if (not unit and floor > 1.0) or floor <= self.min_psnr:  # a bounded measure past its top, or no stricter floor
            return ""
        floor_text = f"{floor:.1f}" if unit else f"{floor:.3f}"
        return (f" Validated plans lost up to {self.q(gap, named=False)} from the calibration calls to the held-out ones: "
                f"to look for faster plans that hold {self.q(held_floor, named=False)} there, continue this study with a "
                f"calibration floor that allows for it, --min-psnr {floor_text} (the study resumes: raise --trials, and "
                "--refine spends the new trials refining at that floor).")

    def choose(
        self, target_speedup: float | None = None, validator: Evaluator | None = None, log: Callable[[str], None] = logger.info,
        validation_floor: float | None = None,
    ) -> tuple[TrialOutcome, SparsePlan]:
        """The fastest Pareto trial meeting the PSNR floor, or with `target_speedup`, the best-quality trial that
        reaches it. Raises, naming what was reached and the knob to loosen, when none qualifies.

        With a `validator` (an evaluator on held-out calls, not the calibration ones), the floor must also hold
        there: every trial meeting it on the calibration calls is run on the held-out calls, fastest first, and the
        first that holds it is chosen. (With `target_speedup` the chosen plan is only measured there.) A few
        calibration prompts can overestimate others: this is the guard against it. Not only the Pareto trials: a
        measure that saturates (token agreement 1.0) leaves one trial at the top of the front, and when it fails
        the held-out calls the slower trials tied with it are the ones to try next. `validation_floor` is the floor
        on the held-out calls (default the search's): the calibration floor steers the search, this one is the
        verdict."""
        held_floor = self.min_psnr if validation_floor is None else validation_floor
        front = self.pareto_front()
        done = [o for o in self.outcomes() if o.state == "complete"]
        validation: dict[str, Any] | None = None
        if target_speedup is not None:
            ok = [o for o in front if o.predicted_speedup >= target_speedup]
            if not ok:
                best = max((o.predicted_speedup for o in done), default=0.0)
                raise ValueError(
                    f"No trial reached the target speedup {target_speedup}x: the fastest predicted {best:.2f}x. "
                    "Lower --target-speedup, add candidates to the profile, or run more --trials."
                )
            chosen = max(ok, key=lambda o: (o.psnr, -o.predicted_ms))
            if validator is not None:
                validation = {"psnr": self.validated_psnr(chosen, validator, log, held_floor), "tried": [chosen.number]}
        else:
            ok = [o for o in front if o.psnr >= self.min_psnr]
            if not ok:
                best = max((o.psnr for o in done), default=-math.inf)
                raise ValueError(
                    f"No trial met the quality floor {self.floor()}: the best {self.quality_label[0]} reached was {self.q(best, named=False)}. "
                    "Lower --min-psnr, or run more --trials (the cautious first trial keeps more steps dense)."
                )
            ok.sort(key=lambda o: o.predicted_ms)
            chosen = ok[0]
            if validator is not None:
                tried: dict[int, float] = {}
                meeting = sorted((o for o in done if o.psnr >= self.min_psnr), key=lambda o: (o.predicted_ms, o.number))
                for o in meeting:
                    tried[o.number] = self.validated_psnr(o, validator, log, held_floor)
                    if tried[o.number] >= held_floor:
                        chosen = o
                        break
                else:
                    summary = ", ".join(f"trial {n}: {self.q(v, named=False)}" for n, v in tried.items())
                    advice = self._gap_advice(self.held_out_gap(validator, tried), held_floor)
                    raise ValueError(
                        f"No trial meeting the quality floor {self.floor()} on the calibration calls held "
                        f"{self.q(held_floor, named=False)} on the held-out calls ({summary}). Lower the held-out floor "
                        "(--validate-min-psnr; --min-psnr when it is not given), run more --trials, or calibrate on prompts "
                        "more like the held-out ones; "
                        f"the study and these validations are kept.{advice}"
                    )
                validation = {"psnr": tried[chosen.number], "tried": list(tried)}
                gap = self.held_out_gap(validator, tried)
                if gap is not None:
                    validation["gap"] = gap
                if len(tried) > 1:  # faster plans failed there: say how to look for faster ones that hold
                    log(f"{len(tried) - 1} faster plan(s) fell below {self.q(held_floor, named=False)} on the held-out "
                        f"calls.{self._gap_advice(gap, held_floor)}")
            if validation is not None and validation_floor is not None:
                validation["min_psnr"] = held_floor
        trial = next(t for t in self.study.get_trials(deepcopy=False) if t.number == chosen.number)
        plan = self.plan_for(trial)
        plan.search = {
            "study": self.study_name,
            "trial": chosen.number,
            "min_psnr": self.min_psnr,
            "target_speedup": target_speedup,
            "psnr": chosen.psnr,
            "predicted_attention_speedup": chosen.predicted_speedup,
            "measured_speedup": trial.user_attrs.get("measured_speedup"),
            "cost_model": dict(self.costs[plan.block_size].key.__dict__),
            "params": dict(trial.params),
            **({"scales": trial.user_attrs[SCALES_ATTR]} if SCALES_ATTR in trial.user_attrs else {}),
        }
        if validation is not None:
            validation["calls"] = len(getattr(validator, "calls", ()))
            plan.search["validation"] = validation
        return chosen, plan
