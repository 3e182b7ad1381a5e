"""Routing statistics of composite experts, accumulated per label and routing layer.

The weight of composite expert (i, j) for token t is g_ij(t) = sum_h g1[t,h,i] g2[t,h,j]. The
sums over tokens that the criteria need never build the per-token [T, E, E] tensor:
  dense   sum_t w_t g_ij(t) = (w * g1 as [T*H, E]).T @ (g2 as [T*H, E]): T*H*E^2 flops, best on
          GPUs and for small E;
  sparse  each (t, h) keeps about k experts per side (the router zeroes the rest), so the
          outer products of the kept weights (about k^2 per row) are scattered into an E*E
          accumulator: about T*H*k^2 adds, best on CPUs for E = 512.
sum_t g_ij(t)^2 (for Pearson) adds the heads of one token before squaring: dense as the H^2
matmuls of (g1_h * g1_h').T @ (g2_h * g2_h'), sparse by merging equal (t, i, j) keys.
Legend: T tokens, H routing heads, E experts per side, R routing layers, P kept pairs.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

__all__ = [
    "CorrelationAccumulator",
    "CorrelationStatistics",
    "LabelAccumulator",
    "LabelStatistics",
    "composite_sums",
    "composite_square_sums",
    "group_layers",
]

Method = Literal["auto", "dense", "sparse"]
_SPARSE_CHUNK = 2048  # tokens per step of the sparse path: about 2048 * H * k^2 pairs at once


def _at_least_float32(g: torch.Tensor) -> torch.Tensor:
    return g.to(torch.promote_types(g.dtype, torch.float32))


def _method(method: Method, g: torch.Tensor) -> str:
    if method != "auto":
        return method
    return "dense" if g.is_cuda or g.shape[-1] <= 64 else "sparse"


def _pair_keys(
    g1_THE: torch.Tensor,
    g2_THE: torch.Tensor,
    base_T: torch.Tensor,
    weights_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pair of nonzero weights of one (t, h): key (base_t * E + i) * E + j and value
    w_t g1[t,h,i] g2[t,h,j], both [P] with P about T*H*k^2 (exact counts per row, no padding).

    Each side-1 entry of a row meets every side-2 entry of that row: side-1 entries are
    repeated by the row's side-2 count and matched to consecutive side-2 entries.
    """
    T, H, E = g1_THE.shape
    a, b = g1_THE.reshape(T * H, E), g2_THE.reshape(T * H, E)
    row1, i = a.nonzero(as_tuple=True)  # row-major: grouped by row
    row2, j = b.nonzero(as_tuple=True)
    v1, v2 = a[row1, i], b[row2, j]
    token1 = row1 // H
    if weights_T is not None:
        v1 = v1 * weights_T.to(v1.dtype)[token1]
    base1 = (base_T[token1] * E + i) * E
    per_row2 = torch.bincount(row2, minlength=T * H)
    repeat = per_row2[row1]
    # side-2 index of the first pair of each side-1 entry, minus that pair's position
    offset1 = (per_row2.cumsum(0) - per_row2)[row1] - (repeat.cumsum(0) - repeat)
    src1 = torch.repeat_interleave(repeat)  # [P]
    src2 = offset1[src1] + torch.arange(src1.numel(), device=a.device)
    return base1[src1] + j[src2], v1[src1] * v2[src2]


def composite_sums(
    g1_THE: torch.Tensor,
    g2_THE: torch.Tensor,
    *,
    groups_T: torch.Tensor | None = None,
    num_groups: int = 1,
    weights_T: torch.Tensor | None = None,
    method: Method = "auto",
) -> torch.Tensor:
    """sum over tokens of w_t g_ij(t), per group: float64 [num_groups, E, E].

    g1_THE, g2_THE: float [T, H, E] router weights; groups_T: long [T] in [0, num_groups)
    (default all 0); weights_T: float [T] per-token weights (default 1).
    """
    T, H, E = g1_THE.shape
    groups = torch.zeros(T, dtype=torch.long, device=g1_THE.device) if groups_T is None \
        else groups_T.to(g1_THE.device)
    out = torch.zeros(num_groups, E, E, dtype=torch.float64, device=g1_THE.device)
    if T == 0:
        return out
    g1, g2 = _at_least_float32(g1_THE), _at_least_float32(g2_THE)
    if _method(method, g1_THE) == "dense":
        if weights_T is not None:
            g1 = g1 * weights_T.to(g1.dtype)[:, None, None]
        for group in groups.unique().tolist():
            rows = groups == group
            a = g1[rows].reshape(-1, E)  # [T_g * H, E]
            b = g2[rows].reshape(-1, E)
            out[group] += (a.T @ b).double()
        return out
    for start in range(0, T, _SPARSE_CHUNK):  # bounds the pairs held at once
        part = slice(start, start + _SPARSE_CHUNK)
        key, val = _pair_keys(g1[part], g2[part], groups[part],
                              None if weights_T is None else weights_T[part])
        out += torch.bincount(key, weights=val.double(),
                              minlength=num_groups * E * E).view(num_groups, E, E)
    return out


def composite_square_sums(
    g1_THE: torch.Tensor, g2_THE: torch.Tensor, *, method: Method = "auto",
    chunk: int = 1024,
) -> torch.Tensor:
    """sum over tokens of g_ij(t)^2: float64 [E, E]."""
    T, H, E = g1_THE.shape
    out = torch.zeros(E * E, dtype=torch.float64, device=g1_THE.device)
    if T == 0:
        return out.view(E, E)
    g1, g2 = _at_least_float32(g1_THE), _at_least_float32(g2_THE)
    if _method(method, g1_THE) == "dense":
        for start in range(0, T, chunk):  # [t, h, h', E] products of two heads' weights
            a = (g1[start:start + chunk, :, None, :] * g1[start:start + chunk, None, :, :])
            b = (g2[start:start + chunk, :, None, :] * g2[start:start + chunk, None, :, :])
            out += (a.reshape(-1, E).T @ b.reshape(-1, E)).double().reshape(-1)
        return out.view(E, E)
    for start in range(0, T, _SPARSE_CHUNK):
        part = slice(start, start + _SPARSE_CHUNK)
        n = g1[part].shape[0]
        tokens = torch.arange(n, device=g1.device) if H > 1 else torch.zeros(
            n, dtype=torch.long, device=g1.device)
        key, val = _pair_keys(g1[part], g2[part], tokens)
        val = val.double()
        if H > 1:  # add the heads of one token before squaring: merge equal (t, i, j)
            key, inverse = torch.unique(key, return_inverse=True)
            val = torch.zeros(key.numel(), dtype=torch.float64, device=key.device).index_add_(
                0, inverse, val)
            key = key % (E * E)
        out += torch.bincount(key, weights=val.square(), minlength=E * E)
    return out.view(E, E)


def group_layers(routing_layer: int, *, groups: int, num_layers: int) -> list[int]:
    """The layers that use the routing of `routing_layer` (l - l % G == routing_layer)."""
    return list(range(routing_layer, min(routing_layer + groups, num_layers)))


# ---- per label: domain and language profiles ----------------------------------------------
@dataclass
class LabelStatistics:
    """Sum over each label's tokens of a per-expert quantity, and the token counts.

    quantity "routing": g_ij per routing layer; layers l of a routing group share the
    statistics of routing layer l - l % G. quantity "attribution": the first-order loss
    increase of removing (layer, i, j), per layer (routing_layers lists every layer, groups 1).
    mass: float64 [labels, R, E, E]; tokens: int64 [labels].
    """

    labels: list[str]
    routing_layers: list[int]
    num_layers: int
    num_experts: int
    num_heads: int
    groups: int
    mass: np.ndarray
    tokens: np.ndarray
    model_id: str = ""
    corpus_fingerprint: str = ""
    quantity: Literal["routing", "attribution"] = "routing"

    def mean(self) -> np.ndarray:
        """Mean per token: float64 [labels, R, E, E]."""
        return self.mass / np.maximum(self.tokens, 1)[:, None, None, None]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        meta = {k: getattr(self, k) for k in ("labels", "routing_layers", "num_layers",
                                               "num_experts", "num_heads", "groups",
                                               "model_id", "corpus_fingerprint", "quantity")}
        with path.open("wb") as f:
            np.savez(f, mass=self.mass, tokens=self.tokens, meta=np.array(json.dumps(meta)))
        return path

    @classmethod
    def load(cls, path: str | Path) -> LabelStatistics:
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            return cls(mass=data["mass"], tokens=data["tokens"], **meta)


@dataclass
class LabelAccumulator:
    """Streams router weights of labelled tokens (add), or per-text sums of another quantity
    (add_per_text), into LabelStatistics."""

    routing_layers: list[int]
    num_layers: int
    num_experts: int
    num_heads: int
    groups: int
    method: Method = "auto"
    device: str | torch.device = "cpu"
    quantity: Literal["routing", "attribution"] = "routing"
    labels: list[str] = field(default_factory=list)
    _mass: list[torch.Tensor] = field(default_factory=list)  # per label: [R, E, E] float64
    _tokens: list[int] = field(default_factory=list)

    def _index(self, label: str) -> int:
        if label not in self.labels:
            E, R = self.num_experts, len(self.routing_layers)
            self.labels.append(label)
            self._mass.append(torch.zeros(R, E, E, dtype=torch.float64, device=self.device))
            self._tokens.append(0)
        return self.labels.index(label)

    def add(self, router_probs: dict[int, tuple[torch.Tensor, torch.Tensor]],
            labels_T: list[str]) -> None:
        """router_probs: routing layer -> (g1, g2) [T, H, E] of real tokens; labels_T: [T]."""
        index = [self._index(label) for label in labels_T]
        present = sorted(set(index))
        local = {g: n for n, g in enumerate(present)}
        any_g = next(iter(router_probs.values()))[0]
        groups_T = torch.tensor([local[i] for i in index], dtype=torch.long,
                                device=any_g.device)
        for r, layer in enumerate(self.routing_layers):
            g1, g2 = router_probs[layer]
            sums = composite_sums(g1, g2, groups_T=groups_T, num_groups=len(present),
                                  method=self.method).to(self.device)
            for n, label in enumerate(present):
                self._mass[label][r] += sums[n]
        for label, count in Counter(index).items():
            self._tokens[label] += count

    def add_per_text(self, sums_BREE: torch.Tensor, labels_B: list[str],
                     tokens_B: list[int]) -> None:
        """sums_BREE: float [B, R, E, E], each text's sum over its tokens; tokens_B: counts."""
        for row, label in enumerate(labels_B):
            n = self._index(label)
            self._mass[n] += sums_BREE[row].to(self._mass[n])
            self._tokens[n] += tokens_B[row]

    def result(self, *, model_id: str = "", corpus_fingerprint: str = "") -> LabelStatistics:
        E, R = self.num_experts, len(self.routing_layers)
        order = sorted(range(len(self.labels)), key=self.labels.__getitem__)
        mass = (torch.stack([self._mass[n] for n in order]).cpu().numpy() if order
                else np.zeros((0, R, E, E)))
        return LabelStatistics(
            labels=[self.labels[n] for n in order], routing_layers=list(self.routing_layers),
            num_layers=self.num_layers, num_experts=E, num_heads=self.num_heads, groups=self.groups,
            mass=mass, tokens=np.array([self._tokens[n] for n in order], dtype=np.int64),
            model_id=model_id, corpus_fingerprint=corpus_fingerprint, quantity=self.quantity)


# ---- per token score: toxicity profiles ---------------------------------------------------
@dataclass
class CorrelationStatistics:
    """Sums for the Pearson correlation, over tokens, of g_ij(t) with a score s(t).

    n tokens; sum_s, sum_s2 scalars; sum_x, sum_x2, sum_xs float64 [R, E, E].
    """

    routing_layers: list[int]
    num_layers: int
    num_experts: int
    num_heads: int
    groups: int
    n: int
    sum_s: float
    sum_s2: float
    sum_x: np.ndarray
    sum_x2: np.ndarray
    sum_xs: np.ndarray
    model_id: str = ""
    corpus_fingerprint: str = ""

    def pearson(self) -> np.ndarray:
        """Correlation per expert, float64 [R, E, E]; NaN where either side is constant."""
        from masks.criteria import pearson_from_sums

        return pearson_from_sums(self.n, self.sum_s, self.sum_s2, self.sum_x, self.sum_x2,
                                 self.sum_xs)

    def mean(self) -> np.ndarray:
        return self.sum_x / max(self.n, 1)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        meta = {k: getattr(self, k) for k in ("routing_layers", "num_layers", "num_experts",
                                               "num_heads", "groups", "n", "sum_s", "sum_s2",
                                               "model_id", "corpus_fingerprint")}
        with path.open("wb") as f:
            np.savez(f, sum_x=self.sum_x, sum_x2=self.sum_x2, sum_xs=self.sum_xs,
                     meta=np.array(json.dumps(meta)))
        return path

    @classmethod
    def load(cls, path: str | Path) -> CorrelationStatistics:
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            return cls(sum_x=data["sum_x"], sum_x2=data["sum_x2"], sum_xs=data["sum_xs"], **meta)


@dataclass
class CorrelationAccumulator:
    routing_layers: list[int]
    num_layers: int
    num_experts: int
    num_heads: int
    groups: int
    method: Method = "auto"
    device: str | torch.device = "cpu"
    n: int = 0
    sum_s: float = 0.0
    sum_s2: float = 0.0
    _sums: torch.Tensor | None = None  # [3, R, E, E]: x, x^2, x*s

    def add(self, router_probs: dict[int, tuple[torch.Tensor, torch.Tensor]],
            scores_T: torch.Tensor) -> None:
        """router_probs: routing layer -> (g1, g2) [T, H, E]; scores_T: float [T]."""
        E, R = self.num_experts, len(self.routing_layers)
        if self._sums is None:
            self._sums = torch.zeros(3, R, E, E, dtype=torch.float64, device=self.device)
        s = scores_T.double()
        self.n += int(s.numel())
        self.sum_s += float(s.sum())
        self.sum_s2 += float(s.square().sum())
        for r, layer in enumerate(self.routing_layers):
            g1, g2 = router_probs[layer]
            self._sums[0, r] += composite_sums(g1, g2, method=self.method)[0].to(self.device)
            self._sums[1, r] += composite_square_sums(g1, g2, method=self.method).to(self.device)
            self._sums[2, r] += composite_sums(g1, g2, weights_T=s.to(g1.device),
                                               method=self.method)[0].to(self.device)

    def result(self, *, model_id: str = "", corpus_fingerprint: str = "") -> CorrelationStatistics:
        E, R = self.num_experts, len(self.routing_layers)
        sums = (self._sums.cpu().numpy() if self._sums is not None
                else np.zeros((3, R, E, E)))
        return CorrelationStatistics(
            routing_layers=list(self.routing_layers), num_layers=self.num_layers,
            num_experts=E, num_heads=self.num_heads, groups=self.groups, n=self.n,
            sum_s=self.sum_s, sum_s2=self.sum_s2, sum_x=sums[0], sum_x2=sums[1],
            sum_xs=sums[2], model_id=model_id, corpus_fingerprint=corpus_fingerprint)
