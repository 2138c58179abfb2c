"""The embedded diffusion LM: its tasks, tokenizer, resumable training, and the shipped model and plan."""

import json

import numpy as np
import pytest
import torch

from sparsediff.pipelines.embedded_text import tasks as T
from sparsediff.pipelines.embedded_text.model import build_tokenizer, embedded_text_path


@pytest.mark.parametrize("kind", T.KINDS)
def test_tasks_are_deterministic_aligned_and_answerable_from_the_prompt(kind):
    a = T.make_task(kind, 300, np.random.default_rng(7))
    b = T.make_task(kind, 300, np.random.default_rng(7))
    c = T.make_task(kind, 300, np.random.default_rng(8))
    assert a == b and a != c
    assert len(a.prompt) == 304 and len(a.prompt) % T.ALIGN == 0  # rounded up to the generation block
    assert a.prompt[-3] == "?" and a.prompt[-1] == "->"
    asked, text = a.prompt[-2], " ".join(a.prompt)
    if kind == "hops":  # asked -> middle key -> value, both pairs in the prompt
        middle, value = a.answer
        assert f"{asked} = {middle} ;" in text and f"{middle} = {value} ;" in text
    else:
        assert len(a.answer) == 1 and f"{asked} = {a.answer[0]} ;" in text
        assert text.count(f"{asked} =") == 1  # keys are unique: one right answer
    assert a.target()[: len(a.answer)] == a.answer and len(a.target()) == T.ANSWER_SLOTS
    assert set(a.target()[len(a.answer):]) == {"<eos>"}


def test_held_out_tasks_never_repeat_training_draws_and_bad_requests_are_refused():
    from sparsediff.pipelines.embedded_text.evaluate import held_out_tasks

    held = held_out_tasks(6, 128)
    train = T.task_set(6, 128, T.TRAIN_SEED)
    assert not {t.prompt_text for t in held} & {t.prompt_text for t in train}
    with pytest.raises(ValueError, match="'sorting' is not one of lookup, needle, hops"):
        T.make_task("sorting", 256, np.random.default_rng(0))
    with pytest.raises(ValueError, match="32 tokens is too short"):
        T.make_task("lookup", 32, np.random.default_rng(0))


def test_answer_matching_is_exact():
    task = T.Task("hops", ["?", "k1", "->"], ["k2", "v3"])
    assert T.answer_correct("k2 v3", task) and T.answer_correct("k2 v3 <eos>", task)
    assert not T.answer_correct("k2", task) and not T.answer_correct("k2 v3 v3", task) and not T.answer_correct("v3 k2", task)


def test_tokenizer_maps_words_to_the_vocabulary_and_back():
    tok = build_tokenizer()
    task = T.make_task("lookup", 128, np.random.default_rng(0))
    ids = tok(task.prompt_text).input_ids
    assert ids == [T.VOCAB.index(w) for w in task.prompt]  # no special tokens added, no word split
    assert tok.decode(ids) == task.prompt_text
    assert tok.decode([T.VOCAB.index("v5"), T.VOCAB.index("<eos>")], skip_special_tokens=True) == "v5"
    assert (tok.mask_token_id, tok.pad_token_id, tok.eos_token_id) == (1, 0, 2)


@pytest.mark.parametrize("recipe", [{}, {"aux_weight": 1.0, "aux_layer": 2, "redraw_attention_at": 2}])
def test_training_resumes_exactly_where_it_stopped(tmp_path, recipe):
    from sparsediff.pipelines.embedded_text.train import TrainConfig, train

    cfg = TrainConfig(steps=4, tokens_per_batch=256, min_len=64, max_len=64, eval_every=1000, **recipe)
    whole = train(tmp_path / "whole", cfg, minutes=10, log=lambda _: None)
    half = train(tmp_path / "split", cfg, minutes=10, log=lambda _: None, until_step=2)
    assert torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["step"] == 2 and half["loss"] == []
    train(tmp_path / "split", cfg, minutes=10, log=lambda _: None)  # the same command again continues
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["model"]
    for k in a:  # same batches, masks and updates; to float tolerance (BLAS paths may differ with alignment on some CPUs)
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert (tmp_path / "whole" / "pipeline" / "tokenizer" / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="another configuration"):
        train(tmp_path / "split", TrainConfig(steps=5, tokens_per_batch=256, min_len=64, max_len=64), minutes=1)


shipped = pytest.mark.skipif(not (embedded_text_path() / "model_index.json").is_file(), reason="the embedded DLM is not trained yet")


@shipped
def test_the_shipped_model_answers_held_out_tasks_and_its_plan_fits(capsys):
    """The shipped weights answer held-out tasks dense (a floor well under the measured accuracy: BENCHMARKS §7), and
    `generate text --model embedded` uses the shipped plan, which was searched for this model: dense below its
    `min_tokens`, sparse at 4k."""
    from sparsediff.api import load_pipeline, resolve_plan
    from sparsediff.cli import main
    from sparsediff.pipelines.adapter import fingerprint
    from sparsediff.pipelines.embedded_text.evaluate import held_out_tasks, run_tasks

    pipe = load_pipeline("embedded", "cpu", kind="text")
    pipe.set_progress_bar_config(disable=True)
    plan = resolve_plan(pipe, "auto")
    assert plan is not None and plan.model.mismatch(fingerprint(pipe.model)) is None
    tasks = held_out_tasks(6, 256)
    dense = run_tasks(pipe, tasks, "dense")
    assert dense.accuracy(tasks) >= 0.8
    assert plan.min_tokens == 4096  # shorter prompts run dense: the plan lost answers there (BENCHMARKS 7a)
    short, long = tasks[0], held_out_tasks(1, 4096)[0]
    for task, sparse in ((short, False), (long, True)):
        assert main(["generate", "text", "--model", "embedded", "--prompt", task.prompt_text, "--device", "cpu", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["plan"] == "auto" and len(out["texts"]) == 1
        assert (out["calls"] > out["dense_calls"]) == sparse  # the shipped plan ran sparse at 4k only


@shipped
def test_dtype_reaches_every_component_of_a_saved_pipeline():
    """`--dtype` loads each component in that dtype, the transformers model the pipeline's loader skips included; a
    dtype that is not one of the three is refused with the names."""
    from sparsediff.api import load_pipeline

    import sparsediff

    pipe = load_pipeline("embedded", "cpu", kind="text", dtype="bfloat16")
    assert pipe.model.dtype == torch.bfloat16 and pipe.dtype == torch.bfloat16
    with sparsediff.accelerate(pipe) as handle:  # the shipped plan holds in any dtype (its config hash leaves it out)
        assert handle.config.plan is not None and handle.config.plan.min_tokens == 4096 and handle.models == ["model"]
    with pytest.raises(ValueError, match=r"dtype 'fp8' is not one of float32, float16, bfloat16; pass --dtype bfloat16"):
        load_pipeline("embedded", "cpu", kind="text", dtype="fp8")


@pytest.mark.skipif((embedded_text_path() / "model_index.json").is_file(), reason="the embedded DLM ships")
def test_a_missing_embedded_dlm_is_named_with_the_fix(capsys):
    from sparsediff.cli import main

    assert main(["generate", "text", "--model", "embedded", "--prompt", "? k1 ->", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "The embedded text model is missing" in err and "samples/train_embedded_text.py --ship" in err


def test_compare_plans_runs_the_same_tasks_dense_and_sparse():
    """The demo's and the eval sample's comparison: the same tasks both ways, results in task order, the sparse side
    really sparse after its dense step."""
    from sparsediff.pipelines.adapter import fingerprint
    from sparsediff.pipelines.embedded_text.evaluate import compare_plans, held_out_tasks
    from sparsediff.pipelines.embedded_text.model import build_model, build_pipeline
    from sparsediff.plan import SparsePlan

    pipe = build_pipeline(build_model())
    pipe.set_progress_bar_config(disable=True)
    tasks = held_out_tasks(3, 128)
    plan = SparsePlan.uniform(fingerprint(pipe.model), "diagonal_w16", block_size=16, dense_steps=1)
    ticks = []
    dense, sparse = compare_plans(pipe, tasks, plan, backend="torch", progress=lambda: ticks.append(1))
    assert len(ticks) == 6 and len(dense.texts) == len(sparse.texts) == 3
    assert dense.sequences.shape == sparse.sequences.shape == (3, T.ANSWER_SLOTS)
    assert 0.0 < sparse.stats["sparse_density"] < 1.0 and 0.0 <= sparse.agreement(dense) <= 1.0
    again, _ = compare_plans(pipe, tasks, "dense", backend="torch")
    assert torch.equal(again.sequences, dense.sequences)  # dense runs are deterministic, so agreement means something


def test_recall_sequences_hold_every_value_many_times_and_ask_about_one():
    import numpy as np
    from sparsediff.pipelines.embedded_text.train import TrainConfig, batch, recall_sequence

    words, positions, target = recall_sequence(96, 3, np.random.default_rng(0))
    assert len(words) == 96 and words[-3] == "?" and words[-1] == "->"
    binding = {}
    for p in positions:  # each position is a value right after "key =", and a key always has the same value
        assert words[p - 1] == "=" and words[p].startswith("v") and words[p - 2].startswith("k")
        assert binding.setdefault(words[p - 2], words[p]) == words[p]
    assert len(binding) <= 3 and len(positions) >= 96 // 5 - 2
    assert target[0] == binding[words[-2]] and target[1:] == ["<eos>"] * 7
    ids, supervised = batch(TrainConfig(recall_share=1.0, min_len=64, max_len=64, curriculum=0), np.random.default_rng(1))
    assert (supervised.sum(1) > 8).all()  # the values as well as the answer slots


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_models_attend_both_ways_and_qwen3_normalises_q_and_k(arch):
    """The DLM (and the QK-norm variant the binding probe tries) is bidirectional: the first position's output
    changes when only the last token does."""
    from sparsediff.pipelines.embedded_text.model import build_model

    model = build_model(0, arch).eval()
    assert hasattr(model.model.layers[0].self_attn, "q_norm") == (arch == "qwen3")
    x = torch.randint(0, len(T.VOCAB), (1, 12), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % len(T.VOCAB)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=x).logits[0, 0], model(input_ids=y).logits[0, 0])
    with pytest.raises(ValueError, match="arch='gpt2'; choose one of llama, qwen3"):
        build_model(0, "gpt2")


def test_aux_targets_name_each_visible_values_key_and_the_asked_key():
    from sparsediff.pipelines.embedded_text import train as TR

    words, positions, target = TR.recall_sequence(60, 3, np.random.default_rng(0))
    ids = torch.tensor([TR.encode(words + target)])
    rows, cols, keys = TR.aux_targets(ids, ids)
    first = ids.shape[1] - T.ANSWER_SLOTS
    assert cols.tolist() == positions + [first]
    assert [T.VOCAB[k] for k in keys] == [words[p - 2] for p in positions] + [words[-2]]
    x = ids.clone()
    x[0, positions[0] - 2] = TR.MASK  # the first value's key hidden: it names nothing
    x[0, positions[1]] = TR.MASK  # the second value hidden: nothing to name it from
    assert TR.aux_targets(ids, x)[1].tolist() == positions[2:] + [first]
    words = ["k1", "=", "k2", ";", "the", "k2", "=", "v3", ";", "?", "k1", "->"] + ["<mask>"] * T.ANSWER_SLOTS
    ids = torch.tensor([TR.encode(words)])
    rows, cols, keys = TR.aux_targets(ids, ids)  # a hops chain: the key bound to a key names its key too
    assert cols.tolist() == [2, 7, 12] and [T.VOCAB[k] for k in keys] == ["k1", "k2", "k1"]


def test_redraw_attention_replaces_upper_layers_q_and_k_only():
    from sparsediff.pipelines.embedded_text import train as TR
    from sparsediff.pipelines.embedded_text.model import build_model

    model = build_model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.ones((1, 8), dtype=torch.long)).logits.sum().backward()
    opt.step()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    TR.redraw_attention(model, 2, seed=5, opt=opt)
    for name, value in model.state_dict().items():
        redrawn = any(f"layers.{i}.self_attn.{p}_proj" in name for i in (2, 3) for p in "qk")
        assert torch.equal(value, snapshot[name]) != redrawn, name
        if redrawn:
            assert abs(value.std().item() - 0.02) < 0.002 and not torch.equal(value, before[name])
            assert dict(model.named_parameters())[name] not in opt.state
    again = build_model(0)
    TR.redraw_attention(again, 2, seed=5)
    assert torch.equal(again.model.layers[3].self_attn.q_proj.weight, model.model.layers[3].self_attn.q_proj.weight)


def test_short_prompts_ask_one_of_their_pairs_or_echo_the_key():
    rng = np.random.default_rng(3)
    words, target = T.short_prompt(rng, 3, 5)
    text = " ".join(words)
    assert len(words) == 3 * 4 + 5 + 3 and words[-3] == "?" and words[-1] == "->"
    assert f"{words[-2]} = {target[0]} ;" in text and target[1:] == ["<eos>"] * (T.ANSWER_SLOTS - 1)
    words, target = T.short_prompt(rng, 3, 5, echo=True)
    assert words[-3] == ";" and target[0] == words[-2] and f"{words[-2]} =" in " ".join(words)
    answers = [w for prompt in (T.short_prompt(rng, 4, 0, key_values=0.5)[0] for _ in range(20)) for w in prompt[2:-3:4]]
    assert {a[0] for a in answers} == {"k", "v"}  # some pairs bind a key to a key
    assert T.short_prompt(np.random.default_rng(9), 3, 5) == T.short_prompt(np.random.default_rng(9), 3, 5, key_values=0.0)


def test_short_phase_batches_then_a_share_of_short_batches_with_more_pairs():
    from sparsediff.pipelines.embedded_text.train import TrainConfig, short_batch

    cfg = TrainConfig(short_steps=10, short_batch=6, short_pairs=2, short_pairs_late=16, echo_share=0.0)

    def pairs(ids):
        return int((ids[0] == T.VOCAB.index("=")).sum())

    rng = np.random.default_rng(0)
    early = [short_batch(cfg, rng, step=5) for _ in range(20)]
    late = [short_batch(cfg, rng, step=10) for _ in range(20)]
    for ids, supervised in early + late:
        assert ids.shape[0] == 6 and supervised.sum() == 6 * T.ANSWER_SLOTS and supervised[:, -T.ANSWER_SLOTS:].all()
    assert max(pairs(ids) for ids, _ in early) <= 2 < max(pairs(ids) for ids, _ in late) <= 16


def test_the_all_masked_loss_is_the_mean_cross_entropy_of_every_slot_masked():
    import torch.nn.functional as F
    from sparsediff.pipelines.embedded_text import train as TR
    from sparsediff.pipelines.embedded_text.model import build_model

    model = build_model(0).eval()
    ids, supervised = TR.short_batch(TR.TrainConfig(short_steps=1, short_batch=3), np.random.default_rng(0), 0)
    with torch.no_grad():
        loss = TR.loss_of(model, ids, supervised, np.random.default_rng(1), all_masked=True)
        x = ids.masked_fill(supervised, TR.MASK)
        logits = model(input_ids=x).logits[:, -T.ANSWER_SLOTS:]
        expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, -T.ANSWER_SLOTS:].reshape(-1))
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        # the LLaDA loss masks a random share: another value
        assert not torch.allclose(TR.loss_of(model, ids, supervised, np.random.default_rng(1)), expected)


def test_a_run_starts_from_a_saved_model_and_a_wrong_folder_is_named(tmp_path):
    from sparsediff.pipelines.embedded_text import train as TR
    from sparsediff.pipelines.embedded_text.model import build_model

    start = build_model(7)
    start.save_pretrained(tmp_path / "start")
    cfg = TR.TrainConfig(steps=1, tokens_per_batch=128, min_len=64, max_len=64, eval_every=1000, seed=0,
                         init_from=str(tmp_path / "start"))
    TR.train(tmp_path / "run0", cfg, minutes=1, log=lambda _: None, until_step=0)  # no step taken: the start itself
    saved = torch.load(tmp_path / "run0" / "checkpoint.pt", weights_only=False)["model"]
    for name, value in start.state_dict().items():
        assert torch.equal(saved[name], value), name
    assert not torch.equal(build_model(0).model.embed_tokens.weight, start.model.embed_tokens.weight)
    cfg = TR.TrainConfig(steps=1, tokens_per_batch=128, min_len=64, max_len=64, eval_every=1000, init_from=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere.*holds no saved model.*--save DIR"):
        TR.train(tmp_path / "run", cfg, minutes=1, log=lambda _: None)
