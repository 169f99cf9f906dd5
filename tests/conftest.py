"""Fixtures shared by the whole suite: the corpus, its tokenizer, and a tiny random checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpt import GPT, PRESETS, CharTokenizer, GPTConfig, save_checkpoint

# The suite's models are tiny: one thread beats two, whose hand-offs cost more than the work.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
# CI and these machines carry a copy beside the checkout; elsewhere `python -m training.data` fetches one.
CORPUS_CANDIDATES = [
    REPO.parent / "shared" / "data" / "julius_caesar.txt",
    REPO / "data" / "julius_caesar.txt",
]


@pytest.fixture(scope="session")
def corpus_text() -> str:
    for path in CORPUS_CANDIDATES:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    pytest.skip("no Julius Caesar corpus: run `python -m training.data` first")


@pytest.fixture(scope="session")
def tokenizer(corpus_text: str) -> CharTokenizer:
    return CharTokenizer.from_text(corpus_text)


def tiny_config(vocab_size: int = 65) -> GPTConfig:
    return GPTConfig(**{**PRESETS["tiny"].to_dict(), "vocab_size": vocab_size})


@pytest.fixture
def tiny_model(tokenizer: CharTokenizer) -> GPT:
    torch.manual_seed(1234)
    return GPT(tiny_config(tokenizer.vocab_size)).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer: CharTokenizer) -> Path:
    """A random-weight `tiny` checkpoint on disk, shared by the session's tests (read-only)."""
    torch.manual_seed(1234)
    model = GPT(tiny_config(tokenizer.vocab_size))
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(path, model, tokenizer, preset="tiny", metadata={"note": "random weights, for tests"})
    return path


@pytest.fixture(autouse=True)
def fresh_dynamo_caches():
    """Every compiled decode step adds its graphs to the same code object, and dynamo allows 8 per code
    object in a process (torch._dynamo.config.recompile_limit); the suite compiles more than that."""
    yield
    torch._dynamo.reset()
