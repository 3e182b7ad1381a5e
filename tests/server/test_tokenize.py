"""POST /tokenize, POST /detokenize, GET /tokenizer_info over real HTTP, in vLLM's shapes, and
lm-eval's own remote tokenizer reading them."""

from __future__ import annotations

import pytest
from server_support import GEN_KEY

from monet_runtime.tokenizer import ByteTokenizer

MODEL = "monet-vd-tiny"
TOK = ByteTokenizer(128)  # the fixture model ships no tokenizer: bytes, vocab 128


def test_tokenize_is_what_generation_runs(gen):
    r = gen.post("/tokenize", json={"prompt": "def f(x):", "return_token_strs": True})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["tokens"] == TOK.encode("def f(x):") and out["tokens"][0] == 1  # BOS
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == 256
    assert out["token_strs"] == ["<s>", "d", "e", "f", " ", "f", "(", "x", ")", ":"]
    used = gen.post("/generate", json={"prompt": "def f(x):", "max_tokens": 1}).json()
    assert used["usage"]["prompt_tokens"] == out["count"]
    bare = gen.post("/tokenize", json={"model": MODEL, "prompt": "ab",
                                       "add_special_tokens": False}).json()
    assert bare["tokens"] == TOK.encode("ab", add_bos=False) and bare["token_strs"] is None


def test_tokenize_messages_is_what_chat_runs(gen):
    messages = [{"role": "user", "content": "hi"}]
    out = gen.post("/tokenize", json={"messages": messages}).json()
    chat = gen.post("/v1/chat/completions", json={"model": MODEL, "messages": messages,
                                                  "max_tokens": 1}).json()
    assert out["count"] == chat["usage"]["prompt_tokens"]
    assert TOK.decode(out["tokens"]).endswith("<|assistant|>\n")
    bare = gen.post("/tokenize", json={"messages": messages,
                                       "add_generation_prompt": False}).json()
    assert not TOK.decode(bare["tokens"]).endswith("<|assistant|>\n")


def test_detokenize_round_trip(gen):
    ids = gen.post("/tokenize", json={"prompt": "hello, world"}).json()["tokens"]
    r = gen.post("/detokenize", json={"tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": "hello, world"}


def test_tokenizer_info(gen):
    info = gen.get("/tokenizer_info").json()
    assert info["tokenizer_class"] == "ByteTokenizer"
    assert info["bos_token_id"] == 1 and info["eos_token_id"] == 2
    # A byte tokenizer's specials have no text that encodes to them: null, never a string
    # whose first byte lm-eval would take for the EOS id.
    assert info["eos_token"] is None and info["bos_token"] is None
    assert info["model_max_length"] == 256 and info["vocab_size"] == 128
    assert "<|assistant|>" in info["chat_template"]


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "a", "model": "no-such-model"}, "model"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"prompt": "a", "add_bos": True}, "add_bos"),
    ("/detokenize", {"tokens": [3, 999]}, "tokens[1]"),
    ("/detokenize", {"tokens": [-1]}, "tokens.0"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
])
def test_bad_input_names_the_field(gen, path, body, param):
    r = gen.post(path, json=body)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["param"] == param


def test_lm_eval_remote_tokenizer(server):
    """lm-eval's RemoteTokenizer (tokenizer_backend=remote) against this server."""
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    assert check_remote_tokenizer_support(f"{server.url}/v1/completions", auth_token=GEN_KEY)
    tok = RemoteTokenizer(f"{server.url}/v1/completions", auth_token=GEN_KEY)
    assert tok.encode("ab") == TOK.encode("ab", add_bos=False)  # lm-eval asks without BOS
    assert tok.decode(tok.encode("ab")) == "ab"
    assert tok.eos_token_id is None  # no string to encode; lm-eval then uses no EOS
