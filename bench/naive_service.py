"""The naive service, as most tutorials ship it: a FastAPI endpoint that calls Hugging Face
`generate` for each request, one request at a time. The peer for bench/serving.py.

    .venv/bin/python -m bench.naive_service --checkpoint checkpoints/caesar --port 8100

It is given every fair advantage: the same weights (converted from our checkpoint), the same
threads, and it streams each character as HF's streamer hands it over (TGI's SSE framing, so the
same client measures both), so its time to first character is as good as that design allows. Its
model runs on one worker thread, and is loaded on one CPU thread (`gpt.device.one_cpu_thread` says
why): the pool threads of `asyncio.to_thread` would each start a team of OpenMP workers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from bench.convert_hf import to_hf
from gpt import load_checkpoint
from gpt.device import one_cpu_thread


class Parameters(BaseModel):
    max_new_tokens: int = Field(128, ge=1, le=2048)
    temperature: float = Field(0.0, ge=0)


class GenerateRequest(BaseModel):
    inputs: str
    parameters: Parameters = Parameters()


class QueueStreamer(BaseStreamer):
    """Hands each generated token id to the event loop (its first `put` is the prompt)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[int | None]) -> None:
        self.loop, self.queue, self.prompt_seen = loop, queue, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.flatten().tolist():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, token)

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


def create_app(checkpoint: str) -> FastAPI:
    with one_cpu_thread():
        loaded = load_checkpoint(checkpoint)
        hf, tokenizer = to_hf(loaded.model), loaded.tokenizer
    one_at_a_time = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-generate")
    app = FastAPI(title="naive HF generate service")

    @app.get("/ready")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    def run_generate(ids: list[int], params: Parameters, streamer: QueueStreamer) -> None:
        config = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=params.temperature > 0,
                                  temperature=params.temperature or None, eos_token_id=None, pad_token_id=0)
        input_ids = torch.tensor([ids])
        with torch.inference_mode():
            hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config,
                        streamer=streamer)

    @app.post("/generate_stream")
    async def generate_stream(request: GenerateRequest) -> StreamingResponse:
        ids = tokenizer.encode(request.inputs)
        queue: asyncio.Queue[int | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        streamer = QueueStreamer(loop, queue)
        task = loop.run_in_executor(one_at_a_time, run_generate, ids, request.parameters, streamer)

        async def events() -> AsyncIterator[str]:
            generated: list[str] = []
            while (token := await queue.get()) is not None:
                text = tokenizer.decode([token])
                generated.append(text)
                yield "data: " + json.dumps({"token": {"id": token, "text": text, "special": False},
                                             "generated_text": None, "details": None}) + "\n\n"
            await task
            yield "data: " + json.dumps({"token": None, "generated_text": "".join(generated),
                                         "details": None}) + "\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    uvicorn.run(create_app(args.checkpoint), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
