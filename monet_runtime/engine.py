"""The serving engine on the plain-PyTorch runtime: batches of requests, each with its own mask.

A worker thread takes every pending request (up to `max_batch_size`) and steps them together
through `stream_generate`; requests that arrive while a batch runs join the next batch. Each
token goes back to its caller's asyncio queue (`call_soon_threadsafe`), so `stream()` is an
async iterator; closing it early sets the row's abort flag, which `should_abort` reads at the
next decode step. Implements server.engine.Engine structurally (this package never imports
the server).

Legend: T tokens, H routing heads, E experts per side.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import kernels
from monet_runtime.generation import GenerationRequest, SamplingParams, stream_generate
from monet_runtime.model import MonetForCausalLM

__all__ = ["RoutedExpert", "RuntimeEngine", "StepOutput", "VllmServingEngine",
           "checkpoint_identity", "top_composite_experts"]


@dataclass(frozen=True, slots=True)
class StepOutput:
    token_id: int
    finish_reason: str | None = None
    queue_time: float | None = None


@dataclass(frozen=True, slots=True)
class RoutedExpert:
    layer: int  # the routing layer
    layers: tuple[int, ...]  # the layers of its routing group, which share its weights
    i: int
    j: int
    weight: float


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no new requests."""


@dataclass(eq=False, slots=True)
class _Job:
    request: Any  # server.engine.EngineRequest (structurally)
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    submitted: float = field(default_factory=time.monotonic)
    aborted: bool = False
    finished: bool = False

    def deliver(self, item: StepOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is gone: nobody is listening
            self.aborted = True


def _params(sampling) -> SamplingParams:
    greedy = sampling.temperature == 0
    return SamplingParams(
        max_new_tokens=sampling.max_tokens, do_sample=not greedy,
        temperature=1.0 if greedy else sampling.temperature, top_p=sampling.top_p,
        top_k=sampling.top_k, seed=sampling.seed, ignore_eos=sampling.ignore_eos)


class RuntimeEngine:
    """MONET on monet_runtime: one worker thread, static batches, per-row masks."""

    def __init__(self, model: MonetForCausalLM, *, name: str = "monet", max_batch_size: int = 16):
        if model.tokenizer is None:
            raise ValueError("the model has no tokenizer: load it with tokenizer=True")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        c = model.config
        self.model = model
        self.tokenizer = model.tokenizer
        self.model_name = name
        self.model_identity = model.identity
        self.num_layers, self.num_experts = c.num_hidden_layers, c.moe_experts
        self.vocab_size, self.max_model_len = c.vocab_size, c.max_position_embeddings
        self.max_batch_size = max_batch_size
        kernels.prepare_mixing(model.device, model.dtype)  # not on the first masked request
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
    def _check(self, request) -> None:
        ids, n = list(request.prompt_ids), request.sampling.max_tokens
        if not ids:
            raise ValueError("the prompt is empty")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if len(ids) + n > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) plus max_tokens ({n}) exceeds the "
                             f"model's {self.max_model_len} positions")

    async def stream(self, request) -> AsyncIterator[StepOutput]:
        self._check(request)
        params = _params(request.sampling)  # ValueError on bad sampling, before queueing
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
        job = self._jobs.get(request_id)
        if job is not None:
            job.aborted = True

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
        requests = [GenerationRequest(list(job.request.prompt_ids), job.params,
                                      job.request.mask.mask if job.request.mask else None)
                    for job in batch]
        first = [True] * len(batch)
        try:
            for events in stream_generate(self.model, requests,
                                          should_abort=lambda row: batch[row].aborted):
                for e in events:
                    job = batch[e.row]
                    queued = started - job.submitted if first[e.row] else None
                    first[e.row] = False
                    job.deliver(StepOutput(e.token_id, e.finish_reason, queued))
        except Exception as e:  # noqa: BLE001 - the callers get it
            for job in batch:
                job.deliver(e)

    # ---- routing, health, shutdown -----------------------------------------------------
    async def routing(self, prompt_ids: Sequence[int], *, top_k: int) -> list[list[RoutedExpert]]:
        ids = list(prompt_ids)
        if not ids or any(not 0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"token ids must be non-empty and in [0, {self.vocab_size})")
        if len(ids) > self.max_model_len:
            raise ValueError(f"{len(ids)} tokens exceed the model's {self.max_model_len}")

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


# ---- the same protocol on vLLM -----------------------------------------------------------
def checkpoint_identity(path: str | Path) -> str:
    """The identity load_model gives a checkpoint, from its config and tensor shapes only."""
    from safetensors import safe_open

    from monet_runtime.config import MonetConfig
    from monet_runtime.loading import _weight_files, model_identity

    files = _weight_files(Path(path))
    shapes = {}
    for file in set(files.values()):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return model_identity(MonetConfig.from_file(path), shapes)


class VllmServingEngine:
    """server.engine.Engine on monet_runtime.vllm_engine.VllmEngine (vLLM's AsyncLLM, which
    schedules continuously; masks travel as profiles keyed by the MaskSpec key)."""

    def __init__(self, model_path: str | Path, *, name: str = "monet", dtype: str = "float32",
                 **engine_args: Any):
        from monet_runtime.tokenizer import load_tokenizer
        from monet_runtime.vllm_engine import VllmEngine

        self._engine = VllmEngine(model_path, dtype=dtype, **engine_args)
        c = self._engine.config
        self.model_name = name
        self.model_identity = checkpoint_identity(model_path)
        self.tokenizer = load_tokenizer(model_path, vocab_size=c.vocab_size,
                                        bos_id=c.bos_token_id, eos_ids=c.eos_token_ids)
        self.num_layers, self.num_experts = c.num_hidden_layers, c.moe_experts
        self.vocab_size, self.max_model_len = c.vocab_size, c.max_position_embeddings
        self._groups = c.moe_groups
        self._ids = itertools.count()

    def _profile(self, spec):
        from monet_runtime.vllm_engine import MaskProfileRef

        return None if spec is None else MaskProfileRef("mask", spec.key, spec.mask)

    async def stream(self, request) -> AsyncIterator[StepOutput]:
        ids = list(request.prompt_ids)
        if not ids or any(not 0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"token ids must be non-empty and in [0, {self.vocab_size})")
        if len(ids) + request.sampling.max_tokens > self.max_model_len:
            raise ValueError(f"prompt plus max_tokens exceeds {self.max_model_len} positions")
        params = _params(request.sampling)
        async for event in self._engine.stream(ids, params, profile=self._profile(request.mask),
                                               request_id=request.request_id):
            yield event

    async def abort(self, request_id: str) -> None:
        await self._engine.abort(request_id)

    async def routing(self, prompt_ids: Sequence[int], *, top_k: int) -> list[list[RoutedExpert]]:
        ids = list(prompt_ids)
        out = await self._engine.generate(ids, SamplingParams(max_new_tokens=1),
                                          capture_routing=True,
                                          request_id=f"inspect-{next(self._ids)}")
        probs = {l: (g1[:len(ids)], g2[:len(ids)]) for l, (g1, g2) in out.routing.items()}
        return top_composite_experts(probs, groups=self._groups, num_layers=self.num_layers,
                                     top_k=top_k)

    def load(self) -> tuple[int, int]:
        return self._engine.load()

    def metric_families(self) -> Iterable[Any]:
        return self._engine.metric_families()

    async def health(self) -> dict[str, Any]:
        return await self._engine.health()

    async def shutdown(self) -> None:
        self._engine.shutdown()
