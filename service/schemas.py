"""Every request and response body of the API, as pydantic models.

Native routes speak Hugging Face TGI's shapes (`/generate`, `/generate_stream`, `/tokenize`), `/v1`
speaks OpenAI's Completions API (with vLLM's extensions). Requests are validated strictly: exact types
(no string-to-number coercion, no floats for integers), finite numbers only, unknown fields refused,
and no number that float32 (the logits' dtype) would round to zero. Options this service does not
implement are accepted only at their "off" value, so clients' defaults pass; any other value is
refused with the same message on both APIs (NOT_SUPPORTED). Limits that depend on the server's
settings (max_new_tokens, how many rows a request may take) are checked by the routes.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
)

MAX_STOP_STRINGS = 4
MAX_SEED = 2**64 - 1
MAX_LOGPROBS = 5  # TGI's top_n_tokens and OpenAI's logprobs: at most this many alternatives
MAX_SAMPLES = 8  # OpenAI's n and best_of, TGI's best_of
MAX_PROMPTS = 32  # prompts in one /v1/completions request
MAX_LOGIT_BIAS = 100.0
MAX_OPENAI_PENALTY = 2.0  # presence_penalty and frequency_penalty, as OpenAI, vLLM and TGI bound them
NOT_SUPPORTED = "not supported by this service"

# Below MIN_TEMPERATURE (or past the penalty bounds), logits can overflow float32 and sampling would
# fail inside the engine; 0 is the way to ask for greedy decoding.
MIN_TEMPERATURE = 1e-3
# float32's smallest normal number (torch.finfo(torch.float32).tiny). Sampling runs in float32: a
# setting below it becomes 0 or a subnormal there (top_p = 5e-324 became 0 and dropped every
# character), so it cannot be honoured and is refused, naming the field.
FLOAT32_TINY = 1.1754943508222875e-38


def _zero_or_at_least_min(temperature: float) -> float:
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
    return temperature


def _float32(value: float) -> float:
    if value != 0 and abs(value) < FLOAT32_TINY:
        raise ValueError(f"{value!r} cannot be honoured: it is below float32's smallest normal number "
                         f"({FLOAT32_TINY:.4g}), and sampling runs in float32")
    return value


Float32 = AfterValidator(_float32)
Temperature = Annotated[float, Field(ge=0, le=100), AfterValidator(_zero_or_at_least_min)]
RepetitionPenalty = Annotated[float, Field(ge=0.01, le=100)]
Probability = Annotated[float, Field(gt=0, le=1), Float32]  # top_p, typical_p: 1 = off
MinP = Annotated[float, Field(ge=0, le=1), Float32]  # 0 = off
Penalty = Annotated[float, Field(ge=-MAX_OPENAI_PENALTY, le=MAX_OPENAI_PENALTY), Float32]
LogitBias = Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS), Float32]
PositiveInt = Annotated[int, Field(ge=1)]
NewTokens = Annotated[int, Field(ge=0)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Samples = Annotated[int, Field(ge=1, le=MAX_SAMPLES)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=64)]
StopList = Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]


def off_only(off: Any, schema: dict[str, Any]) -> Any:
    """A field for an option this service does not implement: `off` (or leaving it out) passes,
    anything else is refused as NOT_SUPPORTED, with the same words on both APIs."""
    def check(value: Any) -> Any:
        if value is not None and not (type(value) is type(off) and value == off):
            raise ValueError(f"{NOT_SUPPORTED}; only {json.dumps(off)} is accepted")
        return value

    return Annotated[Any, BeforeValidator(check), WithJsonSchema(schema)]


OnlyFalse = off_only(False, {"type": "boolean", "enum": [False]})
OnlyNull = off_only(None, {"type": "null"})


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# --- Native (TGI) ----------------------------------------------------------------------------------

class GenerateParameters(StrictModel):
    max_new_tokens: NewTokens | None = Field(None, description="new characters (default: the server's)")
    temperature: Temperature | None = Field(None, description="0 = greedy")
    top_k: PositiveInt | None = None
    top_p: Probability | None = Field(None, description="1 = off")
    typical_p: Probability | None = Field(None, description="locally typical sampling; 1 = off")
    repetition_penalty: RepetitionPenalty | None = Field(None, description="> 1 discourages repeats")
    frequency_penalty: Penalty | None = Field(
        None, description="subtracted from a character's logit once per time it was generated")
    seed: Seed | None = Field(None, description="default: random, reported in details.seed")
    stop: StopList = Field(default_factory=list, description="up to 4 strings; not part of the output")
    details: bool = False
    decoder_input_details: bool = Field(
        False, description="score the prompt: details.prefill, one entry per character, the first null "
                           "(not with streaming)")
    top_n_tokens: TopLogprobs | None = Field(
        None, description="the most likely alternatives of each generated character: details.top_tokens "
                          "(stream events: top_tokens)")
    best_of: Samples | None = Field(
        None, description="sample this many and answer the one of highest mean log-probability per "
                          "character; the others in details.best_of_sequences (needs sampling, not with "
                          "streaming)")
    do_sample: bool | None = Field(
        None, description="TGI's rule: without do_sample: true or one of temperature, top_k, top_p, "
                          "typical_p, decoding is greedy")
    truncate: PositiveInt | None = Field(None, description="keep only the last N characters of the prompt")
    return_full_text: bool = Field(False, description="prepend the prompt to generated_text")
    # TGI options this service does not implement, accepted at their off value only.
    watermark: OnlyFalse = False
    grammar: OnlyNull = None
    adapter_id: OnlyNull = None


class GenerateRequest(StrictModel):
    inputs: str = Field(description="the prompt; may be empty (generation then starts after a newline)")
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


class Token(BaseModel):
    id: int
    text: str = Field(description="in details.tokens and top_tokens, the character; in a stream event, "
                                  "the text this token released (empty while it may start a stop string)")
    logprob: float | None = Field(None, description="natural log-probability under the model's raw "
                                                    "distribution (before temperature and the filters)")
    special: bool = False


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None = Field(description="given the characters before it; null for the first")


class StreamDetails(BaseModel):
    finish_reason: Literal["length", "stop_sequence"]
    generated_tokens: int = Field(description="characters sampled, a stop string's included")
    seed: int
    input_length: int = Field(description="prompt characters received")
    truncated: bool = Field(description="the prompt was longer than the context: only its last part was used")


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: Literal["length", "stop_sequence"]
    generated_tokens: int
    seed: int
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    top_tokens: list[list[Token]] | None = None


class GenerateDetails(StreamDetails):
    prefill: list[PrefillToken] = Field(default_factory=list,
                                        description="the prompt's characters, with decoder_input_details")
    tokens: list[Token] = Field(default_factory=list,
                                description="one per generated character, a stop string's included")
    top_tokens: list[list[Token]] | None = Field(None, description="with top_n_tokens: per position")
    best_of_sequences: list[BestOfSequence] | None = Field(None, description="with best_of: the others")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(BaseModel):
    queue_ms: float
    time_to_first_token_ms: float
    total_ms: float
    tokens_per_s: float


class GenerateResponse(BaseModel):
    generated_text: str
    details: GenerateDetails | None = None
    usage: Usage
    timings: Timings


class StreamResponse(BaseModel):
    """One SSE event of /generate_stream: one per generated character (its token's text is what it
    released); the last carries the whole text and the details."""

    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None
    usage: Usage | None = None
    timings: Timings | None = None


class TokenizeRequest(StrictModel):
    inputs: str
    parameters: dict[str, Any] | None = Field(None, description="accepted for TGI compatibility; ignored")


class TokenizedCharacter(BaseModel):
    id: int
    text: str
    start: int
    stop: int


class ErrorResponse(BaseModel):
    """TGI's error shape, on native routes."""

    error: str
    error_type: str


# --- OpenAI Completions ------------------------------------------------------------------------------

class StreamOptions(StrictModel):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(
        False, description="vLLM's: with include_usage, every chunk carries its choice's usage so far")


def _logit_bias_keys(bias: dict[str, float]) -> dict[str, float]:
    for key in bias:
        if not (key.isascii() and key.isdigit() and str(int(key)) == key):
            raise ValueError(f"keys are character ids as /tokenize gives them (\"0\", \"12\"...), "
                             f"not {key[:20]!r}")
    return bias


class CompletionRequest(StrictModel):
    model: str
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
        description=
            f"a string, or a list of up to {MAX_PROMPTS} strings (choice index: prompt index x n + i)")
    max_tokens: NewTokens | None = Field(None, description="default 16, as in OpenAI's API")
    temperature: Temperature | None = Field(None, description="0 = greedy (default 1.0)")
    top_p: Probability | None = None
    stop: StopString | StopList | None = None
    seed: Seed | None = Field(None, description="sample i of a prompt uses seed + i")
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="only with stream: true")
    n: Samples | None = Field(None, description="completions per prompt")
    best_of: Samples | None = Field(
        None, description="sample this many per prompt, answer the n of highest cumulative log-probability "
                          "(>= n; not with streaming unless equal to n)")
    echo: bool | None = Field(None, description="the prompt first, in the text and in logprobs")
    logprobs: TopLogprobs | None = Field(
        None, description="log-probabilities of each character (raw distribution, before temperature and "
                          "the filters) and of this many alternatives")
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: Annotated[dict[str, LogitBias], AfterValidator(_logit_bias_keys)] | None = Field(
        None, description="character id (as a string) -> bias added to its logit, -100..100")
    user: str | None = None
    suffix: OnlyNull = None
    # Extensions, as vLLM accepts them (the openai client's `extra_body`).
    top_k: PositiveInt | None = None
    min_p: MinP | None = Field(None, description="0 = off")
    repetition_penalty: RepetitionPenalty | None = None
    min_tokens: NewTokens | None = Field(None, description="stop strings end nothing before this many")
    ignore_eos: bool | None = Field(None, description="accepted: this model has no end-of-text token")

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for the first character of a prompt")
    top_logprobs: list[dict[str, float] | None] = Field(
        description="the most likely characters and the one chosen, each with its log-probability")
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(BaseModel):
    """The answer to /v1/completions, and (with `object` the same) each chunk of its stream."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "caesar-gpt"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIError


# --- Operations --------------------------------------------------------------------------------------

class Health(BaseModel):
    status: Literal["ok", "unhealthy"]


class Readiness(BaseModel):
    status: Literal["ready", "loading", "restarting", "draining", "unhealthy"]
    queue: int
    running: int


class Info(BaseModel):
    model_id: str
    version: str
    model: dict[str, Any] = Field(description="the model card: shape, vocabulary, device, checkpoint")
    limits: dict[str, Any]
    parameters: dict[str, list[str]] = Field(description="the request fields each API takes")
    logprobs: str = Field(description="what the reported log-probabilities are")
    settings: dict[str, Any] = Field(description="every setting except the API keys")
