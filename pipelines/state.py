"""State shared by a denoiser's hook and its attention processors, and the run log of what they did.

The step-tracking hook writes a `CallState` (which denoiser, token grid, step, cache context) before every denoiser
forward; the processors of that denoiser read it. Every attention call adds its `AttentionStats` to the
`RunLog`, which folds them into one `AttentionStats` per (denoiser, cache context, step) of the current run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..layout import TokenLayout, text, video
from ..runtime import AttentionStats


@dataclass
class CallState:
    """What the current denoiser call is.

    Args:
        model (str): the pipeline component ("transformer", "transformer_2") or the class name of a bare model.
        text (str | None): where text joins the self-attention: "before", "after" or None.
        grid (tuple[int, int, int] | None): (frames, height, width) of the video tokens after patchify.
        step (int): denoising step index of this call.
        num_steps (int | None): steps of the run (None when unknown, e.g. a bare model without `num_steps`).
        context (str | None): the pipeline's cache context ("cond", "uncond", "cond_uncond"), None outside one.
        source (str): how the step was found: "cache_context", "timestep" or "count".
    """

    model: str
    text: str | None
    grid: tuple[int, int, int] | None = None
    step: int = 0
    num_steps: int | None = None
    context: str | None = None
    source: str = "count"

    def layout(self, seq_len: int) -> TokenLayout | None:
        """The layout of an attention call over `seq_len` tokens: the video grid plus the rest as text (before or
        after the video, as the family puts it); None when the tokens do not fit the grid."""
        if self.grid is None:
            return None
        frames, height, width = self.grid
        n_text = seq_len - frames * height * width
        if n_text < 0 or (n_text > 0 and self.text is None):
            return None
        vid = video(frames, height, width)
        if n_text == 0:
            return TokenLayout((vid,))
        return TokenLayout((text(n_text), vid) if self.text == "before" else (vid, text(n_text)))


class RunLog:
    """Layer calls of the current pipeline run, grouped per (model, context, step).

    A run ends when diffusers resets stateful hooks at the end of a pipeline call (`end_run`), or when a denoiser
    sees, in one cache context, a step before the last one it saw there, or step 0 twice (a new run that was not
    announced, e.g. a bare model called again). The next call then starts a fresh log and `on_new_run`
    callbacks fire (the sparse runtimes forget their top-k block scores).
    """

    def __init__(self):
        self._steps: dict[tuple, tuple[CallState, list[AttentionStats]]] = {}
        self._last_step: dict[tuple, int] = {}
        self._ended = False
        self.on_new_run: list = []

    def begin_call(self, state: CallState) -> None:
        key = (state.model, state.context)
        last = self._last_step.get(key)
        if self._ended or (last is not None and (state.step < last or state.step == last == 0)):
            self.reset()
        self._last_step[key] = state.step

    def end_run(self) -> None:
        self._ended = True

    def reset(self) -> None:
        self._steps.clear()
        self._last_step.clear()
        self._ended = False
        for callback in self.on_new_run:
            callback()

    def record(self, state: CallState, call: AttentionStats) -> None:
        key = (state.model, state.context, state.step)
        if key not in self._steps:
            self._steps[key] = (replace(state), [])  # a snapshot: the state object changes with every call
        self._steps[key][1].append(call)

    def stats(self) -> list[AttentionStats]:
        """One record per (denoiser, cache context, step) of the current run, in the order they ran."""
        return [
            AttentionStats.fold(calls, model=s.model, context=s.context, step=s.step, num_steps=s.num_steps, source=s.source)
            for s, calls in self._steps.values()
        ]
