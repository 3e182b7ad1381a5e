"""POST /inspect: the routing of a text, per token the top composite experts by weight, and
which stored profiles would remove them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from server.bodies import BodyInThread
from server.deps import GenerateKey, StateDep
from server.errors import ERROR_RESPONSES, ApiError
from server.masking import ProfileRef, parse_refs
from server.schemas.masks import InspectRequest, InspectResponse

__all__ = ["model_profiles", "router"]

router = APIRouter(tags=["inspect"], route_class=BodyInThread)
MAX_PROFILES = 64


async def model_profiles(state, requested: list[str] | None) -> list:
    """The requested profiles, or every stored profile of this model (the first MAX_PROFILES)."""
    if requested is not None:
        refs = parse_refs(requested, param="profiles")
        return [await state.resolver.lookup(ref, param="profiles") for ref in refs]
    identity = state.engine.model_identity
    summaries = [s for s in await state.admin.list() if s.model_id == identity]
    found = []
    for s in sorted(summaries, key=lambda s: s.name)[:MAX_PROFILES]:
        try:
            found.append(await state.resolver.lookup(ProfileRef(s.name), param="profiles"))
        except ApiError as e:
            if e.status != 404:  # deleted meanwhile: skip; anything else: fail
                raise
    return found


@router.post("/inspect", response_model=InspectResponse, responses=ERROR_RESPONSES)
async def inspect(body: InspectRequest, _: GenerateKey, state: StateDep) -> dict[str, Any]:
    engine = state.engine
    if (body.text is None) == (body.prompt_token_ids is None):
        raise ApiError(422, "give exactly one of 'text' and 'prompt_token_ids'", param="text")
    param = "text" if body.text is not None else "prompt_token_ids"
    ids = (engine.tokenizer.encode(body.text, add_bos=body.add_bos) if body.text is not None
           else list(body.prompt_token_ids))
    limit = min(state.settings.inspect_max_tokens, engine.max_model_len)
    if not ids or len(ids) > limit:
        raise ApiError(400, f"{param}: {len(ids)} tokens, inspect takes 1 to {limit}",
                       param=param)
    bad = next((t for t in ids if t >= engine.vocab_size), None)
    if bad is not None:
        raise ApiError(422, f"{param}: token id {bad} is outside the vocabulary", param=param)
    profiles = await model_profiles(state, body.profiles)
    routing = await engine.routing(ids, top_k=body.top_k)
    E = engine.num_experts
    tokens = []
    for position, (token_id, experts) in enumerate(zip(ids, routing)):
        tokens.append({
            "position": position, "token_id": token_id,
            "text": engine.tokenizer.decode([token_id]),
            "experts": [{
                "layer": e.layer, "layers": list(e.layers), "i": e.i, "j": e.j,
                "expert": e.i * E + e.j, "weight": e.weight,
                "removed_by": [f"{p.name}@{p.version}" for p in profiles
                               if any((l, e.i, e.j) in p.experts for l in e.layers)],
            } for e in experts]})
    return {"tokens": tokens, "profiles": [f"{p.name}@{p.version}" for p in profiles]}
