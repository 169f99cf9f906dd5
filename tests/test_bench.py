"""The benchmark scripts run in --quick mode on tiny shapes and print their tables (no timing
assertions: speed lives in the benchmarks themselves), and write their docs section in place."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from bench import batching, client, decode, gpu, load, quantize, serving, training  # noqa: E402
from bench import engine as bench_engine  # noqa: E402
from bench.common import Table, wait_until_idle, write_section  # noqa: E402
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


def test_wait_until_idle_waits_out_a_busy_peer():
    """bench.serving waits for a peer that broke off its streams to stop generating for them."""
    spin = "import time\nend = time.time() + 2\nwhile time.time() < end: pass"
    busy = subprocess.Popen([sys.executable, "-c", spin])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert wait_until_idle(busy.pid, interval_s=0.25) >= 1.0
        assert wait_until_idle(idle.pid, interval_s=0.25) < 1.0
    finally:
        busy.kill()
        idle.kill()
        busy.wait()
        idle.wait()


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
    section = (docs / "benchmarks.md").read_text()
    assert f"bench:{key}:begin" in section
    # Which CPU kernels ran: figures from an AVX2 and an AVX-512 machine are not comparable.
    assert f"({torch.backends.cpu.get_cpu_capability()}, " in section
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
                 "ours N / 1 (chars/s)", "client CPU (% of a core)", "server CPU (cores)")


@pytest.mark.slow
def test_serving_vs_hf_quick(tmp_path: Path, capsys, tiny_checkpoint: Path):
    """In bfloat16, as the one run that covers both HF peers: without the CPU's bfloat16 instructions
    HF's bfloat16 is several times slower than its float32, so a bfloat16 run measures HF in both and
    the ratio is against the faster. Our server gets --kv-cache-dtype too, which the section names."""
    serving.main(["--mode", "hf", "--quick", "--checkpoint", str(tiny_checkpoint), "--threads", "1",
                  "--hf-threads", THREADS, "--clients", "1", "2", "--new", "8", "--dtype", "bfloat16",
                  "--kv-cache-dtype", "float16", "--docs", str(tmp_path)])
    out = capsys.readouterr().out
    check_output(out, tmp_path, "serving-hf-bfloat16-kv-float16-tiny",
                 "| ours (HTTP /generate) ", f"| HF generate, {THREADS} thread",
                 f"| HF generate, float32, {THREADS} thread", "ours / HF generate", "issue 18's target",
                 "client CPU (% of a core)", "server CPU (cores)")
    header = (tmp_path / "benchmarks.md").read_text()
    assert "8 new characters" in header and "prompt 'BRUTUS.\\n'" in header
    assert "CPU bfloat16, both (and HF in float32 too)" in header
    assert "--dtype bfloat16, --kv-cache-dtype float16)" in header


@pytest.mark.slow
def test_serving_client_check_quick(tmp_path: Path, capsys, tiny_checkpoint: Path):
    serving.main(["--mode", "client-check", "--quick", "--checkpoint", str(tiny_checkpoint), "--threads", "1",
                  "--clients", "1", "2", "--requests", "1", "--new", "8", "--prompt-length", "16",
                  "--docs", str(tmp_path)])
    check_output(capsys.readouterr().out, tmp_path, "serving-client-tiny", "| bench/client.py (own process) ",
                 "| aiohttp (in the benchmark's process, before) ", "client CPU us/char",
                 "engine process us/char", "chars/s / curl's")


def test_engine_quick(tmp_path: Path, capsys, tiny_checkpoint: Path):
    bench_engine.main(["--quick", "--checkpoint", str(tiny_checkpoint), "--thread-counts", THREADS,
                       "--rows", "1", "2", "--steps", "4", "--repeats", "1",
                       "--sampling", "sampled", "greedy", "mixed", "--docs", str(tmp_path)])
    out = capsys.readouterr().out
    check_output(out, tmp_path, "engine-tiny", "model step us", "whole step us", "engine iteration us",
                 "outside the model, whole step us/row", "outside the model, engine us/row", "| sampled ",
                 "| greedy ", "| mixed ", "target <= 10")
    assert "mixed = sampled with each row's top_k its own" in (tmp_path / "benchmarks.md").read_text()
    rows = [line for line in out.splitlines() if line.startswith(f"| {THREADS} ")]
    assert len(rows) == 3 * 2 + 3  # (sampled, greedy, mixed) x (1, 2 rows), then the targets at 2 rows


def test_load_client_counts_events_over_keep_alive_connections():
    """bench/client.py against a canned server: chunked SSE split at every byte, keep-alive, and a
    JSON body; the characters come from generated_text, and a wrong count is a failure."""
    import socket
    import threading

    events = [b'data: {"token":{"text":"a"},"generated_text":null}\n\n',
              b'data: {"token":{"text":"b"},"generated_text":null}\n\n',
              b'data: {"token":{"text":"c"},"generated_text":"abc"}\n\n']
    stream = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    stream = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
              + stream)
    body = b'{"generated_text": "abcd"}'
    plain = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body), body)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve(connection: socket.socket) -> None:
        with connection:
            buffer = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = connection.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                while len(buffer) < length:
                    buffer += connection.recv(65536)
                buffer = buffer[length:]
                if b"/generate_stream" in head:
                    for i in range(len(stream)):  # one byte at a time: every split a read can see
                        connection.sendall(stream[i:i + 1])
                else:
                    connection.sendall(plain)

    def accept() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{port}"
        result = client.run_load(url, "/generate_stream", [{"inputs": "x"}] * 4, 2, check_chars=3)
        assert not result.failures and len(result.requests) == 4
        assert all(r.chars == 3 and 0 < r.first_char_s <= r.total_s for r in result.requests)
        assert result.chars_per_s > 0 and result.client_cpu_s >= 0
        plain_result = client.run_load(url, "/generate", ["{}"] * 3, 3, check_chars=4)
        assert not plain_result.failures and [r.chars for r in plain_result.requests] == [4, 4, 4]
        wrong = client.run_load(url, "/generate_stream", [{"inputs": "x"}], 1, check_chars=5)
        assert not wrong.requests and "3 chars" in wrong.failures[0]
        with client.ClientProcess() as worker:  # the same through a process of its own
            remote = worker.load(url, "/generate_stream", [{"inputs": "x"}] * 2, 1, check_chars=3)
        assert not remote.failures and [r.chars for r in remote.requests] == [3, 3]
    finally:
        listener.close()


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
