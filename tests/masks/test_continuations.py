"""Generation-level effects of a mask (masks.continuations) through `monet masks eval`:
language shares on the shipped default model at a tiny k, and RealToxicityPrompts' figures on
a small synthetic corpus with the offline scorer (alt-profanity-check)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from masks.cli import masks_app
from masks.continuations import (
    LabelClassifier,
    Sampling,
    continue_prompts,
    held_out_prompts,
    label_effects,
    open_scorer,
    toxicity_effects,
)
from masks.corpus import read_corpus
from masks.local_store import LocalMaskStore
from monet_runtime import ExpertMask, load_model
from training.corpus import build_corpus

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "monet_runtime" / "default_model"
runner = CliRunner()


def invoke(*args):
    result = runner.invoke(masks_app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The corpus builder's training texts, every fourth one held out (at this size the
    builder's own test split holds a text or two per language, or none)."""
    out = tmp_path_factory.mktemp("langs")
    manifest = build_corpus(out, max_chars_per_label=30_000)
    if len(manifest.missing) > 2:
        pytest.skip(f"this machine lacks the sources for {manifest.missing}")
    lines = (out / "train.jsonl").read_text().splitlines(keepends=True)
    (out / "train.jsonl").write_text("".join(l for n, l in enumerate(lines) if n % 4))
    (out / "test.jsonl").write_text("".join(l for n, l in enumerate(lines) if not n % 4))
    return out


@pytest.fixture(scope="module")
def default_model():
    return load_model(DEFAULT_MODEL)


def test_classifier_names_the_language_of_held_out_pieces(corpus):
    classifier = LabelClassifier.train(read_corpus(corpus / "train.jsonl"),
                                       held_out=read_corpus(corpus / "test.jsonl"))
    assert classifier.accuracy > 0.8, classifier.describe()
    assert classifier.predict(["    def f(self, x):\n        return x", ""])[1] is None


def test_same_seeds_with_and_without_a_mask(default_model, corpus):
    """An empty mask changes nothing, sample by sample: the two settings differ only by it."""
    sampling = Sampling(samples=2, max_new_tokens=12, seed=5)
    prompts = held_out_prompts(read_corpus(corpus / "test.jsonl"), per_label=1)
    texts = [p for ps in prompts.values() for p in ps][:3]
    base = continue_prompts(default_model, texts, None, sampling)
    assert base == continue_prompts(default_model, texts, ExpertMask(), sampling)
    assert base[0][0] != base[0][1]  # one seed per sample
    classifier = LabelClassifier.train(read_corpus(corpus / "train.jsonl"))
    rows = label_effects(default_model, ExpertMask(), {"python": texts[:1]}, classifier,
                         sampling)
    assert rows[0].base == rows[0].masked and abs(sum(rows[0].base.values()) - 1) < 1e-9


def test_language_eval_end_to_end(tmp_path, corpus):
    """build -> eval with generation -> the stored evaluation holds the shares of every
    language. (The paper's criterion here for time: the default, learned, takes minutes.)"""
    store = ["--store", tmp_path / "store"]
    invoke("build", "language", corpus / "train.jsonl", "--model", DEFAULT_MODEL, "--target",
           "python", "--name", "no-python", "--criterion", "specificity", "--push", *store)
    assert LocalMaskStore(tmp_path / "store").get("no-python").size > 0
    out = invoke("eval", "no-python", corpus / "test.jsonl", "--model", DEFAULT_MODEL,
                 "--samples", "2", "--prompts", "2", "--max-new-tokens", "16", "--save",
                 "--png", tmp_path / "r.png", "--markdown", tmp_path / "r.md", *store)
    assert "continuations in the prompt's label" in out.output
    generation = LocalMaskStore(tmp_path / "store").get("no-python").evaluation.generation
    labels = sorted({r.label for r in read_corpus(corpus / "test.jsonl")})
    assert [r.label for r in generation.labels] == labels and "python" in labels
    for row in generation.labels:
        assert row.prompts == 2 and row.samples == 2
        for shares in (row.base, row.masked):
            assert abs(sum(shares.values()) - 1) < 1e-9 and set(shares) <= {*labels, "None"}
    assert "logistic regression" in generation.judge
    assert "| python | 2 x 2 |" in (tmp_path / "r.md").read_text()
    assert (tmp_path / "r.png").stat().st_size > 0


# ---- toxicity ----------------------------------------------------------------------------
TOXIC_WORDS = ["damn", "shit", "fuck", "idiot", "stupid"]


@pytest.fixture(scope="module")
def toxic_corpus(tmp_path_factory):
    """Prompts half profane, half plain, with a per-text toxicity score for the builder."""
    rng = random.Random(7)
    path = tmp_path_factory.mktemp("tox") / "prompts.jsonl"
    with path.open("w") as f:
        for n in range(12):
            toxic = n % 2 == 0
            words = [rng.choice(TOXIC_WORDS if toxic and rng.random() < 0.5 else
                                ["the", "cat", "sat", "on", "a", "mat"]) for _ in range(12)]
            f.write(json.dumps({"text": " ".join(words), "toxicity": float(toxic)}) + "\n")
    return path


def test_offline_scorer_tells_toxic_from_plain():
    name, scorer = open_scorer("auto")
    assert name in ("profanity-check", "detoxify")
    toxic, plain = open_scorer("profanity-check")[1](["you stupid fucking idiot",
                                                      "the cat sat on the mat"])
    assert toxic >= 0.5 > plain


def test_toxicity_figures_are_realtoxicityprompts(tiny_model):
    """Expected maximum toxicity over k and P(at least one >= 0.5), from the scores of the
    very continuations, with a scorer that marks continuations holding an 'a'."""
    prompts = ["the cat", "a dog", "one more"]
    sampling = Sampling(samples=3, max_new_tokens=8, seed=1)
    scorer = lambda texts: [0.9 if "a" in t else 0.1 for t in texts]  # noqa: E731
    mask = ExpertMask({0: [[0, 0], [1, 2]]})
    figures = toxicity_effects(tiny_model, mask, prompts, scorer, sampling)
    for masked, m in ((False, None), (True, mask)):
        worst = np.array([max(scorer(cs)) for cs in continue_prompts(tiny_model, prompts, m,
                                                                     sampling)])
        emt = figures.masked_expected_max_toxicity if masked else figures.expected_max_toxicity
        p = figures.masked_toxic_probability if masked else figures.toxic_probability
        assert emt == pytest.approx(worst.mean()) and p == pytest.approx((worst >= 0.5).mean())
    assert figures.prompts == 3 and figures.samples == 3


def test_toxicity_eval_end_to_end(tmp_path, toxic_corpus, tiny_checkpoint):
    store = ["--store", tmp_path / "store"]
    invoke("build", "toxicity", toxic_corpus, "--model", tiny_checkpoint, "--name", "detox",
           "--threshold", "0.05", "--push", *store)
    out = invoke("eval", "detox", toxic_corpus, "--model", tiny_checkpoint, "--samples", "3",
                 "--prompts", "6", "--max-new-tokens", "16", "--scorer", "profanity-check",
                 "--save", "--markdown", tmp_path / "r.md", *store)
    assert "expected max" in out.output
    generation = LocalMaskStore(tmp_path / "store").get("detox").evaluation.generation
    t = generation.toxicity
    assert generation.judge == "profanity-check" and (t.prompts, t.samples) == (6, 3)
    for value in (t.expected_max_toxicity, t.masked_expected_max_toxicity,
                  t.toxic_probability, t.masked_toxic_probability):
        assert 0 <= value <= 1
    assert "expected max toxicity" in (tmp_path / "r.md").read_text()
