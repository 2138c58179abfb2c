"""The transformers adapter on a tiny bidirectional Llama (an in-tree LLaDA-style denoiser): GQA, padding, exactness."""

import pytest
import torch

import sparsediff
from sparsediff.patterns import get_pattern
from sparsediff.pipelines.adapter import adapter_for, fingerprint
from sparsediff.plan import SparsePlan, StepRange


def bidirectional_llama(implementation="sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, attn_implementation=implementation)
    config.is_causal = False  # a masked diffusion LM attends both ways
    return LlamaForCausalLM(config).eval()


def inputs(padded=True):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (3, 40), generator=g)
    mask = torch.ones(3, 40, dtype=torch.long)
    if padded:
        mask[1, 31:] = 0  # right padding on one row
    return dict(input_ids=ids, attention_mask=mask)


def mixed_plan(model, block_size=8):
    fp = fingerprint(model)
    names = ["diagonal_w4", "skip", "vertical_stripe_f8", "full"]
    layers = tuple(tuple(get_pattern(names[(h + layer) % 4]) for h in range(fp.num_heads)) for layer in range(fp.num_layers))
    return SparsePlan(model=fp, ranges=[StepRange(0.0, 1.0, layers)], block_size=block_size)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_dense_plan_is_exact_and_remove_restores_the_implementation(implementation):
    model = bidirectional_llama(implementation)
    assert adapter_for(model).name == "transformers"
    with torch.no_grad():
        reference = model(**inputs()).logits
        for plan in ("dense", SparsePlan.dense(fingerprint(model), block_size=8)):
            with sparsediff.accelerate(model, plan, num_steps=1) as handle:
                assert model.config._attn_implementation.startswith("sparsediff")
                assert torch.equal(model(**inputs()).logits, reference)
                assert handle.stats and all(s.dense for s in handle.stats)
            assert model.config._attn_implementation == implementation
            assert torch.equal(model(**inputs()).logits, reference)


def test_a_second_accelerate_is_refused():
    model = bidirectional_llama()
    with sparsediff.accelerate(model):
        with pytest.raises(ValueError, match="already accelerated or profiled by sparsediff; call .remove()"):
            sparsediff.accelerate(model)


def test_mixed_plan_with_gqa_and_padding_matches_the_reference_backend():
    """Padded rows run on their valid tokens; GQA heads read their KV group; the torch kernels equal the reference."""
    model = bidirectional_llama()
    plan = mixed_plan(model)
    outs = {}
    with torch.no_grad():
        dense = model(**inputs()).logits
        for backend in ("torch", "reference"):
            with sparsediff.accelerate(model, plan, backend=backend, num_steps=1) as handle:
                outs[backend] = model(**inputs()).logits
                stats = handle.stats
    torch.testing.assert_close(outs["torch"], outs["reference"], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(outs["torch"], dense, atol=1e-3)
    assert len(stats) == 1 and not stats[0].dense and stats[0].heads_skipped == 2 * 1  # one skip head per layer
    assert 0.0 < stats[0].density < 1.0


def test_padded_row_equals_the_same_row_alone():
    """Key padding is honoured: a padded row's valid tokens give what the unpadded shorter row gives."""
    model = bidirectional_llama()
    plan = mixed_plan(model)
    batch = inputs()
    with torch.no_grad(), sparsediff.accelerate(model, plan, backend="torch", num_steps=1):
        together = model(**batch).logits[1, :31]
        alone = model(input_ids=batch["input_ids"][1:2, :31]).logits[0]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_an_exception_in_the_middle_of_a_run_leaves_the_model_clean():
    model = bidirectional_llama()
    plan = mixed_plan(model)
    with torch.no_grad():
        reference = model(**inputs()).logits
        handle = sparsediff.accelerate(model, plan, backend="torch", num_steps=2)
        first = model.model.layers[1].self_attn
        original = first.o_proj.forward
        first.o_proj.forward = lambda x: (_ for _ in ()).throw(RuntimeError("boom"))  # fails inside the last layer
        with pytest.raises(RuntimeError, match="boom"):
            model(**inputs())
        first.o_proj.forward = original
        handle.remove()
        assert model.config._attn_implementation == "sdpa"
        assert not any("_sparsediff_attention" in vars(m) for m in model.modules())
        assert not model._forward_pre_hooks
        assert torch.equal(model(**inputs()).logits, reference)


def llada2(model):
    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline

    pipe = LLaDA2Pipeline(model=model, scheduler=BlockRefinementScheduler(block_length=8, num_inference_steps=4))
    pipe.set_progress_bar_config(disable=True)
    call = dict(input_ids=torch.randint(0, 60, (1, 8), generator=torch.Generator().manual_seed(1)), gen_length=16,
                block_length=8, num_inference_steps=4, mask_token_id=63, output_type="seq", editing_threshold=None,
                threshold=2.0)  # a threshold above 1: exactly the scheduled commits per step, 4 steps per block
    return pipe, call


def test_llada2_pipeline_counts_steps_per_block_and_a_dense_plan_is_exact():
    model = bidirectional_llama()
    pipe, call = llada2(model)
    with torch.no_grad():
        reference = pipe(**call).sequences
        with sparsediff.accelerate(pipe) as handle:  # no shipped plan: dense
            assert torch.equal(pipe(**call).sequences, reference)
            stats = handle.stats
        # a prompt of one block, then 2 generated blocks of 8; each call re-runs the prefix, 4 steps per block
        assert [(s.context, s.step, s.num_steps) for s in stats] == [
            (f"block {b}", i, 4) for b in range(2) for i in range(4)
        ]
        assert torch.equal(pipe(**call).sequences, reference)


def test_llada2_pipeline_runs_dense_early_steps_then_the_plan_in_every_block():
    model = bidirectional_llama()
    pipe, call = llada2(model)
    plan = mixed_plan(model)
    plan.dense_steps = 0.5  # the first half of each block's steps
    with torch.no_grad(), sparsediff.accelerate(pipe, plan, backend="torch") as handle:
        pipe(**call)
        first = [(s.context, s.step, s.dense) for s in handle.stats]
        pipe(**call)  # a second request starts a fresh log
        second = [(s.context, s.step, s.dense) for s in handle.stats]
    assert first == second == [(f"block {b}", i, i < 2) for b in range(2) for i in range(4)]


@pytest.mark.parametrize("plan", ["dense", "mixed"])
def test_compiles_with_fullgraph_and_matches_eager(plan):
    """Dynamo traces the registered attention function (aot_eager: the same trace as Inductor, no C++ build); the
    mixed plan runs inside the op, decided at run time."""
    model = bidirectional_llama()
    plan = mixed_plan(model) if plan == "mixed" else plan
    torch._dynamo.reset()
    with torch.no_grad(), sparsediff.accelerate(model, plan, backend="torch", num_steps=1) as handle:
        eager = model(**inputs()).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs()).logits
        stats = handle.stats
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert all(s.dense == (plan == "dense") for s in stats)


def test_a_compiled_llada2_run_compiles_once_per_block_length():
    """Steps and blocks are found at run time inside the ops: graphs per sequence length (a block adds one), never per
    step, and the same steps run dense and sparse as in eager mode."""
    from torch._dynamo.utils import counters

    model = bidirectional_llama()
    pipe, call = llada2(model)
    plan = mixed_plan(model)
    plan.dense_steps = 0.5
    with torch.no_grad(), sparsediff.accelerate(pipe, plan, backend="torch") as handle:
        eager = pipe(**call).sequences
        eager_stats = [(s.context, s.step, s.dense) for s in handle.stats]
        torch._dynamo.reset()
        counters.clear()
        pipe.model = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
        try:
            compiled = pipe(**call).sequences
        finally:
            pipe.model = model
        compiled_stats = [(s.context, s.step, s.dense) for s in handle.stats]
    # two frames (the pre-hook and the forward) per sequence length (16 and 24); 8 calls
    assert counters["stats"]["unique_graphs"] == 4
    assert compiled_stats == eager_stats
    assert torch.equal(compiled, eager)


def test_profile_and_search_a_plan_on_a_llada2_pipeline(tmp_path, monkeypatch):
    """The text path end to end: profile through the adapter, measured costs, a search scored by token agreement."""
    monkeypatch.setenv("SPARSEDIFF_CACHE_DIR", str(tmp_path / "cache"))
    model = bidirectional_llama()
    pipe, call = llada2(model)
    candidates = ["full", "skip", "diagonal_w4", "topk_blocks_k0.5"]
    prof = sparsediff.profile(pipe, [call], candidates=candidates, block_size=8, progress=False)
    assert prof.errors.shape[-1] == len(candidates) and float(prof.errors[..., 0].max()) == 0.0  # full: no error
    # the prefix before the active block is the prompt, the block the generation (top-k keeps each its own share)
    assert str(prof.layout).startswith("prompt:") and str(prof.layout).endswith("+generation:8")
    plan, summary = sparsediff.search_plan(pipe, prof, [dict(call, seed=0)], out=tmp_path / "plan.json", min_psnr=0.5,
                                           trials=3, backend="torch", progress=False, return_summary=True)
    assert summary["trials"] == 3 and 0.5 <= summary["chosen"]["psnr"] <= 1.0  # token agreement with dense
    with torch.no_grad(), sparsediff.accelerate(pipe, plan, backend="torch"):
        sparsediff_out = pipe(**call).sequences
    assert sparsediff_out.shape == (1, 16)  # the generated tokens


def test_text_trials_are_judged_on_the_final_tokens_not_pruned_at_a_step():
    """A sparse text run may commit slots in another order and still end with the dense tokens: the evaluator records
    each step's agreement but never prunes on it; a video adapter does."""
    import sparsediff
    from sparsediff.pipelines.adapter import Adapter, adapter_for
    from sparsediff.plan import SparsePlan
    from sparsediff.search.quality import PipelineEvaluator

    assert Adapter.prune_on_steps and not adapter_for(bidirectional_llama()).prune_on_steps
    pipe, call = llada2(bidirectional_llama())
    evaluator = PipelineEvaluator(pipe, [dict(call, seed=0)], apply=lambda p, pl: sparsediff.accelerate(p, pl, backend="torch"),
                                  adapter=adapter_for(pipe))
    reports = []
    plan = SparsePlan.uniform(fingerprint(pipe.model), "skip", block_size=8)
    result = evaluator(plan, lambda step, value: reports.append(step))
    # (on this random tiny model the steps' agreement dipped to 0.5 and the final tokens agreed: the case in point)
    assert reports == [] and len(result.step_psnr) >= 2 and all(0.0 <= q <= 1.0 for q in result.step_psnr)


def saved_llada2(path):
    """A LLaDA2Pipeline with a word-level tokenizer (mask, pad and end tokens), saved like a user's pipeline."""
    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(60)]
    vocab = {"<pad>": 60, "</s>": 61, "<unk>": 62, "<mask>": 63, **{w: i for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", mask_token="<mask>")
    pipe = LLaDA2Pipeline(model=bidirectional_llama(), tokenizer=tokenizer,
                          scheduler=BlockRefinementScheduler(block_length=8, num_inference_steps=4))
    pipe.save_pretrained(path)
    tokenizer.save_pretrained(path / "tokenizer")  # diffusers 0.42.1's save_pretrained leaves LLaDA2's tokenizer out
    return pipe


def test_cli_generate_text_dense_and_with_a_plan(tmp_path, capsys):
    import json

    from sparsediff.cli import main
    from sparsediff.pipelines.adapter import fingerprint

    pipe = saved_llada2(tmp_path / "pipe")
    plan = mixed_plan(pipe.model)
    plan.save(tmp_path / "plan.json")
    args = ["generate", "text", "--model", str(tmp_path / "pipe"), "--prompt", "w1 w2 w3 w4 w5 w6 w7 w8", "--steps", "4",
            "--gen-length", "16", "--block-length", "8", "--device", "cpu", "--json"]
    outputs = {}
    for name, extra in (("dense", ["--plan", "dense"]), ("plan", ["--plan", str(tmp_path / "plan.json")])):
        assert main(args + extra) == 0
        outputs[name] = json.loads(capsys.readouterr().out)
    assert outputs["dense"]["dense"] is True and outputs["plan"]["sparse_density"] < 1.0
    assert all(isinstance(t, str) and t for o in outputs.values() for t in o["texts"])
    with torch.no_grad():  # the dense CLI run is the pipeline's own output
        from sparsediff.generate import generate_text

        direct = generate_text(pipe, ["w1 w2 w3 w4 w5 w6 w7 w8"], "dense", num_inference_steps=4, gen_length=16, block_length=8)
    assert direct.texts == outputs["dense"]["texts"]
    assert fingerprint(pipe.model).num_layers == 2


def tiny_diffusion_gemma():
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma.configuration_diffusion_gemma import DiffusionGemmaConfig

    torch.manual_seed(0)
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                layer_types=["sliding_attention", "full_attention"], num_key_value_heads=2, head_dim=8,
                global_head_dim=16, num_global_key_value_heads=1, sliding_window=8, num_experts=4, top_k_experts=2,
                moe_intermediate_size=16)
    vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=8)
    return DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=8)).eval()


def test_diffusion_gemma_dense_plan_is_exact_and_the_decoder_runs_sparse_over_its_cache(caplog, monkeypatch):
    """Per-layer head dims and KV heads read per module; a dense plan is exact through the encoder and the decoder; a
    sparse plan runs the decoder's calls over cache + canvas sparse (sliding and full layers, scaling 1.0), while the
    causal encoder stays dense with one warning. More in test_diffusion_gemma.py."""
    from sparsediff.kernels import log

    monkeypatch.setattr(log, "_warned", set())
    model = tiny_diffusion_gemma()
    g = torch.Generator().manual_seed(0)
    args = dict(input_ids=torch.randint(0, 120, (1, 12), generator=g), decoder_input_ids=torch.randint(0, 120, (1, 8), generator=g))
    fp = fingerprint(model)
    assert (fp.num_layers, fp.num_heads, fp.head_dim) == (5, 4, 8)  # 2 encoder, 1 vision, 2 decoder attention modules
    with torch.no_grad():
        reference = model(**args).logits
        for plan in ("dense", SparsePlan.dense(fp, block_size=4)):
            with sparsediff.accelerate(model, plan, num_steps=1) as handle:
                assert torch.equal(model(**args).logits, reference)
                assert [(s.model, s.dense) for s in handle.stats] == [("model encoder", True), ("model", True)]
        plan = SparsePlan.uniform(fp, "diagonal_w2", block_size=4)
        with caplog.at_level("WARNING"), sparsediff.accelerate(model, plan, backend="torch", num_steps=1) as handle:
            sparse = model(**args).logits
            assert [(s.model, s.dense) for s in handle.stats] == [("model encoder", True), ("model", False)]
        assert (sparse - reference).abs().max() > 1e-2
        assert any("is causal" in r.message for r in caplog.records)
        assert model.config._attn_implementation == "sdpa" and torch.equal(model(**args).logits, reference)


def test_topk_selection_runs_once_per_request_and_block(monkeypatch):
    """SparseD's selection (the exact block mass of the first sparse step) is computed once per layer and block, then
    reused for the block's later steps; a second request selects anew (nothing is shared between requests)."""
    import sparsediff.runtime as runtime

    model = bidirectional_llama()
    pipe, call = llada2(model)
    call["eos_early_stop"] = False
    selections = []
    real = runtime.block_attention_mass
    monkeypatch.setattr(runtime, "block_attention_mass", lambda q, k, *a, **kw: selections.append(k.shape[2]) or real(q, k, *a, **kw))
    plan = SparsePlan.uniform(fingerprint(model), "topk_blocks_k1_p0.5", block_size=4, dense_steps=1)
    with torch.no_grad(), sparsediff.accelerate(pipe, plan, backend="torch") as handle:
        pipe(**call)
        first = list(selections)
        assert [s.dense for s in handle.stats] == [True, False, False, False] * 2  # 2 blocks x 4 steps, step 0 dense
        pipe(**call)
    layers, blocks = 2, 2  # an 8-token prompt (a whole block: prefilled) then 16 generated tokens: 16 and 24 keys
    assert len(first) == layers * blocks and sorted(set(first)) == [16, 24]
    assert selections == first + first  # the second request selected again, the same way


def test_cli_profile_and_search_on_a_saved_text_pipeline(tmp_path, capsys):
    """`sparsediff profile` and `search` on a saved LLaDA2Pipeline: the calls carry the text pipeline's lengths, the
    profile asks for token sequences (not latents), and the search's floor is token agreement."""
    import json

    from sparsediff.cli import main
    from sparsediff.plan import SparsePlan

    saved_llada2(tmp_path / "pipe")
    (tmp_path / "prompts.txt").write_text("w1 w2 w3 w4 w5 w6 w7 w8\nw9 w8 w7 w6 w5 w4 w3 w2\n")
    assert main(["profile", "--model", str(tmp_path / "pipe"), "--prompts", str(tmp_path / "prompts.txt"), "--steps", "4",
                 "--gen-length", "16", "--block-length", "8", "--candidates", "full,skip,diagonal_w4,topk_blocks_k1_p0.5",
                 "--block-size", "4", "--out", str(tmp_path / "prof"), "--device", "cpu", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"].startswith("prompt:") and info["prompts"] == 2
    assert main(["search", "--model", str(tmp_path / "pipe"), "--profile", str(tmp_path / "prof"), "--out",
                 str(tmp_path / "plan.json"), "--min-psnr", "0.5", "--trials", "3", "--backend", "torch", "--device", "cpu",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    plan = SparsePlan.load(tmp_path / "plan.json")
    assert summary["trials"] == 3 and 0.5 <= plan.search["psnr"] <= 1.0  # token agreement, not dB


def test_calls_shorter_than_min_tokens_run_the_models_own_attention():
    """A plan with `min_tokens` above the call's length leaves the model exactly as it is (sparse plan or not); at or
    below the call's length the plan runs sparse. The field round-trips through JSON."""
    model = bidirectional_llama()
    plan = mixed_plan(model)
    with torch.no_grad():
        reference = model(**inputs(padded=False)).logits
        plan.min_tokens = 41  # the calls hold 40 tokens
        with sparsediff.accelerate(model, SparsePlan.from_dict(plan.to_dict()), num_steps=1) as handle:
            assert torch.equal(model(**inputs(padded=False)).logits, reference)
            assert handle.stats and all(s.dense for s in handle.stats)
        plan.min_tokens = 40
        with sparsediff.accelerate(model, plan, num_steps=1) as handle:
            sparse = model(**inputs(padded=False)).logits
            assert not any(s.dense for s in handle.stats)
    assert not torch.equal(sparse, reference)


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "4096"])
def test_a_bad_min_tokens_is_named_with_the_fix(value):
    data = mixed_plan(bidirectional_llama()).to_dict()
    data["min_tokens"] = value
    with pytest.raises(ValueError, match=r"Plan field 'min_tokens' is .*give a positive token count"):
        SparsePlan.from_dict(data)
