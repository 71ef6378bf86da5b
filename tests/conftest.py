"""Shared fixtures: tiny random models with tokenizers trained on the fly (no downloads), and test markers.

- ``dolly_tokenizer``: a byte-level BPE tokenizer trained here with ``tokenizers``, carrying Dolly's special tokens.
- ``tiny_neox_dir``: a random 2-layer GPT-NeoX (Pythia / Dolly v2 architecture) saved with that tokenizer.
- ``tiny_gptj_dir``: a random 2-layer GPT-J (Dolly v1 architecture) saved with that tokenizer.
- ``memorized_neox_dir``: the tiny GPT-NeoX over-fitted on ``MEMORIZED`` records, so greedy decoding answers them
  exactly and ends with ``### End``: the behaviour of a real Dolly model, in a second of CPU time.

Tests under ``tests/unit`` are marked ``unit`` and tests under ``tests/integration`` ``integration`` automatically.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dolly_langchain.prompts import DOLLY_SPECIAL_TOKENS, format_prompt, format_training_text

# Instruction, context, response records the memorized model learns by heart.
MEMORIZED = [
    ("What is the capital of France?", None, "Paris is the capital of France."),
    ("Name a primary color.", None, "Blue is a primary color."),
    ("Summarize the text.", "The cat sat on the mat all day.", "A cat sat on a mat."),
]

_WORDS = (
    "the a an of to in is it that was for on are with as his they be at one have this from or had by word but "
    "what some we can out other were all there when up use your how said each she which do their time if will "
    "way about many then them write would like so these her long make thing see him two has look more day could "
    "go come did number sound no most people my over know water than call first who may down side been now find "
    "capital France Paris primary color blue cat sat mat summarize text name answer question context"
).split()


def _corpus():
    import random

    rng = random.Random(0)
    for i in range(400):
        sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14)))
        yield format_training_text(sentence.capitalize() + "?", sentence + ".", sentence if i % 3 == 0 else None)
    for instruction, context, response in MEMORIZED:
        yield format_training_text(instruction, response, context)


def _train_tokenizer(dolly_special_tokens: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    if dolly_special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(DOLLY_SPECIAL_TOKENS)})
    return tokenizer


@pytest.fixture(scope="session")
def dolly_tokenizer():
    """A freshly trained byte-level BPE tokenizer with Dolly's special tokens (no pad token, like Pythia's)."""
    return _train_tokenizer(dolly_special_tokens=True)


@pytest.fixture(scope="session")
def plain_tokenizer():
    """The same tokenizer without Dolly's special tokens (a base model that was never Dolly-tuned)."""
    return _train_tokenizer(dolly_special_tokens=False)


def tiny_neox(vocab_size: int, seed: int = 0):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    return GPTNeoXForCausalLM(config).eval()


def tiny_gptj(vocab_size: int, seed: int = 0):
    import torch
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(seed)
    config = GPTJConfig(
        vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=512, bos_token_id=0,
        eos_token_id=0,
    )
    return GPTJForCausalLM(config).eval()


def _save(out: Path, model, tokenizer) -> Path:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_neox_dir(tmp_path_factory, dolly_tokenizer) -> Path:
    """A random tiny GPT-NeoX + Dolly tokenizer saved as a model directory."""
    return _save(tmp_path_factory.mktemp("tiny-neox"), tiny_neox(len(dolly_tokenizer)), dolly_tokenizer)


@pytest.fixture(scope="session")
def base_neox_dir(tmp_path_factory, plain_tokenizer) -> Path:
    """A random tiny GPT-NeoX whose tokenizer has no Dolly tokens yet: a base model before Dolly tuning."""
    return _save(tmp_path_factory.mktemp("base-neox"), tiny_neox(len(plain_tokenizer)), plain_tokenizer)


@pytest.fixture(scope="session")
def tiny_gptj_dir(tmp_path_factory, dolly_tokenizer) -> Path:
    """A random tiny GPT-J + Dolly tokenizer saved as a model directory."""
    return _save(tmp_path_factory.mktemp("tiny-gptj"), tiny_gptj(len(dolly_tokenizer)), dolly_tokenizer)


def memorize(model, tokenizer, texts, steps: int = 150):
    """Over-fit ``model`` on ``texts`` (full-sequence loss) so greedy decoding reproduces them."""
    import torch

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = [tokenizer(t + tokenizer.eos_token)["input_ids"] for t in texts]
    for _ in range(steps):
        for ids in batch:
            ids = torch.tensor([ids])
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    return float(loss.detach())


@pytest.fixture(scope="session")
def memorized_neox_dir(tmp_path_factory, dolly_tokenizer) -> Path:
    """A tiny GPT-NeoX that answers the ``MEMORIZED`` instructions exactly, in Dolly's format."""
    out = tmp_path_factory.mktemp("memorized-neox")
    model = tiny_neox(len(dolly_tokenizer), seed=1)
    memorize(model, dolly_tokenizer, [format_training_text(i, r, c) for i, c, r in MEMORIZED])
    return _save(out, model, dolly_tokenizer)


@pytest.fixture(scope="session")
def memorized_plain_dir(tmp_path_factory, plain_tokenizer) -> Path:
    """Like ``memorized_neox_dir`` but the tokenizer has no Dolly special tokens (text-based extraction)."""
    out = tmp_path_factory.mktemp("memorized-plain")
    model = tiny_neox(len(plain_tokenizer), seed=2)
    memorize(model, plain_tokenizer, [format_training_text(i, r, c) for i, c, r in MEMORIZED])
    return _save(out, model, plain_tokenizer)


@pytest.fixture(scope="session")
def dolly_15k_path() -> Path:
    """The real databricks-dolly-15k.jsonl, found through ``$DOLLY_15K_PATH`` (set by .ci/run)."""
    path = os.environ.get("DOLLY_15K_PATH")
    if not path or not Path(path).is_file():
        pytest.skip("real data not available: set DOLLY_15K_PATH to databricks-dolly-15k.jsonl")
    return Path(path)


@pytest.fixture(autouse=True)
def _no_leftover_zero3():
    """Building ZeRO-3 TrainingArguments in-process leaves transformers' global ZeRO-3 config alive, and every later
    from_pretrained would then try to start DeepSpeed (and MPI); clear it around each test."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    yield
    unset_hf_deepspeed_config()


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "unit" in parts:
            item.add_marker(pytest.mark.unit)
        elif "integration" in parts:
            item.add_marker(pytest.mark.integration)
        elif "standard" in parts:  # LangChain's suites: the unit ones load nothing, the integration ones real models
            item.add_marker(pytest.mark.unit if "unit" in Path(str(item.fspath)).name else pytest.mark.integration)


__all__ = ["MEMORIZED", "format_prompt", "memorize", "tiny_gptj", "tiny_neox"]


# The user's cache setting as the run started, before any fixture points the cache at a temporary directory.
_USER_CACHE = os.environ.get("DOLLY_LANGCHAIN_CACHE")


@pytest.fixture(scope="session")
def embedded_checkpoint() -> Path:
    """The embedded model's plain HF checkpoint in the user's own cache (converted there on first use, ~25 s, as
    ``dolly ask`` does), whatever cache directory other fixtures have set meanwhile."""
    from dolly_langchain.models import embedded_model_path

    with pytest.MonkeyPatch.context() as mp:
        if _USER_CACHE is None:
            mp.delenv("DOLLY_LANGCHAIN_CACHE", raising=False)
        else:
            mp.setenv("DOLLY_LANGCHAIN_CACHE", _USER_CACHE)
        return embedded_model_path()


@pytest.fixture(scope="session")
def ct2_cache(tmp_path_factory):
    """Keep CTranslate2 conversions of the tiny test models out of the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DOLLY_LANGCHAIN_CACHE", str(tmp_path_factory.mktemp("dolly-cache")))
    yield
    mp.undo()
