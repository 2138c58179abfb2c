"""The embedded diffusion LM: a small bidirectional Llama (transformers) in diffusers' `LLaDA2Pipeline`, with a
word-level tokenizer over the task vocabulary. Built here, trained by `train.py`, shipped in `assets/embedded_text`."""

from __future__ import annotations

from pathlib import Path

from .tasks import ALIGN, VOCAB

ASSET = Path(__file__).resolve().parent.parent / "assets" / "embedded_text"

MODEL_CONFIG = dict(
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=6,  # head_dim 32: enough heads per layer to specialise (local binding vs retrieval)
    num_key_value_heads=3,  # GQA, as LLaDA-style models use
    max_position_embeddings=32768,
    # A large RoPE base (Llama 3's): retrieval matches a query's content against a key's at any distance, which
    # needs rotation planes that barely turn over the context (here the slowest turns 0.08 rad over 16k tokens).
    # The base of 200 used before turned every plane through full periods within ~900 tokens, so a content match
    # changed sign with distance; the needle runs then found the one value at 256 tokens far more often than at 1024.
    rope_theta=500_000.0,
    tie_word_embeddings=True,
    # About 1 / sqrt(hidden) instead of Llama's 0.02: with 0.02 every projection shrinks its input ~4x, attention
    # starts uniform and stays there (a 64-token needle was still at chance after 400 steps); at 0.1 the model learns
    # to copy the one value of a short context within ~100 steps (`samples/probe_dlm_binding.py --init-range 0.02`
    # against the default; BENCHMARKS section 7).
    initializer_range=0.1,
)


def embedded_text_path() -> Path:
    return ASSET


def build_tokenizer():
    """A word-level fast tokenizer over `VOCAB`, with pad, mask, end and unknown tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces, "?" included
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   mask_token="<mask>")


def build_model(seed: int = 0, arch: str = "llama"):
    """A freshly initialised bidirectional Llama over the task vocabulary. `arch="qwen3"` builds the same sizes as a
    Qwen3 model instead, whose attention normalises q and k per head (QK-norm): an experiment of
    `samples/probe_dlm_binding.py --arch qwen3` against attention that saturates early (BENCHMARKS section 7)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    if arch not in classes:
        raise ValueError(f"arch={arch!r}; choose one of {', '.join(classes)}.")
    config_class, model_class = classes[arch]
    torch.manual_seed(seed)
    extra = {"head_dim": MODEL_CONFIG["hidden_size"] // MODEL_CONFIG["num_attention_heads"]} if arch == "qwen3" else {}
    config = config_class(vocab_size=len(VOCAB), pad_token_id=VOCAB.index("<pad>"), eos_token_id=VOCAB.index("<eos>"),
                          bos_token_id=None, attn_implementation="sdpa", **MODEL_CONFIG, **extra)
    config.is_causal = False  # a masked diffusion LM attends both ways
    model = model_class(config)
    # Token classes (keys, values, filler, marks) start with a shared direction each, as type embeddings would give:
    # a head can then find "the value tokens" from the first step, instead of discovering the class of 128 random
    # vectors first (without it a run of 600 steps never learned to copy even the only value in a 64-token text).
    from .tasks import FILLER, KEYS, MARKS, VALUES

    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        gen = torch.Generator().manual_seed(seed + 1)
        for words in (KEYS, VALUES, FILLER, MARKS):
            rows = torch.tensor([VOCAB.index(w) for w in words])
            emb[rows] += torch.randn(emb.shape[1], generator=gen) * emb.std()
    return model


def build_pipeline(model, tokenizer=None, steps: int = ALIGN):
    """`LLaDA2Pipeline` around `model`: one block of `ALIGN` answer slots, one token committed per step."""
    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline

    scheduler = BlockRefinementScheduler(block_length=ALIGN, num_inference_steps=steps, threshold=1.0, minimal_topk=1)
    return LLaDA2Pipeline(model=model.eval(), tokenizer=tokenizer or build_tokenizer(), scheduler=scheduler)


def save_pipeline(pipe, path: Path) -> None:
    """Save the pipeline with its tokenizer (diffusers 0.42.1's `save_pretrained` leaves LLaDA2's tokenizer out)."""
    pipe.save_pretrained(str(path), safe_serialization=True)
    pipe.tokenizer.save_pretrained(str(Path(path) / "tokenizer"))
