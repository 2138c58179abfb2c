"""Train the embedded diffusion LM as a masked diffusion LM (the LLaDA objective, supervised form): the prompt stays
visible, each answer slot is masked with probability t ~ U(0, 1), and the loss is the cross-entropy on the masked
slots weighted by 1/t. Seeded and resumable: a checkpoint every few minutes holds the model, optimiser, LR schedule,
step, RNG states and the loss history, so a later run with the same arguments continues where it stopped.

Lengths are drawn log-uniformly in [min_len, max_len] with a fixed token budget per batch, so short and long contexts
cost the same per step; evaluation at 2k-16k tokens is beyond what training saw (see `MODEL_CONFIG`'s RoPE note).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .model import build_model, build_pipeline, build_tokenizer, save_pipeline
from .tasks import ANSWER_SLOTS, FILLER, KEYS, KINDS, TRAIN_SEED, VALUES, VOCAB, make_task, short_prompt, task_set

MASK = VOCAB.index("<mask>")
INDEX = {w: i for i, w in enumerate(VOCAB)}


@dataclass
class TrainConfig:
    steps: int = 12000  # the LR schedule's length; a run stops at its time budget and the next one resumes
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.01
    tokens_per_batch: int = 2048
    min_len: int = 64
    max_len: int = 1024
    seed: int = TRAIN_SEED
    checkpoint_minutes: float = 3.0
    eval_every: int = 200
    curriculum: int = 400  # steps per doubling of the longest context, from min_len up to max_len (0: no curriculum)
    recall_share: float = 0.5  # batches of dense recall sequences (see `recall_sequence`)
    recall_bindings: int = 4  # at most this many key -> value bindings per recall sequence (at least 2)
    # The binding recipe the short-context probes found (BENCHMARKS section 7; off by default, not yet run at length):
    # an auxiliary loss makes the output of layer `aux_layer` name, at every visible value, the key two tokens before
    # it and, at the first answer slot, the asked key (read through the final norm and the tied head), so the offset
    # features a lookup needs exist; at step `redraw_attention_at` the q/k projections of the layers from
    # `aux_layer` on are re-drawn (their optimiser moments dropped), because by then they have collapsed onto an
    # attention sink that passes no gradient to the values. In the 4-layer probe 4-pair lookups went from chance to
    # 0.97-1.00 within 200 steps of the re-draw.
    aux_weight: float = 0.0
    aux_layer: int = 2
    redraw_attention_at: int = 0  # 0: never
    # The probe's conditions, which the recipe needs (BENCHMARKS section 7): for the first `short_steps` steps every
    # batch is `short_batch` short lookup prompts among at most `short_pairs` pairs (`tasks.short_prompt`), a share
    # `echo_share` of them echo prompts; afterwards a share `short_share` of batches stay short, with up to
    # `short_pairs_late` pairs, so lookups among many pairs keep being trained while the contexts lengthen. The
    # length curriculum counts from the end of the short phase.
    short_steps: int = 0
    short_share: float = 0.0
    short_batch: int = 128
    short_pairs: int = 4
    short_pairs_late: int = 16
    echo_share: float = 0.0
    short_key_values: float = 0.0  # share of short prompts' pairs that bind a key to a key (hops' first link)
    # Start from a saved model (a folder `save_pretrained` wrote, e.g. a binding probe's `--save`) instead of a fresh
    # draw: the shipped model's second stage starts from the 4-layer probe that bound keys to values (section 7).
    init_from: str = ""


def encode(words: list[str]) -> list[int]:
    return [INDEX[w] for w in words]


def recall_sequence(length: int, bindings: int, rng: np.random.Generator) -> tuple[list[str], list[int], list[str]]:
    """A dense associative-recall sequence of about `length` tokens: `bindings` key -> value pairs written again and
    again (`kX = vY ;` drawn with replacement, with a little filler between), then a question about one of them.
    Returns the words, the positions of every value (each is learnable from the other occurrences of its pair when
    masked) and the answer slots' target.

    Why: a task prompt has one answer, so a batch of them gives a few dozen lookups per step; here every pair after
    its first occurrence is one, about length / 5 per sequence. With one answer per sequence the model stayed at
    chance on binding keys to values for thousands of steps (BENCHMARKS section 7's earlier runs)."""
    keys = rng.choice(len(KEYS), size=bindings, replace=False)
    values = rng.integers(len(VALUES), size=bindings)
    words: list[str] = []
    positions: list[int] = []
    while len(words) < length - 3 - 4:
        i = int(rng.integers(bindings))
        positions.append(len(words) + 2)
        words += [KEYS[keys[i]], "=", VALUES[values[i]], ";"]
        if rng.uniform() < 0.25:
            words.append(FILLER[int(rng.integers(len(FILLER)))])
    asked = int(rng.integers(bindings))
    words += [FILLER[int(rng.integers(len(FILLER)))] for _ in range(length - 3 - len(words))]
    words += ["?", KEYS[keys[asked]], "->"]
    target = [VALUES[values[asked]]] + ["<eos>"] * (ANSWER_SLOTS - 1)
    return words, positions, target


def longest(cfg: TrainConfig, step: int) -> int:
    """The longest context at `step`: short contexts first, where attention to the one token that matters is not
    diluted over hundreds of others, so retrieval is found early; then doubling every `curriculum` steps."""
    if not cfg.curriculum:
        return cfg.max_len
    return min(cfg.max_len, cfg.min_len * 2 ** (max(0, step - cfg.short_steps) // cfg.curriculum))


def short_batch(cfg: TrainConfig, rng: np.random.Generator, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of `cfg.short_batch` short lookup prompts of one shape (pairs and filler drawn once per batch), with
    the answer slots to learn; see `TrainConfig.short_steps`."""
    most = cfg.short_pairs if step < cfg.short_steps else cfg.short_pairs_late
    pairs = int(rng.integers(1, most + 1))
    filler = int(rng.integers(0, 4 * pairs + 1))
    rows = [short_prompt(rng, pairs, filler, echo=rng.uniform() < cfg.echo_share, key_values=cfg.short_key_values)
            for _ in range(cfg.short_batch)]
    ids = torch.tensor([encode(p + a) for p, a in rows])
    supervised = torch.zeros_like(ids, dtype=torch.bool)
    supervised[:, -ANSWER_SLOTS:] = True
    return ids, supervised


def batch(cfg: TrainConfig, rng: np.random.Generator, step: int = 10**9) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S) token ids of one batch of a single length (prompt, then the answer slots) and the (B, S) positions to
    learn: the answer slots, and in a recall batch every value too."""
    lo, hi = math.log(cfg.min_len), math.log(longest(cfg, step))
    length = int(math.exp(rng.uniform(lo, hi)))
    length = max(cfg.min_len, -(-length // 8) * 8)
    n = max(1, cfg.tokens_per_batch // (length + ANSWER_SLOTS))
    recall = rng.uniform() < cfg.recall_share
    rows, learn = [], []
    for _ in range(n):
        if recall:
            words, positions, target = recall_sequence(length, int(rng.integers(2, cfg.recall_bindings + 1)), rng)
        else:
            task = make_task(KINDS[int(rng.integers(len(KINDS)))], length, rng)
            words, positions, target = task.prompt, [], task.target()
        words = words + target
        rows.append(encode(words))
        learn.append(positions + list(range(len(words) - ANSWER_SLOTS, len(words))))
    ids = torch.tensor(rows)
    supervised = torch.zeros_like(ids, dtype=torch.bool)
    for row, positions in enumerate(learn):
        supervised[row, positions] = True
    return ids, supervised


IS_KEY = torch.zeros(len(VOCAB), dtype=torch.bool)
IS_KEY[[INDEX[k] for k in KEYS]] = True
IS_VALUE = torch.zeros(len(VOCAB), dtype=torch.bool)
IS_VALUE[[INDEX[v] for v in VALUES]] = True


def aux_targets(ids: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, key ids) of the auxiliary objective on a batch `ids` as the model sees it (`x`, masks applied):
    every visible value written `kX = v` whose key is visible too names kX, and so does a key bound to a key
    (`kX = kY`, a hops chain's first link); the first answer slot names the asked key where the prompt ends
    `? kX ->`."""
    where = torch.zeros_like(ids, dtype=torch.bool)
    where[:, 2:] = (IS_VALUE | IS_KEY)[x[:, 2:]] & IS_KEY[x[:, :-2]] & (x[:, 1:-1] == INDEX["="])
    first = ids.shape[1] - ANSWER_SLOTS
    where[:, first] = IS_KEY[x[:, first - 2]] & (x[:, first - 3] == INDEX["?"])
    rows, cols = where.nonzero(as_tuple=True)
    return rows, cols, x[rows, cols - 2]


def redraw_attention(model, from_layer: int, seed: int, opt: torch.optim.Optimizer | None = None) -> None:
    """Re-draw the q/k projections of layers `from_layer`.. (std 0.02, seeded) and drop their optimiser moments."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers[from_layer:]:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.copy_(torch.randn(proj.weight.shape, generator=gen) * 0.02)
                if opt is not None:
                    opt.state.pop(proj.weight, None)


def loss_of(model, ids: torch.Tensor, supervised: torch.Tensor, rng: np.random.Generator,
            aux_weight: float = 0.0, aux_layer: int = 2, all_masked: bool = False) -> torch.Tensor:
    """The LLaDA loss on the supervised positions: mask each with probability t, cross-entropy on the masked ones / t,
    averaged over the supervised positions; plus `aux_weight` times the auxiliary objective (`aux_targets`).
    `all_masked` takes t = 1 for every row (every supervised position masked): the short phase's condition, where
    each prompt's answer is learned at every step instead of half of them."""
    B = ids.shape[0]
    # t below 1/ANSWER_SLOTS masks about one slot either way; clamping there keeps the 1/t weight (and the gradient
    # noise of a small batch) bounded
    if all_masked:
        t = torch.ones(B, 1)
    else:
        t = torch.from_numpy(rng.uniform(0.0, 1.0, size=(B, 1))).float().clamp_min(1.0 / ANSWER_SLOTS)
    masked = supervised.clone() if all_masked else supervised & (torch.from_numpy(rng.uniform(size=tuple(ids.shape))).float() < t)
    masked[:, -ANSWER_SLOTS] |= ~masked.any(dim=1)  # at least one position to learn from
    x = ids.masked_fill(masked, MASK)
    out = model.model(input_ids=x, output_hidden_states=aux_weight > 0)
    logits = model.lm_head(out.last_hidden_state[masked])  # (N, V): only the masked positions
    ce = F.cross_entropy(logits.float(), ids[masked], reduction="none")
    weights = (1.0 / t).expand_as(ids)[masked]
    loss = (ce * weights).sum() / supervised.sum()
    if aux_weight > 0:
        rows, cols, keys = aux_targets(ids, x)
        if len(rows):
            mid = model.model.norm(out.hidden_states[aux_layer][rows, cols])
            loss = loss + aux_weight * F.cross_entropy(model.lm_head(mid).float(), keys)
    return loss


@torch.no_grad()
def quick_accuracy(model, length: int, n: int = 12, seed: int = 123_457, kinds: tuple[str, ...] = KINDS) -> float:
    """Exact match with every answer slot masked and each slot's argmax taken in one pass (a fast proxy of the
    pipeline's step-by-step decoding, for the training log)."""
    model.eval()
    tasks = task_set(n, length, seed, kinds)
    ids = torch.tensor([encode(t.prompt + t.target()) for t in tasks])
    x = ids.clone()
    x[:, -ANSWER_SLOTS:] = MASK
    pred = model(input_ids=x, logits_to_keep=ANSWER_SLOTS).logits.argmax(-1)
    model.train()
    return float((pred == ids[:, -ANSWER_SLOTS:]).all(dim=1).float().mean())


@torch.no_grad()
def short_accuracy(model, n: int = 64, seed: int = 123_458) -> dict[str, float]:
    """First-slot accuracy on fresh short lookups among 4 and 16 pairs (the probe's measure of binding)."""
    model.eval()
    rng = np.random.default_rng(seed)
    acc = {}
    for pairs in (4, 16):
        rows = [short_prompt(rng, pairs, 4 * pairs) for _ in range(n)]
        ids = torch.tensor([encode(p + a) for p, a in rows])
        x = ids.clone()
        x[:, -ANSWER_SLOTS:] = MASK
        first = model(input_ids=x, logits_to_keep=ANSWER_SLOTS).logits[:, 0].argmax(-1)
        acc[f"short{pairs}"] = float((first == ids[:, -ANSWER_SLOTS]).float().mean())
    model.train()
    return acc


def load_weights(folder: Path) -> dict:
    """The state dict of a model `save_pretrained` wrote to `folder` (loaded by transformers, tied weights and all)."""
    from transformers import AutoModelForCausalLM

    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"init_from={str(folder)!r} holds no saved model (config.json); give a folder that "
                                "`save_pretrained` wrote (e.g. samples/probe_dlm_binding.py --save DIR).")
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def train(out: Path, cfg: TrainConfig, minutes: float, threads: int | None = None, log=print,
          until_step: int | None = None) -> dict:
    """Train for at most `minutes` (resuming from `out/checkpoint.pt`; stopping at `until_step` when given), then
    save the pipeline in `out/pipeline`."""
    from transformers import get_cosine_schedule_with_warmup

    if threads:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    model = build_model(cfg.seed)
    if cfg.init_from:
        model.load_state_dict(load_weights(Path(cfg.init_from)))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup, cfg.steps)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    history: dict = {"step": [], "loss": [], "eval": [], "seconds": 0.0}
    step = 0
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, weights_only=False)
        if state["config"] != asdict(cfg):
            raise ValueError(f"{ckpt_path} was written with another configuration; pass the same arguments or another --out.")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        history, step = state["history"], state["step"]
        log(f"resumed at step {step}")

    def save():
        state = dict(model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                     numpy_rng=rng.bit_generator.state, torch_rng=torch.get_rng_state(), history=history, step=step,
                     config=asdict(cfg))
        torch.save(state, out / "checkpoint.tmp")
        (out / "checkpoint.tmp").replace(ckpt_path)  # atomic: a kill mid-save keeps the previous checkpoint

    start = last_save = time.monotonic()
    seconds0 = history["seconds"]
    running = []
    last = cfg.steps if until_step is None else min(until_step, cfg.steps)
    while step < last and time.monotonic() - start < minutes * 60:
        if cfg.redraw_attention_at and step == cfg.redraw_attention_at:
            redraw_attention(model, cfg.aux_layer, cfg.seed + step, opt)
            log(f"step {step}: q/k of layers {cfg.aux_layer}.. re-drawn")
        short = step < cfg.short_steps or (cfg.short_share > 0 and rng.uniform() < cfg.short_share)
        ids, supervised = short_batch(cfg, rng, step) if short else batch(cfg, rng, step)
        loss = loss_of(model, ids, supervised, rng, cfg.aux_weight, cfg.aux_layer, all_masked=short)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        running.append(loss.item())
        if step % 25 == 0:
            history["step"].append(step)
            history["loss"].append(float(np.mean(running)))
            running = []
        if step % cfg.eval_every == 0:
            acc = {f"{kind}@{n}": quick_accuracy(model, n, kinds=(kind,)) for n in (256, 1024) for kind in KINDS}
            if cfg.short_steps or cfg.short_share:
                acc.update(short_accuracy(model))
            history["eval"].append({"step": step, **{str(k): v for k, v in acc.items()}})
            log(f"step {step} loss {history['loss'][-1]:.4f} quick accuracy {acc} "
                f"({seconds0 + time.monotonic() - start:.0f} s)")
        if time.monotonic() - last_save > cfg.checkpoint_minutes * 60:
            history["seconds"] = seconds0 + time.monotonic() - start
            save()
            last_save = time.monotonic()
    history["seconds"] = seconds0 + time.monotonic() - start
    save()
    pipe = build_pipeline(model.eval(), build_tokenizer())
    save_pipeline(pipe, out / "pipeline")
    (out / "history.json").write_text(json.dumps(history))
    return history


def plot_loss(history: dict, path: Path, start: str = "") -> None:
    """The loss curve (and the quick accuracy) as a small PNG; `start` names the model the run started from."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(history["step"], history["loss"], lw=1, label="LLaDA loss (answer slots)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if history["eval"]:
        acc = fig.axes[0].twinx()
        for key in [k for k in history["eval"][0] if k != "step"]:
            acc.plot([e["step"] for e in history["eval"]], [e[key] for e in history["eval"]], "--", lw=1,
                     label=f"one-pass accuracy {key}")
        acc.set_ylim(0, 1)
        acc.set_ylabel("accuracy")
        acc.legend(loc="lower center", fontsize=6, ncol=2)
    ax.legend(loc="upper right", fontsize=7)
    origin = f" from {Path(start).name}" if start else ""
    ax.set_title(f"embedded DLM{origin}, {history['seconds'] / 60:.0f} CPU minutes", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
