"""Masked forward against a naive dense E x E implementation written here.

The naive experts build G[t, i, j] = sum_h g1[t,h,i] g2[t,h,j] for every token, zero the
masked (i, j) of the token's row mask, and contract with the composite experts E_ij(y).
Everything runs in float64 so the comparison is tight.
"""

import pytest
import torch

from monet_runtime import ExpertMask
from monet_runtime.model import HorizontalExperts, VerticalExperts
from monet_runtime.testing import random_model

CASES = {
    "vd-E16-G2": dict(moe_experts=16, moe_groups=2),
    "vd-gqa-E24-G1-H4": dict(moe_experts=24, moe_groups=1, moe_heads=4, num_key_value_heads=2),
    "hd-E16-G2": dict(moe_decompose="horizontal", moe_experts=16, moe_groups=2),
    "hd-gqa-E24-G3": dict(moe_decompose="horizontal", moe_experts=24, moe_groups=3,
                          num_hidden_layers=5, num_key_value_heads=1),
    "vd-E512": dict(moe_experts=512, moe_topk=8, hidden_size=32, num_attention_heads=2,
                    num_key_value_heads=1, moe_heads=2, num_hidden_layers=2),
    "hd-E512-G1": dict(moe_decompose="horizontal", moe_experts=512, moe_topk=8, hidden_size=32,
                       num_attention_heads=2, num_key_value_heads=2, moe_heads=3,
                       num_hidden_layers=2, moe_groups=1),
}


def random_mask(config, density: float, seed: int) -> ExpertMask:
    gen = torch.Generator().manual_seed(seed)
    E = config.moe_experts
    return ExpertMask({
        layer: (torch.rand(E, E, generator=gen) < density).nonzero().tolist()
        for layer in range(config.num_hidden_layers)
    })


def dense_keep(mask: ExpertMask | None, layer: int, E: int) -> torch.Tensor:
    keep = torch.ones(E, E, dtype=torch.float64)
    if mask is not None:
        pairs = mask.experts(layer)
        keep[pairs[:, 0], pairs[:, 1]] = 0
    return keep


def naive_experts(moe, layer, y_TD, g1, g2, keep_TEE):
    """sum_ij G_ij E_ij(y) with G dense [T, E, E] and masked entries zeroed."""
    T = y_TD.shape[0]
    E, M = moe.E, moe.M
    G = torch.einsum("thi,thj->tij", g1.double(), g2.double()) * keep_TEE
    if isinstance(moe, VerticalExperts):
        a = torch.relu(moe.u1(y_TD)).square().view(T, E, M)
        b = torch.relu(moe.u2(y_TD)).square().view(T, E, M)
        blocks = lambda lin: lin.weight.view(-1, E, M)  # noqa: E731  [D/2, E, M]: V_i
        Va11 = torch.einsum("dim,tim->tid", blocks(moe.v11), a)  # V11_i a_i
        Vb12 = torch.einsum("dim,tjm->tijd", blocks(moe.v12), b)  # V12_i b_j
        Va21 = torch.einsum("djm,tim->tijd", blocks(moe.v21), a)  # V21_j a_i
        Vb22 = torch.einsum("djm,tjm->tjd", blocks(moe.v22), b)  # V22_j b_j
        first = (torch.einsum("tij,tid->td", G, Va11) + torch.einsum("tij,tijd->td", G, Vb12)
                 + torch.einsum("tij,id->td", G, moe.b1))
        second = (torch.einsum("tij,tijd->td", G, Va21) + torch.einsum("tij,tjd->td", G, Vb22)
                  + torch.einsum("tij,jd->td", G, moe.b2))
        return torch.cat((first, second), dim=-1)
    x = torch.relu(moe.u(y_TD)).square().view(T, E, M)
    Vx = torch.einsum("djm,tim->tijd", moe.v.weight.view(-1, E, M), x)  # V_j relu2(U_i y)
    return torch.einsum("tij,tijd->td", G, Vx) + torch.einsum("tij,jd->td", G, moe.b)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_masked_forward_matches_naive_dense(case, monkeypatch):
    model = random_model(seed=3, **CASES[case]).double()
    config = model.config
    B, T = 3, 5 if config.moe_experts < 512 else 2
    ids = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    row_masks = [random_mask(config, 0.3, seed=10), None, random_mask(config, 0.6, seed=11)]
    fast = model(ids, mask=row_masks).logits
    unmasked = model(ids).logits

    def patched(moe, layer):
        def forward(y_TD, g1, g2, mask=None, pairs_cache=None):
            keep = torch.stack([dense_keep(m, layer, config.moe_experts)
                                for m in row_masks]).repeat_interleave(T, dim=0)
            return naive_experts(moe, layer, y_TD, g1, g2, keep)
        return forward

    for layer in model.model.layers:
        monkeypatch.setattr(layer.moe, "forward", patched(layer.moe, layer.layer))
    naive = model(ids).logits
    assert (fast - naive).abs().max() < 1e-9
    # the unmasked row is untouched, the masked rows changed
    assert (fast[1] - unmasked[1]).abs().max() < 1e-9
    assert (fast[0] - unmasked[0]).abs().max() > 1e-3
    assert (fast[2] - unmasked[2]).abs().max() > 1e-3


def test_empty_and_full_masks():
    model = random_model(seed=5).double()
    config = model.config
    ids = torch.randint(0, config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    E = config.moe_experts
    every = [[i, j] for i in range(E) for j in range(E)]
    assert torch.equal(model(ids, mask=ExpertMask()).logits, model(ids).logits)
    full = ExpertMask({l: every for l in range(config.num_hidden_layers)})
    # with every expert removed the MoE adds nothing: compare with zeroed experts
    out = model(ids, mask=full).logits
    for layer in model.model.layers:
        layer.moe.forward = lambda y, g1, g2, mask=None, pairs_cache=None: torch.zeros_like(y)
    assert (out - model(ids).logits).abs().max() < 1e-9


def test_literal_composite_experts_small():
    """For E=16, materialise every E_ij(y) literally: no algebra shared with the runtime."""
    model = random_model(seed=7).double()
    config = model.config
    layer = model.model.layers[0]
    moe, E, M = layer.moe, config.moe_experts, config.expert_width
    gen = torch.Generator().manual_seed(4)
    y = torch.randn(3, config.hidden_size, generator=gen, dtype=torch.float64)
    g1, g2 = layer.router(y)
    mask = random_mask(config, 0.4, seed=12)
    keep = dense_keep(mask, 0, E)
    table = mask.to_table(num_layers=config.num_hidden_layers, num_experts=E)[0][None]
    fast = moe(y, g1, g2, (table, torch.zeros(3, dtype=torch.int32)))
    D2 = config.hidden_size // 2
    expected = torch.zeros(3, config.hidden_size, dtype=torch.float64)
    for t in range(3):
        a = torch.relu(moe.u1(y[t])).square().view(E, M)
        b = torch.relu(moe.u2(y[t])).square().view(E, M)
        for i in range(E):
            for j in range(E):
                g = float((g1[t, :, i] * g2[t, :, j]).sum()) * float(keep[i, j])
                if g == 0:
                    continue
                V = lambda lin, k: lin.weight[:, k * M:(k + 1) * M]  # noqa: E731
                e_first = V(moe.v11, i) @ a[i] + V(moe.v12, i) @ b[j] + moe.b1[i]
                e_second = V(moe.v21, j) @ a[i] + V(moe.v22, j) @ b[j] + moe.b2[j]
                expected[t] += g * torch.cat((e_first, e_second))
    assert expected[:, :D2].abs().max() > 0
    assert (fast - expected).abs().max() < 1e-10


@pytest.mark.parametrize("case", ["vd-E16-G2", "hd-gqa-E24-G3"])
def test_forward_dense_matches_naive(case):
    """forward_dense (the attribution path) against the naive contraction written here, with
    an arbitrary composite weight matrix (masked entries, scaled entries)."""
    model = random_model(seed=3, **CASES[case]).double()
    config = model.config
    layer = model.model.layers[0]
    gen = torch.Generator().manual_seed(6)
    y = torch.randn(4, config.hidden_size, generator=gen, dtype=torch.float64)
    g1, g2 = layer.router(y)
    E = config.moe_experts
    keep = torch.rand(4, E, E, generator=gen, dtype=torch.float64)  # any weights, per token
    G = torch.einsum("thi,thj->tij", g1, g2) * keep
    expected = naive_experts(layer.moe, 0, y, g1, g2, keep)
    assert (layer.moe.forward_dense(y, G) - expected).abs().max() < 1e-10
