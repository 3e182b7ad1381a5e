"""Service settings: every option of `monet serve`, also read from MONET_* environment variables.

Keys are lists: a JSON array (MONET_API_KEYS='["alice:k1", "k2"]') or comma-separated text
(MONET_API_KEYS=alice:k1,k2). "who:key" names the holder in logs and the audit trail; a bare
key is named by a hash prefix. Admin keys also carry the generate scope.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["DEFAULT_STORE_DIR", "LOCAL_NAMES", "LOOPBACK", "Settings"]

DEFAULT_STORE_DIR = Path("~/.local/share/monet/masks")
LOOPBACK = "127.0.0.1"
LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

KeyList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MONET_", extra="ignore")

    # start-up
    model: Path | None = None  # None: the bundled default model
    served_model_name: str | None = None  # None: the checkpoint directory's name
    engine: Literal["auto", "runtime", "vllm"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    host: str = LOOPBACK
    port: int = Field(default=8000, ge=0, le=65535)

    # the engine (None: the engine's default). An option the chosen engine cannot honour is
    # refused at start-up (monet_cli.serve.engine_options), never dropped.
    device: str | None = None  # runtime: cpu; vLLM: its platform's, and only that
    max_batch_size: int | None = Field(default=None, ge=1)  # running at once: 16 / vLLM 64
    max_model_len: int | None = Field(default=None, ge=2)  # prompt + output: model's positions
    threads: int | None = Field(default=None, ge=1)  # CPU threads: runtime only
    tensor_parallel_size: int | None = Field(default=None, ge=1)  # vLLM: 1
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)  # vLLM on a GPU
    kv_cache_bytes: int | None = Field(default=None, ge=1 << 20)  # vLLM: 1 GiB on CPU
    mask_slots: int | None = Field(default=None, ge=1)  # vLLM: 8 profiles running at once
    compiled: bool | None = None  # vLLM: torch.compile + CUDA graphs (on a GPU), else eager
    sparse_experts: bool | None = None  # vLLM: the runtime's sparse expert layers (on CPU)

    # mask store
    redis_url: str | None = None  # None: the embedded local store in store_dir
    store_dir: Path = DEFAULT_STORE_DIR
    store_namespace: str = "monet:masks"
    default_profile: str | None = None  # applied to every request, cannot be opted out of
    mask_staleness_s: float = Field(default=10.0, gt=0)  # refuse cached profiles older than this
    mask_cache_entries: int = Field(default=256, ge=1)

    # auth
    api_keys: KeyList = Field(default_factory=list)  # generate scope
    admin_keys: KeyList = Field(default_factory=list)  # generate + mask writes
    # with keys configured, what a caller without a key may read (with no keys, all of it)
    public_metrics: bool = False  # /metrics: profile names and traffic
    public_docs: bool = False  # /docs and /openapi.json
    # Host header names accepted (any port); empty: any name with keys configured, and
    # without keys only localhost, 127.0.0.1 and [::1] (a DNS rebinding guard)
    allowed_hosts: KeyList = Field(default_factory=list)

    # limits
    max_prompt_tokens: int = Field(default=4096, ge=1)
    max_tokens: int = Field(default=1024, ge=1)  # the most a request may ask for
    max_body_bytes: int = Field(default=16 << 20, ge=1024)
    max_concurrent_requests: int = Field(default=64, ge=1)  # generation requests in flight
    inspect_max_tokens: int = Field(default=256, ge=1)
    drain_timeout_s: float = Field(default=30.0, ge=0)
    corpus_dir: Path | None = None  # where POST /masks/{name}/build may read corpora

    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("model", "served_model_name", "redis_url", "default_profile", "corpus_dir",
                     "device", "max_batch_size", "max_model_len", "threads",
                     "tensor_parallel_size", "gpu_memory_utilization", "kv_cache_bytes",
                     "mask_slots", "compiled", "sparse_experts", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value):
        return [host.lower().strip("[]") for host in _split(value)]

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _split_keys(cls, value):
        keys = _split(value)
        for key in keys:
            if len(key.partition(":")[2] or key) < 8:
                raise ValueError("every API key must be at least 8 characters long")
        return keys

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys or self.admin_keys)

    def host_names(self) -> frozenset[str] | None:
        """The Host names to accept (None: any)."""
        if self.allowed_hosts:
            return frozenset(self.allowed_hosts)
        return None if self.auth_enabled else LOCAL_NAMES


def _split(value) -> list[str]:
    """A JSON array or comma-separated text -> its non-empty items, stripped."""
    if isinstance(value, str):
        text = value.strip()
        value = json.loads(text) if text.startswith("[") else text.split(",")
    return [str(item).strip() for item in value or [] if str(item).strip()]
