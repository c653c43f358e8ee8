"""The request bodies of the OpenAI API the server accepts, validated strictly (pydantic, strict mode:
no string-to-number coercion). Fields the server does not implement are rejected when set to anything
but their default, so a client never silently gets something else than it asked for; unknown fields
are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_STOP = 4  # OpenAI's limit
MAX_STOP_CHARS = 256

StopStr = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str = Field(max_length=1000)
    max_tokens: Annotated[int, Field(ge=1, le=1 << 20)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    seed: Annotated[int, Field(ge=-(1 << 63), lt=1 << 64)] | None = None
    stop: StopStr | Annotated[list[StopStr], Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    presence_penalty: Literal[0, 0.0] = 0
    frequency_penalty: Literal[0, 0.0] = 0
    logprobs: Literal[False, None] = None
    logit_bias: Annotated[dict, Field(max_length=0)] | None = None
    user: str | None = Field(default=None, max_length=1000)
    return_token_ids: bool = False  # an extension (as vLLM's): the answer's token ids in each choice
    ignore_eos: bool = False  # an extension (as vLLM's): decode max_tokens tokens, past end-of-sequence

    @property
    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Sampling):
    prompt: (
        Annotated[str, Field(max_length=1 << 22)]
        | Annotated[list[Annotated[int, Field(ge=0, lt=1 << 31)]], Field(min_length=1, max_length=1 << 20)]
        | Annotated[list[Annotated[str, Field(max_length=1 << 22)]], Field(min_length=1, max_length=1)]
    )
    max_tokens: Annotated[int, Field(ge=1, le=1 << 20)] | None = 16  # OpenAI's default for completions
    echo: Literal[False] = False
    best_of: Literal[1, None] = None
    suffix: Literal[None] = None

    @model_validator(mode="before")
    @classmethod
    def _logprobs_int(cls, data):  # completions take logprobs as an int; only 0 / null are served
        if isinstance(data, dict) and data.get("logprobs") == 0 and not isinstance(data.get("logprobs"), bool):
            data = {**data, "logprobs": None}
        return data


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str = Field(max_length=1 << 22)


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Field(max_length=1 << 22)] | Annotated[list[TextPart], Field(max_length=256)]
    name: str | None = Field(default=None, max_length=256)

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=4096)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=1 << 20)] | None = None
    tools: Literal[None] = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError("response_format: only {'type': 'text'} is served")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self
