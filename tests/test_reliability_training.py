"""Training killed with SIGKILL at random moments, again and again: every time, the checkpoints on disk
load, and `--resume` continues from the resume state that was last written, to the same weights as
a run that was never interrupted.

The run saves at every step, so most kills land inside a save: between writing last/ and resume.pt,
or in the middle of either.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt import load_checkpoint
from tests.server_utils import REPO
from training.config import TrainConfig
from training.train import RESUME_FILE, load_resume_state, train

pytestmark = pytest.mark.slow

KILLS = 3
MAX_STEPS = 20
SETTINGS = {"preset": "tiny", "max_steps": MAX_STEPS, "eval_interval": 1, "batch_size": 4, "lr": 3e-3,
            "dropout": 0.0, "seed": 11}


def command(out: Path, data: Path, resume: bool) -> list[str]:
    if resume:
        return [sys.executable, "-m", "training", "--resume", "--out", str(out)]
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    return [sys.executable, "-m", "training", *flags, "--data", str(data), "--out", str(out)]


def step_of(checkpoint: Path) -> int:
    return load_checkpoint(checkpoint).config["training"]["step"]


def logged_steps(log: Path, offset: int) -> list[int]:
    """The steps evaluated (and then saved) since byte `offset` of train.log."""
    if not log.exists():
        return []
    with open(log, "rb") as f:
        f.seek(offset)
        return [int(s) for s in re.findall(rb"\| step (\d+)/", f.read())]


def test_sigkill_at_random_moments_never_loses_a_loadable_checkpoint(tmp_path: Path,
                                                                     corpus_text: str) -> None:
    data = tmp_path / "short.txt"
    data.write_text(corpus_text[:20_000], encoding="utf-8")
    out, log = tmp_path / "run", tmp_path / "run" / "train.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(6)
    resumed_from: list[int] = []
    for _ in range(KILLS):
        resume = (out / RESUME_FILE).exists()
        start_step = load_resume_state(out)["step"] if resume else 0
        offset = log.stat().st_size if log.exists() else 0
        process = subprocess.Popen(command(out, data, resume), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        # The fuse: this run evaluates one or two steps (each then saved), plus a random moment more,
        # so that the kill lands anywhere in a save or in the steps between saves.
        fuse = start_step + rng.randint(1, 2)
        deadline = time.monotonic() + 120
        while not any(step >= fuse for step in logged_steps(log, offset)):
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.1))
        assert process.poll() is None, "the run finished before the kill: raise MAX_STEPS"
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()

        if not (out / RESUME_FILE).exists():  # killed inside the very first save: the next run starts over
            assert not resume
            continue
        # Whatever the moment: last/, the best checkpoint (DIR itself) and the resume state all load.
        state = load_resume_state(out)
        last_step = step_of(out / "last")
        assert step_of(out) <= last_step
        # last/ is written before resume.pt, so a kill between the two leaves last/ one save ahead.
        assert last_step in (state["step"], state["step"] + 1)
        resumed_from.append(state["step"])

    finished = subprocess.run(command(out, data, resume=True), cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    logged = [int(s) for s in re.findall(r"Training resumed from the last checkpoint: .* \(step (\d+),",
                                         log.read_text())]
    assert logged == resumed_from  # each run went on from the resume state its predecessor left
    assert step_of(out / "last") == MAX_STEPS

    # And the kills cost nothing: the weights are those of a run that was never interrupted.
    torch.set_num_threads(1)
    train(TrainConfig(out=str(tmp_path / "uninterrupted"), data=str(data), **SETTINGS))
    expected = load_file(tmp_path / "uninterrupted" / "last" / "model.safetensors")
    actual = load_file(out / "last" / "model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    print(f"killed at resume states {resumed_from}; leftovers of killed saves: "
          f"{sorted(p.name for p in out.iterdir() if p.name.startswith('.'))}")
