"""Device and dtype choice, made once at start by the entrypoints: one code path for CPU and CUDA."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """'auto' takes CUDA when present, else the CPU; 'cuda' without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but CUDA is not available")
    return device


def pick_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """'auto': bfloat16 on CUDA, float32 on the CPU (where bfloat16 matmuls are slow without AMX)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def has_bfloat16_instructions() -> bool:
    """Whether this CPU computes in bfloat16 (AVX512-BF16 or AMX). Without them every bfloat16 product
    is converted to float32 and back: on an AVX2 CPU, 64 streams of the compiled bfloat16 step served
    0.53x (caesar-small) and 0.86x (caesar) the characters of the compiled float32 one
    (docs/benchmarks.md)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@contextmanager
def one_cpu_thread() -> Iterator[None]:
    """Run torch's CPU ops on one thread inside the block, then restore the thread count: for one-off
    work (loading a model) on a thread that will not be the one that runs it. With OpenMP, a thread's
    first parallel region gives it a team of workers until the thread ends; once two threads have
    teams, libgomp counts more threads than cores and stops spinning between regions, so each region
    of the thread that does run the model wakes its workers through the kernel. On this project's
    2-CPU VM that made the 64-row decode step 1.6x slower on 2 threads ("The engine's threads" in
    docs/benchmarks.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
