"""Unit tests of the text logic around the engine: incremental detokenization with stop
strings (held-back tails, split UTF-8) and chat templates."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from monet_runtime.tokenizer import ByteTokenizer
from server.errors import ApiError
from server.text import Detokenizer, render_chat

TOK = ByteTokenizer(260)


def run(text: str, stop=()) -> tuple[str, list[str], bool]:
    d = Detokenizer(TOK, tuple(stop))
    deltas = []
    for t in TOK.encode(text, add_bos=False):
        deltas.append(d.add(t))
        if d.stopped:
            break
    deltas.append(d.flush())
    return "".join(deltas), deltas, d.stopped


@given(st.text(max_size=40))
def test_deltas_add_up_to_the_text(text):
    joined, deltas, _ = run(text)
    assert joined == text
    assert all("\ufffd" not in d for d in deltas[:-1]) or "\ufffd" in text


@given(st.text(alphabet="abc\u00e9\u4e2d", max_size=30), st.text(alphabet="abc", min_size=1,
                                                                  max_size=3))
def test_stop_strings_cut_before_the_first_occurrence(text, stop):
    joined, _, stopped = run(text, [stop])
    if stop in text:
        assert stopped and joined == text[:text.find(stop)]
    else:
        assert not stopped and joined == text


def test_held_back_tail_is_released_when_no_stop_follows():
    d = Detokenizer(TOK, ("xyz",))
    out = [d.add(t) for t in TOK.encode("abxy", add_bos=False)]
    assert "".join(out) == "ab"  # "xy" might start "xyz"
    assert d.flush() == "xy"


def test_chat_template():
    tok = ByteTokenizer(260)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('no system role') }}{% endif %}"
                         "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    ids = render_chat(tok, [{"role": "user", "content": "hi"}])
    assert ids[0] == tok.bos_id and tok.decode(ids) == "[user] hi\n[assistant] "
    with pytest.raises(ApiError) as e:
        render_chat(tok, [{"role": "system", "content": "x"}])
    assert e.value.status == 400 and e.value.param == "messages"


def test_default_chat_template():
    ids = render_chat(ByteTokenizer(260), [{"role": "user", "content": "hi"}])
    assert ByteTokenizer(260).decode(ids) == "<|user|>\nhi\n<|assistant|>\n"
