"""MONET configuration, read from a checkpoint's config.json.

Known fields are typed and validated; unknown fields are kept in `extra` and written back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "MonetConfig"]


class ConfigError(ValueError):
    """A config.json that cannot describe a MONET model."""


@dataclass(frozen=True, slots=True)
class MonetConfig:
    vocab_size: int = 32000
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    hidden_act: str = "relu2"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    moe_dim: int = 16
    moe_heads: int = 8
    moe_experts: int = 512
    moe_topk: int = 8
    moe_groups: int = 4
    moe_decompose: str = "vertical"
    model_type: str = "monet"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None and self.num_attention_heads > 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        self._validate()

    # ---- derived shapes ----------------------------------------------------------------
    @property
    def vertical(self) -> bool:
        return self.moe_decompose == "vertical"

    @property
    def expert_width(self) -> int:
        """M: width of one expert's activation slice (m/2 for VD, m for HD)."""
        return self.moe_dim // 2 if self.vertical else self.moe_dim

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def is_routing_layer(self, layer: int) -> bool:
        return layer % self.moe_groups == 0

    # ---- validation --------------------------------------------------------------------
    def _validate(self) -> None:
        def need(ok: bool, name: str, why: str):
            if not ok:
                raise ConfigError(f"config field '{name}' {why} (got {getattr(self, name)!r})")

        for name in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "moe_dim",
            "moe_heads", "moe_experts", "moe_topk", "moe_groups",
        ):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 name, "must be a positive integer")
        need(self.model_type == "monet", "model_type", "must be 'monet'")
        need(self.moe_decompose in ("vertical", "horizontal"), "moe_decompose",
             "must be 'vertical' or 'horizontal'")
        need(self.hidden_act == "relu2", "hidden_act", "must be 'relu2'")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             "must divide num_attention_heads")
        need(self.head_dim % 2 == 0, "head_dim", "must be even (rotary embeddings)")
        need(self.moe_topk < self.moe_experts, "moe_topk", "must be below moe_experts")
        need(self.moe_dim % 2 == 0 or not self.vertical, "moe_dim",
             "must be even for the vertical decomposition")
        need(self.hidden_size % 2 == 0 or not self.vertical, "hidden_size",
             "must be even for the vertical decomposition")
        need(isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0,
             "rms_norm_eps", "must be a positive number")
        need(isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0,
             "rope_theta", "must be a positive number")
        need(self.rope_scaling is None, "rope_scaling", "is not supported (MONET uses none)")
        need(not self.attention_bias, "attention_bias", "must be false (MONET has no biases)")
        need(not self.tie_word_embeddings, "tie_word_embeddings", "must be false")

    # ---- (de)serialisation -------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MonetConfig:
        if not isinstance(data, dict):
            raise ConfigError("config must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as e:  # a field of the wrong JSON type reaching a comparison
            raise ConfigError(f"invalid config: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> MonetConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **data, "architectures": ["MonetForCausalLM"]}

    def replace(self, **changes: Any) -> MonetConfig:
        return dataclasses.replace(self, **changes)

    def shape_digest(self) -> str:
        """Hash of the fields that define the computation (not dtype, not bookkeeping)."""
        fields = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("extra", "max_position_embeddings")
        }
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
