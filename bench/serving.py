"""Serving: our service (continuous batching) vs the naive service (HF `generate` per request, one
at a time, bench/naive_service.py), same weights, same load, over loopback HTTP.

    .venv/bin/python -m bench.serving            # 1, 8, 32 concurrent clients, 128 new characters
    .venv/bin/python -m bench.serving --quick    # 1, 8 clients, 32 new characters (< 2 minutes)

The servers (ours, ours with `--no-engine-process`, the naive one) stream TGI's SSE framing from
POST /generate_stream; one aiohttp client measures them all: time to first character (request sent
-> first token event), request latency, requests/s and characters/s. The loads alternate between
the servers (all stay up, the idle ones cost nothing), level by level, and the whole round is
repeated (`--repeats`): rates are medians over the rounds, time to first character and latency
percentiles over every request. `ours N / 1` is our aggregate characters/s at N streams over our
one-stream figure of the same round (median over rounds): what batching pays.
Weights: the shipped checkpoint (checkpoints/caesar) when present, else a random `small`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.common import (
    SHIPPED_CHECKPOINT,
    Table,
    base_parser,
    command_line,
    free_port,
    machine_line,
    median,
    percentile,
    plot_lines,
    prompt_of,
    publish,
    random_checkpoint,
    running_server,
    spread,
)

ONE_PROCESS = "ours, one process"


@dataclass
class Request:
    first_char_s: float
    total_s: float
    chars: int


@dataclass
class LoadResult:
    requests: list[Request]
    wall_s: float

    @property
    def requests_per_s(self) -> float:
        return len(self.requests) / self.wall_s

    @property
    def chars_per_s(self) -> float:
        return sum(r.chars for r in self.requests) / self.wall_s


def pooled(rounds: list[LoadResult]) -> LoadResult:
    """Every request of these rounds, as one result (for percentiles)."""
    return LoadResult([r for result in rounds for r in result.requests], sum(r.wall_s for r in rounds))


def first_char(result: LoadResult, q: float) -> float:
    return percentile([r.first_char_s for r in result.requests], q)


async def one_request(session: aiohttp.ClientSession, base: str, prompt: str, new: int) -> Request:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": new, "temperature": 0}}
    start = time.perf_counter()
    first, chars = None, 0
    async with session.post(f"{base}/generate_stream", json=body) as response:
        response.raise_for_status()
        async for line in response.content:  # one line at a time
            if not line.startswith(b"data:"):
                continue  # blank separators and ": ping" keep-alives
            event = json.loads(line[5:])
            if event.get("token"):  # TGI's last event carries the last token too
                first = first or time.perf_counter()
                chars += 1
            if event.get("generated_text") is not None:
                break
    end = time.perf_counter()
    return Request((first or end) - start, end - start, chars)


def run_load(base: str, clients: int, requests_per_client: int, prompt: str, new: int) -> LoadResult:
    """`clients` concurrent clients, each sending its requests one after the other. The client is
    aiohttp, as in vLLM's serving benchmark: it runs on the server's CPUs, and takes about half of
    httpx's CPU time per streamed event (141 vs 274 us at 8 streams here)."""

    async def client_loop(session: aiohttp.ClientSession) -> list[Request]:
        return [await one_request(session, base, prompt, new) for _ in range(requests_per_client)]

    async def run() -> LoadResult:
        connector = aiohttp.TCPConnector(limit=clients + 4)
        timeout = aiohttp.ClientTimeout(total=900)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            start = time.perf_counter()
            per_client = await asyncio.gather(*(client_loop(session) for _ in range(clients)))
            wall = time.perf_counter() - start
        return LoadResult([r for rs in per_client for r in rs], wall)

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0], threads=None, threads_help=(
        "torch threads of both servers (default: each server's own: ours leaves one CPU to its HTTP "
        "process, the naive one takes two)"))
    parser.add_argument("--checkpoint", type=Path, help="default: the shipped one, else a random small")
    parser.add_argument("--clients", type=int, nargs="+", help="concurrent clients (default 1 8 32)")
    parser.add_argument("--new", type=int, help="new characters per request (default 128, --quick 32)")
    parser.add_argument("--requests", type=int, help="requests per level, at least one per client "
                        "(default max(2 x clients, 8); --quick max(clients, 4))")
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, help="rounds over every level (default 3, --quick 1)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    levels = args.clients or ([1, 8] if args.quick else [1, 8, 32])
    new = args.new or (32 if args.quick else 128)
    if args.checkpoint:
        checkpoint, which = args.checkpoint, str(args.checkpoint)
    elif (SHIPPED_CHECKPOINT / "config.json").is_file():
        checkpoint, which = SHIPPED_CHECKPOINT, "the shipped checkpoint (checkpoints/caesar)"
    else:
        checkpoint = random_checkpoint("small")
        which = "a random-weight `small` checkpoint (none shipped yet)"
    prompt = prompt_of(args.prompt_length)

    threads = ["--threads", str(args.threads)] if args.threads else []

    def ours_cmd(port: int, *options: str) -> list[str]:
        return [sys.executable, "-m", "service", "--checkpoint", str(checkpoint), "--port", str(port),
                *threads, "--device", "cpu", "--max-batch-size", str(max(32, *levels)), "--max-queue", "256",
                "--log-level", "warning", *options]

    ports = [free_port() for _ in range(3)]
    naive_cmd = [sys.executable, "-m", "bench.naive_service", "--checkpoint", str(checkpoint),
                 "--port", str(ports[2]), *threads]
    rounds: dict[tuple[str, int], list[LoadResult]] = {}
    with running_server(ours_cmd(ports[0]), ports[0]) as ours, \
            running_server(ours_cmd(ports[1], "--no-engine-process"), ports[1]) as one_process, \
            running_server(naive_cmd, ports[2]) as naive:
        servers = {"ours": ours, ONE_PROCESS: one_process, "naive": naive}
        for base in servers.values():  # warm-up
            run_load(base, 1, 1, prompt, 8)
        for round_ in range(repeats):
            for clients in levels:
                total = args.requests or (max(clients, 4) if args.quick else max(2 * clients, 8))
                per_client = max(1, -(-total // clients))
                for name, base in servers.items():
                    result = run_load(base, clients, per_client, prompt, new)
                    rounds.setdefault((name, clients), []).append(result)
                    print(f"round {round_ + 1}/{repeats}: {name:17s} {clients:3d} clients: "
                          f"{len(result.requests)} requests in {result.wall_s:.1f} s, "
                          f"{result.chars_per_s:,.0f} chars/s", flush=True)

    def rate(name: str, clients: int, what: str) -> float:
        return median([getattr(r, what) for r in rounds[(name, clients)]])

    table = Table(["service", "clients", "requests", "requests/s", "chars/s", "chars/s spread",
                   "first char p50 ms", "first char p99 ms", "latency p50 s"])
    order = list(servers)
    for (name, clients), results in sorted(rounds.items(), key=lambda kv: (kv[0][1], order.index(kv[0][0]))):
        every = pooled(results)
        table.add(name, clients, len(every.requests), rate(name, clients, "requests_per_s"),
                  rate(name, clients, "chars_per_s"), spread([r.chars_per_s for r in results]),
                  first_char(every, 0.5) * 1e3, first_char(every, 0.99) * 1e3,
                  percentile([q.total_s for q in every.requests], 0.5))
    ratios = Table(["clients", "throughput ours / naive", "first char p99 naive / ours",
                    "first char p50 naive / ours", "ours N / 1 (chars/s)", "ours / one process (chars/s)"])
    for clients in levels:
        ours, naive = pooled(rounds[("ours", clients)]), pooled(rounds[("naive", clients)])
        throughput = rate("ours", clients, "requests_per_s") / rate("naive", clients, "requests_per_s")
        scaling = "-"
        if 1 in levels:  # each round's N streams over the same round's one stream
            pairs = zip(rounds[("ours", clients)], rounds[("ours", 1)], strict=True)
            scaling = f"{median([n.chars_per_s / one.chars_per_s for n, one in pairs]):.2f}x"
        split = rate("ours", clients, "chars_per_s") / rate(ONE_PROCESS, clients, "chars_per_s")
        ratios.add(clients, f"{throughput:.1f}x", f"{first_char(naive, 0.99) / first_char(ours, 0.99):.1f}x",
                   f"{first_char(naive, 0.5) / first_char(ours, 0.5):.1f}x", scaling, f"{split:.2f}x")

    header = (f"`{command_line(argv)}`\n\nWeights: {which}. CPU float32, greedy, {len(prompt)}-character "
              f"prompt, {new} new characters per request, streamed (SSE) over loopback, {repeats} rounds; "
              f"{machine_line()}.\n"
              "naive = FastAPI + HF `generate` per request under a lock (bench/naive_service.py), "
              "streaming through HF's streamer; ours = `python -m service` (continuous batching, the model "
              "in a process of its own); ours, one process = the same with `--no-engine-process`, as before "
              "the split. Torch threads: "
              + (f"{args.threads} each." if args.threads else
                 "each server's default (naive and one process 2; ours CPUs - 1, one CPU left to its HTTP "
                 "process)."))
    series = {f"{name} requests/s": (levels, [rate(name, c, "requests_per_s") for c in levels])
              for name in servers}
    publish(args, "serving", "Serving vs the naive service (CPU)", header, [table, ratios],
            lambda png: plot_lines(png, "Serving: requests/s vs concurrent clients", "concurrent clients",
                                   "requests / second", series, logx=True))


if __name__ == "__main__":
    main()
