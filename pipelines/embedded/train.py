"""Training loop of the embedded model: rectified-flow matching on procedural shape clips, seeded and resumable.

The objective is the one `FlowMatchEulerDiscreteScheduler` samples with: for a clean clip x0, noise n and a noise
level s in (0, 1), the input is x_s = (1 - s) x0 + s n at `timestep` 1000 s, and the transformer predicts the
velocity n - x0 (the scheduler steps x <- x + (s_next - s) v). Noise levels are drawn uniformly and then shifted
by `TrainConfig.sigma_shift` (s = shift u / (1 + (shift - 1) u)). The default 1.0 keeps them uniform: the first
run trained with the scheduler's shift of 3, which leaves only 4% of the steps below s = 0.1, and its samples kept a
speckle of undenoised pixels; uniform levels train the last sampling step as often as the first. Captions are
dropped to "" with probability `caption_dropout`, which is what classifier-free guidance subtracts.

Everything that decides a step (its clips, its noise, its resolution) is a function of (seed, step), and the
checkpoint holds the weights, the AdamW, learning-rate schedule and EMA state and the loss history, so a resumed run
repeats the steps an uninterrupted one would have taken. The weight average is diffusers' `EMAModel`.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from torch.optim.lr_scheduler import LambdaLR

from . import data
from .pipeline import EmbeddedModelConfig, ShapesVideoPipeline, build_pipeline
from .structured import AUTO_CANDIDATES, StructuredHeads, check_head_patterns, choose_patterns, probe_head_errors, sparse_step


@dataclass
class TrainConfig:
    """One training run.

    Args:
        steps (int, defaults to 1600): optimizer steps in all.
        batch_size (int, defaults to 4): clips per step at `low_res`.
        low_res (tuple, defaults to (8, 32, 32)): (frames, height, width) of most steps: 8 x 16 x 16 = 2048 tokens.
        full_res (tuple, defaults to (8, 64, 64)): the generation size, 8192 tokens; attention costs 16x per clip.
        full_res_every (int, defaults to 3): every n-th step runs at `full_res` (0: never), so the model sees the
            whole RoPE position range and object sizes in pixels it generates at.
        full_res_batch_size (int, defaults to 1): clips per full-resolution step.
        lr (float, defaults to 1e-3): peak AdamW learning rate, after `warmup` linear steps, cosine to 10% at the end.
        weight_decay (float, defaults to 0.01): AdamW weight decay.
        warmup (int, defaults to 50): warm-up steps.
        ema_decay (float, defaults to 0.995): decay of the weight average that is saved as the model (about the last
            200 steps: a short run improves too fast for a longer memory). Early on EMAModel's warm-up decay is used
            when smaller, (1 + s) / (10 + s) for the update after s others (the first update copies the weights): a
            short memory while the weights move fast.
        sigma_shift (float, defaults to 1.0): shift applied to the uniform noise levels of training (1.0: uniform).
        caption_dropout (float, defaults to 0.1): probability of training a clip on "" (for guidance).
        multi_object_prob (float, defaults to 0.25): share of clips with two or three objects.
        checkpoint_every (int, defaults to 25): steps between checkpoints (and loss plots).
        seed (int, defaults to 0): seeds the initial weights, the clips and the noise.
        threads (int, defaults to 2): torch CPU threads; a run may resume with another count.
        model (EmbeddedModelConfig): the model sizes.
        init_from (str, optional): a saved pipeline folder whose weights start the run (a fine-tuning phase) instead
            of a fresh initialisation; `seed` still draws the clips and noise.
        head_patterns (tuple or "auto", optional): one pattern name per head per layer; heads not "full" are trained
            towards their pattern (see `structured.py`). "auto": at step `structured_from` each head gets the
            candidate of `auto_candidates` its probe fits best (`structured.probe_head_errors`, `choose_patterns`),
            and the run continues structure-aware with that assignment (kept in the checkpoint). None: plain training.
        structured_from (int, defaults to 0): with `head_patterns`, the step from which the structure-aware terms
            apply (plain training before it).
        auto_candidates (tuple, defaults to `structured.AUTO_CANDIDATES`): the patterns "auto" chooses among.
        auto_full_heads (tuple, optional): with "auto", how many heads of each layer stay full (the worst-fitting
            ones); default one in every layer but the first and the last.
        sparse_prob (float, defaults to 0.5): with `head_patterns`, the share of steps whose layers pass the
            patterned heads' sparse output on instead of the dense one.
        consistency_weight (float, defaults to 1.0): with `head_patterns`, the weight of the heads' relative squared
            difference between sparse and dense attention in the loss.

    >>> TrainConfig(steps=10).full_res_every
    3
    """

    steps: int = 1600
    batch_size: int = 4
    low_res: tuple[int, int, int] = (8, 32, 32)
    full_res: tuple[int, int, int] = (8, 64, 64)
    full_res_every: int = 3
    full_res_batch_size: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 50
    ema_decay: float = 0.995
    sigma_shift: float = 1.0
    caption_dropout: float = 0.1
    multi_object_prob: float = 0.25
    checkpoint_every: int = 25
    seed: int = 0
    threads: int = 2
    model: EmbeddedModelConfig = field(default_factory=EmbeddedModelConfig)
    init_from: str | None = None
    head_patterns: tuple[tuple[str, ...], ...] | str | None = None
    structured_from: int = 0
    auto_candidates: tuple[str, ...] = AUTO_CANDIDATES
    auto_full_heads: tuple[int, ...] | None = None
    sparse_prob: float = 0.5
    consistency_weight: float = 1.0

    def __post_init__(self):
        if self.steps <= 0 or self.batch_size <= 0 or self.checkpoint_every <= 0:
            raise ValueError(f"steps={self.steps}, batch_size={self.batch_size} and checkpoint_every={self.checkpoint_every} must all be positive.")
        if isinstance(self.model, dict):  # as read back from a checkpoint
            self.model = EmbeddedModelConfig(**self.model)
        self.low_res, self.full_res = tuple(self.low_res), tuple(self.full_res)
        self.auto_candidates = tuple(self.auto_candidates)
        if self.head_patterns == "auto":
            if self.auto_full_heads is None:
                layers = self.model.num_layers
                self.auto_full_heads = tuple(0 if layer in (0, layers - 1) else 1 for layer in range(layers))
            self.auto_full_heads = tuple(self.auto_full_heads)
            if len(self.auto_full_heads) != self.model.num_layers or not all(0 <= n <= self.model.num_heads for n in self.auto_full_heads):
                raise ValueError(f"auto_full_heads={self.auto_full_heads} must give 0..{self.model.num_heads} full heads for each of {self.model.num_layers} layers.")
            check_head_patterns([self.auto_candidates], 1, len(self.auto_candidates))
        elif self.head_patterns is not None:
            self.head_patterns = check_head_patterns(self.head_patterns, self.model.num_layers, self.model.num_heads)
        if not 0 <= self.structured_from < self.steps:
            raise ValueError(f"structured_from={self.structured_from} must be a step of the run, in [0, {self.steps}).")
        if not 0.0 <= self.sparse_prob <= 1.0 or self.consistency_weight < 0:
            raise ValueError(f"sparse_prob={self.sparse_prob} must be in [0, 1] and consistency_weight={self.consistency_weight} >= 0.")


def lr_factor(config: TrainConfig, step: int) -> float:
    """The learning rate of `step` as a share of `config.lr`: linear warm-up to 1 over `warmup` steps (the first step
    already at 1 / warmup), then a cosine down to 0.1 at the last step."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def step_batch(config: TrainConfig, step: int) -> tuple[torch.Tensor, list[str], torch.Generator]:
    """The clips (B, 3, F, H, W), captions (some dropped to "") and noise generator of `step`; same step, same batch."""
    full = config.full_res_every > 0 and step % config.full_res_every == config.full_res_every - 1
    frames, height, width = config.full_res if full else config.low_res
    size = config.full_res_batch_size if full else config.batch_size
    first = (config.seed * 1_000_003 + step) * 64  # disjoint seeds per step (batches stay under 64 clips)
    clips, captions = data.batch(list(range(first, first + size)), frames, height, width, config.multi_object_prob)
    rng = random.Random(first)
    captions = ["" if rng.random() < config.caption_dropout else c for c in captions]
    return clips, captions, torch.Generator().manual_seed(first)


def probe_batch(config: TrainConfig) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Generator]:
    """The clips, captions, noise levels and noise generator of the "auto" head probe: three clips at `full_res`
    (seeds no training step uses), at noise levels 0.25, 0.5 and 0.75."""
    frames, height, width = config.full_res
    first = (config.seed * 1_000_003 + config.steps + 1) * 64
    clips, captions = data.batch([first, first + 1, first + 2], frames, height, width, config.multi_object_prob)
    return clips, captions, torch.tensor([0.25, 0.5, 0.75]), torch.Generator().manual_seed(first)


def flow_matching_loss(pipe: ShapesVideoPipeline, clips: torch.Tensor, captions: list[str], generator: torch.Generator, shift: float = 1.0) -> torch.Tensor:
    u = torch.rand(clips.shape[0], generator=generator)
    sigma = shift * u / (1 + (shift - 1) * u)
    noise = torch.randn(clips.shape, generator=generator)
    s = sigma.view(-1, 1, 1, 1, 1)
    noisy = (1 - s) * clips + s * noise
    text = pipe.encode_prompt(captions, pipe.tokenizer.model_max_length, clips.device)
    velocity = pipe.transformer(hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=text, return_dict=False)[0]
    return torch.nn.functional.mse_loss(velocity, noise - clips)


class Trainer:
    """Holds the pipeline, optimizer, EMA and history of a run; `run()` trains to `config.steps`, checkpointing."""

    def __init__(self, config: TrainConfig, work_dir: str | os.PathLike, log=sys.stderr, compile: bool = False):
        self.config = config
        self.work_dir = Path(work_dir)
        self.log = log
        self.pipe = build_pipeline(config.model, seed=config.seed)
        if config.init_from is not None:
            load_weights(self.pipe, config.init_from)
        # the head assignment in force: the fixed table, or (with "auto") None until the probe at `structured_from`
        self.assignment = config.head_patterns if isinstance(config.head_patterns, tuple) else None
        self.probe_errors: list | None = None  # (layers, heads, candidates) of the "auto" probe
        self.lengthened: list[dict] = []  # {"step", "from", "to"} each time a resumed run was given more steps
        self.structured: StructuredHeads | None = None  # installed from `structured_from` on
        self.compiled = compile
        if compile:  # one graph per step shape; about 1.6x faster steps on CPU after a minute or two of compiling
            self.pipe.transformer.compile(dynamic=False)
        self.modules = torch.nn.ModuleList([self.pipe.transformer, self.pipe.text_encoder])
        self.optimizer = torch.optim.AdamW(self.modules.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.99))
        # diffusers' get_scheduler has no cosine with a floor (its cosine ends at 0 and warms up from 0 at step 0), so
        # the schedule is its own multiplier on the LambdaLR class that get_scheduler's schedules are
        self.lr_scheduler = LambdaLR(self.optimizer, lambda step: lr_factor(config, step))
        self.ema = EMAModel(self.modules.parameters(), decay=config.ema_decay)
        self.step = 0
        self.history: list[dict] = []  # one {"step", "loss", "clips" (B x F x H x W), "seconds"} per step

    @property
    def checkpoint_path(self) -> Path:
        return self.work_dir / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "config": asdict(self.config),
            "step": self.step,
            "modules": self.modules.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "ema": self.ema.state_dict(),
            "history": self.history,
            "assignment": self.assignment,
            "lengthened": self.lengthened,
            "probe_errors": self.probe_errors,
        }
        partial = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, partial)
        os.replace(partial, self.checkpoint_path)  # a run killed mid-save keeps the previous checkpoint

    def resume(self) -> bool:
        """Load the checkpoint in `work_dir` if there is one; True when it did."""
        if not self.checkpoint_path.exists():
            return False
        state = torch.load(self.checkpoint_path, weights_only=False)
        saved = TrainConfig(**state["config"])
        if replace(saved, threads=self.config.threads, steps=self.config.steps) != self.config:
            raise ValueError(f"The checkpoint in {self.work_dir} was written by another configuration; resume with the same settings or use a new work directory.")
        if self.config.steps != saved.steps:  # a run may be lengthened (never cut below where it is)
            if self.config.steps < state["step"]:
                raise ValueError(f"The checkpoint in {self.work_dir} is at step {state['step']}; steps={self.config.steps} would end the run before it.")
            print(f"lengthened from {saved.steps} to {self.config.steps} steps at step {state['step']}: the learning-rate "
                  "schedule of the remaining steps follows the new length", file=self.log, flush=True)
            self.lengthened = [*state.get("lengthened", []), {"step": state["step"], "from": saved.steps, "to": self.config.steps}]
        else:
            self.lengthened = state.get("lengthened", [])
        if "lr_scheduler" not in state:  # written when the EMA was a plain list and the schedule was not saved
            raise ValueError(f"The checkpoint in {self.work_dir} was written by an older trainer without a learning-rate schedule state; start the run in a new work directory.")
        self.step = state["step"]
        self.modules.load_state_dict(state["modules"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.ema.load_state_dict(state["ema"])
        self.history = state["history"]
        if self.config.head_patterns == "auto":
            self.assignment = state.get("assignment")
            self.assignment = tuple(tuple(layer) for layer in self.assignment) if self.assignment is not None else None
        self.probe_errors = state.get("probe_errors")
        self._update_structure()
        return True

    def _update_structure(self) -> None:
        """From `structured_from` on, the structure-aware heads are installed (after the probe, with "auto")."""
        config = self.config
        if config.head_patterns is None or self.step < config.structured_from or self.structured is not None:
            return
        if self.assignment is None:
            self.assignment = self.probe_assignment()
            print(f"step {self.step}: head assignment {self.assignment}", file=self.log, flush=True)
        self.structured = StructuredHeads(self.pipe.transformer, self.assignment)
        if self.compiled:  # graphs traced with the plain processors must not run on: trace again with the new ones
            torch._dynamo.reset()

    def probe_assignment(self) -> tuple[tuple[str, ...], ...]:
        """Each head's best-fitting candidate, from its errors on `probe_batch` (eager, without gradients)."""
        config = self.config
        clips, captions, sigma, generator = probe_batch(config)
        noise = torch.randn(clips.shape, generator=generator)
        s = sigma.view(-1, 1, 1, 1, 1)
        noisy = (1 - s) * clips + s * noise
        transformer = self.pipe.transformer

        def run():
            with torch.compiler.set_stance("force_eager"):
                text = self.pipe.encode_prompt(captions, device=clips.device)
                for i in range(len(clips)):  # one clip at a time: the scores of 8192 tokens are large enough
                    transformer(hidden_states=noisy[i : i + 1], timestep=sigma[i : i + 1] * 1000, encoder_hidden_states=text[i : i + 1])

        errors = probe_head_errors(transformer, run, config.auto_candidates)
        self.probe_errors = errors.tolist()
        return choose_patterns(errors, config.auto_candidates, config.auto_full_heads)

    def train_step(self) -> float:
        config = self.config
        self._update_structure()
        clips, captions, generator = step_batch(config, self.step)
        consistency = None
        if self.structured is not None:
            self.structured.set_sparse(sparse_step(config.seed, self.step, config.sparse_prob))
        loss = flow_matching_loss(self.pipe, clips, captions, generator, config.sigma_shift)
        if self.structured is not None:
            consistency = self.structured.take_consistency()
            loss = loss + config.consistency_weight * consistency
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.modules.parameters(), 1.0)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.ema.step(self.modules.parameters())
        self.step += 1
        batch, _, frames, height, width = clips.shape
        entry = {"step": self.step, "loss": loss.item(), "clips": f"{batch}x{frames}x{height}x{width}"}
        if consistency is not None:  # "loss" stays the total; the flow-matching part is loss - weight * consistency
            entry["consistency"] = consistency.item()
            entry["sparse"] = self.structured.shared.use_sparse
        self.history.append(entry)
        return loss.item()

    def run(self, on_checkpoint=None, max_seconds: float | None = None) -> None:
        """Train to `config.steps` (or until `max_seconds` have passed), checkpointing every `checkpoint_every` steps
        and at the end; `on_checkpoint(trainer)` runs after each checkpoint."""
        torch.set_num_threads(self.config.threads)
        self.modules.train()
        started, first = time.perf_counter(), self.step
        while self.step < self.config.steps and (max_seconds is None or time.perf_counter() - started < max_seconds):
            tick = time.perf_counter()
            loss = self.train_step()
            seconds = time.perf_counter() - tick
            self.history[-1]["seconds"] = round(seconds, 3)
            done = self.step - first
            elapsed = time.perf_counter() - started
            eta = elapsed / done * (self.config.steps - self.step)
            print(
                f"step {self.step}/{self.config.steps} clips {self.history[-1]['clips']} loss {loss:.4f} "
                f"{seconds:.2f} s/step elapsed {elapsed / 60:.1f} min eta {eta / 60:.1f} min",
                file=self.log,
                flush=True,
            )
            if self.step % self.config.checkpoint_every == 0 or self.step == self.config.steps:
                self._checkpoint(on_checkpoint)
        if self.step % self.config.checkpoint_every and self.step < self.config.steps:  # stopped by the clock
            self._checkpoint(on_checkpoint)

    def _checkpoint(self, on_checkpoint) -> None:
        self.save_checkpoint()
        if on_checkpoint is not None:
            on_checkpoint(self)

    def ema_pipeline(self) -> ShapesVideoPipeline:
        """The pipeline with the EMA weights (the model to ship); the training weights are left as they are."""
        pipe = build_pipeline(self.config.model, seed=self.config.seed)
        self.ema.copy_to(torch.nn.ModuleList([pipe.transformer, pipe.text_encoder]).parameters())
        return pipe


def load_weights(pipe: ShapesVideoPipeline, folder: str | os.PathLike) -> None:
    """Copy the transformer and text-encoder weights of the pipeline saved in `folder` into `pipe` (same sizes)."""
    saved = ShapesVideoPipeline.from_pretrained(str(folder))
    for name in ("transformer", "text_encoder"):
        mine, theirs = getattr(pipe, name), getattr(saved, name)
        try:
            mine.load_state_dict(theirs.state_dict())
        except RuntimeError as error:  # missing keys or other shapes
            raise ValueError(f"The {name} saved in {folder} does not fit this run's model sizes; fine-tune a model of the same sizes.\n{error}") from None


def plot_loss(history: list[dict], path: str | os.PathLike, window: int = 50) -> None:
    """The loss per step (light) and its running mean over `window` steps, to a small PNG."""
    from matplotlib.figure import Figure

    steps = [h["step"] for h in history]
    losses = torch.tensor([h["loss"] for h in history])
    kernel = min(window, len(losses))
    smooth = torch.nn.functional.avg_pool1d(losses[None, None], kernel, stride=1)[0, 0] if kernel else losses
    fig = Figure(figsize=(5, 3), dpi=100)
    ax = fig.subplots()
    ax.plot(steps, losses, color="0.8", linewidth=0.6, label="per step")
    ax.plot(steps[kernel - 1 :], smooth, color="C0", label=f"mean of {kernel}")
    if any("consistency" in h for h in history):  # a structure-aware phase: its sparse-vs-dense term too
        part = torch.tensor([h.get("consistency", float("nan")) for h in history])
        smooth_part = torch.nn.functional.avg_pool1d(part[None, None], kernel, stride=1)[0, 0] if kernel else part
        ax.plot(steps[kernel - 1 :], smooth_part, color="C1", label=f"consistency, mean of {kernel}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
