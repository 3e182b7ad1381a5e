"""Engine settings are real settings: each reaches the engine that honours it, and one that the
chosen engine cannot honour is refused at start-up, naming the option, before anything loads.
(The vLLM server in test_vllm_server.py runs with non-default ones.)"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import typer
from server_support import ROOT

from monet_cli.serve import DEFAULT_MODEL, engine_options
from server.settings import Settings


def refused(settings: Settings, engine: str, platform: str | None = None) -> str:
    with pytest.raises(typer.BadParameter) as e:
        engine_options(settings, engine, platform=platform)
    return f"{e.value.param_hint}: {e.value.message}"


def test_defaults_are_each_engines_own():
    assert engine_options(Settings(), "runtime") == {"max_batch_size": 16,
                                                     "max_model_len": None}
    assert engine_options(Settings(), "vllm", platform="cpu") == {
        "max_num_seqs": 64, "max_model_len": None, "tensor_parallel_size": 1,
        "gpu_memory_utilization": None, "kv_cache_bytes": None, "mask_slots": 8,
        "compiled": False, "sparse_experts": True}
    assert engine_options(Settings(), "vllm", platform="cuda")["compiled"] is True


def test_settings_reach_the_engine(monkeypatch):
    monkeypatch.setenv("MONET_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("MONET_MASK_SLOTS", "3")
    monkeypatch.setenv("MONET_SPARSE_EXPERTS", "false")
    settings = Settings(max_model_len=128, kv_cache_bytes=64 << 20, compiled=True,
                        device="cuda:0", gpu_memory_utilization=0.5, tensor_parallel_size=2)
    assert engine_options(settings, "vllm", platform="cuda") == {
        "max_num_seqs": 4, "max_model_len": 128, "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.5, "kv_cache_bytes": 64 << 20, "mask_slots": 3,
        "compiled": True, "sparse_experts": False}
    monkeypatch.delenv("MONET_SPARSE_EXPERTS")
    monkeypatch.delenv("MONET_MASK_SLOTS")
    assert engine_options(Settings(max_batch_size=2, max_model_len=64, threads=1),
                          "runtime") == {"max_batch_size": 2, "max_model_len": 64}


@pytest.mark.parametrize("option, value", [
    ("mask_slots", 4), ("kv_cache_bytes", 1 << 20), ("compiled", False), ("sparse_experts", False),
    ("tensor_parallel_size", 1), ("gpu_memory_utilization", 0.5),
])
def test_vllm_options_are_refused_on_the_runtime_engine(option, value):
    message = refused(Settings(**{option: value}), "runtime")
    assert message.startswith(f"--{option.replace('_', '-')}:")
    assert f"MONET_{option.upper()}" in message and "--engine vllm" in message


@pytest.mark.parametrize("settings, option", [
    (Settings(threads=2), "--threads"),
    (Settings(device="cuda"), "--device"),  # vLLM's platform here is the CPU
    (Settings(device="cuda:1"), "--device"),
    (Settings(gpu_memory_utilization=0.8), "--gpu-memory-utilization"),
    (Settings(max_model_len=4096), "--max-model-len"),  # the model has 1024 positions
])
def test_what_vllm_cannot_honour_is_refused(settings, option):
    assert refused(settings, "vllm", platform="cpu").startswith(f"{option}:")


def test_the_cli_refuses_before_loading_the_model(tmp_path):
    """A checkpoint with a config and no weights: loading it would fail; the refusal comes
    first."""
    shutil.copy(DEFAULT_MODEL / "config.json", tmp_path / "config.json")
    r = subprocess.run([sys.executable, "-m", "monet_cli.main", "serve", "--engine", "runtime",
                        "--model", str(tmp_path), "--mask-slots", "4"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2, r.stderr
    text = " ".join(r.stderr.replace("│", " ").split())  # typer's error box, unwrapped
    assert "--mask-slots" in text and "runtime engine cannot honour" in text, text
    assert "safetensors" not in text
