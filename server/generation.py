"""One generation, whatever the endpoint: limits, admission, mask resolution, the engine's
token stream turned into text (stop strings cut), metrics and the generation log line.

    prepared = await service.prepare(GenerationInput(...), request)   # 4xx / 429 / 503 here
    async for delta in service.stream(prepared): ...                  # or:
    result = await service.complete(prepared, request)                # aborts on disconnect

Several choices (n samples, several prompts) are prepared together (`prepare_choices`): one
mask resolution, one admission ticket per choice (each is an engine request), all or none.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from server.engine import (
    Engine,
    EngineRequest,
    Sampling,
    TokenEvent,
    TokenLogprobs,
    error_status,
)
from server.errors import ApiError
from server.logs import REQUEST_ID, log_event
from server.masking import MaskResolver, ProfileRef, ResolvedMask
from server.metrics import Metrics
from server.settings import Settings
from server.text import Detokenizer

__all__ = ["ClientGone", "Delta", "GenerationInput", "GenerationService", "Prepared", "Result"]


class ClientGone(Exception):
    """The client disconnected; its generation was aborted."""


@dataclass(slots=True)
class GenerationInput:
    prompt_ids: list[int]
    sampling: Sampling
    stop: tuple[str, ...] = ()
    profiles: list[ProfileRef] = field(default_factory=list)
    profile_param: str = "mask_profile"


@dataclass(slots=True)
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token_ids entry
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # the first delta only


@dataclass(slots=True)
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def usage(self) -> dict[str, int]:
        n = len(self.token_ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n,
                "total_tokens": self.prompt_tokens + n}


class Admission:
    """At most `limit` generation requests in flight (running, waiting or streaming)."""

    def __init__(self, limit: int, metrics: Metrics):
        self.limit, self.metrics = limit, metrics
        self.count = 0
        self.draining = False

    def acquire(self) -> Ticket:
        if self.draining:
            raise ApiError(503, "the server is shutting down", headers={"Retry-After": "5"})
        if self.count >= self.limit:
            self.metrics.rejected.labels("concurrency").inc()
            raise ApiError(429, f"too many concurrent requests (limit {self.limit}); retry",
                           headers={"Retry-After": "1"})
        self.count += 1
        self.metrics.in_flight.inc()
        return Ticket(self)


class Ticket:
    def __init__(self, admission: Admission):
        self._admission: Admission | None = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission.count -= 1
            self._admission.metrics.in_flight.dec()
            self._admission = None


@dataclass(slots=True)
class Prepared:
    request_id: str
    input: GenerationInput
    resolved: ResolvedMask
    ticket: Ticket
    arrival: float


async def _api_errors(events: AsyncIterator[TokenEvent]) -> AsyncIterator[TokenEvent]:
    """The engine's events; an EngineError (the request's own input, a closing engine) becomes
    the ApiError of its status, naming the field."""
    try:
        async for event in events:
            yield event
    except Exception as e:
        known = error_status(e)
        if known is None:
            raise
        status, param = known
        message = str(e)
        raise ApiError(status, message if len(message) <= 300 else message[:300] + "...",
                       param=param,
                       headers={"Retry-After": "5"} if status == 503 else None) from e


class GenerationService:
    def __init__(self, engine: Engine, resolver: MaskResolver, metrics: Metrics,
                 settings: Settings):
        self.engine, self.resolver, self.metrics = engine, resolver, metrics
        self.settings = settings
        self.admission = Admission(settings.max_concurrent_requests, metrics)
        self.running: set[str] = set()  # engine request ids of the generations in flight

    # ---- input ---------------------------------------------------------------------------
    def prompt_ids(self, text: str | None, ids: list[int] | None, *, param: str = "prompt",
                   ids_param: str = "prompt_token_ids") -> list[int]:
        """Token ids of a text or checked ids; exactly one of the two. 4xx naming the field."""
        if (text is None) == (ids is None):
            raise ApiError(422, f"give exactly one of '{param}' and '{ids_param}'", param=param)
        if ids is None:
            ids = self.engine.tokenizer.encode(text)
        else:
            param = ids_param
            bad = next((t for t in ids if not 0 <= t < self.engine.vocab_size), None)
            if bad is not None:
                raise ApiError(422, f"{param}: token id {bad} is outside the vocabulary "
                                    f"[0, {self.engine.vocab_size})", param=param)
        if not ids:
            raise ApiError(422, f"{param}: the prompt is empty", param=param)
        limit = min(self.settings.max_prompt_tokens, self.engine.max_model_len - 1)
        if len(ids) > limit:
            raise ApiError(400, f"{param}: {len(ids)} tokens, the limit is {limit}", param=param)
        return ids

    def max_tokens(self, requested: int | None, prompt_len: int, *,
                   param: str = "max_tokens") -> int:
        room = self.engine.max_model_len - prompt_len
        if requested is None:
            return max(1, min(self.settings.max_tokens, room))
        if requested > self.settings.max_tokens:
            raise ApiError(422, f"{param}: {requested} is above this server's limit of "
                                f"{self.settings.max_tokens}", param=param)
        if requested > room:
            raise ApiError(400, f"{param}: the prompt ({prompt_len} tokens) plus {param} "
                                f"({requested}) exceeds the model's {self.engine.max_model_len} "
                                "positions", param=param)
        return requested

    # ---- running ---------------------------------------------------------------------------
    async def prepare(self, inp: GenerationInput, request: Request) -> Prepared:
        """Admit the request and resolve its mask (ApiError: 4xx, 429, 503)."""
        return (await self.prepare_choices([inp], request))[0]

    async def prepare_choices(self, inputs: list[GenerationInput],
                              request: Request) -> list[Prepared]:
        """Admit every choice of one request (a ticket each, all or none) and resolve their
        mask once: they name the same profiles (the first input's)."""
        state = request.scope.setdefault("state", {})
        arrival = state.get("monet_arrival", time.monotonic())
        first = inputs[0]
        # until resolved, never the requested names (unbounded): they may not exist
        masked = bool(first.profiles or self.resolver.default)
        state["monet_profile_label"] = "unknown" if masked else "none"
        tickets: list[Ticket] = []
        try:
            for _ in inputs:
                tickets.append(self.admission.acquire())
            resolved = await self.resolver.resolve(first.profiles, param=first.profile_param)
        except BaseException:
            for ticket in tickets:
                ticket.release()
            raise
        state["monet_profiles"] = resolved
        base = f"{REQUEST_ID.get() or 'req'}-{uuid.uuid4().hex[:6]}"
        return [Prepared(base if len(inputs) == 1 else f"{base}-{n}", inp, resolved, ticket,
                         arrival) for n, (inp, ticket) in enumerate(zip(inputs, tickets))]

    async def abort_running(self) -> int:
        """Abort every generation in flight (the drain's deadline): each ends cleanly, with
        finish_reason "abort". How many there were."""
        ids = list(self.running)
        for request_id in ids:
            await self.engine.abort(request_id)
        return len(ids)

    async def stream(self, p: Prepared) -> AsyncIterator[Delta]:
        """Text deltas; the last one has the finish reason. Releases the admission ticket."""
        detok = Detokenizer(self.engine.tokenizer, p.input.stop)
        request = EngineRequest(p.request_id, p.input.prompt_ids, p.input.sampling,
                                p.resolved.spec)
        events = self.engine.stream(request)
        checked = _api_errors(events)
        reason, last, first_at = "abort", None, None
        self.running.add(p.request_id)
        try:
            async for event in checked:
                now = time.monotonic()
                if event.queue_time is not None:
                    self.metrics.queue_time.observe(event.queue_time)
                delta = Delta("", [], None)
                if event.prompt_logprobs is not None:
                    delta.prompt_logprobs = list(event.prompt_logprobs)
                if event.token_id >= 0:
                    if first_at is None:
                        first_at = now
                        self.metrics.ttft.observe(now - p.arrival)
                    else:
                        self.metrics.itl.observe(now - last)
                    last = now
                    delta.token_ids.append(event.token_id)
                    if event.logprobs is not None:
                        delta.logprobs.append(event.logprobs)
                    delta.text = detok.add(event.token_id)
                if detok.stopped:
                    delta.finish_reason = reason = "stop"
                    yield delta
                    break
                if event.finish_reason is not None:
                    reason = event.finish_reason
                    delta.text += detok.flush()
                    delta.finish_reason = reason
                    yield delta
                    break
                if delta.token_ids or delta.prompt_logprobs is not None:
                    yield delta
        finally:  # bookkeeping first: under cancellation the await below may not return
            self.running.discard(p.request_id)
            p.ticket.release()
            self._record(p, detok, reason, first_at)
            await checked.aclose()
            await events.aclose()  # aborts the request if it is still running

    def _record(self, p: Prepared, detok: Detokenizer, reason: str, first_at) -> None:
        n = len(detok.token_ids)
        self.metrics.prompt_tokens.inc(len(p.input.prompt_ids))
        self.metrics.generation_tokens.inc(n)
        self.metrics.request_success.labels(reason).inc()
        e2e = time.monotonic() - p.arrival
        self.metrics.e2e.observe(e2e)
        log_event("monet.server", "generation", engine_request=p.request_id,
                  profiles=[str(a) for a in p.resolved.profiles],
                  prompt_tokens=len(p.input.prompt_ids), completion_tokens=n,
                  finish_reason=reason, e2e_s=round(e2e, 4),
                  ttft_s=None if first_at is None else round(first_at - p.arrival, 4))

    async def complete(self, p: Prepared, request: Request | None = None,
                       poll_s: float = 0.25) -> Result:
        """The whole generation; ClientGone (and the request aborted) if the client leaves."""
        async def collect() -> Result:
            out = Result("", [], "length", len(p.input.prompt_ids))
            text = []
            async for delta in self.stream(p):
                text.append(delta.text)
                out.token_ids.extend(delta.token_ids)
                out.logprobs.extend(delta.logprobs)
                if delta.prompt_logprobs is not None:
                    out.prompt_logprobs = delta.prompt_logprobs
                out.finish_reason = delta.finish_reason or out.finish_reason
            out.text = "".join(text)
            return out

        task = asyncio.create_task(collect())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=poll_s)
                if done:
                    return task.result()
                if request is not None and await request.is_disconnected():
                    raise ClientGone()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            p.ticket.release()  # in case the task was cancelled before it started
