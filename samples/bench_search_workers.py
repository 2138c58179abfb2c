"""How much sooner does a plan search finish with 2 worker processes than with 1, for the same trial budget?

One randomly initialised Wan pipeline (built in code, as in `bench_search_wan.py`, smaller) is profiled once; then
the search runs on fresh studies with the same budget: once in one process, once in N processes sharing the
study (`search_plan(..., choose=False)` in all but one, which chooses). The N-worker study is seeded with the first
run's trials (enqueued in order), so both runs evaluate the same plans and prune the same ones. Each process gets
cores / workers torch threads; the timed runs include each worker's start and its dense reference run. A last
1-worker run shows how much a warmer machine alone changes. The storage is an SQLite file per run, or `--storage`: a
scratch PostgreSQL database whose studies are deleted before each run. Printed first: every run holds the budget
exactly, ran each trial once, evaluated the same plans and chose the same one.

    python samples/bench_search_workers.py --trials 8 --workers 2
    python samples/bench_search_workers.py --storage postgresql://user@127.0.0.1:5432/search --json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import torch

from bench_search_wan import build_pipeline

CANDIDATES = ["full", "skip", "diagonal_w0.5", "diagonal_w1", "multi_diagonal_w16", "vertical_stripe_f1"]


def calibration_call(args) -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(prompt_embeds=torch.randn(1, 16, 32, generator=g), negative_prompt_embeds=torch.randn(1, 16, 32, generator=g),
                height=args.size, width=args.size, num_frames=args.frames, num_inference_steps=args.steps, guidance_scale=5.0)


def worker(args, profile_dir: str, storage: str, choose: bool, threads: int, out: "mp.Queue") -> None:
    import sparsediff

    torch.set_num_threads(threads)
    pipe = build_pipeline(args.layers, args.heads, args.head_dim)
    result = sparsediff.search_plan(pipe, profile_dir, [calibration_call(args)], trials=args.trials, storage=storage,
                                    backend="torch", min_psnr=args.min_psnr, progress=False, output_type="latent",
                                    return_summary=True, choose=choose)
    out.put(result[1] if choose else None)


def timed_search(args, profile_dir: str, storage: str, workers: int) -> tuple[float, dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // workers)
    start = time.perf_counter()
    procs = [ctx.Process(target=worker, args=(args, profile_dir, storage, i == 0, threads, queue)) for i in range(workers)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    seconds = time.perf_counter() - start
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return seconds, next(r for r in results if r is not None)


def done_trials(storage: str, study: str) -> list:
    import optuna

    from sparsediff.search.optimize import _driver_url

    done = optuna.load_study(study_name=study, storage=_driver_url(storage)).get_trials(
        states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    return sorted(done, key=lambda t: t.number)


def seed_study(prof, cost, args, storage: str, trials: list) -> None:
    """Create the study as the search would (same name, the cautious first trial) and queue `trials`' parameters."""
    import types

    from sparsediff.search.optimize import PlanSearch, SearchSpace

    search = PlanSearch(prof, {16: cost}, types.SimpleNamespace(num_steps=args.steps), SearchSpace(block_sizes=(16,)),
                        min_psnr=args.min_psnr, storage=storage)
    for trial in trials[1:]:  # trial 0 is the cautious start, queued by the study's creator
        search.study.enqueue_trial(trial.params)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--min-psnr", type=float, default=10.0)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--frames", type=int, default=9, help="pixel frames (9 -> 3 latent frames)")
    p.add_argument("--size", type=int, default=256, help="pixel height and width (256 -> 32 latent -> 16 x 16 tokens)")
    p.add_argument("--storage", help="a PostgreSQL URL of an empty database (default: SQLite files in a temporary folder)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    import sparsediff

    tmp = Path(tempfile.mkdtemp(prefix="sparsediff-bench-search-"))
    os.environ.setdefault("SPARSEDIFF_CACHE_DIR", str(tmp / "cache"))
    pipe = build_pipeline(args.layers, args.heads, args.head_dim)
    prof = sparsediff.profile(pipe, [calibration_call(args)], out=tmp / "profile", candidates=CANDIDATES, block_size=16,
                              progress=False)
    from sparsediff.search.cost import CostModel

    # measured once, before the timed runs, as `search_plan` would (the cache then serves every worker of both runs)
    cost = CostModel.load_or_measure(prof.layout, prof.model.num_heads, prof.model.head_dim, prof.candidates, block_size=16,
                              backend="torch", dtype=torch.float32, device="cpu")
    rows, first = {}, None
    # 1 worker, N workers, then 1 worker again: a first run warmer or colder than the others shows as a gap
    for run, n in enumerate((1, args.workers, 1)):
        # a fresh study per run: a new SQLite file, or a study name of its own on the server (the seed differs)
        storage = args.storage or f"sqlite:///{tmp / f'study_{run}.db'}"
        if args.storage:
            import optuna

            from sparsediff.search.optimize import _driver_url

            for name in optuna.get_all_study_names(_driver_url(storage)):
                optuna.delete_study(study_name=name, storage=_driver_url(storage))
        if first is not None:
            seed_study(prof, cost, args, storage, first)
        seconds, summary = timed_search(args, str(tmp / "profile"), storage, n)
        done = done_trials(storage, summary["study"])
        assert len(done) == args.trials and len({t.number for t in done}) == args.trials, len(done)
        first = first or done
        assert [t.params for t in done] == [t.params for t in first]  # the same plans evaluated
        rows[f"{n} worker{'s' if n > 1 else ''} (run {run + 1})"] = {"workers": n, "seconds": seconds, "done": len(done), "pruned": sum(t.state.name == "PRUNED" for t in done),
                   "workers_seen": len({t.user_attrs.get("worker") for t in done}), "chosen_params": summary["chosen"]["params"]}
    base = next(iter(rows.values()))
    same = all(r["chosen_params"] == base["chosen_params"] for r in rows.values())
    print(f"correctness: every run holds {args.trials} done trials, each run once, the same plans "
          f"(workers seen: {', '.join(str(r['workers_seen']) for r in rows.values())}); same plan chosen: {same}")
    if args.json:
        print(json.dumps({"trials": args.trials, "cpu_count": os.cpu_count(), "runs": rows}, indent=1))
        return
    one = min(r["seconds"] for r in rows.values() if r["workers"] == 1)
    print(f"{'run':>20} {'trials':>6} {'pruned':>6} {'search s':>9} {'vs best 1-worker':>16}")
    for name, r in rows.items():
        print(f"{name:>20} {r['done']:>6} {r['pruned']:>6} {r['seconds']:>9.1f} {one / r['seconds']:>16.2f}")


if __name__ == "__main__":
    main()
