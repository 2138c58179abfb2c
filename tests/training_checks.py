"""Checks shared by the training tests of the embedded model."""

import pytest
import torch

from sparsediff.pipelines.embedded.train import Trainer


def assert_resume_repeats(straight: Trainer, folder, stop_at: int = 2) -> Trainer:
    """A run of `straight.config` stopped after `stop_at` steps, checkpointed and resumed in `folder`: the resumed
    trainer holds exactly the state that was saved, and its run repeats the uninterrupted `straight` run (losses,
    weights, learning rate and EMA) to rounding; returns the resumed trainer.

    Rounding, not bits: the restored tensors live in new memory, where CPU kernels may take other paths (the same
    weights gave outputs 4.5e-7 apart after a save/load on AMD CPUs)."""
    first = Trainer(straight.config, folder)
    for _ in range(stop_at):
        first.train_step()
    first.save_checkpoint()
    second = Trainer(straight.config, folder)
    assert second.resume() and second.step == stop_at
    assert_same_state(first, second)
    second.run()
    assert [h["loss"] for h in second.history] == pytest.approx([h["loss"] for h in straight.history], rel=1e-5)
    for a, b in zip(straight.modules.parameters(), second.modules.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert second.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]
    assert second.lr_scheduler.last_epoch == straight.lr_scheduler.last_epoch == straight.config.steps
    assert second.ema.optimization_step == straight.ema.optimization_step == straight.config.steps
    for a, b in zip(straight.ema.shadow_params, second.ema.shadow_params, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    return second


def assert_same_state(saved: Trainer, resumed: Trainer) -> None:
    """Bit-for-bit: weights, AdamW state, schedule, EMA and history, as `resumed` read them back from the checkpoint."""
    assert_equal_tensors(saved.modules.state_dict(), resumed.modules.state_dict())
    a, b = saved.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for index in a["state"]:
        assert_equal_tensors(a["state"][index], b["state"][index])
    assert saved.lr_scheduler.state_dict() == resumed.lr_scheduler.state_dict()
    ema, back = saved.ema.state_dict(), resumed.ema.state_dict()
    assert {k: v for k, v in ema.items() if k != "shadow_params"} == {k: v for k, v in back.items() if k != "shadow_params"}
    assert_equal_tensors(dict(enumerate(ema["shadow_params"])), dict(enumerate(back["shadow_params"])))
    assert saved.history == resumed.history


def assert_equal_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
