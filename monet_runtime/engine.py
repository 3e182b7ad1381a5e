"""The serving engine on the plain-PyTorch runtime: batches of requests, each with its own mask.

A worker thread takes every pending request (up to `max_batch_size`) and steps them together
through `stream_generate`; requests that arrive while a batch runs join the next batch. One
request's failure fails only that request: a row whose sampling fails leaves the batch, and if
the batch fails as a whole its unfinished rows go on in halves, from where they got to, until
the failing row fails alone. Each
token goes back to its caller's asyncio queue (`call_soon_threadsafe`), so `stream()` is an
async iterator; closing it early sets the row's abort flag, which `should_abort` reads at the
next decode step. Implements server.engine.Engine structurally (this package never imports
the server).

Legend: T tokens, H routing heads, E experts per side.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import kernels
from kernels.sparse import SPARSE_MIN_EXPERTS
from monet_runtime.generation import (
    GenerationRequest,
    SamplingParams,
    seeded_generator,
    stream_generate,
)
from monet_runtime.model import MonetForCausalLM
from monet_runtime.serving import (
    EngineClosed,
    InvalidRequest,
    RoutedExpert,
    StepOutput,
    check_prompt,
    invalid_request,
)

__all__ = ["EngineClosed", "InvalidRequest", "RoutedExpert", "RuntimeEngine", "StepOutput",
           "runtime_sampling", "top_composite_experts"]


@dataclass(eq=False, slots=True)
class _Job:
    request: Any  # server.engine.EngineRequest (structurally)
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    submitted: float = field(default_factory=time.monotonic)
    aborted: bool = False
    finished: bool = False  # the caller saw the last event
    generator: Any = None  # torch.Generator for sampling, kept across a retry
    produced: list[int] = field(default_factory=list)  # tokens delivered
    settled: bool = False  # the engine delivered the last event (or an error)
    started: bool = False  # the first event went out (it carries the queue time)

    def deliver(self, item: StepOutput | BaseException) -> None:
        self.settled = self.settled or isinstance(item, BaseException) or (
            item.finish_reason is not None)
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is gone: nobody is listening
            self.aborted = True


def runtime_sampling(sampling) -> SamplingParams:
    """server.engine.Sampling as the runtime's SamplingParams; InvalidRequest naming the
    server's field for a value the runtime refuses."""
    greedy = sampling.temperature == 0
    try:
        return SamplingParams(
            max_new_tokens=sampling.max_tokens, do_sample=not greedy,
            temperature=1.0 if greedy else sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k, seed=sampling.seed, ignore_eos=sampling.ignore_eos,
            logprobs=sampling.logprobs, prompt_logprobs=sampling.prompt_logprobs)
    except ValueError as e:  # SamplingParams names its field
        raise invalid_request(e, aliases={"max_new_tokens": "max_tokens"}) from None


class RuntimeEngine:
    """MONET on monet_runtime: one worker thread, static batches, per-row masks."""

    def __init__(self, model: MonetForCausalLM, *, name: str = "monet", max_batch_size: int = 16,
                 max_model_len: int | None = None):
        """max_model_len: prompt plus generated tokens per request (default: the model's
        positions, the most it may be)."""
        if model.tokenizer is None:
            raise ValueError("the model has no tokenizer: load it with tokenizer=True")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        c = model.config
        positions = c.max_position_embeddings
        if max_model_len is not None and not 2 <= max_model_len <= positions:
            raise ValueError(f"max_model_len must be in [2, {positions}] (the model's "
                             f"positions), got {max_model_len}")
        self.model = model
        self.tokenizer = model.tokenizer
        self.model_name = name
        self.model_identity = model.identity
        self.num_layers, self.num_experts = c.num_hidden_layers, c.moe_experts
        self.vocab_size, self.max_model_len = c.vocab_size, max_model_len or positions
        self.max_batch_size = max_batch_size
        # no request compiles a CPU loop
        kernels.prepare(model.device, model.dtype, sparse=c.moe_experts >= SPARSE_MIN_EXPERTS)
        self._pending: deque[_Job] = deque()
        self._jobs: dict[str, _Job] = {}
        self._running = 0
        self._closing = False
        self._cond = threading.Condition()
        self._inspect_lock = threading.Lock()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="monet-engine", daemon=True)
        self._thread.start()

    # ---- requests ----------------------------------------------------------------------
    async def stream(self, request) -> AsyncIterator[StepOutput]:
        # InvalidRequest on a bad prompt or sampling, before queueing
        check_prompt(request.prompt_ids, request.sampling.max_tokens,
                     vocab_size=self.vocab_size, max_model_len=self.max_model_len)
        params = runtime_sampling(request.sampling)
        job = _Job(request, params, asyncio.get_running_loop(), asyncio.Queue())
        with self._cond:
            if self._closing:
                raise EngineClosed("the engine is shutting down")
            self._pending.append(job)
            self._jobs[request.request_id] = job
            self._cond.notify()
        try:
            while True:
                item = await job.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    job.finished = True
                    return
        finally:
            job.aborted = not job.finished
            with self._cond:
                self._jobs.pop(request.request_id, None)

    async def abort(self, request_id: str) -> None:
        """A running row ends at its next step; a waiting one at once (finish_reason abort)."""
        job = self._jobs.get(request_id)
        if job is None:
            return
        job.aborted = True
        with self._cond:
            waiting = job in self._pending
            if waiting:
                self._pending.remove(job)
        if waiting:
            job.deliver(StepOutput(-1, "abort", time.monotonic() - job.submitted))

    def load(self) -> tuple[int, int]:
        with self._cond:
            return self._running, len(self._pending)

    def metric_families(self) -> Iterable[Any]:
        return ()  # the server's monet_ metrics cover this engine

    # ---- the worker --------------------------------------------------------------------
    def _next_batch(self) -> list[_Job] | None:
        with self._cond:
            while not self._pending and not self._closing:
                self._cond.wait()
            batch = []
            while self._pending and len(batch) < self.max_batch_size:
                job = self._pending.popleft()
                if not job.aborted:
                    batch.append(job)
            if not batch and self._closing and not self._pending:
                return None
            self._running = len(batch)
            return batch

    def _work(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                if batch:
                    self._run(batch)
                with self._cond:
                    self._running = 0
        except BaseException as e:  # keep health() honest
            self._error = e
            raise

    def _run(self, batch: list[_Job]) -> None:
        started = time.monotonic()
        for job in batch:
            job.generator = seeded_generator(job.params.seed)
        self._run_isolated(batch, started)

    def _run_isolated(self, jobs: list[_Job], started: float) -> None:
        """Step the jobs together; when that fails as a whole, go on with the unfinished ones in
        halves, each from where it got to (its tokens so far, its generator), so that only a
        job that fails alone gets the error."""
        try:
            self._step(jobs, started)
        except Exception as e:  # noqa: BLE001 - the culprit gets it
            rest = [job for job in jobs if not job.settled]
            if len(jobs) == 1:
                for job in rest:
                    job.deliver(e)
                return
            half = (len(rest) + 1) // 2
            for part in (rest[:half], rest[half:]):
                if part:
                    self._run_isolated(part, started)

    def _step(self, jobs: list[_Job], started: float) -> None:
        requests = []
        for job in jobs:
            left = job.params.max_new_tokens - len(job.produced)
            # a retry goes on from the tokens so far: its prompt scores went out already
            prompt_logprobs = None if job.started else job.params.prompt_logprobs
            requests.append(GenerationRequest(
                [*job.request.prompt_ids, *job.produced],
                dataclasses.replace(job.params, max_new_tokens=left,
                                    prompt_logprobs=prompt_logprobs),
                job.request.mask.mask if job.request.mask else None, job.generator))
        for events in stream_generate(self.model, requests,
                                      should_abort=lambda row: jobs[row].aborted):
            for e in events:
                job = jobs[e.row]
                if e.error is not None:
                    job.deliver(e.error)
                    continue
                queued = None if job.started else started - job.submitted
                job.started = True
                if e.token_id >= 0:
                    job.produced.append(e.token_id)
                job.deliver(StepOutput(e.token_id, e.finish_reason, queued, e.logprobs,
                                       e.prompt_logprobs))

    # ---- routing, health, shutdown -----------------------------------------------------
    async def routing(self, prompt_ids: Sequence[int], *, top_k: int) -> list[list[RoutedExpert]]:
        ids = list(prompt_ids)
        check_prompt(ids, 0, vocab_size=self.vocab_size, max_model_len=self.max_model_len)

        def run():
            with self._inspect_lock, torch.inference_mode():
                x = torch.tensor([ids], device=self.model.device)
                probs = self.model(x, output_router_probs=True).router_probs
                return top_composite_experts({l: (g1[0], g2[0]) for l, (g1, g2) in probs.items()},
                                             groups=self.model.config.moe_groups,
                                             num_layers=self.num_layers, top_k=top_k)

        return await asyncio.to_thread(run)

    async def health(self) -> dict[str, Any]:
        running, waiting = self.load()
        ok = self._thread.is_alive() and not self._closing
        out = {"ok": ok, "engine": "runtime", "model": self.model_name,
               "device": str(self.model.device), "dtype": str(self.model.dtype).split(".")[-1],
               "max_batch_size": self.max_batch_size, "max_model_len": self.max_model_len,
               "running": running, "waiting": waiting}
        if self._error is not None:
            out["error"] = repr(self._error)
        return out

    async def shutdown(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        await asyncio.to_thread(self._thread.join)


def top_composite_experts(
    router_probs: dict[int, tuple[torch.Tensor, torch.Tensor]],
    *,
    groups: int,
    num_layers: int,
    top_k: int,
    chunk_bytes: int = 1 << 24,
) -> list[list[RoutedExpert]]:
    """Per token, the top_k composite experts of each routing layer, by g_ij = sum_h g1 g2.

    router_probs: {routing layer: (g1, g2) [T, H, E]}. The E x E weights are built for a few
    tokens at a time (at most `chunk_bytes`), never for the whole text.
    """
    out: list[list[RoutedExpert]] = []
    for layer, (g1_THE, g2_THE) in sorted(router_probs.items()):
        T, _, E = g1_THE.shape
        if not out:
            out = [[] for _ in range(T)]
        layers = tuple(range(layer, min(layer + groups, num_layers)))
        k = min(top_k, E * E)
        step = max(1, chunk_bytes // (4 * E * E))
        for start in range(0, T, step):
            g_TEE = torch.einsum("thi,thj->tij", g1_THE[start:start + step].float(),
                                 g2_THE[start:start + step].float())
            weight_TK, index_TK = g_TEE.flatten(1).topk(k, dim=-1)
            for t, (ws, ns) in enumerate(zip(weight_TK.tolist(), index_TK.tolist()), start):
                out[t].extend(RoutedExpert(layer, layers, n // E, n % E, w)
                              for w, n in zip(ws, ns) if w > 0)
    return out
