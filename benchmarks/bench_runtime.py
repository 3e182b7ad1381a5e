"""Cost of a masked forward pass relative to an unmasked one and to the naive E x E approach.

    .venv/bin/python benchmarks/bench_runtime.py [--tokens 128] [--batch 16] [--repeat 3]

For the fixture (E=16) and a 512-expert configuration, at batch x tokens: wall time of the
unmasked forward, the masked forward (exact active-pair correction, this runtime) and the
naive masked forward (dense G [T, E, E] per token, masked entries zeroed, contracted with
every composite expert, as the paper's authors describe). Target: masked / unmasked <= 1.3.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from monet_runtime import ExpertMask, load_model
from monet_runtime.model import VerticalExperts
from monet_runtime.testing import random_model

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "monet-vd-tiny" / "model"
E512 = dict(vocab_size=1024, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=512, moe_dim=8, moe_heads=4,
            moe_experts=512, moe_topk=8, moe_groups=2)


def random_mask(config, density: float, seed: int = 0) -> ExpertMask:
    gen = torch.Generator().manual_seed(seed)
    E = config.moe_experts
    return ExpertMask({l: (torch.rand(E, E, generator=gen) < density).nonzero()
                       for l in range(config.num_hidden_layers)})


def naive_moe_forward(moe, keep_EE: torch.Tensor, chunk: int = 32):
    """Dense per-token G [t, E, E] with the masked entries zeroed, contracted chunk by chunk."""
    def forward(y_TD, g1, g2, mask=None, pairs_cache=None):
        outs = []
        for s in range(0, y_TD.shape[0], chunk):
            y, a1, a2 = y_TD[s:s + chunk], g1[s:s + chunk], g2[s:s + chunk]
            T, E, M = y.shape[0], moe.E, moe.M
            G = torch.einsum("thi,thj->tij", a1, a2) * keep_EE
            if isinstance(moe, VerticalExperts):
                a = torch.relu(moe.u1(y)).square().view(T, E, M)
                b = torch.relu(moe.u2(y)).square().view(T, E, M)
                c1, c2 = G.sum(2), G.sum(1)
                first = (moe.v11((a * c1[..., None]).flatten(1))
                         + moe.v12(torch.einsum("tij,tjm->tim", G, b).flatten(1)) + c1 @ moe.b1)
                second = (moe.v21(torch.einsum("tij,tim->tjm", G, a).flatten(1))
                          + moe.v22((b * c2[..., None]).flatten(1)) + c2 @ moe.b2)
                outs.append(torch.cat((first, second), -1))
            else:
                x = torch.relu(moe.u(y)).square().view(T, E, M)
                outs.append(moe.v(torch.einsum("tij,tim->tjm", G, x).flatten(1))
                            + G.sum(1) @ moe.b)
        return torch.cat(outs)
    return forward


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def bench(name, model, *, batch, tokens, repeat, densities):
    config = model.config
    ids = torch.randint(0, config.vocab_size, (batch, tokens),
                        generator=torch.Generator().manual_seed(0))
    unmasked = timed(lambda: model(ids), repeat)
    print(f"\n{name}: E={config.moe_experts} H={config.moe_heads} D={config.hidden_size} "
          f"layers={config.num_hidden_layers}, {batch} x {tokens} tokens")
    print(f"  unmasked forward                 {unmasked * 1e3:9.1f} ms")
    for density in densities:
        mask = random_mask(config, density)
        masked = timed(lambda: model(ids, mask=mask), repeat)
        original = [layer.moe.forward for layer in model.model.layers]
        E = config.moe_experts
        for layer in model.model.layers:
            keep = torch.ones(E * E)
            pairs = mask.experts(layer.layer)
            keep[torch.as_tensor(pairs[:, 0] * E + pairs[:, 1])] = 0
            layer.moe.forward = naive_moe_forward(layer.moe, keep.view(E, E))
        naive = timed(lambda: model(ids), 1)
        for layer, forward in zip(model.model.layers, original):
            layer.moe.forward = forward
        print(f"  masked ({density:4.0%} of experts)        {masked * 1e3:9.1f} ms   "
              f"masked/unmasked {masked / unmasked:5.2f}   naive {naive * 1e3:9.1f} ms   "
              f"naive/masked {naive / masked:6.1f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    common = dict(batch=args.batch, tokens=args.tokens, repeat=args.repeat)
    bench("fixture monet-vd-tiny", load_model(FIXTURE), densities=(0.15,), **common)
    bench("random VD, 512 experts", random_model(seed=0, **E512), densities=(0.02, 0.2), **common)
    bench("random HD, 512 experts", random_model(seed=0, moe_decompose="horizontal", **E512),
          densities=(0.02,), **common)


if __name__ == "__main__":
    main()
