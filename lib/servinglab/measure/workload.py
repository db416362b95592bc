"""What a latency stage sends: random prompts of an exact token length (± a range ratio, optionally after
a prefix shared by all), prompts that repeat a few prefixes, or prompts from a JSONL file.
:mod:`.datasets` names them as ``vllm bench serve --dataset-name`` does; ShareGPT files are :mod:`.sharegpt`'s.

Prompt lengths are counted in tokens of the *served model's* tokenizer, before the chat template (as
``vllm bench serve --random-input-len`` counts them), read from the model directory or asked of the
server's ``/tokenize`` and ``/detokenize``. Everything is drawn from a seeded generator: the same seed
gives the same prompts.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import ParamsError


@dataclass(frozen=True)
class RequestSpec:
    """One request of a stage: the user message and how many tokens to ask for."""

    prompt: str
    prompt_len: int  # tokens of the served model's tokenizer, before the chat template
    max_tokens: int


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def prompt_ids(self) -> list[int]: ...


def _auto_tokenizer() -> Any:
    """transformers' AutoTokenizer, imported without a notebook warning.

    transformers imports ``tqdm.auto``, which inside a Jupyter kernel without ipywidgets warns "TqdmWarning:
    IProgress not found" into the cell's output and falls back to the console bar. That fallback is what
    servinglab wants (it shows no progress widget), so ``tqdm.auto`` is imported first with that one warning
    silenced; transformers then finds it imported and nothing is printed.
    """
    import warnings

    from tqdm import TqdmWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=TqdmWarning)
        import tqdm.auto  # noqa: F401 - imported for its side effect, once, before transformers does
    from transformers import AutoTokenizer

    return AutoTokenizer


class DirectoryTokenizer:
    """The tokenizer of a Hugging Face model directory, loaded as vLLM loads it (transformers)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        AutoTokenizer = _auto_tokenizer()  # noqa: N806 - the class, as transformers names it

        if not (Path(directory) / "tokenizer_config.json").is_file() and not (Path(directory) / "tokenizer.json").is_file():
            raise ParamsError(f"--tokenizer {directory}: no tokenizer files in it")
        self._tok = AutoTokenizer.from_pretrained(str(directory))
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def prompt_ids(self) -> list[int]:
        ids = [i for i in range(self.vocab_size) if i not in set(self._tok.all_special_ids)]
        texts = self._tok.batch_decode([[i] for i in ids])
        return word_tokens(ids, texts, lambda batch: self._tok(batch, add_special_tokens=False)["input_ids"])


class ServerTokenizer:
    """The served model's tokenizer, through vLLM's ``/tokenize`` and ``/detokenize``."""

    def __init__(self, root_url: str, model: str, api_key: str | None = None, headers: dict[str, str] | None = None,
                 verify_tls: bool | str = True, proxy: str | None = None) -> None:  # fmt: skip
        import httpx

        from .outbound import client_options

        headers = dict(headers or {}) | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
        self._http = httpx.Client(base_url=root_url, headers=headers, timeout=30, **client_options(verify_tls, proxy))
        self._model = model

    def encode(self, text: str) -> list[int]:
        answer = self._http.post("/tokenize", json={"model": self._model, "prompt": text, "add_special_tokens": False})
        answer.raise_for_status()
        return answer.json()["tokens"]

    def decode(self, ids: list[int]) -> str:
        answer = self._http.post("/detokenize", json={"model": self._model, "tokens": ids})
        answer.raise_for_status()
        return answer.json()["prompt"]

    def prompt_ids(self) -> list[int]:
        # The distinct ids of a shipped English text: asking the server about every id would be slow.
        from importlib import resources

        text = resources.files("servinglab.data").joinpath("corpus.txt").read_text(encoding="utf-8")
        ids = sorted(set(self.encode(text)))
        return word_tokens(ids, [self.decode([i]) for i in ids], lambda batch: [self.encode(t) for t in batch])


def word_tokens(ids: list[int], texts: list[str], encode_batch) -> list[int]:
    """The ids that are one whole space-led word or symbol and encode back to themselves.

    Random ids of this kind concatenate into text that encodes to the same ids, so a prompt reaches its
    exact length at once (random byte pieces would merge or split when the text is encoded again).
    """
    candidates = [
        (token_id, text) for token_id, text in zip(ids, texts)
        if len(text) > 1 and text[0] == " " and " " not in text[1:] and "\ufffd" not in text
    ]  # fmt: skip
    encoded = encode_batch([text for _, text in candidates])
    return [token_id for (token_id, _), again in zip(candidates, encoded) if again == [token_id]] or list(ids)


def exact_length_prompt(tokenizer: Tokenizer, length: int, rng: np.random.Generator, allowed: np.ndarray) -> str:
    """Text that encodes to exactly ``length`` tokens, from random ids (decoding can merge or split)."""
    ids = [int(i) for i in rng.choice(allowed, size=length)]
    for _ in range(50):
        text = tokenizer.decode(ids)
        encoded = tokenizer.encode(text)
        if len(encoded) == length:
            return text
        if len(encoded) > length:
            ids = encoded[:length]
        else:
            ids = encoded + [int(i) for i in rng.choice(allowed, size=length - len(encoded))]
    raise ParamsError(f"could not make a prompt of exactly {length} tokens with this tokenizer")


def length_bounds(center: int, range_ratio: float) -> tuple[int, int]:
    """The lengths vLLM draws from around ``center``: [floor(c·(1−r)), ceil(c·(1+r))], both ends included."""
    return math.floor(center * (1 - range_ratio)), math.ceil(center * (1 + range_ratio))


def prefixed_prompt(tokenizer: Tokenizer, prefix: str, prefix_ids: list[int], length: int, rng: np.random.Generator,
                    allowed: np.ndarray) -> str:  # fmt: skip
    """``prefix`` followed by random text of exactly ``length`` tokens, the prefix's tokens kept as they are.

    The prefix must encode to the same ids inside every prompt, or the server's prefix cache would not
    match it; whole space-led words keep the boundary clean, and a draw that would move it is drawn again.
    """
    for _ in range(20):
        text = prefix + exact_length_prompt(tokenizer, length, rng, allowed)
        encoded = tokenizer.encode(text)
        if len(encoded) == len(prefix_ids) + length and encoded[: len(prefix_ids)] == prefix_ids:
            return text
    raise ParamsError(f"could not put {length} tokens after the shared prefix without changing its tokens")


def random_requests(
    tokenizer: Tokenizer,
    count: int,
    input_len: int,
    output_len: int,
    seed: int,
    range_ratio: float = 0.0,
    prefix_len: int = 0,
) -> list[RequestSpec]:
    """``count`` random prompts, as ``vllm bench serve --dataset-name random`` builds them.

    Parameters
    ----------
    input_len, output_len
        ``--random-input-len``, ``--random-output-len``: tokens of the random part of each prompt and
        ``max_tokens``, each drawn per request from :func:`length_bounds` with ``range_ratio``.
    prefix_len
        ``--random-prefix-len``: tokens of one random prefix put before every prompt. As in vLLM it comes
        on top of the random part and the range ratio leaves it alone: a prompt has ``prefix_len`` +
        its drawn input length tokens.
    """
    if not 0 <= range_ratio < 1:
        raise ParamsError(f"range_ratio {range_ratio}: must be in [0, 1)")
    rng = np.random.default_rng(seed)
    allowed = np.array(tokenizer.prompt_ids())
    in_low, in_high = length_bounds(input_len, range_ratio)
    out_low, out_high = length_bounds(output_len, range_ratio)
    # vLLM lets the random part be empty when a prefix fills the prompt; a prompt of no token is refused.
    inputs = rng.integers(max(in_low, 0 if prefix_len else 1), max(in_high, 1) + 1, size=count)
    outputs = rng.integers(max(out_low, 1), max(out_high, 1) + 1, size=count)
    prefix = exact_length_prompt(tokenizer, prefix_len, rng, allowed) if prefix_len else ""
    prefix_ids = tokenizer.encode(prefix) if prefix_len else []
    return [
        RequestSpec(prefixed_prompt(tokenizer, prefix, prefix_ids, int(n_in), rng, allowed), prefix_len + int(n_in),
                    int(n_out))  # fmt: skip
        for n_in, n_out in zip(inputs, outputs)
    ]


def prefix_repetition_requests(
    tokenizer: Tokenizer, count: int, prefix_len: int, suffix_len: int, num_prefixes: int, output_len: int, seed: int
) -> list[RequestSpec]:
    """``vllm bench serve --dataset-name prefix_repetition``: ``num_prefixes`` random prefixes of
    ``prefix_len`` tokens, each followed by ``count // num_prefixes`` random suffixes of ``suffix_len``
    tokens, asking ``output_len`` tokens, shuffled.

    vLLM sends only ``num_prefixes × (count // num_prefixes)`` requests; a stage sends exactly ``count``,
    so the shuffled list is repeated from its start for the remainder.
    """
    if count < num_prefixes:
        raise ParamsError(f"prefix_repetition: {count} requests for {num_prefixes} prefixes; it needs at least one "
                          "request per prefix")  # fmt: skip
    rng = np.random.default_rng(seed)
    allowed = np.array(tokenizer.prompt_ids())
    specs = []
    for _ in range(num_prefixes):
        prefix = exact_length_prompt(tokenizer, prefix_len, rng, allowed)
        prefix_ids = tokenizer.encode(prefix)
        specs += [
            RequestSpec(prefixed_prompt(tokenizer, prefix, prefix_ids, suffix_len, rng, allowed), prefix_len + suffix_len,
                        output_len)  # fmt: skip
            for _ in range(count // num_prefixes)
        ]
    order = rng.permutation(len(specs))
    return [specs[int(order[i % len(specs)])] for i in range(count)]


def file_requests(
    path: str | os.PathLike, default_max_tokens: int, tokenizer: Tokenizer | None = None, count: int | None = None
) -> list[RequestSpec]:
    """Prompts from a JSONL file: one object a line with ``prompt`` and optional ``max_tokens``.

    With ``count``, the file's prompts are cycled (or cut) to exactly that many requests.
    """
    specs = []
    source = Path(path)
    if not source.is_file():
        raise ParamsError(f"{source}: prompts file not found")
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            prompt = item["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ParamsError(f"{source}: line {number}: expected an object with a 'prompt' ({exc})") from exc
        max_tokens = int(item.get("max_tokens", default_max_tokens))
        length = len(tokenizer.encode(prompt)) if tokenizer else -1
        specs.append(RequestSpec(prompt, length, max_tokens))
    if not specs:
        raise ParamsError(f"{source}: no prompts in it")
    if count is not None:
        specs = [specs[i % len(specs)] for i in range(count)]
    return specs
