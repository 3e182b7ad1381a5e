"""The runtime against outputs of the authors' reference implementation (float32)."""

import pytest
import torch
from safetensors.torch import load_file

from monet_runtime import ExpertMask, load_model


@pytest.fixture(scope="module")
def golden(tiny_fixture):
    return load_file(tiny_fixture / "golden.safetensors")


@pytest.fixture(scope="module")
def model(tiny_fixture):
    return load_model(tiny_fixture / "model", dtype=torch.float32)


@pytest.fixture(scope="module")
def mask(tiny_fixture):
    return ExpertMask.from_json(tiny_fixture / "mask.json")


def test_logits_and_router_probs(model, golden):
    out = model(golden["input_ids"], output_router_probs=True)
    assert (out.logits - golden["logits"]).abs().max() <= 1e-4
    assert sorted(out.router_probs) == [0, 2]
    for layer, (g1, g2) in out.router_probs.items():
        assert g1.shape == golden[f"router.{layer}.g1"].shape
        assert (g1 - golden[f"router.{layer}.g1"]).abs().max() <= 1e-5
        assert (g2 - golden[f"router.{layer}.g2"]).abs().max() <= 1e-5


def test_masked_logits(model, golden, mask):
    out = model(golden["input_ids"], mask=mask)
    assert (out.logits - golden["masked_logits"]).abs().max() <= 1e-4
    # the mask matters: the unmasked logits are far from the masked ones
    assert (out.logits - golden["logits"]).abs().max() > 1e-2


def test_greedy_generation_with_kv_cache(model, golden):
    prompt = golden["input_ids"][:1]
    ids = model.generate(prompt, max_new_tokens=16, do_sample=False)
    assert ids.tolist() == golden["greedy_ids"].tolist()


def test_masked_greedy_generation(model, golden, mask):
    prompt = golden["input_ids"][:1]
    ids = model.generate(prompt, max_new_tokens=16, mask=mask, do_sample=False)
    assert ids.tolist() == golden["masked_greedy_ids"].tolist()


def test_per_row_masks_in_one_batch(model, golden, mask):
    """Row 0 masked, row 1 not: each row equals its golden counterpart."""
    out = model(golden["input_ids"], mask=[mask, None])
    assert (out.logits[0] - golden["masked_logits"][0]).abs().max() <= 1e-4
    assert (out.logits[1] - golden["logits"][1]).abs().max() <= 1e-4
