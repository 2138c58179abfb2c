"""The Optuna search: plans from profile + cost model, resume, shared workers, the choice and its errors."""

import subprocess
import sys
import textwrap

import optuna
import math

import pytest

from sparsediff.patterns import get_pattern
from sparsediff.plan import SparsePlan, StepRange
from sparsediff.search.optimize import PlanSearch, SearchSpace, assign_heads, build_plan, predicted_time
from sparsediff.search.optimize import Evaluation
from tests.search_fixtures import CANDIDATES, LAYOUT, HeldOutEvaluator, SyntheticEvaluator, synthetic_cost, synthetic_profile


def test_heads_get_their_cheapest_candidate_within_the_allowance():
    profile, cost = synthetic_profile(), synthetic_cost()
    errors = profile.errors.amax(dim=0)  # (L, H, C)
    layers = assign_heads(errors, CANDIDATES, cost, [0.3, 0.3, 0.3])
    for l, heads in enumerate(layers):
        for h, name in enumerate(heads):
            ok = [c for i, c in enumerate(CANDIDATES) if errors[l, h, i] <= 0.3]
            cheapest = min(ok, key=lambda c: 0.0 if c == "skip" else cost.group_time(c, 4) / 4)
            assert cost.group_time(name, 4) == pytest.approx(cost.group_time(cheapest, 4))
            assert float(errors[l, h, CANDIDATES.index(name)]) <= 0.3
    assert assign_heads(errors, CANDIDATES, cost, [0.0] * 3) == [("full",) * 4] * 3


def test_build_plan_honours_dense_steps_and_layers_and_predicts_time():
    profile, cost = synthetic_profile(), synthetic_cost()
    plan = build_plan(profile, cost, num_steps=4, dense_steps=1, dense_layers=1, allowance=[0.4] * 3)
    assert plan.dense_steps == 1 and plan.dense_layers == (0,)
    assert len(plan.ranges) == 2 and plan.layout == str(LAYOUT)
    dense = cost.dense_layer_time() * 3 * 4
    t = predicted_time(plan, cost, 4)
    assert cost.dense_layer_time() * 3 + cost.dense_layer_time() * 3 < t < dense  # dense step + dense layer cost
    tight = build_plan(profile, cost, 4, 0, 0, [0.0] * 3)
    assert predicted_time(tight, cost, 4) == pytest.approx(dense)


def test_predicted_time_counts_the_plans_dense_steps_and_layers_as_sdpa_and_full_heads_of_sparse_steps_on_their_curve():
    from sparsediff.search.cost import FULL_BESIDE

    profile, cost = synthetic_profile(), synthetic_cost()
    cost.points[FULL_BESIDE] = [(n, 2.5 * n) for n in (1, 2, 4)]  # the compiled kernel's dense curve, faster than SDPA's
    full, diagonal = ((get_pattern(n),) * 4 for n in ("full", "diagonal_w1"))
    plan = SparsePlan(model=profile.model, ranges=[StepRange(0.0, 1.0, (full, full, diagonal))], dense_steps=1, dense_layers=(0,))
    sdpa, compiled, sparse = cost.dense_layer_time(), 2.5 * 4, cost.group_time("diagonal_w1", 4)
    # step 0 and layer 0: the model's own SDPA; layer 1, all full in the sparse steps: the compiled curve
    assert predicted_time(plan, cost, 4) == pytest.approx(3 * sdpa + 3 * (sdpa + compiled + sparse))
    dense = SparsePlan(model=profile.model, ranges=[StepRange(0.0, 1.0, (full,) * 3)])
    assert dense.is_all_dense and predicted_time(dense, cost, 4) == pytest.approx(4 * 3 * sdpa)  # the model's own


def test_a_range_per_step_gives_each_step_its_own_heads():
    """With as many ranges as steps, each range's heads are the cheapest within the allowance at that step alone;
    with fewer, the worst step of a range decides for all of it, so a range per step never keeps more heads full."""
    profile, cost = synthetic_profile(), synthetic_cost()
    per_step = build_plan(profile, cost, num_steps=4, dense_steps=0, dense_layers=0, allowance=[0.2] * 3, num_ranges=4)
    assert [(r.start, r.end) for r in per_step.ranges] == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    for step, r in enumerate(per_step.ranges):
        expected = assign_heads(profile.errors[step], CANDIDATES, cost, [0.2] * 3)
        assert [tuple(p.name for p in layer) for layer in r.layers] == expected
    halves = build_plan(profile, cost, 4, 0, 0, [0.2] * 3, num_ranges=2)
    full = lambda plan: sum(p.kind == "full" for r in plan.ranges for layer in r.layers for p in layer)  # noqa: E731
    assert full(per_step) * 2 < full(halves) * 4  # per step and range: fewer full heads in finer ranges
    assert per_step.ranges != halves.ranges


def test_the_range_count_is_checked_and_names_its_own_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    two = PlanSearch(synthetic_profile(), {16: synthetic_cost()}, SyntheticEvaluator(), SearchSpace(block_sizes=(16,)), storage=storage)
    four = PlanSearch(synthetic_profile(), {16: synthetic_cost()}, SyntheticEvaluator(),
                      SearchSpace(block_sizes=(16,), num_ranges=4), storage=storage)
    assert four.study_name == two.study_name + "-r4"  # the same parameters give another plan: another study
    four.run(trials=3, progress=False)
    _, plan = four.choose(target_speedup=1.0)
    assert len(plan.ranges) == 4
    narrow = PlanSearch(synthetic_profile(), {16: synthetic_cost()}, SyntheticEvaluator(),
                        SearchSpace(block_sizes=(16,), num_ranges=4, allowance=(0.005, 0.05)), storage=storage)
    assert narrow.study_name == two.study_name + "-r4-a0.005-0.05"  # another range draws other trials: another study
    narrow.run(trials=4, progress=False)
    assert all(0.005 <= t.params["allowance"] <= 0.05 for t in narrow.study.trials)
    sweep = [t.params["allowance"] for t in narrow.study.trials]  # the first trials sweep the range, lowest first
    assert sweep == pytest.approx([0.005, 0.005 * 10 ** (1 / 3), 0.005 * 10 ** (2 / 3), 0.05])
    assert all(t.params["dense_steps"] == 1 and t.params["dense_layers"] == 0 for t in narrow.study.trials)
    with pytest.raises(ValueError, match=r"cannot have 5 step ranges in a 4-step run; give between 1 and 4 \(--ranges\)"):
        PlanSearch(synthetic_profile(), {16: synthetic_cost()}, SyntheticEvaluator(), SearchSpace(block_sizes=(16,), num_ranges=5),
                   storage=storage)


def test_range_scales_are_a_knob_of_their_own_study(tmp_path):
    """With several range scales each trial draws one per step range, and its plan is `build_plan`'s with them; the
    sweep keeps them at 1; the setting names its own study; the chosen plan records them."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    plain = PlanSearch(synthetic_profile(), {16: synthetic_cost()}, SyntheticEvaluator(), SearchSpace(block_sizes=(16,), num_ranges=4),
                       storage=storage)
    scaled = PlanSearch(synthetic_profile(), {16: synthetic_cost()}, SyntheticEvaluator(),
                        SearchSpace(block_sizes=(16,), num_ranges=4, range_scales=(0.5, 1.0, 2.0)), storage=storage, min_psnr=35.0)
    assert scaled.study_name == plain.study_name + "-s0.5-1-2"
    scaled.run(trials=10, progress=False)
    trials = scaled.study.trials
    assert all(t.params[f"range_scale_{r}"] == 1.0 for t in trials[:4] for r in range(4))  # the sweep
    assert len({tuple(t.params[f"range_scale_{r}"] for r in range(4)) for t in trials}) > 1  # drawn after it
    cost = synthetic_cost()
    for t in trials:
        p = t.params
        expected = build_plan(scaled.profile, cost, 4, p["dense_steps"], p["dense_layers"],
                              [p["allowance"] * p[f"layer_scale_{l}"] for l in range(3)], 4, 16,
                              [p[f"range_scale_{r}"] for r in range(4)])
        assert scaled.plan_for(t).to_dict() == expected.to_dict()
    _, plan = scaled.choose()
    assert all(f"range_scale_{r}" in plan.search["params"] for r in range(4))
    assert not any(k.startswith("range_scale") for t in plain.study.trials for k in t.params)  # no knob by default
    single = PlanSearch(synthetic_profile(), {16: synthetic_cost()}, SyntheticEvaluator(),
                        SearchSpace(block_sizes=(16,), num_ranges=4, range_scales=(2.0,)), storage=storage)
    fixed = {"dense_steps": 1, "dense_layers": 0, "block_size": 16, "allowance": 0.1, **{f"layer_scale_{l}": 1.0 for l in range(3)}}
    assert single.plan_for(optuna.trial.FixedTrial(fixed)).to_dict() == build_plan(  # one value: every range takes it
        single.profile, cost, 4, 1, 0, [0.1] * 3, 4, 16, [2.0] * 4).to_dict()
    assert single.plan_for(optuna.trial.FixedTrial(fixed)).to_dict() != plain.plan_for(optuna.trial.FixedTrial(fixed)).to_dict()
    with pytest.raises(ValueError, match=r"range scales 0,1 must be positive numbers; give e.g. 0.5,1,2 \(--range-scales\)"):
        SearchSpace(range_scales=(0, 1)).check(4)


def test_the_last_trials_bisect_the_allowance_of_the_fastest_plan_meeting_the_floor(tmp_path):
    """Refinement: each of the budget's last trials keeps the knobs of the fastest trial meeting the floor so far and
    moves one coordinate (the allowance while its bracket is open, then one range's or layer's multiplier) strictly
    inside its bracket (that trial's value, and the least known to fail: a trial below the floor no looser, or the
    range's top), to a plan that is neither end's. Here it finds a faster plan than the sampler's trials did."""
    def search(refine: int, name: str) -> PlanSearch:
        s = PlanSearch(synthetic_profile(), {16: synthetic_cost()}, SyntheticEvaluator(), SearchSpace(block_sizes=(16,), refine=refine),
                       min_psnr=42.0, storage=f"sqlite:///{tmp_path / name}")
        s.run(trials=10, progress=False)
        return s

    refined, plain = search(4, "refined.db"), search(0, "plain.db")
    trials = refined.study.trials
    meets = lambda t: t.state == optuna.trial.TrialState.COMPLETE and t.values[1] >= 42.0  # noqa: E731
    knobs = lambda t: {k: v for k, v in t.params.items() if k != "allowance" and not k.startswith("layer_scale")}  # noqa: E731
    steps = [t for t in trials if "refine" in t.user_attrs]
    assert steps and all(t.number >= 10 - 4 for t in steps)  # only the budget's last trials
    assert not any("refine" in t.user_attrs for t in plain.study.trials)
    assert [t.params for t in plain.study.trials[:6]] == [t.params for t in trials[:6]]  # the same trials before it
    for t in steps:
        before = [u for u in trials if u.number < t.number]
        best = min((u for u in before if meets(u)), key=lambda u: (u.values[0], -refined._looseness(u)))
        assert knobs(t) == knobs(best)
        coordinates = lambda u: [u.params["allowance"], *refined.scales(u)[0], *refined.scales(u)[1]]  # noqa: E731
        old, new = coordinates(best), coordinates(t)
        moved = [i for i in range(len(old)) if old[i] != new[i]]
        assert len(moved) == 1 and new[moved[0]] > old[moved[0]]  # one coordinate, loosened
        i = moved[0]
        ceiling = SearchSpace.allowance[1] / (1.0 if i == 0 else best.params["allowance"])
        for u in before:  # no trial below the floor is tighter than t anywhere and has this coordinate at or under t's
            if not meets(u) and knobs(u) == knobs(best):
                e_u, e_t = refined._effective(u), refined._effective(t)
                assert any(e_t[r][l] < e_u[r][l] for r in range(len(e_u)) for l in range(len(e_u[0])))
        assert new[i] < ceiling
        plan = lambda c: refined._plan(best.params, c[0], c[1:3], c[3:]).to_dict()  # noqa: E731  (2 ranges, 3 layers)
        assert plan(old) != plan(new)  # a run that can tell something new
        assert f"trial {best.number}'s plan, meeting the floor" in t.user_attrs["refine"]
    assert refined.choose()[0].predicted_ms < plain.choose()[0].predicted_ms  # a faster plan at the same floor
    assert refined.next_refinement() is None  # the budget is spent


def test_refinement_stops_when_the_bracket_is_narrow(tmp_path):
    s = PlanSearch(synthetic_profile(), {16: synthetic_cost()}, SyntheticEvaluator(), SearchSpace(block_sizes=(16,), refine=50),
                   min_psnr=42.0, storage=f"sqlite:///{tmp_path / 'study.db'}")
    s.run(trials=40, progress=False)
    steps = [t for t in s.study.trials if "refine" in t.user_attrs]
    assert 0 < len(steps) < 40 - s.space.sweep  # it stopped by itself, the sampler had the rest
    assert s.next_refinement() is None
    with pytest.raises(ValueError, match=r"refinement budget is -1 trials; give 0 \(none\) or more \(--refine\)"):
        SearchSpace(refine=-1).check(4)


def test_a_point_is_known_to_fail_from_the_least_value_looser_everywhere_than_a_failed_trial():
    from sparsediff.search.optimize import _least_looser

    failed = [[0.2, 0.4], [0.3, 0.3]]  # effective allowances of a trial below the floor: 2 ranges x 2 layers
    # the allowance alone: every cell must reach the failed one's, with the base's multipliers (1, 2) x (1, 1)
    assert _least_looser(0.1, [1.0, 2.0], [1.0, 1.0], failed, "allowance", None) == pytest.approx(0.4)
    # range 0's multiplier at allowance 0.1, layers (1, 1): range 1 (0.1 x 4) is looser than 0.3 already; range 0 needs 4
    assert _least_looser(0.1, [1.0, 4.0], [1.0, 1.0], failed, "range", 0) == pytest.approx(4.0)
    # range 1 tighter than the failed trial (0.1 x 2 < 0.3): no value of range 0's multiplier makes it as loose
    assert _least_looser(0.1, [1.0, 2.0], [1.0, 1.0], failed, "range", 0) is None
    # layer 1's multiplier, ranges (3, 3): layer 0 (0.3) is as loose; layer 1 needs 0.4 / 0.3
    assert _least_looser(0.1, [3.0, 3.0], [1.0, 1.0], failed, "layer", 1) == pytest.approx(0.4 / 0.3)


class RangeWeightedEvaluator(SyntheticEvaluator):
    """Quality falls with the FLOP share skipped in each step range, weighted: the last range's errors cost least."""

    weights = (1.0, 1.0, 0.05)

    def __call__(self, plan: SparsePlan, report):
        share = 0.0
        for r, w in zip(plan.ranges, self.weights):
            alone = SparsePlan(model=plan.model, ranges=[StepRange(0.0, 1.0, r.layers)], block_size=plan.block_size)
            share += w * (1.0 - alone.predicted_flops_share(LAYOUT, self.num_steps))
        value = 50.0 - 30.0 * share
        for step in range(self.num_steps):
            report(step, value + (self.num_steps - step))
        return Evaluation(psnr=value, seconds=1e-3, step_psnr=[value] * self.num_steps)


def test_refinement_moves_one_multiplier_at_a_time_once_the_allowance_is_bracketed(tmp_path):
    """Where some step ranges' errors cost less quality, a larger refinement budget loosens those ranges' multipliers
    beyond the bisected allowance (a user attribute of the trial, not a drawn parameter), and the chosen plan is
    faster at the same floor and records them."""
    def search(refine: int, name: str) -> PlanSearch:
        s = PlanSearch(synthetic_profile(), {16: synthetic_cost()}, RangeWeightedEvaluator(),
                       SearchSpace(block_sizes=(16,), num_ranges=3, refine=refine), min_psnr=42.0,
                       storage=f"sqlite:///{tmp_path / name}")
        s.run(trials=8 + refine, progress=False)
        return s

    short, long = search(4, "short.db"), search(16, "long.db")
    coordinate = [t for t in long.study.trials if "scales" in t.user_attrs]
    assert coordinate and all("refine" in t.user_attrs for t in coordinate)  # only refinement trials have their own
    assert any("range 2's scale" in t.user_attrs["refine"] for t in coordinate)
    assert all(not k.startswith("range_scale") for t in coordinate for k in t.params)  # not a parameter
    (chosen, plan), (short_chosen, _) = long.choose(), short.choose()
    assert chosen.predicted_ms < short_chosen.predicted_ms and chosen.psnr >= 42.0
    trial = long.study.trials[chosen.number]
    assert plan.search["scales"] == trial.user_attrs["scales"]
    ranges, layers = plan.search["scales"]["range"], plan.search["scales"]["layer"]
    assert ranges[2] > ranges[0]  # the cheap range got the looser multiplier
    p = trial.params
    assert plan.to_dict() == {**build_plan(long.profile, synthetic_cost(), 4, p["dense_steps"], p["dense_layers"],
                                           [p["allowance"] * m for m in layers], 3, 16, ranges).to_dict(), "search": plan.search}


def test_range_scales_multiply_the_allowance_per_range():
    profile, cost = synthetic_profile(), synthetic_cost()
    plain = build_plan(profile, cost, 4, 0, 0, [0.3] * 3, num_ranges=2)
    scaled = build_plan(profile, cost, 4, 0, 0, [0.3] * 3, num_ranges=2, range_scales=[0.0, 1.0])
    assert all(p.kind == "full" for layer in scaled.ranges[0].layers for p in layer)  # no error allowed: all full
    assert scaled.ranges[1] == plain.ranges[1] and scaled.ranges[0] != plain.ranges[0]
    assert build_plan(profile, cost, 4, 0, 0, [0.3] * 3, num_ranges=2, range_scales=[1.0, 1.0]).ranges == plain.ranges
    with pytest.raises(ValueError, match="range_scales has 3 entries for 2 step ranges; give one per range"):
        build_plan(profile, cost, 4, 0, 0, [0.3] * 3, num_ranges=2, range_scales=[1.0, 1.0, 1.0])


def make_search(tmp_path, min_psnr=30.0, **kw):
    return PlanSearch(synthetic_profile(), {16: synthetic_cost()}, SyntheticEvaluator(), SearchSpace(block_sizes=(16,)),
                      min_psnr=min_psnr, storage=f"sqlite:///{tmp_path / 'study.db'}", **kw)


def test_search_chooses_the_fastest_plan_meeting_the_floor(tmp_path):
    search = make_search(tmp_path)
    search.run(trials=12, progress=False)
    chosen, plan = search.choose()
    front = search.pareto_front()
    assert chosen.psnr >= 30.0
    assert all(o.predicted_ms >= chosen.predicted_ms for o in front if o.psnr >= 30.0)
    assert plan.search["trial"] == chosen.number and plan.validate()
    assert SyntheticEvaluator()(plan, lambda s, p: None).psnr == pytest.approx(chosen.psnr)  # measured again
    fast, fast_plan = search.choose(target_speedup=1.2)
    assert fast.predicted_speedup >= 1.2


def test_held_out_validation_chooses_the_fastest_plan_that_holds_the_floor_there(tmp_path):
    search = make_search(tmp_path, min_psnr=35.0)
    search.run(trials=16, progress=False)
    unvalidated, _ = search.choose()
    held_out = HeldOutEvaluator(penalty=20.0)
    lines = []
    chosen, plan = search.choose(validator=held_out, log=lines.append)
    stored = {n: search.study.user_attrs[f"validation:held-out:{n}"] for n in plan.search["validation"]["tried"]}
    values = {n: stored_psnr(v) for n, v in stored.items()}
    assert plan.search["validation"]["tried"][-1] == chosen.number and values[chosen.number] >= 35.0
    assert all(v < 35.0 for n, v in values.items() if n != chosen.number)  # the faster ones tried first failed there
    # what the validations lost from calibration (complete runs only), and the calibration floor that allows for it
    calibration = {o.number: o.psnr for o in search.outcomes()}
    gap = max(calibration[n] - v for n, v in stored.items() if not isinstance(v, dict))
    assert plan.search["validation"]["gap"] == pytest.approx(gap, abs=1e-4) and gap > 0
    advice = next(line for line in lines if "faster plan(s) fell below 35.0 dB" in line)
    assert f"--min-psnr {math.ceil((35.0 + round(gap, 4)) * 10 - 1e-9) / 10:.1f}" in advice
    assert chosen.predicted_ms >= unvalidated.predicted_ms and chosen.psnr >= 35.0
    assert plan.search["validation"]["psnr"] == pytest.approx(held_out(plan, lambda s, p: None).psnr)
    runs = held_out.runs
    again, _ = make_search(tmp_path, min_psnr=35.0).choose(validator=held_out, log=lambda line: None)  # stored: not rerun
    assert again.number == chosen.number and held_out.runs == runs
    # a harsher held-out set nothing holds: a clear error naming what each tried trial reached; the study is kept
    with pytest.raises(ValueError, match=r"held 35.0 dB on the held-out calls \(trial \d+: -?[0-9.]+ dB.*Lower the held-out floor"):
        search.choose(validator=HeldOutEvaluator(offset=30.0, key="harsh"), log=lambda line: None)
    assert len(make_search(tmp_path, min_psnr=35.0).study.trials) == 16


def test_when_no_plan_holds_the_held_out_floor_the_error_names_a_calibration_floor_that_allows_for_the_loss(tmp_path):
    search = make_search(tmp_path, min_psnr=35.0)
    search.run(trials=16, progress=False)
    # every plan loses more than the best one's margin over 35 dB on the held-out calls, at its end only: each
    # validation runs to the end and fails
    offset = math.ceil(max(o.psnr for o in search.outcomes() if o.state == "complete")) - 35.0 + 1.5
    held_out = HeldOutEvaluator(penalty=0.0, offset=offset, key="worse", steps_lose=False)
    with pytest.raises(ValueError, match=rf"Lower the held-out floor .* Validated plans lost up to {offset:.1f} dB from the "
                                         rf"calibration calls to the held-out ones: .* --min-psnr {35 + offset:.1f} \(the study resumes"):
        search.choose(validator=held_out, log=lambda line: None)
    # the advice itself: a floor above the search's own, or nothing when that one already allows for the loss
    best = max((o for o in search.outcomes() if o.state == "complete"), key=lambda o: o.psnr)
    unstored = HeldOutEvaluator(key="never-run")  # no stored validation: read as complete runs
    assert search.held_out_gap(unstored, {best.number: best.psnr - 1.0}) == pytest.approx(1.0)
    assert "--min-psnr 36.0 " in search._gap_advice(1.0, held_floor=35.0)
    assert search._gap_advice(1.0, held_floor=30.0) == ""  # 31 <= 35
    assert search._gap_advice(-1.0, held_floor=35.0) == "" and search._gap_advice(None, held_floor=35.0) == ""  # no loss
    # calls that stop early saw part of the run only: no loss is read from them, and no floor is offered
    with pytest.raises(ValueError) as stopped:
        search.choose(validator=HeldOutEvaluator(penalty=0.0, offset=30.0, key="early"), log=lambda line: None)
    assert "Validated plans lost" not in str(stopped.value)


def stored_psnr(value):
    """A stored validation: a float (a complete run) or a dict (a run stopped below a floor)."""
    return value["psnr"] if isinstance(value, dict) else value


def test_a_lower_held_out_floor_chooses_a_faster_plan_and_reruns_validations_stopped_above_it(tmp_path):
    search = make_search(tmp_path, min_psnr=35.0)
    search.run(trials=16, progress=False)
    held_out = HeldOutEvaluator(penalty=20.0)
    strict, strict_plan = search.choose(validator=held_out, log=lambda line: None)
    attrs = lambda: {k.rsplit(":", 1)[1]: v for k, v in search.study.user_attrs.items() if k.startswith("validation:held-out:")}  # noqa: E731
    stopped = {int(n) for n, v in attrs().items() if isinstance(v, dict)}
    assert stopped and all(attrs()[str(n)]["stopped_below"] == 35.0 and attrs()[str(n)]["psnr"] < 35.0 for n in stopped)
    assert "min_psnr" not in strict_plan.search["validation"]  # the search's floor, not given apart
    runs = held_out.runs
    loose, plan = search.choose(validator=held_out, log=lambda line: None, validation_floor=30.0)
    tried = plan.search["validation"]["tried"]
    assert plan.search["validation"]["min_psnr"] == 30.0 and plan.search["validation"]["psnr"] >= 30.0
    assert plan.search["validation"]["psnr"] == pytest.approx(held_out(plan, lambda s, p: None).psnr)
    assert loose.predicted_ms < strict.predicted_ms and loose.psnr >= 35.0  # the calibration floor still applies
    # the runs stopped below 35 dB said nothing about 30 dB: those tried again ran again, the complete ones did not
    assert stopped & set(tried) and held_out.runs - 1 - runs == len(stopped & set(tried))
    assert all(not isinstance(v, dict) or v["stopped_below"] == 30.0 for n, v in attrs().items() if int(n) in stopped & set(tried))


def test_a_new_profile_of_the_same_model_starts_a_new_study(tmp_path):
    """Retrained weights keep the model's config (and fingerprint) but change the profile: resuming the old study
    would hand back trials measured on the old weights."""
    first = make_search(tmp_path)
    first.run(trials=4, progress=False)
    again = make_search(tmp_path)
    finished = lambda search: [t for t in search.study.trials if t.state.is_finished()]  # noqa: E731
    assert again.study_name == first.study_name and len(finished(again)) == 4  # same profile: resumed
    retrained = synthetic_profile()
    retrained.errors = retrained.errors * 0.5
    other = PlanSearch(retrained, {16: synthetic_cost()}, SyntheticEvaluator(), SearchSpace(block_sizes=(16,)),
                       storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert other.study_name != first.study_name and finished(other) == []


def test_pruned_trials_are_recorded(tmp_path):
    search = make_search(tmp_path, min_psnr=45.0)  # only near-dense plans survive
    search.run(trials=8, progress=False)
    states = {t.state for t in search.study.trials}
    assert optuna.trial.TrialState.PRUNED in states
    pruned = [t for t in search.study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert all("pruned_at_step" in t.user_attrs for t in pruned)


class DriftingEvaluator(SyntheticEvaluator):
    """The synthetic runs, losing 4 dB per step on their way to the final PSNR."""

    def __call__(self, plan, report):
        result = super().__call__(plan, lambda step, value: None)
        for step in range(self.num_steps):
            report(step, result.psnr + 4.0 * (self.num_steps - step))
        return result


def test_trials_bound_to_end_below_the_floor_are_pruned_ahead_of_it(tmp_path):
    """Every run loses 4 dB per step to its end: once 3 trials have completed, a trial whose running PSNR less the
    smallest loss they had from that step is under the floor is pruned there, before its running PSNR reaches the
    floor. The trials meeting the floor are the same either way; only failing ones are cut, and earlier."""
    def search(prune_ahead: int, name: str) -> PlanSearch:
        s = PlanSearch(synthetic_profile(), {16: synthetic_cost()}, DriftingEvaluator(),
                       SearchSpace(block_sizes=(16,), refine=0, prune_ahead=prune_ahead), min_psnr=42.0,
                       storage=f"sqlite:///{tmp_path / name}")
        s.run(trials=12, progress=False)
        return s

    ahead, plain = search(3, "ahead.db"), search(0, "plain.db")
    C = optuna.trial.TrialState.COMPLETE
    meets = lambda s: {tuple(sorted(t.params.items())) for t in s.study.trials if t.state == C and t.values[1] >= 42.0}  # noqa: E731
    assert meets(ahead) and meets(ahead) <= meets(plain)  # no trial that would meet the floor was cut
    by_params = {tuple(sorted(t.params.items())): t for t in plain.study.trials}
    early = [t for t in ahead.study.trials if "pruned_ahead" in t.user_attrs]
    assert early  # failing trials were cut ahead of the floor...
    for t in early:
        step = t.user_attrs["pruned_at_step"]
        assert t.user_attrs["pruned_ahead"] == pytest.approx(0.9 * 4.0 * (4 - step) - 1.0)  # the least loss seen, less slack
        assert t.user_attrs[f"psnr_step_{step}"] >= 42.0 > t.user_attrs[f"psnr_step_{step}"] - t.user_attrs["pruned_ahead"]
        assert sum(u.state == C for u in ahead.study.trials if u.number < t.number) >= 3
        twin = by_params.get(tuple(sorted(t.params.items())))
        if twin is not None:  # ...earlier than the same trial without, or where it completed below the floor
            assert twin.state == C and twin.values[1] < 42.0 or twin.user_attrs["pruned_at_step"] > step
    completed = [t for t in ahead.study.trials if t.state == C]
    assert ahead.losses_to_end()[1] == (pytest.approx(12.0), len(completed))
    assert plain.losses_to_end() == {}
    with pytest.raises(ValueError, match=r"prune_ahead is -1; give 0 .*\(--prune-ahead\)"):
        SearchSpace(prune_ahead=-1).check(4)


def test_unreachable_targets_say_what_was_reached(tmp_path):
    search = make_search(tmp_path)
    search.run(trials=4, progress=False)
    with pytest.raises(ValueError, match=r"target speedup 50.0x: the fastest predicted [0-9.]+x\. Lower --target-speedup"):
        search.choose(target_speedup=50.0)
    strict = make_search(tmp_path / "strict", min_psnr=60.0)
    strict.run(trials=3, progress=False)
    with pytest.raises(ValueError, match=r"quality floor 60.0 dB: the best PSNR reached was .* Lower --min-psnr"):
        strict.choose()


def test_resume_continues_from_the_stored_trials(tmp_path):
    first = make_search(tmp_path)
    first.run(trials=3, progress=False)
    assert first.finished() == 3  # (the sweep's fourth trial waits in the queue)
    again = make_search(tmp_path)  # same storage and study name: loads it
    assert again.finished() == 3
    again.run(trials=7, progress=False)
    assert [t.number for t in again.study.trials] == list(range(7))


def test_unreachable_storage_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="Cannot open the study storage 'postgresql://nobody@127.0.0.1:1/none'"):
        PlanSearch(synthetic_profile(), {16: synthetic_cost()}, SyntheticEvaluator(), storage="postgresql://nobody@127.0.0.1:1/none")


def test_two_workers_share_the_trial_budget(tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"  # a new database: the workers also race to create it
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(tmp_path.parent)!r})
        from sparsediff.search.optimize import PlanSearch, SearchSpace
        from tests.search_fixtures import SyntheticEvaluator, synthetic_cost, synthetic_profile
        s = PlanSearch(synthetic_profile(), {{16: synthetic_cost()}}, SyntheticEvaluator(), SearchSpace(block_sizes=(16,)),
                       storage={storage!r})
        s.run(trials=10, progress=False)
    """)
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    workers = [subprocess.Popen([sys.executable, "-c", script], cwd=root) for _ in range(2)]
    assert [w.wait(timeout=120) for w in workers] == [0, 0]
    study = optuna.load_study(study_name=make_search(tmp_path).study_name, storage=storage)
    done = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(done) == 10
    assert len({t.number for t in done}) == 10


def test_search_on_a_tiny_wan_pipeline(tmp_path, monkeypatch):
    """End to end on real diffusers parts: profile -> search (measured costs, PSNR vs dense) -> plan -> accelerate."""
    import torch

    import sparsediff
    from sparsediff.plan import SparsePlan
    from sparsediff.search.quality import PipelineEvaluator
    from tests import pipeline_factories

    monkeypatch.setenv("SPARSEDIFF_CACHE_DIR", str(tmp_path / "cache"))
    pipe, call_kwargs = pipeline_factories.wan()
    calls = [dict(call_kwargs(), seed=0)]
    prof = sparsediff.profile(pipe, [call_kwargs()], candidates=["full", "skip", "diagonal_w1", "vertical_stripe_f1"],
                              block_size=8, progress=False)
    out = tmp_path / "plan.json"
    plan, summary = sparsediff.search_plan(pipe, prof, calls, out=out, min_psnr=20.0, trials=4, backend="torch",
                                      progress=False, return_summary=True)
    assert out.is_file() and (tmp_path / "search_report.png").is_file()
    assert summary["trials"] == 4 and summary["chosen"]["psnr"] >= 20.0
    loaded = SparsePlan.load(out)
    assert loaded == plan and loaded.search["psnr"] == summary["chosen"]["psnr"]
    # measured again, the chosen plan meets its floor
    from sparsediff.pipelines.adapter import adapter_for

    evaluator = PipelineEvaluator(pipe, calls, apply=lambda p, pl: sparsediff.accelerate(p, pl, backend="torch"),
                                  adapter=adapter_for(pipe))
    again = evaluator(loaded, lambda step, value: None)
    assert again.psnr >= 20.0
    assert abs(again.psnr - summary["chosen"]["psnr"]) < 1e-6  # deterministic: same seeds, same kernels
    # several calls make one figure as the video adapter combines them: the PSNR of all their frames together, which
    # a worse call pulls below the mean of the calls' dB values; a study and its validations are named after it
    from sparsediff.metrics import pooled_psnr

    assert summary["study"].endswith("-pooled")
    two = PipelineEvaluator(pipe, [*calls, dict(calls[0], seed=1)], apply=evaluator.apply, adapter=adapter_for(pipe))
    both = two(loaded, lambda step, value: None)
    assert len(both.call_psnr) == 2 and both.call_psnr[0] == again.psnr  # the same call, seeds and kernels
    assert both.psnr == pooled_psnr(both.call_psnr) < max(both.call_psnr)
    assert both.psnr <= sum(both.call_psnr) / 2 and two.combined == "pooled" and two.key != evaluator.key
    with sparsediff.accelerate(pipe, loaded, backend="torch"):
        frames = pipe(**call_kwargs(output_type="np")).frames
    assert torch.isfinite(torch.as_tensor(frames)).all()
    with pytest.raises(ValueError, match=r"validation calls need the calibration's num_inference_steps \['3'\]; got \['5'\]"):
        sparsediff.search_plan(pipe, prof, calls, out=tmp_path / "other" / "plan.json", trials=1, progress=False,
                          validation_calls=[dict(calls[0], num_inference_steps=5)])
    assert not (tmp_path / "other").exists()
    # nothing the user had is overwritten without force
    with pytest.raises(ValueError, match="already exists; pass force=True"):
        sparsediff.search_plan(pipe, prof, calls, out=out, trials=4, progress=False)


def test_search_refuses_a_foreign_profile(tmp_path):
    import sparsediff
    from tests import pipeline_factories

    pipe, call_kwargs = pipeline_factories.wan()
    with pytest.raises(ValueError, match="recorded on another model"):
        sparsediff.search_plan(pipe, synthetic_profile(), [call_kwargs()], out=tmp_path / "p.json", trials=1, progress=False)
    with pytest.raises(ValueError, match="is not a profile directory"):
        sparsediff.search_plan(pipe, str(tmp_path), [call_kwargs()], out=tmp_path / "p.json", trials=1, progress=False)


def test_cli_profile_then_search(tmp_path, capsys, monkeypatch):
    import json

    from sparsediff.cli import main
    from sparsediff.plan import SparsePlan
    from tests import pipeline_factories

    monkeypatch.setenv("SPARSEDIFF_CACHE_DIR", str(tmp_path / "cache"))
    pipe, _ = pipeline_factories.wan_with_text_encoder()
    pipe.save_pretrained(tmp_path / "wan-tiny")
    model = str(tmp_path / "wan-tiny")
    sizes = ["--height", "64", "--width", "64", "--frames", "9"]
    assert main(["profile", "--model", model, "--steps", "3", *sizes, "--out", str(tmp_path / "prof"),
                 "--candidates", "full,skip,diagonal_w1", "--block-size", "8", "--json"]) == 0
    capsys.readouterr()
    plan_path = tmp_path / "plans" / "plan.json"
    args = ["search", "--model", model, "--profile", str(tmp_path / "prof"), "--out", str(plan_path),
            "--trials", "3", "--min-psnr", "15", "--backend", "torch", "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["trials"] == 3 and summary["chosen"]["psnr"] >= 15
    assert SparsePlan.load(plan_path).search["trial"] == summary["chosen"]["number"]
    assert (tmp_path / "plans" / "search_report.png").is_file() and (tmp_path / "plans" / "plan.optuna.db").is_file()
    before = plan_path.read_text()
    assert main(args) == 2  # exists: refused, file untouched
    assert "pass --force" in capsys.readouterr().err and plan_path.read_text() == before
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a held-out prompt\n")
    assert main([*args, "--force", "--validate-prompts", str(held_out)]) == 0  # resumes the study, then validates
    summary = json.loads(capsys.readouterr().out)
    validation = summary["validation"]
    assert validation["calls"] == 1 and validation["psnr"] >= 15 and validation["tried"][-1] == summary["chosen"]["number"]
    assert SparsePlan.load(plan_path).search["validation"] == validation
    assert main([*args, "--force", "--validate-prompts", str(held_out), "--validate-min-psnr", "12"]) == 0  # its own floor
    assert json.loads(capsys.readouterr().out)["validation"]["min_psnr"] == 12.0
    kept = plan_path.read_text()
    assert main([*args, "--force", "--validate-min-psnr", "12"]) == 2 and plan_path.read_text() == kept  # refused first
    assert "needs validation_calls (--validate-prompts)" in capsys.readouterr().err
    assert main([*args, "--force", "--ranges", "3", "--allowance", "0.02,0.2"]) == 0  # a range per step: its own study
    summary = json.loads(capsys.readouterr().out)
    assert summary["study"].endswith("-r3-a0.02-0.2-pooled") and summary["trials"] == 3
    assert len(SparsePlan.load(plan_path).ranges) == 3 and 0.02 <= summary["chosen"]["params"]["allowance"] <= 0.2
    assert main([*args, "--force", "--ranges", "4"]) == 2
    assert "cannot have 4 step ranges in a 3-step run; give between 1 and 3 (--ranges)" in capsys.readouterr().err
    assert main([*args, "--force", "--validate-prompts", str(tmp_path / "missing.txt")]) == 2
    assert "is not a file of prompts" in capsys.readouterr().err
    assert main(["search", "--model", model, "--profile", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.json")]) == 2
    assert "is not a profile directory" in capsys.readouterr().err


def test_a_trial_another_worker_finished_meanwhile_is_left_to_it(tmp_path):
    """SQLite cannot lock rows, so two workers can pop the same queued trial: when the other one finishes it first,
    this worker's writes fail; the search keeps the other's result and goes on instead of crashing."""
    search = make_search(tmp_path)
    other = optuna.load_study(study_name=search.study_name, storage=search.storage)
    real = search.objective
    lines = []

    def raced(trial):
        if trial.number == 0:  # the other worker completes trial 0 while this one runs it
            other.tell(trial.number, [1.0, 20.0])
        return real(trial)

    search.objective = raced
    search.run(trials=3, progress=False, log=lines.append)
    assert "trial 0: finished by another worker meanwhile; its result stands" in lines
    states = {t.number: t.state for t in search.study.trials}
    assert states[0] == optuna.trial.TrialState.COMPLETE and search.study.trials[0].values == [1.0, 20.0]
    assert sum(s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for s in states.values()) == 3


class _Capped(SyntheticEvaluator):
    """A quality measure that saturates, as token agreement does at 1.0: every plan at or above `cap` ties."""

    def __init__(self, cap: float):
        self.cap = cap

    def __call__(self, plan, report):
        inner = super().__call__(plan, lambda step, value: report(step, min(value, self.cap)))
        return type(inner)(psnr=min(inner.psnr, self.cap), seconds=inner.seconds, step_psnr=inner.step_psnr)


def test_a_saturating_measure_falls_back_to_slower_tied_trials_when_the_front_fails_held_out(tmp_path):
    """Tied at the cap, only the fastest tied trial is on the Pareto front; when it fails the held-out calls the
    next fastest trial meeting the floor is tried, not an error."""
    search = PlanSearch(synthetic_profile(), {16: synthetic_cost()}, _Capped(36.0), SearchSpace(block_sizes=(16,)),
                        min_psnr=30.0, storage=f"sqlite:///{tmp_path / 'study.db'}")
    search.run(trials=16, progress=False)
    front = {o.number for o in search.pareto_front()}
    meeting = sorted((o for o in search.outcomes() if o.state == "complete" and o.psnr >= 30.0), key=lambda o: o.predicted_ms)
    assert len([o for o in meeting if o.number in front]) < len(meeting)  # tied trials off the front exist
    held_out = HeldOutEvaluator(penalty=20.0)
    chosen, plan = search.choose(validator=held_out, log=lambda line: None)
    tried = plan.search["validation"]["tried"]
    assert tried == [o.number for o in meeting][: len(tried)]  # fastest first, off the front too
    assert plan.search["validation"]["psnr"] >= 30.0 and tried[-1] == chosen.number
    assert chosen.number not in front  # the front's trials failed there; a tied slower one held the floor
