"""Shared fixtures: tiny random models and tokenizers built locally (never the network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Prefect binds its console log handler to sys.stderr when first imported. Import it here, while stderr is
# pytest's session-long stream: imported first inside a CliRunner call, it would keep that call's stream,
# closed afterwards ("I/O operation on closed file" in every later flow).
import prefect  # noqa: E402,F401
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

CORPUS = (
    "the quick brown fox jumps over the lazy dog. speculative decoding drafts tokens and the target verifies them. "
    "a small drafter proposes, a large target accepts or rejects. numbers 0 1 2 3 4 5 6 7 8 9 and more words here. "
) * 20


def make_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on a fixed corpus; different sizes give different tokenizations."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def make_llama(vocab_size: int, layers: int = 2, seed: int = 0, hidden: int = 32, eos: int | None = 0, std=0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, eos_token_id=eos, bos_token_id=None, pad_token_id=None,
                      initializer_range=std, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    return model


def perturbed(model, scale: float, seed: int = 1):
    """A copy of `model` with Gaussian noise on every weight: a drafter that agrees sometimes."""
    import copy

    d = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp(min=1e-3))
    return d


@pytest.fixture(scope="session")
def tok300():
    return make_tokenizer(300)


@pytest.fixture(scope="session")
def tok400():
    return make_tokenizer(400)


@pytest.fixture
def sd2_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SD2_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="session")
def real_home() -> Path:
    """SD2_HOME for the real packaged models: shared by the whole session so conversion happens once."""
    return Path(os.environ.get("SD2_HOME", Path.home() / ".cache" / "sd2"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tok300) -> Path:
    """A tiny Llama saved as a plain HF dir with its tokenizer (the 'target' of unit tests)."""
    from sd2.models import save_model

    d = tmp_path_factory.mktemp("tinymodel") / "model"
    save_model(make_llama(len(tok300), layers=2, seed=1, eos=tok300.eos_token_id, hidden=64), tok300, d)
    return d


@pytest.fixture(scope="session")
def seed_file(tmp_path_factory) -> Path:
    import json

    f = tmp_path_factory.mktemp("seeds") / "seeds.jsonl"
    rows = [{"instruction": f"describe the fox number {i}", "context": "", "category": "open_qa",
             "response": f"the quick brown fox {i} jumps over the lazy dog."} for i in range(10)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


@pytest.fixture
def fresh_kernel(tmp_path, monkeypatch):
    """A machine that has not built sd2's fp16 kernel yet (own SD2_HOME, nothing cached in the process); yields
    where it would be built."""
    from sd2 import fastpath

    monkeypatch.setenv("SD2_HOME", str(tmp_path / "home"))
    fastpath.kernel.cache_clear()
    yield tmp_path / "home" / "cache" / "kernels"
    fastpath.kernel.cache_clear()
