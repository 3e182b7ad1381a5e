"""The OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions
(the checkpoint's chat template).

Mask profiles are models, as vLLM serves LoRA adapters: /v1/models lists the served model and
every stored profile built for it (`parent` = the served model), and `model` may name a profile
(`name`, `name@version`, or `a+b` for their union), so any OpenAI client can ask for an edited
model. The extra body field `mask_profile` does the same; naming profiles both ways is refused
unless the two name the same ones. A profile named through `model` fails closed exactly as
through `mask_profile` (unknown 404, other model 409, store away 503), naming `model`."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server.bodies import BodyInThread
from server.deps import EngineDep, GenerateKey, ProfilesDep, ResolverDep, ServiceDep
from server.engine import Engine
from server.errors import ERROR_RESPONSES, ApiError
from server.generation import ClientGone, GenerationInput, GenerationService, Prepared
from server.masking import MaskResolver, ProfileRef, parse_refs
from server.routers.generate import applied, profile_headers, sampling, stops
from server.schemas.openai import (
    ChatRequest,
    ChatResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
)
from server.sse import sse_response
from server.text import render_chat

__all__ = ["model_profiles", "router"]

router = APIRouter(prefix="/v1", tags=["openai"], route_class=BodyInThread)
STARTED = int(time.time())


def _model_refs(engine: Engine, model: str) -> list[ProfileRef]:
    """The profiles `model` names: none for the served model, else `name`, `name@version` or
    several joined by '+' (their union); 404 naming `model` for anything else."""
    if model == engine.model_name:
        return []
    try:
        return parse_refs(model.split("+"), param="model")
    except ApiError:
        raise ApiError(404, f"model: '{model[:100]}' is not served here (GET /v1/models lists "
                            f"'{engine.model_name}' and its mask profiles)",
                       param="model") from None


async def model_profiles(engine: Engine, resolver: MaskResolver,
                         model: str | None) -> list[ProfileRef]:
    """For endpoints that take `model` but apply no mask (the tokenizer's): the profiles it
    names, each looked up, so that an unknown one is the same 404 as in a completion."""
    refs = [] if model is None else _model_refs(engine, model)
    for ref in refs:
        await resolver.lookup(ref, param="model")
    return refs


def _requested(engine: Engine, body: Any) -> tuple[list[ProfileRef], str]:
    """The profiles a completion asks for and the field that names them."""
    by_model = _model_refs(engine, body.model)
    by_field = parse_refs(body.mask_profile)
    if by_model and by_field and set(by_model) != set(by_field):
        raise ApiError(422, f"model: names mask profiles {'+'.join(map(str, by_model))}, "
                            f"mask_profile names {'+'.join(map(str, by_field))}; name them one "
                            "way, or the same both ways", param="model")
    return (by_model, "model") if by_model else (by_field, "mask_profile")


@router.get("/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def models(_: GenerateKey, engine: EngineDep, admin: ProfilesDep) -> dict[str, Any]:
    """The served model, then every stored profile built for it (latest versions; any kept
    version is served as `name@version`). 503 when the store is away: a partial list would
    pass for the whole one."""
    base = {"id": engine.model_name, "object": "model", "created": STARTED,
            "owned_by": "monet-serve", "root": engine.model_name, "parent": None,
            "max_model_len": engine.max_model_len, "model_identity": engine.model_identity}
    shape = (engine.model_identity, engine.num_layers, engine.num_experts)
    profiles = [{**base, "id": s.name, "created": int(s.created_at.timestamp()),
                 "parent": engine.model_name, "version": s.version,
                 "mask_profile": f"{s.name}@{s.version}"}
                for s in sorted(await admin.list(), key=lambda s: s.name)
                if (s.model_id, s.num_layers, s.num_experts) == shape]
    return {"object": "list", "data": [base, *profiles]}


def _completion_prompt(service: GenerationService, prompt: str | list) -> list[int]:
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise ApiError(422, "prompt: one prompt per request (a list of one text)",
                           param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return service.prompt_ids(prompt, None)
    return service.prompt_ids(None, list(prompt), ids_param="prompt")


async def _run(service: GenerationService, body: Any, ids: list[int], request: Request,
               requested: tuple[list[ProfileRef], str]) -> Prepared:
    newer = getattr(body, "max_completion_tokens", None)  # chat's name for max_tokens
    max_tokens = newer or body.max_tokens
    param = "max_completion_tokens" if newer else "max_tokens"
    profiles, profile_param = requested
    inp = GenerationInput(ids, sampling(service, body, len(ids), max_tokens=max_tokens,
                                        param=param),
                          stops(body.stop), profiles, profile_param)
    return await service.prepare(inp, request)


def _usage(p: Prepared, n: int) -> dict[str, int]:
    prompt = len(p.input.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}


async def _stream(service: GenerationService, p: Prepared, body: Any, *, chat: bool,
                  ) -> AsyncIterator[dict[str, Any]]:
    base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": body.model}
    if chat:
        yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}]}
    n = 0
    async for delta in service.stream(p):
        n += len(delta.token_ids)
        if not delta.text and delta.finish_reason is None:
            continue
        choice: dict[str, Any] = {"index": 0, "logprobs": None,
                                  "finish_reason": delta.finish_reason}
        if chat:
            choice["delta"] = {"content": delta.text} if delta.text else {}
        else:
            choice["text"] = delta.text
        yield {**base, "choices": [choice]}
    if body.stream_options is not None and body.stream_options.include_usage:
        yield {**base, "choices": [], "usage": _usage(p, n), "mask_profiles": applied(p.resolved)}


async def _respond(service: GenerationService, p: Prepared, body: Any, request: Request, *,
                   chat: bool) -> Response:
    headers = profile_headers(p.resolved)
    if body.stream:
        return sse_response(_stream(service, p, body, chat=chat), headers=headers,
                            on_close=p.ticket.release)
    try:
        result = await service.complete(p, request)
    except ClientGone:
        return Response(status_code=499)
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": result.finish_reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": result.text}
    else:
        choice["text"] = result.text
    return JSONResponse({
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()), "model": body.model, "choices": [choice],
        "usage": result.usage, "mask_profiles": applied(p.resolved)}, headers=headers)


@router.post("/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
async def completions(body: CompletionRequest, request: Request, _: GenerateKey,
                      service: ServiceDep, engine: EngineDep) -> Response:
    requested = _requested(engine, body)
    ids = _completion_prompt(service, body.prompt)
    p = await _run(service, body, ids, request, requested)
    return await _respond(service, p, body, request, chat=False)


@router.post("/chat/completions", response_model=ChatResponse, responses=ERROR_RESPONSES)
async def chat_completions(body: ChatRequest, request: Request, _: GenerateKey,
                           service: ServiceDep, engine: EngineDep) -> Response:
    requested = _requested(engine, body)
    messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                 else "".join(part.text for part in m.content)} for m in body.messages]
    ids = render_chat(engine.tokenizer, messages)
    ids = service.prompt_ids(None, ids, ids_param="messages")
    p = await _run(service, body, ids, request, requested)
    return await _respond(service, p, body, request, chat=True)
