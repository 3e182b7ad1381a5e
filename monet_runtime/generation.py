"""Generation with a KV cache: a batch of prompts of different lengths, each with its own
sampling parameters and expert mask, stepped together.

Prompts are left-padded into one prefill; every decode step feeds one token per row. Rows
finish on an eos / stop token, a stop string (needs `decode`) or max_new_tokens. With
`logprobs` / `prompt_logprobs` a row's events carry log_softmax of the model's raw logits
(masked, before temperature and the top-k / top-p cuts): the chosen token's and the top N.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from monet_runtime.expert_mask import ExpertMask
from monet_runtime.model import KVCache, MaskBatch, MonetForCausalLM
from monet_runtime.serving import TokenLogprobs, check_prompt

__all__ = ["Generation", "GenerationRequest", "SamplingParams", "StepEvent", "TokenLogprobs",
           "generate_batch", "generate_tensor", "seeded_generator", "stream_generate",
           "token_logprobs"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_new_tokens: int = 16
    do_sample: bool = False  # greedy when False or temperature == 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's eos ids
    stop: tuple[str, ...] = ()  # stop strings; need a decode function
    ignore_eos: bool = False
    logprobs: int | None = None  # per new token: its logprob and the top N (None: none)
    prompt_logprobs: int | None = None  # per prompt token but the first, on the first event

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # NaN too
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


@dataclass(slots=True)
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    mask: ExpertMask | None = None
    generator: torch.Generator | None = None  # None: one seeded from params.seed


def token_logprobs(logprobs_TV: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprobs]:
    """Per position t: tokens[t]'s logprob in logprobs_TV[t] and the `top` most likely."""
    if not tokens:
        return []
    chosen = logprobs_TV.gather(1, torch.tensor(tokens, device=logprobs_TV.device)[:, None])
    best_lp, best_id = logprobs_TV.topk(min(top, logprobs_TV.shape[-1]), dim=-1)
    return [TokenLogprobs(t, lp, tuple(zip(ids, lps)))
            for t, lp, ids, lps in zip(tokens, chosen[:, 0].tolist(), best_id.tolist(),
                                       best_lp.tolist())]


@dataclass(slots=True)
class StepEvent:
    """One new token of one row; finish_reason is set on the row's last token. A row whose
    sampling raised ends with finish_reason "error", token_id -1 and the exception; the
    other rows go on."""

    row: int
    token_id: int
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: Exception | None = None
    logprobs: TokenLogprobs | None = None  # with params.logprobs
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # the row's first event


@dataclass(slots=True)
class Generation:
    token_ids: list[int]
    finish_reason: str
    text: str | None = None


def _sample(logits_V: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """One token id. Every cut keeps at least the most likely token (as Hugging Face's
    min_tokens_to_keep=1), so no temperature, top_p or top_k leaves an empty distribution:
    a top_p that rounds to 0 in float32 (1e-300) samples the argmax."""
    if params.greedy:
        return int(logits_V.argmax())
    logits = logits_V.float()
    # shift before dividing: the top logit becomes 0, so a small temperature cannot overflow
    logits = (logits - logits.max()) / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already carry top_p of the mass
        drop = probs.cumsum(-1) - probs >= params.top_p
        drop[0] = False
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def seeded_generator(seed: int | None) -> torch.Generator:
    """The sampling generator of one row: from its seed, else a random one."""
    return torch.Generator().manual_seed(seed if seed is not None
                                         else int(torch.randint(2**62, ())))


def _stop_ids(model: MonetForCausalLM, params: SamplingParams) -> set[int]:
    ids = set(params.stop_token_ids if params.stop_token_ids is not None
              else model.config.eos_token_ids)
    return set() if params.ignore_eos and params.stop_token_ids is None else ids


@torch.inference_mode()
def stream_generate(
    model: MonetForCausalLM,
    requests: list[GenerationRequest],
    *,
    decode: Callable[[list[int]], str] | None = None,
    should_abort: Callable[[int], bool] | None = None,
) -> Iterator[list[StepEvent]]:
    """Yield, per decode step, the new token of every unfinished row.

    should_abort(row) lets a caller drop a row (e.g. its client went away); it then finishes
    with reason "abort". A row whose sampling fails finishes alone with reason "error"; an
    error of the whole batch (the forward pass) raises, bad input first, as InvalidRequest.
    """
    if not requests:
        return
    config, device = model.config, model.device
    for r in requests:
        if r.params.stop and decode is None:
            raise ValueError("stop strings need a decode function")
        check_prompt(r.prompt_ids, r.params.max_new_tokens, vocab_size=config.vocab_size,
                     max_model_len=config.max_position_embeddings)
    B = len(requests)
    lengths = [len(r.prompt_ids) for r in requests]
    P = max(lengths)
    total_padded = P + max(r.params.max_new_tokens for r in requests)

    ids = torch.zeros(B, P, dtype=torch.long)
    attn = torch.zeros(B, total_padded, dtype=torch.long)
    for b, r in enumerate(requests):
        ids[b, P - lengths[b]:] = torch.tensor(r.prompt_ids)
        attn[b, P - lengths[b]:P] = 1
    ids, attn = ids.to(device), attn.to(device)
    masks = MaskBatch.build([r.mask for r in requests], batch=B, config=config, device=device)
    cache = KVCache.allocate(config, B, total_padded, dtype=model.dtype, device=device)
    gens = [r.generator or seeded_generator(r.params.seed) for r in requests]
    stops = [_stop_ids(model, r.params) for r in requests]
    generated: list[list[int]] = [[] for _ in requests]
    done = [False] * B

    prefill = model(ids, mask=masks, attention_mask=attn[:, :P], cache=cache).logits
    logits = prefill[:, -1]
    prompt_scores = [None] * B
    for b, r in enumerate(requests):
        if r.params.prompt_logprobs is not None:  # positions P-L .. P-2 predict tokens 1 .. L-1
            row = prefill[b, P - lengths[b]:P - 1].float().log_softmax(-1)
            prompt_scores[b] = [None, *token_logprobs(row, r.prompt_ids[1:],
                                                      r.params.prompt_logprobs)]
    del prefill
    step = 0
    while True:
        events, next_ids = [], torch.zeros(B, 1, dtype=torch.long)
        for b, r in enumerate(requests):
            if done[b]:
                continue
            if should_abort is not None and should_abort(b):
                done[b] = True
                events.append(StepEvent(b, -1, "abort"))
                continue
            try:
                token = _sample(logits[b], r.params, gens[b])
            except Exception as e:  # noqa: BLE001 - this row's failure, not the batch's
                done[b] = True
                events.append(StepEvent(b, -1, "error", e))
                continue
            scores = None
            if r.params.logprobs is not None:
                scores = token_logprobs(logits[b].float().log_softmax(-1)[None], [token],
                                       r.params.logprobs)[0]
            generated[b].append(token)
            next_ids[b, 0] = token
            reason = None
            if token in stops[b]:
                reason = "stop"
            elif r.params.stop and any(s in decode(generated[b]) for s in r.params.stop):
                reason = "stop"
            elif len(generated[b]) >= r.params.max_new_tokens:
                reason = "length"
            done[b] = reason is not None
            events.append(StepEvent(b, token, reason, logprobs=scores,
                                    prompt_logprobs=prompt_scores[b] if step == 0 else None))
        yield events
        if all(done):
            return
        step += 1
        attn[:, P + step - 1] = 1
        logits = model(next_ids.to(device), mask=masks, attention_mask=attn[:, :P + step],
                       cache=cache).logits[:, -1]


def _trim_stop_text(text: str, stops: tuple[str, ...]) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text if cut < 0 else text[:cut]


def generate_batch(
    model: MonetForCausalLM,
    requests: list[GenerationRequest],
    *,
    decode: Callable[[list[int]], str] | None = None,
) -> list[Generation]:
    """Run requests together; the text (stop strings cut off) is filled in when decode is given."""
    tokens: list[list[int]] = [[] for _ in requests]
    reasons = ["length"] * len(requests)
    for events in stream_generate(model, requests, decode=decode):
        for e in events:
            if e.error is not None:
                raise e.error
            if e.token_id >= 0:
                tokens[e.row].append(e.token_id)
            if e.finish_reason:
                reasons[e.row] = e.finish_reason
    out = []
    for r, toks, reason in zip(requests, tokens, reasons):
        text = _trim_stop_text(decode(toks), r.params.stop) if decode is not None else None
        out.append(Generation(toks, reason, text))
    return out


def generate_tensor(
    model: MonetForCausalLM,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int = 20,
    mask=None,
    do_sample: bool = False,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    **sampling,
) -> torch.Tensor:
    """Hugging Face-style generate: [B, T] (optionally left-padded) -> [B, T + n]."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    masks = mask if isinstance(mask, (list, tuple)) else [mask] * B
    if len(masks) != B:
        raise ValueError(f"got {len(masks)} masks for a batch of {B} rows")
    if "stop_token_ids" in sampling and sampling["stop_token_ids"] is not None:
        sampling["stop_token_ids"] = tuple(sampling["stop_token_ids"])
    params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=do_sample, **sampling)
    rows = input_ids.tolist()
    if attention_mask is not None:
        rows = [[t for t, a in zip(row, keep) if a] for row, keep in
                zip(rows, attention_mask.tolist())]
    requests = [GenerationRequest(row, params, m) for row, m in zip(rows, masks)]
    results = generate_batch(model, requests)
    n = max(len(g.token_ids) for g in results)
    eos = model.config.eos_token_ids
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    out = torch.full((B, T + n), pad, dtype=torch.long)
    out[:, :T] = input_ids.cpu()
    for b, g in enumerate(results):
        out[b, T:T + len(g.token_ids)] = torch.tensor(g.token_ids, dtype=torch.long)
    return out.to(input_ids.device)
