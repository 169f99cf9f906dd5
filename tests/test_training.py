"""training/: the loop lowers the loss, checkpoints load, resume is exact, a crash while saving is harmless,
and the CLIs (--summary, training.evaluate, training.sample) say what they should.

Run: .venv/bin/python -m pytest tests/test_training.py -q
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gpt.checkpoint
from gpt import load_checkpoint
from training import evaluate, sample
from training.__main__ import main as training_main
from training.config import TrainConfig
from training.train import RESUME_FILE, train

LOG_LINE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} \| (INFO|WARNING) \| .+$")


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model trains fastest on one thread, and the suite shares two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def short_text(tmp_path_factory: pytest.TempPathFactory, corpus_text: str) -> Path:
    """The first 20,000 characters of the play: 18,000 to train on, 2,000 held out."""
    path = tmp_path_factory.mktemp("corpus") / "short.txt"
    path.write_text(corpus_text[:20_000], encoding="utf-8")
    return path


def tiny_run(out: Path, data: Path, **overrides) -> TrainConfig:
    settings = dict(out=str(out), preset="tiny", data=str(data), max_steps=12, eval_interval=4, batch_size=4,
                    lr=3e-3, dropout=0.1, seed=7)
    return TrainConfig(**(settings | overrides))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, short_text: Path) -> Path:
    """A tiny model trained for 48 steps through the command line, as a user would run it."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs") / "tiny"
    training_main(["--preset", "tiny", "--data", str(short_text), "--out", str(out), "--max-steps", "48",
                   "--eval-interval", "16", "--batch-size", "8", "--lr", "3e-3", "--dropout", "0"])
    return out


def test_training_lowers_the_held_out_loss_and_the_result_loads(trained, short_text):
    checkpoint = load_checkpoint(trained)
    meta = checkpoint.config["training"]
    metrics = json.loads((trained / "metrics.json").read_text())
    losses = [h["val_loss"] for h in metrics["history"]]
    assert [h["step"] for h in metrics["history"]] == [0, 16, 32, 48]
    assert losses[0] > 4.0  # about ln(65) at random init
    assert losses[-1] < losses[0] - 1.0
    assert metrics["best_val_loss"] == min(losses[1:]) == pytest.approx(meta["val_loss"], abs=1e-6)
    assert meta["step"] == metrics["best_step"]
    assert meta["corpus_sha256"] == metrics["corpus_sha256"]
    assert meta["command"] == (f"python -m training --preset tiny --data {short_text} --out {trained} "
                               "--max-steps 48 --eval-interval 16 --batch-size 8 --lr 3e-3 --dropout 0")
    assert checkpoint.config["preset"] == "tiny"
    # The checkpoint in DIR is a real one: the logits of the loaded model follow from its weights.
    ids = torch.tensor([checkpoint.tokenizer.encode("BRUTUS: ")])
    logits, _ = checkpoint.model(ids)
    assert torch.isfinite(logits).all()
    assert load_checkpoint(trained / "last").config["training"]["step"] == 48
    assert (trained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_log_uses_the_seed_format(trained):
    lines = (trained / "train.log").read_text().splitlines()
    assert lines and all(LOG_LINE.match(line) for line in lines)
    step_lines = [line for line in lines if "| step 48/48 |" in line]
    assert len(step_lines) == 1
    assert re.search(r"train loss \d\.\d{4} \| held-out loss \d\.\d{4} .* \| [\d,]+ tokens/s", step_lines[0])


def test_evaluate_prints_the_recorded_held_out_loss(trained, short_text, capsys):
    evaluate.main(["--checkpoint", str(trained), "--data", str(short_text)])
    output = capsys.readouterr().out
    recorded = load_checkpoint(trained).config["training"]["val_loss"]
    nats = float(re.search(r"held-out loss: (\d+\.\d+) nats/char, (\d+\.\d+) bits/char", output).group(1))
    assert nats == pytest.approx(recorded, abs=1e-4)


def test_sample_continues_the_prompt(trained, capsys):
    command = ["--checkpoint", str(trained), "--prompt", "BRUTUS:", "--max-new-tokens", "40", "--seed", "3"]
    sample.main(command)
    first = capsys.readouterr().out
    assert first.startswith("BRUTUS:") and len(first) == len("BRUTUS:") + 40 + 1
    sample.main(command)
    assert capsys.readouterr().out == first  # same seed, same text


def test_resume_continues_exactly(tmp_path, short_text):
    uninterrupted = train(tiny_run(tmp_path / "full", short_text))
    train(tiny_run(tmp_path / "split", short_text), stop_at=6)  # interrupted half way
    assert torch.load(tmp_path / "split" / RESUME_FILE, weights_only=True)["step"] == 6
    training_main(["--resume", "--out", str(tmp_path / "split")])  # the saved settings, as they were
    resumed = load_checkpoint(tmp_path / "split" / "last")

    assert resumed.config["training"]["step"] == uninterrupted.step == 12
    expected = weights(tmp_path / "full" / "last")
    actual = weights(tmp_path / "split" / "last")
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    log = (tmp_path / "split" / "train.log").read_text()
    assert f"Training resumed from the last checkpoint: {tmp_path / 'split' / RESUME_FILE}" in log


def test_resume_with_more_steps_trains_on_and_records_both_commands(tmp_path, short_text):
    first = ["--preset", "tiny", "--data", str(short_text), "--out", str(tmp_path / "run"),
             "--max-steps", "4", "--eval-interval", "4", "--batch-size", "4"]
    training_main(first)
    training_main(["--resume", "--out", str(tmp_path / "run"), "--max-steps", "8"])
    meta = load_checkpoint(tmp_path / "run" / "last").config["training"]
    assert meta["step"] == 8
    # The chain of commands that remakes this checkpoint exactly.
    assert meta["command"] == (f"python -m training {' '.join(first)} && "
                               f"python -m training --resume --out {tmp_path / 'run'} --max-steps 8")


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, short_text, monkeypatch):
    out = tmp_path / "run"
    real_save_file = gpt.checkpoint.save_file
    best_writes = []

    def crash_on_second_best_save(state, filename):
        real_save_file(state, filename)  # the new weights are on disk, the config not yet
        if Path(filename).parent.name.startswith(".best."):
            best_writes.append(filename)
            if len(best_writes) == 2:
                raise OSError("simulated crash while saving")

    monkeypatch.setattr(gpt.checkpoint, "save_file", crash_on_second_best_save)
    with pytest.raises(OSError, match="simulated crash"):
        train(tiny_run(out, short_text, dropout=0.0))

    survivor = load_checkpoint(out)  # DIR: still the checkpoint of the first evaluation
    assert survivor.config["training"]["step"] == 4
    assert load_checkpoint(out / "best").config["weights_sha256"] == survivor.config["weights_sha256"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no half-written staging left
    # last/ and resume.pt were written before the crash, so the run can go on from step 8.
    monkeypatch.undo()
    training_main(["--resume", "--out", str(out)])
    assert load_checkpoint(out).config["training"]["step"] == 12


def test_resume_refuses_a_different_corpus(tmp_path, short_text, corpus_text):
    train(tiny_run(tmp_path / "run", short_text, max_steps=4))
    other = tmp_path / "other.txt"
    other.write_text(corpus_text[20_000:40_000], encoding="utf-8")
    with pytest.raises(SystemExit, match="the corpus has changed"):
        training_main(["--resume", "--out", str(tmp_path / "run"), "--data", str(other)])


@pytest.mark.slow
def test_summary_prints_the_seed_table(capsys, tmp_path):
    corpus = Path(__file__).resolve().parents[2] / "shared" / "data" / "julius_caesar.txt"
    data_flag = ["--data", str(corpus)] if corpus.is_file() else []
    training_main(["--summary", "--preset", "seed", *data_flag])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("Layer (type:depth-idx)")
    assert "Total params: 85,942,272" in lines
    assert not list(tmp_path.iterdir())  # and it trained nothing


def test_init_from_starts_at_the_checkpoint_it_fine_tunes(tmp_path, trained, short_text):
    result = train(TrainConfig(out=str(tmp_path / "tuned"), init_from=str(trained), data=str(short_text),
                               max_steps=4, eval_interval=4, batch_size=4, lr=1e-4))
    pretrained = load_checkpoint(trained).config["training"]["val_loss"]
    assert result.history[0]["val_loss"] == pytest.approx(pretrained, abs=1e-5)
    tuned = load_checkpoint(tmp_path / "tuned")
    assert tuned.config["preset"] == "tiny"
    assert tuned.config["training"]["init_from"] == str(trained)
    # Its config.json names the pre-training run too: command and corpus hash.
    record = tuned.config["training"]["init_from_training"]
    assert record["command"] == load_checkpoint(trained).config["training"]["command"]
    assert record["corpus_sha256"] == load_checkpoint(trained).config["training"]["corpus_sha256"]


def test_shape_flags_override_the_preset_and_the_checkpoint_records_the_shape(tmp_path, short_text):
    out = tmp_path / "shaped"
    training_main(["--preset", "tiny", "--n-layer", "3", "--n-head", "2", "--n-embd", "48",
                   "--block-size", "32", "--data", str(short_text), "--out", str(out),
                   "--max-steps", "2", "--eval-interval", "2"])
    model = load_checkpoint(out).config["model"]
    assert (model["n_layer"], model["n_head"], model["n_embd"], model["block_size"]) == (3, 2, 48, 32)


def test_a_width_the_heads_do_not_divide_is_a_clear_error(tmp_path, short_text):
    with pytest.raises(SystemExit, match="width \\(50\\) must be a multiple of the heads \\(4\\)"):
        training_main(["--preset", "tiny", "--n-embd", "50", "--data", str(short_text),
                       "--out", str(tmp_path / "bad"), "--max-steps", "2"])


def test_sweep_overrides_are_typed_as_the_training_settings_declare():
    from training.sweep import parse_overrides
    assert parse_overrides("n_layer=4,lr=2e-3,corpus=shakespeare") == {
        "n_layer": 4, "lr": 0.002, "corpus": "shakespeare"}
    with pytest.raises(Exception, match="'layers' is not a training setting"):
        parse_overrides("layers=4")
