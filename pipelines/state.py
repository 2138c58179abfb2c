"""State shared by a denoiser's hook and its attention processors, and the per-step statistics they produce.

The step-tracking hook writes a `CallState` (which denoiser, token grid, step, cache context) before every denoiser
forward; the processors of that denoiser read it. Every attention layer call adds a `LayerCall` to the `RunLog`,
which folds them into one `StepStats` per (denoiser, cache context, step) of the current run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from ..layout import TokenLayout, text, video


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


class Clock:
    """Wall time of attention calls: `perf_counter` on the CPU; CUDA events on a GPU, read only when stats are
    read, so timing adds no synchronisation to the denoising loop."""

    @staticmethod
    def start(device: torch.device):
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @staticmethod
    def stop(start):
        if isinstance(start, float):
            return time.perf_counter() - start
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        return (start, end)

    @staticmethod
    def seconds(timing) -> float:
        if isinstance(timing, float):
            return timing
        start, end = timing
        end.synchronize()
        return start.elapsed_time(end) / 1000.0


@dataclass
class LayerCall:
    """One attention layer call: `density` over its heads (full = 1, skip = 0), head counts, and its attention
    calls' timings (more than one when the model loops over the batch, as Mochi does)."""

    layer: int
    dense: bool
    density: float
    heads_skipped: int
    heads_sparse: int
    timings: list = field(default_factory=list)


@dataclass
class StepStats:
    """What one denoising step did in one denoiser and cache context.

    Fields: `model`, `context`, `step`, `num_steps`, `source` (how the step was found), `dense` (every layer ran
    the model's own attention, e.g. a dense early step), `density` (mean over layers of the share of attention
    blocks computed: 1.0 dense, 0.0 all skipped), `heads_skipped` and `heads_sparse` (summed over layers),
    `layers` (attention layer calls) and `attention_ms` (time inside the attention calls: SDPA on dense layers,
    the sparse runtime on sparse ones).
    """

    model: str
    context: str | None
    step: int
    num_steps: int | None
    source: str
    dense: bool
    density: float
    heads_skipped: int
    heads_sparse: int
    layers: int
    attention_ms: float

    def to_dict(self) -> dict:
        return asdict(self)


class RunLog:
    """Layer calls of the current pipeline run, grouped per (model, context, step).

    A run ends when diffusers resets stateful hooks at the end of a pipeline call (`end_run`), or when a denoiser
    sees, in one cache context, a step before the last one it saw there, or step 0 twice (a new run that was not
    announced, e.g. a bare model called again). The next call then starts a fresh log and `on_new_run`
    callbacks fire (the sparse runtimes forget their top-k block scores).
    """

    def __init__(self):
        self._steps: dict[tuple, tuple[CallState, list[LayerCall]]] = {}
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

    def record(self, state: CallState, call: LayerCall) -> None:
        key = (state.model, state.context, state.step)
        if key not in self._steps:
            self._steps[key] = (CallState(**asdict(state)), [])
        self._steps[key][1].append(call)

    def stats(self) -> list[StepStats]:
        out = []
        for state, calls in self._steps.values():
            out.append(
                StepStats(
                    model=state.model,
                    context=state.context,
                    step=state.step,
                    num_steps=state.num_steps,
                    source=state.source,
                    dense=all(c.dense for c in calls),
                    density=sum(c.density for c in calls) / len(calls),
                    heads_skipped=sum(c.heads_skipped for c in calls),
                    heads_sparse=sum(c.heads_sparse for c in calls),
                    layers=len(calls),
                    attention_ms=1000.0 * sum(Clock.seconds(t) for c in calls for t in c.timings),
                )
            )
        return out
