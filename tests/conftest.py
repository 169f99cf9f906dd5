"""Fixtures shared by the whole suite: the corpus, its tokenizer, and a tiny random checkpoint."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from gpt import GPT, PRESETS, CharTokenizer, GPTConfig, save_checkpoint
from service.engine import Engine
from training import data

# The suite's models are tiny: one thread beats two, whose hand-offs cost more than the work.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
# The checkout's own data/ (git-ignored), where `python -m training.data` caches the verified corpus;
# scripts/test runs it before pytest, so a fresh clone's suite has the corpus and skips nothing for
# want of it.
CORPUS_PATH = data.DEFAULT_CACHE_DIR / data.CORPORA["julius-caesar"]
NO_CORPUS = (f"no Julius Caesar corpus at {CORPUS_PATH}: run `.venv/bin/python -m training.data` first "
             "(scripts/test does), which fetches and verifies it into data/")


def read_corpus() -> str:
    """The verified Julius Caesar text from data/; fails (never skips) the caller when it is missing."""
    if not CORPUS_PATH.is_file():
        pytest.fail(NO_CORPUS, pytrace=False)
    return data.load_corpus("julius-caesar").text  # checks the pinned sha256; no download, it is cached


@pytest.fixture(scope="session")
def corpus_text() -> str:
    return read_corpus()


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


MakeEngine = Callable[..., Engine]


@pytest.fixture
def make_engine(tiny_model: GPT, tokenizer: CharTokenizer) -> MakeEngine:
    engines = []

    def make(warm_up_s: float = 30, **options: Any) -> Engine:
        engine = Engine(tiny_model, tokenizer, **{"max_batch_size": 4, "max_queue": 8, **options})
        engine.start()
        deadline = time.monotonic() + warm_up_s
        while not engine.ready:
            assert time.monotonic() < deadline, "the engine did not warm up"
            time.sleep(0.01)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown()
