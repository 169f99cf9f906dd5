"""Print a sample from a checkpoint: `python -m training.sample --checkpoint DIR --prompt TEXT`."""

from __future__ import annotations

import argparse
import sys

from gpt import CheckpointError, SamplingParams, UnknownCharacterError, generate, load_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.sample", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument("--prompt", default="", help="text to continue (default: empty)")
    parser.add_argument("--max-new-tokens", type=int, default=500, help="characters to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    try:
        checkpoint = load_checkpoint(args.checkpoint, device=args.device)
        prompt_ids = checkpoint.tokenizer.encode(args.prompt)
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                seed=args.seed)
    except (CheckpointError, UnknownCharacterError, ValueError) as e:
        sys.exit(f"error: {e}")
    sys.stdout.write(args.prompt)
    chunks = generate(checkpoint.model, prompt_ids, checkpoint.tokenizer.decode, args.max_new_tokens, params)
    for chunk in chunks:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
