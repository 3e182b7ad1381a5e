"""Mask profile builds for the server's POST /masks/{name}/build (server.jobs.ProfileBuilder)
and atlas builds for POST /experts/build (server.jobs.AtlasBuilder): route the corpus through
the runtime model with masks.builders / masks.atlas_build, reporting progress.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
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
    """Builds profiles and atlases with a runtime model (loaded on first use when the engine is
    not the runtime)."""

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
        route = dict(max_length=spec.max_length, fingerprint=fingerprint, progress=False)
        if spec.kind == "toxicity":
            stats = builders.collect_correlation_statistics(
                model, counted, score_field=spec.score_field, **route)
            profile = builders.toxicity_profile(
                stats, name=name, threshold=spec.threshold, layers=spec.layers,
                description=spec.description, created_by=created_by)
        elif spec.criterion == "learned":  # read first, then optimised on in 256-token windows
            share = counted.share
            profile = builders.learned_profile(
                model, records, spec.target, name=name, kind=spec.kind, steps=spec.steps,
                layers=spec.layers,
                description=spec.description, created_by=created_by, fingerprint=fingerprint,
                progress=False,
                on_step=lambda n, steps: progress(share * n / steps, f"step {n}/{steps}"))
        else:
            stats = builders.collect_criterion_statistics(model, counted, spec.criterion,
                                                          **route)
            profile = builders.criterion_profile(
                stats, spec.target, criterion=spec.criterion, factor=spec.factor,
                floor=spec.floor, min_mass=spec.min_mass, coverage=spec.coverage, name=name,
                kind=spec.kind, layers=spec.layers, description=spec.description,
                created_by=created_by)
        if spec.evaluate:
            from masks.evaluate import evaluate_profile

            progress(0.85, "evaluating")
            report = evaluate_profile(model, profile, records, target=spec.target,
                                      max_length=spec.max_length, progress=False)
            profile = profile.with_evaluation(report)
        return profile

    def build_atlas(self, spec, *, corpus: Path | None, progress: Callable[[float, str], None]):
        """server.jobs.AtlasBuilder: the expert atlas (masks.atlas_build) of the model."""
        from masks.atlas_build import build_atlas
        from masks.corpus import Record, corpus_fingerprint, read_corpus, records_fingerprint

        model = self.model()
        if corpus is not None:
            records, fingerprint = list(read_corpus(corpus)), corpus_fingerprint(corpus)
        else:
            records = [Record(r.text, r.label) for r in spec.records]
            fingerprint = records_fingerprint(records)
        total = max(sum(len(model.tokenizer.encode(r.text, add_bos=False)) for r in records), 1)
        return build_atlas(model, records, fingerprint=fingerprint, top_n=spec.top_n,
                           top_tokens=spec.top_tokens, window=spec.window,
                           max_length=spec.max_length,
                           progress=lambda n: progress(0.95 * n / total,
                                                       f"routed {n}/{total} tokens"))

    @staticmethod
    def _records(spec, corpus: Path | None) -> tuple[list, str]:
        from masks.corpus import Record, corpus_fingerprint, read_corpus, records_fingerprint

        if corpus is not None:
            return (list(read_corpus(corpus, score_field=spec.score_field)),
                    corpus_fingerprint(corpus))
        records = [Record(r.text, r.label, r.score) for r in spec.records]
        return records, records_fingerprint(records)
