"""POST /generate."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

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

__all__ = ["GenerateChunk", "GenerateRequest", "GenerateResponse"]


class GenerateRequest(Strict):
    prompt: str | None = Field(None, description="Text to continue (or prompt_token_ids).")
    prompt_token_ids: list[TokenId] | None = Field(None, min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Default: as many as fit.")
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    seed: Seed = None
    stop: StopField = None
    ignore_eos: bool = False
    mask_profile: MaskProfileField = None
    stream: bool = Field(False, description="Server-sent events, one per token.")


class GenerateResponse(Strict):
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length", "abort"]
    usage: Usage
    mask_profiles: list[AppliedProfileOut] = Field(
        description="The profiles applied, with versions (also in X-Monet-Mask-Profiles).")


class GenerateChunk(Strict):
    """One server-sent event of a streamed /generate; the last has finish_reason and usage."""

    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length", "abort"] | None = None
    usage: Usage | None = None
    mask_profiles: list[AppliedProfileOut] | None = None
