"""Service settings: one pydantic-settings model, read from `CAESAR_*` environment variables and
overridden by `python -m service` flags (see service/__main__.py, which builds its flags from it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The checkpoint the repository ships (produced by scripts/train-shipped).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "caesar"

CommaSeparated = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CAESAR_", extra="ignore", frozen=True)

    checkpoint: Path = Field(DEFAULT_CHECKPOINT, description="checkpoint directory to serve")
    model_name: str | None = Field(
        None, description="the model's name in the API (default: the checkpoint's folder name)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on cuda, float32 on cpu")
    kv_cache_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="the KV cache's dtype; auto: the model's (dtype). float16 halves the cache, and "
        "with --compile on the CPU makes a step of many rows faster (attention reads half the bytes); "
        "elsewhere (without --compile, or on CUDA) each step converts what it reads and is slower")
    compile: bool = Field(False, description="compile the decode step: CUDA graphs on CUDA, inductor's "
                          "packed GEMM kernels on the CPU (warm-up takes minutes for the seed model)")
    threads: int | None = Field(
        None, ge=1, description="the engine's torch CPU threads (default: with --engine-process, the "
        "CPUs this process may use, within a container's CPU quota; else torch's choice)")
    engine_process: bool = Field(
        True, description="run the model in a process of its own, which the server restarts if it dies "
        "while the HTTP side keeps answering")
    engine_load_timeout_s: float = Field(
        600.0, gt=0, description="longest an engine process may take to load the checkpoint, and again to "
        "warm up; past it, the start fails (at startup, the server exits 1)")
    max_batch_size: int = Field(32, ge=1, description="KV-cache rows: requests decoded together")
    max_queue: int = Field(64, ge=0, description="requests that may wait for a row; past it, 429")
    queue_timeout_s: float = Field(30.0, gt=0, description="longest wait for a row; past it, 503")
    max_new_tokens: int = Field(2048, ge=1, description="the most new characters a request may ask for")
    default_max_new_tokens: int = Field(256, ge=0, description="new characters if a native request omits it")
    api_keys: CommaSeparated = Field(
        default_factory=list, description="comma-separated Bearer keys; empty: no authentication")
    cors_origins: CommaSeparated = Field(
        default_factory=list, description="comma-separated allowed origins; empty: CORS off")
    max_body_bytes: int = Field(1 << 20, ge=1, description="largest request body; past it, 413")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long running requests may finish")
    keepalive_s: float = Field(
        15.0, gt=0, description="SSE `: ping` interval; a queued stream's response starts after this long")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @model_validator(mode="after")
    def _default_within_limit(self) -> Settings:
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError(f"default_max_new_tokens ({self.default_max_new_tokens}) exceeds "
                             f"max_new_tokens ({self.max_new_tokens})")
        return self

    @property
    def served_model_name(self) -> str:
        return self.model_name or self.checkpoint.resolve().name

    def public_dict(self) -> dict[str, Any]:
        """Every setting except the API keys, for /info and the startup log line."""
        settings = self.model_dump(mode="json", exclude={"api_keys"})
        settings["auth_required"] = bool(self.api_keys)
        return settings
