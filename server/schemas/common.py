"""Fields shared by the generation endpoints."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["MaskProfileField", "Seed", "Strict", "StopField", "Temperature", "TokenId", "TopK",
           "TopP", "Usage", "AppliedProfileOut"]

TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
Temperature = Annotated[float, Field(ge=0, le=100)]
TopP = Annotated[float, Field(gt=0, le=1)]
TopK = Annotated[int, Field(ge=-1, le=1 << 20, description="0 or -1: no top-k cut.")]
Seed = Annotated[int | None, Field(ge=0, le=2**63 - 1)]
ProfileName = Annotated[str, Field(min_length=1, max_length=80)]
MaskProfileField = Annotated[
    ProfileName | list[ProfileName] | None,
    Field(description="A mask profile name, 'name@version', or a list of them (their union). "
                      "The server-wide default profile, if any, is always added.",
          examples=["no-python", "no-python@3", ["no-python", "detox"]]),
]
StopField = Annotated[
    Annotated[str, Field(max_length=256)] | list[Annotated[str, Field(max_length=256)]] | None,
    Field(description="Stop strings (at most 16); the text ends before the first one."),
]


class Strict(BaseModel):
    """Unknown fields are refused (a misspelt mask_profile must not pass unnoticed), types are
    strict (no true for an integer, no "0.5" for a number; an integer is a number) and numbers
    finite (NaN, Infinity and 1e400 are refused naming the field)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AppliedProfileOut(BaseModel):
    name: str
    version: int
    default: bool = Field(False, description="The server-wide default profile.")
    digest: str = Field("", description="The mask's content digest (16 hex digits).")
