"""Build an expert atlas (masks.atlas): route a corpus once, stream per-expert summaries.

Per routing layer the state is fixed-size, whatever the corpus: for X = E * E composite
experts, the top-N (weight, context key) [N, X] and the top-M (token id, summed weight) [M, X],
plus the per-label sums of masks.statistics.LabelAccumulator [L, X]. Tokens are taken C at a
time, C = chunk_elements // X (16 at the release shape, E = 512), so the dense g_ij block
[C, X] stays bounded too; each block is merged into the state by one torch.topk over
[N + C, X] (the top-N is exact: a token in the overall top-N of an expert is in the top-N of
its block merged with the state so far). The token sketch adds a block's sums to the ids
already held and keeps the M largest; an id pushed out loses what it had (exact while an
expert sees at most M distinct tokens; the heavy ones stay). Windows of text are cut after the
pass, from a second read of the corpus, for the contexts that ended in some top-N only.
Legend: T tokens, H heads, E experts per side, X = E * E, R routing layers, C block tokens.
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
from masks.statistics import LabelAccumulator

__all__ = ["AtlasAccumulator", "build_atlas", "route_documents"]

UNLABELLED = "(unlabelled)"
_POS_BITS = 32  # context key = document << 32 | position


class AtlasAccumulator:
    """Streaming top-N contexts and top-M tokens per composite expert, and label sums."""

    def __init__(self, *, routing_layers: list[int], num_layers: int, num_experts: int,
                 num_heads: int, groups: int, top_n: int = 16, top_tokens: int = 16,
                 chunk_elements: int = 1 << 22, device: str | torch.device = "cpu"):
        X, R = num_experts ** 2, len(routing_layers)
        self.routing_layers, self.num_experts = list(routing_layers), num_experts
        self.block = max(1, chunk_elements // X)  # tokens per dense [C, X] block
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
            for start in range(0, g1.shape[0], self.block):
                part = slice(start, start + self.block)
                g_CX = torch.einsum("thi,thj->tij", g1[part].float(),
                                    g2[part].float()).flatten(1)
                self._merge_top(r, g_CX, keys_T[part].to(g_CX.device))
                self._merge_tokens(r, g_CX, token_ids_T[part].to(g_CX.device))

    def _merge_top(self, r: int, g_CX: torch.Tensor, keys_C: torch.Tensor) -> None:
        N = self.top_w.shape[1]
        w = torch.cat([self.top_w[r], g_CX])  # [N + C, X]
        keys = torch.cat([self.top_key[r], keys_C[:, None].expand_as(g_CX)])
        best, index = w.topk(N, dim=0)
        self.top_w[r], self.top_key[r] = best, keys.gather(0, index)

    def _merge_tokens(self, r: int, g_CX: torch.Tensor, ids_C: torch.Tensor) -> None:
        M, X = self.tok_w.shape[1:]
        uniq, inverse = ids_C.unique(return_inverse=True)  # [U]
        sums = torch.zeros(len(uniq), X, device=g_CX.device).scatter_add_(  # [U, X]
            0, inverse[:, None].expand_as(g_CX), g_CX)  # (index_add_ is 30x slower on CPU)
        held, held_w = self.tok_id[r], self.tok_w[r]  # [M, X]
        at = torch.searchsorted(uniq, held.clamp(min=0)).clamp(max=len(uniq) - 1)
        found = (held >= 0) & (uniq[at] == held)
        held_w = held_w + torch.where(found, sums.gather(0, at), 0.0)
        taken = torch.zeros(len(uniq), X, dtype=torch.int32, device=g_CX.device)
        sums[taken.scatter_add_(0, at, found.int()) > 0] = 0.0  # now counted in held_w
        w = torch.cat([held_w, sums])
        ids = torch.cat([held, uniq[:, None].expand(-1, X)])
        best, index = w.topk(M, dim=0)
        self.tok_w[r], self.tok_id[r] = best, torch.where(best > 0, ids.gather(0, index), -1)

    def result(self) -> dict[str, np.ndarray]:
        """Arrays [R, X, N] / [R, X, M] (experts first), keys -1 where the weight is 0."""
        top_key = torch.where(self.top_w > 0, self.top_key, -1)
        return {"top_weight": self.top_w.transpose(1, 2).cpu().numpy(),
                "top_key": top_key.transpose(1, 2).cpu().numpy(),
                "token_ids": self.tok_id.transpose(1, 2).to(torch.int32).cpu().numpy(),
                "token_weight": self.tok_w.transpose(1, 2).cpu().numpy()}


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
                           top_tokens=top_tokens, device=model.device, **shape)
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
