"""The OpenAI-compatible bodies: /v1/completions, /v1/chat/completions, /v1/models.

Fields that this server cannot honour are accepted only at their neutral values (no
penalties, best_of 1, no suffix), so a client never gets silently different behaviour. Extra
fields: mask_profile, top_k, ignore_eos. `n` samples per prompt, sample i with seed + i.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from server.schemas.common import (
    AppliedProfileOut,
    MaskProfileField,
    Seed,
    StopField,
    Strict,
    Temperature,
    TokenId,
    TopK,
    TopP,
    Usage,
)

__all__ = ["ChatMessage", "ChatRequest", "ChatResponse", "CompletionRequest",
           "CompletionResponse", "MAX_LOGPROBS", "ModelCard", "ModelList"]

MAX_LOGPROBS = 20  # vLLM's default max_logprobs


class StreamOptions(Strict):
    include_usage: bool = False


class _Sampling(Strict):
    model: str = Field(max_length=256, description="The served model, a mask profile "
                       "('name', 'name@version') or several joined by '+' (their union).")
    max_tokens: int | None = Field(None, ge=1)
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    seed: Seed = None
    stop: StopField = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=64, description="Samples per prompt; sample i is seeded with "
                   "seed + i. Every sample counts against the concurrency limit.")
    presence_penalty: float = Field(0, ge=0, le=0, description="Only 0 is supported.")
    frequency_penalty: float = Field(0, ge=0, le=0, description="Only 0 is supported.")
    user: str | None = Field(None, max_length=256)
    ignore_eos: bool = False
    mask_profile: MaskProfileField = None


class CompletionRequest(_Sampling):
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]] = Field(
        description="A text, token ids, or a list of either (one choice set per prompt).")
    max_tokens: int | None = Field(16, ge=0, description="0 only with echo: score the prompt.")
    echo: bool = Field(False, description="Return the prompt (and its logprobs) before the "
                                          "completion.")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="Per token: its logprob and the top N.")
    best_of: Literal[1] | None = None
    suffix: None = None


class ChatContentPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ChatContentPart]
    name: str | None = Field(None, max_length=256)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                     description="With logprobs: the top N per token.")


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    mask_profiles: list[AppliedProfileOut] = Field(default_factory=list)


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    mask_profiles: list[AppliedProfileOut] = Field(default_factory=list)


class ModelCard(BaseModel):
    """The served model, or a mask profile served as a model (as vLLM lists a LoRA adapter:
    `parent` is the served model)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "monet-serve"
    root: str
    parent: str | None = None
    max_model_len: int
    model_identity: str = Field(description="The identity mask profiles are built for.")
    version: int | None = Field(None, description="A profile's latest version.")
    mask_profile: str | None = Field(None, description="A profile's name@version.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
