"""POST /tokenize, POST /detokenize, GET /tokenizer_info, as vLLM's OpenAI server serves them:
the engine's tokenizer over HTTP, for clients that count or cut tokens remotely (lm-eval's
`tokenizer_backend=remote`). Generate scope, strict bodies and the body size limit, as
/generate; the work runs in a thread (a long text takes a while to encode)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter

from server.bodies import BodyInThread
from server.deps import EngineDep, GenerateKey, ResolverDep
from server.engine import Engine, Tokenizer
from server.errors import ERROR_RESPONSES, ApiError
from server.routers.openai import model_profiles
from server.schemas.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from server.text import DEFAULT_CHAT_TEMPLATE, render_chat

__all__ = ["router", "tokenizer_info"]

router = APIRouter(tags=["tokenizer"], route_class=BodyInThread)


def _tokenize(engine: Engine, body: TokenizeRequest) -> dict[str, Any]:
    tok = engine.tokenizer
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(422, "give exactly one of 'prompt' and 'messages'", param="prompt")
    if body.messages is not None:
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                     else "".join(part.text for part in m.content)} for m in body.messages]
        ids = render_chat(tok, messages, add_generation_prompt=body.add_generation_prompt,
                          add_bos=body.add_special_tokens)
    else:
        ids = tok.encode(body.prompt, add_bos=body.add_special_tokens)
    out: dict[str, Any] = {"count": len(ids), "max_model_len": engine.max_model_len,
                           "tokens": ids, "token_strs": None}
    if body.return_token_strs:
        out["token_strs"] = [tok.token_str(t) for t in ids]
    return out


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
async def tokenize(body: TokenizeRequest, _: GenerateKey, engine: EngineDep,
                   resolver: ResolverDep) -> dict[str, Any]:
    """A text's (or a conversation's) token ids, as the generation endpoints would run them."""
    await model_profiles(engine, resolver, body.model)
    return await asyncio.to_thread(_tokenize, engine, body)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
async def detokenize(body: DetokenizeRequest, _: GenerateKey, engine: EngineDep,
                     resolver: ResolverDep) -> dict[str, str]:
    """Token ids back to text (special tokens dropped)."""
    await model_profiles(engine, resolver, body.model)
    bad = next((n for n, t in enumerate(body.tokens) if t >= engine.vocab_size), None)
    if bad is not None:
        raise ApiError(422, f"tokens[{bad}]: token id {body.tokens[bad]} is outside the "
                            f"vocabulary [0, {engine.vocab_size})", param=f"tokens[{bad}]")
    return {"prompt": await asyncio.to_thread(engine.tokenizer.decode, body.tokens)}


def _special(tok: Tokenizer, token_id: int | None) -> str | None:
    """The special token's string, if encoding it gives back exactly its id."""
    if token_id is None:
        return None
    text = tok.token_str(token_id)
    return text if text and tok.encode(text, add_bos=False) == [token_id] else None


def tokenizer_info(engine: Engine) -> dict[str, Any]:
    tok = engine.tokenizer
    eos_id = tok.eos_ids[0] if tok.eos_ids else None
    return {"tokenizer_class": type(tok).__name__,
            "bos_token": _special(tok, tok.bos_id), "eos_token": _special(tok, eos_id),
            "bos_token_id": tok.bos_id, "eos_token_id": eos_id,
            "model_max_length": engine.max_model_len, "vocab_size": engine.vocab_size,
            "chat_template": tok.chat_template or DEFAULT_CHAT_TEMPLATE}


@router.get("/tokenizer_info", response_model=TokenizerInfo, responses=ERROR_RESPONSES)
async def get_tokenizer_info(_: GenerateKey, engine: EngineDep) -> dict[str, Any]:
    """The tokenizer's configuration (tokenizer_config.json's fields, as vLLM serves them)."""
    return tokenizer_info(engine)
