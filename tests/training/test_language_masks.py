"""The paper's section 5.2 on the shipped default model, at a smaller scale (docs/ has the
full run): language masks built from training texts, chosen on validation texts and evaluated
on held-out test texts.

A regression in the runtime, the builders or the mask application shows here as a mask that
stops hurting its own language or starts hurting the others. The candidates are the paper's
criterion and the learned mask (60 optimisation steps here, 120 in the full run; the
attribution grid is left out for time: its criterion has its own tests). The chosen masks of
C, English, JavaScript and Perl meet the target (>= 0.1 nats/byte on the language, >= 5x the
mean on the others) at both scales; Python's meets it at full scale but not here (0.06 nats
after 60 steps), so here it only has to hurt its own language."""

from pathlib import Path

import pytest

from monet_runtime import load_model
from training.corpus import build_corpus
from training.languages import PAPER, language_masks

# the module fixture builds every mask in the first test's setup: 10 to 14 minutes on 2 cores,
# close to the suite's 15-minute limit per test
pytestmark = pytest.mark.timeout(1800)

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "monet_runtime" / "default_model"
LANGUAGES = ["c", "english", "javascript", "perl", "python"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    manifest = build_corpus(corpus, max_chars_per_label=400_000)
    if manifest.missing:
        pytest.skip(f"this machine lacks the sources for {manifest.missing}")
    model = load_model(DEFAULT_MODEL)
    return language_masks(model, corpus, build_texts=40, eval_texts=10, attribution_coverages=(),
                          learned_steps=60, coverages=(), progress=False)


@pytest.mark.parametrize("language", ["c", "english", "javascript", "perl"])
def test_chosen_mask_meets_target(results, language):
    chosen = [r for r in results if r.language == language and r.chosen]
    assert len(chosen) == 1
    assert chosen[0].passes(), chosen[0]


def test_every_mask_hurts_its_own_language(results):
    assert sorted(r.language for r in results if r.criterion == PAPER) == LANGUAGES
    for r in results:
        assert r.removed > 0 and r.target_delta > 0, r
