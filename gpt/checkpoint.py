"""The checkpoint: a directory holding `model.safetensors` (weights) and `config.json` (architecture,
vocabulary, preset and training metadata). It is the one contract between training and serving.

Saving is atomic at the directory level: both files are written and fsynced into a sibling
temporary directory, which then takes the checkpoint's place in one rename (an atomic exchange on
Linux), so a crash leaves either the old checkpoint or the new one, whole. Loading never unpickles:
weights come from safetensors, everything else from JSON, and the weights' sha256 recorded in
config.json is checked so a corrupted file cannot load silently.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt.model import GPT, GPTConfig
from gpt.tokenizer import CharTokenizer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "caesar-gpt-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, corrupted or inconsistent; the message says where."""


@dataclass
class Checkpoint:
    model: GPT
    tokenizer: CharTokenizer
    config: dict[str, Any]  # the whole config.json: "model", "vocab", "preset", "training", ...


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where that is unavailable."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def save_checkpoint(path: str | Path, model: GPT, tokenizer: CharTokenizer, *, preset: str | None = None,
                    metadata: dict[str, Any] | None = None, dtype: torch.dtype | None = None) -> None:
    """Write the checkpoint directory `path` atomically, replacing any checkpoint already there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Staging directories of saves that were killed part-way: they were never the checkpoint.
    for stale in path.parent.glob(f".{path.name}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the checkpoint from a server running as another user
    try:
        # Strip torch.compile's wrapper prefix; store contiguous copies in the requested dtype.
        state = {k.removeprefix("_orig_mod."): v.detach().to(dtype or v.dtype).contiguous().cpu()
                 for k, v in model.state_dict().items()}
        save_file(state, staging / WEIGHTS_FILE)
        _fsync(staging / WEIGHTS_FILE)
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "preset": preset,
            "model": model.config.to_dict(),
            "vocab": tokenizer.chars,
            "num_parameters": model.num_parameters(),
            "weights_dtype": str(next(iter(state.values())).dtype).removeprefix("torch."),
            "weights_sha256": sha256_file(staging / WEIGHTS_FILE),
            "training": metadata or {},
        }
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        _fsync(staging / CONFIG_FILE)
        _fsync(staging)
        if path.exists() and _exchange(staging, path):
            shutil.rmtree(staging)  # staging now holds the previous checkpoint
        else:
            if path.exists():  # no atomic exchange on this system: a brief window without `path`
                old = staging.with_name(staging.name + ".old")
                path.rename(old)
                staging.rename(path)
                shutil.rmtree(old)
            else:
                staging.rename(path)
        _fsync(path.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_config(path: str | Path) -> dict[str, Any]:
    """Read and check config.json alone (no weights): for tools that only need the metadata."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no checkpoint directory there")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: missing (a checkpoint needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = json.loads(config_path.read_text())
        GPTConfig(**config["model"])
        CharTokenizer(config["vocab"])
    except (ValueError, KeyError, TypeError) as e:
        problem = f"{type(e).__name__}: {e}"
        raise CheckpointError(f"{config_path}: not a valid checkpoint config ({problem})") from e
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{config_path}: not a {FORMAT} config")
    return config


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Load a checkpoint directory into a model in eval mode on `device` in `dtype`."""
    path = Path(path)
    config = read_config(path)
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing")
    if sha256_file(weights_path) != config.get("weights_sha256"):
        raise CheckpointError(f"{weights_path}: contents do not match the sha256 in {CONFIG_FILE} "
                              "(truncated, corrupted, or from another checkpoint)")
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({e})") from e
    model_config = GPTConfig(**config["model"])
    tokenizer = CharTokenizer(config["vocab"])
    if model_config.vocab_size != tokenizer.vocab_size:
        raise CheckpointError(f"{path / CONFIG_FILE}: vocab_size {model_config.vocab_size} but the "
                              f"vocabulary has {tokenizer.vocab_size} characters")
    with torch.device("meta"):
        model = GPT(model_config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        problems = [f"{k}: config expects {expected.get(k)}, weights have {found.get(k)}"
                    for k in sorted(expected.keys() | found.keys()) if expected.get(k) != found.get(k)]
        raise CheckpointError(f"{path}: {CONFIG_FILE} does not match {WEIGHTS_FILE}: "
                              + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    return Checkpoint(model.to(device).eval(), tokenizer, config)
