"""ShareGPT-format conversation files: read them, and pick prompt/answer pairs as ``vllm bench serve`` does.

The format is a JSON list of objects, each with ``conversations``: a list of ``{"from": role, "value":
text}`` turns. Nothing is downloaded: the file is local. Selection follows vLLM 0.32.0's
``ShareGPTDataset`` (``vllm/benchmarks/datasets/datasets.py``) and its ``is_valid_sequence``, so a
servinglab run and a ``vllm bench serve --dataset-name sharegpt`` run with the same seed send the same
pairs in the same order.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ParamsError
from .workload import RequestSpec, Tokenizer

# The public ShareGPT_V3 file is about 640 MB; a file far beyond that is a mistake, and it is read whole.
MAX_SHAREGPT_BYTES = 1024**3
# vLLM's is_valid_sequence defaults (they come from its older benchmark_serving.py).
MIN_TOKENS = 4
MAX_PROMPT_TOKENS = 1024
MAX_TOTAL_TOKENS = 2048
# The turns a session sends: ShareGPT files name the user "human"; files written as chat name it "user".
USER_ROLES = ("human", "user")

Conversation = list[tuple[str, str]]


@dataclass
class SharegptSample:
    """The pairs chosen, and what happened to the ones looked at (for the line a run prints)."""

    requests: list[RequestSpec]
    conversations: int  # in the file
    with_two_turns: int  # of those, the ones vLLM considers at all
    examined: int  # looked at before enough pairs were kept
    kept: int
    dropped: dict[str, int] = field(default_factory=dict)  # reason → count

    def describe(self, path: str | os.PathLike | None = None) -> str:
        """One line: how many pairs were kept of how many, and why the others were dropped."""
        reasons = ", ".join(f"{n} {why}" for why, n in self.dropped.items() if n) or "none"
        where = f" of {path}" if path else ""
        line = (f"sharegpt: {self.conversations} conversations{where}, {self.with_two_turns} with two turns or more; "
                f"kept {self.kept} of the {self.examined} examined (dropped: {reasons})")  # fmt: skip
        if len(self.requests) > self.kept:
            line += f"; {len(self.requests) - self.kept} more drawn again from the kept ones to reach {len(self.requests)}"
        return line


def _load_json(path: Path) -> object:
    if not path.is_file():
        raise ParamsError(f"{path}: ShareGPT file not found" if not path.exists() else f"{path}: not a file")
    size = path.stat().st_size
    if size > MAX_SHAREGPT_BYTES:
        raise ParamsError(f"{path}: {size} bytes; a ShareGPT file may have at most {MAX_SHAREGPT_BYTES}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ParamsError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ParamsError(f"{path}: not valid JSON ({exc})") from None


def _turns(path: Path, index: int, item: object) -> Conversation:
    if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
        raise ParamsError(f"{path}: item {index}: 'conversations': expected a list of {{from, value}} turns")
    turns = []
    for number, turn in enumerate(item["conversations"]):
        if not isinstance(turn, dict):
            raise ParamsError(f"{path}: item {index}: conversations[{number}]: expected an object with from and value")
        for key in ("from", "value"):
            if not isinstance(turn.get(key), str):
                raise ParamsError(f"{path}: item {index}: conversations[{number}].{key}: expected a string")
        turns.append((turn["from"], turn["value"]))
    return turns


def read_conversations(path: str | os.PathLike) -> list[Conversation]:
    """Every conversation of a ShareGPT-format file, as ``(role, text)`` turns in file order.

    Parameters
    ----------
    path
        A local JSON file: a list of objects, each with ``conversations``, a list of ``{"from": str,
        "value": str}``.

    Raises
    ------
    ParamsError
        Naming the file, and the item and key that are wrong, when the file is missing, too large, not
        JSON or not in that shape.
    """
    source = Path(path)
    data = _load_json(source)
    if not isinstance(data, list):
        raise ParamsError(f"{source}: expected a JSON list of conversations, found a {type(data).__name__}")
    return [_turns(source, index, item) for index, item in enumerate(data)]


def drop_reason(prompt_len: int, output_len: int, output_len_given: bool) -> str | None:
    """Why vLLM's ``is_valid_sequence`` refuses a pair, or None when it keeps it.

    With an output length given (``--sharegpt-output-len``) the answer's own length is not checked for
    its minimum, as in vLLM.
    """
    if prompt_len < MIN_TOKENS:
        return "prompt under 4 tokens"
    if not output_len_given and output_len < MIN_TOKENS:
        return "answer under 4 tokens"
    if prompt_len > MAX_PROMPT_TOKENS:
        return "prompt over 1024 tokens"
    if prompt_len + output_len > MAX_TOTAL_TOKENS:
        return "prompt and answer over 2048 tokens"
    return None


def sample_pairs(
    conversations: list[Conversation], tokenizer: Tokenizer, num: int, seed: int, output_len: int | None = None
) -> SharegptSample:
    """``num`` requests from the first two turns of shuffled conversations, as ``vllm bench serve`` picks them.

    Parameters
    ----------
    conversations
        From :func:`read_conversations`.
    tokenizer
        The served model's tokenizer; prompt and answer lengths are counted with it.
    num
        Requests wanted. When fewer pairs pass the filter, kept pairs are drawn again at random (seeded),
        as vLLM oversamples.
    seed
        ``random.seed(seed)`` then ``random.shuffle`` of the conversations with two turns or more.
    output_len
        ``max_tokens`` of every request; by default each pair's answer length in tokens.

    Raises
    ------
    ParamsError
        When no pair passes the filter.
    """
    # vLLM counts with tokenizer(text).input_ids, which adds the tokenizer's special tokens; the tokenizers
    # servinglab builds and the Qwen2 family add none, so encode() without them counts the same.
    usable = [turns for turns in conversations if len(turns) >= 2]
    order = list(usable)
    random.Random(seed).shuffle(order)  # the same permutation as random.seed(seed); random.shuffle(data)
    kept: list[RequestSpec] = []
    dropped: dict[str, int] = {}
    examined = 0
    for turns in order:
        if len(kept) >= num:
            break
        examined += 1
        prompt, answer = turns[0][1], turns[1][1]
        prompt_len = len(tokenizer.encode(prompt))
        wanted = len(tokenizer.encode(answer)) if output_len is None else output_len
        reason = drop_reason(prompt_len, wanted, output_len is not None)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        kept.append(RequestSpec(prompt, prompt_len, wanted))
    if not kept:
        raise ParamsError(f"sharegpt: none of {examined} pairs passed vLLM's length filter (prompt 4-1024 tokens, "
                          "answer at least 4, both at most 2048)")  # fmt: skip
    requests = list(kept)
    again = random.Random(seed)  # vLLM reseeds before oversampling
    requests += [again.choice(kept) for _ in range(num - len(kept))]
    return SharegptSample(requests, len(conversations), len(usable), examined, len(kept), dropped)
