"""The expert layers' sparse path (kernels.sparse) against their dense path, in the model.

set_sparse_experts(model, 1) forces the sparse path for every step, 0 the dense one; both run
on the same weights, masked (a profile per row, rows without one) and unmasked, VD and HD,
routing groups of 1 to 3 layers, float32 and bfloat16.
"""

import pytest
import torch
from test_masked_forward import CASES, random_mask

import kernels
from monet_runtime import ExpertMask, load_model
from monet_runtime.model import set_sparse_experts
from monet_runtime.testing import random_model
from safetensors.torch import load_file

TOL = {torch.float32: 2e-4, torch.bfloat16: 0.15}  # logits, absolute (their scale is ~1-10)


def logits(model, ids, masks, share):
    set_sparse_experts(model, share)
    return model(ids, mask=masks).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["vd-E16-G2", "hd-gqa-E24-G3", "vd-E512", "hd-E512-G1"])
def test_sparse_path_equals_the_dense_path(case, dtype):
    model = random_model(seed=3, **CASES[case]).to(dtype)
    config = model.config
    ids = torch.randint(0, config.vocab_size, (3, 4), generator=torch.Generator().manual_seed(1))
    masks = [random_mask(config, 0.3, seed=10), None, random_mask(config, 0.6, seed=11)]
    for rows in (None, masks):
        dense = logits(model, ids, rows, 0.0)
        sparse = logits(model, ids, rows, 1.0)
        scale = dense.abs().max().item()
        assert (sparse - dense).abs().max().item() <= TOL[dtype] * max(1.0, scale)
    unmasked = logits(model, ids, None, 1.0)
    assert (sparse[1] - unmasked[1]).abs().max() <= TOL[dtype] * max(1.0, scale)
    assert (sparse[0] - unmasked[0]).abs().max() > 1e-2  # the mask reached the sparse path


def test_the_default_threshold_takes_the_sparse_path_at_decode_only(monkeypatch):
    model = random_model(seed=3, **CASES["vd-E512"])
    calls = []
    real = kernels.sparse_vd
    monkeypatch.setattr(kernels, "sparse_vd", lambda *a, **k: calls.append(1) or real(*a, **k))
    long = torch.randint(0, model.config.vocab_size, (1, kernels.SPARSE_MAX_TOKENS + 1))
    model(long)  # a long prompt: dense
    assert calls == []
    model.bfloat16()(long[:, :-1])  # all the experts in use: dense in bfloat16
    assert calls == []
    model(long[:, :1])  # one token: about H k of 512 experts
    assert len(calls) == model.config.num_hidden_layers


def test_the_default_threshold_keeps_small_models_dense(monkeypatch):
    """Below kernels.SPARSE_MIN_EXPERTS the dense products are cache-resident and win."""
    model = random_model(seed=3, **CASES["vd-E16-G2"])
    calls = []
    real = kernels.sparse_vd
    monkeypatch.setattr(kernels, "sparse_vd", lambda *a, **k: calls.append(1) or real(*a, **k))
    model(torch.randint(0, model.config.vocab_size, (1, 1)))
    assert calls == []
    set_sparse_experts(model, 1.0)  # still there when asked for
    model(torch.randint(0, model.config.vocab_size, (1, 1)))
    assert len(calls) == model.config.num_hidden_layers


def test_golden_greedy_and_masked_greedy_on_the_sparse_path(tiny_fixture):
    golden = load_file(tiny_fixture / "golden.safetensors")
    model = load_model(tiny_fixture / "model", dtype=torch.float32)
    set_sparse_experts(model, 1.0)
    prompt = golden["greedy_ids"][:, :12]
    out = model.generate(prompt, max_new_tokens=16)
    assert torch.equal(out, golden["greedy_ids"])
    mask = ExpertMask.from_json(tiny_fixture / "mask.json")
    out = model.generate(prompt, max_new_tokens=16, mask=mask)
    assert torch.equal(out, golden["masked_greedy_ids"])
    full = model(golden["input_ids"]).logits
    assert (full - golden["logits"]).abs().max() <= 1e-4


def test_packing_keeps_the_weights_and_unpacking_restores_the_layout(tmp_path):
    model = random_model(seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logits(model, torch.tensor([[1, 2]]), None, 1.0)
    moe = model.model.layers[0].moe
    assert moe.v11.weight.data_ptr() == moe.__dict__["_first"].data_ptr()  # a view, no copy
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.to(torch.bfloat16)  # new parameters: packed again on the next sparse step
    logits(model, torch.tensor([[1, 2]]), None, 1.0)
    assert moe.__dict__["_first"].dtype == torch.bfloat16
    assert moe.v11.weight.data_ptr() == moe.__dict__["_first"].data_ptr()
    set_sparse_experts(model, 0.0)
    assert "_first" not in moe.__dict__ and moe.v11.weight.is_contiguous()
    assert torch.equal(moe.v12.weight.float(), before["model.layers.0.moe.v12.weight"].bfloat16()
                       .float())


def test_tables_packed_in_inference_mode_still_train():
    """Generation (inference mode) packs the experts' v tables and the q, k, v weights; a
    learned-mask build afterwards backpropagates through the same parameters, which must
    not have become views of inference tensors."""
    model = random_model(seed=3, **CASES["vd-E512"])
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.inference_mode():
        model(ids[:, :1])  # one token: the sparse path packs the v tables
    assert "_qkv" in model.model.layers[0].self_attn.__dict__
    assert "_first" in model.model.layers[0].moe.__dict__
    model.requires_grad_(True)
    model(ids).logits.sum().backward()
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q.grad is not None and q.grad.abs().sum() > 0
