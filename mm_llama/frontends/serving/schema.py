"""Pydantic models of the OpenAI Chat Completions request and of the responses the server sends.

Only what MM-LLaMA can honour is declared; other fields OpenAI clients send (`user`, `metadata`, `store`, ...) are
ignored, except those whose silent loss would change the answer's meaning (tools, logprobs, n > 1), which are
refused with a 400 naming them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_SEQUENCES = 4  # OpenAI's limit


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Part):
    type: Literal["text"]
    text: str


class MediaURL(_Part):
    url: str = Field(min_length=1)
    detail: str | None = None  # OpenAI's image detail level: accepted, meaningless for ImageBind


class ImageURLPart(_Part):
    type: Literal["image_url"]
    image_url: MediaURL


class VideoURLPart(_Part):
    """Not in OpenAI's API (which has no video input); the shape vLLM and SGLang use."""

    type: Literal["video_url"]
    video_url: MediaURL


class InputAudio(_Part):
    data: str = Field(min_length=1, description="base64 audio bytes")
    # A file suffix for the decoder, so letters and digits only (it becomes part of a scratch file name).
    format: str = Field(pattern=r"^[A-Za-z0-9]{1,10}$", description="wav, mp3, flac, ...")


class InputAudioPart(_Part):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | ImageURLPart | VideoURLPart | InputAudioPart, Field(discriminator="type")]


class SystemMessage(_Part):
    role: Literal["system", "developer"]  # "developer" is OpenAI's newer name for the system role
    content: str | list[TextPart]


class UserMessage(_Part):
    role: Literal["user"]
    content: str | list[ContentPart]


class AssistantMessage(_Part):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None


Message = Annotated[SystemMessage | UserMessage | AssistantMessage, Field(discriminator="role")]


class StreamOptions(_Part):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions` body. Unset sampling fields take the server's defaults (`--temperature` ...)."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = Field(None, validate_default=True)  # always a list once validated
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"n={value} is not supported; this server returns one choice per request (n=1).")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}.")
        if any(not stop for stop in stops):
            raise ValueError("a stop sequence must not be empty.")
        return stops

    @model_validator(mode="after")
    def _unsupported(self) -> ChatCompletionRequest:
        extra = self.model_extra or {}
        for name in ("tools", "functions", "tool_choice", "function_call"):
            if extra.get(name) not in (None, [], "none"):
                raise ValueError(f"'{name}' is not supported: MM-LLaMA has no tool calling. Leave it out.")
        if extra.get("logprobs") or extra.get("top_logprobs"):
            raise ValueError("'logprobs' is not supported by this server. Leave it out.")
        response_format = extra.get("response_format")
        if isinstance(response_format, dict) and response_format.get("type") not in (None, "text"):
            raise ValueError("only response_format {'type': 'text'} is supported.")
        return self

    @property
    def answer_limit(self) -> int | None:
        """The requested answer length: `max_completion_tokens` (OpenAI's current name) or `max_tokens`."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---------------------------------------------------------------------------------------------------- responses


class ApiError(Exception):
    """A request the server refuses: sent as `status` with OpenAI's error body (`type` as OpenAI names it)."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorBody


def completion_response(request_id: str, created: int, model: str, text: str, finish_reason: str,
                        usage: Usage) -> dict[str, Any]:
    """A `chat.completion` object with one choice."""
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage.model_dump(), "system_fingerprint": None}


def completion_chunk(request_id: str, created: int, model: str, delta: dict[str, str],
                     finish_reason: str | None = None, usage: Usage | None = None,
                     with_choice: bool = True) -> dict[str, Any]:
    """A `chat.completion.chunk` (a streamed piece); the usage chunk of `stream_options.include_usage` has no
    choice."""
    choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}] if with_choice else []
    chunk: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                             "choices": choices, "system_fingerprint": None}
    if usage is not None:
        chunk["usage"] = usage.model_dump()
    return chunk


__all__ = ["ApiError", "AssistantMessage", "ChatCompletionRequest", "ErrorResponse", "ImageURLPart", "InputAudioPart",
           "SystemMessage", "TextPart", "Usage", "UserMessage", "VideoURLPart", "completion_chunk",
           "completion_response"]
