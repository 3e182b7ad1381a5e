"""Scores through the OpenAI API over real HTTP (the runtime engine): logprobs, echo,
max_tokens 0, n samples and prompt lists, against the runtime model's own forward pass,
masked and unmasked; and the `openai` client reading them."""

from __future__ import annotations

import math

import openai
import pytest
import torch
from server_support import ADMIN_KEY, GEN_KEY, unique

from monet_runtime import ExpertMask, load_model

MODEL = "monet-vd-tiny"
TOL = 2e-5  # float32: the server's batch of one against an unbatched forward


@pytest.fixture(scope="module")
def reference(tiny):
    return load_model(tiny / "model")


@pytest.fixture(scope="module")
def profile(server, fixture_mask):
    import httpx

    name = unique("lp")
    r = httpx.put(f"{server.url}/masks/{name}", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                  json={"kind": "manual", "layers": fixture_mask["layers"]})
    assert r.status_code == 201, r.text
    return name


@pytest.fixture
def oai(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=GEN_KEY, max_retries=0) as c:
        yield c


def log_softmax(model, ids, mask=None):
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), mask=mask).logits[0]
    return logits.double().log_softmax(-1)  # [T, V]


@pytest.mark.parametrize("masked", [False, True])
def test_echo_scores_are_the_models_log_softmax(gen, reference, golden, fixture_mask, profile,
                                                masked):
    ids = golden["input_ids"][0].tolist()
    r = gen.post("/v1/completions", json={
        "model": profile if masked else MODEL, "prompt": ids, "echo": True, "max_tokens": 0,
        "logprobs": 3})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None
    assert lp["top_logprobs"][0] is None
    mask = ExpertMask.from_dict(fixture_mask) if masked else None
    want = log_softmax(reference, ids, mask)
    for t in range(1, len(ids)):
        assert math.isclose(lp["token_logprobs"][t], want[t - 1, ids[t]], abs_tol=TOL)
        top = sorted(lp["top_logprobs"][t].values(), reverse=True)[:3]
        assert top == pytest.approx(want[t - 1].topk(3).values.tolist(), abs=TOL)
    other = log_softmax(reference, ids, None if masked else ExpertMask.from_dict(fixture_mask))
    assert max(abs(lp["token_logprobs"][t] - other[t - 1, ids[t]])
               for t in range(1, len(ids))) > 1e-3  # the mask changes the scores
    assert lp["text_offset"] == [sum(len(s) for s in lp["tokens"][:t]) for t in range(len(ids))]


def test_generated_tokens_scores(gen, reference, golden):
    ids = golden["input_ids"][1].tolist()
    out = gen.post("/v1/completions", json={
        "model": MODEL, "prompt": ids, "max_tokens": 6, "temperature": 0, "logprobs": 2,
        "ignore_eos": True}).json()
    lp = out["choices"][0]["logprobs"]
    generated = gen.post("/generate", json={"prompt_token_ids": ids, "max_tokens": 6,
                                            "temperature": 0, "ignore_eos": True}).json()
    tokens = generated["token_ids"]
    want = log_softmax(reference, ids + tokens)
    assert len(lp["token_logprobs"]) == 6
    for n, token in enumerate(tokens):
        row = want[len(ids) - 1 + n]
        assert math.isclose(lp["token_logprobs"][n], row[token], abs_tol=TOL)
        assert math.isclose(lp["token_logprobs"][n], row.max(), abs_tol=TOL)  # greedy
        assert len(lp["top_logprobs"][n]) <= 2
    echoed = gen.post("/v1/completions", json={
        "model": MODEL, "prompt": ids, "max_tokens": 6, "temperature": 0, "logprobs": 2,
        "ignore_eos": True, "echo": True}).json()["choices"][0]
    assert echoed["logprobs"]["token_logprobs"][len(ids):] == lp["token_logprobs"]
    assert echoed["text"] == reference.tokenizer.decode(ids) + out["choices"][0]["text"]


def test_n_samples_are_seeded_per_sample(gen):
    body = {"model": MODEL, "prompt": ["def f(", "int main("], "max_tokens": 8,
            "temperature": 1.0, "seed": 7, "n": 3, "ignore_eos": True}
    out = gen.post("/v1/completions", json=body).json()
    assert [c["index"] for c in out["choices"]] == list(range(6))
    texts = [c["text"] for c in out["choices"]]
    for p, prompt in enumerate(body["prompt"]):
        for k in range(3):
            one = gen.post("/v1/completions", json={**body, "prompt": prompt, "n": 1,
                                                    "seed": 7 + k}).json()
            assert one["choices"][0]["text"] == texts[p * 3 + k]
    assert len(set(texts[:3])) > 1  # different seeds, different samples
    assert out["usage"]["prompt_tokens"] == (1 + 6) + (1 + 9)  # BOS and bytes, once a prompt
    assert out["usage"]["completion_tokens"] == 6 * 8


def test_stream_of_several_choices(gen):
    body = {"model": MODEL, "prompt": [[1, 40, 41], [1, 50]], "max_tokens": 5, "seed": 3,
            "n": 2, "logprobs": 1, "ignore_eos": True}
    whole = gen.post("/v1/completions", json=body).json()["choices"]
    texts, scores = [""] * 4, [[] for _ in range(4)]
    import json

    with gen.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    texts[c["index"]] += c["text"]
                    scores[c["index"]] += (c["logprobs"] or {}).get("token_logprobs", [])
    assert texts == [c["text"] for c in whole]
    assert scores == [c["logprobs"]["token_logprobs"] for c in whole]


def test_openai_client_reads_logprobs(oai, profile):
    out = oai.completions.create(model=profile, prompt="def main():", max_tokens=4,
                                 temperature=0, logprobs=2, echo=True)
    lp = out.choices[0].logprobs
    assert lp.tokens[0] == "" and lp.token_logprobs[0] is None  # BOS, predicted by nothing
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == out.choices[0].text
    chat = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=3, temperature=0, logprobs=True,
                                       top_logprobs=2, n=2)
    assert len(chat.choices) == 2
    for choice in chat.choices:
        content = choice.logprobs.content
        assert len(content) == chat.usage.completion_tokens // 2
        assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == t.logprob
                   for t in content)  # greedy: the chosen token is the most likely
        assert "".join(t.token for t in content) == choice.message.content


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"logprobs": 21}, "logprobs"),
    ({"n": 0}, "n"),
    ({"n": 64, "prompt": ["a", "b"]}, "n"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a", [3]]}, "prompt"),
    ({"prompt": [[3], [3, 9999]]}, "prompt[1]"),
])
def test_bad_scores_requests_name_the_field(gen, body, param):
    r = gen.post("/v1/completions", json={"model": MODEL, "prompt": "x", **body})
    assert 400 <= r.status_code < 500, r.text
    assert (r.json()["error"]["param"] or "").startswith(param), r.json()


def test_chat_top_logprobs_needs_logprobs(gen):
    r = gen.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})
    assert r.status_code == 422 and r.json()["error"]["param"] == "top_logprobs"
