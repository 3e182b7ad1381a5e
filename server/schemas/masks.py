"""/masks, /jobs and /inspect bodies."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator, model_validator

from masks.criteria import DEFAULT_CRITERION
from server.schemas.common import Strict, TokenId

__all__ = ["AtlasBuilt", "BuildRequest", "CorpusRecord", "InspectRequest", "InspectResponse",
           "JobOut", "LayerExperts", "ProfileWrite", "WriteResult"]

Index = Annotated[int, Field(ge=0, le=2**31 - 1)]
Pair = Annotated[list[Index], Field(min_length=2, max_length=2)]
Kind = Literal["domain", "language", "toxicity", "manual", "composite"]


class LayerExperts(Strict):
    layer: Index
    experts: list[Pair] = Field(description="Composite experts (i, j) removed in this layer.")


class CompactExperts(Strict):
    encoding: Literal["monetmsk"]
    data: str = Field(description="base64 of ExpertMask.to_bytes (per layer a zlib bitset).")


class ExpertsJson(Strict):
    layers: list[LayerExperts]


class ProfileWrite(Strict):
    """PUT /masks/{name}: `layers` ([{"layer", "experts": [[i, j], ...]}]) or `experts` (the
    profile JSON form: {"layers": [...]} or the compact {"encoding": "monetmsk", "data"})."""

    description: str = Field("", max_length=4096)
    kind: Kind = "manual"
    layers: list[LayerExperts] | None = None
    experts: CompactExperts | ExpertsJson | None = None
    model_id: str | None = Field(None, description="If given, must be this server's model.")
    provenance: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None

    def compacted(self) -> ProfileWrite:
        """The same body with each layer's pairs as one int64 array [N, 2] (for the trip
        back from the process that validated it: arrays pickle as bytes)."""
        source = self.layers if self.layers is not None else getattr(self.experts, "layers", None)
        if source is None:
            return self
        layers = [LayerExperts.model_construct(layer=l.layer, experts=_pairs(l.experts))
                  for l in source]
        if self.layers is not None:
            return self.model_copy(update={"layers": layers})
        return self.model_copy(update={"experts": ExpertsJson.model_construct(layers=layers)})

    @field_validator("provenance", "evaluation")
    @classmethod
    def _finite(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        _check_finite(value, "")
        return value

    @model_validator(mode="after")
    def _one_form(self):
        if (self.layers is None) == (self.experts is None):
            raise ValueError("give exactly one of 'layers' and 'experts'")
        return self


def _pairs(experts: list[list[int]], chunk: int = 1 << 16) -> np.ndarray:
    parts = [np.asarray(experts[n : n + chunk], dtype=np.int64).reshape(-1, 2)
             for n in range(0, len(experts), chunk)]
    return np.concatenate(parts) if parts else np.empty((0, 2), dtype=np.int64)


def _check_finite(value: Any, where: str) -> None:
    """NaN and infinities (which JSON cannot carry back out) anywhere in free-form data."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where or 'value'}: numbers must be finite")
    items = value.items() if isinstance(value, dict) else (
        enumerate(value) if isinstance(value, list) else ())
    for key, item in items:
        _check_finite(item, f"{where}.{key}" if where else str(key))


class WriteResult(BaseModel):
    name: str
    version: int
    previous_version: int = 0
    size: int = Field(description="Composite experts removed over all layers.")
    model_id: str
    digest: str = Field(description="The mask's contents (what a response's mask_profiles "
                                    "names): the same name@version may come back with other "
                                    "contents after a store lost its data.")


class DeleteResult(BaseModel):
    name: str
    deleted_version: int


class CorpusRecord(Strict):
    text: str = Field(min_length=1)
    label: str | None = Field(None, max_length=128)
    score: float | list[float] | None = None


class BuildRequest(Strict):
    """POST /masks/{name}/build: route a corpus through the model and select experts
    (domain / language: specificity of the target label; toxicity: Pearson correlation with
    the score; composite: the union of stored profiles)."""

    kind: Literal["domain", "language", "toxicity", "composite"]
    description: str = Field("", max_length=4096)
    records: list[CorpusRecord] | None = Field(None, min_length=1, max_length=100_000)
    corpus: str | None = Field(None, description="A file under the server's MONET_CORPUS_DIR.",
                               max_length=512)
    target: str | None = Field(None, max_length=128, description="domain / language: the label "
                               "whose experts are removed.")
    criterion: Literal["specificity", "attribution", "learned"] | None = Field(
        None, description="domain / language: 'specificity' (the paper: routing "
        "weight on the target against the other labels), 'attribution' (first-order loss "
        "increase on the target against the others; set coverage, e.g. 0.3) or 'learned' "
        "(keep-gates optimised to raise the target's loss and no other label's; factor and "
        "coverage do not apply). Default: learned for language (the one that moves "
        "generations off a language on the shipped model), specificity for domain, as "
        "`monet masks build`.")
    steps: int = Field(120, ge=1, le=10_000, description="learned: optimisation steps.")
    factor: float | None = Field(2.0, gt=1, le=1000)
    floor: float = Field(0.1, ge=0, le=1000)
    min_mass: float = Field(1.0, ge=0, le=1e9)
    coverage: float | None = Field(None, gt=0, le=1)
    threshold: float = Field(0.1, gt=-1, lt=1, description="toxicity: Pearson threshold.")
    layers: list[Index] | None = None
    parts: list[str] | None = Field(None, min_length=1, max_length=16,
                                    description="composite: profile names or name@version.")
    score_field: str = Field("toxicity", max_length=128, description="toxicity, corpus file: "
                             "the field with each text's score (inline records: 'score').")
    max_length: int = Field(512, ge=2, le=8192, description="tokens per routed window "
                            "(the learned criterion optimises on 256-token windows)")
    evaluate: bool = Field(False, description="Also measure per-label loss with the mask.")

    @model_validator(mode="after")
    def _needs(self):
        if self.kind == "composite":
            if not self.parts:
                raise ValueError("parts: a composite build needs the profiles to combine")
        elif (self.records is None) == (self.corpus is None):
            raise ValueError("give exactly one of 'records' and 'corpus'")
        if self.kind in ("domain", "language"):
            if not self.target:
                raise ValueError(f"target: a {self.kind} build needs the target label")
            if self.criterion is None:
                self.criterion = DEFAULT_CRITERION[self.kind]
        return self


class AtlasBuilt(BaseModel):
    """What POST /experts/build stored."""

    atlas: str = Field(description="The artifact's name in the mask store.")
    digest: str
    tokens: int
    documents: int
    contexts: int
    bytes: int


class JobOut(BaseModel):
    id: str
    kind: str
    profile: str
    status: Literal["queued", "running", "succeeded", "failed"]
    progress: float = Field(ge=0, le=1)
    message: str = ""
    created_at: datetime
    finished_at: datetime | None = None
    created_by: str
    result: WriteResult | AtlasBuilt | None = None  # a profile build's write, or an atlas
    error: str | None = None


class InspectRequest(Strict):
    text: str | None = Field(None, min_length=1)
    prompt_token_ids: list[TokenId] | None = Field(None, min_length=1)
    top_k: int = Field(5, ge=1, le=64, description="Composite experts per routing layer.")
    profiles: list[str] | None = Field(None, max_length=16, description="Profiles to check "
                                       "(default: every stored profile of this model).")
    add_bos: bool = True


class ExpertOut(BaseModel):
    layer: int = Field(description="The routing layer.")
    layers: list[int] = Field(description="The layers of its routing group.")
    i: int
    j: int
    expert: int = Field(description="i * E + j")
    weight: float
    removed_by: list[str] = Field(description="Profiles (name@version) removing it in at "
                                  "least one layer of the group.")


class TokenOut(BaseModel):
    position: int
    token_id: int
    text: str
    experts: list[ExpertOut]


class InspectResponse(BaseModel):
    tokens: list[TokenOut]
    profiles: list[str] = Field(description="The profiles checked, name@version.")
