"""The OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions
(the checkpoint's chat template), with scores (logprobs, echo, max_tokens 0) and several
choices (n, prompt lists): server/choices.py runs and answers them.

Mask profiles are models, as vLLM serves LoRA adapters: /v1/models lists the served model and
every stored profile built for it (`parent` = the served model), and `model` may name a profile
(`name`, `name@version`, or `a+b` for their union), so any OpenAI client can ask for an edited
model. The extra body field `mask_profile` does the same; naming profiles both ways is refused
unless the two name the same ones. A profile named through `model` fails closed exactly as
through `mask_profile` (unknown 404, other model 409, store away 503), naming `model`."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from fastapi import APIRouter, Request, Response

from server.bodies import BodyInThread
from server.choices import Choice, check_count, expand, respond
from server.deps import EngineDep, GenerateKey, ProfilesDep, ResolverDep, ServiceDep
from server.engine import Engine
from server.errors import ERROR_RESPONSES, ApiError
from server.generation import GenerationInput, GenerationService
from server.masking import MaskResolver, ProfileRef, parse_refs
from server.routers.generate import sampling, stops
from server.schemas.openai import (
    ChatRequest,
    ChatResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
)
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


def _prompts(service: GenerationService, prompt: str | list) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of each prompt: a text, token ids, or a list of either."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise ApiError(422, "prompt: no prompt", param="prompt")
    ids, texts = [], []
    for n, item in enumerate(prompt):
        param = "prompt" if len(prompt) == 1 else f"prompt[{n}]"
        if isinstance(item, str):
            ids.append(service.prompt_ids(item, None, param=param))
            texts.append(item)
        else:
            ids.append(service.prompt_ids(None, list(item), ids_param=param))
            texts.append(service.engine.tokenizer.decode(ids[-1]))
    return ids, texts


def _input(service: GenerationService, body: Any, ids: list[int],
           requested: tuple[list[ProfileRef], str], *, max_tokens: int | None, param: str,
           logprobs: int | None, prompt_logprobs: int | None = None) -> GenerationInput:
    s = sampling(service, body, len(ids), max_tokens=max_tokens, param=param)
    s = dataclasses.replace(s, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    profiles, profile_param = requested
    return GenerationInput(ids, s, stops(body.stop), profiles, profile_param)


@router.post("/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
async def completions(body: CompletionRequest, request: Request, _: GenerateKey,
                      service: ServiceDep, engine: EngineDep) -> Response:
    """Complete each prompt n times; with logprobs N the scores of every token, with echo the
    prompt's too (max_tokens 0: the prompt alone)."""
    requested = _requested(engine, body)
    scoring = body.max_tokens == 0
    if scoring and not body.echo:
        raise ApiError(422, "max_tokens: 0 only with echo (scoring the prompt)",
                       param="max_tokens")
    prompts, texts = _prompts(service, body.prompt)
    check_count(service, len(prompts), body.n)
    inputs = []
    for ids in prompts:
        # max_tokens 0: the engines generate at least one token, which is dropped
        inp = _input(service, body, ids, requested, max_tokens=1 if scoring else body.max_tokens,
                     param="max_tokens", logprobs=body.logprobs,
                     prompt_logprobs=body.logprobs if body.echo else None)
        inputs += expand(inp, body.n)
    prepared = await service.prepare_choices(inputs, request)
    choices = [Choice(p, n // body.n, texts[n // body.n] if body.echo else None, scoring)
               for n, p in enumerate(prepared)]
    return await respond(service, choices, body, request, chat=False, top=body.logprobs)


@router.post("/chat/completions", response_model=ChatResponse, responses=ERROR_RESPONSES)
async def chat_completions(body: ChatRequest, request: Request, _: GenerateKey,
                           service: ServiceDep, engine: EngineDep) -> Response:
    """The assistant's turn, n times; with logprobs the scores of its tokens (top_logprobs N)."""
    requested = _requested(engine, body)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(422, "top_logprobs: only with logprobs true", param="top_logprobs")
    top = (body.top_logprobs or 0) if body.logprobs else None
    messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                 else "".join(part.text for part in m.content)} for m in body.messages]
    ids = render_chat(engine.tokenizer, messages)
    ids = service.prompt_ids(None, ids, ids_param="messages")
    newer = body.max_completion_tokens  # chat's name for max_tokens
    inp = _input(service, body, ids, requested, max_tokens=newer or body.max_tokens,
                 param="max_completion_tokens" if newer else "max_tokens", logprobs=top)
    check_count(service, 1, body.n)
    prepared = await service.prepare_choices(expand(inp, body.n), request)
    return await respond(service, [Choice(p, 0) for p in prepared], body, request, chat=True,
                         top=top)
