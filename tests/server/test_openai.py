"""The OpenAI-compatible API through the official `openai` client."""

from __future__ import annotations

import openai
import pytest
from server_support import ADMIN_KEY, GEN_KEY, unique

MODEL = "monet-vd-tiny"


@pytest.fixture
def oai(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=GEN_KEY, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def profile(server, fixture_mask):
    import httpx

    name = unique("oai")
    r = httpx.put(f"{server.url}/masks/{name}", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                  json={"kind": "manual", "layers": fixture_mask["layers"]})
    assert r.status_code == 201, r.text
    return name


@pytest.fixture(scope="module")
def other_profile(server, fixture_mask):
    """A second profile: the fixture mask's first layer only."""
    import httpx

    name = unique("oai2")
    r = httpx.put(f"{server.url}/masks/{name}", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                  json={"kind": "manual", "layers": fixture_mask["layers"][:1]})
    assert r.status_code == 201, r.text
    return name


def test_models_lists_profiles_as_models(oai, profile):
    cards = oai.models.list().data
    assert cards[0].id == MODEL and cards[0].parent is None
    mine = next(c for c in cards if c.id == profile)
    assert mine.parent == MODEL and mine.root == MODEL
    assert mine.model_extra["version"] == 1 and mine.model_extra["mask_profile"] == f"{profile}@1"
    ids = [c.id for c in cards[1:]]
    assert ids == sorted(ids) and MODEL not in ids


def _greedy(oai, model, prompt, **extra):
    raw = oai.completions.with_raw_response.create(
        model=model, prompt=prompt, max_tokens=12, temperature=0,
        extra_body={"ignore_eos": True, **extra})
    return raw.parse(), raw.headers.get("x-monet-mask-profiles")


def test_profile_as_model(oai, profile, golden):
    prompt = golden["input_ids"][0].tolist()
    by_model, header = _greedy(oai, profile, prompt)
    by_field, _ = _greedy(oai, MODEL, prompt, mask_profile=profile)
    base, _ = _greedy(oai, MODEL, prompt)
    assert by_model.choices[0].text == by_field.choices[0].text != base.choices[0].text
    assert header == f"{profile}@1" and by_model.model == profile
    assert by_model.model_extra["mask_profiles"][0]["name"] == profile
    at_version, header = _greedy(oai, f"{profile}@1", prompt)
    assert at_version.choices[0].text == by_model.choices[0].text and header == f"{profile}@1"
    both, _ = _greedy(oai, profile, prompt, mask_profile=f"{profile}")  # the same: agreed
    assert both.choices[0].text == by_model.choices[0].text


def test_profile_union_as_model(oai, profile, other_profile, golden):
    prompt = golden["input_ids"][1].tolist()
    union, header = _greedy(oai, f"{other_profile}+{profile}", prompt)
    by_field, _ = _greedy(oai, MODEL, prompt, mask_profile=[profile, other_profile])
    assert union.choices[0].text == by_field.choices[0].text
    assert header == f"{other_profile}@1,{profile}@1"
    chat = oai.chat.completions.create(model=f"{profile}+{other_profile}", max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}])
    assert [p["name"] for p in chat.model_extra["mask_profiles"]] == [profile, other_profile]


def test_profile_as_model_fails_closed(oai, profile, other_profile):
    for model in ("no-such-profile", f"{profile}@99", f"{profile}+no-such", "GPT-4", "a+"):
        with pytest.raises(openai.NotFoundError) as info:
            oai.completions.create(model=model, prompt="x", max_tokens=1)
        assert info.value.body["param"] == "model", model
    with pytest.raises(openai.NotFoundError, match="model"):
        oai.chat.completions.create(model="no-such-profile", max_tokens=1,
                                    messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.UnprocessableEntityError, match="mask_profile") as info:
        oai.completions.create(model=profile, prompt="x", max_tokens=1,
                               extra_body={"mask_profile": other_profile})
    assert info.value.body["param"] == "model"


def test_tokenizer_endpoints_take_profiles_as_models(gen, profile):
    assert gen.post("/tokenize", json={"model": profile, "prompt": "a"}).status_code == 200
    r = gen.post("/detokenize", json={"model": f"{profile}@7", "tokens": [3]})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_completion_with_mask_equals_generate(oai, gen, profile, golden):
    prompt = golden["input_ids"][0].tolist()
    out = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                 extra_body={"mask_profile": profile, "ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 16 and out.usage.prompt_tokens == len(prompt)
    want = gen.post("/generate", json={"prompt_token_ids": prompt, "max_tokens": 16,
                                       "temperature": 0, "ignore_eos": True,
                                       "mask_profile": profile}).json()
    assert out.choices[0].text == want["text"]
    assert out.model_extra["mask_profiles"][0]["name"] == profile
    unmasked = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert unmasked.choices[0].text != out.choices[0].text


def test_completion_header_names_profiles(oai, profile):
    raw = oai.completions.with_raw_response.create(
        model=MODEL, prompt="hi", max_tokens=3, extra_body={"mask_profile": profile})
    assert raw.headers["x-monet-mask-profiles"] == f"{profile}@1"


def test_completion_stream(oai, profile):
    text = "".join(chunk.choices[0].text for chunk in oai.completions.create(
        model=MODEL, prompt="stream me", max_tokens=8, temperature=0, stream=True,
        extra_body={"mask_profile": profile, "ignore_eos": True}) if chunk.choices)
    whole = oai.completions.create(model=MODEL, prompt="stream me", max_tokens=8, temperature=0,
                                   extra_body={"mask_profile": profile, "ignore_eos": True})
    assert text == whole.choices[0].text


def test_chat(oai, profile):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                      temperature=0, extra_body={"mask_profile": profile})
    assert out.choices[0].message.role == "assistant"
    assert out.object == "chat.completion"
    assert 1 <= out.usage.completion_tokens <= 6
    chunks = list(oai.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"mask_profile": profile}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_errors_reach_the_client(oai, server):
    with pytest.raises(openai.NotFoundError, match="no-such"):
        oai.completions.create(model=MODEL, prompt="x", extra_body={"mask_profile": "no-such"})
    with pytest.raises(openai.NotFoundError, match="model"):
        oai.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.UnprocessableEntityError, match="n"):
        oai.completions.create(model=MODEL, prompt="x", n=65)
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong-key-123",
                       max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
