"""The small model the local platform serves, built here from a seed.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a text shipped with the package, the
weights are drawn from a seeded generator, and the architecture is Qwen2 so that vLLM runs it with the
same code path as the real Qwen2.5 models. Two kinds of directory come out of this module:

- a *built* model: config, tokenizer and seeded random weights of a shape vLLM's CPU build runs fast;
- a *config-only* model: config and tokenizer of a real shape (Qwen2.5-0.5B), served with
  ``--load-format dummy``; its tokenizer is padded to the model's vocabulary so that every token id the
  random model can emit decodes to text (a tokenizer smaller than the vocabulary makes most streamed
  chunks carry empty text, which breaks any client that times chunks by their text).

Both are cached under ``<cache_dir>/models`` keyed by shape, seed and recipe version, built into a
temporary directory and renamed into place, so concurrent builders never see a half-written model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from .errors import ModelBuildError

# Bump when the recipe changes, so cached models of an older recipe are not reused.
RECIPE_VERSION = 2

END_OF_TURN = "<|im_end|>"
START_OF_TURN = "<|im_start|>"
END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKENS = [END_OF_TEXT, START_OF_TURN, END_OF_TURN]

# ChatML, the format of the Qwen2 family; the end-of-turn token is the model's EOS.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelShape:
    """The numbers that define a Qwen2 model's size."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    # None: the vocabulary is the trained tokenizer's size; a number: pad the tokenizer up to it.
    vocab_size: int | None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


SHAPES: dict[str, ModelShape] = {
    # vLLM's CPU attention kernels need a head dimension they know: 64 works, 16 does not.
    "tiny": ModelShape(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=384,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        vocab_size=None,
    ),
    # The published shape of Qwen2.5-0.5B-Instruct, for config-only serving with dummy weights.
    "qwen2.5-0.5b": ModelShape(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        vocab_size=151936,
    ),
}

TOKENIZER_VOCAB_TARGET = 2048


@dataclass(frozen=True)
class ModelDirFacts:
    """What the suite needs to know about a model directory before serving it."""

    path: str
    architecture: str
    vocab_size: int
    tokenizer_size: int
    has_weights: bool
    eos_token: str | None
    has_chat_template: bool

    @property
    def vocabulary_covered(self) -> bool:
        """True when every token id the model can emit has an entry in the tokenizer."""
        return self.tokenizer_size >= self.vocab_size

    def to_dict(self) -> dict:
        return asdict(self) | {"vocabulary_covered": self.vocabulary_covered}


def _corpus_lines(seed: int) -> list[str]:
    """The shipped text plus seeded recombinations of its words, so the trainer sees more pairs."""
    text = resources.files("servinglab.data").joinpath("corpus.txt").read_text(encoding="utf-8")
    lines = text.splitlines()
    words = text.split()
    rng = random.Random(seed)
    synthetic = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]
    numbers = [" ".join(str(rng.randrange(0, 100000)) for _ in range(8)) for _ in range(100)]
    return lines + synthetic + numbers


# Qwen2's pre-tokenizer split (digits one by one). transformers loads a qwen2 model's tokenizer as
# Qwen2Tokenizer with this split and NFC whatever tokenizer.json says, so training with the same rules
# keeps the file and what vLLM serves in agreement on every token count.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_tokenizer(seed: int, vocab_target: int = TOKENIZER_VOCAB_TARGET):
    """Train a byte-level BPE tokenizer on the shipped corpus; returns a ``tokenizers.Tokenizer``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_target,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols, so any text encodes and any token decodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus_lines(seed), trainer)
    return tokenizer


@functools.lru_cache(maxsize=1)
def _byte_to_symbol() -> dict[int, str]:
    """GPT-2's byte-to-unicode table, the alphabet ByteLevel vocabularies are spelled in."""
    from tokenizers import pre_tokenizers

    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    if set(table.values()) != set(pre_tokenizers.ByteLevel.alphabet()):
        raise ModelBuildError("the tokenizers package uses another byte-level alphabet than expected")
    return table


def _byte_level_string(text: str) -> str:
    """``text`` spelled in the ByteLevel alphabet, as a BPE vocabulary entry must be."""
    table = _byte_to_symbol()
    return "".join(table[b] for b in text.encode("utf-8"))


def pad_tokenizer_json(tokenizer_json: dict, vocab_size: int) -> dict:
    """Add plain vocabulary entries ``<pad_N>`` until the tokenizer covers ``vocab_size`` ids.

    They go into the BPE vocabulary, not the added tokens: no merge produces them (encoding is
    unchanged) and they are not special, so decoding one yields its literal text instead of nothing.
    """
    vocab: dict[str, int] = tokenizer_json["model"]["vocab"]
    taken = set(vocab.values()) | {t["id"] for t in tokenizer_json.get("added_tokens", [])}
    next_id = max(taken) + 1
    if next_id > vocab_size:
        raise ModelBuildError(f"tokenizer already has {next_id} ids, more than the model's {vocab_size}")
    for token_id in range(next_id, vocab_size):
        vocab[_byte_level_string(f"<pad_{token_id}>")] = token_id
    return tokenizer_json


def _tokenizer_size(tokenizer_json: dict) -> int:
    ids = set(tokenizer_json["model"]["vocab"].values())
    ids |= {t["id"] for t in tokenizer_json.get("added_tokens", [])}
    return max(ids) + 1


def _qwen2_config(shape: ModelShape, vocab_size: int, eos_id: int, pad_id: int) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "max_position_embeddings": shape.max_position_embeddings,
        "max_window_layers": shape.num_hidden_layers,
        "rope_theta": shape.rope_theta,
        "rms_norm_eps": shape.rms_norm_eps,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "use_sliding_window": False,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "vocab_size": vocab_size,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "bfloat16",
    }


def _tensor_shapes(shape: ModelShape, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a Qwen2ForCausalLM checkpoint."""
    h, inter, head = shape.hidden_size, shape.intermediate_size, shape.head_dim
    kv = shape.num_key_value_heads * head
    tensors: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab_size, h)}
    for i in range(shape.num_hidden_layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
    tensors["model.norm.weight"] = (h,)
    if not shape.tie_word_embeddings:
        tensors["lm_head.weight"] = (vocab_size, h)
    return tensors


def _write_weights(directory: Path, shape: ModelShape, vocab_size: int, seed: int) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, dims in sorted(_tensor_shapes(shape, vocab_size).items()):
        if name.endswith("norm.weight"):
            tensors[name] = np.ones(dims, dtype=np.float32)
        elif name.endswith(".bias"):
            tensors[name] = np.zeros(dims, dtype=np.float32)
        else:
            tensors[name] = rng.normal(0.0, 0.02, size=dims).astype(np.float32)
    # float32 on disk keeps the file independent of any bfloat16 support; vLLM casts to --dtype.
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_model_dir(directory: Path, shape_name: str, seed: int, weights: bool) -> None:
    """Write a complete model directory (config, tokenizer, optional weights) into ``directory``."""
    if shape_name not in SHAPES:
        raise ModelBuildError(f"unknown model shape {shape_name!r}; known shapes: {', '.join(SHAPES)}")
    shape = SHAPES[shape_name]
    directory.mkdir(parents=True, exist_ok=True)

    tokenizer_json = json.loads(train_tokenizer(seed).to_str())
    if shape.vocab_size is not None:
        tokenizer_json = pad_tokenizer_json(tokenizer_json, shape.vocab_size)
    vocab_size = shape.vocab_size or _tokenizer_size(tokenizer_json)
    special_ids = {t["content"]: t["id"] for t in tokenizer_json["added_tokens"]}
    eos_id, pad_id = special_ids[END_OF_TURN], special_ids[END_OF_TEXT]

    (directory / "tokenizer.json").write_text(
        json.dumps(tokenizer_json, ensure_ascii=False, sort_keys=True), encoding="utf-8"
    )
    _write_json(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "Qwen2Tokenizer",
            "bos_token": None,
            "eos_token": END_OF_TURN,
            "pad_token": END_OF_TEXT,
            "unk_token": None,
            "model_max_length": shape.max_position_embeddings,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(
        directory / "special_tokens_map.json", {"eos_token": END_OF_TURN, "pad_token": END_OF_TEXT}
    )
    _write_json(directory / "config.json", _qwen2_config(shape, vocab_size, eos_id, pad_id))
    _write_json(
        directory / "generation_config.json",
        {"eos_token_id": eos_id, "pad_token_id": pad_id, "do_sample": True},
    )
    _write_json(
        directory / "servinglab-model.json",
        {
            "recipe_version": RECIPE_VERSION,
            "shape": shape_name,
            "seed": seed,
            "weights": "seeded-random" if weights else "none (serve with --load-format dummy)",
        },
    )
    if weights:
        _write_weights(directory, shape, vocab_size, seed)


def model_cache_path(cache_dir: Path, shape_name: str, seed: int, weights: bool) -> Path:
    kind = "built" if weights else "config-only"
    return Path(cache_dir) / "models" / f"{shape_name}-{kind}-seed{seed}-r{RECIPE_VERSION}"


def ensure_model(cache_dir: str | os.PathLike, shape: str = "tiny", seed: int = 0, weights: bool = True) -> Path:
    """Return the cached model directory for ``shape`` and ``seed``, building it the first time.

    Parameters
    ----------
    cache_dir : path
        The study's cache directory; the model lands in ``<cache_dir>/models/``.
    shape : str
        A name from ``SHAPES``.
    seed : int
        Seed of the tokenizer's synthetic corpus and of the weights.
    weights : bool
        False writes a config-only directory, to be served with ``--load-format dummy``.
    """
    target = model_cache_path(Path(cache_dir), shape, seed, weights)
    if (target / "servinglab-model.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write_model_dir(staging, shape, seed, weights)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished the same build first; its result is identical.
            if not (target / "servinglab-model.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def model_dir_facts(path: str | os.PathLike) -> ModelDirFacts:
    """Read a Hugging Face model directory's config and tokenizer; raise if it cannot be served."""
    directory = Path(path)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelBuildError(f"{directory}: no config.json, so this is not a Hugging Face model directory")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelBuildError(f"{config_path}: not valid JSON ({exc})") from exc
    tokenizer_size = 0
    tokenizer_path = directory / "tokenizer.json"
    if tokenizer_path.is_file():
        tokenizer_size = _tokenizer_size(json.loads(tokenizer_path.read_text(encoding="utf-8")))
    tokenizer_config = {}
    if (directory / "tokenizer_config.json").is_file():
        tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    eos = tokenizer_config.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    has_weights = any(directory.glob("*.safetensors")) or any(directory.glob("*.bin"))
    return ModelDirFacts(
        path=str(directory),
        architecture=(config.get("architectures") or ["?"])[0],
        vocab_size=int(config.get("vocab_size", 0)),
        tokenizer_size=tokenizer_size,
        has_weights=has_weights,
        eos_token=eos,
        has_chat_template=bool(tokenizer_config.get("chat_template"))
        or (directory / "chat_template.jinja").is_file(),
    )


def directory_digest(path: str | os.PathLike) -> str:
    """SHA-256 over the names and bytes of every file in a model directory (for determinism checks)."""
    digest = hashlib.sha256()
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()
