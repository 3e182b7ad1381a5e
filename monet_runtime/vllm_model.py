"""MONET as a vLLM model (V1 engine), registered by the `vllm.general_plugins` entry point.

The block's math is monet_runtime.model's: its DecoderLayer and layer loop
(run_decoder_layers), with the router's projections swapped for vLLM's ReplicatedLinear (the
same parameters and names, run by vLLM's linear methods: on CPU oneDNN with prepacked weights,
1.5-1.9x torch's F.linear at decode sizes). The expert layers are the runtime's, sparse path
included (kernels.sparse: a decode step reads only the experts its tokens use, about 10% at
batch 1), on the CPU from kernels.sparse.SPARSE_MIN_EXPERTS experts per side; elsewhere, with a
quantization config, or with hf_overrides SPARSE_KEY False, their projections are
ReplicatedLinear too and stay dense (vLLM's CPU linear methods drop the plain weights that the
sparse path reads in place, and CUDA graphs need the dense path's fixed shapes). Attention is
vLLM's (QKV / row-parallel projections, paged attention, its rotary embedding), so tensor
parallelism shards the attention heads; every rank holds all the expert and router weights
(replicated, no all-reduce: each rank computes the same MoE output), which keeps the
factorised mixing over all E experts per side local to one device.

Masks: the model owns a MaskSlots (monet_runtime.vllm_profiles): the profile tables [L, P, W]
in fixed device buffers and the slot of each batch row, which vLLM's per-row hooks (a logits
processor, a worker extension) fill. Each forward reads the attention metadata's
query_start_loc from the forward context and gives the experts profile_T [T] (the slot of
each token's request, -1 unmasked).

Legend: T flattened tokens of the step, D hidden, H routing heads, E experts per side.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import (
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix

import kernels
from kernels.sparse import SPARSE_MIN_EXPERTS
from monet_runtime.config import MonetConfig
from monet_runtime.model import DecoderLayer, RMSNorm, run_decoder_layers
from monet_runtime.vllm_keys import DEFAULT_MASK_SLOTS, MASK_SLOTS_KEY, SPARSE_KEY
from monet_runtime.vllm_profiles import MaskSlots

__all__ = ["MonetForCausalLM", "MonetHFConfig", "register", "sparse_experts"]


class MonetHFConfig(PretrainedConfig):
    """The checkpoint's config.json for transformers/vLLM (model_type "monet")."""

    model_type = "monet"

    def __init__(self, **kwargs):
        kwargs.setdefault("tie_word_embeddings", False)
        rope_theta = kwargs.get("rope_theta", 10000.0)
        kwargs.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": rope_theta})
        super().__init__(**kwargs)
        defaults = MonetConfig()
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings", "rms_norm_eps", "rope_theta", "moe_dim",
                     "moe_heads", "moe_experts", "moe_topk", "moe_groups", "moe_decompose"):
            if not hasattr(self, name):
                setattr(self, name, getattr(defaults, name))
        if getattr(self, "num_key_value_heads", None) is None:
            self.num_key_value_heads = self.num_attention_heads
        if getattr(self, "head_dim", None) is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    def to_monet_config(self) -> MonetConfig:
        fields = {f: getattr(self, f) for f in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
            "rope_theta", "moe_dim", "moe_heads", "moe_experts", "moe_topk", "moe_groups",
            "moe_decompose", "bos_token_id", "eos_token_id")}
        return MonetConfig.from_dict(fields)


def register() -> None:
    """vllm.general_plugins entry point: runs in every vLLM process, maybe more than once."""
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    _CONFIG_REGISTRY["monet"] = MonetHFConfig
    AutoConfig.register("monet", MonetHFConfig, exist_ok=True)
    ModelRegistry.register_model("MonetForCausalLM", "monet_runtime.vllm_model:MonetForCausalLM")


class MonetAttention(nn.Module):
    """LLaMA attention on vLLM's layers: heads sharded over tensor-parallel ranks."""

    def __init__(self, config: MonetConfig, *, cache_config: CacheConfig | None,
                 quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        D, N, K, Dh = (config.hidden_size, config.num_attention_heads,
                       config.num_key_value_heads, config.head_dim)
        if N % tp or (K % tp and tp % K):
            raise ValueError(f"{N} query / {K} key-value heads do not split over {tp} ranks")
        self.q_size = N // tp * Dh
        self.kv_size = max(1, K // tp) * Dh
        self.qkv_proj = QKVParallelLinear(D, Dh, N, K, bias=False, quant_config=quant_config,
                                          prefix=maybe_prefix(prefix, "qkv_proj"))
        self.o_proj = RowParallelLinear(N * Dh, D, bias=False, quant_config=quant_config,
                                        prefix=maybe_prefix(prefix, "o_proj"))
        self.rotary_emb = get_rope(Dh, max_position=config.max_position_embeddings,
                                   is_neox_style=True,  # rotate-half layout
                                   rope_parameters={"rope_type": "default",
                                                    "rope_theta": config.rope_theta})
        # A head width the attention backend lacks (the tiny test models' 16 on CPU) is
        # zero-padded: zeros add nothing to q.k, and the padded output columns are dropped.
        self.head_dim, self.attn_head_dim = Dh, _attention_head_dim(Dh)
        self.attn = Attention(N // tp, self.attn_head_dim, Dh**-0.5, num_kv_heads=max(1, K // tp),
                              cache_config=cache_config, quant_config=quant_config,
                              prefix=maybe_prefix(prefix, "attn"))

    def forward(self, x_TD: torch.Tensor, positions_T: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(x_TD)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions_T, q, k)
        if self.attn_head_dim == self.head_dim:
            out, _ = self.o_proj(self.attn(q, k, v))
            return out
        q, k, v = (self._pad(t) for t in (q, k, v))
        T, Dh = q.shape[0], self.head_dim
        out_TNA = self.attn(q, k, v).view(T, -1, self.attn_head_dim)
        out, _ = self.o_proj(out_TNA[..., :Dh].reshape(T, -1))
        return out

    def _pad(self, x_TX: torch.Tensor) -> torch.Tensor:
        T = x_TX.shape[0]
        x = x_TX.view(T, -1, self.head_dim)
        return F.pad(x, (0, self.attn_head_dim - self.head_dim)).reshape(T, -1)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The checkpoint's q_proj, k_proj, v_proj into the shards of the fused qkv_proj."""
        stacked_params_mapping = [("qkv_proj.", "q_proj.", "q"), ("qkv_proj.", "k_proj.", "k"),
                                  ("qkv_proj.", "v_proj.", "v")]
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            for param_name, weight_name, shard_id in stacked_params_mapping:
                if name.startswith(weight_name):
                    name = name.replace(weight_name, param_name, 1)
                    params[name].weight_loader(params[name], tensor, shard_id)
                    break
            else:
                if name not in params:
                    raise ValueError(f"checkpoint tensor {name!r} has no place in MonetAttention")
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        return loaded


def _attention_head_dim(head_dim: int) -> int:
    """head_dim, or the next width the CPU attention backend supports."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return head_dim
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    sizes = sorted(CPUAttentionBackend.get_supported_head_sizes())
    return head_dim if head_dim in sizes else next(s for s in sizes if s >= head_dim)


def sparse_experts(config: MonetConfig, *, quant_config: QuantizationConfig | None,
                   wanted: bool = True) -> bool:
    """Whether the expert layers take the runtime's sparse path (see the module docstring)."""
    from vllm.platforms import current_platform

    return (wanted and quant_config is None and current_platform.is_cpu()
            and config.moe_experts >= SPARSE_MIN_EXPERTS)


def monet_decoder_layer(config: MonetConfig, layer: int, *, cache_config: CacheConfig | None,
                        quant_config: QuantizationConfig | None, prefix: str,
                        sparse: bool) -> DecoderLayer:
    """monet_runtime.model's DecoderLayer on vLLM's layers: vLLM's attention, the router's
    projections on ReplicatedLinear (unquantised: its threshold decides which experts run at
    all; its BatchNorm statistics float32, as in the release), and the experts' too unless
    `sparse` (then the runtime's, which pick the sparse or the dense path per step)."""
    block = DecoderLayer(config, layer, attention=MonetAttention(
        config, cache_config=cache_config, quant_config=quant_config,
        prefix=maybe_prefix(prefix, "self_attn")))
    if not sparse:
        _with_vllm_linears(block.moe, quant_config, maybe_prefix(prefix, "moe"))
        block.moe.sparse_max_share = 0.0
    if block.router is not None:
        _with_vllm_linears(block.router, None, maybe_prefix(prefix, "router"))
        block.router.norm1.float()
        block.router.norm2.float()
    return block


def _with_vllm_linears(module: nn.Module, quant_config, prefix: str) -> None:
    """Replace each nn.Linear child of module by a ReplicatedLinear of the same shape and
    parameter names that returns only its output, as nn.Linear does."""
    for name, linear in list(module.named_children()):
        if isinstance(linear, nn.Linear):
            setattr(module, name, ReplicatedLinear(
                linear.in_features, linear.out_features, bias=linear.bias is not None,
                quant_config=quant_config, prefix=maybe_prefix(prefix, name),
                return_bias=False))


class MonetModel(nn.Module):
    """Embedding, the MONET blocks, the final norm: hidden states [T, D] of the step's tokens."""

    def __init__(self, config: MonetConfig, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   prefix=maybe_prefix(prefix, "embed_tokens"))
        self.sparse_experts = sparse = sparse_experts(
            config, quant_config=vllm_config.quant_config,
            wanted=bool(getattr(vllm_config.model_config.hf_config, SPARSE_KEY, True)))
        self.layers = nn.ModuleList(
            monet_decoder_layer(config, l, cache_config=vllm_config.cache_config,
                                quant_config=vllm_config.quant_config,
                                prefix=maybe_prefix(prefix, f"layers.{l}"), sparse=sparse)
            for l in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions_T: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None, *, layer_mask=None,
                on_routing=None) -> torch.Tensor:
        """layer_mask, on_routing: as monet_runtime.model.run_decoder_layers."""
        x_TD = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        x_TD = run_decoder_layers(self.layers, x_TD, positions_T, layer_mask=layer_mask,
                                  on_routing=on_routing)
        return self.norm(x_TD)


class MonetForCausalLM(nn.Module):
    """vLLM's MonetForCausalLM. Parameter names follow the Hugging Face checkpoints, except
    q/k/v_proj, which load into the fused qkv_proj. `mask_slots` holds the per-request mask
    state (see the module docstring)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        hf_config = vllm_config.model_config.hf_config
        self.config = config = hf_config.to_monet_config()
        self.model = MonetModel(config, vllm_config=vllm_config,
                                prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                      quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        self.logits_processor = LogitsProcessor(config.vocab_size)
        device = self.lm_head.weight.device
        self.mask_slots = MaskSlots(
            vllm_config, num_layers=config.num_hidden_layers, num_experts=config.moe_experts,
            num_slots=int(getattr(hf_config, MASK_SLOTS_KEY, DEFAULT_MASK_SLOTS)),
            device=device, prefix=maybe_prefix(prefix, "mask_slots"))
        if device.type == "cpu" and torch.cpu._is_amx_tile_supported():
            # vLLM's bfloat16 CPU attention uses AMX tiles without asking Linux for them
            # (arch_prctl ARCH_REQ_XCOMP_PERM): unless oneDNN asked first, as it does for
            # large bfloat16 products, the engine core dies of SIGILL on the first request.
            torch.cpu._init_amx()
        kernels.prepare(device, vllm_config.model_config.dtype, sparse=self.model.sparse_experts)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors=None, inputs_embeds: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        slots, qsl = self.mask_slots, _query_start_loc()
        T = positions.shape[0]
        # On CPU (eager) skip the mask path when no row is masked; on CUDA graphs the same
        # tensors are always passed and the Triton kernels read profile_T without a host sync.
        masked = qsl is not None and (slots.any_masked or positions.is_cuda)
        profile_T = slots.token_profiles(qsl, T) if masked else None
        capture = qsl is not None and bool(slots.row_capture)
        return self.model(
            input_ids, positions, inputs_embeds,
            layer_mask=(lambda l: (slots.tables_LPW[l], profile_T)) if masked else None,
            on_routing=(lambda l, g1, g2: slots.record_routing(l, g1, g2, qsl)) if capture
            else None)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights)


def _query_start_loc() -> torch.Tensor | None:
    """The step's query_start_loc [R+1] (device), None outside a forward with requests."""
    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if not isinstance(metadata, dict) or not metadata:
        return None  # profiling / dummy runs: no requests
    return next(iter(metadata.values())).query_start_loc
