"""Held-out evaluation of a text diffusion pipeline on the procedural tasks: exact-match accuracy, token agreement
with the dense run on the same seeds, and wall time, dense and under a plan side by side in one process."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .tasks import ANSWER_SLOTS, EVAL_SEED, KINDS, Task, answer_correct, task_set


def call_arguments(steps: int = ANSWER_SLOTS) -> dict:
    """The pipeline arguments every evaluation uses: one block of `ANSWER_SLOTS` answer slots, one token per step,
    every step run (no commits above a confidence threshold, no early stop at the end token: dense and sparse runs
    do the same work), and no editing: `LLaDA2Pipeline` by default (`editing_threshold=0.5`) re-writes committed
    tokens wherever the model predicts another one with confidence > 0.5 at a *visible* position, which LLaDA2.1's
    editing objective trains; the embedded model is trained with the LLaDA loss on masked positions only, so its
    predictions at visible positions are untrained and editing turned right answers into wrong ones (a checkpoint
    answered 8 of 8 held-out lookups and needles at 256 tokens without editing, 2 of 8 with it)."""
    return dict(gen_length=ANSWER_SLOTS, block_length=ANSWER_SLOTS, num_inference_steps=steps, threshold=1.0,
                eos_early_stop=False, editing_threshold=-1.0)


def held_out_tasks(n: int, length: int, kinds: tuple[str, ...] = KINDS) -> list[Task]:
    """`n` held-out tasks of `length` tokens (seeded apart from training)."""
    return task_set(n, length, EVAL_SEED + length, kinds)


@dataclass
class TextRun:
    """One pass over a task set under one plan."""

    texts: list[str]
    sequences: torch.Tensor
    seconds: float
    stats: dict = field(default_factory=dict)

    def accuracy(self, tasks: list[Task]) -> float:
        return sum(answer_correct(t, task) for t, task in zip(self.texts, tasks)) / len(tasks)

    def accuracy_by_kind(self, tasks: list[Task]) -> dict[str, float]:
        out = {}
        for kind in dict.fromkeys(t.kind for t in tasks):
            pairs = [(t, task) for t, task in zip(self.texts, tasks) if task.kind == kind]
            out[kind] = sum(answer_correct(t, task) for t, task in pairs) / len(pairs)
        return out

    def agreement(self, reference: "TextRun") -> float:
        """Share of generated positions holding the same token as the reference run."""
        return float((self.sequences == reference.sequences).float().mean())


def run_tasks(pipe, tasks: list[Task], plan=None, backend: str | None = None, seed: int = 0, progress=None) -> TextRun:
    """Generate the answer of each task (one request each, so each is its own request for the plan's top-k
    selection and its time is that of one user's call) under `plan` ("dense", None, a path or a `SparsePlan`)."""
    from sparsediff.generate import generate_text

    texts, sequences, seconds, stats = [], [], 0.0, {}
    for task in tasks:
        start = time.perf_counter()
        result = generate_text(pipe, [task.prompt_text], plan, backend=backend, seed=seed, **call_arguments())
        seconds += time.perf_counter() - start
        texts += result.texts
        sequences.append(result.sequences)
        stats = result.stats
        if progress is not None:
            progress()
    return TextRun(texts, torch.cat(sequences), seconds, stats)


@dataclass
class TextDemoResult:
    """The text half of `sparsediff demo`: the embedded DLM dense vs its shipped plan on held-out tasks."""

    length: int
    tasks: int
    accuracy_dense: float
    accuracy_sparse: float
    agreement: float
    dense_seconds: float
    sparse_seconds: float
    density: float  # mean attention density of the calls that ran sparse
    dtype: str = "float32"  # the model's weights and activations (the plan was searched in float32)

    @property
    def speedup(self) -> float:
        return self.dense_seconds / self.sparse_seconds

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {**asdict(self), "speedup": self.speedup}

    def table(self) -> str:
        rows = [  # the correctness check first, then the speed it bought
            ("exact-match accuracy dense / sparse", f"{self.accuracy_dense:.0%} / {self.accuracy_sparse:.0%}"),
            ("token agreement sparse vs dense", f"{self.agreement:.3f}"),
            ("generation time dense", f"{self.dense_seconds:.1f} s"),
            ("generation time sparse", f"{self.sparse_seconds:.1f} s"),
            ("speedup", f"{self.speedup:.2f}x"),
            ("attention density of the sparse calls", f"{self.density:.3f}"),
        ]
        from sparsediff.render import aligned_rows

        return aligned_rows(rows)


def run_text_demo(num_tasks: int = 3, length: int = 4096, backend: str | None = None, seed: int = 0,
                  dtype: "str | torch.dtype | None" = None) -> TextDemoResult:
    """The embedded DLM dense and under its shipped plan on `num_tasks` held-out tasks (one of each kind in turn) of
    `length` tokens, in `dtype` (default float32); dense and sparse interleaved per task (the first of the pair
    alternating), after a warm-up."""
    from sparsediff.api import load_pipeline, resolve_plan

    pipe = load_pipeline("embedded", "cpu", kind="text", dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    plan = resolve_plan(pipe, "auto")
    if plan is None:
        raise ValueError("The embedded text model has no shipped plan; make one with `python samples/ship_embedded_text_plan.py --ship`.")
    tasks = held_out_tasks(num_tasks, length)
    run_tasks(pipe, tasks[:1], "dense", seed=seed)  # warm-up: one-off costs stay out of the timings
    dense, sparse = compare_plans(pipe, tasks, plan, backend, seed=seed)
    return TextDemoResult(length, len(tasks), dense.accuracy(tasks), sparse.accuracy(tasks), sparse.agreement(dense),
                          dense.seconds, sparse.seconds, sparse.stats["sparse_density"],
                          str(pipe.dtype).removeprefix("torch."))


def compare_plans(pipe, tasks: list[Task], plan, backend: str | None = None, seed: int = 0, progress=None) -> tuple[TextRun, TextRun]:
    """The dense run and the run under `plan` of the same tasks, one request each, dense and sparse interleaved per
    task (the first of the pair alternating, so a slow spell of the machine falls on both sides of the ratio). The
    sparse run's `stats["sparse_density"]` is the mean over its requests."""
    runs: dict[bool, list[TextRun]] = {False: [], True: []}
    for i, task in enumerate(tasks):
        for sparse_run in ((False, True) if i % 2 == 0 else (True, False)):
            runs[sparse_run].append(run_tasks(pipe, [task], plan if sparse_run else "dense", backend=backend, seed=seed))
            if progress is not None:
                progress()
    dense, sparse = (TextRun([t for r in runs[k] for t in r.texts], torch.cat([r.sequences for r in runs[k]]),
                             sum(r.seconds for r in runs[k])) for k in (False, True))
    densities = [r.stats["sparse_density"] for r in runs[True] if "sparse_density" in r.stats]
    sparse.stats = {"sparse_density": float(sum(densities) / len(densities)) if densities else 1.0}
    return dense, sparse
