"""The Optuna search: plans from profile + cost model, resume, shared workers, the choice and its errors."""

import subprocess
import sys
import textwrap

import optuna
import pytest

from sparsediff.search.optimize import PlanSearch, SearchSpace, assign_heads, build_plan, predicted_time
from tests.search_fixtures import CANDIDATES, LAYOUT, SyntheticEvaluator, synthetic_cost, synthetic_profile


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


def test_pruned_trials_are_recorded(tmp_path):
    search = make_search(tmp_path, min_psnr=45.0)  # only near-dense plans survive
    search.run(trials=8, progress=False)
    states = {t.state for t in search.study.trials}
    assert optuna.trial.TrialState.PRUNED in states
    pruned = [t for t in search.study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert all("pruned_at_step" in t.user_attrs for t in pruned)


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
    assert len(first.study.trials) == 3
    again = make_search(tmp_path)  # same storage and study name: loads it
    assert len(again.study.trials) == 3
    again.run(trials=7, progress=False)
    assert [t.number for t in again.study.trials] == list(range(7))


def test_unreachable_storage_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="Cannot open the study storage 'postgresql://nobody@127.0.0.1:1/none'"):
        PlanSearch(synthetic_profile(), {16: synthetic_cost()}, SyntheticEvaluator(), storage="postgresql://nobody@127.0.0.1:1/none")


def test_two_workers_share_the_trial_budget(tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    make_search(tmp_path).study  # create the study once, as `sparsediff search` does before workers start
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
