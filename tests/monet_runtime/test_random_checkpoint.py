"""`monet checkpoint random`: release-shaped random checkpoints with calibrated routing."""

import torch
from typer.testing import CliRunner

from monet_cli.checkpoint import release_config, write_random_checkpoint
from monet_cli.main import app
from monet_runtime import load_model
from monet_runtime.config import MonetConfig


def test_release_shapes_follow_the_spec():
    c = release_config("850M")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.moe_dim, c.moe_heads,
            c.moe_experts, c.moe_topk, c.moe_groups, c.vocab_size) == (
        1536, 24, 12, 12, 6, 512, 8, 4, 32000)
    assert release_config("4.1B", layers=2).num_hidden_layers == 2


def test_calibrated_routing_keeps_about_k_experts_per_head(tmp_path):
    config = MonetConfig.from_dict(dict(
        vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        moe_dim=8, moe_heads=2, moe_experts=128, moe_topk=8, moe_groups=2))
    write_random_checkpoint(config, tmp_path / "ck", dtype=torch.bfloat16, calibration_tokens=64)
    assert len(list((tmp_path / "ck").glob("model-*.safetensors"))) == 4  # a shard per layer
    model = load_model(tmp_path / "ck", dtype=torch.float32, tokenizer=False)
    ids = torch.randint(0, 300, (1, 200), generator=torch.Generator().manual_seed(1))
    out = model(ids, output_router_probs=True)
    for g1, g2 in out.router_probs.values():
        for g in (g1, g2):
            kept = (g > 0).sum(-1).double().mean().item()  # per token and head
            assert 3 <= kept <= 16, kept  # about k = 8; uncalibrated it is ~1 or ~all 128


def test_the_command_refuses_an_unknown_shape(tmp_path):
    result = CliRunner().invoke(app, ["checkpoint", "random", "--shape", "2B", "--out",
                                      str(tmp_path / "x")])
    assert result.exit_code != 0 and "--shape" in result.output
    assert not (tmp_path / "x").exists()
