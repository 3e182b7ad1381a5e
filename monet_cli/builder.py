"""Mask profile builds for the server's POST /masks/{name}/build (server.jobs.ProfileBuilder):
route the corpus through the runtime model with masks.builders, reporting progress as the
records are consumed.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["RuntimeProfileBuilder"]


class _Counted:
    """Records, counted as they are consumed (progress = consumed / total)."""

    def __init__(self, records: list, progress: Callable[[float, str], None], share: float):
        self.records, self.progress, self.share = records, progress, share

    def __iter__(self) -> Iterator:
        total = max(len(self.records), 1)
        for n, record in enumerate(self.records, 1):
            yield record
            if n % 16 == 0 or n == total:
                self.progress(self.share * n / total, f"routed {n}/{total} texts")


class RuntimeProfileBuilder:
    """Builds with a runtime model (loaded on first use when the engine is not the runtime)."""

    def __init__(self, model: Any | Callable[[], Any]):
        self._model, self._lock = model, threading.Lock()

    def model(self):
        with self._lock:
            if callable(self._model) and not hasattr(self._model, "config"):
                self._model = self._model()
            return self._model

    def build(self, spec, *, name: str, created_by: str, parts: list, corpus: Path | None,
              progress: Callable[[float, str], None]):
        from masks import builders

        if spec.kind == "composite":
            return builders.composite_profile(parts, name=name, description=spec.description,
                                              created_by=created_by)
        model = self.model()
        records, fingerprint = self._records(spec, corpus)
        counted = _Counted(records, progress, 0.8 if spec.evaluate else 0.95)
        if spec.kind == "toxicity":
            stats = self._correlation(model, counted, spec, fingerprint)
            profile = builders.toxicity_profile(
                stats, name=name, threshold=spec.threshold, layers=spec.layers,
                description=spec.description, created_by=created_by)
        elif spec.criterion == "learned":  # the texts are read first, then optimised on
            share = counted.share
            profile = builders.learned_profile(
                model, records, spec.target, name=name, kind=spec.kind,
                max_length=spec.max_length, layers=spec.layers, description=spec.description,
                created_by=created_by, progress=False,
                on_step=lambda n, steps: progress(share * n / steps, f"step {n}/{steps}"))
        elif spec.criterion == "attribution":
            stats = builders.collect_attribution_statistics(
                model, counted, max_length=spec.max_length, progress=False)
            self._check_target(spec, stats)
            profile = builders.attribution_profile(
                stats, spec.target, name=name, kind=spec.kind, factor=spec.factor,
                coverage=spec.coverage, layers=spec.layers, description=spec.description,
                created_by=created_by)
        else:
            stats = self._labels(model, counted, spec, fingerprint)
            profile = builders.specificity_profile(
                stats, spec.target, name=name, kind=spec.kind, factor=spec.factor,
                floor=spec.floor, min_mass=spec.min_mass, coverage=spec.coverage,
                layers=spec.layers, description=spec.description, created_by=created_by)
        if spec.evaluate:
            from masks.evaluate import evaluate_profile

            progress(0.85, "evaluating")
            report = evaluate_profile(model, profile, records, target=spec.target,
                                      max_length=spec.max_length, progress=False)
            profile = profile.with_evaluation(report)
        return profile

    @staticmethod
    def _records(spec, corpus: Path | None) -> tuple[list, str]:
        from masks.corpus import Record, corpus_fingerprint, read_corpus

        if corpus is not None:
            return (list(read_corpus(corpus, score_field=spec.score_field)),
                    corpus_fingerprint(corpus))
        records = [Record(r.text, r.label, r.score) for r in spec.records]
        digest = hashlib.sha256(repr([(r.text, r.label, r.score) for r in records]).encode())
        return records, f"sha256:{digest.hexdigest()[:32]}"

    @staticmethod
    def _shape(model) -> dict[str, Any]:
        c = model.config
        return dict(routing_layers=[l for l in range(c.num_hidden_layers)
                                    if c.is_routing_layer(l)],
                    num_layers=c.num_hidden_layers, num_experts=c.moe_experts,
                    num_heads=c.moe_heads, groups=c.moe_groups, device=model.device)

    def _labels(self, model, records: Iterable, spec, fingerprint: str):
        from masks.builders import route_batches
        from masks.corpus import CorpusError
        from masks.statistics import LabelAccumulator

        acc = LabelAccumulator(**self._shape(model))
        for batch, probs, keep in route_batches(model, records, max_length=spec.max_length,
                                                progress=False):
            if any(label is None for label in batch.labels):
                raise CorpusError("a text has no label: label every text")
            counts = keep.sum(1).tolist()
            acc.add(probs, [label for label, n in zip(batch.labels, counts) for _ in range(n)])
        stats = acc.result(model_id=model.identity, corpus_fingerprint=fingerprint)
        self._check_target(spec, stats)
        return stats

    @staticmethod
    def _check_target(spec, stats) -> None:
        if spec.target not in stats.labels:
            raise ValueError(f"target: label {spec.target!r} is not in the corpus "
                             f"(labels: {', '.join(stats.labels)})")

    def _correlation(self, model, records: Iterable, spec, fingerprint: str):
        from masks.builders import route_batches
        from masks.corpus import CorpusError
        from masks.statistics import CorrelationAccumulator

        acc = CorrelationAccumulator(**self._shape(model))
        for batch, probs, keep in route_batches(model, records, max_length=spec.max_length,
                                                progress=False):
            if batch.scores is None:
                raise CorpusError("toxicity: every text needs a score")
            acc.add(probs, batch.scores[keep])
        return acc.result(model_id=model.identity, corpus_fingerprint=fingerprint)
