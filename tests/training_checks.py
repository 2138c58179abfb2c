"""Checks shared by the training tests of the embedded model."""

import torch

from sparsediff.pipelines.embedded.train import Trainer


def assert_resume_repeats(straight: Trainer, folder, stop_at: int = 2) -> Trainer:
    """A run of `straight.config` stopped after `stop_at` steps, checkpointed and resumed in `folder`, repeats the
    uninterrupted `straight` run exactly (losses, weights, learning rate and EMA); returns the resumed trainer."""
    first = Trainer(straight.config, folder)
    for _ in range(stop_at):
        first.train_step()
    first.save_checkpoint()
    second = Trainer(straight.config, folder)
    assert second.resume() and second.step == stop_at
    second.run()
    assert [h["loss"] for h in second.history] == [h["loss"] for h in straight.history]
    for a, b in zip(straight.modules.parameters(), second.modules.parameters()):
        assert torch.equal(a, b)
    assert second.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]
    assert second.lr_scheduler.last_epoch == straight.lr_scheduler.last_epoch == straight.config.steps
    assert second.ema.optimization_step == straight.ema.optimization_step == straight.config.steps
    for a, b in zip(straight.ema.shadow_params, second.ema.shadow_params, strict=True):
        assert torch.equal(a, b)
    return second
