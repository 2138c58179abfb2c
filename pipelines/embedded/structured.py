"""Structure-aware fine-tuning of the embedded model: teach chosen heads to live inside a sparse pattern.

Large video DiTs end up with heads that attend a local window, the same place in other frames or a few global
columns (Sparse-vDiT measured most heads of HunyuanVideo and Wan this way); a 5 MB model trained for an hour on a
2-core CPU does not (the v2 profile: the cheapest structured pattern of every head lost 9-27% of its output). This
module fine-tunes the model so that chosen heads carry their information inside a chosen pattern, the way STA and
Sparse-vDiT adapt models to sparse attention, while the model stays a dense model:

* every self-attention layer computes its dense attention as usual (the model's own processor, its attention call
  caught by the diffusers adapter as `accelerate` catches it), and for the chosen heads also the sparse attention of
  their pattern, through sparsediff's own torch runtime (the code that runs them at inference);
* the relative squared difference of the two (per head: |sparse - dense|^2 / |dense|^2) is added to the loss with
  weight `consistency_weight`, which pulls the dense head towards its pattern;
* in a share `sparse_prob` of the steps the layer passes the sparse output on instead of the dense one, so the
  layers after it learn to work from it.

Which pattern each head gets is the training recipe's choice: a table of names per layer or, with
`head_patterns="auto"` (the shipped model, issue 16), the heads' own preference: part-way
through plain training, `probe_head_errors` measures every head's relative error under a few cheap candidates on
one batch (the quantity `sparsediff profile` measures) and `choose_patterns` gives each head the candidate it already
fits best, leaving the worst-fitting heads of chosen layers full. The search does not read the assignment and must
find the structure itself from a profile. Heads left `full` keep global attention (motion needs some).

>>> from sparsediff.pipelines.embedded.pipeline import EmbeddedModelConfig, build_pipeline
>>> pipe = build_pipeline(EmbeddedModelConfig(num_layers=2, num_heads=2, head_dim=12, text_dim=16, ffn_dim=32))
>>> heads = StructuredHeads(pipe.transformer, [["diagonal_w0.5", "full"], ["full", "vertical_stripe_f1"]])
>>> x = torch.randn(1, 3, 2, 8, 8)
>>> text = pipe.encode_prompt(["a red circle"], 8, "cpu")
>>> _ = pipe.transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text)
>>> float(heads.take_consistency().detach()) > 0
True
>>> heads.remove()
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ...patterns import get_pattern
from ...runtime import AttentionStats, SparseAttention
from ..adapter import adapter_for, install_all
from ..families import family_of
from ..state import RunLog

# The candidates of the automatic assignment: the cheapest of each structured kind at 8 x 32 x 32 tokens (each covers
# about 1/16 of the scores): the same frame's nearby rows, the same place +-1 row in every frame, the first half frame.
AUTO_CANDIDATES: tuple[str, ...] = ("diagonal_w0.25", "multi_diagonal_w32", "vertical_stripe_f0.5")


def check_head_patterns(head_patterns: Sequence[Sequence[str]], num_layers: int, num_heads: int) -> tuple[tuple[str, ...], ...]:
    """The assignment as a tuple of tuples, after checking its shape and every pattern name."""
    rows = tuple(tuple(str(p) for p in layer) for layer in head_patterns)
    if len(rows) != num_layers or any(len(layer) != num_heads for layer in rows):
        shape = [len(layer) for layer in rows]
        raise ValueError(f"head_patterns must give {num_layers} layers of {num_heads} heads; got layers of {shape} heads.")
    for layer in rows:
        for name in layer:
            pattern = get_pattern(name)  # raises on unknown names
            if pattern.kind == "skip" or pattern.needs_scores:
                raise ValueError(f"{name!r} cannot be trained into a head: use full or a fixed pattern (diagonal, multi_diagonal, vertical_stripe).")
    return rows


def _require_wan(transformer: torch.nn.Module, who: str) -> None:
    family = family_of(transformer)
    if family is None or family.name != "wan":
        raise ValueError(f"{who} Wan self-attention; got a {type(transformer).__name__}.")


class StructureController:
    """A controller for sparsediff's own attention intercept (the one `accelerate` uses, so the model's projections,
    norms and RoPE run as the model's own processor runs them): every layer computes its dense attention, and its
    chosen heads also their pattern's sparse attention through the torch runtime. It adds their consistency loss to
    `losses` and, when `use_sparse` is set, passes their sparse output on.

    Args:
        head_patterns: one pattern name per head per layer ("full" for heads left alone), already checked.
    """

    def __init__(self, head_patterns: Sequence[Sequence[str]]):
        self.head_patterns = tuple(tuple(layer) for layer in head_patterns)
        self.heads = [torch.tensor([h for h, p in enumerate(layer) if p != "full"], dtype=torch.long) for layer in self.head_patterns]
        self.runtimes = [SparseAttention(backend="torch") for _ in self.head_patterns]
        self.use_sparse = False
        self.losses: list[torch.Tensor] = []

    may_replace = True
    differentiable = True  # under torch.compile the processor calls `attend` eagerly (a graph break), not its op

    def active(self, layer: int, state) -> bool:
        return True  # the dense output is the layer's own, so an all-full layer is exact

    def record(self, state, stats: AttentionStats) -> None:
        pass  # training keeps no per-step log

    def attend(self, layer: int, state, query, key, value, groups, scale=None, head_start=None):
        if len(groups) != 1 or groups[0][0] is not None:
            raise ValueError("Structure-aware training handles unpadded self-attention only (one token layout per call).")
        dense = F.scaled_dot_product_attention(query, key, value, scale=scale)
        if len(self.heads[layer]):
            dense = self.structured(layer, dense, query, key, value, groups[0][1], scale)
        return dense, AttentionStats()

    @torch.compiler.disable
    def structured(self, layer: int, dense, q, k, v, layout, scale=None):
        """`dense` with the layer's patterned heads' consistency loss collected and, in sparse mode, their output
        replaced by their pattern's."""
        h = self.heads[layer].to(q.device)
        patterns = [self.head_patterns[layer][i] for i in self.heads[layer].tolist()]
        sparse, _ = self.runtimes[layer](q[:, h].contiguous(), k[:, h].contiguous(), v[:, h].contiguous(), layout, patterns, scale=scale)
        target = dense[:, h]
        error = (sparse - target).pow(2).sum(dim=(2, 3)) / target.pow(2).sum(dim=(2, 3)).clamp_min(1e-12)
        self.losses.append(error.mean())
        if not self.use_sparse:
            return dense
        return dense.index_copy(1, h, sparse)


class StructuredHeads:
    """Installs a `StructureController` on every video self-attention layer of the embedded model's Wan transformer,
    through the diffusers adapter (the same seam as `accelerate`).

    Args:
        transformer: the model (its patch size gives the token grid of each input).
        head_patterns: one pattern name per head per layer ("full" for heads left alone).

    `take_consistency()` returns the mean consistency loss of the forward(s) since the last call; `remove()` puts the
    model's own processors back.
    """

    def __init__(self, transformer: torch.nn.Module, head_patterns: Sequence[Sequence[str]]):
        _require_wan(transformer, "StructuredHeads trains")
        fp = adapter_for(transformer).fingerprint(transformer)
        self.head_patterns = check_head_patterns(head_patterns, fp.num_layers, fp.num_heads)
        self.transformer = transformer
        self.shared = StructureController(self.head_patterns)
        self._installed = install_all(transformer, lambda name, n: self.shared, RunLog())

    def set_sparse(self, use_sparse: bool) -> None:
        self.shared.use_sparse = bool(use_sparse)

    def take_consistency(self) -> torch.Tensor:
        losses, self.shared.losses = self.shared.losses, []
        return torch.stack(losses).mean() if losses else torch.zeros(())

    def remove(self) -> None:
        for installation in self._installed:
            installation.remove()
        self._installed = []


class ProbeController:
    """A controller that leaves every layer dense and records each head's relative L2 error under `candidates`
    (`search.profile.candidate_errors`, the measure of `sparsediff profile`), per layer: `errors[layer]` is a list of
    (H, C) tensors, one per call."""

    may_replace = True

    def __init__(self, candidates: Sequence[str], block_size: int = 64):
        self.candidates = tuple(candidates)
        self.block_size = block_size
        self.errors: dict[int, list[torch.Tensor]] = {}
        self._runtimes: dict[int, dict] = {}

    def active(self, layer: int, state) -> bool:
        return True

    def record(self, state, stats: AttentionStats) -> None:
        pass

    def attend(self, layer: int, state, query, key, value, groups, scale=None, head_start=None):
        from ...search.profile import candidate_errors

        if len(groups) != 1 or groups[0][0] is not None:
            raise ValueError("The head probe handles unpadded self-attention only (one token layout per call).")
        with torch.no_grad():
            errors = candidate_errors(query, key, value, groups[0][1], self.candidates, self.block_size, scale, backend="torch", runtimes=self._runtimes.setdefault(layer, {}))
        self.errors.setdefault(layer, []).append(errors)
        return F.scaled_dot_product_attention(query, key, value, scale=scale), AttentionStats()


@torch.no_grad()
def probe_head_errors(transformer: torch.nn.Module, run, candidates: Sequence[str] = AUTO_CANDIDATES) -> torch.Tensor:
    """(layers, heads, candidates) mean relative error of every head under each candidate over the forwards that
    `run()` makes with `transformer`; the model's processors are back in place afterwards."""
    _require_wan(transformer, "probe_head_errors probes")
    probe = ProbeController(candidates)
    installed = install_all(transformer, lambda name, n: probe, RunLog())
    try:
        run()
    finally:
        for installation in installed:
            installation.remove()
    if not probe.errors:
        raise ValueError("The probe saw no self-attention call; run() must call the transformer.")
    return torch.stack([torch.stack(probe.errors[layer]).mean(dim=0) for layer in sorted(probe.errors)])


def choose_patterns(errors: torch.Tensor, candidates: Sequence[str], full_heads: Sequence[int]) -> tuple[tuple[str, ...], ...]:
    """Each head's best-fitting candidate from `errors` (layers, heads, candidates); in layer l the `full_heads[l]`
    heads that fit their best candidate worst stay "full".

    >>> e = torch.tensor([[[0.1, 0.3], [0.5, 0.2]], [[0.4, 0.9], [0.2, 0.1]]])
    >>> choose_patterns(e, ["diagonal_w0.25", "multi_diagonal_w32"], [0, 1])
    (('diagonal_w0.25', 'multi_diagonal_w32'), ('full', 'multi_diagonal_w32'))
    """
    if errors.ndim != 3 or errors.shape[-1] != len(candidates) or errors.shape[0] != len(full_heads):
        raise ValueError(f"errors of shape {tuple(errors.shape)} do not match {len(full_heads)} layers and {len(candidates)} candidates.")
    best, index = errors.min(dim=-1)
    rows = []
    for layer in range(errors.shape[0]):
        names = [candidates[i] for i in index[layer].tolist()]
        for head in best[layer].argsort(descending=True)[: full_heads[layer]].tolist():
            names[head] = "full"
        rows.append(tuple(names))
    return tuple(rows)


def sparse_step(seed: int, step: int, prob: float) -> bool:
    """Whether `step` passes the sparse outputs on: a function of (seed, step), so a resumed run repeats it."""
    return random.Random(seed * 7_919 + step * 104_729 + 1).random() < prob
