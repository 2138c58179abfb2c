"""median_ms: round-robin rounds, the caller's thread count, figures in milliseconds."""

import time

import torch

from sparsediff.timing import median_ms


def test_rounds_are_round_robin_and_threads_are_the_callers():
    calls, threads = [], []

    def record(name):
        def fn():
            calls.append(name)
            threads.append(torch.get_num_threads())
        return fn

    median_ms({"a": record("a"), "b": record("b")}, repeats=3)
    # every sample (warm-up calls and the timed one) of "a" comes before the same round's samples of "b"
    per_sample = len(calls) // 6
    assert calls == (["a"] * per_sample + ["b"] * per_sample) * 3
    assert set(threads) == {torch.get_num_threads()}


def test_figures_are_milliseconds():
    times = median_ms({"sleep": lambda: time.sleep(0.02), "nothing": lambda: None}, repeats=2)
    assert 19.0 <= times["sleep"] < 200.0  # a sleep of 20 ms, on a machine that may be busy
    assert 0.0 < times["nothing"] < 1.0
