"""Profile schema: JSON, compact and binary round trips (hypothesis), names, identity."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from masks.schema import (
    COMPACT_THRESHOLD,
    EvaluationReport,
    LabelLoss,
    MaskError,
    MaskProfile,
    ModelMismatch,
    Provenance,
    SweepPoint,
    check_model,
    valid_name,
)
from monet_runtime import ExpertMask


@st.composite
def profiles(draw):
    L = draw(st.integers(1, 6))
    E = draw(st.sampled_from([1, 2, 7, 16, 33, 64]))
    layers = {}
    for l in range(L):
        keys = draw(st.lists(st.integers(0, E * E - 1), max_size=60, unique=True))
        if keys:
            layers[l] = [[k // E, k % E] for k in keys]
    text = st.text(max_size=20)
    report = None
    if draw(st.booleans()):
        labels = draw(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=4,
                               unique=True))
        finite = st.floats(-10, 10, allow_nan=False)
        report = EvaluationReport(
            model_id="monet-x", corpus_fingerprint="sha256:0", target=labels[0],
            labels=[LabelLoss(label=lab, tokens=draw(st.integers(1, 10**6)), loss=draw(finite),
                              masked_loss=draw(finite)) for lab in labels],
            removed_share=[draw(st.floats(0, 1)) for _ in range(L)],
            sweep=[SweepPoint(coverage=0.1, removed=3, target_delta=0.5, collateral_delta=0.01)])
    return MaskProfile(
        name=draw(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True)),
        description=draw(text), kind=draw(st.sampled_from(
            ["domain", "language", "toxicity", "manual", "composite"])),
        model_id="monet-" + draw(st.text("0123456789abcdef", min_size=16, max_size=16)),
        num_layers=L, num_experts=E, experts=ExpertMask(layers, num_experts=E),
        version=draw(st.integers(0, 10**6)),
        provenance=Provenance(builder="test", criterion=draw(st.none() | text),
                              thresholds={"factor": draw(st.floats(0, 10)), "coverage": None},
                              target=draw(st.none() | text), sources=draw(st.lists(text))),
        evaluation=report,
    )


@settings(max_examples=60, deadline=None)
@given(profiles(), st.sampled_from([None, True, False]))
def test_json_round_trip(profile, compact):
    text = profile.to_json(compact=compact)
    back = MaskProfile.from_json(text)
    assert back == profile
    assert back.experts == profile.experts and back.evaluation == profile.evaluation
    experts = json.loads(text)["experts"]
    if compact or (compact is None and profile.size > COMPACT_THRESHOLD):
        assert experts["encoding"] == "monetmsk"
    else:
        assert experts == profile.experts.to_dict()  # the runtime's mask JSON form
    assert MaskProfile.from_json(profile.to_dict(compact=compact)) == profile


@settings(max_examples=60, deadline=None)
@given(profiles())
def test_binary_round_trip(profile):
    assert MaskProfile.from_bytes(profile.to_bytes()) == profile


def test_json_form_is_the_runtime_mask_form(make_profile):
    profile = make_profile("p")
    data = json.loads(profile.to_json(compact=False))
    assert ExpertMask.from_json(data["experts"]) == profile.experts
    assert data["kind"] == "manual" and data["version"] == 0
    assert set(data["provenance"]) >= {"builder", "corpus_fingerprint", "criterion",
                                       "thresholds", "created_at", "created_by"}


def test_large_profile_forms_are_compact():
    """20% of 262,144 experts in each of 24 layers: compact JSON and binary round trips."""
    E, L = 512, 24
    rng = np.random.default_rng(1)
    mask = ExpertMask({l: np.stack(np.divmod(rng.choice(E * E, E * E // 5, replace=False), E), 1)
                       for l in range(L)}, num_experts=E)
    profile = MaskProfile(name="big", kind="manual", model_id="m", num_layers=L, num_experts=E,
                          experts=mask, provenance=Provenance(builder="test"))
    for dump, load in ((MaskProfile.to_bytes, MaskProfile.from_bytes),
                       (MaskProfile.to_json, MaskProfile.from_json)):
        data = dump(profile)
        assert load(data).experts == mask
        assert len(data) < 2_000_000  # timings: benchmarks/bench_masks.py


@pytest.mark.parametrize("name", ["", "A", "with space", "a/b", "a:b", "a@1", "-x", "é",
                                  "x" * 65])
def test_names_are_url_safe(name, make_profile):
    with pytest.raises(ValidationError):
        make_profile(name)


def test_invalid_experts_are_refused(make_profile):
    data = make_profile("p").to_dict(compact=False)
    data["experts"] = {"layers": [{"layer": 9, "experts": [[0, 0]]}]}
    with pytest.raises(ValidationError, match="layer 9"):
        MaskProfile.from_json(data)
    data["experts"] = {"layers": [{"layer": 0, "experts": [[16, 0]]}]}
    with pytest.raises(ValidationError, match="out of range"):
        MaskProfile.from_json(data)
    data["experts"] = {"encoding": "monetmsk", "data": "not base64!"}
    with pytest.raises(ValidationError, match="corrupt"):
        MaskProfile.from_json(data)
    with pytest.raises(Exception, match="MONET binary profile"):
        MaskProfile.from_bytes(b"garbage-garbage-garbage")


def test_binary_profiles_are_bounded_by_their_shape(make_profile):
    """The stores' form: the metadata's num_layers and num_experts bound the bitsets."""
    import struct
    import zlib

    profile = make_profile("p")
    data = profile.to_bytes()
    (size,) = struct.unpack_from("<I", data, 10)
    meta = data[: 14 + size]
    bomb = zlib.compress(bytes(64 << 20), 9)
    mask = (struct.pack("<8sHII", b"MONETMSK", 1, profile.num_experts, 1)
            + struct.pack("<II", 0, len(bomb)) + bomb)
    with pytest.raises(MaskError, match="larger than"):
        MaskProfile.from_bytes(meta + mask)
    with pytest.raises(MaskError, match="num_layers"):
        MaskProfile.from_bytes(struct.pack("<8sHI", b"MONETPRF", 1, 2) + b"{}" + data[14 + size:])


def test_valid_name_is_a_full_match():
    assert valid_name("x") and not valid_name("x\n") and not valid_name("x\n\n")


def test_check_model_names_both_identities(make_profile):
    profile = make_profile("p", model_id="monet-aaaa")
    check_model(profile, "monet-aaaa")
    with pytest.raises(ModelMismatch, match="monet-aaaa.*monet-bbbb"):
        check_model(profile, "monet-bbbb")
    with pytest.raises(ModelMismatch):
        profile.mask_for("monet-bbbb")
    with pytest.raises(ModelMismatch):
        check_model(profile.summary(), "monet-bbbb")


def test_report_deltas():
    report = EvaluationReport(
        model_id="m", corpus_fingerprint="f", target="py",
        labels=[LabelLoss(label="py", tokens=10, loss=1.0, masked_loss=3.0),
                LabelLoss(label="c", tokens=30, loss=1.0, masked_loss=1.2),
                LabelLoss(label="js", tokens=10, loss=2.0, masked_loss=2.0)],
        removed_share=[0.1])
    assert report.target_delta == pytest.approx(2.0)
    assert report.collateral_delta == pytest.approx(0.15)
    assert report.max_collateral_delta == pytest.approx(0.2)
    assert EvaluationReport.model_validate_json(report.model_dump_json()) == report


def test_slug_makes_valid_names():
    from masks.schema import slug, valid_name

    assert slug("no-Computer Science") == "no-computer-science"
    assert slug("C++") == "c"
    assert slug("!!!") == "profile"
    assert all(valid_name(slug(t)) for t in ["a" * 100, "Ünïcode label", "x/y:z@1", "-lead"])
