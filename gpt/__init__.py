"""The caesar-gpt library: tokenizer, model, KV cache, sampling, generation and checkpoints."""

from gpt.checkpoint import CheckpointError, load_checkpoint, read_config, save_checkpoint
from gpt.device import pick_device, pick_dtype
from gpt.generate import (
    Chunk,
    Sequence,
    advance,
    compile_decode,
    decode_step,
    generate,
    generate_reference,
    prefill,
    start,
)
from gpt.model import GPT, PRESETS, GPTConfig, KVCache
from gpt.sampling import SamplingParams
from gpt.tokenizer import CharTokenizer, UnknownCharacterError

__all__ = [
    "GPT", "PRESETS", "CharTokenizer", "CheckpointError", "Chunk", "GPTConfig", "KVCache",
    "SamplingParams", "Sequence", "UnknownCharacterError", "advance", "compile_decode", "decode_step",
    "generate", "generate_reference", "load_checkpoint", "pick_device", "pick_dtype", "prefill",
    "read_config", "save_checkpoint", "start",
]
