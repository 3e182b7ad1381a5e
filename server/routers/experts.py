"""/experts: the expert atlas. An expert's entry (top contexts with the token highlighted,
mean weight per corpus label, top tokens, the stored profiles that remove it), the experts most
specific to a text or to a label (paginated), and atlas builds as background jobs."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse

from server.bodies import BodyInThread
from server.deps import AdminKey, GenerateKey, StateDep
from server.errors import ERROR_RESPONSES, ApiError
from server.routers.inspect import model_profiles
from server.routers.jobs import job_out
from server.schemas.atlas import AtlasBuildRequest, AtlasSummary, ExpertEntry, ExpertSearch
from server.schemas.masks import AtlasBuilt, JobOut

__all__ = ["router"]

router = APIRouter(prefix="/experts", tags=["experts"], route_class=BodyInThread)

MAX_QUERY_CHARS = 4096
SEARCH_TOP_K = 256  # experts per token and routing layer asked of the engine (H k^2 have weight)

Offset = Annotated[int, Query(ge=0, le=10_000_000, description="Experts to skip.")]
Limit = Annotated[int, Query(ge=1, le=100, description="Experts per page.")]
Index = Annotated[int, Path(ge=0, le=2**31 - 1)]


@router.get("", response_model=AtlasSummary, responses=ERROR_RESPONSES)
async def summary(_: GenerateKey, state: StateDep) -> dict[str, Any]:
    """The atlas of this model: its shape, corpus and labels (404 when none is built)."""
    atlas = await state.atlas.get()
    return {"atlas": state.atlas.name, "model_id": atlas.model_id,
            "corpus_fingerprint": atlas.corpus_fingerprint, "num_layers": atlas.num_layers,
            "num_experts": atlas.num_experts, "routing_layers": atlas.routing_layers,
            "labels": atlas.labels, "label_tokens": atlas.label_tokens.tolist(),
            "tokens": atlas.tokens, "documents": atlas.documents,
            "top_n": int(atlas.top_weight.shape[-1]), "top_tokens": int(atlas.token_ids.shape[-1])}


@router.get("/search", response_model=ExpertSearch, responses=ERROR_RESPONSES)
async def search(
    _: GenerateKey, state: StateDep,
    q: Annotated[str | None, Query(min_length=1, max_length=MAX_QUERY_CHARS,
                                   description="A text: the experts most specific to it.")] = None,
    label: Annotated[str | None, Query(min_length=1, max_length=128, description="A corpus "
                                       "label: the experts most specific to it.")] = None,
    offset: Offset = 0, limit: Limit = 20,
) -> dict[str, Any]:
    """Experts by specificity: a text's tokens' mean routing weight against each expert's
    corpus mean, or a label's mean against the largest mean on another label."""
    if (q is None) == (label is None):
        raise ApiError(422, "give exactly one of 'q' and 'label'", param="q")
    atlas = await state.atlas.get()
    if label is not None:
        if label not in atlas.labels:
            raise ApiError(404, f"label: {label[:128]!r} is not a label of the atlas's corpus "
                           f"({', '.join(atlas.labels)[:500]})", param="label")
        hits, total = await asyncio.to_thread(atlas.label_specific, label, offset=offset,
                                              limit=limit)
        return {"by": "label", "label": label, "offset": offset, "limit": limit,
                "total": total, "experts": hits}
    engine = state.engine
    ids = engine.tokenizer.encode(q, add_bos=False)
    most = min(state.settings.inspect_max_tokens, engine.max_model_len)
    if not ids or len(ids) > most:
        raise ApiError(400, f"q: {len(ids)} tokens, search takes 1 to {most}", param="q")
    from server.atlas import text_weights

    routing = await engine.routing(ids, top_k=SEARCH_TOP_K)
    weights = text_weights(atlas, routing)
    hits, total = await asyncio.to_thread(atlas.text_specific, weights, offset=offset,
                                          limit=limit)
    return {"by": "text", "tokens": len(ids), "offset": offset, "limit": limit,
            "total": total, "experts": hits}


@router.get("/{layer}/{i}/{j}", response_model=ExpertEntry, responses=ERROR_RESPONSES)
async def expert(layer: Index, i: Index, j: Index, _: GenerateKey,
                 state: StateDep) -> dict[str, Any]:
    """Composite expert (i, j) of `layer` (any layer of a routing group: they share routing)."""
    atlas = await state.atlas.get()
    E = atlas.num_experts
    for name, value, bound in (("layer", layer, atlas.num_layers), ("i", i, E), ("j", j, E)):
        if value >= bound:
            raise ApiError(404, f"{name}: {value} is not in [0, {bound})", param=name)
    entry = atlas.expert(layer, i, j)
    decode = state.engine.tokenizer.decode
    removed = []
    for p in await model_profiles(state, None):
        layers = [l for l in entry["layers"] if (l, i, j) in p.experts]
        if layers:
            removed.append({"profile": f"{p.name}@{p.version}", "layers": layers})
    return {**entry, "layer": layer, "i": i, "j": j, "expert": i * E + j,
            "tokens": [{"token_id": t, "text": decode([t]), "weight": w}
                       for t, w in entry["tokens"]],
            "removed_by": removed, "corpus_fingerprint": atlas.corpus_fingerprint}


@router.post("/build", status_code=202, response_model=JobOut, responses=ERROR_RESPONSES)
async def build(body: AtlasBuildRequest, who: AdminKey, state: StateDep) -> JSONResponse:
    """Build this model's atlas from a corpus in the background (GET /jobs/{id}); it replaces
    the stored one when done."""
    from server.jobs import AtlasBuilder

    builder = state.admin.builder
    if not isinstance(builder, AtlasBuilder):
        raise ApiError(503, "this server cannot build an atlas (no builder configured)")
    corpus = state.admin.corpus_path(body.corpus)
    reader = state.atlas

    def run(job) -> AtlasBuilt:
        job.update(0.0, "routing the corpus")
        atlas = builder.build_atlas(body, corpus=corpus, progress=job.update)
        job.update(0.99, "storing")
        data = atlas.to_bytes()
        digest = state.store.put_artifact(reader.name, data)
        reader.forget()
        return AtlasBuilt(atlas=reader.name, digest=digest, tokens=atlas.tokens,
                          documents=atlas.documents, contexts=len(atlas.context_doc),
                          bytes=len(data))

    job = state.jobs.submit(kind="atlas", profile=reader.name, created_by=who.name, run=run)
    return JSONResponse(job_out(job).model_dump(mode="json"), status_code=202,
                        headers={"Location": f"/jobs/{job.id}"})
