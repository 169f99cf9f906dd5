"""DistributedDataParallel on the CPU: two gloo processes train the tiny model and end with the same weights.

The workers set the environment torchrun would (RANK, WORLD_SIZE, MASTER_ADDR, ...) and call the same
`training.train.train` that `torchrun -m training` runs.

Run: .venv/bin/python -m pytest tests/test_training_ddp.py -q
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from gpt import load_checkpoint
from training.config import TrainConfig
from training.train import train

WORLD_SIZE = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, out: str, data: str, replicas: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      LOCAL_WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    config = TrainConfig(out=out, preset="tiny", data=data, max_steps=6, eval_interval=3, batch_size=4,
                         lr=3e-3, dropout=0.1, device="cpu", seed=11)
    result = train(config)
    # Each rank reports its own replica, so the test can compare them.
    replica = {k: v.contiguous() for k, v in result.model.state_dict().items()}
    save_file(replica, f"{replicas}/rank{rank}.safetensors")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_agree_on_the_weights(tmp_path: Path, corpus_text: str) -> None:
    data = tmp_path / "short.txt"
    data.write_text(corpus_text[:20_000], encoding="utf-8")
    out = tmp_path / "run"
    mp.spawn(worker, args=(free_port(), str(out), str(data), str(tmp_path)), nprocs=WORLD_SIZE, join=True)

    rank0 = load_file(tmp_path / "rank0.safetensors")
    rank1 = load_file(tmp_path / "rank1.safetensors")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    # Rank 0 wrote what it trained.
    last = load_checkpoint(out / "last")
    assert last.config["training"]["step"] == 6 and last.config["training"]["world_size"] == WORLD_SIZE
    assert all(torch.equal(rank0[k], v) for k, v in last.model.state_dict().items())
    # Only rank 0 writes: one log, and each evaluation logged once.
    log = (out / "train.log").read_text()
    assert log.count("| step 6/6 |") == 1
    assert "on cpu x 2" in log
