"""The choices of one OpenAI request: every prompt times `n` samples, each its own engine
request (sample i seeded with seed + i), run together, answered as one response or one
stream (chunks of the choices interleaved, each naming its index, as OpenAI's).

With `echo` a completion choice starts with its prompt (text, and with logprobs the prompt's
scores); `max_tokens` 0 with echo scores the prompt alone: the engine generates one token,
which the answer leaves out. Choice i * n + k is prompt i's sample k. When one choice fails the
others are aborted and the request answers with that failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from server.errors import ApiError
from server.generation import ClientGone, Delta, GenerationInput, GenerationService, Prepared
from server.logprobs import ChatLogprobs, CompletionLogprobs, join
from server.routers.generate import applied, profile_headers
from server.sse import sse_response

__all__ = ["Choice", "check_count", "expand", "respond"]


@dataclass(slots=True)
class Choice:
    prepared: Prepared
    prompt: int  # which prompt of the request
    echo: str | None = None  # the prompt's text, when echoed
    scoring: bool = False  # max_tokens 0: the engine's one token is not part of the answer


def check_count(service: GenerationService, prompts: int, n: int) -> None:
    """422 naming n for more choices than the server ever runs at once (never admitted)."""
    limit = service.settings.max_concurrent_requests
    if prompts * n > limit:
        raise ApiError(422, f"n: {prompts} prompt(s) x n={n} is {prompts * n} choices; this "
                            f"server runs at most {limit} at once", param="n")


def expand(inp: GenerationInput, n: int) -> list[GenerationInput]:
    """n samples of one prompt; sample k of a seeded request gets seed + k."""
    seed = inp.sampling.seed
    return [dataclasses.replace(inp, sampling=dataclasses.replace(
        inp.sampling, seed=None if seed is None else (seed + k) % 2**63)) for k in range(n)]


async def _complete_all(service: GenerationService, choices: list[Choice], request: Request):
    tasks = [asyncio.create_task(service.complete(c.prepared, request)) for c in choices]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:  # the first failure in choice order
            if task.done() and task.exception() is not None:
                raise task.exception()
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _release(choices: list[Choice]) -> None:
    for c in choices:
        c.prepared.ticket.release()


class _Formatter:
    """Per choice: its text and scores, delta by delta."""

    def __init__(self, service: GenerationService, choice: Choice, *, chat: bool,
                 top: int | None):
        tok = service.engine.tokenizer
        self.choice, self.chat, self.top = choice, chat, top
        self.scores = (None if top is None else
                       ChatLogprobs(tok, top) if chat else CompletionLogprobs(tok, top))
        self.started = False
        self.tokens = 0

    def delta(self, d: Delta) -> tuple[str, Any]:
        """(text, logprobs) of one delta; the first carries the echoed prompt."""
        ids, scores, text = d.token_ids, d.logprobs, d.text
        if self.choice.scoring:
            ids, scores, text = [], [], ""
        self.tokens += len(ids)
        parts = []
        if not self.started:
            self.started = True
            if self.choice.echo is not None:
                text = self.choice.echo + text
                if self.scores is not None:
                    prompt = self.choice.prepared.input.prompt_ids
                    parts.append(self.scores.part(prompt, d.prompt_logprobs
                                                  or [None] * len(prompt)))
        if self.scores is None:
            return text, None
        if self.chat:
            return text, self.scores.part(ids, scores)
        parts.append(self.scores.part(ids, scores))
        return text, join(parts)


def _usage(choices: list[Choice], formatters: list[_Formatter]) -> dict[str, int]:
    prompts = {c.prompt: len(c.prepared.input.prompt_ids)
               for c in choices}  # a prompt's n samples count it once, as vLLM
    prompt = sum(prompts.values())
    completion = sum(f.tokens for f in formatters)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


async def _merged(service: GenerationService,
                  choices: list[Choice]) -> AsyncIterator[tuple[int, Delta]]:
    """Every choice's deltas as they come, with the choice's index."""
    if len(choices) == 1:
        async for d in service.stream(choices[0].prepared):
            yield 0, d
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, choice: Choice) -> None:
        try:
            async for d in service.stream(choice.prepared):
                await queue.put((index, d))
            await queue.put((index, None))
        except BaseException as e:  # noqa: BLE001 - the consumer raises it
            await queue.put((index, e))

    tasks = [asyncio.create_task(pump(i, c)) for i, c in enumerate(choices)]
    try:
        left = len(tasks)
        while left:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                left -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _stream(service: GenerationService, choices: list[Choice], body: Any, *, chat: bool,
                  top: int | None) -> AsyncIterator[dict[str, Any]]:
    base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": body.model}
    formatters = [_Formatter(service, c, chat=chat, top=top) for c in choices]
    if chat:
        yield {**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}
                                   for i in range(len(choices))]}
    async for index, d in _merged(service, choices):
        text, scores = formatters[index].delta(d)
        if not text and scores is None and d.finish_reason is None:
            continue
        reason = d.finish_reason and ("length" if choices[index].scoring else d.finish_reason)
        choice: dict[str, Any] = {"index": index, "logprobs": scores, "finish_reason": reason}
        if chat:
            choice["delta"] = {"content": text} if text else {}
        else:
            choice["text"] = text
        yield {**base, "choices": [choice]}
    if body.stream_options is not None and body.stream_options.include_usage:
        yield {**base, "choices": [], "usage": _usage(choices, formatters),
               "mask_profiles": applied(choices[0].prepared.resolved)}


async def respond(service: GenerationService, choices: list[Choice], body: Any,
                  request: Request, *, chat: bool, top: int | None) -> Response:
    """The choices as one JSON response, or as server-sent events with stream=true."""
    resolved = choices[0].prepared.resolved
    headers = profile_headers(resolved)
    if body.stream:
        return sse_response(_stream(service, choices, body, chat=chat, top=top),
                            headers=headers, on_close=lambda: _release(choices))
    try:
        results = await _complete_all(service, choices, request)
    except ClientGone:
        return Response(status_code=499)
    formatters = [_Formatter(service, c, chat=chat, top=top) for c in choices]
    out = []
    for index, (result, f) in enumerate(zip(results, formatters)):
        d = Delta(result.text, result.token_ids, result.finish_reason, result.logprobs,
                  result.prompt_logprobs)
        text, scores = f.delta(d)
        choice: dict[str, Any] = {"index": index, "logprobs": scores,
                                  "finish_reason": "length" if f.choice.scoring
                                  else result.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        out.append(choice)
    return JSONResponse({
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()), "model": body.model, "choices": out,
        "usage": _usage(choices, formatters), "mask_profiles": applied(resolved)},
        headers=headers)
