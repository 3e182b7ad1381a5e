"""Half-precision models against float32, with stated tolerances.

bfloat16 keeps 8 bits of mantissa, so a router logit near the BatchNorm threshold can fall
on the other side of it and swap an expert: the tolerances are statistical, over 4 x 32 tokens
of the fixture model (random weights, logits of mean magnitude ~1.7):
  - router keep decisions (g > 0) agree on >= 98% of (token, head, expert) entries;
  - mean |logit error| <= 0.15 (bf16) and <= 0.03 (fp16), next-token argmax agreement >= 90%;
  - masked and unmasked alike.
"""

import pytest
import torch

from monet_runtime import ExpertMask, load_model

TOLERANCE = {torch.bfloat16: 0.15, torch.float16: 0.03}


@pytest.fixture(scope="module")
def inputs():
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(tiny_fixture, inputs):
    model = load_model(tiny_fixture / "model", dtype=torch.float32)
    mask = ExpertMask.from_json(tiny_fixture / "mask.json")
    return (model(inputs, output_router_probs=True), model(inputs, mask=mask).logits, mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_against_float32(tiny_fixture, inputs, reference, dtype):
    ref, ref_masked, mask = reference
    model = load_model(tiny_fixture / "model", dtype=dtype)
    assert model.lm_head.weight.dtype == dtype
    # router statistics stay float32, the router runs in float32
    assert model.model.layers[0].router.norm1.running_mean.dtype == torch.float32
    out = model(inputs, output_router_probs=True)
    assert out.logits.dtype == torch.float32
    for layer, (g1, g2) in out.router_probs.items():
        assert g1.dtype == torch.float32
        ref_g1, ref_g2 = ref.router_probs[layer]
        agree = torch.cat([((g1 > 0) == (ref_g1 > 0)).flatten(), ((g2 > 0) == (ref_g2 > 0)).flatten()])
        assert agree.float().mean() >= 0.98
    for got, want in ((out.logits, ref.logits), (model(inputs, mask=mask).logits, ref_masked)):
        assert (got - want).abs().mean() <= TOLERANCE[dtype]
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_bf16_generation_runs_with_mask(tiny_fixture, reference):
    model = load_model(tiny_fixture / "model", dtype=torch.bfloat16)
    mask = reference[2]
    ids = model.generate(torch.tensor([[1, 5, 9, 12]]), max_new_tokens=6, mask=mask)
    assert ids.shape == (1, 10)
