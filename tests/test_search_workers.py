"""Search workers on a real PostgreSQL server: one study, one trial budget, no trial run twice, a killed worker's
trial retried, and the same choice as one worker over the same trials.

The test starts its own server on 127.0.0.1 (`initdb` + `pg_ctl` in a temporary folder, as the `postgres` user when
run as root) and skips, saying why, only where the server binaries are missing (`.ci/run` installs them as root).
"""

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import optuna
import pytest

from sparsediff.search.optimize import PlanSearch, SearchSpace
from tests.search_fixtures import SyntheticEvaluator, synthetic_cost, synthetic_profile

ROOT = Path(__file__).resolve().parents[1]
DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _server_binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path and shutil.which("initdb") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server on the loopback address; yields a factory of fresh database URLs."""
    pytest.importorskip("psycopg2", reason="psycopg2 is missing: install the test extras, pip install -e '.[test]'")
    bindir = _server_binaries()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: `apt-get install postgresql` "
                    "(`.ci/run` does it when run as root)")
    as_user = []
    folder = Path(tempfile.mkdtemp(prefix="sparsediff-pg-"))
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no `postgres` user to run the PostgreSQL server as")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", _free_port()
    subprocess.run([*as_user, bindir / "initdb", "-D", data, "-A", "trust", "-U", "sparsediff"], check=True,
                   capture_output=True)
    subprocess.run([*as_user, bindir / "pg_ctl", "-D", data, "-l", folder / "server.log", "-w", "-o",
                    f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    import psycopg2

    names = iter(range(1000))

    def new_database() -> str:
        name = f"search{next(names)}"
        connection = psycopg2.connect(host="127.0.0.1", port=port, user="sparsediff", dbname="postgres")
        connection.autocommit = True
        connection.cursor().execute(f"CREATE DATABASE {name}")
        connection.close()
        return f"postgresql://sparsediff@127.0.0.1:{port}/{name}"

    try:
        yield new_database
    finally:
        subprocess.run([*as_user, bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


WORKER = """
import os, sys, time
from pathlib import Path
from sparsediff.search.optimize import PlanSearch, SearchSpace
from tests.search_fixtures import SyntheticEvaluator, synthetic_cost, synthetic_profile

class Evaluator(SyntheticEvaluator):
    def __call__(self, plan, report):  # one file per evaluation, named by this worker and the plan
        Path({runs!r}, f"{{os.getpid()}}-{{time.monotonic_ns()}}").write_text(str(plan.search) + repr(plan.ranges))
        time.sleep({delay})
        return super().__call__(plan, report)

s = PlanSearch(synthetic_profile(), {{16: synthetic_cost()}}, Evaluator(), SearchSpace(block_sizes=(16,)),
               storage={storage!r}, heartbeat_interval=1, grace_period=3)
s.run(trials={trials}, progress=False)
"""


def start_worker(storage: str, trials: int, runs: Path, delay: float) -> subprocess.Popen:
    script = textwrap.dedent(WORKER.format(storage=storage, trials=trials, runs=str(runs), delay=delay))
    return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)


def search_on(storage: str) -> PlanSearch:
    return PlanSearch(synthetic_profile(), {16: synthetic_cost()}, SyntheticEvaluator(), SearchSpace(block_sizes=(16,)),
                      storage=storage, heartbeat_interval=1, grace_period=3)


def plan_without_search(plan) -> dict:
    return {k: v for k, v in plan.to_dict().items() if k != "search"}


def test_two_workers_share_the_budget_run_each_trial_once_and_choose_as_one_worker_would(postgres, tmp_path):
    storage, runs = postgres(), tmp_path / "runs"
    runs.mkdir()
    workers = [start_worker(storage, trials=12, runs=runs, delay=0.2) for _ in range(2)]
    assert [w.wait(timeout=180) for w in workers] == [0, 0]
    search = search_on(storage)
    done = search.study.get_trials(states=DONE)
    assert len(done) == 12 and len({t.number for t in done}) == 12  # the budget, exactly
    assert len(list(runs.iterdir())) == 12  # every evaluation belongs to one done trial: none ran twice
    assert len({t.user_attrs["worker"] for t in done}) == 2  # both workers took part
    chosen, plan = search.choose()

    # one worker over the same trials, in the same order, on SQLite: the same choice
    single = search_on(f"sqlite:///{tmp_path / 'single.db'}")
    for trial in sorted(done, key=lambda t: t.number)[SearchSpace().sweep:]:  # the first ones, the sweep, are enqueued already
        single.study.enqueue_trial(trial.params)
    single.run(trials=12, progress=False)
    assert [t.params for t in single.study.get_trials(states=DONE)] == [t.params for t in sorted(done, key=lambda t: t.number)]
    single_chosen, single_plan = single.choose()
    assert single_plan.search["params"] == plan.search["params"]
    assert plan_without_search(single_plan) == plan_without_search(plan)


def test_a_worker_killed_mid_trial_leaves_the_study_usable_and_its_trial_is_retried(postgres, tmp_path):
    storage, runs = postgres(), tmp_path / "runs"
    runs.mkdir()
    victim = start_worker(storage, trials=8, runs=runs, delay=2.0)
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(f"{victim.pid}-") for p in runs.iterdir()):  # the victim is inside a trial
        assert time.monotonic() < deadline and victim.poll() is None, "the first worker never started a trial"
        time.sleep(0.05)
    survivor = start_worker(storage, trials=8, runs=runs, delay=0.2)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=10) == -signal.SIGKILL
    assert survivor.wait(timeout=180) == 0  # the survivor went on, and waited out the stale trial

    study = search_on(storage).study
    done = study.get_trials(states=DONE)
    assert len(done) == 8 and len({t.number for t in done}) == 8
    failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    killed = [t for t in failed if "reason" not in t.user_attrs]  # not a budget give-back
    assert len(killed) == 1, [(t.number, t.user_attrs) for t in failed]
    retried = [t for t in done if t.system_attrs.get("failed_trial") == killed[0].number]
    assert len(retried) == 1 and retried[0].params == killed[0].params  # retried once, with its parameters
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING))
    search_on(storage).choose()  # usable: the choice works on it


def test_cli_search_with_two_workers_on_postgresql(postgres, tmp_path, capsys, monkeypatch):
    """`sparsediff search --workers 2 --storage postgresql://...` on a saved tiny Wan: one study, the budget shared
    by two processes, one plan."""
    import json

    from sparsediff.cli import main
    from sparsediff.plan import SparsePlan
    from tests import pipeline_factories

    monkeypatch.setenv("SPARSEDIFF_CACHE_DIR", str(tmp_path / "cache"))
    pipe, _ = pipeline_factories.wan_with_text_encoder()
    pipe.save_pretrained(tmp_path / "wan-tiny")
    model, storage = str(tmp_path / "wan-tiny"), postgres()
    assert main(["profile", "--model", model, "--steps", "3", "--height", "64", "--width", "64", "--frames", "9",
                 "--out", str(tmp_path / "prof"), "--candidates", "full,skip,diagonal_w1", "--block-size", "8", "--json"]) == 0
    capsys.readouterr()
    assert main(["search", "--model", model, "--profile", str(tmp_path / "prof"), "--out", str(tmp_path / "plan.json"),
                 "--trials", "40", "--min-psnr", "15", "--backend", "torch", "--storage", storage, "--workers", "2",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    study = optuna.load_study(study_name=summary["study"], storage=storage.replace("postgresql://", "postgresql+psycopg2://"))
    done = study.get_trials(states=DONE)
    assert summary["trials"] == len(done) == 40
    assert len({t.user_attrs["worker"] for t in done}) == 2
    assert SparsePlan.load(tmp_path / "plan.json").search["trial"] == summary["chosen"]["number"]
