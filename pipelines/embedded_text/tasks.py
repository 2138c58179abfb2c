"""Procedural long-context tasks for the embedded diffusion LM: the answer must be fetched from far away.

Three kinds, all in one word-level vocabulary (keys `k0..k127`, values `v0..v127`, filler words):
- `lookup`: many `kA = vB ;` pairs scattered through filler text; the question `? kA ->` asks for vB.
- `needle`: one pair hidden in a long filler text (a needle in a haystack); same question. With one pair the answer
  is the only value token in the text: one attention hop finds it, which a small model learns first.
- `hops`: a chain `kA = kB ;` ... `kB = vC ;` among distractor pairs; the answer is `kB vC` (the model writes the
  middle key first, so each token is one lookup away from something it can see).

A prompt is the context plus the question, padded with filler at the front to a multiple of `ALIGN` tokens, so the
diffusion pipeline's first generation block holds exactly the answer slots; the answer is followed by `<eos>` up to
`ANSWER_SLOTS` tokens (the LLaDA recipe pads answers with end tokens). Deterministic from the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KEYS = [f"k{i}" for i in range(128)]
VALUES = [f"v{i}" for i in range(128)]
FILLER = (
    "the a of and to in is was he she it that for on as with his her they at by this had from or be are not but "
    "which one all were we when there can an your more if no so out up said what about into than them only some "
    "time could these two may then first any my now such like our over man me even most made after also did many "
    "before must through back years where much way well down should because each just those people how too little "
    "state good very make world still own see men work long get here between both life being under never day same "
    "another know while last might us great old year off come since against go came right used take three"
).split()
SPECIALS = ["<pad>", "<mask>", "<eos>", "<unk>"]
MARKS = ["=", ";", "?", "->"]
VOCAB = SPECIALS + MARKS + KEYS + VALUES + FILLER
KINDS = ("lookup", "needle", "hops")
ALIGN = 8  # prompts are a multiple of the generation block
ANSWER_SLOTS = 8  # the generated region: answer tokens then <eos>


@dataclass(frozen=True)
class Task:
    """One task: the prompt and answer as words (join with spaces for text)."""

    kind: str
    prompt: list[str]
    answer: list[str]

    @property
    def prompt_text(self) -> str:
        return " ".join(self.prompt)

    @property
    def answer_text(self) -> str:
        return " ".join(self.answer)

    def target(self) -> list[str]:
        """The generated region the model learns: the answer, then `<eos>` to `ANSWER_SLOTS` tokens."""
        return self.answer + ["<eos>"] * (ANSWER_SLOTS - len(self.answer))


def place(filler: list[str], chunks: list[list[str]], cuts) -> list[str]:
    """The filler words with each chunk inserted at its (sorted) cut."""
    words: list[str] = []
    last = 0
    for cut, chunk in zip(cuts, chunks):
        words += filler[last:cut] + chunk
        last = cut
    return words + filler[last:]


def make_task(kind: str, length: int, rng: np.random.Generator) -> Task:
    """A task of `kind` whose prompt has `length` tokens (rounded up to a multiple of `ALIGN`)."""
    if kind not in KINDS:
        raise ValueError(f"Task kind {kind!r} is not one of {', '.join(KINDS)}.")
    if length < 64:
        raise ValueError(f"A task of {length} tokens is too short; give at least 64 (the pairs must fit).")
    length = -(-length // ALIGN) * ALIGN
    question_len = 3
    most = length // 8  # pairs take at most half the prompt (4 tokens each)
    if kind == "hops":
        n_pairs = int(rng.integers(1, min(16, most // 2) + 1))
        keys = rng.choice(len(KEYS), size=2 * n_pairs, replace=False)
        pairs, answer, asked = [], None, None
        for i in range(n_pairs):  # each chain i: keys[2i] -> keys[2i+1] -> a value
            a, b, v = KEYS[keys[2 * i]], KEYS[keys[2 * i + 1]], VALUES[int(rng.integers(len(VALUES)))]
            pairs += [[a, "=", b, ";"], [b, "=", v, ";"]]
            if i == 0:
                asked, answer = a, [b, v]
    else:
        n_pairs = 1 if kind == "needle" else int(rng.integers(min(8, most), min(64, most) + 1))
        keys = rng.choice(len(KEYS), size=n_pairs, replace=False)
        values = rng.integers(len(VALUES), size=n_pairs)
        pairs = [[KEYS[k], "=", VALUES[v], ";"] for k, v in zip(keys, values)]
        asked, answer = pairs[0][0], [pairs[0][2]]
    room = length - question_len - 4 * len(pairs)
    if room < 0:
        raise ValueError(f"A {kind} task of {length} tokens cannot hold its {len(pairs)} pairs; give at least {length - room} tokens.")
    order = rng.permutation(len(pairs))
    # pairs go at random filler offsets (sorted, so a chain's order in the text is random but fixed)
    cuts = np.sort(rng.integers(0, room + 1, size=len(pairs)))
    filler = [FILLER[i] for i in rng.integers(len(FILLER), size=room)]
    words = place(filler, [pairs[p] for p in order], cuts) + ["?", asked, "->"]
    assert len(words) == length
    return Task(kind, words, answer)


def task_set(n: int, length: int, seed: int, kinds: tuple[str, ...] = KINDS) -> list[Task]:
    """`n` tasks cycling through `kinds`, all of `length` tokens; held-out sets use seeds the training never draws
    (training seeds its generator from `TRAIN_SEED`, evaluation from `EVAL_SEED` + length)."""
    rng = np.random.default_rng(seed)
    return [make_task(kinds[i % len(kinds)], length, rng) for i in range(n)]


TRAIN_SEED = 0
EVAL_SEED = 10_000


def short_prompt(rng: np.random.Generator, pairs: int, filler: int, echo: bool = False,
                 key_values: float = 0.0) -> tuple[list[str], list[str]]:
    """A short lookup prompt and its answer-slot target: `pairs` `kA = vB ;` pairs among `filler` filler words, then
    `? kA ->` asking for one pair's value. With `echo`, `; kA ->` asks for kA itself, the token two before the first
    answer slot: the offset feature a lookup needs, learned first. The binding probe's prompts (BENCHMARKS section 7),
    used by the trainer's short phase. With `key_values` > 0 that share of pairs (drawn when > 0 only, so the draws
    are unchanged otherwise) binds a key to another key, `kA = kC ;`, as the first link of a `hops` chain does:
    a lookup must return whatever follows the asked key, not only a value token. Prompts are not aligned: training
    does not go through the pipeline."""
    keys = rng.choice(len(KEYS), 2 * pairs if key_values > 0 else pairs, replace=False)
    values = rng.integers(len(VALUES), size=pairs)
    answers = [VALUES[v] for v in values]
    if key_values > 0:
        answers = [KEYS[keys[pairs + i]] if u < key_values else a
                   for i, (a, u) in enumerate(zip(answers, rng.uniform(size=pairs)))]
    chunks = [[KEYS[k], "=", a, ";"] for k, a in zip(keys[:pairs], answers)]
    words_filler = [FILLER[i] for i in rng.integers(len(FILLER), size=filler)]
    cuts = np.sort(rng.integers(0, filler + 1, size=pairs))
    words = place(words_filler, chunks, cuts)
    asked = chunks[int(rng.integers(pairs))]
    if echo:
        return words + [";", asked[0], "->"], [asked[0]] + ["<eos>"] * (ANSWER_SLOTS - 1)
    return words + ["?", asked[0], "->"], [asked[2]] + ["<eos>"] * (ANSWER_SLOTS - 1)


def answer_correct(generated: str, task: Task) -> bool:
    """Exact match: the generated words before the first end token are the answer."""
    words = generated.replace("<eos>", " ").split()
    return words[: len(task.answer)] == task.answer and len(words) == len(task.answer)
