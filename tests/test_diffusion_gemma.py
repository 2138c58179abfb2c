"""DiffusionGemma through sparsediff: calls whose queries are the last keys (a canvas over a cache), the decoder's
calls sparse, the pipeline's mask-builder fix, and diffusers' DiffusionGemmaPipeline on a tiny offline model."""

import logging

import pytest
import torch

import sparsediff
from sparsediff.kernels.reference import reference_attention
from sparsediff.layout import TokenLayout
from sparsediff.patterns import get_pattern
from sparsediff.runtime import SparseAttention

PATTERNS = ["diagonal_w3", "vertical_stripe_f5", "topk_blocks_k0.5_p0.25", "full", "skip", "diagonal_w1"]


def suffix_qkv(num_keys, num_queries, heads=len(PATTERNS), dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(2, heads, num_keys, dim, generator=g) for _ in range(2))
    return torch.randn(2, heads, num_queries, dim, generator=g), k, v


@pytest.mark.parametrize("num_keys,num_queries,block_size", [(40, 16, 8), (97, 30, 16), (130, 64, 32), (48, 48, 16)])
def test_queries_that_are_the_last_keys_equal_the_pattern_rows_of_the_full_mask(num_keys, num_queries, block_size):
    """The torch backend on the last Sq queries equals dense attention masked with the patterns' token masks
    restricted to those rows (ragged lengths, canvas starting inside a block); the reference backend too."""
    layout = TokenLayout.parse(f"prompt:{num_keys - num_queries}+generation:{num_queries}" if num_keys > num_queries
                               else f"generation:{num_keys}")
    q, k, v = suffix_qkv(num_keys, num_queries)
    outs = {}
    for backend in ("torch", "reference"):
        attention = SparseAttention(backend=backend, rows_per_block=block_size)
        outs[backend], stats = attention(q, k, v, layout, PATTERNS, block_size)
        groups = {g.pattern.name: g for g in stats.groups}
    rows = torch.arange(num_keys - num_queries, num_keys)
    masks = []
    for h, name in enumerate(PATTERNS):
        pattern = get_pattern(name)
        scores = groups[pattern.name].spec.block_mask[0].float() if pattern.needs_scores else None  # the chosen blocks
        full = pattern.token_mask(layout, block_size, scores) if scores is None else \
            pattern.token_rows(layout, torch.arange(num_keys), block_size, scores)
        masks.append(full[rows])
    expected = reference_attention(q, k, v, torch.stack(masks))
    torch.testing.assert_close(outs["torch"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["reference"], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outs["torch"], torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-2)
    # density counts the rows that ran: every head's share of the (Sq x S) area, skip 0 and full 1
    assert 0.0 < stats.density < 1.0 and stats.heads_skipped == 1 and stats.heads_full == 1


def test_topk_on_the_last_queries_keeps_each_share_of_prompt_and_generation_keys():
    """Scores come from the rows that run; per query block, ceil(share * blocks) of each kind (a block holding any
    generation token counts as generation)."""
    layout = TokenLayout.parse("prompt:64+generation:32")
    q, k, v = suffix_qkv(96, 32, heads=2)
    _, stats = SparseAttention(backend="torch")(q, k, v, layout, ["topk_blocks_k0.5_p0.25"] * 2, block_size=8)
    mask = stats.groups[0].spec.block_mask  # (2, 12, 12)
    kept = mask[:, 8:]  # the canvas' query blocks
    assert torch.equal(kept[..., 8:].sum(-1), torch.full((2, 4), 2))  # half of 4 generation blocks
    assert torch.equal(kept[..., :8].sum(-1), torch.full((2, 4), 2))  # a quarter of 8 prompt blocks
    assert stats.density == pytest.approx(4 * 8 / 96)  # 4 of 12 key blocks for each canvas row


def test_other_backends_fall_back_to_torch_for_the_last_queries_with_one_warning(caplog, monkeypatch):
    from sparsediff.kernels import log

    monkeypatch.setattr(log, "_warned", set())
    layout = TokenLayout.parse("prompt:24+generation:16")
    q, k, v = suffix_qkv(40, 16, heads=1)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            out, stats = SparseAttention(backend="flex")(q, k, v, layout, ["diagonal_w2"], block_size=8)
    assert stats.backend == "torch"
    assert sum("queries are only the last keys" in r.message for r in caplog.records) == 1
    with pytest.raises(ValueError, match="q has 41 tokens but k only 40"):
        SparseAttention()(torch.randn(1, 1, 41, 16), k[:1, :1], v[:1, :1], layout, ["full"])


def tiny_diffusion_gemma():
    from test_transformers_adapter import tiny_diffusion_gemma as build

    return build()


def tiny_processor():
    """What the pipeline needs of a processor: `apply_chat_template`, `batch_decode` and an EOS id; a word-level fast
    tokenizer with a chat template serves (no Gemma-4 processor or hub download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {**{f"w{i}": i for i in range(120)}, "<pad>": 120, "<eos>": 121, "<unk>": 122, "<bos>": 123}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>", bos_token="<bos>")
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tokenizer


def mixed_plan(model, block_size=4):
    """`diagonal_w1`, `topk_blocks_k0.5_p0.5`, `full` and `vertical_stripe_f2` heads, rotated per layer."""
    from sparsediff.pipelines.adapter import fingerprint
    from sparsediff.plan import SparsePlan, StepRange

    fp = fingerprint(model)
    names = ["diagonal_w1", "topk_blocks_k0.5_p0.5", "full", "vertical_stripe_f2"]
    layers = tuple(tuple(get_pattern(names[(h + layer) % 4]) for h in range(fp.num_heads)) for layer in range(fp.num_layers))
    return SparsePlan(model=fp, ranges=[StepRange(0.0, 1.0, layers)], block_size=block_size)


def gemma_pipeline():
    from diffusers import BlockRefinementScheduler, DiffusionGemmaPipeline

    pipe = DiffusionGemmaPipeline(model=tiny_diffusion_gemma(), scheduler=BlockRefinementScheduler(), processor=tiny_processor())
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt=["w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11", "w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15"], gen_length=16,
                num_inference_steps=4, output_type="seq", confidence_threshold=None, eos_early_stop=False)
    return pipe, call


def run(pipe, call):
    return pipe(**call, generator=torch.Generator().manual_seed(0)).sequences


def test_pipeline_runs_with_the_fix_a_dense_plan_is_exact_and_remove_restores_everything():
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaDecoderModel

    from sparsediff.pipelines.diffusion_gemma import BUILDER, fix_pipeline

    pipe, call = gemma_pipeline()
    decoder = pipe.model.model.decoder
    original = DiffusionGemmaDecoderModel.create_diffusion_decoder_attention_mask
    with pytest.raises(TypeError, match="past_key_values"):  # transformers 5.24.0 names it `cache`
        run(pipe, call)
    fix = fix_pipeline(pipe)
    reference = run(pipe, call)
    fix.remove()
    assert getattr(decoder, BUILDER) is original and BUILDER not in vars(decoder)
    assert reference.shape == (2, 16) and int(reference.max()) < 128  # two canvases of 8 tokens

    with sparsediff.accelerate(pipe, "dense") as handle:  # the fix comes with the installation
        assert torch.equal(run(pipe, call), reference)
        stats = handle.stats
    assert [(s.model, s.context, s.step) for s in stats] == [
        (model, f"canvas {c}", step) for c in range(2) for model, step in [("model encoder", 0)] + [("model", i) for i in range(4)]
    ]
    assert all(s.dense for s in stats)
    assert getattr(decoder, BUILDER) is original and BUILDER not in vars(decoder)
    assert pipe.model.config._attn_implementation == "sdpa"
    assert not any(m._forward_pre_hooks for m in pipe.model.modules())
    assert not any("_sparsediff_attention" in vars(m) for m in pipe.model.modules())
    with pytest.raises(TypeError, match="past_key_values"):  # back to the installed pipeline as it is
        run(pipe, call)

    fix = fix_pipeline(pipe)  # a fix the user made stays when an installation comes and goes
    user_builder = getattr(decoder, BUILDER)
    with sparsediff.accelerate(pipe, "dense"):
        assert getattr(decoder, BUILDER) is user_builder
    assert getattr(decoder, BUILDER) is user_builder and torch.equal(run(pipe, call), reference)
    fix.remove()
    assert getattr(decoder, BUILDER) is original
    with pytest.raises(ValueError, match="holds no DiffusionGemma decoder"):
        fix_pipeline(torch.nn.Linear(2, 2))


def test_a_mixed_plan_runs_the_decoder_sparse_and_the_encoder_dense(caplog, monkeypatch):
    """Through the pipeline: every decoder step over cache + canvas runs sparse (sliding and full layers), the causal
    encoder stays dense with one warning, and the tokens differ from the dense run's."""
    from sparsediff.kernels import log

    monkeypatch.setattr(log, "_warned", set())
    pipe, call = gemma_pipeline()
    plan = mixed_plan(pipe.model)
    with sparsediff.accelerate(pipe, "dense"):
        dense = run(pipe, call)
    with caplog.at_level(logging.WARNING), sparsediff.accelerate(pipe, plan, backend="torch") as handle:
        sparse = run(pipe, call)
        stats = handle.stats
    encoder = [s for s in stats if s.model == "model encoder"]
    decoder = [s for s in stats if s.model == "model"]
    assert len(encoder) == 2 and all(s.dense for s in encoder)
    assert len(decoder) == 8 and all(not s.dense and 0.0 < s.density < 1.0 and s.layers == 2 for s in decoder)
    assert sum("is causal" in r.message and "encoder" in r.message for r in caplog.records) == 1
    assert not torch.equal(sparse, dense)


def encoder_decoder_inputs(padded: bool):
    """Two prompts of 12 tokens (the second right-padded to 9 valid ones) and a canvas of 8; the canvas' positions
    follow each row's valid prompt."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 120, (2, 12), generator=g)
    canvas = torch.randint(0, 120, (2, 8), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    if padded:
        mask[1, 9:] = 0
    valid = mask.sum(-1)
    return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=canvas,
                decoder_attention_mask=torch.cat([mask, torch.ones(2, 8, dtype=torch.long)], dim=1).bool(),
                decoder_position_ids=valid[:, None] + torch.arange(8))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_decoder_calls_over_cache_and_canvas_equal_the_reference_backend(dtype, tolerance):
    """The decoder's queries are the canvas, its keys the cached prompt plus the canvas: the torch path equals the
    reference backend (dense attention masked with each pattern's rows for the canvas) and differs from dense. In
    bfloat16 the torch path's suffix queries run through the compiled kernel in float32 (through SDPA on a CPU with
    AMX); the reference in bfloat16."""
    model = tiny_diffusion_gemma().to(dtype)
    plan = mixed_plan(model)
    args = encoder_decoder_inputs(padded=True)
    with torch.no_grad():
        dense = model(**args).logits
        outs = {}
        for backend in ("torch", "reference"):
            with sparsediff.accelerate(model, plan, backend=backend, num_steps=1) as handle:
                outs[backend] = model(**args).logits
                stats = handle.stats
    assert next(model.parameters()).dtype == dtype
    torch.testing.assert_close(outs["torch"], outs["reference"], atol=tolerance, rtol=tolerance)
    assert (outs["torch"].float() - dense.float()).abs().max() > 1e-2
    assert [(s.model, s.dense) for s in stats] == [("model encoder", True), ("model", False)]


def test_top_k_over_a_cache_never_selects_masked_keys_and_keeps_each_share():
    """Masked keys (a padded prompt's) are outside the layout, so top-k never picks them: changing the padded tokens
    leaves the padded row's logits as they were. In every call the canvas' query blocks keep half the prompt and half
    the canvas key blocks."""
    model = tiny_diffusion_gemma()
    plan = mixed_plan(model)
    batch = encoder_decoder_inputs(padded=True)
    other = dict(batch, input_ids=batch["input_ids"].clone())
    other["input_ids"][1, 9:] = torch.tensor([3, 77, 101])  # different tokens behind the mask
    with torch.no_grad(), sparsediff.accelerate(model, plan, backend="torch", num_steps=1) as handle:
        first = model(**batch).logits[1]
        runtimes = handle._installations[0].controller.runtimes
        selected = [(key[0], g) for layer in (3, 4) for key, groups in runtimes[layer]._groups.items() for g in groups
                    if g.pattern.kind == "topk_blocks"]  # (layout, head group) of each top-k selection
        handle.reset()
        second = model(**other).logits[1]
    torch.testing.assert_close(first, second, atol=1e-6, rtol=1e-6)
    assert len(selected) == 4  # two decoder layers, two rows with their own valid keys each
    for layout, group in selected:
        prompt_len = int(layout.split("+")[0].split(":")[1])
        n = -(-(prompt_len + 8) // 4)
        first = prompt_len // 4  # the first query block holding canvas rows
        gen = torch.zeros(n, dtype=torch.bool)
        gen[prompt_len // 4 :] = True  # a block holding any canvas token counts as generation
        kept = group.spec.block_mask[:, first:]  # (G, canvas query blocks, n)
        assert torch.equal(kept[..., gen].sum(-1), torch.full(kept.shape[:2], -(-int(gen.sum()) // 2)))
        assert torch.equal(kept[..., ~gen].sum(-1), torch.full(kept.shape[:2], -(-int((~gen).sum()) // 2)))
