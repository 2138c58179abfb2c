"""Held-out evaluation of a text diffusion pipeline on the procedural tasks: exact-match accuracy, token agreement
with the dense run on the same seeds, and wall time, dense and under a plan side by side in one process."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .tasks import ANSWER_SLOTS, EVAL_SEED, KINDS, Task, answer_correct, task_set


def call_arguments(steps: int = ANSWER_SLOTS) -> dict:
    """The pipeline arguments every evaluation uses: one block of `ANSWER_SLOTS` answer slots, one token per step."""
    return dict(gen_length=ANSWER_SLOTS, block_length=ANSWER_SLOTS, num_inference_steps=steps, use_chat_template=False)


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
