"""Tokenizer round trip and errors; checkpoint round trip and every broken-checkpoint case."""

import hashlib
import json
import pickle

import pytest
import torch

from gpt import CharTokenizer, CheckpointError, UnknownCharacterError, load_checkpoint, save_checkpoint
from gpt.checkpoint import CONFIG_FILE, WEIGHTS_FILE


def test_vocabulary_of_julius_caesar(corpus_text, tokenizer):
    assert len(corpus_text) == 116_216
    assert tokenizer.vocab_size == 65
    assert tokenizer.chars == "".join(sorted(set(corpus_text)))


def test_round_trip_is_lossless(corpus_text, tokenizer):
    assert tokenizer.decode(tokenizer.encode(corpus_text)) == corpus_text


def test_unknown_characters_are_listed_escaped_and_capped():
    tok = CharTokenizer("abc")
    with pytest.raises(UnknownCharacterError) as err:
        tok.encode("ab\x00é€a\n")
    assert err.value.characters == ["\x00", "é", "€", "\n"]
    assert "'\\x00'" in str(err.value) and "'\\n'" in str(err.value)
    with pytest.raises(UnknownCharacterError, match="and 5 more"):
        tok.encode("0123456789ABCDE")


def test_vocabulary_must_be_sorted_and_distinct():
    with pytest.raises(ValueError):
        CharTokenizer("ba")
    with pytest.raises(ValueError):
        CharTokenizer("aab")


def test_checkpoint_round_trip_gives_identical_logits(tmp_path, tiny_model, tokenizer):
    save_checkpoint(tmp_path / "ckpt", tiny_model, tokenizer, preset="tiny", metadata={"step": 3})
    loaded = load_checkpoint(tmp_path / "ckpt")
    idx = torch.randint(0, 65, (2, 30))
    torch.testing.assert_close(loaded.model(idx)[0], tiny_model(idx)[0], atol=0, rtol=0)
    assert loaded.tokenizer.chars == tokenizer.chars
    assert loaded.config["training"] == {"step": 3} and loaded.config["preset"] == "tiny"


def test_saving_again_replaces_the_checkpoint_whole(tmp_path, tiny_model, tokenizer):
    path = tmp_path / "ckpt"
    save_checkpoint(path, tiny_model, tokenizer, metadata={"step": 1})
    save_checkpoint(path, tiny_model, tokenizer, metadata={"step": 2}, dtype=torch.float16)
    loaded = load_checkpoint(path)
    assert loaded.config["training"]["step"] == 2 and loaded.config["weights_dtype"] == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging directories left


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, tiny_model, tokenizer, monkeypatch):
    path = tmp_path / "ckpt"
    save_checkpoint(path, tiny_model, tokenizer, metadata={"step": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("gpt.checkpoint._exchange", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, tiny_model, tokenizer, metadata={"step": 2})
    assert load_checkpoint(path).config["training"]["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_save_cleans_up_after_a_killed_one(tmp_path, tiny_model, tokenizer):
    (tmp_path / ".ckpt.abc123").mkdir()  # what a save killed before its rename leaves behind
    save_checkpoint(tmp_path / "ckpt", tiny_model, tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.fixture
def saved(tmp_path, tiny_model, tokenizer):
    path = tmp_path / "ckpt"
    save_checkpoint(path, tiny_model, tokenizer)
    return path


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("name", [WEIGHTS_FILE, CONFIG_FILE])
def test_missing_file(saved, name):
    (saved / name).unlink()
    with pytest.raises(CheckpointError, match=f"{name}.*missing"):
        load_checkpoint(saved)


def test_truncated_weights(saved):
    data = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=WEIGHTS_FILE):
        load_checkpoint(saved)


def test_corrupted_weights(saved):
    data = bytearray((saved / WEIGHTS_FILE).read_bytes())
    data[-100] ^= 0xFF
    (saved / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(saved)


def test_pickle_instead_of_safetensors_is_never_unpickled(saved):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))
    payload = pickle.dumps(Boom())
    (saved / WEIGHTS_FILE).write_bytes(payload)
    config = json.loads((saved / CONFIG_FILE).read_text())
    config["weights_sha256"] = hashlib.sha256(payload).hexdigest()  # only the format can stop it now
    (saved / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(saved)


def test_config_that_does_not_match_the_weights(saved):
    config = json.loads((saved / CONFIG_FILE).read_text())
    config["model"]["n_embd"] = 128
    (saved / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match.*transformer"):
        load_checkpoint(saved)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"model": {"n_layr": 2}, "vocab": "ab"}'])
def test_unreadable_config(saved, text):
    (saved / CONFIG_FILE).write_text(text)
    with pytest.raises(CheckpointError, match=CONFIG_FILE):
        load_checkpoint(saved)
