"""One request never fails another (over HTTP, on the runtime engine): a request whose sampling
values once made the runtime's sampling raise (top_p 1e-300, 0 in float32) runs in the same
batch as innocent requests; each gets its own answer, the innocents the tokens they get alone."""

from __future__ import annotations

from server_support import poisoned_batch

GREEDY = {"temperature": 0, "ignore_eos": True, "max_tokens": 16}
INNOCENTS = [{"prompt_token_ids": [1, 5, 9], **GREEDY},
             {"prompt_token_ids": [1, 7, 7, 2], **GREEDY, "temperature": 0.8, "seed": 11},
             {"prompt_token_ids": [1, 40], **GREEDY, "top_k": 5, "temperature": 1.3, "seed": 2}]
CULPRIT = {"prompt_token_ids": [1, 99, 100], **GREEDY, "temperature": 1.0, "top_p": 1e-300}


def check_poisoned_batch(c) -> None:
    alone = [c.post("/generate", json=body) for body in INNOCENTS]
    greedy = c.post("/generate", json={**CULPRIT, "temperature": 0, "top_p": 1.0})
    assert all(r.status_code == 200 for r in [*alone, greedy])
    blocker = {"prompt_token_ids": [1, 2, 3], **GREEDY, "max_tokens": 64}
    for _ in range(2):
        batched, culprit = poisoned_batch(c, innocents=INNOCENTS, culprit=CULPRIT,
                                          blocker=blocker)
        assert [r.status_code for r in batched] == [200] * len(INNOCENTS), batched[0].text
        assert [r.json()["token_ids"] for r in batched] == [r.json()["token_ids"] for r in alone]
        # top_p keeps at least the most likely token: the culprit's answer is the greedy one
        assert culprit.status_code == 200, culprit.text
        assert culprit.json()["token_ids"] == greedy.json()["token_ids"]


def test_a_poisoned_request_fails_no_one_in_its_batch(gen):
    check_poisoned_batch(gen)
