"""The boundary between the REST layer and a generation engine.

The server builds plain request dataclasses and reads engine outputs through small Protocols,
so an engine module never imports the server. Two engines implement `Engine` directly, with no
adapter between: monet_runtime.engine.RuntimeEngine (the PyTorch runtime) and
monet_runtime.vllm_engine.VllmEngine (vLLM); tests/monet_runtime/test_engine_contract.py runs
one contract over both. Each converts `Sampling` once into its own sampling type. The server
owns everything above tokens: text, stop strings, limits, mask resolution, metrics.

    events = engine.stream(EngineRequest("req-1", [1, 72, 105], Sampling(max_tokens=8)))
    async for event in events:      # one event per generated token
        ...                         # event.finish_reason is set on the last one
    await events.aclose()           # before the last event: aborts the request

Scores: with Sampling.logprobs = N each event carries its token's log-probability and the N
most likely tokens' (`event.logprobs`); with Sampling.prompt_logprobs = N the first event also
carries them for every prompt token (`event.prompt_logprobs`, None for the first token, which
nothing predicts). Both are log_softmax of the model's raw logits at that position, after the
request's expert mask and before temperature, top-k and top-p (vLLM's default "raw_logprobs").
Several samples or prompts are several requests: the server fans them out.

An engine's exception may carry an HTTP `status` and the `param` at fault (EngineError,
structurally: monet_runtime.serving.InvalidRequest is a 400, for any value of the request the
engine or its library refuses; EngineClosed a 503); the server answers that request with them.
Any other exception is a 500, for that request alone: an engine never fails one request for
another's input.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Engine",
    "EngineError",
    "EngineRequest",
    "MaskSpec",
    "RoutedExpert",
    "Sampling",
    "TokenEvent",
    "TokenLogprobs",
    "Tokenizer",
    "error_status",
]


@dataclass(frozen=True, slots=True)
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # per generated token: its logprob and the top N; None: none
    prompt_logprobs: int | None = None  # the same for every prompt token (echo, scoring)


@dataclass(frozen=True, slots=True)
class MaskSpec:
    """The expert mask of one request. `key` names the contents by the profiles' digests
    ("no-python@3#1f0c...+toxic@1#9a2e..."): two specs with the same key hold the same mask,
    so an engine may cache per key (and vLLM uses it as the prefix-cache salt)."""

    key: str
    mask: Any  # an ExpertMask (monet_runtime.expert_mask); opaque to the server


@dataclass(frozen=True, slots=True)
class EngineRequest:
    request_id: str
    prompt_ids: Sequence[int]
    sampling: Sampling
    mask: MaskSpec | None = None


class TokenLogprobs(Protocol):
    """A token's log-probability at its position and the `top` most likely tokens there."""

    token_id: int
    logprob: float
    top: Sequence[tuple[int, float]]  # (token id, logprob), most likely first


class TokenEvent(Protocol):
    """One generated token; the last event of a request carries its finish_reason."""

    token_id: int  # -1 when a request finishes without a new token (e.g. aborted)
    finish_reason: str | None  # "stop" | "length" | "abort", on the last event only
    queue_time: float | None  # seconds from submission to running (first event only)
    logprobs: TokenLogprobs | None  # with Sampling.logprobs (None on a -1 event)
    # with Sampling.prompt_logprobs, on the first event only: one per prompt token
    prompt_logprobs: Sequence[TokenLogprobs | None] | None


class EngineError(Protocol):
    """What an engine's exception carries when it is not the server's fault."""

    status: int  # 4xx: the request's own input; 503: the engine is closing
    param: str | None  # the request field at fault


def error_status(exc: BaseException) -> tuple[int, str | None] | None:
    """(status, param) of an EngineError, None for any other exception."""
    status = getattr(exc, "status", None)
    if isinstance(status, int) and not isinstance(status, bool) and 400 <= status < 600:
        param = getattr(exc, "param", None)
        return status, param if isinstance(param, str) else None
    return None


class RoutedExpert(Protocol):
    """A composite expert (i, j) of a routing layer and its weight g_ij for one token.
    A routing layer's weights hold for every layer of its routing group (`layers`)."""

    layer: int
    layers: tuple[int, ...]
    i: int
    j: int
    weight: float


class Tokenizer(Protocol):
    bos_id: int | None
    eos_ids: list[int]
    chat_template: str | None

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_str(self, token_id: int) -> str:
        """The vocabulary's own string for one id (POST /tokenize's token_strs)."""
        ...


@runtime_checkable
class Engine(Protocol):
    model_name: str  # what /v1/models lists
    model_identity: str  # the identity mask profiles are built for
    num_layers: int
    num_experts: int  # E, experts per side
    vocab_size: int
    max_model_len: int  # prompt plus generated tokens
    tokenizer: Tokenizer

    def stream(self, request: EngineRequest) -> AsyncIterator[TokenEvent]:
        """Generate with the request's own mask; closing the iterator early aborts.
        An EngineError with a 4xx status for a request the model cannot run (e.g. a token id
        outside the vocab), raised by this request's iterator only."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def routing(self, prompt_ids: Sequence[int], *, top_k: int) -> list[list[RoutedExpert]]:
        """Per prompt token, the top_k composite experts of every routing layer by weight."""
        ...

    def load(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        ...

    def metric_families(self) -> Iterable[Any]:
        """The engine's own Prometheus metric families (prometheus_client Metric objects),
        served next to the server's: vLLM's `vllm:` metrics; none for the runtime engine."""
        ...

    async def health(self) -> dict[str, Any]:
        """{"ok": bool, ...}: whether the engine can serve."""
        ...

    async def shutdown(self) -> None:
        """Finish the running and waiting requests, then stop."""
        ...
