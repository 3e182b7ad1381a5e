"""Checkpoint and config errors name what is wrong; sharded checkpoints load; memory stays low."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from monet_runtime import CheckpointError, ConfigError, MonetConfig, load_model
from monet_runtime.model import MonetForCausalLM, _packed
from monet_runtime.testing import make_random_checkpoint


@pytest.fixture
def ckpt(tmp_path):
    return make_random_checkpoint(tmp_path / "ckpt", seed=1)


def rewrite_weights(path, edit):
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors")


def test_round_trip_and_identity(ckpt, tmp_path):
    model = load_model(ckpt)
    ids = torch.tensor([[1, 2, 3]])
    assert model.identity.startswith("monet-")
    copy = shutil.copytree(ckpt, tmp_path / "copy")
    assert load_model(copy).identity == model.identity
    assert load_model(copy, dtype=torch.bfloat16).identity == model.identity
    other = make_random_checkpoint(tmp_path / "other", moe_experts=24)
    assert load_model(other).identity != model.identity
    assert torch.equal(load_model(copy)(ids).logits, model(ids).logits)


@pytest.mark.parametrize("decompose", ["vertical", "horizontal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_are_read_into_the_packed_tables(tmp_path, decompose, dtype):
    """The loader reads each weight into its packed table (q, k, v stacked; the v weights and
    biases in the sparse layout): the parameters are views of tables that decoding keeps,
    holding the checkpoint's values, and the logits are those of packing on first use."""
    path = make_random_checkpoint(tmp_path / "ckpt", seed=2, moe_decompose=decompose)
    model = load_model(path, dtype=dtype, tokenizer=False)
    stored = load_file(path / "model.safetensors")
    attention, moe = model.model.layers[0].self_attn, model.model.layers[0].moe
    tables = {key: module.__dict__[key] for module in (attention, moe) for key in module.PACKED}
    assert attention.q_proj.weight.data_ptr() == tables["_qkv"].data_ptr()
    first = "v11.weight" if decompose == "vertical" else "v.weight"
    assert moe.get_parameter(first).data_ptr() == tables[next(iter(moe.PACKED))].data_ptr()
    for name, value in model.state_dict().items():
        assert torch.equal(value, stored[name].to(value.dtype)), name
    plain = MonetForCausalLM(model.config).to(dtype)
    plain.load_state_dict(stored)
    for module in plain.modules():  # packed now, not on the sparse path's first use: the
        for key in getattr(module, "PACKED", {}):  # dense path's products on the same layout
            _packed(module, key)  # (MKL's order depends on it: 1 ulp apart on Intel CPUs)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        assert torch.equal(model.generate(ids, max_new_tokens=4),
                           plain.eval().generate(ids, max_new_tokens=4))
        assert torch.equal(model(ids).logits, plain(ids).logits)
    for module in (attention, moe):  # decoding used the tables the loader made
        assert all(module.__dict__[key] is tables[key] for key in module.PACKED)


def test_sharded_checkpoint(ckpt, tmp_path):
    state = load_file(ckpt / "model.safetensors")
    names = sorted(state)
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(ckpt / "config.json", out)
    halves = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in halves.items():
        save_file({k: state[k] for k in keys}, out / shard)
        weight_map.update({k: shard for k in keys})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ids = torch.tensor([[4, 5, 6]])
    assert torch.equal(load_model(out)(ids).logits, load_model(ckpt)(ids).logits)
    (out / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing shard model-00002"):
        load_model(out)


def test_missing_unexpected_misshaped_tensors(ckpt):
    rewrite_weights(ckpt, lambda s: s.pop("model.layers.1.moe.v12.weight"))
    with pytest.raises(CheckpointError, match=r"lacks tensors: model\.layers\.1\.moe\.v12\.weight"):
        load_model(ckpt)
    rewrite_weights(ckpt, lambda s: s.update({
        "model.layers.1.moe.v12.weight": torch.zeros(32, 64), "model.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.extra\.weight"):
        load_model(ckpt)
    rewrite_weights(ckpt, lambda s: s.pop("model.extra.weight"))
    assert load_model(ckpt)  # now whole again
    rewrite_weights(ckpt, lambda s: s.update({"model.layers.0.router.w1.weight": torch.zeros(3, 64)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.router\.w1\.weight has shape \(3, 64\)"):
        load_model(ckpt)


def test_no_weights_or_directory(tmp_path, ckpt):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(ckpt)


@pytest.mark.parametrize("field,value,message", [
    ("moe_experts", 0, "moe_experts' must be a positive integer"),
    ("moe_experts", "512", "moe_experts' must be a positive integer"),
    ("moe_topk", 64, "moe_topk' must be below moe_experts"),
    ("moe_decompose", "diagonal", "moe_decompose' must be 'vertical' or 'horizontal'"),
    ("num_key_value_heads", 3, "num_key_value_heads' must divide"),
    ("model_type", "llama", "model_type' must be 'monet'"),
    ("hidden_act", "silu", "hidden_act' must be 'relu2'"),
    ("rope_scaling", {"type": "linear", "factor": 2}, "rope_scaling' is not supported"),
    ("rms_norm_eps", -1, "rms_norm_eps' must be a positive number"),
])
def test_bad_config_values(ckpt, field, value, message):
    config = json.loads((ckpt / "config.json").read_text())
    config[field] = value
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        load_model(ckpt)


def test_config_keeps_unknown_fields(tiny_fixture):
    config = MonetConfig.from_file(tiny_fixture / "model")
    assert config.extra["transformers_version"] == "4.46.3"
    assert config.to_dict()["transformers_version"] == "4.46.3"
    assert MonetConfig.from_dict(config.to_dict()) == config


def test_bad_config_files(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(ckpt)


LOAD_AND_REPORT = """
import sys, torch
from monet_runtime import load_model
from monet_runtime import MonetConfig
from monet_runtime.model import MonetForCausalLM
from monet_runtime.testing import random_model

def decode(model):
    with torch.inference_mode():  # decode steps take the sparse path, which repacks v
        for n in (1, 1, 4):
            model(torch.ones(1, n, dtype=torch.long))

# The libraries' own memory first: torch's meta tensors (the loader builds the model on the
# meta device; about 150 MB the first time), the compiled kernels on a small model.
with torch.device("meta"):
    MonetForCausalLM(MonetConfig.from_file(sys.argv[1]))
decode(random_model(hidden_size=64, num_hidden_layers=2, moe_experts=256, moe_dim=4,
                    moe_heads=4, moe_topk=8, num_attention_heads=4, num_key_value_heads=4,
                    vocab_size=1024))
def status(field):  # kB
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))

before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
model = load_model(sys.argv[1], dtype=torch.float32, tokenizer=False)
decode(model)
mapped = sys.argv[1] in open("/proc/self/maps").read()
after = status("VmHWM:")
size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print((after - before) * 1024, size, int(mapped))
"""


def test_loading_peak_memory_is_about_the_model_size(tmp_path):
    """A ~190 MB checkpoint loads and decodes with a peak RSS growth of at most 1.06x its
    size (1.01x measured): the weights are read into memory the model owns, not memory-mapped
    (mapped pages would stay resident beside the packed tables), and straight into those
    tables (packing them on first use held the weights twice for a while: up to 1.17x)."""
    path = make_random_checkpoint(tmp_path / "big", hidden_size=512, num_hidden_layers=8,
                                  moe_experts=256, moe_dim=16, moe_heads=4, moe_topk=8,
                                  num_attention_heads=4, num_key_value_heads=4,
                                  vocab_size=1024)
    run = subprocess.run([sys.executable, "-c", LOAD_AND_REPORT, str(path)],
                         capture_output=True, text=True, check=True)
    grown, size, mapped = map(int, run.stdout.split())
    assert size > 150e6
    assert not mapped, "the checkpoint file is still memory-mapped after loading"
    assert grown <= 1.06 * size, f"peak RSS grew {grown / 1e6:.0f} MB for {size / 1e6:.0f} MB"
    print(f"load + decode: peak RSS grew {grown / size:.2f}x the model's {size / 1e6:.0f} MB")


@pytest.mark.parametrize("damage", ["truncated", "header", "offsets", "dtype", "negative",
                                    "offsets-type"])
def test_damaged_weight_file(ckpt, damage):
    """A damaged safetensors file is a CheckpointError naming the file, never garbage."""
    file = ckpt / "model.safetensors"
    data = bytearray(file.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    if damage == "truncated":
        data = data[:len(data) - 100]
    elif damage == "header":
        data[8:8 + n] = b"{" + b" " * (n - 1)
    else:
        if damage == "offsets":
            header[name]["data_offsets"][1] += 4
        elif damage == "negative":  # a negative dimension, and an extent of -4 bytes to match
            last = max((k for k in header if k != "__metadata__"),
                       key=lambda k: header[k]["data_offsets"][0])
            begin = header[last]["data_offsets"][0]
            header[last].update(dtype="F32", shape=[-1], data_offsets=[begin, begin - 4])
        elif damage == "offsets-type":
            header[name]["data_offsets"] = 7
        else:
            header[name]["dtype"] = "Q99"
        text = json.dumps(header).encode()
        data = len(text).to_bytes(8, "little") + text + data[8 + n:]
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(ckpt)
