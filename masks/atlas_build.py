"""Build an expert atlas (masks.atlas): route a corpus once, stream per-expert summaries.

Per routing layer the state is fixed-size, whatever the corpus: for X = E * E composite
experts, the top-N (weight, context key) [N, X] and the top-M (token id, summed weight) [M, X],
plus the per-label sums of masks.statistics.LabelAccumulator [L, X]. The router keeps about k
experts per side and head, so a token has weight on at most H * k^2 composite experts of
X: each chunk of tokens becomes its (token, expert, g_ij) triples (masks.statistics' pair
keys), merged with the state's entries by two sorts, the N largest per expert kept (exact: a
token in an expert's overall top-N is in the top-N of any prefix of the stream it is in). The
token sketch adds the triples' weights to the (expert, token) sums held and keeps the M
largest; a token pushed out loses what it had (exact while an expert sees at most M distinct
tokens; the heavy ones stay). Windows of text are cut after the
pass, from a second read of the corpus, for the contexts that ended in some top-N only.
Legend: T tokens, H heads, E experts per side, X = E * E, R routing layers, P triples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from masks.atlas import Atlas
from masks.corpus import Record, Window, collate, read_corpus
from masks.statistics import LabelAccumulator, _pair_keys

__all__ = ["AtlasAccumulator", "build_atlas", "route_documents"]

UNLABELLED = "(unlabelled)"
_POS_BITS = 32  # context key = document << 32 | position
_CHUNK = 2048  # tokens at a time: about 2048 * H * k^2 (token, expert) pairs


class AtlasAccumulator:
    """Streaming top-N contexts and top-M tokens per composite expert, and label sums."""

    def __init__(self, *, routing_layers: list[int], num_layers: int, num_experts: int,
                 num_heads: int, groups: int, vocab_size: int, top_n: int = 16,
                 top_tokens: int = 16, device: str | torch.device = "cpu"):
        X, R = num_experts ** 2, len(routing_layers)
        self.routing_layers, self.num_experts = list(routing_layers), num_experts
        self.vocab_size = vocab_size
        self.top_w = torch.zeros(R, top_n, X, device=device)
        self.top_key = torch.full((R, top_n, X), -1, dtype=torch.long, device=device)
        self.tok_w = torch.zeros(R, top_tokens, X, device=device)
        self.tok_id = torch.full((R, top_tokens, X), -1, dtype=torch.long, device=device)
        self.labels = LabelAccumulator(routing_layers=self.routing_layers,
                                       num_layers=num_layers, num_experts=num_experts,
                                       num_heads=num_heads, groups=groups, device=device)

    def state_bytes(self) -> int:
        """Bytes held per expert state (not the label sums, [L, R, X] float64)."""
        return sum(t.numel() * t.element_size()
                   for t in (self.top_w, self.top_key, self.tok_w, self.tok_id))

    def add(self, router_probs: dict[int, tuple[torch.Tensor, torch.Tensor]], *,
            keys_T: torch.Tensor, token_ids_T: torch.Tensor, labels_T: list[str]) -> None:
        """router_probs: routing layer -> (g1, g2) [T, H, E]; keys_T, token_ids_T long [T]."""
        self.labels.add(router_probs, labels_T)
        for r, layer in enumerate(self.routing_layers):
            g1, g2 = router_probs[layer]
            for start in range(0, g1.shape[0], _CHUNK):
                part = slice(start, start + _CHUNK)
                t, x, w = _nonzero_experts(g1[part].float(), g2[part].float())
                keys = keys_T[part].to(t.device)[t]
                ids = token_ids_T[part].to(t.device)[t]
                self._merge_top(r, x, w, keys)
                self._merge_tokens(r, x, w, ids)

    def _merge_top(self, r: int, x: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> None:
        rank, held = (self.top_w[r] > 0).nonzero(as_tuple=True)
        self.top_w[r], self.top_key[r] = _top_per_expert(
            torch.cat([held, x]), torch.cat([self.top_w[r][rank, held], w]),
            torch.cat([self.top_key[r][rank, held], keys]), shape=self.top_w.shape[1:])

    def _merge_tokens(self, r: int, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> None:
        V = self.vocab_size
        rank, held = (self.tok_id[r] >= 0).nonzero(as_tuple=True)
        pair = torch.cat([held * V + self.tok_id[r][rank, held], x * V + ids])
        pair, inverse = pair.unique(return_inverse=True)  # (expert, token): add the weights
        total = torch.zeros(len(pair), device=w.device).scatter_add_(
            0, inverse, torch.cat([self.tok_w[r][rank, held], w]))
        self.tok_w[r], self.tok_id[r] = _top_per_expert(pair // V, total, pair % V,
                                                        shape=self.tok_w.shape[1:])

    def result(self) -> dict[str, np.ndarray]:
        """Arrays [R, X, N] / [R, X, M] (experts first), keys -1 where the weight is 0."""
        return {"top_weight": self.top_w.transpose(1, 2).cpu().numpy(),
                "top_key": self.top_key.transpose(1, 2).cpu().numpy(),
                "token_ids": self.tok_id.transpose(1, 2).to(torch.int32).cpu().numpy(),
                "token_weight": self.tok_w.transpose(1, 2).cpu().numpy()}


def _nonzero_experts(g1_THE: torch.Tensor, g2_THE: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token, expert, g_ij) of every composite expert with weight, [P] each: the pairs of
    kept router entries per head (masks.statistics), the heads of one token added up."""
    T, H, E = g1_THE.shape
    key, val = _pair_keys(g1_THE, g2_THE, torch.arange(T, device=g1_THE.device))
    key, inverse = key.unique(return_inverse=True)
    weight = torch.zeros(len(key), device=val.device).scatter_add_(0, inverse, val.float())
    return key // (E * E), key % (E * E), weight


def _top_per_expert(x: torch.Tensor, w: torch.Tensor, payload: torch.Tensor, *,
                    shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The `n` largest w of each expert x, descending, as dense (w [n, X], payload [n, X];
    0 and -1 where an expert has fewer): one sort by weight, one stable sort by expert."""
    n, X = shape
    order = torch.argsort(w, descending=True, stable=True)
    order = order[torch.argsort(x[order], stable=True)]
    x, w, payload = x[order], w[order], payload[order]
    counts = torch.bincount(x, minlength=X)
    rank = torch.arange(len(x), device=x.device) - (counts.cumsum(0) - counts)[x]
    keep = (rank < n) & (w > 0)
    top_w = torch.zeros(n, X, device=w.device)
    top_payload = torch.full((n, X), -1, dtype=torch.long, device=w.device)
    top_w[rank[keep], x[keep]] = w[keep]
    top_payload[rank[keep], x[keep]] = payload[keep]
    return top_w, top_payload


@dataclass(slots=True)
class _Piece:
    document: int
    start: int  # position of its first token (after BOS) in the document
    window: Window


def _pieces(records: Iterable[Record], tokenizer, max_length: int) -> Iterator[_Piece]:
    """masks.corpus.windows, keeping where each window lies in its document."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    step = max_length - len(bos)
    for document, record in enumerate(records):
        ids = tokenizer.encode(record.text, add_bos=False)
        for start in range(0, len(ids), step):
            yield _Piece(document, start, Window(bos + ids[start:start + step],
                                                 record.label or UNLABELLED, None))


def route_documents(model, records: Iterable[Record], *, batch_tokens: int = 8192,
                    max_length: int = 512) -> Iterator[tuple[dict, torch.Tensor, torch.Tensor,
                                                             list[str]]]:
    """(router weights of the routed tokens {routing layer: (g1, g2) [N, H, E]}, context keys
    long [N], token ids long [N], labels [N]) per batch. Like masks.builders.route_batches,
    which sorts windows by length and so cannot say where a token came from."""
    tokenizer = model.tokenizer
    offset = 1 if tokenizer.bos_id is not None else 0
    group: list[_Piece] = []

    def run(pieces: list[_Piece]):
        batch = collate([p.window for p in pieces])
        with torch.inference_mode():
            out = model(batch.input_ids.to(model.device), output_router_probs=True,
                        attention_mask=batch.attention_mask.to(model.device))
        keep = batch.routed_tokens() if offset else batch.attention_mask.bool()
        rows, cols = keep.nonzero(as_tuple=True)
        doc = torch.tensor([p.document for p in pieces])[rows]
        pos = torch.tensor([p.start for p in pieces])[rows] + cols - offset
        keep_dev = keep.to(model.device)
        probs = {l: (g1[keep_dev], g2[keep_dev]) for l, (g1, g2) in out.router_probs.items()}
        labels = [pieces[r].window.label for r in rows.tolist()]
        return probs, (doc << _POS_BITS) | pos, batch.input_ids[keep], labels

    for piece in _pieces(records, tokenizer, max_length):
        longest = max([len(piece.window.ids), *(len(p.window.ids) for p in group)])
        if group and longest * (len(group) + 1) > batch_tokens:
            yield run(group)
            group = []
        group.append(piece)
    if group:
        yield run(group)


def build_atlas(model, corpus: str | Path | list[Record], *, fingerprint: str = "",
                top_n: int = 16, top_tokens: int = 16, window: int = 32,
                batch_tokens: int = 8192, max_length: int = 512,
                progress: bool | Callable[[int], None] = True) -> Atlas:
    """The atlas of `model` over a corpus (a JSONL file, a label directory, or records).
    progress: a tqdm bar (True), none (False), or a callback with the tokens routed so far."""
    from masks.builders import _routing_layers, _shape
    from masks.corpus import corpus_fingerprint

    def read() -> Iterable[Record]:
        return read_corpus(corpus) if isinstance(corpus, (str, Path)) else corpus

    if isinstance(corpus, (str, Path)) and not fingerprint:
        fingerprint = corpus_fingerprint(corpus)
    shape = _shape(model)
    acc = AtlasAccumulator(routing_layers=_routing_layers(model), top_n=top_n,
                           top_tokens=top_tokens, vocab_size=model.config.vocab_size,
                           device=model.device, **shape)
    bar = tqdm(desc="atlas", unit="tok", unit_scale=True, disable=progress is not True)
    routed = 0
    try:
        for probs, keys, ids, labels in route_documents(model, read(), batch_tokens=batch_tokens,
                                                        max_length=max_length):
            acc.add(probs, keys_T=keys, token_ids_T=ids, labels_T=labels)
            routed += len(keys)
            bar.update(len(keys))
            if callable(progress):
                progress(routed)
    finally:
        bar.close()
    top = acc.result()
    stats = acc.labels.result()
    contexts, context_of = np.unique(top["top_key"][top["top_key"] >= 0], return_inverse=True)
    top_context = np.full(top["top_key"].shape, -1, dtype=np.int32)
    top_context[top["top_key"] >= 0] = context_of
    texts, spans = _windows(read(), model.tokenizer, contexts, window=window)
    encoded = [t.encode() for t in texts]
    return Atlas(
        model_id=model.identity, corpus_fingerprint=fingerprint,
        routing_layers=acc.routing_layers, num_layers=shape["num_layers"],
        groups=shape["groups"], num_experts=acc.num_experts, labels=stats.labels,
        tokens=routed, documents=int(contexts.max() >> _POS_BITS) + 1 if len(contexts) else 0,
        top_weight=top["top_weight"], top_context=top_context, token_ids=top["token_ids"],
        token_weight=top["token_weight"],
        label_mean=stats.mean().reshape(len(stats.labels), len(acc.routing_layers), -1)
        .astype(np.float32),
        label_tokens=stats.tokens, context_doc=(contexts >> _POS_BITS).astype(np.int32),
        context_pos=(contexts & ((1 << _POS_BITS) - 1)).astype(np.int32),
        context_span=np.array(spans, dtype=np.int32).reshape(-1, 2),
        context_offsets=np.concatenate([[0], np.cumsum([len(e) for e in encoded])])
        .astype(np.int64),
        context_text=b"".join(encoded))


def _windows(records: Iterable[Record], tokenizer, keys: np.ndarray, *,
             window: int) -> tuple[list[str], list[tuple[int, int]]]:
    """The text of `window` tokens either side of each context (keys sorted), and the
    context token's character span in it."""
    wanted: dict[int, list[int]] = {}
    for key in keys.tolist():
        wanted.setdefault(key >> _POS_BITS, []).append(key & ((1 << _POS_BITS) - 1))
    texts, spans = [], []
    for document, record in enumerate(records):
        if document not in wanted:
            continue
        ids = tokenizer.encode(record.text, add_bos=False)
        for pos in wanted[document]:
            left = tokenizer.decode(ids[max(0, pos - window):pos])
            token = tokenizer.decode(ids[pos:pos + 1])
            right = tokenizer.decode(ids[pos + 1:pos + 1 + window])
            texts.append(left + token + right)
            spans.append((len(left), len(left) + len(token)))
    if len(texts) != len(keys):
        raise ValueError("the corpus changed while the atlas was built")
    return texts, spans
