"""Quality of a plan end to end: the pipeline run under the plan against the dense run (PSNR).

(Per-head quality, the relative L2 error of each candidate per step, layer and head, is in the profile:
`sparsediff.search.profile.AttentionProfile.errors`.)

`PipelineEvaluator` runs a pipeline's calibration calls once dense, keeping every step's latents and the final
output, then runs them again under a candidate plan with the same seeds and compares: PSNR of the latents after
each step (reported as the run goes, so a bad plan can stop early) and PSNR of the final output.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from sparsediff.plan import SparsePlan

from .optimize import PSNR_CAP, Evaluation


def psnr(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB, the peak being the reference's data range; capped for identical inputs."""
    x, reference = torch.as_tensor(x).double(), torch.as_tensor(reference).double()
    if x.shape != reference.shape:
        raise ValueError(f"psnr needs equal shapes; got {tuple(x.shape)} and {tuple(reference.shape)}.")
    mse = float((x - reference).pow(2).mean())
    peak = float(reference.max() - reference.min()) or 1.0
    if mse == 0.0:
        return PSNR_CAP
    return min(PSNR_CAP, 10 * math.log10(peak**2 / mse))


class PipelineEvaluator:
    """End-to-end quality of plans on a diffusers pipeline.

    Args:
        pipe: the pipeline (not accelerated).
        calls (Sequence[dict]): keyword arguments of each calibration call (prompt or embeddings, sizes,
            `num_inference_steps`); each may hold `seed` (default 0) for its generator. `generator` and
            `output_type` are set by the evaluator (a fresh seeded generator per run, "np" frames) and dropped here.
        apply (Callable): `apply(pipe, plan)` installs a plan and returns a handle with `.remove()`
            (`sparsediff.accelerate` with the backend bound; injected so the search stays below the public API).
        output_type (str, defaults to "np"): the final output compared: decoded frames ("np") or "latent"
            (skips the VAE, for quick checks on models whose VAE is not the point).
        warmup (bool, defaults to True): run the first call once untimed before the dense reference runs (False for a
            second evaluator on a pipeline that has already run, such as held-out validation calls).

    `key` names the calls (a digest of their arguments): results stored for one set of calls are not reused for another.
    """

    def __init__(
        self, pipe: Any, calls: Sequence[dict[str, Any]], apply: Callable[[Any, SparsePlan], Any], output_type: str = "np",
        warmup: bool = True,
    ):
        if not calls:
            raise ValueError("PipelineEvaluator needs at least one calibration call (a dict of pipeline arguments).")
        steps = {c.get("num_inference_steps") for c in calls}
        if len(steps) != 1 or None in steps:
            raise ValueError(f"Every calibration call needs the same num_inference_steps; got {sorted(map(str, steps))}.")
        self.calls = [{k: v for k, v in c.items() if k not in ("generator", "output_type")} for c in calls]
        self.pipe, self.apply, self.output_type = pipe, apply, output_type
        self.num_steps = int(steps.pop())
        self.key = hashlib.sha256(json.dumps([self.calls, output_type], sort_keys=True, default=repr).encode()).hexdigest()[:8]
        if warmup:
            self._run(self.calls[0])  # the first run pays one-off costs the timed runs must not
        start = time.perf_counter()
        self.reference = [self._run(c) for c in self.calls]  # (per-step latents, final output) per call
        self.dense_seconds = time.perf_counter() - start

    def _run(self, call: dict[str, Any], on_step: Callable[[int, torch.Tensor], None] | None = None):
        kwargs = copy.copy(call)
        seed = kwargs.pop("seed", 0)
        steps: list[torch.Tensor] = []

        def callback(pipe, i, t, tensors):
            latents = tensors["latents"].detach().float().cpu()
            steps.append(latents)
            if on_step is not None:
                on_step(i, latents)
            return tensors

        out = self.pipe(
            **kwargs,
            generator=torch.Generator().manual_seed(seed),
            output_type=self.output_type,
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=["latents"],
        )
        frames = out.frames if hasattr(out, "frames") else out[0]
        return steps, torch.as_tensor(frames).float().cpu()

    def __call__(self, plan: SparsePlan, report: Callable[[int, float], None]) -> Evaluation:
        handle = self.apply(self.pipe, plan)
        try:
            start = time.perf_counter()
            finals, per_step = [], [math.inf] * self.num_steps
            for call, (ref_steps, ref_final) in zip(self.calls, self.reference):

                def on_step(i, latents, ref_steps=ref_steps):
                    per_step[i] = min(per_step[i], psnr(latents, ref_steps[i]))
                    report(i, per_step[i])

                _, final = self._run(call, on_step)
                finals.append(psnr(final, ref_final))
            seconds = time.perf_counter() - start
        finally:
            handle.remove()
        return Evaluation(psnr=sum(finals) / len(finals), seconds=seconds, step_psnr=per_step)
