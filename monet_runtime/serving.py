"""What both serving engines share, torch-free: their events, their typed errors and the one
check of a request's prompt.

RuntimeEngine (monet_runtime.engine) and VllmEngine (monet_runtime.vllm_engine) implement
server.engine.Engine structurally; this package never imports the server. An engine raises
InvalidRequest (a 400 naming the request's field) for input the model cannot run and
EngineClosed (a 503) while it shuts down; `invalid_request` turns a library's bare ValueError
about a request's values into the former, so a client's input is never a 500.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["EngineClosed", "InvalidRequest", "RoutedExpert", "SAMPLING_FIELDS", "StepOutput",
           "TokenLogprobs", "check_prompt", "invalid_request"]

# server.engine.Sampling's fields: the names a sampling error is reported under
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos",
                   "logprobs", "prompt_logprobs")


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """A token's logprob at its position and the `top` most likely there
    (server.engine.TokenLogprobs): log_softmax of the raw logits, after the request's mask."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@dataclass(frozen=True, slots=True)
class StepOutput:
    """One generated token (server.engine.TokenEvent)."""

    token_id: int
    finish_reason: str | None = None
    queue_time: float | None = None
    logprobs: TokenLogprobs | None = None  # with Sampling.logprobs
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # the first event only


@dataclass(frozen=True, slots=True)
class RoutedExpert:
    layer: int  # the routing layer
    layers: tuple[int, ...]  # the layers of its routing group, which share its weights
    i: int
    j: int
    weight: float


class InvalidRequest(ValueError):
    """The request's own input cannot run (the client's error); `param` names the field.
    `status` is what the server answers (server.engine's EngineError, structurally)."""

    status = 400

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no new requests."""

    status = 503
    param = None


def invalid_request(error: ValueError, *, param: str | None = None,
                    aliases: dict[str, str] | None = None) -> InvalidRequest:
    """A library's refusal of a request's value as InvalidRequest. The field is `param` when
    given, else the first sampling field the message names (through `aliases`, the library's
    name -> the server's: {"max_new_tokens": "max_tokens"})."""
    if isinstance(error, InvalidRequest):
        return error
    message = str(error)
    if param is None:
        names = {**{name: name for name in SAMPLING_FIELDS}, **(aliases or {})}
        found = [(message.find(name), server) for name, server in names.items() if name in message]
        param = min(found)[1] if found else None
    return InvalidRequest(message, param=param)


def check_prompt(ids: Sequence[int], max_tokens: int, *, vocab_size: int,
                 max_model_len: int) -> None:
    """InvalidRequest unless the prompt is non-empty, its ids are in the vocabulary and prompt
    plus max_tokens fit the engine's max_model_len positions."""
    if not ids:
        raise InvalidRequest("the prompt is empty", param="prompt")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"token id {bad} is outside the vocabulary [0, {vocab_size})",
                             param="prompt")
    if len(ids) > max_model_len:
        raise InvalidRequest(f"the prompt ({len(ids)} tokens) exceeds the engine's "
                             f"{max_model_len} positions", param="prompt")
    if len(ids) + max_tokens > max_model_len:
        raise InvalidRequest(f"prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) "
                             f"exceeds the engine's {max_model_len} positions",
                             param="max_tokens")
