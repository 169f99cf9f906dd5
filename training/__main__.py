"""`python -m training --preset {seed,small,tiny} --out DIR [options]`: see training/train.py."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torchinfo

from gpt import CheckpointError, UnknownCharacterError
from training.config import RESUMABLE_OVERRIDES, TrainConfig, build_parser, explicit_settings
from training.data import CorpusError, load_corpus
from training.train import build_model, command_line, load_resume_state, train


def print_summary(config: TrainConfig) -> None:
    """The seed's torchinfo table: one forward pass over a full context on CPU, then every layer."""
    corpus = load_corpus(config.corpus, config.data)
    model, _, _ = build_model(config, corpus, None)
    print(torchinfo.summary(model, input_size=(1, model.config.block_size), dtypes=[torch.long], depth=3,
                            col_names=("output_size", "num_params"), device="cpu", verbose=0))


def resolve_config(argv: list[str]) -> tuple[TrainConfig, bool]:
    args = build_parser().parse_args(argv)
    settings = explicit_settings(args)
    if args.summary:
        settings.setdefault("out", "")
        return TrainConfig(**settings), True
    if not settings.get("out"):
        build_parser().error("--out DIR is required")
    if settings.get("resume"):
        # Continue with the saved settings; only the flags given now override them.
        saved = load_resume_state(Path(settings["out"]))["config"]
        changed = sorted(k for k, v in settings.items() if k not in RESUMABLE_OVERRIDES and saved.get(k) != v)
        if changed:
            logging.getLogger("training").warning(
                "--resume with changed %s: the run will not continue exactly", ", ".join(changed))
        if "max_steps" in settings or "epochs" in settings:
            saved = {**saved, "max_steps": None, "epochs": None}
        settings = {**saved, **settings}
    elif "max_steps" in settings and "epochs" in settings:
        build_parser().error("give --max-steps or --epochs, not both")
    return TrainConfig(**settings), False


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        config, summary_only = resolve_config(argv)
        if summary_only:
            print_summary(config)
            return
        train(config, command=command_line(argv))
    except (CorpusError, CheckpointError, UnknownCharacterError, FileNotFoundError, FileExistsError,
            ValueError) as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
