"""`monet checkpoint random`: a random checkpoint of a release shape, for benchmarks.

Weights are drawn as the release's _init_weights (normal, std 0.02; norms 1; biases 0) layer by
layer; a calibration batch runs through each layer as it is made, and each routing layer's
BatchNorm statistics are set from its real router logits on that batch, so that about k
experts per head and side pass the threshold (as in a trained model) instead of nearly all or
one. Each layer is written to its own safetensors shard (Hugging Face sharded layout with an
index), so memory stays about one layer; the runtime memory-maps the shards on load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

checkpoint_app = typer.Typer(help="Make checkpoints.", no_args_is_help=True)

# The released shapes (/work/shared/monet-spec.md); LLaMA's vocabulary, no grouped-query heads.
RELEASES = {
    "850M": dict(hidden_size=1536, num_hidden_layers=24, num_attention_heads=12, moe_dim=12,
                 moe_heads=6),
    "1.4B": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, moe_dim=16,
                 moe_heads=8),
    "4.1B": dict(hidden_size=3072, num_hidden_layers=32, num_attention_heads=24, moe_dim=24,
                 moe_heads=12),
}
COMMON = dict(vocab_size=32000, moe_experts=512, moe_topk=8, moe_groups=4,
              max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0)


def release_config(shape: str, *, layers: int | None = None, vertical: bool = True):
    from monet_runtime.config import MonetConfig

    fields = {**COMMON, **RELEASES[shape], "moe_decompose": "vertical" if vertical else
              "horizontal"}
    fields["num_key_value_heads"] = fields["num_attention_heads"]
    if layers is not None:
        fields["num_hidden_layers"] = layers
    return MonetConfig.from_dict(fields)


def _randomise(module, gen, std: float = 0.02) -> None:
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif p.dim() >= 2 and not name.endswith(("b1", "b2", "moe.b")):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            else:
                p.zero_()


def _calibrate(router, y_TD) -> None:
    """BatchNorm statistics per head from the router logits of y (all tokens and experts)."""
    for w, norm in ((router.w1, router.norm1), (router.w2, router.norm2)):
        z_THE = w(y_TD).view(-1, router.heads, router.experts).double()
        norm.running_mean.copy_(z_THE.mean((0, 2)).float())
        norm.running_var.copy_(z_THE.var((0, 2)).float())


def write_random_checkpoint(config, out: Path, *, dtype, seed: int = 0,
                            calibration_tokens: int = 256) -> Path:
    """Write config.json, one shard per layer (and one for embeddings, norm and head) and the
    index. Returns out."""
    import torch
    from safetensors.torch import save_file

    from monet_runtime.model import DecoderLayer, MonetForCausalLM, rotary

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}

    def write(prefix: str, module, shard: str) -> None:
        state = {f"{prefix}{k}": v.detach().to(torch.float32 if k.endswith(
            ("running_mean", "running_var")) else dtype).contiguous()
            for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
        save_file(state, out / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(state, shard))

    with torch.device("meta"):
        skeleton = MonetForCausalLM(config)
    for name in ("embed_tokens", "norm"):  # small: made for real, written with the head
        setattr(skeleton.model, name, type(getattr(skeleton.model, name))(
            *_ctor_args(config, name)))
    skeleton.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    _randomise(skeleton.model.embed_tokens, gen)
    _randomise(skeleton.lm_head, gen)
    skeleton.model.norm.weight.data.fill_(1.0)
    n = config.num_hidden_layers
    with torch.no_grad():
        ids = torch.randint(0, config.vocab_size, (1, calibration_tokens), generator=gen)
        x = skeleton.model.embed_tokens(ids)
        T = ids.shape[1]
        cos, sin = rotary(torch.arange(T)[None], config.head_dim, config.rope_theta, x.dtype)
        causal = torch.ones(T, T, dtype=torch.bool).tril()[None]
        routing = None
        for l in range(n):
            layer = DecoderLayer(config, l)
            _randomise(layer, gen)
            if layer.router is not None:
                h = x + layer.self_attn(layer.input_layernorm(x), cos, sin, causal, None)
                _calibrate(layer.router, layer.post_attention_layernorm(h).view(T, -1))
            x, routing = layer.eval()(x, routing, None, cos, sin, causal, None)
            write(f"model.layers.{l}.", layer, f"model-{l + 1:05d}-of-{n + 1:05d}.safetensors")
            del layer
    head = torch.nn.ModuleDict({"model": torch.nn.ModuleDict(
        {"embed_tokens": skeleton.model.embed_tokens, "norm": skeleton.model.norm}),
        "lm_head": skeleton.lm_head})
    write("", head, f"model-{n + 1:05d}-of-{n + 1:05d}.safetensors")
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=1) + "\n")
    return out


def _ctor_args(config, name: str):
    if name == "embed_tokens":
        return config.vocab_size, config.hidden_size
    return config.hidden_size, config.rms_norm_eps


@checkpoint_app.command("random")
def random_command(
    shape: Annotated[str, typer.Option(help="Release shape: 850M, 1.4B or 4.1B.")],
    out: Annotated[Path, typer.Option(help="Directory to write (created).")],
    dtype: Annotated[str, typer.Option(help="bf16 or fp32.")] = "bf16",
    layers: Annotated[int | None, typer.Option(min=1, help="Fewer layers than the release.")] = None,
    horizontal: Annotated[bool, typer.Option(help="HD instead of VD.")] = False,
    seed: int = 0,
):
    """Write a random checkpoint of a release shape with calibrated routing."""
    import torch

    if shape not in RELEASES:
        raise typer.BadParameter(f"must be one of {', '.join(RELEASES)}", param_hint="--shape")
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if dtype not in dtypes:
        raise typer.BadParameter("must be bf16 or fp32", param_hint="--dtype")
    config = release_config(shape, layers=layers, vertical=not horizontal)
    write_random_checkpoint(config, out, dtype=dtypes[dtype], seed=seed)
    typer.echo(f"wrote {shape} ({config.num_hidden_layers} layers, {dtype}) to {out}")
