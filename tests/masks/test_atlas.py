"""The expert atlas: streaming top-N and token sketch against a brute force on synthetic
routing, its memory bound, a build on a real (tiny) model, and its bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from masks.atlas import Atlas, AtlasCorrupt
from masks.atlas_build import AtlasAccumulator, build_atlas
from masks.corpus import Record


def _sparse_router(T: int, H: int, E: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """[T, H, E] router weights with k nonzero experts per (t, h), as the real router has."""
    logits = torch.rand(T, H, E, generator=gen, dtype=torch.float64)
    keep = logits.topk(k, dim=-1).indices
    g = torch.zeros(T, H, E, dtype=torch.float64).scatter_(
        -1, keep, torch.rand(T, H, k, generator=gen, dtype=torch.float64) + 0.1)
    return (g / g.sum(-1, keepdim=True)).float()


def _accumulator(E=6, H=2, top_n=5, top_tokens=4, vocab=300):
    return AtlasAccumulator(routing_layers=[0, 2], num_layers=4, num_experts=E, num_heads=H,
                            groups=2, vocab_size=vocab, top_n=top_n, top_tokens=top_tokens)


def _stream(acc, batches):
    for probs, keys, ids, labels in batches:
        acc.add(probs, keys_T=keys, token_ids_T=ids, labels_T=labels)


def _synthetic(T_total=400, E=6, H=2, vocab=3, seed=0, batch=37):
    gen = torch.Generator().manual_seed(seed)
    out, t0 = [], 0
    while t0 < T_total:
        T = min(batch, T_total - t0)
        probs = {l: (_sparse_router(T, H, E, 2, gen), _sparse_router(T, H, E, 2, gen))
                 for l in (0, 2)}
        keys = torch.arange(t0, t0 + T)  # context key = global token index
        ids = torch.randint(0, vocab, (T,), generator=gen)
        labels = ["a" if t % 3 else "b" for t in range(t0, t0 + T)]
        out.append((probs, keys, ids, labels))
        t0 += T
    return out


def _brute(batches, layer, E):
    g = torch.cat([torch.einsum("thi,thj->tij", p[layer][0].double(), p[layer][1].double())
                   .reshape(-1, E * E) for p, *_ in batches])  # [T, X] all at once
    keys = torch.cat([k for _, k, _, _ in batches])
    ids = torch.cat([i for _, _, i, _ in batches])
    labels = [l for *_, ls in batches for l in ls]
    return g, keys, ids, labels


def test_top_n_is_exact_against_a_brute_force():
    E, N = 6, 5
    batches = _synthetic(E=E)
    acc = _accumulator(E=E, top_n=N)  # 11 batches of 37 tokens: 11 merges
    _stream(acc, batches)
    out = acc.result()
    for r, layer in enumerate((0, 2)):
        g, keys, _, _ = _brute(batches, layer, E)
        for x in range(E * E):
            column = g[:, x]
            nonzero = int((column > 0).sum())
            best = column.argsort(descending=True, stable=True)[:min(N, nonzero)]
            got = out["top_key"][r, x][out["top_key"][r, x] >= 0]
            assert got.tolist() == keys[best].tolist(), (layer, x)
            np.testing.assert_allclose(out["top_weight"][r, x][:len(got)],
                                       column[best].numpy(), rtol=1e-5)
            assert (out["top_weight"][r, x][len(got):] == 0).all()


def test_token_sketch_is_exact_while_an_expert_sees_at_most_m_tokens():
    E, M = 6, 4
    batches = _synthetic(E=E, vocab=M)  # 4 distinct tokens, 4 kept: nothing is pushed out
    acc = _accumulator(E=E, top_tokens=M)
    _stream(acc, batches)
    out = acc.result()
    for r, layer in enumerate((0, 2)):
        g, _, ids, _ = _brute(batches, layer, E)
        sums = torch.zeros(M, E * E, dtype=torch.float64).index_add_(0, ids, g)  # [V, X]
        for x in range(E * E):
            got = {int(t): w for t, w in zip(out["token_ids"][r, x], out["token_weight"][r, x])
                   if t >= 0}
            want = {t: float(sums[t, x]) for t in range(M) if sums[t, x] > 0}
            assert got.keys() == want.keys()
            for t in want:
                assert got[t] == pytest.approx(want[t], rel=1e-5)


def test_token_sketch_keeps_the_heavy_tokens_of_a_long_tail():
    """Token 0 carries half of every expert's weight, 200 others share the rest: with room
    for 4, token 0 is first for every expert that it reaches."""
    E = 4
    gen = torch.Generator().manual_seed(1)
    acc = _accumulator(E=E, top_tokens=4)
    for step in range(20):
        T = 40
        probs = {l: (_sparse_router(T, 2, E, 2, gen), _sparse_router(T, 2, E, 2, gen))
                 for l in (0, 2)}
        ids = torch.where(torch.arange(T) % 2 == 0, 0, torch.randint(1, 201, (T,), generator=gen))
        acc.add(probs, keys_T=torch.arange(T) + step * T, token_ids_T=ids, labels_T=["a"] * T)
    out = acc.result()
    assert (out["token_ids"][:, :, 0] == 0).all()


def test_memory_is_bounded_by_the_shape_not_the_corpus():
    E, H, N, M = 6, 2, 5, 4
    acc = _accumulator(E=E, H=H, top_n=N, top_tokens=M)
    R, X = 2, E * E
    expected = R * X * (N * (4 + 8) + M * (4 + 8))
    _stream(acc, _synthetic(T_total=50, E=E))
    assert acc.state_bytes() == expected
    _stream(acc, _synthetic(T_total=600, E=E, seed=5, batch=200))
    assert acc.state_bytes() == expected
    assert sum(m.numel() * 8 for m in acc.labels._mass) == 2 * R * X * 8  # two labels


def test_release_shape_block_and_state():
    """E = 512 (262,144 experts per routing layer): 75 MB of state at N = 16, M = 8."""
    E, H = 512, 8
    acc = AtlasAccumulator(routing_layers=[0], num_layers=1, num_experts=E, num_heads=H,
                           groups=1, vocab_size=32_000, top_n=16, top_tokens=8)
    assert acc.state_bytes() == E * E * (16 + 8) * 12
    gen = torch.Generator().manual_seed(2)
    T = 40
    probs = {0: (_sparse_router(T, H, E, 4, gen), _sparse_router(T, H, E, 4, gen))}
    acc.add(probs, keys_T=torch.arange(T), token_ids_T=torch.arange(T), labels_T=["a"] * T)
    g = torch.einsum("thi,thj->tij", *probs[0]).reshape(T, -1)
    x = int(g.sum(0).argmax())
    out = acc.result()
    want = g[:, x].argsort(descending=True)[:16]
    want = want[g[want, x] > 0]
    assert out["top_key"][0, x][:len(want)].tolist() == want.tolist()


# ---- a real build -------------------------------------------------------------------------
CORPUS = [Record("def add(a, b):\n    return a + b\n" * 3, "python"),
          Record("The quick brown fox jumps over the lazy dog. " * 4, "english"),
          Record("int main(void) { return 0; }\n" * 3, "c")]


@pytest.fixture(scope="module")
def built(tiny_model) -> Atlas:
    return build_atlas(tiny_model, CORPUS, fingerprint="test", top_n=4, top_tokens=4,
                       window=8, max_length=40, progress=False)


def test_build_on_a_model(built, tiny_model):
    c = tiny_model.config
    assert built.model_id == tiny_model.identity
    assert built.labels == ["c", "english", "python"]
    assert built.tokens == sum(len(tiny_model.tokenizer.encode(r.text, add_bos=False))
                               for r in CORPUS)
    assert built.documents == 3
    # the context windows: the highlighted characters are the token at that position
    for c_index in range(len(built.context_doc)):
        ctx = built.context(c_index)
        ids = tiny_model.tokenizer.encode(CORPUS[ctx["document"]].text, add_bos=False)
        start, end = ctx["highlight"]
        assert ctx["text"][start:end] == tiny_model.tokenizer.decode([ids[ctx["position"]]])
    # the expert with the largest weight on one token is that token's top expert
    used = np.argwhere(built.top_weight[:, :, 0] > 0)
    r, x = used[0]
    entry = built.expert(built.routing_layers[r], x // c.moe_experts, x % c.moe_experts)
    assert entry["contexts"] and entry["contexts"][0]["weight"] == pytest.approx(
        float(built.top_weight[r, x, 0]))
    assert set(entry["label_means"]) == set(built.labels)


def test_label_and_text_specific_experts(built):
    page, total = built.label_specific("python", offset=0, limit=5)
    assert 0 < len(page) <= 5 and total >= len(page)
    scores = [hit["specificity"] for hit in page]
    assert scores == sorted(scores, reverse=True)
    second, _ = built.label_specific("python", offset=5, limit=5)
    assert not {(h["layer"], h["expert"]) for h in page} & {(h["layer"], h["expert"])
                                                            for h in second}
    weight = np.zeros((len(built.routing_layers), built.num_experts ** 2))
    weight[0, 7] = 1.0  # a text routed to expert 7 of the first routing layer only
    hits, total = built.text_specific(weight, offset=0, limit=3)
    assert total == 1 and hits[0]["expert"] == 7 and hits[0]["layer"] == built.routing_layers[0]
    with pytest.raises(ValueError):
        built.label_specific("cobol", offset=0, limit=5)


def test_bytes_round_trip_and_damage(built):
    data = built.to_bytes()
    again = Atlas.from_bytes(data)
    assert again.expert(0, 1, 2) == built.expert(0, 1, 2)
    for bad in (b"", data[: len(data) // 2], b"x" * 100):
        with pytest.raises(AtlasCorrupt):
            Atlas.from_bytes(bad)


def test_cli_build_stores_the_atlas_under_the_model_identity(tiny_checkpoint, tiny_model,
                                                             tmp_path):
    import json

    from typer.testing import CliRunner

    from masks.atlas import atlas_name
    from masks.local_store import LocalMaskStore
    from monet_cli.main import app

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": r.text, "label": r.label}) + "\n"
                              for r in CORPUS))
    result = CliRunner().invoke(app, ["atlas", "build", str(corpus), "--model",
                                      str(tiny_checkpoint), "--store", str(tmp_path / "store"),
                                      "--top-n", "3", "--out", str(tmp_path / "atlas.bin")])
    assert result.exit_code == 0, result.output
    assert "built in" in result.output
    store = LocalMaskStore(tmp_path / "store")
    stored = store.get_artifact(atlas_name(tiny_model.identity))
    store.close()
    assert stored.data == (tmp_path / "atlas.bin").read_bytes()
    atlas = Atlas.from_bytes(stored.data)
    assert atlas.top_weight.shape[-1] == 3 and atlas.labels == ["c", "english", "python"]
    missing = CliRunner().invoke(app, ["atlas", "build", str(tmp_path / "nope.jsonl"),
                                       "--model", str(tiny_checkpoint),
                                       "--store", str(tmp_path / "store")])
    assert missing.exit_code == 1 and "not" in missing.output and "exist" in missing.output
