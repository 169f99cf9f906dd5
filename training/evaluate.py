"""Held-out loss of a checkpoint: `python -m training.evaluate --checkpoint DIR`.

The held-out set is the last 10% of the corpus (training/data.py's split). The corpus defaults to the
one the checkpoint was trained on, as recorded in its config.json.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from gpt import CheckpointError, UnknownCharacterError, load_checkpoint
from training.data import CORPORA, CorpusError, encode_corpus, load_corpus, split
from training.train import held_out_loss


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument("--corpus", choices=sorted(CORPORA), help="default: the checkpoint's training corpus")
    parser.add_argument("--data", help="evaluate on the last 10%% of this UTF-8 text file instead")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    try:
        checkpoint = load_checkpoint(args.checkpoint, device=args.device)
        trained_on = checkpoint.config.get("training", {}).get("corpus")
        name = args.corpus or (trained_on if trained_on in CORPORA else "julius-caesar")
        corpus = load_corpus(name, args.data)
        _, val_ids = split(encode_corpus(corpus, checkpoint.tokenizer))
    except (CheckpointError, CorpusError, UnknownCharacterError) as e:
        sys.exit(f"error: {e}")
    # Evaluate with the window the model was trained on (a shorter one than its context, at times).
    trained_window = checkpoint.config.get("training", {}).get("hyperparameters", {}).get("block_size")
    loss = held_out_loss(checkpoint.model, val_ids, torch.device(args.device), block_size=trained_window)
    print(f"checkpoint: {args.checkpoint} (step {checkpoint.config.get('training', {}).get('step', '?')}, "
          f"{checkpoint.config.get('weights_dtype')} weights)")
    print(f"held-out set: last 10% of {corpus.name}, {len(val_ids):,} characters "
          f"(corpus sha256 {corpus.sha256[:16]})")
    print(f"held-out loss: {loss:.4f} nats/char, {loss / math.log(2):.4f} bits/char")


if __name__ == "__main__":
    main()
