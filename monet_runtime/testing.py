"""Small random MONET checkpoints for tests and benchmarks (no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from monet_runtime.config import MonetConfig
from monet_runtime.expert_mask import ExpertMask
from monet_runtime.loading import save_checkpoint
from monet_runtime.model import MonetForCausalLM

__all__ = ["TINY_CONFIG", "make_random_checkpoint", "random_mask", "random_model"]

TINY_CONFIG: dict[str, Any] = dict(
    vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=256, moe_dim=8, moe_heads=2,
    moe_experts=16, moe_topk=4, moe_groups=2, moe_decompose="vertical",
)


def random_model(seed: int = 0, **overrides: Any) -> MonetForCausalLM:
    """A float32 model with every tensor random: norms, biases and router statistics too."""
    config = MonetConfig.from_dict({**TINY_CONFIG, **overrides})
    model = MonetForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if not tensor.dtype.is_floating_point:
                continue
            if name.endswith(("running_var", "running_mean")):
                continue  # calibrated below
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                value = 1 + 0.1 * torch.randn(tensor.shape, generator=gen)
            else:
                std = 0.5 if name.endswith("embed_tokens.weight") else 0.1
                value = torch.randn(tensor.shape, generator=gen) * std
            tensor.copy_(value)
        # Running statistics that match the logits' scale (y is RMS-normalised, so a logit's
        # variance is about |w_row|^2), else far more than k experts pass the threshold.
        H, E = config.moe_heads, config.moe_experts
        for layer in model.model.layers:
            if layer.router is None:
                continue
            for w, norm in ((layer.router.w1, layer.router.norm1), (layer.router.w2, layer.router.norm2)):
                var_H = w.weight.pow(2).sum(1).view(H, E).mean(1)
                norm.running_var.copy_(var_H * (0.8 + 0.4 * torch.rand(H, generator=gen)))
                norm.running_mean.copy_(0.1 * var_H.sqrt() * torch.randn(H, generator=gen))
    return model.eval().requires_grad_(False)


def make_random_checkpoint(path: str | Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Write a random checkpoint (config.json + model.safetensors) built from TINY_CONFIG."""
    return save_checkpoint(random_model(seed, **overrides), path)


def random_mask(config: MonetConfig, fraction: float, seed: int) -> ExpertMask:
    """Each composite expert of every layer removed with probability `fraction`."""
    rng = np.random.default_rng(seed)
    E, L = config.moe_experts, config.num_hidden_layers
    return ExpertMask({l: np.argwhere(rng.random((E, E)) < fraction) for l in range(L)},
                      num_experts=E)
