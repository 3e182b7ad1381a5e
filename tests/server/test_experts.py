"""/experts over HTTP on a real server: 404 before an atlas is built, a build as a background
job, an expert's entry (contexts with the token highlighted, labels, tokens, the profiles that
remove it), search by text and by label with pages, and a damaged atlas failing closed."""

from __future__ import annotations


import pytest
import redis
from server_support import finished, unique

WORDS = {"code": "def f(x):\n    return x + 1\nimport os\nclass A:\n    pass\n",
         "prose": "The cat sat on the mat and the dog lay by the door all day long.\n"}
RECORDS = [{"text": text * 2, "label": label} for label, text in WORDS.items() for _ in range(3)]


@pytest.fixture(scope="module")
def built(server, admin_module, gen_module):
    assert gen_module.get("/experts/0/0/0").status_code == 404  # nothing built yet
    r = admin_module.post("/experts/build", json={"records": RECORDS, "top_n": 4,
                                                  "top_tokens": 4, "window": 6})
    assert r.status_code == 202, r.text
    job = finished(gen_module, r.json())
    assert job["status"] == "succeeded", job
    return job["result"]


@pytest.fixture(scope="module")
def gen_module(server):
    from server_support import client

    with client(server) as c:
        yield c


@pytest.fixture(scope="module")
def admin_module(server):
    from server_support import ADMIN_KEY, client

    with client(server, ADMIN_KEY) as c:
        yield c


def test_no_atlas_is_404_and_build_needs_admin(server, gen_module):
    if gen_module.get("/experts/0/0/0").status_code == 200:
        pytest.skip("the atlas is already built in this session")
    r = gen_module.get("/experts/search", params={"label": "code"})
    assert r.status_code == 404 and "atlas" in r.json()["error"]["message"]
    r = gen_module.post("/experts/build", json={"records": RECORDS})
    assert r.status_code == 403


def test_build_result_and_summary(built, gen_module):
    assert built["atlas"].startswith("atlas:monet-")
    assert built["documents"] == len(RECORDS) and built["tokens"] > 0 and built["contexts"] > 0
    summary = gen_module.get("/experts").json()
    assert summary["atlas"] == built["atlas"] and summary["labels"] == ["code", "prose"]
    assert summary["tokens"] == built["tokens"] == sum(summary["label_tokens"])
    assert summary["top_n"] == 4 and summary["num_experts"] == 16


def test_expert_entry_and_the_profiles_that_remove_it(built, gen_module, admin_module):
    hits = gen_module.get("/experts/search", params={"label": "code", "limit": 1}).json()
    top = hits["experts"][0]
    layer, i, j = top["layer"], top["i"], top["j"]
    entry = gen_module.get(f"/experts/{layer}/{i}/{j}").json()
    assert entry["routing_layer"] == layer and layer in entry["layers"]
    assert set(entry["label_means"]) == {"code", "prose"}
    assert entry["label_means"]["code"] > entry["label_means"]["prose"]
    assert 1 <= len(entry["contexts"]) <= 4 and entry["tokens"]
    weights = [c["weight"] for c in entry["contexts"]]
    assert weights == sorted(weights, reverse=True)
    for c in entry["contexts"]:
        start, end = c["highlight"]
        text = RECORDS[c["document"]]["text"]
        assert 0 <= start < end <= len(c["text"]) and c["text"][start:end] in text
        assert c["text"] in text
    assert entry["removed_by"] == []
    name = unique("atlas")
    other = entry["layers"][-1]
    r = admin_module.put(f"/masks/{name}", json={"layers": [{"layer": other,
                                                             "experts": [[i, j]]}]})
    assert r.status_code == 201, r.text
    entry = gen_module.get(f"/experts/{layer}/{i}/{j}").json()
    assert {"profile": f"{name}@1", "layers": [other]} in entry["removed_by"]
    admin_module.delete(f"/masks/{name}")


def test_search_by_label_pages(built, gen_module):
    first = gen_module.get("/experts/search", params={"label": "prose", "limit": 5}).json()
    second = gen_module.get("/experts/search", params={"label": "prose", "limit": 5,
                                                       "offset": 5}).json()
    assert first["total"] == second["total"] >= 10
    seen = {(h["layer"], h["expert"]) for h in first["experts"]}
    assert len(seen) == 5 and not seen & {(h["layer"], h["expert"]) for h in second["experts"]}
    scores = [h["specificity"] for h in first["experts"] + second["experts"]]
    assert scores == sorted(scores, reverse=True)


def test_search_by_text(built, gen_module):
    r = gen_module.get("/experts/search", params={"q": WORDS["code"], "limit": 10}).json()
    assert r["by"] == "text" and r["tokens"] > 0 and 0 < len(r["experts"]) <= 10
    # the experts most specific to the code text lean to the code label
    code = prose = 0.0
    for hit in r["experts"][:5]:
        means = gen_module.get(f"/experts/{hit['layer']}/{hit['i']}/{hit['j']}").json()
        code += means["label_means"]["code"]
        prose += means["label_means"]["prose"]
    assert code > prose


@pytest.mark.parametrize("params, status, param", [
    ({}, 422, "q"), ({"q": "a", "label": "code"}, 422, "q"),
    ({"label": "cobol"}, 404, "label"), ({"label": "code", "limit": 0}, 422, "limit"),
    ({"q": "x" * 5000}, 422, "q")])
def test_search_refusals_name_the_field(built, gen_module, params, status, param):
    r = gen_module.get("/experts/search", params=params)
    assert r.status_code == status and r.json()["error"]["param"] == param
    assert "xxxxxxxxxx" not in r.text  # never echoes the input


def test_out_of_range_expert_is_404(built, gen_module):
    assert gen_module.get("/experts/0/0/99").json()["error"]["param"] == "j"
    assert gen_module.get("/experts/99/0/0").json()["error"]["param"] == "layer"
    assert gen_module.get("/experts/-1/0/0").status_code == 422


def test_damaged_atlas_fails_closed(built, gen_module, admin_module, redis_server, namespace):
    key = f"{namespace}:artifact:{built['atlas']}"
    client = redis.Redis.from_url(redis_server.url)
    good = client.hgetall(key)
    try:  # a new digest (the server reloads) over bytes that do not match it
        client.hset(key, mapping={"digest": "sha256:" + "0" * 64, "data": b"damaged"})
        r = gen_module.get("/experts/search", params={"label": "code"})
        assert r.status_code == 503 and "damaged" in r.json()["error"]["message"]
        assert r.headers["retry-after"]
    finally:
        client.hset(key, mapping=good)
        client.close()
    assert gen_module.get("/experts/search", params={"label": "code"}).status_code == 200
