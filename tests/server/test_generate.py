"""POST /generate over HTTP: outputs, masks really applied, mask resolution, bad input."""

from __future__ import annotations

import json

import pytest
from masks import MaskProfile, Provenance, open_store
from server_support import unique

GREEDY = {"temperature": 0, "ignore_eos": True}


def put_mask(admin, name: str, layers: list, **extra) -> dict:
    r = admin.put(f"/masks/{name}", json={"kind": "manual", "layers": layers, **extra})
    assert r.status_code in (200, 201), r.text
    return r.json()


def test_generate_text(gen):
    r = gen.post("/generate", json={"prompt": "hello", "max_tokens": 5, **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["token_ids"]) == 5 and body["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 5, "total_tokens": 11}
    assert body["mask_profiles"] == [] and "x-monet-mask-profiles" not in r.headers
    assert r.headers["x-request-id"]


def test_masked_generation_is_the_reference_and_differs_from_unmasked(gen, admin, golden,
                                                                       fixture_mask):
    """Greedy ids over HTTP equal the reference implementation's, with and without the mask."""
    name = unique("fixture")
    version = put_mask(admin, name, fixture_mask["layers"])["version"]
    prompt = golden["input_ids"][0].tolist()
    n = golden["greedy_ids"].shape[1] - len(prompt)
    plain = gen.post("/generate", json={"prompt_token_ids": prompt, "max_tokens": n, **GREEDY})
    masked = gen.post("/generate", json={"prompt_token_ids": prompt, "max_tokens": n,
                                         "mask_profile": name, **GREEDY})
    assert plain.status_code == masked.status_code == 200, masked.text
    assert plain.json()["token_ids"] == golden["greedy_ids"][0, len(prompt):].tolist()
    assert masked.json()["token_ids"] == golden["masked_greedy_ids"][0, len(prompt):].tolist()
    assert masked.json()["token_ids"] != plain.json()["token_ids"]
    assert masked.headers["x-monet-mask-profiles"] == f"{name}@{version}"
    applied = masked.json()["mask_profiles"]
    assert applied == [{"name": name, "version": version, "default": False,
                        "digest": applied[0]["digest"]}]
    assert len(applied[0]["digest"]) == 16  # the contents, beside the name and version


def test_masked_runtime_equivalence_for_text_prompt(gen, admin, fixture_mask, tiny):
    """Also through a text prompt and a pinned version, against monet_runtime directly."""
    import torch

    from monet_runtime import ExpertMask, GenerationRequest, SamplingParams, generate_batch
    from monet_runtime import load_model

    model = load_model(tiny / "model", dtype=torch.float32)
    name = unique("fx")
    put_mask(admin, name, fixture_mask["layers"])
    put_mask(admin, name, [{"layer": 0, "experts": [[1, 1]]}])  # version 2: another mask
    mask = ExpertMask.from_json(tiny / "mask.json")
    ids = model.tokenizer.encode("The quick brown fox")
    want = generate_batch(model, [GenerationRequest(ids, SamplingParams(
        max_new_tokens=12, ignore_eos=True), mask)])[0].token_ids
    r = gen.post("/generate", json={"prompt": "The quick brown fox", "max_tokens": 12,
                                    "mask_profile": f"{name}@1", **GREEDY})
    assert r.status_code == 200, r.text
    assert r.json()["token_ids"] == want
    assert r.headers["x-monet-mask-profiles"] == f"{name}@1"


def test_union_of_profiles(gen, admin, fixture_mask, golden):
    """Two halves of the fixture mask as two profiles: their union is the whole mask."""
    a, b = unique("half-a"), unique("half-b")
    layers = fixture_mask["layers"]
    put_mask(admin, a, [{"layer": l["layer"], "experts": l["experts"][::2]} for l in layers])
    put_mask(admin, b, [{"layer": l["layer"], "experts": l["experts"][1::2]} for l in layers])
    prompt = golden["input_ids"][0].tolist()
    r = gen.post("/generate", json={"prompt_token_ids": prompt, "max_tokens": 16,
                                    "mask_profile": [a, b], **GREEDY})
    assert r.status_code == 200, r.text
    assert r.json()["token_ids"] == golden["masked_greedy_ids"][0, len(prompt):].tolist()
    assert r.headers["x-monet-mask-profiles"] == f"{a}@1,{b}@1"


def test_stream(gen, admin, fixture_mask, golden):
    name = unique("stream")
    put_mask(admin, name, fixture_mask["layers"])
    prompt = golden["input_ids"][0].tolist()
    events = []
    with gen.stream("POST", "/generate", json={"prompt_token_ids": prompt, "max_tokens": 16,
                                               "mask_profile": name, "stream": True,
                                               **GREEDY}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-monet-mask-profiles"] == f"{name}@1"
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    ids = [t for c in chunks for t in c["token_ids"]]
    assert ids == golden["masked_greedy_ids"][0, len(prompt):].tolist()
    assert chunks[-1]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 16
    assert chunks[-1]["mask_profiles"][0]["name"] == name
    assert all(c["finish_reason"] is None for c in chunks[:-1])


def test_stop_strings_cut_the_text(gen):
    full = gen.post("/generate", json={"prompt": "abc", "max_tokens": 20, **GREEDY}).json()
    text = full["text"]
    stop = text[3:5]
    if not stop.strip("\ufffd") or "\ufffd" in stop:
        pytest.skip("greedy text has no clean substring to stop on")
    r = gen.post("/generate", json={"prompt": "abc", "max_tokens": 20, "stop": [stop],
                                    **GREEDY}).json()
    assert r["finish_reason"] == "stop"
    assert r["text"] == text[:text.find(stop)]
    assert stop not in r["text"]


def test_sampling_with_seed_is_reproducible(gen):
    body = {"prompt": "seeded", "max_tokens": 10, "temperature": 0.9, "top_p": 0.9,
            "top_k": 20, "seed": 1234, "ignore_eos": True}
    a, b = gen.post("/generate", json=body).json(), gen.post("/generate", json=body).json()
    assert a["token_ids"] == b["token_ids"]


def test_unknown_profile_is_404(gen):
    r = gen.post("/generate", json={"prompt": "x", "mask_profile": "no-such-profile"})
    assert r.status_code == 404
    assert r.json()["error"]["param"] == "mask_profile"
    assert "no-such-profile" in r.json()["error"]["message"]
    r = gen.post("/generate", json={"prompt": "x", "mask_profile": ["no-such-profile@7"]})
    assert r.status_code == 404


def test_unknown_version_is_404(gen, admin):
    name = unique("ver")
    put_mask(admin, name, [{"layer": 0, "experts": [[0, 0]]}])
    r = gen.post("/generate", json={"prompt": "x", "mask_profile": f"{name}@9"})
    assert r.status_code == 404


def test_profile_for_another_model_is_409(gen, redis_server, namespace):
    store = open_store(redis_server.url, namespace=namespace)
    name = unique("other")
    store.put(MaskProfile(name=name, kind="manual", model_id="monet-someothermodel",
                          num_layers=4, num_experts=16, experts={"layers": []},
                          provenance=Provenance(builder="test")))
    store.close()
    r = gen.post("/generate", json={"prompt": "x", "mask_profile": name})
    assert r.status_code == 409, r.text
    assert r.json()["error"]["param"] == "mask_profile"
    assert "monet-someothermodel" in r.json()["error"]["message"]


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "x", "mask_profil": "typo"}, 422, "mask_profil"),
    ({"prompt": "x", "prompt_token_ids": [1, 2]}, 422, "prompt"),
    ({}, 422, "prompt"),
    ({"prompt_token_ids": [1, 999]}, 422, "prompt_token_ids"),
    ({"prompt_token_ids": [-1]}, 422, "prompt_token_ids.0"),
    ({"prompt": "x", "max_tokens": 0}, 422, "max_tokens"),
    ({"prompt": "x", "max_tokens": 129}, 422, "max_tokens"),
    ({"prompt": "x" * 250}, 400, "prompt"),
    ({"prompt": "x" * 150, "max_tokens": 120}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, 422, "temperature"),
    ({"prompt": "x", "top_p": 0}, 422, "top_p"),
    ({"prompt": "x", "mask_profile": "Bad Name"}, 422, "mask_profile"),
    ({"prompt": "x", "mask_profile": ["ok", "a@b"]}, 422, "mask_profile[1]"),
    ({"prompt": "x", "stop": ["a"] * 17}, 422, "stop"),
])
def test_bad_input_is_a_clear_4xx(gen, body, status, param):
    r = gen.post("/generate", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert r.json()["error"]["message"]


def test_malformed_json_and_big_body(gen):
    r = gen.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = gen.post("/generate", json={"prompt": "x" * (1 << 20)})
    assert r.status_code == 413
    assert r.json()["error"]["param"] == "body"
