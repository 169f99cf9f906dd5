"""The checkpoint the repository ships, the one `scripts/serve` loads by default: it loads, it writes the
play's kind of text, and its held-out loss is the one its config.json claims."""

from __future__ import annotations

import pytest
import torch

from gpt import SamplingParams, generate, load_checkpoint
from service.settings import DEFAULT_CHECKPOINT
from training.data import encode_corpus, load_corpus, split
from training.train import held_out_loss


@pytest.fixture(scope="module")
def shipped():
    return load_checkpoint(DEFAULT_CHECKPOINT)


def test_the_shipped_checkpoint_generates_text_in_its_vocabulary(shipped):
    prompt = shipped.tokenizer.encode("BRUTUS.\n")
    chunks = list(generate(shipped.model, prompt, shipped.tokenizer.decode, 200,
                           SamplingParams(temperature=0.8, seed=1)))
    text = "".join(chunk.text for chunk in chunks)
    assert len(text) == 200 and chunks[-1].finish_reason == "length"
    assert set(text) <= set(shipped.tokenizer.chars)
    assert len(text.split()) > 20  # words, not one repeated character


def test_the_shipped_checkpoint_scores_the_held_out_loss_its_config_records(shipped):
    training = shipped.config["training"]
    corpus = load_corpus(training["corpus"])
    assert corpus.sha256 == training["corpus_sha256"]
    _, held_out = split(encode_corpus(corpus, shipped.tokenizer))
    loss = held_out_loss(shipped.model, held_out, torch.device("cpu"),
                         block_size=training["hyperparameters"]["block_size"])
    # The record was measured on float32 weights during training; the shipped weights may be float16.
    assert loss == pytest.approx(training["val_loss"], abs=0.01)
