"""A synthetic profile, cost model and evaluator for testing the search mechanics quickly and deterministically.

The end-to-end search on a real tiny pipeline is in test_search.py; these fixtures make the Optuna side
(resume, workers, choice, errors) testable in milliseconds.
"""

from __future__ import annotations


import torch

from sparsediff.layout import TokenLayout
from sparsediff.plan import ModelFingerprint, SparsePlan
from sparsediff.search.cost import CostKey, CostModel
from sparsediff.search.optimize import Evaluation
from sparsediff.search.profile import AttentionProfile

CANDIDATES = ["full", "skip", "diagonal_w0.5", "diagonal_w1", "vertical_stripe_f1"]
MODEL = ModelFingerprint("WanTransformer3DModel", num_layers=3, num_heads=4, head_dim=16, config_hash="synthetic")
LAYOUT = TokenLayout.parse("video:4x8x8")


def synthetic_profile(seed: int = 0) -> AttentionProfile:
    g = torch.Generator().manual_seed(seed)
    T, L, H, C = 4, MODEL.num_layers, MODEL.num_heads, len(CANDIDATES)
    errors = torch.rand((T, L, H, C), generator=g) * 0.5
    errors[..., 0] = 0.0  # full
    errors[..., 1] = 1.0  # skip
    n = LAYOUT.num_blocks(16)
    return AttentionProfile(MODEL, LAYOUT, 16, 16, 4, steps=[0, 1, 2, 3], num_steps=4, layers=[0, 1, 2],
                            candidates=CANDIDATES, mass=torch.full((T, L, H, n, n), 1.0 / n), errors=errors,
                            calls=torch.ones(T, L, dtype=torch.long))


def synthetic_cost() -> CostModel:
    key = CostKey("synthetic", "torch", "float32", str(LAYOUT), 4, 16, 1, 16, "x")
    line = lambda a, b: [(n, a + b * n) for n in (1, 2, 4)]  # noqa: E731
    return CostModel(key, {"full": line(0.0, 4.0), "diagonal_w0.5": line(0.1, 0.5), "diagonal_w1": line(0.1, 1.0),
                           "vertical_stripe_f1": line(0.1, 0.8)})


class SyntheticEvaluator:
    """Quality falls with the predicted FLOP share skipped; every plan 'runs' instantly."""

    num_steps = 4
    dense_seconds = 1.0

    def __call__(self, plan: SparsePlan, report) -> Evaluation:
        share = plan.predicted_flops_share(LAYOUT, self.num_steps)
        value = 20.0 + 30.0 * share
        for step in range(self.num_steps):
            report(step, value + (self.num_steps - step))
        return Evaluation(psnr=value, seconds=max(share, 1e-3), step_psnr=[value] * self.num_steps)


class HeldOutEvaluator(SyntheticEvaluator):
    """Other prompts: the same plan loses `penalty` dB per unit of skipped FLOP share (calibration overestimates),
    and `offset` dB whatever the plan."""

    calls = [{"prompt": "held out"}]

    def __init__(self, penalty: float = 20.0, offset: float = 0.0, key: str = "held-out", steps_lose: bool = True):
        self.penalty, self.offset, self.key, self.runs, self.steps_lose = penalty, offset, key, 0, steps_lose

    def __call__(self, plan: SparsePlan, report) -> Evaluation:
        self.runs += 1
        skipped = 1.0 - plan.predicted_flops_share(LAYOUT, self.num_steps)
        loss = self.penalty * skipped + self.offset
        # steps_lose=False: the steps look as on calibration and only the final output loses (no run stops early)
        inner = super().__call__(plan, lambda step, value: report(step, value - loss if self.steps_lose else value))
        return Evaluation(psnr=inner.psnr - loss, seconds=inner.seconds, step_psnr=inner.step_psnr)
