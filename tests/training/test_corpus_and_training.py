"""The local corpus builder and the training loop."""

import json

import pytest
import torch
from safetensors.torch import load_file

from monet_runtime import load_model
from training.corpus import LANGUAGES, build_corpus
from training.train import TrainConfig, routing_losses, train

TINY = dict(vocab_size=260, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=128, moe_dim=4, moe_heads=2,
            moe_experts=16, moe_topk=2, moe_groups=2, moe_decompose="vertical")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    return out, build_corpus(out, max_chars_per_label=60_000, chunk_chars=800)


def test_corpus_is_labelled_split_and_deterministic(corpus, tmp_path):
    out, manifest = corpus
    assert set(manifest.counts) == set(LANGUAGES)
    present = [l for l in LANGUAGES if l not in manifest.missing]
    assert len(present) >= 3, f"too few sources on this machine: {manifest.missing}"
    for label in present:
        assert manifest.counts[label]["train"] > manifest.counts[label]["test"] > 0
        assert 60_000 <= manifest.chars[label] < 80_000
    rows = {split: [json.loads(l) for l in (out / f"{split}.jsonl").open()]
            for split in ("train", "valid", "test")}
    train_texts = {r["text"] for r in rows["train"]}
    assert not train_texts & {r["text"] for r in rows["test"]}
    python = [r["text"] for r in rows["train"] if r["label"] == "python"]
    assert any("def " in t for t in python)
    english = [r["text"] for r in rows["train"] if r["label"] == "english"]
    assert all("=head" not in t for t in english)
    again = build_corpus(tmp_path / "again", max_chars_per_label=60_000, chunk_chars=800)
    assert again.fingerprint == manifest.fingerprint


def test_routing_losses_bounds():
    H, E = 2, 8
    uniform = torch.full((1, 5, H, E), 1 / E)
    unif, amb = routing_losses({0: (uniform, uniform)}, H, E)
    assert unif.item() == pytest.approx(torch.log(torch.tensor(float(E))).item())
    assert amb.item() == pytest.approx(1 - 1 / E)
    one_hot = torch.zeros(1, 5, H, E)
    one_hot[..., 0] = 1
    assert routing_losses({0: (one_hot, one_hot)}, H, E)[1].item() == pytest.approx(0.0)


def test_training_learns_and_resumes_exactly(corpus, tmp_path):
    out, _ = corpus
    cfg = lambda path, steps: TrainConfig(  # noqa: E731
        corpus=str(out), out=str(path), model=TINY, steps=steps, batch_size=4, seq_len=32,
        warmup=2, eval_every=4, save_every=2, lr=1e-2)
    straight = train(cfg(tmp_path / "straight", 6), progress=False)
    train(cfg(tmp_path / "resumed", 6), progress=False, until=3)
    resumed = train(cfg(tmp_path / "resumed", 6), progress=False)
    a = load_file(straight / "model.safetensors")
    b = load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(l) for l in (straight / "train_log.jsonl").open()]
    assert log[-1]["lm"] < log[0]["lm"]
    assert set(log[-1]["held_out"]) >= {"python", "c"}
    # the checkpoint is an ordinary one: it loads and generates
    model = load_model(straight)
    assert model.generate(torch.tensor([[1, 40, 41]]), max_new_tokens=3).shape == (1, 6)
    # the routers learned running statistics in training mode
    assert model.model.layers[0].router.norm1.running_var.ne(1).any()
