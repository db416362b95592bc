"""The ShareGPT-format sample shipped in ``sharegpt-sample.json``, made from the project's own ``corpus.txt``.

Conversations of human/gpt turns whose texts are sentences of the corpus drawn with a seeded generator, so
the file is the same on every machine and carries no text of unknown licence. Besides ordinary
conversations it holds, on purpose, every case ``vllm bench serve``'s ShareGPT filter treats apart: a
conversation of one turn, a prompt or an answer under 4 tokens, a prompt over 1024 tokens, and a prompt
and answer together over 2048 tokens (lengths of the project's built tokenizer, about 17 tokens a
sentence).

Run ``python -m servinglab.data.sharegpt_sample`` to write the file again; a test checks it is up to date.
"""

from __future__ import annotations

import json
import random
import sys
from importlib import resources
from pathlib import Path

SAMPLE_FILE = "sharegpt-sample.json"
CONVERSATIONS = 300
SEED = 0


def _sentences() -> list[str]:
    text = resources.files("servinglab.data").joinpath("corpus.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _text(rng: random.Random, sentences: list[str], count: int) -> str:
    return " ".join(rng.choice(sentences) for _ in range(count))


def _conversation(index: int, rng: random.Random, sentences: list[str]) -> list[dict[str, str]]:
    """One conversation; every twentieth of each special case, the rest ordinary."""
    case = index % 20
    if case == 0:  # a single turn: vLLM leaves it out before shuffling
        return [{"from": "human", "value": _text(rng, sentences, 2)}]
    if case == 1:  # a prompt under 4 tokens
        pairs = [("Hi.", _text(rng, sentences, 3))]
    elif case == 2:  # an answer under 4 tokens
        pairs = [(_text(rng, sentences, 2), "Yes.")]
    elif case == 3:  # a prompt over 1024 tokens (70 sentences)
        pairs = [(_text(rng, sentences, 70), _text(rng, sentences, 2))]
    elif case == 4:  # a prompt under 1024 tokens, but over 2048 with its answer (45 + 80 sentences)
        pairs = [(_text(rng, sentences, 45), _text(rng, sentences, 80))]
    else:
        pairs = [(_text(rng, sentences, rng.randint(1, 6)), _text(rng, sentences, rng.randint(2, 12)))
                 for _ in range(rng.randint(1, 3))]  # fmt: skip
    turns = []
    for question, answer in pairs:
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


def generate(conversations: int = CONVERSATIONS, seed: int = SEED) -> list[dict]:
    """The sample's content: ``conversations`` ShareGPT items, the same for the same seed.

    Parameters
    ----------
    conversations
        How many items.
    seed
        Seed of the sentence draws.
    """
    rng = random.Random(seed)
    sentences = _sentences()
    return [{"id": f"servinglab-{i}", "conversations": _conversation(i, rng, sentences)} for i in range(conversations)]


def text() -> str:
    """The file's text, as written: one item a line, so a diff of it reads."""
    items = generate()
    return "[\n" + ",\n".join(json.dumps(item, ensure_ascii=False) for item in items) + "\n]\n"


def sample_path() -> Path:
    """Where the shipped sample is."""
    return Path(str(resources.files("servinglab.data").joinpath(SAMPLE_FILE)))


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else sample_path()
    target.write_text(text(), encoding="utf-8")
    print(target)
