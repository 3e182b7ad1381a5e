"""The paper's section 5.2 on the shipped default model, at a smaller scale (docs/ has the
full run): language masks built from training texts, evaluated on held-out texts.

A regression in the runtime, the builders or the mask application shows here as a mask that
stops hurting its own language or starts hurting the others. On the shipped model the C and
Perl masks meet the target (>= 0.1 nats/byte on the language, >= 5x the mean on the others);
the Python, JavaScript and English masks do not yet (issue 7 stays open on that)."""

from pathlib import Path

import pytest

from monet_runtime import load_model
from training.corpus import build_corpus
from training.languages import language_masks

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "monet_runtime" / "default_model"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    manifest = build_corpus(corpus, max_chars_per_label=400_000)
    if manifest.missing:
        pytest.skip(f"this machine lacks the sources for {manifest.missing}")
    model = load_model(DEFAULT_MODEL)
    found = language_masks(model, corpus, build_texts=60, eval_texts=15, coverages=(),
                           progress=False)
    return {r.language: r for r in found}


@pytest.mark.parametrize("language", ["c", "perl"])
def test_language_mask_meets_target(results, language):
    r = results[language]
    assert r.passes(min_delta=0.1, min_ratio=5.0), r


def test_every_mask_hurts_its_own_language(results):
    assert set(results) == {"c", "english", "javascript", "perl", "python"}
    for r in results.values():
        assert r.removed > 0 and r.target_delta > 0, r
