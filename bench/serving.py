"""Serving over loopback HTTP: our service against the naive service, against Hugging Face `generate`,
and the load client against independent clients.

    .venv/bin/python -m bench.serving                      # vs the naive service: 1, 8, 32 streams
    .venv/bin/python -m bench.serving --quick              # 1, 8 streams, 32 new characters (< 2 minutes)
    .venv/bin/python -m bench.serving --mode hf            # vs HF generate at 1 and 64 streams, sampled
    .venv/bin/python -m bench.serving --mode hf --checkpoint checkpoints/caesar-small
    .venv/bin/python -m bench.serving --mode client-check  # our client against curl and aiohttp

`--mode naive` (the default): our server (`python -m service`), the same with `--no-engine-process`,
and the naive service (HF `generate` per request under a lock, bench/naive_service.py) stream TGI's SSE
framing from POST /generate_stream, greedy. The loads alternate between the servers (all stay up; the
idle ones cost nothing), level by level, and the whole round is repeated (`--repeats`): rates are
medians over the rounds, time to first character and latency percentiles over every request.
`ours N / 1` is our aggregate characters/s at N streams over our one-stream figure of the same round.

`--mode hf` (issue 18): our server through HTTP JSON POST /generate (temperature 0.8, a seed per
request, from "BRUTUS.\\n") against `GPT2LMHeadModel.generate` on the same weights (bench/convert_hf.py;
do_sample, temperature 0.8, no top-k, seeded) in this process, one peer per `--hf-threads` setting
(default 1 and 2 torch threads; the ratio is against the fastest) and, with `--dtype bfloat16`, the
same again with the weights in float32 (HF's faster dtype on a CPU without bfloat16 instructions):
`--kv-cache-dtype float16` starts ours with a float16 KV cache (HF's cache stays in the weights' dtype).
1 stream (`--requests` requests one after the other; HF batch 1, as many calls) and 64 concurrent
streams (64 requests at once; HF one call of batch 64), alternating ours / HF, `--repeats` rounds.
HF's model has
the checkpoint's positions and no more (it cannot slide its window as ours does), so the new characters
default to 200 where prompt + 200 fits the context and to the context less the prompt where it does not
(120 for the shipped checkpoint's 128). At 1 stream, curl sends each request again right after ours:
an independent client's figure beside ours, request by request.

`--mode client-check` (issue 18, part 5): the same streamed requests (greedy) at 1 and 32 streams from
our client (bench/client.py: its own process, a fixed pool of keep-alive connections, raw SSE
counting), from curl (`--parallel`), and from the aiohttp client this benchmark used before (in this
process, a JSON parse per event), alternating (at 1 stream request by request, at more load by load);
each with the CPU it used, and the server's CPU per character (its HTTP process and its engine
process).

Every mode drives the servers from bench/client.py's client in a process of its own and reports the CPU
it used (process CPU time / wall time, in % of one core) and the server's (its processes together, in
cores). Weights: `--checkpoint`, else random weights of `--preset`, else the shipped checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.client import ClientProcess, LoadResult, Record
from bench.common import (
    ServerURL,
    Table,
    base_parser,
    command_line,
    free_port,
    machine_line,
    median,
    percentile,
    plot_bars,
    plot_lines,
    process_cpu_s,
    prompt_of,
    publish,
    resolve_checkpoint,
    running_server,
    section,
    spread,
    wait_until_idle,
)

ONE_PROCESS = "ours, one process"
HF_PROMPT = "BRUTUS.\n"
HF_TEMPERATURE = 0.8


@dataclass
class Load:
    """One load against one server: the client's result and the server's CPU seconds over it."""

    result: LoadResult
    server_cpu_s: float  # the server's processes together
    engine_cpu_s: float  # of which its child processes (ours: the engine process)

    @property
    def chars(self) -> int:
        return sum(r.chars for r in self.result.requests)

    @property
    def chars_per_s(self) -> float:
        return self.result.chars_per_s

    @property
    def requests_per_s(self) -> float:
        return self.result.requests_per_s


def measure(client: ClientProcess, base: ServerURL, path: str, bodies: list[Any], clients: int,
            check_chars: int | None) -> Load:
    """Run one load from the client process; fail loudly if any request failed."""
    before = process_cpu_s(base.pid)
    result = client.load(base, path, bodies, clients, check_chars)
    after = process_cpu_s(base.pid)
    if result.failures:
        raise RuntimeError(f"{len(result.failures)} of {len(bodies)} requests to {base}{path} failed, "
                           f"the first: {result.failures[0]}")
    return Load(result, (after[0] - before[0]) + (after[1] - before[1]), after[1] - before[1])


def pooled(loads: list[Load]) -> list[Record]:
    return [r for load in loads for r in load.result.requests]


def combined(loads: list[Load]) -> Load:
    """Loads run one after the other, as one: their requests, and their times and CPU added up."""
    results = [load.result for load in loads]
    result = LoadResult([r for res in results for r in res.requests], sum(res.wall_s for res in results),
                        sum(res.client_cpu_s for res in results),
                        [f for res in results for f in res.failures])
    return Load(result, sum(load.server_cpu_s for load in loads), sum(load.engine_cpu_s for load in loads))


def combined_results(results: list[LoadResult]) -> LoadResult:
    return combined([Load(result, 0.0, 0.0) for result in results]).result


def client_cpu(loads: list[Load]) -> str:
    """The client's CPU over the loads, in % of one core (median over rounds)."""
    return f"{median([load.result.client_cpu for load in loads]) * 100:.1f}%"


def server_cores(loads: list[Load]) -> float:
    return median([load.server_cpu_s / load.result.wall_s for load in loads])


def us_per_char(loads: list[Load]) -> tuple[float, float]:
    """The server's CPU per character generated over the loads: its HTTP process's, its engine process's."""
    chars = sum(load.chars for load in loads)
    engine_s = sum(load.engine_cpu_s for load in loads)
    return (sum(load.server_cpu_s for load in loads) - engine_s) / chars * 1e6, engine_s / chars * 1e6


def stream_body(prompt: str, new: int) -> dict[str, Any]:
    return {"inputs": prompt, "parameters": {"max_new_tokens": new, "temperature": 0}}


def sampled_body(prompt: str, new: int, seed: int) -> dict[str, Any]:
    parameters = {"max_new_tokens": new, "temperature": HF_TEMPERATURE, "seed": seed, "do_sample": True}
    return {"inputs": prompt, "parameters": parameters}


# --- Independent clients: curl, and the aiohttp client this benchmark used before -----------------

def curl_load(base: str, path: str, bodies: list[Any], clients: int, chars_each: int) -> LoadResult:
    """The same requests from one curl process (`--parallel` for several at once); its CPU time is
    the child's (process start-up included). One at a time, the wall time is the sum of curl's own
    per-request times (its start-up left out); several at once, the whole run's."""
    transfers: list[str] = []
    for n, body in enumerate(bodies):
        transfers += [*(["--next"] if n else []), "-s", "-N", "-o", "/dev/null",
                      "-H", "Content-Type: application/json", "--data-binary", json.dumps(body), "-w",
                      "%{http_code} %{time_starttransfer} %{time_total}\\n", f"{base}{path}"]
    parallel = ["--parallel", "--parallel-immediate", "--parallel-max", str(clients)] if clients > 1 else []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(["curl", "--no-progress-meter", *parallel, *transfers], capture_output=True,
                         text=True, check=True).stdout
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    records, failures = [], []
    for line in out.strip().splitlines():
        code, first, total = line.split()
        if code != "200":
            failures.append(f"status {code}")
            continue
        records.append(Record(float(first), float(total), chars_each))
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if clients == 1 and records:  # one after the other: their own times, without curl's start-up
        wall = sum(r.total_s for r in records)
    return LoadResult(records, wall, cpu, failures)


def aiohttp_load(base: str, prompt: str, new: int, clients: int, requests_per_client: int) -> LoadResult:
    """This benchmark's client before issue 18: aiohttp in the benchmark's own process, one line at a
    time through its StreamReader and a json.loads per event (as vLLM's serving benchmark)."""
    import aiohttp

    async def one_request(session: aiohttp.ClientSession) -> Record:
        start = time.perf_counter()
        first, chars = None, 0
        async with session.post(f"{base}/generate_stream", json=stream_body(prompt, new)) as response:
            response.raise_for_status()
            async for line in response.content:
                if not line.startswith(b"data:"):
                    continue
                event = json.loads(line[5:])
                if event.get("token"):
                    first = first or time.perf_counter()
                    chars += 1
                if event.get("generated_text") is not None:
                    break
        end = time.perf_counter()
        return Record((first or end) - start, end - start, chars)

    async def run() -> LoadResult:
        connector = aiohttp.TCPConnector(limit=clients + 4)
        timeout = aiohttp.ClientTimeout(total=900)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            cpu, start = time.process_time(), time.perf_counter()
            per_client = await asyncio.gather(*(_sequential(one_request, session, requests_per_client)
                                                for _ in range(clients)))
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        return LoadResult([r for rs in per_client for r in rs], wall, cpu)

    return asyncio.run(run())


async def _sequential(request: Callable[[Any], Any], session: Any, n: int) -> list[Record]:
    return [await request(session) for _ in range(n)]


# --- The modes ------------------------------------------------------------------------------------

def ours_command(checkpoint: Path, port: int, threads: int | None, max_batch: int,
                 *options: str, compile: bool = False) -> list[str]:
    return [sys.executable, "-m", "service", "--checkpoint", str(checkpoint), "--port", str(port),
            *(["--threads", str(threads)] if threads else []), "--device", "cpu", "--max-batch-size",
            str(max_batch), "--max-queue", "256", "--log-level", "warning", *options,
            *(["--compile"] if compile else [])]


def context_of(checkpoint: Path) -> int:
    from gpt import read_config

    return read_config(checkpoint)["model"]["block_size"]


def naive_mode(args: Any, argv: list[str] | None, checkpoint: Path, which: str) -> None:
    repeats = args.repeats or (1 if args.quick else 3)
    levels = args.clients or ([1, 8] if args.quick else [1, 8, 32])
    prompt = prompt_of(args.prompt_length)
    context = context_of(checkpoint)
    new = args.new or min(32 if args.quick else 128, context - len(prompt))
    if len(prompt) + new > context:
        raise SystemExit(f"the naive service's HF model has {context} positions: a {len(prompt)}-character "
                         f"prompt leaves at most {context - len(prompt)} new characters (--new)")
    ports = [free_port() for _ in range(3)]
    naive_cmd = [sys.executable, "-m", "bench.naive_service", "--checkpoint", str(checkpoint),
                 "--port", str(ports[2]), *(["--threads", str(args.threads)] if args.threads else [])]
    max_batch = max(32, *levels)
    rounds: dict[tuple[str, int], list[Load]] = {}
    naive_failures: list[str] = []
    with running_server(ours_command(checkpoint, ports[0], args.threads, max_batch), ports[0]) as ours, \
            running_server(ours_command(checkpoint, ports[1], args.threads, max_batch, "--no-engine-process"),
                           ports[1]) as one_process, \
            running_server(naive_cmd, ports[2]) as naive, ClientProcess() as client:
        servers = {"ours": ours, ONE_PROCESS: one_process, "naive": naive}
        for base in servers.values():  # warm-up
            measure(client, base, "/generate_stream", [stream_body(prompt, 8)], 1, 8)
        for round_ in range(repeats):
            for clients in levels:
                total = args.requests or (max(clients, 4) if args.quick else max(2 * clients, 8))
                bodies = [stream_body(prompt, new)] * (max(1, -(-total // clients)) * clients)
                for name, base in servers.items():
                    try:
                        load = measure(client, base, "/generate_stream", bodies, clients, new)
                    except RuntimeError as error:
                        if name != "naive":
                            raise
                        # The naive peer has broken off streams under concurrent load; ours still count.
                        print(f"round {round_ + 1}/{repeats}: naive {clients:3d} clients failed: {error}")
                        naive_failures.append(f"{clients} clients, round {round_ + 1}: {error}")
                        print(f"round {round_ + 1}/{repeats}: the naive peer went idle after "
                              f"{wait_until_idle(base.pid):.1f} s", flush=True)
                        continue
                    rounds.setdefault((name, clients), []).append(load)
                    print(f"round {round_ + 1}/{repeats}: {name:17s} {clients:3d} clients: "
                          f"{len(load.result.requests)} requests in {load.result.wall_s:.1f} s, "
                          f"{load.chars_per_s:,.0f} chars/s, client CPU {load.result.client_cpu:.1%}",
                          flush=True)

    def rate(name: str, clients: int, what: str) -> float:
        return median([getattr(load, what) for load in rounds[(name, clients)]])

    def first_char(records: list[Record], q: float) -> float:
        return percentile([r.first_char_s for r in records], q)

    table = Table(["service", "clients", "requests", "requests/s", "chars/s", "chars/s spread",
                   "first char p50 ms", "first char p99 ms", "latency p50 s", "server CPU (cores)",
                   "client CPU (% of a core)"])
    order = list(servers)
    for (name, clients), loads in sorted(rounds.items(), key=lambda kv: (kv[0][1], order.index(kv[0][0]))):
        every = pooled(loads)
        table.add(name, clients, len(every), rate(name, clients, "requests_per_s"),
                  rate(name, clients, "chars_per_s"), spread([load.chars_per_s for load in loads]),
                  first_char(every, 0.5) * 1e3, first_char(every, 0.99) * 1e3,
                  percentile([r.total_s for r in every], 0.5), server_cores(loads), client_cpu(loads))
    ratios = Table(["clients", "throughput ours / naive", "first char p99 naive / ours",
                    "first char p50 naive / ours", "ours N / 1 (chars/s)", "ours / one process (chars/s)"])
    for clients in levels:
        ours_every = pooled(rounds[("ours", clients)])
        naive_every = pooled(rounds.get(("naive", clients), []))
        scaling = "-"
        if 1 in levels:  # each round's N streams over the same round's one stream
            pairs = zip(rounds[("ours", clients)], rounds[("ours", 1)], strict=True)
            scaling = f"{median([n.chars_per_s / one.chars_per_s for n, one in pairs]):.2f}x"
        split = rate("ours", clients, "chars_per_s") / rate(ONE_PROCESS, clients, "chars_per_s")
        if naive_every:
            throughput = rate("ours", clients, "requests_per_s") / rate("naive", clients, "requests_per_s")
            versus_naive = [f"{throughput:.1f}x",
                            f"{first_char(naive_every, 0.99) / first_char(ours_every, 0.99):.1f}x",
                            f"{first_char(naive_every, 0.5) / first_char(ours_every, 0.5):.1f}x"]
        else:
            versus_naive = ["- (naive failed)"] * 3
        ratios.add(clients, *versus_naive, scaling, f"{split:.2f}x")

    header = (f"`{command_line(argv)}`\n\nWeights: {which}. CPU float32, greedy, {len(prompt)}-character "
              f"prompt, {new} new characters per request, streamed (SSE) over loopback, {repeats} rounds; "
              f"{machine_line()}.\n"
              "naive = FastAPI + HF `generate` per request under a lock (bench/naive_service.py), "
              "streaming through HF's streamer; ours = `python -m service` (continuous batching, the model "
              "in a process of its own); ours, one process = the same with `--no-engine-process`, as before "
              "the split. Torch threads: "
              + (f"{args.threads} each. " if args.threads else
                 "each server's default (naive and one process 2; ours the CPUs). ")
              + "The client: bench/client.py in a process of its own (a keep-alive connection per stream, "
              "SSE events counted in the raw bytes); its CPU is its process CPU time over the wall time; the "
              "server's is that of its processes together."
              + ("\n\nThe naive peer broke off (after each break, the next load waited until it was idle): "
                 + "; ".join(naive_failures) if naive_failures else ""))
    series = {f"{name} requests/s": (levels, [rate(name, c, "requests_per_s") for c in levels])
              for name in servers if all((name, c) in rounds for c in levels)}
    publish(args, "serving", "Serving vs the naive service (CPU)", header, [table, ratios],
            lambda png: plot_lines(png, "Serving: requests/s vs concurrent clients", "concurrent clients",
                                   "requests / second", series, logx=True))


def hf_mode(args: Any, argv: list[str] | None, checkpoint: Path, which: str) -> None:
    import torch
    from transformers import GenerationConfig

    from bench.convert_hf import to_hf
    from gpt import load_checkpoint
    from gpt.device import DTYPES

    repeats = args.repeats or (1 if args.quick else 3)
    levels = args.clients or [1, 64]
    one_stream_requests = args.requests or (2 if args.quick else 4)
    loaded = load_checkpoint(checkpoint)  # float32; each HF peer is a converted copy of it
    # HF in the run's dtype and, for bfloat16, in float32 too: without the CPU's bfloat16 instructions
    # HF's bfloat16 runs several times slower than its float32, and the ratio is against HF at its best.
    hf_models = {args.dtype: to_hf(loaded.model).to(DTYPES[args.dtype])}
    if args.dtype != "float32":
        hf_models["float32"] = to_hf(loaded.model)
    config = loaded.model.config
    prompt = args.prompt if args.prompt is not None else HF_PROMPT
    ids = loaded.tokenizer.encode(prompt)
    room = config.block_size - len(ids)
    new = args.new or min(200, room)
    if new > room:
        raise SystemExit(f"HF generate has the checkpoint's {config.block_size} positions and no more: a "
                         f"{len(ids)}-character prompt leaves at most {room} new characters (--new)")
    new_note = (f"{new} new characters" if new == 200 or args.new else
                f"{new} new characters (the context is {config.block_size}: HF's model has no positions "
                "past it, so prompt + new characters must fit, and 200 do not)")
    generation = GenerationConfig(max_new_tokens=new, do_sample=True, temperature=HF_TEMPERATURE, top_k=0,
                                  eos_token_id=None, pad_token_id=0)

    def hf_generate(hf: Any, batch: int, seed: int) -> None:
        input_ids = torch.tensor([ids] * batch)
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                              generation_config=generation)
        if out.shape != (batch, len(ids) + new):
            raise RuntimeError(f"HF generate returned {tuple(out.shape)}")

    def hf_rate(hf: Any, threads: int, batch: int, calls: int, seed: int) -> float:
        """Characters/s of `calls` generate calls of `batch` rows on `threads` torch threads."""
        torch.set_num_threads(threads)
        start = time.perf_counter()
        for call in range(calls):
            hf_generate(hf, batch, seed + call)
        return batch * new * calls / (time.perf_counter() - start)

    port = free_port()
    max_batch = max(64, *levels)
    use_curl = shutil.which("curl") is not None and 1 in levels and not args.no_curl
    hf_peers = {f"HF generate, {'' if dtype == args.dtype else f'{dtype}, '}{t} thread{'s' if t > 1 else ''}":
                (hf, t) for dtype, hf in hf_models.items() for t in args.hf_threads}
    ours: dict[int, list[Load]] = {}
    hf_rates: dict[tuple[str, int], list[float]] = {}
    curl_rates: list[float] = []
    command = ours_command(checkpoint, port, args.threads, max_batch, "--dtype", args.dtype,
                           "--kv-cache-dtype", args.kv_cache_dtype, compile=args.compile)
    with running_server(command, port) as base, ClientProcess() as client:
        # Warm-up: both at every level, at full length. HF's first call of a length runs slower than the
        # next ones (its cache grows a tensor a step, first through fresh memory): after a warm-up of 8
        # characters, the first 120-character call at batch 64 made 1,416 chars/s and the next four
        # 2,247-2,629 on this project's 2-CPU VM, and that cold call was each run's first round.
        for streams in levels:
            warm_bodies = [sampled_body(prompt, new, s) for s in range(streams)]
            measure(client, base, "/generate", warm_bodies, streams, new)
            for hf, threads in hf_peers.values():
                torch.set_num_threads(threads)
                hf_generate(hf, streams, 0)
        for round_ in range(repeats):
            for streams in levels:
                count = one_stream_requests if streams == 1 else streams
                seed = 1000 * (round_ + 1) + streams
                bodies = [sampled_body(prompt, new, seed + i) for i in range(count)]
                curl = None
                if streams == 1:  # one request at a time, each followed by the same one from curl
                    singles, curls = [], []
                    for body in bodies:
                        singles.append(measure(client, base, "/generate", [body], 1, new))
                        if use_curl:
                            curls.append(curl_load(base, "/generate", [body], 1, new))
                    load = combined(singles)
                    curl = combined_results(curls) if curls else None
                else:
                    load = measure(client, base, "/generate", bodies, streams, new)
                ours.setdefault(streams, []).append(load)
                line = (f"round {round_ + 1}/{repeats}, {streams:3d} streams: ours {load.chars_per_s:,.0f} "
                        f"chars/s (client CPU {load.result.client_cpu:.1%})")
                for peer, (hf, threads) in hf_peers.items():
                    rate = hf_rate(hf, threads, streams, one_stream_requests if streams == 1 else 1, seed)
                    hf_rates.setdefault((peer, streams), []).append(rate)
                    line += f", {peer} (batch {streams}) {rate:,.0f}"
                if curl is not None:  # the same requests from an independent client
                    curl_rates.append(curl.chars_per_s)
                    line += f", ours with curl as the client {curl.chars_per_s:,.0f}"
                print(line, flush=True)

    def ours_rate(streams: int) -> float:
        return median([load.chars_per_s for load in ours[streams]])

    def best_hf(streams: int) -> tuple[str, float]:
        return max(((peer, median(hf_rates[(peer, streams)])) for peer in hf_peers), key=lambda pr: pr[1])

    table = Table(["streams", "peer", "chars/s", "spread", "latency p50 s", "server CPU (cores)",
                   "HTTP process CPU us/char", "engine process CPU us/char", "client CPU (% of a core)"])
    for streams in levels:
        table.add(streams, "ours (HTTP /generate)", ours_rate(streams),
                  spread([load.chars_per_s for load in ours[streams]]),
                  percentile([r.total_s for r in pooled(ours[streams])], 0.5), server_cores(ours[streams]),
                  *us_per_char(ours[streams]), client_cpu(ours[streams]))
        if streams == 1 and curl_rates:
            table.add(streams, "ours, curl as the client", median(curl_rates), spread(curl_rates),
                      "-", "-", "-", "-", "-")
        for peer in hf_peers:
            table.add(streams, f"{peer}, batch {streams}", median(hf_rates[(peer, streams)]),
                      spread(hf_rates[(peer, streams)]), "-", "-", "-", "-", "-")
    targets = {1: 2.5, 64: 2.0}
    ratios = Table(["streams", "ours / HF generate", "issue 18's target", "met"])
    for streams in levels:
        peer, rate = best_hf(streams)
        ratio = ours_rate(streams) / rate
        against = f" ({peer.removeprefix('HF generate, ')})" if len(hf_peers) > 1 else ""
        target = targets.get(streams)
        ratios.add(streams, f"{ratio:.2f}x{against}", f">= {target:g}x" if target else "-",
                   ("yes" if ratio >= target else "no") if target else "-")

    header = (f"`{command_line(argv)}`\n\nWeights: {which} ({config.n_layer} layers x {config.n_embd}, "
              f"context {config.block_size}, {loaded.model.num_parameters():,} parameters). CPU "
              f"{args.dtype}, both{' (and HF in float32 too)' if len(hf_models) > 1 else ''}; "
              f"prompt {prompt!r}; {new_note}; temperature {HF_TEMPERATURE}, a seed per "
              f"request. {repeats} rounds, ours and HF alternating (median over rounds); {machine_line()}.\n"
              f"ours = `python -m service` (max batch {max_batch}, torch threads "
              f"{args.threads or 'its default: the CPUs'}{', --compile' if args.compile else ''}"
              f"{f', --dtype {args.dtype}' if args.dtype != 'float32' else ''}"
              f"{f', --kv-cache-dtype {args.kv_cache_dtype}' if args.kv_cache_dtype != 'auto' else ''}), "
              "JSON POST /generate from bench/client.py in a "
              f"process of its own (a keep-alive connection per stream): at 1 stream {one_stream_requests} "
              "requests one after the other, at N streams N requests at once. HF = "
              f"`GPT2LMHeadModel.generate` on the same weights (do_sample, temperature {HF_TEMPERATURE}, "
              "top_k 0, seeded), in this process: batch 1, as many calls, and one call of batch N. Both "
              "include the prefill; ours includes HTTP. The ratio is against the best HF row"
              + (". Curl's row: each 1-stream request sent again by curl right after ours, curl's own "
                 "per-request times summed." if curl_rates else "."))
    bars = {f"ours {streams}": ours_rate(streams) for streams in levels}
    bars.update({f"HF {streams}": best_hf(streams)[1] for streams in levels})
    key, title = "serving-hf", "Serving vs Hugging Face generate (CPU"
    if args.compile:
        key, title = f"{key}-compiled", f"{title}, --compile"
    if args.dtype != "float32":
        key, title = f"{key}-{args.dtype}", f"{title}, --dtype {args.dtype}"
    if args.kv_cache_dtype != "auto":
        key, title = f"{key}-kv-{args.kv_cache_dtype}", f"{title}, --kv-cache-dtype {args.kv_cache_dtype}"
    key, title = section(args, key, f"{title})", checkpoint)
    publish(args, key, title, header, [table, ratios],
            lambda png: plot_bars(png, "chars/s: ours (HTTP) vs HF generate", "characters / second", bars))


def client_check_mode(args: Any, argv: list[str] | None, checkpoint: Path, which: str) -> None:
    repeats = args.repeats or (1 if args.quick else 3)
    levels = args.clients or [1, 32]
    prompt = prompt_of(args.prompt_length)
    new = args.new or (32 if args.quick else 128)  # ours only: its rows slide past the context
    port = free_port()
    clients_order = ["bench/client.py (own process)", "curl", "aiohttp (in the benchmark's process, before)"]
    if shutil.which("curl") is None or args.no_curl:
        clients_order.remove("curl")
    loads: dict[tuple[str, int], list[Load]] = {}
    command = ours_command(checkpoint, port, args.threads, max(32, *levels), compile=args.compile)
    with running_server(command, port) as base, ClientProcess() as client:
        measure(client, base, "/generate_stream", [stream_body(prompt, 8)], 1, 8)

        def run(name: str, clients: int, per_client: int) -> LoadResult:
            bodies = [stream_body(prompt, new)] * (clients * per_client)
            if name.startswith("bench/client.py"):
                return client.load(base, "/generate_stream", bodies, clients, new)
            if name == "curl":
                return curl_load(base, "/generate_stream", bodies, clients, new)
            return aiohttp_load(base, prompt, new, clients, per_client)

        for round_ in range(repeats):
            for clients in levels:
                per_client = args.requests or (4 if clients == 1 else 2)
                # One stream: request by request, every client in turn; more: load by load.
                turns = [(1, 1)] * per_client if clients == 1 else [(clients, per_client)]
                parts: dict[str, list[Load]] = {name: [] for name in clients_order}
                for n, each in turns:
                    for name in clients_order:
                        before = process_cpu_s(base.pid)
                        result = run(name, n, each)
                        after = process_cpu_s(base.pid)
                        if result.failures:
                            raise RuntimeError(f"{name}: {result.failures[0]}")
                        parts[name].append(Load(result, sum(after) - sum(before), after[1] - before[1]))
                for name in clients_order:
                    load = combined(parts[name])
                    loads.setdefault((name, clients), []).append(load)
                    print(f"round {round_ + 1}/{repeats}, {clients:3d} streams, {name}: "
                          f"{load.chars_per_s:,.0f} chars/s, client CPU {load.result.client_cpu:.1%}",
                          flush=True)

    table = Table(["client", "streams", "requests", "chars/s", "chars/s spread", "latency p50 s",
                   "client CPU (% of a core)", "client CPU us/char", "server HTTP process us/char",
                   "engine process us/char", "chars/s / curl's"])
    for clients in levels:
        curl_rate = (median([load.chars_per_s for load in loads[("curl", clients)]])
                     if "curl" in clients_order else float("nan"))
        for name in clients_order:
            ls = loads[(name, clients)]
            chars = sum(load.chars for load in ls)
            rate = median([load.chars_per_s for load in ls])
            table.add(name, clients, len(pooled(ls)), rate, spread([load.chars_per_s for load in ls]),
                      percentile([r.total_s for r in pooled(ls)], 0.5), client_cpu(ls),
                      sum(load.result.client_cpu_s for load in ls) / chars * 1e6, *us_per_char(ls),
                      f"{rate / curl_rate:.2f}x" if curl_rate == curl_rate else "-")
    header = (f"`{command_line(argv)}`\n\nWeights: {which}. Our server (`python -m service`, torch threads "
              f"{args.threads or 'the CPUs'}), greedy, {len(prompt)}-character prompt, {new} new characters "
              f"per request streamed (SSE, POST /generate_stream); at each level every client in turn, "
              f"{repeats} rounds; {machine_line()}.\n"
              "Client CPU: bench/client.py's and aiohttp's own process CPU time over the wall time (aiohttp "
              "runs in this benchmark's process, as bench.serving ran it before); curl's is its child "
              "process's CPU time, start-up included. Server CPU per character: its HTTP process, and its "
              "engine process.")
    bars = {f"{name.split(' ')[0]} {clients}": median([load.chars_per_s for load in loads[(name, clients)]])
            for clients in levels for name in clients_order}
    key, title = section(args, "serving-client", "The benchmark client against independent clients (CPU)",
                         checkpoint)
    publish(args, key, title, header, [table],
            lambda png: plot_bars(png, "chars/s seen by each client", "characters / second", bars))


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0], threads=None, threads_help=(
        "torch threads of our servers (and the naive one) (default: each server's own: ours leaves one CPU "
        "to its HTTP process, the naive one takes two)"))
    parser.add_argument("--mode", choices=["naive", "hf", "client-check"], default="naive")
    parser.add_argument("--checkpoint", type=Path, help="default: the shipped one, else a random small")
    parser.add_argument("--preset", help="random weights of this preset instead of a checkpoint")
    parser.add_argument("--clients", "--streams", type=int, nargs="+",
                        help="concurrent streams (default: naive 1 8 32; hf 1 64; client-check 1 32)")
    parser.add_argument("--new", type=int, help="new characters per request (default: naive 128, --quick 32, "
                        "at most the context less the prompt; hf 200, at most the same; client-check 128, "
                        "--quick 32)")
    parser.add_argument("--requests", type=int, help="naive: requests per level, at least one per client "
                        "(default max(2 x clients, 8); --quick max(clients, 4)); hf: requests at 1 stream "
                        "(default 4, --quick 2); client-check: requests per client (default 4 at 1 stream, "
                        "2 at more)")
    parser.add_argument("--prompt-length", type=int, default=64, help="naive and client-check modes")
    parser.add_argument("--prompt", help=f"hf mode's prompt (default {HF_PROMPT!r})")
    parser.add_argument("--hf-threads", type=int, nargs="+", default=[1, 2],
                        help="hf mode: HF generate's torch threads, one peer for each (default 1 2; the "
                        "ratio is against the faster)")
    parser.add_argument("--no-curl", action="store_true", help="leave curl out (hf and client-check modes)")
    parser.add_argument("--compile", action="store_true",
                        help="start our server with --compile (its decode step compiled at warm-up)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="hf mode: the weights' dtype, ours (--dtype) and HF's alike (default float32)")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "float16"], default="auto",
                        help="hf mode: our server's --kv-cache-dtype (default auto: the weights' dtype)")
    parser.add_argument("--repeats", type=int, help="rounds over every level (default 3, --quick 1)")
    args = parser.parse_args(argv)
    checkpoint, which = resolve_checkpoint(args.checkpoint, args.preset)
    mode = {"naive": naive_mode, "hf": hf_mode, "client-check": client_check_mode}[args.mode]
    mode(args, argv, checkpoint, which)


if __name__ == "__main__":
    main()
