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


def test_models(oai):
    models = oai.models.list()
    assert [m.id for m in models.data] == [MODEL]


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
        oai.completions.create(model=MODEL, prompt="x", n=2)
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong-key-123",
                       max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
