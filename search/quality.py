"""Quality of a plan end to end: the pipeline run under the plan against the dense run, scored by the model's adapter.

(Per-head quality, the relative L2 error of each candidate per step, layer and head, is in the profile:
`sparsediff.search.profile.AttentionProfile.errors`.)

`PipelineEvaluator` runs a pipeline's calibration calls once dense, keeping every step's output and the final
output, then runs them again under a candidate plan with the same seeds and compares them with the adapter's quality
measure (PSNR for video): after each step (reported as the run goes, so a bad plan can stop early) and at the end,
where the calls' qualities make one figure as the adapter combines them (`Adapter.combine`: for video the PSNR of all
calls' frames together, which a prompt the plan spoils pulls down more than a mean of dB values would).
How a call runs and what it returns is the adapter's (`sparsediff.pipelines.adapter.Adapter.run`/`quality`), so the
search knows no model family.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from sparsediff.plan import SparsePlan

from .optimize import Evaluation


class PipelineEvaluator:
    """End-to-end quality of plans on a diffusers pipeline.

    Args:
        pipe: the pipeline (not accelerated).
        calls (Sequence[dict]): keyword arguments of each calibration call (prompt or embeddings, sizes,
            `num_inference_steps`); each may hold `seed` (default 0) for its generator. `generator` and
            `output_type` are set by the evaluator (a fresh seeded generator per run) and dropped here.
        apply (Callable): `apply(pipe, plan)` installs a plan and returns a handle with `.remove()`
            (`sparsediff.accelerate` with the backend bound; injected so the search stays below the public API).
        adapter: the model's adapter: `adapter.run(pipe, call, on_step)` runs one call and `adapter.quality(x, ref)`
            scores an output against the dense one.
        output_type (str, defaults to "np"): the final output compared: decoded frames ("np") or "latent"
            (skips the VAE, for quick checks on models whose VAE is not the point).
        warmup (bool, defaults to True): run the first call once untimed before the dense reference runs (False for a
            second evaluator on a pipeline that has already run, such as held-out validation calls).

    `key` names the calls (a digest of their arguments, and of how their qualities combine when not by their mean):
    results stored for one set of calls, or combined another way, are not reused. `combined` names that way.
    """

    def __init__(
        self, pipe: Any, calls: Sequence[dict[str, Any]], apply: Callable[[Any, SparsePlan], Any], adapter: Any,
        output_type: str = "np", warmup: bool = True,
    ):
        if not calls:
            raise ValueError("PipelineEvaluator needs at least one calibration call (a dict of pipeline arguments).")
        steps = {c.get("num_inference_steps") for c in calls}
        if len(steps) != 1 or None in steps:
            raise ValueError(f"Every calibration call needs the same num_inference_steps; got {sorted(map(str, steps))}.")
        self.calls = [{k: v for k, v in c.items() if k not in ("generator", "output_type")} for c in calls]
        self.pipe, self.apply, self.adapter, self.output_type = pipe, apply, adapter, output_type
        self.num_steps = int(steps.pop())
        self.combined = getattr(adapter, "combined", "mean")
        named = [self.calls, output_type] + ([self.combined] if self.combined != "mean" else [])  # mean: the keys before
        self.key = hashlib.sha256(json.dumps(named, sort_keys=True, default=repr).encode()).hexdigest()[:8]
        if warmup:
            self._run(self.calls[0])  # the first run pays one-off costs the timed runs must not
        start = time.perf_counter()
        self.reference = [self._run(c) for c in self.calls]  # (per-step latents, final output) per call
        self.dense_seconds = time.perf_counter() - start

    def _run(self, call: dict[str, Any], on_step: Callable[[int, torch.Tensor], None] | None = None):
        return self.adapter.run(self.pipe, {**call, "output_type": self.output_type}, on_step)

    def __call__(self, plan: SparsePlan, report: Callable[[int, float], None]) -> Evaluation:
        handle = self.apply(self.pipe, plan)
        try:
            start = time.perf_counter()
            # a block-wise text pipeline runs its steps once per block, and may end a block early: steps are those
            # the dense run took, and a step the dense run did not take is not compared
            finals, per_step = [], [math.inf] * max(self.num_steps, *(len(steps) for steps, _ in self.reference))
            for call, (ref_steps, ref_final) in zip(self.calls, self.reference):

                def on_step(i, latents, ref_steps=ref_steps):
                    if i >= len(ref_steps):
                        return
                    per_step[i] = min(per_step[i], self.adapter.quality(latents, ref_steps[i]))
                    if self.adapter.prune_on_steps:
                        report(i, per_step[i])

                _, final = self._run(call, on_step)
                finals.append(self.adapter.quality(final, ref_final))
            seconds = time.perf_counter() - start
        finally:
            handle.remove()
        return Evaluation(psnr=self.adapter.combine(finals), seconds=seconds, step_psnr=per_step, call_psnr=finals)
