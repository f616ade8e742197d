"""The OpenAI API's request and response bodies, as pydantic models (the subset ``gsa serve`` implements).

Why strict models: a request field the server would silently ignore is a wrong answer waiting to
happen, so unknown fields are refused (400, naming the field, as OpenAI does), and OpenAI fields this
server does not implement (``n > 1``, tools, logprobs, penalties...) are accepted only at their
neutral value and otherwise refused with a message saying so. A few extensions use vLLM's names:
``top_k``, ``min_p``, ``repetition_penalty`` and ``ignore_eos``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 4  # stop sequences per request, as OpenAI
MAX_SEED = 2**63 - 1


def _neutral(name: str, value: Any, neutral: tuple[Any, ...], what: str) -> Any:
    if value not in neutral:
        raise ValueError(f"{name}={value!r} is not supported by this server ({what})")
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class SamplingRequest(BaseModel):
    """What chat and text completions share: the model, sampling, limits and streaming."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions (vLLM's names)
    top_k: int | None = Field(None, ge=-1, description="-1 or 0: off")
    min_p: float | None = Field(None, ge=0.0, lt=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [] if value is None else [value] if isinstance(value, str) else list(value)
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty strings")
        return stops

    @field_validator("n")
    @classmethod
    def _n(cls, value: int | None) -> int:
        return _neutral("n", 1 if value is None else value, (1,), "one choice per request: send n requests")

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _penalty(cls, value: float | None, info: Any) -> float:
        return _neutral(info.field_name, value or 0.0, (0.0,), "use repetition_penalty instead")

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> None:
        if value:
            raise ValueError("logit_bias is not supported by this server")
        return None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _content_text(value: Any) -> str | None:
    """A message's content: a string, or a list of ``{"type": "text", "text": ...}`` parts (joined)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"content part {i} is {kind!r}; this server takes text parts only "
                                 '({"type": "text", "text": "..."})')
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(f"content must be a string or a list of text parts, not {type(value).__name__}")


class ChatMessage(BaseModel):
    """One message. Fields of other features (tool calls, audio, refusals) are accepted only when empty, so a
    client can send back the assistant messages it received."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> str | None:
        return _content_text(value)

    @model_validator(mode="after")
    def _no_other_features(self) -> ChatMessage:
        for key, value in (self.model_extra or {}).items():
            if value not in (None, [], {}, ""):
                raise ValueError(f"message field {key!r} is not supported by this server (text messages only)")
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None

    @field_validator("logprobs", "store")
    @classmethod
    def _off(cls, value: bool | None, info: Any) -> bool:
        return _neutral(info.field_name, bool(value), (False,), "not implemented")

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, value: int | None) -> None:
        return _neutral("top_logprobs", value, (None, 0), "logprobs are not implemented")

    @field_validator("tools")
    @classmethod
    def _tools(cls, value: list[Any] | None) -> None:
        if value:
            raise ValueError("tools (function calling) are not supported by this server")
        return None

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, value: Any) -> None:
        return _neutral("tool_choice", value, (None, "none"), "tools are not supported")

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value: dict[str, Any] | None) -> None:
        if value not in (None, {"type": "text"}):
            raise ValueError("only the text response format is supported")
        return None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for text completions
    echo: bool | None = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: Any) -> str | list[int]:
        if isinstance(value, str):
            return value
        if value and isinstance(value[0], (str, list)):
            if len(value) != 1:
                raise ValueError(f"one prompt per request, got {len(value)}: send one request per prompt")
            return value[0]
        return value

    @field_validator("echo")
    @classmethod
    def _echo(cls, value: bool | None) -> bool:
        return _neutral("echo", bool(value), (False,), "not implemented")

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> None:
        return _neutral("suffix", value, (None, ""), "insertion is not implemented")

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, value: int | None) -> None:
        return _neutral("logprobs", value, (None,), "not implemented")

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None) -> None:
        return _neutral("best_of", value, (None, 1), "one candidate per request")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens


# ----------------------------------------------------------------------------- responses
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


FinishReason = Literal["stop", "length"]


class Choice(BaseModel):
    index: int = 0
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatChoice(Choice):
    message: AssistantMessage
    finish_reason: FinishReason


class ChatChunkChoice(Choice):
    delta: ChatDelta


class CompletionChoice(Choice):
    text: str


class Response(BaseModel):
    """What every completion object and chunk carries."""

    id: str
    created: int
    model: str
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ChatCompletion(Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatCompletionChunk(Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class Completion(Response):
    """A text completion, and (with ``stream``) each of its chunks: the same object, OpenAI's convention."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gsa"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


__all__ = [
    "MAX_STOP", "AssistantMessage", "ChatChoice", "ChatChunkChoice", "ChatCompletion", "ChatCompletionChunk",
    "ChatCompletionRequest", "ChatDelta", "ChatMessage", "Choice", "Completion", "CompletionChoice",
    "CompletionRequest", "ErrorDetail", "ErrorResponse", "FinishReason", "ModelCard", "ModelList",
    "PromptTokensDetails", "Response", "SamplingRequest", "StreamOptions", "UsageInfo",
]
