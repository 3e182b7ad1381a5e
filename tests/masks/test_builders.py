"""Builders and evaluation on a real (tiny, random) MONET model: statistics against a naive
per-token reference, selections against the criteria, model identity refused."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch

from masks.builders import (
    attribution_profile,
    collect_attribution_statistics,
    collect_correlation_statistics,
    collect_label_statistics,
    composite_profile,
    criterion_profile,
    learned_profile,
    manual_profile,
    specificity_profile,
    toxicity_profile,
)
from masks.corpus import Record, batches, corpus_fingerprint, read_corpus, records_fingerprint
from masks.criteria import correlated_experts, pearson_from_sums, specific_experts
from masks.evaluate import coverage_sweep, evaluate_profile, plot_report
from masks.schema import MaskError, ModelMismatch
from monet_runtime import ExpertMask, load_model
from monet_runtime.testing import make_random_checkpoint

ALPHABETS = {"abc": "abcdefgh ", "xyz": "stuvwxyz ", "num": "0123456789 "}


def texts(seed: int = 0, per_label: int = 6, length: int = 60) -> list[Record]:
    rng = random.Random(seed)
    return [Record("".join(rng.choice(chars) for _ in range(rng.randint(length // 2, length))),
                   label, rng.random())
            for label, chars in ALPHABETS.items() for _ in range(per_label)]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with path.open("w") as f:
        for r in texts():
            f.write(json.dumps({"text": r.text, "domain": r.label, "tox": r.score}) + "\n")
    return path


def naive_statistics(model, records: list[Record]):
    """Per label and routing layer, sum_t g_ij(t) from a per-token [T, E, E] tensor."""
    out: dict[str, dict[int, torch.Tensor]] = {}
    counts: dict[str, int] = {}
    for r in records:
        ids = torch.tensor([model.tokenizer.encode(r.text)])
        probs = model(ids, output_router_probs=True).router_probs
        for layer, (g1, g2) in probs.items():
            G = torch.einsum("thi,thj->tij", g1[0, 1:].double(), g2[0, 1:].double())
            acc = out.setdefault(r.label, {}).setdefault(layer, 0)
            out[r.label][layer] = acc + G.sum(0)
        counts[r.label] = counts.get(r.label, 0) + ids.shape[1] - 1
    return out, counts


def test_corpus_forms_agree(tmp_path, corpus_file, tiny_model):
    folder = tmp_path / "by-label"
    for n, r in enumerate(texts()):
        (folder / r.label).mkdir(parents=True, exist_ok=True)
        (folder / r.label / f"{n:03d}.txt").write_text(r.text)
    from_file = list(read_corpus(corpus_file, label_field="domain"))
    from_dirs = list(read_corpus(folder))
    key = lambda r: (r.label, r.text)  # noqa: E731
    assert sorted(map(key, from_file)) == sorted(map(key, from_dirs))
    assert corpus_fingerprint(corpus_file) == corpus_fingerprint(corpus_file)
    assert corpus_fingerprint(folder) != corpus_fingerprint(corpus_file)
    # batching keeps every token once, windows at most max_length
    total = sum(len(tiny_model.tokenizer.encode(r.text)) for r in from_file)
    seen = [b for b in batches(from_file, tiny_model.tokenizer, batch_tokens=64, max_length=16)]
    assert all(b.input_ids.shape[1] <= 16 and b.input_ids.numel() <= 64 for b in seen)
    windows = sum(b.input_ids.shape[0] for b in seen)
    assert sum(b.tokens for b in seen) == total + windows - len(from_file)  # a BOS per window


def test_label_statistics_match_naive(tiny_model, corpus_file):
    stats = collect_label_statistics(tiny_model, corpus_file, label_field="domain",
                                     batch_tokens=96, max_length=40, progress=False)
    records = list(read_corpus(corpus_file, label_field="domain"))
    # windows of 40 tokens: compare against the naive sums over the same windows
    windowed = []
    for r in records:
        ids = tiny_model.tokenizer.encode(r.text, add_bos=False)
        for start in range(0, len(ids), 39):
            windowed.append(Record(tiny_model.tokenizer.decode(ids[start:start + 39]), r.label))
    naive, counts = naive_statistics(tiny_model, windowed)
    assert stats.labels == sorted(ALPHABETS)
    assert stats.routing_layers == [0, 2] and stats.model_id == tiny_model.identity
    for n, label in enumerate(stats.labels):
        assert stats.tokens[n] == counts[label]
        for r, layer in enumerate(stats.routing_layers):
            np.testing.assert_allclose(stats.mass[n, r], naive[label][layer].numpy(),
                                       rtol=1e-5, atol=1e-6)


def test_inline_records_are_read_lazily_under_the_callers_fingerprint(tiny_model):
    records = texts()
    consumed = []

    def stream():
        for r in records:
            consumed.append(r)
            yield r

    eager = collect_label_statistics(tiny_model, records, batch_tokens=128, progress=False)
    assert eager.corpus_fingerprint == records_fingerprint(records)
    lazy = stream()
    stats = collect_label_statistics(tiny_model, lazy, batch_tokens=128, fingerprint="sha256:x",
                                     progress=False)
    assert stats.corpus_fingerprint == "sha256:x" and consumed == records
    assert stats.labels == eager.labels and np.allclose(stats.mass, eager.mass)
    with pytest.raises(ValueError, match="label every text"):
        collect_label_statistics(tiny_model, [Record("abc", None)], fingerprint="sha256:x",
                                 progress=False)


def test_domain_profile_follows_the_criterion(tiny_model, corpus_file):
    stats = collect_label_statistics(tiny_model, corpus_file, label_field="domain",
                                     progress=False)
    profile = specificity_profile(stats, "xyz", name="no-xyz", kind="domain", factor=2.0,
                                  floor=0.0, min_mass=0.0)
    E = stats.num_experts
    mean = stats.mean()
    for r, routing_layer in enumerate(stats.routing_layers):
        want = specific_experts(mean[:, r].reshape(3, -1), stats.labels.index("xyz"), factor=2.0)
        want_pairs = np.argwhere(want.reshape(E, E))
        for layer in (routing_layer, routing_layer + 1):  # G = 2: the group shares routing
            np.testing.assert_array_equal(profile.experts.experts(layer), want_pairs)
    assert profile.size > 0
    assert profile.model_id == tiny_model.identity
    assert profile.provenance.target == "xyz" and profile.provenance.criterion == "specificity"
    assert profile.provenance.corpus_fingerprint == corpus_fingerprint(corpus_file)
    strict = specificity_profile(stats, "xyz", name="s", factor=4.0, floor=0.0, min_mass=0.0)
    assert strict.experts - profile.experts == ExpertMask()  # a stricter factor keeps a subset
    floored = specificity_profile(stats, "xyz", name="f", floor=1.0)
    assert floored.size <= profile.size
    only = specificity_profile(stats, "xyz", name="o", layers=[1], floor=0.0, min_mass=0.0)
    assert only.experts.layers == [1]
    small = specificity_profile(stats, "xyz", name="c1", factor=None, coverage=0.1)
    large = specificity_profile(stats, "xyz", name="c5", factor=None, coverage=0.5)
    assert small.experts - large.experts == ExpertMask() and small.size < large.size
    with pytest.raises(ValueError, match="target: label 'rust' is not in the corpus"):
        specificity_profile(stats, "rust", name="r")
    named = criterion_profile(stats, "xyz", criterion="specificity", factor=2.0, floor=0.0,
                              min_mass=0.0, coverage=None, name="no-xyz", kind="domain")
    assert named.experts == profile.experts  # the CLI's and the server's way in


def test_toxicity_statistics_and_profile(tiny_model, corpus_file):
    stats = collect_correlation_statistics(tiny_model, corpus_file, score_field="tox",
                                           progress=False)
    records = list(read_corpus(corpus_file, score_field="tox"))
    xs, ss = {0: [], 2: []}, []
    for r in records:
        ids = torch.tensor([tiny_model.tokenizer.encode(r.text)])
        probs = tiny_model(ids, output_router_probs=True).router_probs
        for layer, (g1, g2) in probs.items():
            xs[layer].append(torch.einsum("thi,thj->tij", g1[0, 1:].double(),
                                          g2[0, 1:].double()).reshape(ids.shape[1] - 1, -1))
        ss += [r.score] * (ids.shape[1] - 1)
    s = np.array(ss)
    for r, layer in enumerate(stats.routing_layers):
        x = torch.cat(xs[layer]).numpy()
        want = pearson_from_sums(len(s), s.sum(), (s * s).sum(), x.sum(0), (x * x).sum(0),
                                 (x * s[:, None]).sum(0))
        got = stats.pearson()[r].reshape(-1)
        ok = ~np.isnan(want)
        np.testing.assert_allclose(got[ok], want[ok], atol=1e-5)
        for e in np.flatnonzero(ok)[:20]:
            assert got[e] == pytest.approx(np.corrcoef(x[:, e], s)[0, 1], abs=1e-5)
    profile = toxicity_profile(stats, name="detox", threshold=0.05)
    want = correlated_experts(stats.pearson(), 0.05)
    assert profile.size == 2 * int(want.sum())  # G = 2 layers per routing layer
    assert profile.kind == "toxicity" and profile.provenance.thresholds["threshold"] == 0.05


def test_per_token_scores_and_scorer(tiny_model):
    records = texts(per_label=3)
    per_text = collect_correlation_statistics(tiny_model, records, progress=False)
    per_token = [Record(r.text, r.label, [r.score] * len(tiny_model.tokenizer.encode(
        r.text, add_bos=False))) for r in records]
    spread = collect_correlation_statistics(tiny_model, per_token, progress=False)
    np.testing.assert_allclose(per_text.sum_xs, spread.sum_xs)
    scores = {r.text: r.score for r in records}
    scored = collect_correlation_statistics(
        tiny_model, [Record(r.text, r.label) for r in records], scorer=scores.__getitem__,
        progress=False)
    np.testing.assert_allclose(per_text.sum_xs, scored.sum_xs)
    with pytest.raises(ValueError):
        collect_correlation_statistics(tiny_model, [Record("abc", "x", [1.0])], progress=False)


def test_manual_and_composite(tiny_model, tmp_path):
    shape = dict(model_id=tiny_model.identity, num_layers=4, num_experts=16)
    a = manual_profile({"layers": [{"layer": 0, "experts": [[1, 2], [3, 4]]}]}, name="a", **shape)
    path = tmp_path / "b.json"
    ExpertMask({0: [[3, 4]], 3: [[15, 15]]}).to_json(path)
    b = manual_profile(path, name="b", **shape)
    both = composite_profile([a, b], name="ab")
    assert both.experts == ExpertMask({0: [[1, 2], [3, 4]], 3: [[15, 15]]})
    assert both.kind == "composite" and both.provenance.sources == ["a@0", "b@0"]
    other = manual_profile(path, name="c", model_id="monet-other", num_layers=4, num_experts=16)
    with pytest.raises(MaskError):
        composite_profile([a, other], name="bad")
    with pytest.raises(MaskError):
        manual_profile({"layers": [{"layer": 7, "experts": [[0, 0]]}]}, name="d", **shape)


def test_profile_for_another_model_is_refused(tiny_model, tmp_path):
    other = load_model(make_random_checkpoint(tmp_path / "other", num_hidden_layers=2))
    assert other.identity != tiny_model.identity
    profile = manual_profile({"layers": [{"layer": 0, "experts": [[0, 1]]}]}, name="p",
                             model_id=tiny_model.identity, num_layers=4, num_experts=16)
    assert profile.mask_for(tiny_model.identity) == profile.experts
    with pytest.raises(ModelMismatch) as err:
        profile.mask_for(other.identity)
    assert tiny_model.identity in str(err.value) and other.identity in str(err.value)
    with pytest.raises(ModelMismatch):
        evaluate_profile(other, profile, texts(per_label=1), progress=False)


def test_evaluation_report(tiny_model, corpus_file, tmp_path):
    stats = collect_label_statistics(tiny_model, corpus_file, label_field="domain",
                                     progress=False)
    profile = specificity_profile(stats, "num", name="no-num", factor=None, coverage=0.6)
    report = evaluate_profile(tiny_model, profile, corpus_file, label_field="domain",
                              progress=False)
    assert report.target == "num" and [r.label for r in report.labels] == sorted(ALPHABETS)
    # the report's losses are the model's own, with and without the mask
    records = [r for r in read_corpus(corpus_file, label_field="domain") if r.label == "abc"]
    base = masked = n = 0.0
    for r in records:
        ids = torch.tensor([tiny_model.tokenizer.encode(r.text)])
        for mask, acc in ((None, "base"), (profile.experts, "masked")):
            logits = tiny_model(ids, mask=mask).logits[0, :-1]
            loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            if acc == "base":
                base += loss
            else:
                masked += loss
        n += ids.shape[1] - 1
    row = next(r for r in report.labels if r.label == "abc")
    assert row.tokens == n
    assert row.loss == pytest.approx(base / n, rel=1e-5)
    assert row.masked_loss == pytest.approx(masked / n, rel=1e-5)
    assert report.target_delta == next(r.delta for r in report.labels if r.label == "num")
    others = [r for r in report.labels if r.label != "num"]
    assert report.collateral_delta == pytest.approx(
        sum(r.delta * r.tokens for r in others) / sum(r.tokens for r in others))
    assert report.removed_share == profile.removed_share()
    stored = profile.with_evaluation(report)
    assert type(stored).from_json(stored.to_json()).evaluation == report

    sweep = coverage_sweep(tiny_model, stats, corpus_file, "num", [0.1, 0.5, 0.9],
                           label_field="domain", progress=False)
    assert [p.coverage for p in sweep] == [0.1, 0.5, 0.9]
    assert sweep[0].removed < sweep[1].removed < sweep[2].removed
    png = plot_report(stored, tmp_path / "r.png",
                      report=report.model_copy(update={"sweep": sweep}))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_report(profile, tmp_path / "bare.png").exists()


def test_empty_mask_changes_nothing(tiny_model):
    profile = manual_profile({"layers": []}, name="empty", model_id=tiny_model.identity,
                             num_layers=4, num_experts=16)
    records = texts(per_label=2)
    report = evaluate_profile(tiny_model, profile, records, progress=False)
    assert all(r.delta == 0 for r in report.labels)
    assert report.corpus_fingerprint == records_fingerprint(records)  # inline records: a hash


def test_attribution_is_the_loss_derivative(tiny_model):
    """Each entry is -dL/dM_ij at M = 1 (L: summed loss of the label's tokens, M_ij scaling
    composite expert (l, i, j)): checked by central differences through the dense expert
    path (float64 weights). Only in layers that no router follows: a router's keep decision
    jumps when its input crosses the threshold, so differences across one are not smooth."""
    records = [r for r in texts(per_label=3) if r.label == "abc"]
    collect_attribution_statistics(tiny_model, records[:1], progress=False)
    assert not any("forward" in vars(layer.moe) or layer.moe._forward_hooks
                   for layer in tiny_model.model.layers)  # worked on a copy
    model = copy.deepcopy(tiny_model).double()
    stats = collect_attribution_statistics(model, records, progress=False)
    assert stats.quantity == "attribution" and stats.labels == ["abc"]
    assert stats.routing_layers == list(range(model.config.num_hidden_layers))
    assert stats.tokens[0] == sum(len(r.text) for r in records)  # byte tokens after BOS
    E = model.config.moe_experts

    def loss(layer: int, i: int, j: int, scale: float) -> float:
        def hook(moe, args, _out):
            y, g1, g2 = args[:3]
            G = torch.einsum("the,thf->tef", g1, g2).clone()
            G[:, i, j] *= scale
            return moe.forward_dense(y, G)
        handle = model.model.layers[layer].moe.register_forward_hook(hook)
        try:
            total = 0.0
            for batch in batches(records, model.tokenizer, batch_tokens=4096, max_length=512):
                with torch.no_grad():
                    logits = model(batch.input_ids, attention_mask=batch.attention_mask).logits
                losses = torch.nn.functional.cross_entropy(
                    logits[:, :-1].transpose(1, 2), batch.input_ids[:, 1:], reduction="none")
                total += float((losses * batch.attention_mask[:, 1:]).sum())
            return total
        finally:
            handle.remove()

    L = model.config.num_hidden_layers
    assert [l for l in range(L) if model.config.is_routing_layer(l)][-1] == L - 2
    for layer in (L - 2, L - 1):
        flat = np.abs(stats.mass[0, layer]).reshape(-1)
        for n in np.argsort(flat)[-2:]:
            i, j = divmod(int(n), E)
            eps = 1e-2  # the logits are float32, as in the release: not too small a step
            derivative = (loss(layer, i, j, 1 + eps) - loss(layer, i, j, 1 - eps)) / (2 * eps)
            assert abs(stats.mass[0, layer, i, j] - (-derivative)) < 1e-2 * max(1, flat[n])
            assert flat[n] > 1e-6


def test_attribution_profile_selects_by_loss_increase():
    """attribution_profile is the specificity criterion on the (clipped) loss increase."""
    from masks.statistics import LabelStatistics

    E, L = 4, 2
    mass = np.zeros((2, L, E, E))
    mass[0, 0, 1, 2] = 10.0  # needed by "a" only
    mass[0, 1, 3, 3] = 6.0  # needed by "a", hurts "b" a little: still specific
    mass[1, 1, 3, 3] = -1.0
    mass[0, 1, 0, 0] = 4.0  # needed by both: not specific
    mass[1, 1, 0, 0] = 4.0
    stats = LabelStatistics(labels=["a", "b"], routing_layers=[0, 1], num_layers=L,
                            num_experts=E, num_heads=1, groups=1, mass=mass,
                            tokens=np.array([10, 10]), model_id="m", quantity="attribution")
    full = attribution_profile(stats, "a", name="no-a", coverage=None)
    assert set(full.experts) == {(0, 1, 2), (1, 3, 3)}
    assert full.provenance.criterion == "attribution"
    named = criterion_profile(stats, "a", criterion="attribution", factor=2.0, floor=99.0,
                              min_mass=99.0, coverage=None, name="no-a")
    assert named.experts == full.experts  # floor and min_mass are specificity's only
    with pytest.raises(ValueError, match="criterion must be one of"):
        criterion_profile(stats, "a", criterion="learned", factor=2.0, floor=0.0, min_mass=0.0,
                          coverage=None, name="x")
    with pytest.raises(ValueError, match="attribution"):
        specificity_profile(stats, "a", name="x")
    routing = LabelStatistics(**{**stats.__dict__, "quantity": "routing"})
    with pytest.raises(ValueError, match="routing"):
        attribution_profile(routing, "a", name="x")


def test_learned_profile_hurts_its_target_not_the_others(tiny_model):
    """Gates optimised on build texts: on held-out texts the target's loss rises, the others'
    hardly; the same seed gives the same mask; the model itself is untouched."""
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    build = texts(seed=0, per_label=8)
    kwargs = dict(name="no-abc", steps=40, lr=0.1, progress=False)
    steps_done = []
    profile = learned_profile(tiny_model, build, "abc",
                              on_step=lambda n, steps: steps_done.append((n, steps)), **kwargs)
    assert steps_done == [(n, 40) for n in range(1, 41)]
    assert profile.provenance.criterion == "learned" and profile.provenance.target == "abc"
    assert profile.provenance.labels == sorted(ALPHABETS)
    assert 0 < profile.size < 4 * 16 * 16
    assert learned_profile(tiny_model, build, "abc", **kwargs).experts == profile.experts
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in before.items())
    assert not any("forward" in vars(layer.moe) for layer in tiny_model.model.layers)
    report = evaluate_profile(tiny_model, profile, texts(seed=1, per_label=8), target="abc",
                              progress=False)
    deltas = {r.label: r.delta for r in report.labels}
    assert deltas["abc"] > 0.05, deltas
    assert deltas["abc"] > 3 * max(deltas["xyz"], deltas["num"], 0), deltas


def test_learned_profile_refuses_bad_input(tiny_model):
    build = texts(per_label=2)
    with pytest.raises(ValueError, match="target"):
        learned_profile(tiny_model, build, "nope", name="x", steps=1, progress=False)
    with pytest.raises(ValueError, match="at least one label besides"):
        learned_profile(tiny_model, [r for r in build if r.label == "abc"], "abc", name="x",
                        steps=1, progress=False)
    with pytest.raises(ValueError, match="label every text"):
        learned_profile(tiny_model, [Record("abc", None)], "abc", name="x", steps=1,
                        progress=False)
    with pytest.raises(ValueError, match="steps"):
        learned_profile(tiny_model, build, "abc", name="x", steps=0, progress=False)
