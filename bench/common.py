"""Shared helpers for the benchmark scripts: threads, timing, tables, docs/benchmarks.md and plots.

Every script follows the same rules: peers run in the same process (so the machine's noise hits
all of them), each measurement is warmed up and repeated, medians are reported, and the ratio
table is printed last and written into its own section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gpt import GPT, PRESETS, CharTokenizer, GPTConfig, save_checkpoint
from gpt import model as gpt_model
from gpt.device import has_bfloat16_instructions
from training.data import load_corpus

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
SHIPPED_CHECKPOINT = REPO / "checkpoints" / "caesar"


def base_parser(description: str, threads: int | None = 2,
                threads_help: str = "torch intra-op threads (default 2)") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes: under 2 minutes")
    parser.add_argument("--threads", type=int, default=threads, help=threads_help)
    parser.add_argument("--docs", type=Path, default=DOCS,
                        help="folder of benchmarks.md and the PNGs (default docs/)")
    parser.add_argument("--no-docs", action="store_true", help="print only; write nothing")
    return parser


def add_compile_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="include the compiled decode step, gpt.compile_decode (default: yes, but not "
                        "with --quick: compiling the seed model takes minutes)")


def compile_wanted(args: argparse.Namespace) -> bool:
    return args.compile if args.compile is not None else not args.quick


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # for child processes


def corpus_text() -> str:
    """The play, fetched and verified into data/ on first use (training.data)."""
    return load_corpus("julius-caesar").text


def tokenizer() -> CharTokenizer:
    """The corpus's 65-character vocabulary."""
    return CharTokenizer.from_text(corpus_text())


def prompt_of(length: int) -> str:
    """`length` characters of the play from "Friends, Romans" on (a fixed, readable prompt)."""
    text = corpus_text()
    start = text.index("Friends, Romans")
    return text[start:start + length]


def machine_line() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.processor() or platform.machine()} ({cpu_instructions()}), {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average at the end: {load}")


def cpu_instructions() -> str:
    """The vector instructions ATen's kernels run with here, and whether the CPU has bfloat16 arithmetic:
    the same benchmark moves by 2x and more between an AVX2 and an AVX-512 CPU, and bfloat16 without
    its instructions (AVX512-BF16, AMX) is converted to float32 around every product."""
    return (f"{torch.backends.cpu.get_cpu_capability()}, "
            f"{'with' if has_bfloat16_instructions() else 'no'} bfloat16 instructions")


# --- Timing --------------------------------------------------------------------------------------

def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    low, high = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def spread(values: Sequence[float]) -> str:
    """Relative spread of repeats, min..max around the median: the honest noise figure."""
    m = median(values)
    return f"{(min(values) / m - 1) * 100:+.0f}/{(max(values) / m - 1) * 100:+.0f}%" if m else "n/a"


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `repeats` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def interleaved(peers: dict[str, Callable[[], object]], repeats: int,
                warmup: int = 1) -> dict[str, list[float]]:
    """Time each peer `repeats` times, round-robin (A B C A B C ...), so that a burst of load from
    elsewhere on the machine lands on all of them rather than on whichever ran at that moment."""
    for fn in peers.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in peers}
    for _ in range(repeats):
        for name, fn in peers.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes per second that one large tensor copy moves (read + write counted once each way:
    a copy of n bytes reads n and writes n, so the rate at which weights can be streamed is
    2n / t). Uses the configured threads."""
    src = torch.empty(max(nbytes // 4, 1 << 20), dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    seconds = min(time_call(lambda: dst.copy_(src), repeats, warmup=2))
    return 2 * src.numel() * 4 / seconds


# --- Tables and docs -----------------------------------------------------------------------------

@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([format_cell(c) for c in cells])

    def markdown(self) -> str:
        widths = [max(len(cell) for cell in [col, *(row[i] for row in self.rows)])
                  for i, col in enumerate(self.columns)]

        def line(cells: list[str]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

        rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return "\n".join([line(self.columns), rule, *(line(row) for row in self.rows)])


def format_cell(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def publish(args: argparse.Namespace, key: str, title: str, header: str, tables: list[Table],
            plot: Callable[[Path], Path]) -> None:
    """Print the tables; unless --no-docs, draw `plot` into docs/KEY.png and write the section of
    docs/benchmarks.md: the header, the tables and the plot."""
    print("\n\n".join(table.markdown() for table in tables))
    if args.no_docs:
        return
    png = plot(args.docs / f"{key}.png")
    write_section(args.docs, key, title,
                  "\n\n".join([header, *(table.markdown() for table in tables), f"![{key}]({png.name})"]))


def write_section(docs: Path, key: str, title: str, body: str) -> Path:
    """Replace (or append) the section of docs/benchmarks.md between this script's markers."""
    docs.mkdir(parents=True, exist_ok=True)
    path = docs / "benchmarks.md"
    text = path.read_text() if path.exists() else (
        "# Benchmarks\n\nWritten by the scripts in `bench/`; each section is replaced in place when its "
        "script runs again.\nPeers run in the same process; figures are medians of repeats.\n")
    begin, end = f"<!-- bench:{key}:begin -->", f"<!-- bench:{key}:end -->"
    section = f"{begin}\n## {title}\n\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)
    return path


def plot_lines(path: Path, title: str, xlabel: str, ylabel: str,
               series: dict[str, tuple[Sequence[float], Sequence[float]]], logx: bool = False) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_bars(path: Path, title: str, ylabel: str, values: dict[str, float]) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ax.bar(list(values), list(values.values()))
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelrotation=15)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def command_line(argv: Sequence[str] | None = None) -> str:
    import sys
    args = list(sys.argv[1:] if argv is None else argv)
    module = Path(sys.argv[0]).stem
    return " ".join([".venv/bin/python", "-m", f"bench.{module}", *args])


# --- Models, checkpoints and servers -------------------------------------------------------------

def random_model(preset: str, vocab_size: int, seed: int = 0, dropout: float = 0.0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(**{**PRESETS[preset].to_dict(), "vocab_size": vocab_size, "dropout": dropout})
    return GPT(config).eval()


def random_checkpoint(preset: str, folder: Path | None = None) -> Path:
    """A random-weight checkpoint of `preset` in a temporary folder (made once, then reused)."""
    path = (folder or Path(tempfile.gettempdir()) / "caesar-bench") / f"random-{preset}"
    if not (path / "config.json").is_file():
        tok = tokenizer()
        save_checkpoint(path, random_model(preset, tok.vocab_size), tok, preset=preset,
                        metadata={"note": "random weights, for benchmarks"})
    return path


def resolve_checkpoint(checkpoint: str | Path | None = None, preset: str | None = None) -> tuple[Path, str]:
    """The checkpoint a benchmark runs on, and how to say so: `checkpoint` if given, else random
    weights of `preset` if given, else the shipped checkpoint (a random `small` where there is none)."""
    if checkpoint:
        return Path(checkpoint), f"the checkpoint {checkpoint}"
    if preset:
        return random_checkpoint(preset), f"random weights of the `{preset}` preset"
    if (SHIPPED_CHECKPOINT / "config.json").is_file():
        return SHIPPED_CHECKPOINT, "the shipped checkpoint (checkpoints/caesar)"
    return random_checkpoint("small"), "a random-weight `small` checkpoint (none shipped)"


def section(args: argparse.Namespace, key: str, title: str, checkpoint: Path) -> tuple[str, str]:
    """The docs section a run writes: `key` for the shipped checkpoint, `key-NAME` (and NAME in the
    title) for another one, so that runs on several checkpoints keep a section each."""
    if Path(checkpoint).resolve() == SHIPPED_CHECKPOINT.resolve():
        return key, title
    name = Path(checkpoint).name
    return f"{key}-{name}", f"{title}, {name}"


class ServerURL(str):
    """A running server's base URL (a str, as before), with its process id: `.pid`."""

    pid: int


def process_cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) used so far by process `pid` itself, and by its children
    together (the engine process of `python -m service`); (nan, nan) once it is gone."""
    import psutil

    try:
        parent = psutil.Process(pid)
        own = sum(parent.cpu_times()[:2])
        children = 0.0
        for child in parent.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                children += sum(child.cpu_times()[:2])
        return own, children
    except psutil.NoSuchProcess:
        return float("nan"), float("nan")


def wait_until_idle(pid: int, interval_s: float = 0.5, timeout_s: float = 300.0) -> float:
    """Wait until process `pid` and its children use under a tenth of a core over `interval_s`; the
    seconds waited. A peer whose clients broke off may go on generating for them, and would take CPU
    from the next load."""
    start = time.monotonic()
    before = sum(process_cpu_s(pid))
    while time.monotonic() - start < timeout_s:
        time.sleep(interval_s)
        now = sum(process_cpu_s(pid))
        if not now - before >= 0.1 * interval_s:  # idle, or gone (nan)
            break
        before = now
    return time.monotonic() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(command: list[str], port: int, ready_path: str = "/ready",
                   timeout_s: float = 300.0, env: dict[str, str] | None = None) -> Iterator[ServerURL]:
    """Start a server process on loopback, wait until `ready_path` answers 200, yield its base URL
    (with the process id as `.pid`), and stop it (SIGTERM, then SIGKILL) on the way out."""
    import httpx

    base = ServerURL(f"http://127.0.0.1:{port}")
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, **(env or {})})
    base.pid = process.pid
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{command[:4]} exited with {process.returncode}:\n"
                                   + log.read().decode(errors="replace")[-2000:])
            try:
                if httpx.get(base + ready_path, timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{command[:4]} was not ready after {timeout_s:.0f} s")
            time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@contextlib.contextmanager
def plain_linear() -> Iterator[None]:
    """Send our model's projections through nn.Linear's own forward, i.e. without the CPU
    few-row routes of gpt.model.Linear: the 'before' row of a before/after comparison."""
    saved = gpt_model.Linear.forward
    gpt_model.Linear.forward = torch.nn.Linear.forward
    try:
        yield
    finally:
        gpt_model.Linear.forward = saved
