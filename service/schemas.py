"""Every request and response body of the API, as pydantic models.

Native routes speak Hugging Face TGI's shapes (`/generate`, `/generate_stream`, `/tokenize`), `/v1`
speaks OpenAI's Completions API. Requests are validated strictly: exact types (no string-to-number
coercion, no floats for integers), finite numbers only, unknown fields refused. TGI options that this
service does not implement are accepted only at their "off" value, so TGI clients' defaults pass.
Limits that depend on the server's settings (max_new_tokens) are checked by the routes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
    field_validator,
)

MAX_STOP_STRINGS = 4
MAX_SEED = 2**64 - 1

# Below MIN_TEMPERATURE (or past the penalty bounds), logits can overflow float32 and sampling would
# fail inside the engine; 0 is the way to ask for greedy decoding.
MIN_TEMPERATURE = 1e-3


def _zero_or_at_least_min(temperature: float) -> float:
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
    return temperature


Temperature = Annotated[float, Field(ge=0, le=100), AfterValidator(_zero_or_at_least_min)]
RepetitionPenalty = Annotated[float, Field(ge=0.01, le=100)]
Probability = Annotated[float, Field(gt=0, le=1)]
PositiveInt = Annotated[int, Field(ge=1)]
NewTokens = Annotated[int, Field(ge=0)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=64)]
StopList = Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]
# Options this service does not implement, accepted at their "off" value only. Range constraints
# rather than Literal[...]: in strict mode they refuse booleans, which Literal[1] would take for 1.
OnlyOne = Annotated[int, Field(ge=1, le=1)]
OnlyZero = Annotated[int, Field(ge=0, le=0)]
OnlyOneFloat = Annotated[float, Field(ge=1.0, le=1.0)]
OnlyZeroFloat = Annotated[float, Field(ge=0.0, le=0.0)]


def _only_false(value: bool) -> bool:
    if value:
        raise ValueError("not supported by this service; only false is accepted")
    return value


OnlyFalse = Annotated[bool, AfterValidator(_only_false), WithJsonSchema({"type": "boolean", "enum": [False]})]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# --- Native (TGI) ----------------------------------------------------------------------------------

class GenerateParameters(StrictModel):
    max_new_tokens: NewTokens | None = Field(None, description="new characters (default: the server's)")
    temperature: Temperature | None = Field(None, description="0 = greedy (default 1.0)")
    top_k: PositiveInt | None = None
    top_p: Probability | None = None
    repetition_penalty: RepetitionPenalty | None = Field(None, description="> 1 discourages repeats")
    seed: Seed | None = Field(None, description="default: random, reported in details.seed")
    stop: StopList = Field(default_factory=list, description="up to 4 strings; not part of the output")
    details: bool = False
    do_sample: bool | None = Field(
        None, description="TGI's rule: false with no temperature, top_k or top_p given means greedy")
    truncate: PositiveInt | None = Field(None, description="keep only the last N characters of the prompt")
    return_full_text: bool = Field(False, description="prepend the prompt to generated_text")
    # TGI options this service does not implement, accepted at their off value only.
    best_of: OnlyOne | None = None
    decoder_input_details: OnlyFalse = False
    watermark: OnlyFalse = False
    top_n_tokens: OnlyZero | None = None
    typical_p: OnlyOneFloat | None = None
    frequency_penalty: OnlyZeroFloat | None = None
    grammar: None = None
    adapter_id: None = None


class GenerateRequest(StrictModel):
    inputs: str = Field(description="the prompt; may be empty (generation then starts after a newline)")
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None = Field(None, description="not computed by this service: always null")
    special: bool = False


class StreamDetails(BaseModel):
    finish_reason: Literal["length", "stop_sequence"]
    generated_tokens: int = Field(description="characters sampled, a stop string's included")
    seed: int
    input_length: int = Field(description="prompt characters received")
    truncated: bool = Field(description="the prompt was longer than the context: only its last part was used")


class GenerateDetails(StreamDetails):
    prefill: list[Token] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list, description="the generated characters")


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
    """One SSE event of /generate_stream: one per generated character; the last carries the whole
    text and the details."""

    index: int
    token: Token
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


class CompletionRequest(StrictModel):
    model: str
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] = Field(
        description="a string, or a list holding one string")
    max_tokens: NewTokens | None = Field(None, description="default 16, as in OpenAI's API")
    temperature: Temperature | None = Field(None, description="0 = greedy (default 1.0)")
    top_p: Probability | None = None
    stop: StopString | StopList | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: OnlyOne | None = None
    best_of: OnlyOne | None = None
    echo: OnlyFalse | None = None
    logprobs: OnlyZero | None = None
    suffix: None = None
    presence_penalty: OnlyZeroFloat | None = None
    frequency_penalty: OnlyZeroFloat | None = None
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = None
    user: str | None = None
    # Extensions, as vLLM accepts them (the openai client's `extra_body`).
    top_k: PositiveInt | None = None
    repetition_penalty: RepetitionPenalty | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str:
        return prompt if isinstance(prompt, str) else prompt[0]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
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
    status: Literal["ready", "loading", "draining", "unhealthy"]
    queue: int
    running: int


class Info(BaseModel):
    model_id: str
    version: str
    model: dict[str, Any] = Field(description="the model card: shape, vocabulary, device, checkpoint")
    limits: dict[str, Any]
    settings: dict[str, Any] = Field(description="every setting except the API keys")
