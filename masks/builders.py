"""Build mask profiles: route a corpus through the model, accumulate statistics, select.

    stats = collect_label_statistics(model, "corpus.jsonl")          # domain / language
    profile = specificity_profile(stats, "python", name="no-python", kind="language")
    grads = collect_attribution_statistics(model, "corpus.jsonl")    # by loss attribution
    profile = attribution_profile(grads, "python", name="no-python", coverage=0.3)
    profile = learned_profile(model, "corpus.jsonl", "python", name="no-python")  # optimised
    tox = collect_correlation_statistics(model, "rtp.jsonl", score_field="toxicity")
    profile = toxicity_profile(tox, name="detox-0.1", threshold=0.1)
Statistics are per routing layer (layers of a routing group share g1, g2), so a selection
holds for every layer of its group; `layers` restricts a profile to some layers.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from masks.corpus import (
    Batch,
    CorpusError,
    Record,
    Scorer,
    Window,
    batches,
    collate,
    corpus_fingerprint,
    read_corpus,
    records_fingerprint,
    windows,
)
from masks.criteria import correlated_experts, specific_experts
from masks.schema import MaskError, MaskProfile, ProfileKind, Provenance
from masks.statistics import (
    CorrelationAccumulator,
    CorrelationStatistics,
    LabelAccumulator,
    LabelStatistics,
    Method,
    group_layers,
)
from monet_runtime.expert_mask import ExpertMask

__all__ = [
    "BUILDER",
    "attribution_profile",
    "STATISTICS_CRITERIA",
    "collect_attribution_statistics",
    "collect_correlation_statistics",
    "collect_criterion_statistics",
    "collect_label_statistics",
    "composite_profile",
    "criterion_profile",
    "learned_profile",
    "manual_profile",
    "next_token_losses",
    "open_corpus",
    "route_batches",
    "selection_to_mask",
    "specificity_profile",
    "toxicity_profile",
]

BUILDER = "monet-serve masks 0.1"


def _shape(model) -> dict[str, int]:
    c = model.config
    return dict(num_layers=c.num_hidden_layers, num_experts=c.moe_experts, num_heads=c.moe_heads,
                groups=c.moe_groups)


def _routing_layers(model) -> list[int]:
    c = model.config
    return [l for l in range(c.num_hidden_layers) if c.is_routing_layer(l)]


def _tokenizer(model):
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer: load it with load_model(..., tokenizer=True)")
    return model.tokenizer


def _target_index(labels: Sequence[str], target: str) -> int:
    if target not in labels:
        raise ValueError(f"target: label {target!r} is not in the corpus "
                         f"(labels: {', '.join(labels)})")
    return list(labels).index(target)


def _check_labelled(labels: Iterable[str | None], label_field: str) -> None:
    if any(label is None for label in labels):
        raise CorpusError(f"a text has no '{label_field}': label every text")


def next_token_losses(logits: torch.Tensor, ids: torch.Tensor,
                      attention: torch.Tensor) -> torch.Tensor:
    """Loss of each next-token prediction [B, T-1] (0 where the target is padding)."""
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return losses * attention[:, 1:]


def route_batches(
    model,
    records: Iterable[Record],
    *,
    batch_tokens: int = 8192,
    max_length: int = 512,
    scorer: Scorer | None = None,
    progress: bool | str = True,
) -> Iterable[tuple[Batch, dict[int, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]]:
    """Yields (batch, router weights of its routed tokens {routing layer: (g1, g2) [N, H, E]},
    keep [B, T] bool saying which tokens those are, row-major)."""
    tokenizer = _tokenizer(model)
    device = model.device
    bar = tqdm(desc=progress if isinstance(progress, str) else "routing", unit="tok",
               unit_scale=True, disable=not progress)
    try:
        for batch in batches(records, tokenizer, batch_tokens=batch_tokens,
                             max_length=max_length, scorer=scorer):
            with torch.inference_mode():
                out = model(batch.input_ids.to(device), output_router_probs=True,
                            attention_mask=batch.attention_mask.to(device))
            keep = batch.routed_tokens()
            keep_dev = keep.to(device)
            probs = {l: (g1[keep_dev], g2[keep_dev]) for l, (g1, g2) in out.router_probs.items()}
            del out
            yield batch, probs, keep
            bar.update(batch.tokens)
    finally:
        bar.close()


def collect_label_statistics(
    model,
    corpus: str | Path | Iterable[Record],
    *,
    text_field: str = "text",
    label_field: str = "label",
    batch_tokens: int = 8192,
    max_length: int = 512,
    method: Method = "auto",
    fingerprint: str | None = None,
    progress: bool = True,
) -> LabelStatistics:
    """Sum of composite routing weights per label and routing layer over a labelled corpus.
    Records given inline are read as they are routed when `fingerprint` names them, else read
    all first to compute it (likewise for the other collectors)."""
    records, fingerprint = open_corpus(corpus, fingerprint, text_field=text_field,
                                       label_field=label_field)
    acc = LabelAccumulator(routing_layers=_routing_layers(model), method=method,
                           device=model.device, **_shape(model))
    for batch, probs, keep in route_batches(model, records, batch_tokens=batch_tokens,
                                            max_length=max_length, progress=progress):
        _check_labelled(batch.labels, label_field)
        counts = keep.sum(1).tolist()
        labels_T = [label for label, n in zip(batch.labels, counts, strict=True)
                    for _ in range(n)]
        acc.add(probs, labels_T)
    return acc.result(model_id=model.identity, corpus_fingerprint=fingerprint)


def collect_correlation_statistics(
    model,
    corpus: str | Path | Iterable[Record],
    *,
    text_field: str = "text",
    score_field: str | None = "toxicity",
    scorer: Scorer | None = None,
    batch_tokens: int = 8192,
    max_length: int = 512,
    method: Method = "auto",
    fingerprint: str | None = None,
    progress: bool = True,
) -> CorrelationStatistics:
    """Sums for the correlation of composite routing weights with a per-token score: the
    corpus's `score_field` (a number per text, spread over its tokens, or a list with one
    number per token) or `scorer(text)`, which returns the same."""
    records, fingerprint = open_corpus(corpus, fingerprint, text_field=text_field,
                                       label_field="label",
                                       score_field=None if scorer else score_field)
    acc = CorrelationAccumulator(routing_layers=_routing_layers(model), method=method,
                                 device=model.device, **_shape(model))
    for batch, probs, keep in route_batches(model, records, batch_tokens=batch_tokens,
                                            max_length=max_length, scorer=scorer,
                                            progress=progress):
        if batch.scores is None:
            raise CorpusError(f"no scores: give '{score_field}' in the corpus or a scorer")
        acc.add(probs, batch.scores[keep])
    return acc.result(model_id=model.identity, corpus_fingerprint=fingerprint)


def collect_attribution_statistics(
    model,
    corpus: str | Path | Iterable[Record],
    *,
    text_field: str = "text",
    label_field: str = "label",
    batch_tokens: int = 4096,
    max_length: int = 512,
    fingerprint: str | None = None,
    progress: bool = True,
) -> LabelStatistics:
    """Per label and layer, the first-order increase of the summed next-token loss when
    composite expert (layer, i, j) is removed: -sum_t dL/dM_ij at M = 1, where every layer
    computes sum_ij M_ij g_ij(t) E_ij(y_t) densely. Downstream routers pass the derivative
    through their softmax weights; their keep decisions are piecewise constant.

    Routing weight says which experts a label uses; attribution says which ones its
    predictions need. On small models the two differ: an expert can be routed mostly on one
    language yet matter little to it. Costs a forward and backward with [T, E, E] weights per
    layer (for E = 512, route few tokens per batch)."""
    records, fingerprint = open_corpus(corpus, fingerprint, text_field=text_field,
                                       label_field=label_field)
    identity, tokenizer = model.identity, _tokenizer(model)
    model, gates = _gated_copy(model)
    c = model.config
    L, E = c.num_hidden_layers, c.moe_experts
    acc = LabelAccumulator(routing_layers=list(range(L)), num_layers=L, num_experts=E,
                           num_heads=c.moe_heads, groups=1, device=model.device,
                           quantity="attribution")
    bar = tqdm(desc="attributing", unit="tok", unit_scale=True, disable=not progress)
    try:
        for batch in batches(records, tokenizer, batch_tokens=batch_tokens,
                             max_length=max_length):
            _check_labelled(batch.labels, label_field)
            ids = batch.input_ids.to(model.device)
            attention = batch.attention_mask.to(model.device)
            for l in range(L):
                gates[l] = torch.ones(ids.shape[0], E, E, device=model.device,
                                      dtype=torch.promote_types(model.dtype, torch.float32),
                                      requires_grad=True)
            logits = model(ids, attention_mask=attention).logits
            next_token_losses(logits, ids, attention).sum().backward()
            removal = -torch.stack([gates[l].grad for l in range(L)], 1)  # [B, L, E, E]
            acc.add_per_text(removal, batch.labels, attention[:, 1:].sum(1).tolist())
            bar.update(batch.tokens)
    finally:
        bar.close()
    return acc.result(model_id=identity, corpus_fingerprint=fingerprint)


def _gated_copy(model) -> tuple[Any, dict[int, torch.Tensor]]:
    """A private copy of the model whose every layer computes sum_ij M_ij g_ij(t) E_ij(y_t)
    densely, with M = gates[layer]: [B, E, E] (one per text of the batch) or [1, E, E] (one
    for all). The caller fills `gates`; a model serving requests is never touched."""
    model = copy.deepcopy(model).requires_grad_(False)
    E = model.config.moe_experts
    gates: dict[int, torch.Tensor] = {}

    def dense_experts(layer: int):
        moe = model.model.layers[layer].moe

        def forward(y_TD, g1, g2, mask=None, pairs_cache=None):
            M = gates[layer]
            G = torch.einsum("the,thf->tef", g1, g2).view(M.shape[0], -1, E, E) * M[:, None]
            return moe.forward_dense(y_TD, G.view(-1, E, E))
        return forward

    for l, layer in enumerate(model.model.layers):
        layer.moe.forward = dense_experts(l)
    return model, gates


def open_corpus(corpus, fingerprint: str | None = None,
                **fields) -> tuple[Iterable[Record], str]:
    """The records of a corpus file (read lazily) or of inline records, and the corpus
    fingerprint: the file's, the caller's for inline records, or their hash."""
    if isinstance(corpus, (str, Path)):
        return read_corpus(corpus, **fields), corpus_fingerprint(corpus)
    if fingerprint is not None:
        return corpus, fingerprint
    records = list(corpus)
    return records, records_fingerprint(records)


# ---- selections to profiles --------------------------------------------------------------
def selection_to_mask(
    selected_RXX: np.ndarray,
    routing_layers: Sequence[int],
    *,
    groups: int,
    num_layers: int,
    layers: Iterable[int] | None = None,
) -> ExpertMask:
    """bool [R, E, E] per routing layer -> an ExpertMask over every layer of each group."""
    allowed = None if layers is None else set(layers)
    E = selected_RXX.shape[-1]
    out: dict[int, np.ndarray] = {}
    for r, routing_layer in enumerate(routing_layers):
        pairs = np.argwhere(selected_RXX[r])
        for layer in group_layers(routing_layer, groups=groups, num_layers=num_layers):
            if allowed is None or layer in allowed:
                out[layer] = pairs
    return ExpertMask(out, num_experts=E)


def specificity_profile(
    stats: LabelStatistics,
    target: str,
    *,
    name: str,
    kind: ProfileKind = "domain",
    factor: float | None = 2.0,
    floor: float = 0.1,
    min_mass: float = 1.0,
    coverage: float | None = None,
    layers: Iterable[int] | None = None,
    description: str = "",
    created_by: str | None = None,
) -> MaskProfile:
    """Remove the experts specific to `target` (the paper's domain / language masks).

    factor: weight on the target >= factor x weight on the second label (the paper: 2).
    floor: minimum mean weight on the target, in units of the uniform weight H / E^2.
    min_mass: minimum total weight on the target over its tokens (token-equivalents), so that
        an expert seen on a handful of tokens is not selected by noise.
    coverage: take the most specific experts until they carry this share of the target's mass
        (per routing layer); factor then only bounds the candidates (None: all).
    """
    if stats.quantity != "routing":
        raise ValueError(f"specificity_profile needs routing statistics, got {stats.quantity} "
                         "statistics (use attribution_profile)")
    t = _target_index(stats.labels, target)
    E, H = stats.num_experts, stats.num_heads
    uniform = H / E**2
    absolute_floor = max(floor * uniform, min_mass / max(int(stats.tokens[t]), 1))
    mean = stats.mean()  # [labels, R, E, E]
    selected = np.stack([
        specific_experts(mean[:, r].reshape(len(stats.labels), -1), t, factor=factor,
                         floor=absolute_floor, coverage=coverage).reshape(E, E)
        for r in range(len(stats.routing_layers))
    ])
    mask = selection_to_mask(selected, stats.routing_layers, groups=stats.groups,
                             num_layers=stats.num_layers, layers=layers)
    return MaskProfile(
        name=name, description=description, kind=kind, model_id=stats.model_id,
        num_layers=stats.num_layers, num_experts=E, experts=mask,
        provenance=_provenance(
            criterion="coverage" if coverage is not None else "specificity",
            thresholds=dict(factor=factor, floor=floor, min_mass=min_mass, coverage=coverage,
                            absolute_floor=absolute_floor,
                            layers=None if layers is None else ",".join(map(str, layers))),
            corpus_fingerprint=stats.corpus_fingerprint, target=target,
            labels=list(stats.labels), tokens=int(stats.tokens.sum()), created_by=created_by),
    )


def attribution_profile(
    stats: LabelStatistics,
    target: str,
    *,
    name: str,
    kind: ProfileKind = "domain",
    factor: float | None = 2.0,
    coverage: float | None = 0.3,
    layers: Iterable[int] | None = None,
    description: str = "",
    created_by: str | None = None,
) -> MaskProfile:
    """Remove the experts that `target`'s predictions need and the other labels' do not, from
    attribution statistics (collect_attribution_statistics): the specificity criterion on the
    expected loss increase (negative increases count as 0).

    factor: increase on the target >= factor x the largest increase on another label.
    coverage: of those, the most specific until they carry this share of the target's total
        increase, per layer (None: all of them).
    """
    if stats.quantity != "attribution":
        raise ValueError("attribution_profile needs collect_attribution_statistics' output, "
                         f"got {stats.quantity} statistics")
    t = _target_index(stats.labels, target)
    E, K = stats.num_experts, len(stats.labels)
    increase = np.clip(stats.mean(), 0.0, None)  # [labels, L, E, E]
    selected = np.stack([
        specific_experts(increase[:, r].reshape(K, -1), t, factor=factor,
                         coverage=coverage).reshape(E, E)
        for r in range(len(stats.routing_layers))
    ])
    mask = selection_to_mask(selected, stats.routing_layers, groups=stats.groups,
                             num_layers=stats.num_layers, layers=layers)
    return MaskProfile(
        name=name, description=description, kind=kind, model_id=stats.model_id,
        num_layers=stats.num_layers, num_experts=E, experts=mask,
        provenance=_provenance(
            criterion="attribution",
            thresholds=dict(factor=factor, coverage=coverage,
                            layers=None if layers is None else ",".join(map(str, layers))),
            corpus_fingerprint=stats.corpus_fingerprint, target=target,
            labels=list(stats.labels), tokens=int(stats.tokens.sum()), created_by=created_by),
    )


STATISTICS_CRITERIA = {"specificity": "routing", "attribution": "attribution"}
"""The labelled criteria that select from LabelStatistics, with the quantity theirs hold."""


def collect_criterion_statistics(model, corpus: str | Path | Iterable[Record], criterion: str,
                                 **route: Any) -> LabelStatistics:
    """The statistics a criterion selects from: routing weights (specificity) or loss
    attributions (attribution). route: the collect function's keyword arguments."""
    if criterion == "specificity":
        return collect_label_statistics(model, corpus, **route)
    if criterion == "attribution":
        return collect_attribution_statistics(model, corpus, **route)
    raise ValueError(f"criterion must be one of {sorted(STATISTICS_CRITERIA)}, got {criterion!r}")


def criterion_profile(stats: LabelStatistics, target: str, *, criterion: str,
                      factor: float | None, floor: float, min_mass: float,
                      coverage: float | None, **fields: Any) -> MaskProfile:
    """The criterion's selection as a profile: specificity_profile, or attribution_profile
    (which has no floor and min_mass). fields: name, kind, layers, description, created_by."""
    if criterion == "specificity":
        return specificity_profile(stats, target, factor=factor, floor=floor,
                                   min_mass=min_mass, coverage=coverage, **fields)
    if criterion == "attribution":
        return attribution_profile(stats, target, factor=factor, coverage=coverage, **fields)
    raise ValueError(f"criterion must be one of {sorted(STATISTICS_CRITERIA)}, got {criterion!r}")


def learned_profile(
    model,
    corpus: str | Path | Iterable[Record],
    target: str,
    *,
    name: str,
    kind: ProfileKind = "domain",
    collateral: float = 10.0,
    cap: float = 0.3,
    sparsity: float = 0.05,
    steps: int = 120,
    texts_per_label: int = 3,
    lr: float = 0.05,
    max_length: int = 256,
    seed: int = 0,
    fingerprint: str | None = None,
    layers: Iterable[int] | None = None,
    text_field: str = "text",
    label_field: str = "label",
    description: str = "",
    created_by: str | None = None,
    progress: bool = True,
    on_step: Callable[[int, int], None] | None = None,
) -> MaskProfile:
    """Remove the experts found by optimising the goal itself rather than a statistic.

    Every layer computes sum_ij M_ij g_ij(t) E_ij(y_t) with a keep-gate M_ij in [0, 1] per
    composite expert and layer, starting at 1. Adam (projected onto [0, 1]) minimises, over
    `steps` batches of `texts_per_label` windows of each label (twice that of the target),

        -min(d_target, cap) + collateral * max(mean_other d_label, 0) + sparsity * mean(1 - M)

    where d_label is the label's mean loss increase per token over the unmasked model on the
    batch: hurt the target (up to `cap` nats), not the others on average, with few experts.
    The penalty is on the mean: a penalty per label, max(d_label, 0), turns each label's batch
    noise into a push to make it gain, bought with the target (on the shipped model,
    JavaScript's mask fell from 0.14 to 0.09 nats on valid texts with it). The experts
    whose gate ends below 1/2 are removed. First-order criteria (attribution) predict the
    effect of each removal alone; this one sees the removals together. Costs `steps` forward
    and backward passes with [T, E, E] weights per layer, plus, once per window drawn, a
    forward for the base; `on_step(done, steps)` is called after each.
    """
    if steps < 1 or texts_per_label < 1:
        raise ValueError("steps and texts_per_label must be at least 1")
    if collateral < 0 or cap <= 0 or sparsity < 0 or lr <= 0:
        raise ValueError("collateral and sparsity must be >= 0, cap and lr > 0")
    records, fingerprint = open_corpus(corpus, fingerprint, text_field=text_field,
                                       label_field=label_field)
    identity, tokenizer = model.identity, _tokenizer(model)
    by_label: dict[str, list[Window]] = {}
    for window in windows(records, tokenizer, max_length=max_length):
        _check_labelled([window.label], label_field)
        by_label.setdefault(window.label, []).append(window)
    labels = sorted(by_label)
    _target_index(labels, target)
    if len(labels) < 2:
        raise CorpusError("a learned mask needs texts of at least one label besides the target")
    model, gates = _gated_copy(model)
    c, device = model.config, model.device
    L, E = c.num_hidden_layers, c.moe_experts
    keep = torch.ones(L, E, E, device=device, requires_grad=True)
    ones = torch.ones(1, E, E, device=device)
    optimiser = torch.optim.Adam([keep], lr=lr)
    rng = random.Random(seed)
    tokens = 0

    def row_losses(batch: Batch, M: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of the batch: summed next-token loss, and the number of its targets."""
        for l in range(L):
            gates[l] = M[l]
        ids, attention = batch.input_ids.to(device), batch.attention_mask.to(device)
        loss = next_token_losses(model(ids, attention_mask=attention).logits, ids, attention)
        return loss.sum(1), attention[:, 1:].sum(1)

    def per_label(sums, counts, batch_labels) -> dict[str, torch.Tensor]:
        rows = {label: [i for i, lb in enumerate(batch_labels) if lb == label]
                for label in labels}
        return {label: sums[rows[label]].sum() / counts[rows[label]].sum() for label in labels}

    # The unmasked model's loss of a window never changes: computed once per window, the
    # first time a batch draws it, instead of a third forward pass at every step.
    base_loss: dict[int, tuple[float, float]] = {}  # id(window) -> (loss sum, targets)

    bar = tqdm(range(steps), desc=f"learning no-{target}", disable=not progress)
    try:
        for step in bar:
            drawn = [w for label in labels for w in rng.sample(
                by_label[label], min(len(by_label[label]),
                                     texts_per_label * (2 if label == target else 1)))]
            batch = collate(drawn)
            tokens += batch.tokens
            new = list({id(w): w for w in drawn if id(w) not in base_loss}.values())
            if new:
                with torch.no_grad():
                    sums, counts = row_losses(collate(new), [ones] * L)
                base_loss.update({id(w): (s, c) for w, s, c in zip(
                    new, sums.tolist(), counts.tolist(), strict=True)})
            base = per_label(torch.tensor([base_loss[id(w)][0] for w in drawn]),
                             torch.tensor([base_loss[id(w)][1] for w in drawn]), batch.labels)
            masked = per_label(*row_losses(batch, [keep[l : l + 1] for l in range(L)]),
                               batch.labels)
            delta = {label: masked[label] - base[label] for label in labels}
            others = torch.stack([delta[label] for label in labels if label != target]).mean()
            objective = (-delta[target].clamp(max=cap) + collateral * others.clamp(min=0)
                         + sparsity * (1 - keep).mean())
            optimiser.zero_grad()
            objective.backward()
            optimiser.step()
            with torch.no_grad():
                keep.clamp_(0, 1)
            bar.set_postfix(target=f"{delta[target].item():+.3f}",
                            others=f"{others.item():+.3f}",
                            removed=int((keep < 0.5).sum()))
            if on_step is not None:
                on_step(step + 1, steps)
    finally:
        bar.close()
    selected = (keep < 0.5).detach().cpu().numpy()
    mask = selection_to_mask(selected, list(range(L)), groups=1, num_layers=L, layers=layers)
    return MaskProfile(
        name=name, description=description, kind=kind, model_id=identity,
        num_layers=L, num_experts=E, experts=mask,
        provenance=_provenance(
            criterion="learned",
            thresholds=dict(collateral=collateral, cap=cap, sparsity=sparsity, steps=steps,
                            texts_per_label=texts_per_label, lr=lr, max_length=max_length,
                            seed=seed,
                            layers=None if layers is None else ",".join(map(str, layers))),
            corpus_fingerprint=fingerprint, target=target, labels=labels, tokens=tokens,
            created_by=created_by),
    )


def toxicity_profile(
    stats: CorrelationStatistics,
    *,
    name: str,
    threshold: float = 0.1,
    layers: Iterable[int] | None = None,
    description: str = "",
    created_by: str | None = None,
) -> MaskProfile:
    """Remove experts whose routing weight correlates with toxicity above `threshold`
    (the paper: 0.2 / 0.1 / 0.05 removed about 1% / 4% / 14%)."""
    selected = correlated_experts(stats.pearson(), threshold)
    mask = selection_to_mask(selected, stats.routing_layers, groups=stats.groups,
                             num_layers=stats.num_layers, layers=layers)
    return MaskProfile(
        name=name, description=description, kind="toxicity", model_id=stats.model_id,
        num_layers=stats.num_layers, num_experts=stats.num_experts, experts=mask,
        provenance=_provenance(
            criterion="pearson",
            thresholds=dict(threshold=threshold,
                            layers=None if layers is None else ",".join(map(str, layers))),
            corpus_fingerprint=stats.corpus_fingerprint, tokens=stats.n,
            created_by=created_by),
    )


def manual_profile(
    experts: ExpertMask | dict[str, Any] | str | Path,
    *,
    name: str,
    model_id: str,
    num_layers: int,
    num_experts: int,
    description: str = "",
    created_by: str | None = None,
) -> MaskProfile:
    """A profile from a hand-made list: an ExpertMask, its JSON form, or a JSON file."""
    mask = experts if isinstance(experts, ExpertMask) else ExpertMask.from_json(
        experts if isinstance(experts, dict) else Path(experts), num_experts=num_experts)
    mask = mask.validate(num_layers=num_layers, num_experts=num_experts)  # MaskError, clearly
    return MaskProfile(
        name=name, description=description, kind="manual", model_id=model_id,
        num_layers=num_layers, num_experts=num_experts, experts=mask,
        provenance=_provenance(criterion="manual", created_by=created_by),
    )


def composite_profile(
    parts: Sequence[MaskProfile],
    *,
    name: str,
    description: str = "",
    created_by: str | None = None,
) -> MaskProfile:
    """The union of other profiles, all built for the same model."""
    if not parts:
        raise MaskError("a composite profile needs at least one part")
    first = parts[0]
    for part in parts[1:]:
        if (part.model_id, part.num_layers, part.num_experts) != (
                first.model_id, first.num_layers, first.num_experts):
            raise MaskError(f"cannot combine '{part.name}' (model {part.model_id}) with "
                            f"'{first.name}' (model {first.model_id})")
    mask = first.experts
    for part in parts[1:]:
        mask = mask | part.experts
    return MaskProfile(
        name=name, description=description, kind="composite", model_id=first.model_id,
        num_layers=first.num_layers, num_experts=first.num_experts, experts=mask,
        provenance=_provenance(criterion="union", created_by=created_by,
                               sources=[f"{p.name}@{p.version}" for p in parts]),
    )


def _provenance(*, created_by: str | None, **fields) -> Provenance:
    extra = {} if created_by is None else {"created_by": created_by}
    return Provenance(builder=BUILDER, **fields, **extra)

