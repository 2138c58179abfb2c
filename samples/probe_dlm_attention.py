"""Where does the answer slot look? Attention of a probe model (`probe_dlm_binding.py --save DIR`) on 2-pair lookups.

    python samples/probe_dlm_binding.py --minutes 6 --layers 2 --save runs/probe_model
    python samples/probe_dlm_attention.py --model runs/probe_model

For each layer and head, the mean attention weight of the first answer slot (and, for comparison, of every value
token in the context) on each kind of position: the asked pair's key and value in the context, the other pair's key
and value, the question's own key, the marks ("=", ";", "?", "->"), filler words and the answer slots. A lookup
circuit shows as a head whose slot row puts its weight on the asked value (or on the asked key, for a head that reads
the key and finds the value next to it); a head that weighs both values alike is not binding.
"""

import argparse
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from sparsediff.pipelines.embedded_text.tasks import ANSWER_SLOTS
from sparsediff.pipelines.embedded_text.train import MASK, encode

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from probe_dlm_binding import prompt  # noqa: E402

KINDS = ("asked key", "asked value", "other key", "other value", "question key", "marks", "filler", "slots")


def position_kinds(words: list[str]) -> list[str]:
    """The kind of every prompt position of a 2-pair lookup prompt (`prompt(rng, 2, filler)` without its answer)."""
    asked = words[-2]
    kinds = []
    for i, word in enumerate(words):
        if i == len(words) - 2:
            kinds.append("question key")
        elif word in ("=", ";", "?", "->"):
            kinds.append("marks")
        elif i + 1 < len(words) and words[i + 1] == "=":
            kinds.append("asked key" if word == asked else "other key")
        elif i >= 1 and words[i - 1] == "=":
            kinds.append("asked value" if words[i - 2] == asked else "other value")
        else:
            kinds.append("filler")
    return kinds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="eager").eval()
    rng = np.random.default_rng(args.seed)
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    slot = np.zeros((layers, heads, len(KINDS)))
    value_rows = np.zeros((layers, heads, len(KINDS)))
    right = 0
    for _ in range(args.prompts):
        words, answer = prompt(rng, 2, 8)
        kinds = position_kinds(words) + ["slots"] * ANSWER_SLOTS
        ids = torch.tensor([encode(words + answer)])
        x = ids.clone()
        x[:, -ANSWER_SLOTS:] = MASK
        with torch.no_grad():
            out = model(input_ids=x, output_attentions=True)
        right += int(out.logits[0, -ANSWER_SLOTS].argmax() == ids[0, -ANSWER_SLOTS])
        first = len(words)
        values = [i for i, k in enumerate(kinds) if k in ("asked value", "other value")]
        for layer, attention in enumerate(out.attentions):  # (1, heads, S, S)
            weights = attention[0].numpy()
            for k, kind in enumerate(KINDS):
                cols = [i for i, c in enumerate(kinds) if c == kind]
                slot[layer, :, k] += weights[:, first, cols].sum(-1)
                value_rows[layer, :, k] += weights[:, values][:, :, cols].sum(-1).mean(-1)
    slot /= args.prompts
    value_rows /= args.prompts
    print(f"{args.model}: 2-pair lookups answered right {right}/{args.prompts}")
    for title, table in (("first answer slot attends to", slot), ("context value tokens attend to", value_rows)):
        print(f"\n{title} (mean weight by position kind)")
        print(f"{'layer.head':<11}" + "".join(f"{k:>13}" for k in KINDS))
        for layer in range(layers):
            for head in range(heads):
                print(f"{layer}.{head:<9}" + "".join(f"{v:>13.3f}" for v in table[layer, head]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
