"""The workloads of a stage by name, as ``vllm bench serve --dataset-name`` names them.

- ``random``: prompts of an exact token length (± a range ratio), optionally after a prefix shared by all
  (``--random-prefix-len``);
- ``prefix_repetition``: a few random prefixes, each followed by many random suffixes;
- ``sharegpt``: the first two turns of conversations from a local ShareGPT file;
- ``custom``: prompts from a JSONL file.

``servinglab bench``'s flags and a study's ``workloads.latency.dataset`` both become a :class:`Dataset`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import ParamsError
from .sharegpt import read_conversations, sample_pairs
from .workload import RequestSpec, Tokenizer, file_requests, prefix_repetition_requests, random_requests


@dataclass(frozen=True)
class Dataset:
    """A workload, with ``vllm bench serve``'s flag names (``--random-input-len`` → ``random_input_len``)."""

    name: str = "random"
    path: str | None = None  # --dataset-path: the ShareGPT JSON or the custom JSONL file
    random_input_len: int | None = None
    random_output_len: int | None = None
    random_range_ratio: float = 0.0
    random_prefix_len: int = 0
    sharegpt_output_len: int | None = None
    # vLLM 0.32.0's defaults (PrefixRepetitionRandomDataset), for a flag or a study key left out.
    prefix_repetition_prefix_len: int = 256
    prefix_repetition_suffix_len: int = 256
    prefix_repetition_num_prefixes: int = 10
    prefix_repetition_output_len: int = 128

    def problems(self) -> list[tuple[str, str]]:
        """What is missing or impossible, as (field, reason); empty when the dataset can be built."""
        found = []
        if self.name not in DATASETS:
            found.append(("name", f"{self.name!r}: expected one of {', '.join(DATASETS)}"))
        for needed in NEEDS.get(self.name, ()):
            if getattr(self, needed) is None:
                found.append((needed, f"required with the {self.name} dataset"))
        if not 0 <= self.random_range_ratio < 1:
            found.append(("random_range_ratio", f"{self.random_range_ratio}: must be in [0, 1)"))
        if self.prefix_repetition_num_prefixes < 1:
            found.append(("prefix_repetition_num_prefixes", "must be at least 1"))
        return found


def _random(dataset: Dataset, tokenizer: Tokenizer, count: int, seed: int, say) -> list[RequestSpec]:
    return random_requests(tokenizer, count, dataset.random_input_len, dataset.random_output_len, seed,
                           dataset.random_range_ratio, dataset.random_prefix_len)  # fmt: skip


def _prefix_repetition(dataset: Dataset, tokenizer: Tokenizer, count: int, seed: int, say) -> list[RequestSpec]:
    return prefix_repetition_requests(
        tokenizer, count, dataset.prefix_repetition_prefix_len, dataset.prefix_repetition_suffix_len,
        dataset.prefix_repetition_num_prefixes, dataset.prefix_repetition_output_len, seed,
    )  # fmt: skip


def _sharegpt(dataset: Dataset, tokenizer: Tokenizer, count: int, seed: int, say) -> list[RequestSpec]:
    sample = sample_pairs(read_conversations(dataset.path), tokenizer, count, seed, dataset.sharegpt_output_len)
    if say is not None:
        say(sample.describe(dataset.path))
    return sample.requests


def _custom(dataset: Dataset, tokenizer: Tokenizer, count: int, seed: int, say) -> list[RequestSpec]:
    return file_requests(dataset.path, dataset.random_output_len or 128, tokenizer, count)


# The fields each dataset cannot do without.
NEEDS = {"random": ("random_input_len", "random_output_len"), "sharegpt": ("path",), "custom": ("path",)}
# One builder per dataset name, as vllm bench serve keeps one dataset class per --dataset-name.
DATASETS: dict[str, Callable[..., list[RequestSpec]]] = {
    "random": _random, "prefix_repetition": _prefix_repetition, "sharegpt": _sharegpt, "custom": _custom,
}  # fmt: skip


# How each dataset that reads a file checks it whole, before a run starts.
FILE_CHECKS: dict[str, Callable[[str], object]] = {"sharegpt": read_conversations, "custom": lambda path: file_requests(path, 1)}


def check_file(dataset: Dataset) -> None:
    """Read the dataset's file as its format says, raising :class:`ParamsError` naming what is wrong."""
    if dataset.path and dataset.name in FILE_CHECKS:
        FILE_CHECKS[dataset.name](dataset.path)


def dataset_requests(
    dataset: Dataset, tokenizer: Tokenizer, count: int, seed: int, say: Callable[[str], None] | None = None
) -> list[RequestSpec]:
    """``count`` requests of a dataset, drawn with ``seed``.

    Parameters
    ----------
    dataset
        What to send; its fields mean what ``vllm bench serve``'s flags of the same name mean.
    tokenizer
        The served model's tokenizer: lengths are counted with it.
    count
        Requests wanted, warm-ups included.
    seed
        The same seed gives the same requests in the same order.
    say
        Gets a line on what was kept, where a dataset filters (ShareGPT).
    """
    for key, reason in dataset.problems():
        raise ParamsError(f"dataset {key}: {reason}")
    return DATASETS[dataset.name](dataset, tokenizer, count, seed, say)
