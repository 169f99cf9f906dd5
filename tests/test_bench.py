"""The benchmark scripts run in --quick mode on tiny shapes and print their tables (no timing
assertions: speed lives in the benchmarks themselves), and write their docs section in place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from bench import batching, decode, gpu, load, quantize, serving, training  # noqa: E402
from bench.common import Table, write_section  # noqa: E402
from bench.convert_hf import check_same_logits, to_hf  # noqa: E402

THREADS = str(torch.get_num_threads())  # leave the suite's thread setting as it was


@pytest.fixture(autouse=True)
def the_corpus_is_cached(corpus_text: str) -> None:
    """bench.common takes its vocabulary and prompts from data/julius_caesar.txt: without it these tests
    would run on a stand-in vocabulary; conftest's fixture fails instead, saying how to fetch it."""


def test_hf_conversion_gives_our_logits(tiny_model, tokenizer):
    hf = to_hf(tiny_model)
    ids = tokenizer.encode("Friends, Romans, countrymen")
    assert check_same_logits(tiny_model, hf, ids, atol=1e-5) <= 1e-5
    # The check can fail: the square attention projection loaded without HF's Conv1D transpose.
    with torch.no_grad():
        hf.transformer.h[0].attn.c_proj.weight.copy_(tiny_model.transformer.h[0].attn.c_proj.weight)
    with pytest.raises(AssertionError, match="differs"):
        check_same_logits(tiny_model, hf, ids, atol=1e-6)


def test_write_section_replaces_in_place(tmp_path: Path):
    write_section(tmp_path, "a", "A", "first")
    write_section(tmp_path, "b", "B", "other")
    write_section(tmp_path, "a", "A", "second")
    text = (tmp_path / "benchmarks.md").read_text()
    assert text.count("bench:a:begin") == 1 and "second" in text and "first" not in text
    assert text.index("bench:a:begin") < text.index("bench:b:begin")  # kept its place


def test_table_markdown_aligns_columns():
    table = Table(["peer", "chars/s"])
    table.add("ours", 123.456)
    table.add("HF generate", 48.0)
    lines = table.markdown().splitlines()
    assert lines[0].startswith("| peer ") and "| 123 " in lines[2] and "| 48.0 " in lines[3]
    assert len({len(line) for line in lines}) == 1


def check_output(out: str, docs: Path, key: str, *expected: str) -> None:
    for text in expected:
        assert text in out
    assert f"bench:{key}:begin" in (docs / "benchmarks.md").read_text()
    assert (docs / f"{key}.png").stat().st_size > 0


@pytest.mark.slow
def test_decode_quick(tmp_path: Path, capsys):
    decode.main(["--quick", "--compile", "--preset", "tiny", "--threads", THREADS, "--prompt-length", "16",
                 "--new", "24", "--reference-new", "8", "--docs", str(tmp_path)])
    check_output(capsys.readouterr().out, tmp_path, "decode", "greedy texts identical", "| ours (KV cache)",
                 "| HF generate", "| bandwidth bound", "ours / HF generate",
                 "| ours, compiled (gpt.compile_decode)", "compiled / HF generate")


@pytest.mark.slow
def test_batching_quick(tmp_path: Path, capsys):
    batching.main(["--quick", "--compile", "--preset", "tiny", "--threads", THREADS, "--prompt-length", "16",
                   "--steps", "8", "--levels", "library", "engine", "--docs", str(tmp_path)])
    check_output(capsys.readouterr().out, tmp_path, "batching", "library chars/s", "engine chars/s",
                 "library: 8 rows / 1 row", "HF generate: batch 8 / batch 1",
                 "library, compiled: 8 rows / 1 row", "engine, compiled: 8 rows / 1 row")


@pytest.mark.slow
def test_training_quick(tmp_path: Path, capsys):
    training.main(["--quick", "--preset", "tiny", "--threads", THREADS, "--block-size", "32", "--steps", "1",
                   "--docs", str(tmp_path)])
    check_output(capsys.readouterr().out, tmp_path, "training", "| HF GPT2LMHeadModel", "ours / HF")


@pytest.mark.slow
def test_serving_quick(tmp_path: Path, capsys, tiny_checkpoint: Path):
    serving.main(["--quick", "--checkpoint", str(tiny_checkpoint), "--threads", "1", "--clients", "1", "2",
                  "--requests", "2", "--new", "8", "--prompt-length", "16", "--docs", str(tmp_path)])
    check_output(capsys.readouterr().out, tmp_path, "serving", "| naive", "| ours", "throughput ours / naive",
                 "ours N / 1 (chars/s)")


@pytest.mark.slow
def test_quantize_quick(tmp_path: Path, capsys, tiny_checkpoint: Path):
    quantize.main(["--quick", "--checkpoint", str(tiny_checkpoint), "--speed-preset", "tiny", "--new", "8",
                   "--threads", THREADS, "--docs", str(tmp_path)])
    check_output(capsys.readouterr().out, tmp_path, "quantize", "| float32", "| int8 dynamic", "loss cost")


@pytest.mark.slow
def test_load_quick_chaos(tmp_path: Path, capsys, tiny_checkpoint: Path):
    """bench.load --chaos kills the engine process once: only requests in flight at the kill fail, the
    service is ready again, and the run reports both."""
    report = load.main(["--quick", "--chaos", "--checkpoint", str(tiny_checkpoint), "--threads", "1",
                        "--clients", "8", "--duration", "6", "--max-batch-size", "4",
                        "--docs", str(tmp_path)])
    out = capsys.readouterr().out
    for row in ("good requests failed outside the kill", "requests failed by the kill, in flight",
                "ready again after the kill (s)", "engine start at launch / restarted (s)",
                "engine restarts (caesar_engine_restarts_total)", "hostile settings refused with a 4xx"):
        assert f"| {row} " in out, row
    assert report.chaos and report.restarts == 1 and report.killed_pid is not None
    assert report.failed == 0 and report.hostile.failed == 0, report.table()
    assert 0 < report.ready_again_s < 120 and report.engine_start_s > 0 and report.restart_start_s > 0
    assert report.kill_at_run_s > 0 and report.hostile_clients == 2 and report.hostile.sent > 0
    assert report.completed_after_ready > 0, report.table()  # it serves again
    assert not (tmp_path / "benchmarks.md").exists()  # --quick writes no docs


def test_gpu_script_dry_run(tmp_path: Path, capsys):
    """bench/gpu.sh's code paths on tiny shapes on the CPU (the real run needs a lent GPU)."""
    gpu.main(["all", "--dry-run", "--docs", str(tmp_path)])
    out = capsys.readouterr().out
    for part in ("decode", "batching", "training"):
        assert f"## GPU {part}" in out
    assert "MFU" in out and "| ours, eager" in out
