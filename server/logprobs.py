"""Scores in the OpenAI shapes, from the engine's TokenLogprobs.

/v1/completions (the legacy shape, as vLLM fills it): `tokens` (each token's text),
`token_logprobs`, `top_logprobs` (token text -> logprob: the top N and the chosen token, so
N + 1 entries when the chosen one is not among them) and `text_offset` (each token's offset in
the choice's text; with echo the text starts with the prompt). The first prompt token has no
logprob (nothing predicts it): null in both lists. /v1/chat/completions: `content`, a list of
{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}.

A token's text is the tokenizer's decoding of that id alone (a byte of a multi-byte character
decodes to U+FFFD); -inf is sent as -9999.0, as vLLM and OpenAI do (JSON has no infinity).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.engine import TokenLogprobs, Tokenizer

__all__ = ["ChatLogprobs", "CompletionLogprobs", "join"]

FLOOR = -9999.0


def _lp(value: float) -> float:
    return max(value, FLOOR)


class CompletionLogprobs:
    """Builds one choice's legacy logprobs, delta by delta (text offsets carry over)."""

    def __init__(self, tokenizer: Tokenizer, top: int):
        self.tokenizer, self.top = tokenizer, top
        self.offset = 0

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def part(self, token_ids: Sequence[int],
             scores: Sequence[TokenLogprobs | None]) -> dict[str, list[Any]]:
        """The four lists for these tokens (each score None, or for that token)."""
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                     "text_offset": []}
        for token_id, score in zip(token_ids, scores, strict=True):
            text = self._text(token_id)
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
            if score is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(_lp(score.logprob))
            top = {self._text(t): _lp(lp) for t, lp in list(score.top)[:self.top]}
            top.setdefault(text, _lp(score.logprob))
            out["top_logprobs"].append(top)
        return out


def join(parts: list[dict[str, list[Any]]]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                 "text_offset": []}
    for part in parts:
        for key, values in part.items():
            out[key].extend(values)
    return out


class ChatLogprobs:
    def __init__(self, tokenizer: Tokenizer, top: int):
        self.tokenizer, self.top = tokenizer, top

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.tokenizer.decode([token_id])
        return {"token": text, "logprob": _lp(logprob), "bytes": list(text.encode("utf-8"))}

    def part(self, token_ids: Sequence[int],
             scores: Sequence[TokenLogprobs]) -> dict[str, list[dict[str, Any]]]:
        return {"content": [
            {**self._entry(t, s.logprob),
             "top_logprobs": [self._entry(a, lp) for a, lp in list(s.top)[:self.top]]}
            for t, s in zip(token_ids, scores, strict=True)]}
