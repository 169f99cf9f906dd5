"""The GPT-2 model, read top to bottom: config, presets, attention, MLP, block, GPT.

Two ways through the same weights:
- `GPT.forward(idx, targets)`: the training path, full causal attention over a (B, T) batch.
- `GPT.forward_cached(idx, cache, rows, start)`: the inference path, which writes each new key and
  value into a pre-allocated `KVCache` and attends over what that row has cached so far. Each row
  keeps its own position, so one call can advance rows of different lengths.

Parameter names follow GPT-2 (`wte`, `wpe`, `h.N.attn.c_attn`, ...) so the state dict maps one to
one onto Hugging Face's GPT2LMHeadModel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from gpt.tensors import long_tensor


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 1024  # context length: the most positions the model has embeddings for
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# Named architectures. The vocabulary size is set from the corpus (65 for Julius Caesar).
PRESETS: dict[str, GPTConfig] = {
    # The model the product is built around: 85,942,272 parameters with 65 characters.
    "seed": GPTConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768),
    # The shipped model (scripts/train-shipped): pre-trained on the other works, fine-tuned on the play,
    # on a 2-core CPU. docs/training.md gives the sweep that chose it.
    "shipped": GPTConfig(block_size=128, n_layer=6, n_head=4, n_embd=256),
    # Trains on a 2-core CPU in 30 minutes; the checkpoint that shipped before "shipped".
    "small": GPTConfig(block_size=256, n_layer=4, n_head=4, n_embd=128),
    # For tests: a few milliseconds a step.
    "tiny": GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64),
}


class KVCache(nn.Module):
    """Pre-allocated keys and values, (max_batch, n_head, max_len + 1, head_dim) per layer.

    Buffers are allocated once and written in place; a row is a slot that one sequence owns from
    its prefill until it is freed. `lengths[row]` is how many positions the row has cached. It is a
    module only so that its buffers count as static state for torch.compile's CUDA graphs.

    `dtype` may be narrower than the model's (llama.cpp's and vLLM's KV-cache dtype): keys and values
    are stored in it and read back in the model's. A float16 cache of a float32 model holds half the
    bytes, and the compiled CPU step, whose attention is memory-bound at many rows, reads half as many
    (docs/benchmarks.md); the eager step converts what it reads into a copy, which costs more than it
    saves.
    """

    def __init__(self, config: GPTConfig, max_batch: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, max_len: int | None = None) -> None:
        super().__init__()
        self.max_batch = max_batch
        self.max_len = max_len or config.block_size
        if self.max_len > config.block_size:
            raise ValueError(f"max_len {self.max_len} is past the context of {config.block_size}")
        head_dim = config.n_embd // config.n_head
        # One position more than max_len, never written: the compiled CPU step reads the cache sliced to
        # a traced length, and a slice as long as the whole buffer would be a graph of its own.
        shape = (max_batch, config.n_head, self.max_len + 1, head_dim)
        for layer in range(config.n_layer):
            self.register_buffer(f"k_{layer}", torch.zeros(shape, device=device, dtype=dtype))
            self.register_buffer(f"v_{layer}", torch.zeros(shape, device=device, dtype=dtype))
        self.k = [getattr(self, f"k_{layer}") for layer in range(config.n_layer)]
        self.v = [getattr(self, f"v_{layer}") for layer in range(config.n_layer)]
        self.lengths = [0] * max_batch
        # Set by gpt.generate.compile_decode: (rows, tokens) -> logits (R, V), one decode step.
        self.compiled_step: Callable[[list[int], list[int]], torch.Tensor] | None = None

    def check_position(self, position: int) -> None:
        """Refuse a write at `position`, before anything is written, when the cache is too short."""
        if position >= self.max_len:
            raise ValueError(f"position {position} is past the cache length {self.max_len}")

    def free(self, row: int) -> None:
        # Stale keys beyond a row's length are never attended to, so freeing only resets the length.
        self.lengths[row] = 0


@dataclass
class CacheRows:
    """Which cache rows a cached forward touches, and where its new tokens sit in them.

    `index` (R,) and `positions` (R, T) address the writes; reads take `selector` (a slice when the
    rows are consecutive, so the cache is viewed rather than gathered) up to `length` positions,
    under `mask` (R, 1, T, length): a key is visible to a query at position p when it sits at
    position <= p in the same row. When every row starts at the same position, the mask is left
    out: one new token sees every cached key, and a prompt from position 0 is plain causal
    attention (`is_causal`); `span` then holds the new tokens' positions as a slice.
    """

    index: torch.Tensor
    selector: slice | torch.Tensor
    positions: torch.Tensor
    length: int
    mask: torch.Tensor | None
    is_causal: bool = False
    span: slice | None = None

    @classmethod
    def build(cls, rows: list[int], start: list[int], new: int, device: torch.device) -> CacheRows:
        """Rows `rows`, the first new token of row i at position start[i], `new` tokens each."""
        length = max(start) + new  # attend only as far as the furthest of these rows has reached
        positions = long_tensor(start, device)[:, None] + torch.arange(new, device=device)
        consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        index = long_tensor(rows, device)
        selector = slice(rows[0], rows[0] + len(rows)) if consecutive else index
        if all(s == start[0] for s in start) and (new == 1 or start[0] == 0):
            span = slice(start[0], length)
            return cls(index, selector, positions, length, None, is_causal=new > 1, span=span)
        return cls(index, selector, positions, length, cls.causal_mask(positions, length))

    @staticmethod
    def causal_mask(positions: torch.Tensor, length: int) -> torch.Tensor:
        key_pos = torch.arange(length, device=positions.device)
        return (key_pos[None, None, :] <= positions[:, :, None])[:, None]  # (R, 1, T, L)

    def write(self, cache: torch.Tensor, new: torch.Tensor) -> None:
        """Store keys or values `new` (R, n_head, T, head_dim) at the rows' positions, in place, in the
        cache's dtype."""
        new = new.to(cache.dtype)
        if self.span is not None and isinstance(self.selector, slice):
            cache[self.selector, :, self.span] = new
        else:
            # Indexing (R, 1) rows and (R, T) positions around the head slice puts (R, T) first.
            cache[self.index[:, None], :, self.positions] = new.transpose(1, 2)  # (R, T, n_head, head_dim)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor) -> torch.Tensor:
        """Store the new keys and values (R, n_head, T, head_dim), then attend the new queries over
        everything the rows have cached."""
        self.write(k_cache, k)
        self.write(v_cache, v)
        keys = k_cache[self.selector, :, :self.length].to(q.dtype)  # (R, n_head, L, head_dim)
        values = v_cache[self.selector, :, :self.length].to(q.dtype)
        if q.size(2) == 1 and q.device.type == "cpu":
            # One query per row: two batched products beat the CPU's flash-attention kernel, which is
            # tiled for long sequences (docs/benchmarks.md). CUDA keeps SDPA's fused kernels.
            scores = (q @ keys.transpose(-1, -2)).mul_(q.size(-1) ** -0.5)  # (R, n_head, 1, L)
            if self.mask is not None:
                scores.masked_fill_(~self.mask, float("-inf"))
            return scores.softmax(dim=-1) @ values
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask, is_causal=self.is_causal)


@dataclass
class DecodeRows:
    """CacheRows for one new token per row, held wholly as tensors: the form a compiled decode step
    traces. rows[i] is a cache row, start[i] the position its new token goes to; key_positions is
    arange(max(start) + 1), whose length is how far the step attends, the one shape besides the
    row count that varies from step to step."""

    rows: torch.Tensor  # (R,)
    start: torch.Tensor  # (R,)
    key_positions: torch.Tensor  # (L,)

    @property
    def positions(self) -> torch.Tensor:
        return self.start[:, None]  # (R, 1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor) -> torch.Tensor:
        """CacheRows.attend for one query per row, q, k, v (R, n_head, 1, head_dim)."""
        # (R, n_head, head_dim) at (row, position), in the cache's dtype
        k_cache[self.rows, :, self.start] = k[:, :, 0].to(k_cache.dtype)
        v_cache[self.rows, :, self.start] = v[:, :, 0].to(v_cache.dtype)
        # Rows gathered, positions sliced: inductor then reads each row's keys straight through, where
        # gathering every (row, position) by index loads and bounds-checks an index per key; the
        # attention alone runs 1.4-1.7x as fast at 64 rows (docs/benchmarks.md). KVCache's spare
        # position keeps the slice shorter than the buffer, so the last position needs no graph of its own.
        length = self.key_positions.size(0)
        keys = k_cache[self.rows, :, :length].to(q.dtype).transpose(1, 2)  # (R, L, n_head, head_dim)
        values = v_cache[self.rows, :, :length].to(q.dtype).transpose(1, 2)
        # Written out rather than F.scaled_dot_product_attention: inductor then fuses the gather of
        # the rows' keys and values, and their conversion from a float16 cache, into the products
        # instead of copying them out first.
        scores = (q.transpose(1, 2) * keys).sum(-1) * q.size(-1) ** -0.5  # (R, L, n_head)
        visible = self.key_positions[None, :] <= self.start[:, None]  # (R, L)
        scores = scores.masked_fill(~visible[:, :, None], float("-inf"))
        weighted = (scores.softmax(1)[..., None] * values).sum(1)  # (R, n_head, head_dim)
        return weighted[:, :, None]  # (R, n_head, 1, head_dim)


# Decoding feeds each projection a handful of rows (one per running sequence), where CPU BLAS is at
# its worst with a weight that must stream from memory. For one row, MKL runs the matrix-vector
# product on one thread, which cannot stream the weights as fast as all cores together; for 2..64
# rows it computes x @ W^T at a fraction of the speed of the same product taken weight-first,
# (W @ x^T)^T (see docs/benchmarks.md). Up to this many rows, inference on the CPU takes those two
# routes for weights of STREAMED_BYTES and more; training, long prompts, CUDA, torch.compile and
# weights that sit in cache keep nn.Linear's.
FEW_ROWS = 64

# A weight this small sits in cache: streaming it is not the cost, and nn.Linear's own route is
# the fastest (the weight-first product is 2-3x slower at 8 rows of the `small` model's weights;
# a split across threads costs more at their meeting point than it saves).
STREAMED_BYTES = 1 << 20


class Linear(nn.Linear):
    """nn.Linear (same parameters, same math) with faster CPU routes for inputs of few rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        # Compiling first: a traced comparison of `rows` would guard the graph on the row count.
        if (torch.compiler.is_compiling() or rows > FEW_ROWS or x.device.type != "cpu"
                or (torch.is_grad_enabled() and self.weight.requires_grad)
                or self.weight.numel() * self.weight.element_size() < STREAMED_BYTES):
            return super().forward(x)
        if rows == 1:
            return blocked_linear(x, self.weight, self.bias, blocks_for(self.weight))
        return weight_first_linear(x, self.weight, self.bias)


def blocks_for(weight: torch.Tensor) -> int:
    """One block of weight rows per intra-op thread, as many as divide its rows evenly."""
    n_out = weight.size(0)
    return next(b for b in range(min(torch.get_num_threads(), n_out), 0, -1) if n_out % b == 0)


def blocked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   blocks: int) -> torch.Tensor:
    """F.linear(x, weight, bias) for one row, the weight's rows split into `blocks` blocks of one
    batched product, which ATen runs on that many threads at once."""
    if blocks == 1:
        return F.linear(x, weight, bias)
    n_out, n_in = weight.shape
    x_rows = x.reshape(1, 1, n_in).expand(blocks, 1, n_in)
    w_blocks = weight.view(blocks, n_out // blocks, n_in).transpose(1, 2)  # (blocks, K, N/blocks)
    if bias is None:
        y = torch.bmm(x_rows, w_blocks)
    else:
        y = torch.baddbmm(bias.view(blocks, 1, n_out // blocks), x_rows, w_blocks)  # (blocks, 1, N/blocks)
    return y.view(*x.shape[:-1], n_out)


def weight_first_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) computed as (weight @ x^T)^T."""
    n_out, n_in = weight.shape
    rows = x.numel() // n_in
    x_t = x.reshape(rows, n_in).t()  # (K, M)
    y = weight @ x_t if bias is None else torch.addmm(bias[:, None], weight, x_t)  # (N, M)
    # Back to (..., N) row-major: a copy of rows x N values, small next to reading the weights.
    return y.t().contiguous().view(*x.shape[:-1], n_out)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def _split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        return q, k, v

    def _merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = y.size()
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_embd)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split_heads(x)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self._merge_heads(y)

    def forward_cached(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       rows: CacheRows | DecodeRows) -> torch.Tensor:
        """x: (R, T, C), the new tokens of the R rows that `rows` names."""
        q, k, v = self._split_heads(x)  # (R, n_head, T, head_dim)
        return self._merge_heads(rows.attend(q, k, v, k_cache, v_cache))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's gelu_new
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def forward_cached(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       rows: CacheRows | DecodeRows) -> torch.Tensor:
        x = x + self.attn.forward_cached(self.ln_1(x), k_cache, v_cache, rows)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned absolute positions
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        # Untied and without bias, as in the seed model.
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) at init.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training path. idx, targets: (B, T) token ids. Returns logits (B, T, V) and the loss."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds the context of {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def forward_cached(self, idx: torch.Tensor, cache: KVCache, rows: list[int],
                       start: list[int]) -> torch.Tensor:
        """Inference path. idx: (R, T) new tokens for cache rows `rows`, the first of row i at
        position start[i]. Writes their keys and values into the cache; returns logits (R, T, V).
        Does not move `cache.lengths`: the callers in gpt/generate.py own that bookkeeping."""
        cache_rows = CacheRows.build(rows, start, idx.size(1), idx.device)
        cache.check_position(cache_rows.length - 1)
        return self.forward_rows(idx, cache, cache_rows)

    def forward_rows(self, idx: torch.Tensor, cache: KVCache, rows: CacheRows | DecodeRows) -> torch.Tensor:
        x = self.transformer.wte(idx) + self.transformer.wpe(rows.positions)  # (R, T, C)
        for block, k_cache, v_cache in zip(self.transformer.h, cache.k, cache.v, strict=True):
            x = block.forward_cached(x, k_cache, v_cache, rows)
        return self.lm_head(self.transformer.ln_f(x))  # (R, T, V)
