"""/experts bodies: the expert atlas's entries, searches and builds."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from server.schemas.common import Strict
from server.schemas.masks import AtlasBuilt, CorpusRecord

__all__ = ["AtlasBuildRequest", "AtlasBuilt", "AtlasSummary", "ExpertEntry", "ExpertHit",
           "ExpertSearch"]


class AtlasBuildRequest(Strict):
    """POST /experts/build: route a corpus through the model once and store its atlas."""

    records: list[CorpusRecord] | None = Field(None, min_length=1, max_length=100_000)
    corpus: str | None = Field(None, description="A file under the server's MONET_CORPUS_DIR.",
                               max_length=512)
    top_n: int = Field(16, ge=1, le=64, description="Top contexts kept per expert.")
    top_tokens: int = Field(16, ge=1, le=64, description="Top tokens kept per expert.")
    window: int = Field(32, ge=1, le=256, description="Tokens of text either side of a context.")
    max_length: int = Field(512, ge=2, le=8192, description="Tokens per routed window.")

    @model_validator(mode="after")
    def _one_corpus(self):
        if (self.records is None) == (self.corpus is None):
            raise ValueError("give exactly one of 'records' and 'corpus'")
        return self


class AtlasSummary(BaseModel):
    atlas: str = Field(description="The artifact's name in the mask store.")
    model_id: str
    corpus_fingerprint: str
    num_layers: int
    num_experts: int = Field(description="E, experts per side: composite experts are E x E.")
    routing_layers: list[int]
    labels: list[str]
    label_tokens: list[int] = Field(description="Tokens per label in the corpus.")
    tokens: int
    documents: int
    top_n: int
    top_tokens: int


class Context(BaseModel):
    weight: float
    document: int = Field(description="The text's index in the corpus.")
    position: int = Field(description="The token's position in the text.")
    text: str = Field(description="A window of text around the token.")
    highlight: list[int] = Field(description="[start, end): the token's characters in text.")


class TopToken(BaseModel):
    token_id: int
    text: str
    weight: float = Field(description="Summed routing weight over the corpus.")


class Removal(BaseModel):
    profile: str = Field(description="name@version")
    layers: list[int] = Field(description="The layers of the group where it removes the expert.")


class ExpertEntry(BaseModel):
    layer: int
    routing_layer: int
    layers: list[int] = Field(description="The layers of its routing group (same routing).")
    i: int
    j: int
    expert: int = Field(description="i * E + j")
    mean: float = Field(description="Mean routing weight per corpus token.")
    label_means: dict[str, float]
    contexts: list[Context]
    tokens: list[TopToken]
    removed_by: list[Removal]
    corpus_fingerprint: str


class ExpertHit(BaseModel):
    layer: int = Field(description="The routing layer.")
    layers: list[int]
    i: int
    j: int
    expert: int
    specificity: float = Field(description="(weight + a) / (weight_elsewhere + a), a the "
                               "layer's mean expert weight.")
    weight: float = Field(description="Mean weight on the text or the label.")
    weight_elsewhere: float = Field(description="Corpus mean (text), or the largest mean on "
                                    "another label (label).")


class ExpertSearch(BaseModel):
    by: str = Field(description="'text' or 'label'")
    label: str | None = None
    tokens: int | None = Field(None, description="Tokens of the text (by text).")
    offset: int
    limit: int
    total: int = Field(description="Experts with any weight on the text or the label.")
    experts: list[ExpertHit]
