"""The caesar-gpt library: tokenizer, model, KV cache, sampling, generation and checkpoints."""

from gpt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gpt.generate import Chunk, Sequence, advance, decode_step, generate, generate_reference, prefill, start
from gpt.model import GPT, PRESETS, GPTConfig, KVCache
from gpt.sampling import SamplingParams
from gpt.tokenizer import CharTokenizer, UnknownCharacterError

__all__ = [
    "GPT", "PRESETS", "CharTokenizer", "CheckpointError", "Chunk", "GPTConfig", "KVCache",
    "SamplingParams", "Sequence", "UnknownCharacterError", "advance", "decode_step", "generate",
    "generate_reference", "load_checkpoint", "prefill", "save_checkpoint", "start",
]
