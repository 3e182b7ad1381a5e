"""POST /generate: text or token ids in, text and token ids out, with mask profiles."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server.bodies import BodyInThread
from server.deps import GenerateKey, ServiceDep
from server.engine import Sampling
from server.errors import ERROR_RESPONSES, ApiError
from server.generation import ClientGone, GenerationInput, GenerationService, Prepared
from server.masking import ResolvedMask, parse_refs
from server.schemas.generate import GenerateChunk, GenerateRequest, GenerateResponse
from server.sse import sse_response

__all__ = ["applied", "profile_headers", "router", "sampling", "stops"]

router = APIRouter(tags=["generate"], route_class=BodyInThread)
PROFILES_HEADER = "X-Monet-Mask-Profiles"
SAMPLING_EPS = 1e-5  # below this a temperature is greedy (as vLLM)


def stops(value: str | list[str] | None, *, param: str = "stop") -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else list(value or [])
    if len(items) > 16:
        raise ApiError(422, f"{param}: at most 16 stop strings", param=param)
    return tuple(s for s in items if s)


def sampling(service: GenerationService, body: Any, prompt_len: int, *,
             max_tokens: int | None, param: str = "max_tokens") -> Sampling:
    temperature = 0.0 if body.temperature < SAMPLING_EPS else body.temperature
    return Sampling(max_tokens=service.max_tokens(max_tokens, prompt_len, param=param),
                    temperature=temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
                    seed=body.seed, ignore_eos=body.ignore_eos)


def applied(resolved: ResolvedMask) -> list[dict[str, Any]]:
    return [{"name": p.name, "version": p.version, "default": p.default, "digest": p.digest}
            for p in resolved.profiles]


def profile_headers(resolved: ResolvedMask) -> dict[str, str]:
    return {PROFILES_HEADER: resolved.header} if resolved.profiles else {}


async def _chunks(service: GenerationService, p: Prepared) -> AsyncIterator[dict[str, Any]]:
    n = 0
    async for delta in service.stream(p):
        n += len(delta.token_ids)
        chunk: dict[str, Any] = {"text": delta.text, "token_ids": delta.token_ids,
                                 "finish_reason": delta.finish_reason}
        if delta.finish_reason is not None:
            prompt = len(p.input.prompt_ids)
            chunk["usage"] = {"prompt_tokens": prompt, "completion_tokens": n,
                              "total_tokens": prompt + n}
            chunk["mask_profiles"] = applied(p.resolved)
        yield chunk


@router.post("/generate", response_model=GenerateResponse,
             responses={**ERROR_RESPONSES, 200: {
                 "description": "The generation, or with stream=true server-sent events "
                                "(GenerateChunk per event, then [DONE]).",
                 "content": {"text/event-stream": {"schema": GenerateChunk.model_json_schema()}},
                 "headers": {PROFILES_HEADER: {"description": "Applied profiles: name@version,..",
                                               "schema": {"type": "string"}}}}})
async def generate(body: GenerateRequest, request: Request, _: GenerateKey,
                   service: ServiceDep) -> Response:
    """Generate from a prompt, with the union of the requested mask profiles applied."""
    ids = service.prompt_ids(body.prompt, body.prompt_token_ids)
    inp = GenerationInput(ids, sampling(service, body, len(ids), max_tokens=body.max_tokens),
                          stops(body.stop), parse_refs(body.mask_profile))
    prepared = await service.prepare(inp, request)
    headers = profile_headers(prepared.resolved)
    if body.stream:
        return sse_response(_chunks(service, prepared), headers=headers,
                            on_close=prepared.ticket.release)
    try:
        result = await service.complete(prepared, request)
    except ClientGone:
        return Response(status_code=499)
    out = {"text": result.text, "token_ids": result.token_ids,
           "finish_reason": result.finish_reason, "usage": result.usage,
           "mask_profiles": applied(prepared.resolved)}
    return JSONResponse(out, headers=headers)
