"""Datasets as ``vllm bench serve`` names them: random with a shared prefix, prefix_repetition, ShareGPT,
custom; in ``servinglab bench``'s flags and in a study's ``workloads.latency.dataset``.

Everything here runs on the project's own tokenizer and its ShareGPT-format sample; only the last test
needs the shared engine.
"""

from __future__ import annotations

import json
import math
import re

import pytest
from conftest import PARAMS, run_cli
from streaming_endpoint import StreamingEndpoint

from servinglab import cli, modelbuild
from servinglab.config import load_study
from servinglab.data import sharegpt_sample
from servinglab.errors import ParamsError
from servinglab.measure.server_metrics import summarize_delta
from servinglab.measure.sharegpt import read_conversations, sample_pairs
from servinglab.measure.datasets import Dataset, dataset_requests
from servinglab.measure.workload import DirectoryTokenizer, length_bounds, prefix_repetition_requests, random_requests

SAMPLE = sharegpt_sample.sample_path()


@pytest.fixture(scope="module")
def model_dir(session_dir):
    # The session's cache: the shared engine's model, built once for every test that needs it.
    return modelbuild.ensure_model(session_dir / "cache", "tiny", 0)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return DirectoryTokenizer(model_dir)


@pytest.fixture(scope="module")
def conversations():
    return read_conversations(SAMPLE)


def test_the_shipped_sample_is_what_its_generator_writes():
    assert SAMPLE.read_text(encoding="utf-8") == sharegpt_sample.text()
    assert len(json.loads(SAMPLE.read_text(encoding="utf-8"))) == sharegpt_sample.CONVERSATIONS


# What vLLM 0.32.0's ShareGPTDataset(dataset_path=SAMPLE, random_seed=seed).sample(tokenizer, ...) returned
# on the sample with the project's tiny tokenizer: (prompt_len, expected_output_len) of the first pairs.
VLLM_SEED_0 = [(61, 181), (24, 118), (83, 38), (78, 97), (65, 81), (70, 107), (68, 109), (38, 223)]
VLLM_SEED_7 = [(51, 111), (39, 67), (72, 74), (74, 48), (78, 214), (14, 124), (87, 177), (17, 73)]
VLLM_OUTPUT_LEN_2 = [(61, 2), (24, 2), (83, 2), (36, 2), (78, 2)]
VLLM_OVERSAMPLED_TAIL_300 = [(20, 226), (81, 200), (61, 115), (104, 178), (107, 124)]


def pairs(specs, n=None):
    return [(s.prompt_len, s.max_tokens) for s in specs][:n]


def test_sharegpt_pairs_are_the_ones_vllm_picks(conversations, tokenizer):
    sample = sample_pairs(conversations, tokenizer, 1000, 0)
    assert pairs(sample.requests, 8) == VLLM_SEED_0
    assert pairs(sample_pairs(conversations, tokenizer, 8, 7).requests) == VLLM_SEED_7
    # vLLM kept 227 pairs (no_oversample); the rest of the 1000 are drawn again from them, seeded.
    assert sample.kept == 227 and len(sample.requests) == 1000
    assert pairs(sample_pairs(conversations, tokenizer, 300, 0).requests)[-5:] == VLLM_OVERSAMPLED_TAIL_300
    # --sharegpt-output-len: every max_tokens is it, and the answer's own minimum length is not checked.
    fixed = sample_pairs(conversations, tokenizer, 1000, 0, output_len=2)
    assert pairs(fixed.requests, 5) == VLLM_OUTPUT_LEN_2 and fixed.kept == 251
    assert {s.max_tokens for s in fixed.requests} == {2} and "answer under 4 tokens" not in fixed.dropped


def test_sharegpt_filter_rules_on_the_sample(conversations, tokenizer):
    sample = sample_pairs(conversations, tokenizer, 1000, 0)
    # 15 of the 300 have one turn and are not considered; every other one is looked at when 1000 are wanted.
    assert (sample.conversations, sample.with_two_turns, sample.examined) == (300, 285, 285)
    assert sample.dropped == {"prompt under 4 tokens": 22, "answer under 4 tokens": 15, "prompt over 1024 tokens": 12,
                              "prompt and answer over 2048 tokens": 9}  # fmt: skip
    assert sample.kept + sum(sample.dropped.values()) == sample.examined
    kept = sample.requests[: sample.kept]
    assert all(4 <= s.prompt_len <= 1024 and s.max_tokens >= 4 and s.prompt_len + s.max_tokens <= 2048 for s in kept)
    assert all(s.prompt_len == len(tokenizer.encode(s.prompt)) for s in kept[:20])
    prompts = {s.prompt for s in sample.requests}
    assert "Hi." not in prompts  # the sample's 3-token prompts
    single_turns = {turns[0][1] for turns in conversations if len(turns) == 1}
    assert not prompts & single_turns
    # Only the first two turns count: a later question is never a prompt of its own.
    later = {turns[2][1] for turns in conversations if len(turns) > 2}
    assert not (prompts & later) - {turns[0][1] for turns in conversations}
    assert "kept 227 of the 285 examined" in sample.describe(SAMPLE)


def test_sharegpt_order_is_seeded(conversations, tokenizer):
    once, again = (sample_pairs(conversations, tokenizer, 50, 3).requests for _ in range(2))
    assert once == again
    assert once != sample_pairs(conversations, tokenizer, 50, 4).requests
    # Fewer wanted: the same first pairs, the filter stops as soon as it has enough.
    few = sample_pairs(conversations, tokenizer, 5, 3)
    assert few.requests == once[:5] and few.examined < 20


def test_sharegpt_pairs_dropped_one_rule_at_a_time(tokenizer):
    word = " serving"  # one token of the built tokenizer
    assert len(tokenizer.encode(word * 10)) == 10

    def conversation(prompt_tokens, answer_tokens):
        return [("human", word * prompt_tokens), ("gpt", word * answer_tokens)]

    cases = [conversation(3, 10), conversation(10, 3), conversation(1025, 10), conversation(1000, 1049),
             conversation(4, 4), conversation(1024, 1024)]  # fmt: skip
    sample = sample_pairs(cases, tokenizer, 10, 0)  # more than pass: every pair is examined
    assert sample.dropped == {"prompt under 4 tokens": 1, "answer under 4 tokens": 1, "prompt over 1024 tokens": 1,
                              "prompt and answer over 2048 tokens": 1}  # fmt: skip
    assert sample.kept == 2 and set(pairs(sample.requests)) == {(4, 4), (1024, 1024)} and len(sample.requests) == 10
    with pytest.raises(ParamsError, match="none of 4 pairs"):
        sample_pairs(cases[:4], tokenizer, 2, 0)


@pytest.mark.parametrize(
    "content, named",
    [
        ('{"conversations": []}', "expected a JSON list of conversations, found a dict"),
        ('[{"conversations": []}, {"turns": []}]', "item 1: 'conversations'"),
        ('[{"conversations": [{"from": "human"}]}]', "item 0: conversations[0].value: expected a string"),
        ('[{"conversations": [{"from": "human", "value": 3}]}]', "item 0: conversations[0].value"),
        ('[{"conversations": ["hello"]}]', "item 0: conversations[0]: expected an object"),
        ("[{", "not valid JSON"),
    ],
)
def test_a_malformed_sharegpt_file_is_named_in_one_line(tmp_path, content, named):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ParamsError) as raised:
        read_conversations(path)
    assert str(raised.value).startswith(f"{path}: ") and named in str(raised.value) and "\n" not in str(raised.value)


def test_a_missing_or_folder_sharegpt_path_is_refused(tmp_path):
    with pytest.raises(ParamsError, match="ShareGPT file not found"):
        read_conversations(tmp_path / "nope.json")
    with pytest.raises(ParamsError, match="not a file"):
        read_conversations(tmp_path)


def test_range_ratio_bounds_are_vllms():
    # vLLM: floor(n·(1−r)) … ceil(n·(1+r)), both included.
    assert length_bounds(5, 0.5) == (2, 8)
    assert length_bounds(64, 0.0) == (64, 64)


def test_a_shared_prefix_is_counted_on_top_of_the_random_input(tokenizer):
    specs = random_requests(tokenizer, 6, 20, 4, seed=1, range_ratio=0.5, prefix_len=40)
    encoded = [tokenizer.encode(s.prompt) for s in specs]
    assert len({tuple(ids[:40]) for ids in encoded}) == 1  # one prefix, the same tokens in every prompt
    assert len({tuple(ids[40:]) for ids in encoded}) == 6
    for spec, ids in zip(specs, encoded):
        assert spec.prompt_len == len(ids) and 40 + 10 <= spec.prompt_len <= 40 + 30  # the ratio leaves the prefix alone
        assert 2 <= spec.max_tokens <= 6
    assert random_requests(tokenizer, 6, 20, 4, seed=1, range_ratio=0.5, prefix_len=40) == specs
    unshared = random_requests(tokenizer, 6, 20, 4, seed=1)
    assert len({tuple(tokenizer.encode(s.prompt)[:10]) for s in unshared}) == 6


def test_prefix_repetition_shape(tokenizer):
    specs = prefix_repetition_requests(tokenizer, 12, prefix_len=16, suffix_len=8, num_prefixes=3, output_len=5, seed=2)
    encoded = [tokenizer.encode(s.prompt) for s in specs]
    prefixes = [tuple(ids[:16]) for ids in encoded]
    assert len(specs) == 12 and sorted(prefixes.count(p) for p in set(prefixes)) == [4, 4, 4]
    assert all(s.prompt_len == len(ids) == 24 and s.max_tokens == 5 for s, ids in zip(specs, encoded))
    assert prefixes[:4] != sorted(prefixes[:4]) or prefixes != sorted(prefixes)  # shuffled, not grouped
    assert prefix_repetition_requests(tokenizer, 12, 16, 8, 3, 5, seed=2) == specs
    # A stage sends exactly what it asks for: 13 for 3 prefixes is vLLM's 12, then the first again.
    thirteen = prefix_repetition_requests(tokenizer, 13, 16, 8, 3, 5, seed=2)
    assert len(thirteen) == 13 and thirteen[12] == thirteen[0]
    with pytest.raises(ParamsError, match="at least one request per prefix"):
        prefix_repetition_requests(tokenizer, 2, 16, 8, 3, 5, seed=2)


def test_dataset_requests_by_name(tokenizer, tmp_path):
    shared = dataset_requests(Dataset("random", random_input_len=8, random_output_len=3, random_prefix_len=16),
                              tokenizer, 3, 0)  # fmt: skip
    assert [s.prompt_len for s in shared] == [24, 24, 24]
    lines = []
    chosen = dataset_requests(Dataset("sharegpt", str(SAMPLE)), tokenizer, 8, 0, say=lines.append)
    assert pairs(chosen) == VLLM_SEED_0 and lines[0].startswith("sharegpt: 300 conversations")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "one two three"}\n')
    assert [s.max_tokens for s in dataset_requests(Dataset("custom", str(prompts), random_output_len=7), tokenizer, 2, 0)] == [7, 7]
    assert Dataset("sharegpt").problems() == [("path", "required with the sharegpt dataset")]
    assert Dataset("random", random_input_len=1, random_output_len=1, random_range_ratio=1.0).problems()[0][0] == "random_range_ratio"


@pytest.fixture(scope="module")
def endpoint():
    with StreamingEndpoint() as running:
        yield running


def bench(endpoint, model_dir, tmp_path, capsys, name, *flags):
    """``servinglab bench`` in this process (one import of the tokenizer for all), one client process."""
    out, recs = tmp_path / f"{name}.json", tmp_path / f"{name}.jsonl"
    code = cli.main(["bench", "--base-url", endpoint.url, "--model", "m", "--tokenizer", str(model_dir), "--num-prompts",
                     "4", "--seed", "3", "--workers", "1", "--out", str(out), "--records", str(recs), *flags])  # fmt: skip
    said = capsys.readouterr()
    assert code == 0, said.err
    records = sorted((json.loads(line) for line in recs.read_text().splitlines()), key=lambda r: r["index"])
    return json.loads(out.read_text()), [r["expected_prompt_tokens"] for r in records], said.out


def test_bench_flags_keep_their_old_aliases(endpoint, model_dir, tmp_path, capsys):
    new, new_lengths, _ = bench(endpoint, model_dir, tmp_path, capsys, "new", "--random-input-len", "12", "--random-output-len",
                                "3", "--random-range-ratio", "0.5", "--random-prefix-len", "32")  # fmt: skip
    old, old_lengths, _ = bench(endpoint, model_dir, tmp_path, capsys, "old", "--input-len", "12", "--output-len", "3",
                                "--range-ratio", "0.5", "--random-prefix-len", "32")  # fmt: skip
    assert new["dataset"] == old["dataset"] and new_lengths == old_lengths
    assert new["dataset_name"] == "random" and new["dataset"]["random_prefix_len"] == 32
    assert all(32 + 6 <= n <= 32 + 18 for n in new_lengths)
    shared, _, said = bench(endpoint, model_dir, tmp_path, capsys, "sharegpt", "--dataset-name", "sharegpt", "--dataset-path",
                            str(SAMPLE), "--sharegpt-output-len", "2")  # fmt: skip
    assert shared["completed"] == 4 and shared["total_output_tokens"] == 8
    assert re.search(r"^sharegpt: 300 conversations of .*; kept 4 of the \d+ examined", said, re.M), said


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--dataset-name", "sharegpt"], "--dataset-path: required with the sharegpt dataset"),
        (["--dataset-name", "sharegpt", "--dataset-path", "nope.json"], "--dataset-path nope.json: file not found"),
        (["--dataset-name", "random", "--output-len", "4"], "--random-input-len: required with the random dataset"),
        (["--dataset-name", "sharegpt", "--prompts-file", "p.jsonl"], "--prompts-file: give either it"),
        (["--input-len", "4", "--output-len", "4", "--range-ratio", "1"], "--random-range-ratio: 1.0: must be in [0, 1)"),
    ],
)
def test_bad_dataset_flags_exit_2_in_one_line(flags, named):
    done = run_cli("bench", "--base-url", "http://127.0.0.1:1", "--model", "m", "--num-prompts", "1", "--seed", "0",
                   "--out", "/tmp/never-written.json", *flags, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == f"servinglab: {named}" or named in done.stderr.strip().splitlines()[-1], done.stderr


def test_a_negative_prefix_is_a_usage_error():
    done = run_cli("bench", "--base-url", "http://127.0.0.1:1", "--model", "m", "--num-prompts", "1", "--seed", "0",
                   "--out", "o.json", "--input-len", "4", "--output-len", "4", "--random-prefix-len", "-1", timeout=120)  # fmt: skip
    assert done.returncode == 2 and "--random-prefix-len" in done.stderr.strip().splitlines()[-1]


def test_study_dataset_key(tmp_path):
    study = load_study(PARAMS / "local-sharegpt.yaml")
    spec = study.workloads.latency.dataset_spec(study.resolve_path)
    assert spec.name == "sharegpt" and spec.path == str(SAMPLE.resolve())
    legacy = load_study(PARAMS / "local.yaml").workloads.latency
    assert legacy.dataset_spec() == Dataset("random", random_input_len=legacy.input_len, random_output_len=legacy.output_len)
    prefixed = load_study(PARAMS / "local.yaml", ["workloads.latency.dataset.random_prefix_len=256"]).workloads.latency
    assert prefixed.dataset_spec().random_prefix_len == 256 and prefixed.dataset_spec().random_input_len == legacy.input_len
    repeated = load_study(PARAMS / "local.yaml", ["workloads.latency.dataset.name=prefix_repetition",
                                                  "workloads.latency.dataset.prefix_repetition_num_prefixes=4"])  # fmt: skip
    assert repeated.workloads.latency.dataset_spec().prefix_repetition_num_prefixes == 4
    assert repeated.workloads.latency.dataset_spec().prefix_repetition_prefix_len == 256  # vLLM's default


@pytest.mark.parametrize(
    "items, named",
    [
        (["workloads.latency.dataset.name=sharegpt"], "workloads.latency.dataset"),
        (["workloads.latency.dataset.name=sharegpt", "workloads.latency.dataset.path=nope.json"],
         "workloads.latency.dataset.path: "),
        (["workloads.latency.dataset.name=sharegpt", "workloads.latency.dataset.path=params"], "not a file"),
        (["workloads.latency.dataset.name=sharegpt", "workloads.latency.dataset.path=params/local.yaml"], "not valid JSON"),
        (["workloads.latency.dataset.name=markov"], "workloads.latency.dataset.name"),
        (["workloads.latency.dataset.random_range_ratio=1"], "workloads.latency.dataset.random_range_ratio"),
        (["workloads.latency.dataset.random_prefix_len=-1"], "workloads.latency.dataset.random_prefix_len"),
        (["workloads.latency.dataset.random_prefix=8"], "random_prefix"),
        (["workloads.latency.dataset.name=prefix_repetition", "workloads.latency.dataset.prefix_repetition_num_prefixes=100"],
         "100 prefixes, but a stage sends only"),
        (["workloads.latency.dataset.name=custom", "workloads.latency.dataset.path=params/local.yaml",
          "workloads.latency.prompts_file=params/local.yaml"], "not both"),
    ],
)
def test_bad_study_datasets_are_refused_naming_the_key(items, named):
    with pytest.raises(ParamsError) as raised:
        load_study(PARAMS / "local.yaml", items)
    assert named in str(raised.value), raised.value


def test_the_prefix_cache_hit_rate_comes_from_the_stage_delta():
    server = summarize_delta({"vllm:prompt_tokens": 1000.0, "vllm:prefix_cache_queries": 1000.0,
                              "vllm:prefix_cache_hits": 640.0})  # fmt: skip
    assert server["prefix_cache_hit_rate"] == pytest.approx(0.64) and server["prefix_cache_hits_total"] == 640.0
    assert "prefix_cache_hit_rate" not in summarize_delta({"vllm:prefix_cache_queries": 0.0})


@pytest.mark.engine
def test_a_shared_prefix_hits_the_engines_prefix_cache(engine, tmp_path):
    from servinglab.measure.bench import run_bench

    dataset = Dataset("random", random_input_len=8, random_output_len=2, random_prefix_len=256)
    result = run_bench(engine.deployment.base_url, "tiny", 8, 2, 4, seed=5, tokenizer=str(engine.platform.model_dir()[0]),
                       max_concurrency=1, ignore_eos=True, dataset=dataset, workers=1)  # fmt: skip
    assert result["completed"] == 4 and not math.isnan(result["server"]["prefix_cache_hit_rate"])
    assert result["server"]["prefix_cache_hit_rate"] > 0
