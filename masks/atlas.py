"""The expert atlas: what each composite expert of a model responds to, from one routed corpus.

For every composite expert (i, j) of every routing layer r (weight g_ij(t) = sum_h g1 g2):
its top-N contexts (the N corpus tokens with the largest g_ij, each a window of text with the
token's character span), its mean weight per corpus label and over the corpus, and its top-M
tokens by summed weight (a bounded sketch: exact while an expert sees at most M distinct
tokens, see masks.atlas_build). Built by masks.atlas_build (torch); this module is numpy only,
so the server can load and query an atlas without the runtime. Stored as one artifact,
`atlas_name(model_identity)`, beside the profiles.

Specificity, for search: an expert's weight on a text (or a label) against its weight on the
rest, (w + a) / (w_rest + a), where a is the layer's mean expert weight, so that rarely used
experts with tiny means do not win on noise.
Legend: R routing layers, X = E * E composite experts per layer (expert = i * E + j), N top
contexts, M top tokens, L labels, C distinct contexts.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

__all__ = ["ATLAS_FORMAT", "Atlas", "AtlasCorrupt", "atlas_name"]

ATLAS_FORMAT = 1


class AtlasCorrupt(ValueError):
    """Bytes that are not an atlas of this format."""


def atlas_name(model_identity: str) -> str:
    """The artifact name of a model's atlas in the mask store."""
    return f"atlas:{model_identity}"


@dataclass(eq=False)
class Atlas:
    model_id: str
    corpus_fingerprint: str
    routing_layers: list[int]
    num_layers: int
    groups: int
    num_experts: int  # E per side
    labels: list[str]
    tokens: int  # tokens routed
    documents: int
    top_weight: np.ndarray  # float32 [R, X, N], descending; 0 where an expert has fewer
    top_context: np.ndarray  # int32 [R, X, N] into the contexts; -1 where none
    token_ids: np.ndarray  # int32 [R, X, M], by summed weight; -1 where none
    token_weight: np.ndarray  # float32 [R, X, M]
    label_mean: np.ndarray  # float32 [L, R, X]
    label_tokens: np.ndarray  # int64 [L]
    context_doc: np.ndarray  # int32 [C] document index in the corpus
    context_pos: np.ndarray  # int32 [C] token position in the document
    context_span: np.ndarray  # int32 [C, 2] the token's characters in its window text
    context_offsets: np.ndarray  # int64 [C + 1] byte offsets of each window in context_text
    context_text: bytes  # UTF-8 windows, concatenated
    _by_label: dict[int, tuple[np.ndarray, ...]] = field(default_factory=dict, repr=False)

    # ---- shape --------------------------------------------------------------------------
    @cached_property
    def mean(self) -> np.ndarray:
        """Mean weight per token over the whole corpus: float32 [R, X]."""
        total = np.tensordot(self.label_tokens.astype(np.float64), self.label_mean, axes=1)
        return (total / max(int(self.label_tokens.sum()), 1)).astype(np.float32)

    def routing_index(self, layer: int) -> int:
        """The row of `layer`'s routing layer (l - l % groups); ValueError if out of range."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is not in [0, {self.num_layers})")
        return self.routing_layers.index(layer - layer % self.groups)

    def group(self, r: int) -> list[int]:
        first = self.routing_layers[r]
        return list(range(first, min(first + self.groups, self.num_layers)))

    def context(self, c: int) -> dict[str, Any]:
        text = self.context_text[self.context_offsets[c]:self.context_offsets[c + 1]]
        start, end = (int(v) for v in self.context_span[c])
        return {"document": int(self.context_doc[c]), "position": int(self.context_pos[c]),
                "text": text.decode("utf-8", errors="replace"), "highlight": [start, end]}

    # ---- queries ------------------------------------------------------------------------
    def expert(self, layer: int, i: int, j: int) -> dict[str, Any]:
        """Everything the atlas holds on composite expert (i, j) of `layer`'s routing layer."""
        E = self.num_experts
        if not (0 <= i < E and 0 <= j < E):
            raise ValueError(f"expert ({i}, {j}) is not in [0, {E})^2")
        r, x = self.routing_index(layer), i * E + j
        contexts = [{"weight": float(w), **self.context(int(c))}
                    for w, c in zip(self.top_weight[r, x], self.top_context[r, x]) if c >= 0]
        tokens = [(int(t), float(w)) for t, w in zip(self.token_ids[r, x],
                                                     self.token_weight[r, x]) if t >= 0]
        return {"routing_layer": self.routing_layers[r], "layers": self.group(r),
                "mean": float(self.mean[r, x]),
                "label_means": {label: float(self.label_mean[n, r, x])
                                for n, label in enumerate(self.labels)},
                "contexts": contexts, "tokens": tokens}

    def _floor(self) -> np.ndarray:
        """a per routing layer: the mean expert weight, float64 [R, 1]."""
        return np.maximum(self.mean.astype(np.float64).mean(axis=1, keepdims=True), 1e-12)

    def label_specific(self, label: str, *, offset: int, limit: int) -> tuple[list[dict], int]:
        """The experts most specific to `label` (mean on it against the largest mean on another
        label), best first: (page, how many experts have any weight on the label)."""
        n = self.labels.index(label)  # ValueError for an unknown label
        if n not in self._by_label:  # ranked once per label: later pages are slices
            own = self.label_mean[n].astype(np.float64).reshape(-1)  # [R * X]
            others = np.delete(self.label_mean, n, axis=0).astype(np.float64)
            rest = (others.max(axis=0) if len(others) else np.zeros_like(self.label_mean[n]))
            rest = rest.reshape(-1)
            a = np.repeat(self._floor()[:, 0], self.num_experts ** 2)
            flat = np.flatnonzero(own > 0)
            score = (own[flat] + a[flat]) / (rest[flat] + a[flat])
            order = np.argsort(-score, kind="stable")
            self._by_label[n] = (flat[order], score[order], own[flat][order], rest[flat][order])
        flat, score, own, rest = (v[offset:offset + limit] for v in self._by_label[n])
        page = [self._hit(int(f), float(s), own=float(o), rest=float(w))
                for f, s, o, w in zip(flat, score, own, rest)]
        return page, len(self._by_label[n][0])

    def text_specific(self, weight_RX: np.ndarray, *, offset: int,
                      limit: int) -> tuple[list[dict], int]:
        """The experts most specific to a text: weight_RX float [R, X] is its tokens' mean
        weight per expert, against each expert's corpus mean. (page, experts with weight)."""
        own = np.asarray(weight_RX, dtype=np.float64)
        rest = self.mean.astype(np.float64)
        a = self._floor()
        flat = np.flatnonzero(own.reshape(-1) > 0)
        score = ((own + a) / (rest + a)).reshape(-1)[flat]
        top = min(len(flat), offset + limit)
        if top == 0:
            return [], 0
        best = np.argpartition(-score, top - 1)[:top] if top < len(flat) else np.arange(len(flat))
        best = best[np.argsort(-score[best], kind="stable")][offset:]
        return [self._hit(int(flat[b]), float(score[b]), own=float(own.reshape(-1)[flat[b]]),
                          rest=float(rest.reshape(-1)[flat[b]])) for b in best], len(flat)

    def _hit(self, flat: int, score: float, *, own: float, rest: float) -> dict[str, Any]:
        X = self.num_experts ** 2
        r, x = divmod(flat, X)
        i, j = divmod(x, self.num_experts)
        return {"layer": self.routing_layers[r], "layers": self.group(r), "i": i, "j": j,
                "expert": x, "specificity": score, "weight": own, "weight_elsewhere": rest}

    # ---- bytes --------------------------------------------------------------------------
    _ARRAYS = ("top_weight", "top_context", "token_ids", "token_weight", "label_mean",
               "label_tokens", "context_doc", "context_pos", "context_span", "context_offsets")
    _META = ("model_id", "corpus_fingerprint", "routing_layers", "num_layers", "groups",
             "num_experts", "labels", "tokens", "documents")

    def to_bytes(self) -> bytes:
        meta = {"format": ATLAS_FORMAT, **{k: getattr(self, k) for k in self._META}}
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                 context_text=np.frombuffer(self.context_text, dtype=np.uint8),
                 **{k: getattr(self, k) for k in self._ARRAYS})
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Atlas:
        """AtlasCorrupt for anything that is not a consistent atlas of this format."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as f:
                meta = json.loads(f["meta"].tobytes())
                arrays = {k: f[k] for k in cls._ARRAYS}
                text = f["context_text"].tobytes()
            if meta.pop("format") != ATLAS_FORMAT:
                raise ValueError("another atlas format")
            atlas = cls(**meta, **arrays, context_text=text)
            atlas._check()
        except Exception as e:  # noqa: BLE001 (any damage is the same answer: corrupt)
            raise AtlasCorrupt(f"not an atlas: {type(e).__name__}: {e}") from None
        return atlas

    def _check(self) -> None:
        R, X, L = len(self.routing_layers), self.num_experts ** 2, len(self.labels)
        C = len(self.context_doc)
        N, M = self.top_weight.shape[-1], self.token_ids.shape[-1]
        shapes = {"top_weight": (R, X, N), "top_context": (R, X, N), "token_ids": (R, X, M),
                  "token_weight": (R, X, M), "label_mean": (L, R, X), "label_tokens": (L,),
                  "context_pos": (C,), "context_span": (C, 2), "context_offsets": (C + 1,)}
        for name, shape in shapes.items():
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, not {shape}")
        if self.top_context.size and not (-1 <= self.top_context.min()
                                          and self.top_context.max() < C):
            raise ValueError("top_context points outside the contexts")
        offsets = self.context_offsets
        if C and (offsets[0] != 0 or offsets[-1] != len(self.context_text)
                  or np.any(np.diff(offsets) < 0)):
            raise ValueError("context offsets do not cover the context text")
