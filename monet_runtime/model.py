"""MONET decoder in plain PyTorch, exact to the authors' release (arXiv 2412.04139).

A LLaMA decoder whose MLP is a mixture of E x E composite experts: a BatchNorm-threshold router
(shared by the `moe_groups` layers of a routing group) gives g1, g2 [T, H, E] per token; the
experts' output sum_ij (sum_h g1[h,i] g2[h,j]) E_ij(y) is computed factorised (kernels.mixing),
and an expert mask zeroes chosen g_ij per token without building the E x E matrix.

Legend: B batch, T tokens (new), S tokens (cached + new), D hidden, N attention heads,
K key/value heads, Dh head width, H routing heads, E experts per side, M expert width, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from monet_runtime.config import MonetConfig

__all__ = ["DecoderLayer", "KVCache", "MaskBatch", "MonetForCausalLM", "MonetOutput",
           "run_decoder_layers", "set_sparse_experts"]


# ---- per-batch state ---------------------------------------------------------------------
@dataclass(slots=True)
class KVCache:
    """Preallocated keys and values per layer: [B, K, S_max, Dh]; `length` positions filled."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @classmethod
    def allocate(cls, config: MonetConfig, batch: int, max_len: int, *, dtype, device):
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        new = lambda: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        layers = range(config.num_hidden_layers)
        return cls([new() for _ in layers], [new() for _ in layers])

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]


@dataclass(slots=True)
class MaskBatch:
    """Mask tables for one forward pass: each row of the batch may carry its own mask.

    tables: int32 [L, P, W] bitsets (kernels.mixing format); profile_B: [B] row -> profile in
    [0, P) or -1 (no mask); active_layers: layers where some profile masks something.
    """

    tables: torch.Tensor
    profile_B: torch.Tensor
    active_layers: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def build(cls, masks, *, batch: int, config: MonetConfig, device) -> MaskBatch | None:
        """masks: None, one ExpertMask for every row, or a list of ExpertMask | None per row."""
        if masks is None:
            return None
        if not isinstance(masks, (list, tuple)):
            masks = [masks] * batch
        if len(masks) != batch:
            raise ValueError(f"got {len(masks)} masks for a batch of {batch} rows")
        profiles: list = []
        profile_B = []
        for mask in masks:
            if mask is None or not mask:
                profile_B.append(-1)
                continue
            if mask not in profiles:
                profiles.append(mask)
            profile_B.append(profiles.index(mask))
        if not profiles:
            return None
        L, E = config.num_hidden_layers, config.moe_experts
        tables = torch.stack(
            [m.to_table(num_layers=L, num_experts=E) for m in profiles], dim=1
        )  # [L, P, W]
        active = frozenset(l for l in range(L) if any(l in m.layers for m in profiles))
        return cls(
            tables.to(device),
            torch.tensor(profile_B, dtype=torch.int32, device=device),
            active,
        )

    def tokens(self, layer: int, T: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(table [P, W], profile per flattened token [B*T]) for one layer, or None."""
        if layer not in self.active_layers:
            return None
        return self.tables[layer], self.profile_B.repeat_interleave(T)


@dataclass
class MonetOutput:
    logits: torch.Tensor  # [B, T, V] float32
    router_probs: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # g1, g2 [B,T,H,E]
    hidden_states: torch.Tensor | None = None  # [B, T, D] after the final norm


# ---- building blocks ---------------------------------------------------------------------
def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As LLaMA: normalise in float32 (or better), cast back, then scale.
        xf = x.to(_at_least_float32(x.dtype))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


def rotary(positions_BT: torch.Tensor, head_dim: int, theta: float, dtype):
    """cos, sin [B, 1, T, Dh] for the rotate-half layout, computed in float32."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=positions_BT.device).float() / head_dim)
    )
    freqs = positions_BT.float()[..., None] * inv_freq  # [B, T, Dh/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _table_views(table_RD: torch.Tensor, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of a packed table (kernels.pack_vd / pack_hd) shaped as its parts: v weights
    [D', E*M] (transposed row blocks) and, last, the bias [E, D']."""
    views, start = [], 0
    for weight in parts[:-1]:
        views.append(table_RD[start : start + weight.shape[1]].t())
        start += weight.shape[1]
    return [*views, table_RD[start:]]


def _row_blocks(table: torch.Tensor, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of a table of stacked weights (torch.cat of [N_i, D] ones) shaped as its parts."""
    return list(table.split([p.shape[0] for p in parts]))


def _stack_rows(*weights: torch.Tensor) -> torch.Tensor:
    return torch.cat(weights)


class Packing(NamedTuple):
    """A table that parameters `names` of a module are views of: `pack` builds it from them,
    `views` gives their views of it."""

    names: tuple[str, ...]
    pack: Callable[..., torch.Tensor]
    views: Callable[[torch.Tensor, list[torch.Tensor]], list[torch.Tensor]] = _table_views


def _packed(module: nn.Module, key: str) -> torch.Tensor:
    """The packed table `key` of module.PACKED that its parameters are views of: packed on
    first use (unless the loader read them into it) and again when they no longer are (after
    .to(), or a state dict loaded with assign=True). The dense path uses the same views, so
    nothing is copied."""
    names, pack, views = module.PACKED[key]
    params = [module.get_parameter(n) for n in names]
    table = module.__dict__.get(key)
    if table is None or not all(
        p.data_ptr() == v.data_ptr() and p.dtype == v.dtype and p.device == v.device
        and p.shape == v.shape for p, v in zip(params, views(table, params))
    ):
        # Outside inference mode even when called in it (generation runs there): parameters
        # that became views of an inference tensor could no longer be saved for backward
        # (a learned-mask build after a request).
        with torch.inference_mode(False), torch.no_grad():
            table = pack(*(p.detach() for p in params))
            for p, view in zip(params, views(table, params)):
                p.data = view
        module.__dict__[key] = table  # not a buffer: the parameters are its state
    return table


def empty_packed_tables(model: nn.Module, dtype_of: Callable[[str], torch.dtype],
                        device: torch.device | str) -> dict[str, torch.Tensor]:
    """For a loader of a model built on the meta device: every packed table allocated
    (uninitialised) and kept as its module's; returns, by parameter name, the views of them
    that the parameters are to be (load_state_dict(assign=True) with them keeps the tables).
    Reading the weights into these, rather than packing on first use, never holds a weight
    twice. `dtype_of(name)`: each parameter's dtype (one per table)."""
    out: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        for key, (names, pack, views) in getattr(module, "PACKED", {}).items():
            full = [f"{prefix}.{n}" if prefix else n for n in names]
            (dtype,) = {dtype_of(n) for n in full}
            params = [module.get_parameter(n).detach().to(dtype) for n in names]
            shape = pack(*params).shape  # on the meta device: the shape alone
            with torch.inference_mode(False):
                table = torch.empty(shape, dtype=dtype, device=device)
            module.__dict__[key] = table
            out.update(zip(full, views(table, params)))
    return out


def _stacked_linear(module: nn.Module, key: str, x: torch.Tensor):
    """x through the bias-free linear layers of module.PACKED[key] at once, their outputs
    concatenated: one matrix product over a table their weights are row-block views of
    (as _packed). A decode step's product reads its weights once, and with
    OMP_WAIT_POLICY=PASSIVE each product wakes the OpenMP threads: one instead of three for
    q, k, v. Under autograd, each layer's own product (the parameters' gradients)."""
    if torch.is_grad_enabled():
        return torch.cat([module.get_submodule(n.removesuffix(".weight"))(x)
                          for n in module.PACKED[key].names], -1)
    return kernels.linear(x, _packed(module, key))


class Linear(nn.Linear):
    """A bias-free nn.Linear whose product goes through kernels.linear: a decode step's few
    tokens take compiled matrix-vector loops on the CPU."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight)


class Attention(nn.Module):
    """Grouped-query causal self-attention with rotary embeddings and a preallocated KV cache."""

    PACKED = {"_qkv": Packing(("q_proj.weight", "k_proj.weight", "v_proj.weight"), _stack_rows,
                              _row_blocks)}

    def __init__(self, config: MonetConfig, layer: int):
        super().__init__()
        D, N, K, Dh = (config.hidden_size, config.num_attention_heads,
                       config.num_key_value_heads, config.head_dim)
        self.config, self.layer = config, layer
        self.q_proj = nn.Linear(D, N * Dh, bias=False)
        self.k_proj = nn.Linear(D, K * Dh, bias=False)
        self.v_proj = nn.Linear(D, K * Dh, bias=False)
        self.o_proj = Linear(N * Dh, D)

    def forward(self, x_BTD, cos, sin, attn_mask_BTS, cache: KVCache | None):
        B, T, _ = x_BTD.shape
        layer = self.layer
        N, K, Dh = (self.config.num_attention_heads, self.config.num_key_value_heads,
                    self.config.head_dim)
        qkv = _stacked_linear(self, "_qkv", x_BTD)
        q, k, v = qkv.view(B, T, N + 2 * K, Dh).transpose(1, 2).split((N, K, K), 1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            start = cache.length
            cache.keys[layer][:, :, start : start + T] = k
            cache.values[layer][:, :, start : start + T] = v
            k, v = cache.keys[layer], cache.values[layer]  # the first start + T positions
        out = kernels.attention(q, k, v, attn_mask_BTS)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, N * Dh))


class Router(nn.Module):
    """g1, g2 [T, H, E] (float32) from y [T, D]: BatchNorm threshold over the raw logits."""

    def __init__(self, config: MonetConfig):
        super().__init__()
        H, E = config.moe_heads, config.moe_experts
        self.heads, self.experts = H, E
        self.sigma = kernels.router_sigma(config.moe_topk, E)
        self.w1 = Linear(config.hidden_size, H * E)
        self.w2 = Linear(config.hidden_size, H * E)
        self.norm1 = nn.BatchNorm1d(H, affine=False)
        self.norm2 = nn.BatchNorm1d(H, affine=False)

    def _side(self, y_TD, w: nn.Linear, norm: nn.BatchNorm1d) -> torch.Tensor:
        # As the release: projection in the model dtype, everything after it in float32.
        z_THE = w(y_TD).view(-1, self.heads, self.experts)
        z_THE = z_THE.to(_at_least_float32(z_THE.dtype))
        if self.training:  # batch statistics, updating the running ones (training only)
            n_THE = norm(z_THE)
            t = n_THE.amax(-1, keepdim=True).clamp_max(self.sigma)
            return torch.softmax(torch.where(n_THE >= t, z_THE, kernels.router.DROPPED_LOGIT), -1)
        return kernels.route(
            z_THE, norm.running_mean, norm.running_var, sigma=self.sigma, eps=norm.eps
        )

    def forward(self, y_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._side(y_TD, self.w1, self.norm1), self._side(y_TD, self.w2, self.norm2)


class _Experts(nn.Module):
    """The expert layers' choice of path: per step, the sparse one (kernels.sparse) while at
    most `sparse_max_share` of the experts per side are in use, else the dense one."""

    sparse_max_share: float | None = None  # None: kernels.SPARSE_MAX_SHARE, by dtype

    def unpack(self) -> None:
        """Drop the packed tables; the parameters become contiguous copies of their views."""
        for key in self.PACKED:
            if self.__dict__.pop(key, None) is not None:
                with torch.inference_mode(False), torch.no_grad():  # as _packed
                    for p in self.parameters():
                        p.data = p.data.contiguous()

    def _active(self, y_TD, g1_THE, g2_THE, pairs_cache):
        return kernels.use_sparse(g1_THE, g2_THE, pairs_cache, dtype=y_TD.dtype,
                                  max_share=self.sparse_max_share)


def set_sparse_experts(model: nn.Module, max_share: float | None) -> None:
    """Let the expert layers take the sparse path while at most max_share of the experts per
    side are in use: 1 always, None (the default) as measured (kernels.SPARSE_MAX_SHARE), 0 never.
    0 also gives the v weights back their checkpoint layout (the dense path as released:
    bfloat16 matrix products on the packed layout measured up to 5x slower on the CPU)."""
    for module in model.modules():
        if isinstance(module, _Experts):
            module.sparse_max_share = max_share
            if max_share is not None and max_share <= 0:
                module.unpack()


class VerticalExperts(_Experts):
    """VD: E_ij = [V11_i a_i + V12_i b_j + b1_i ; V21_j a_i + V22_j b_j + b2_j]."""

    PACKED = {"_first": Packing(("v11.weight", "v12.weight", "b1"), kernels.pack_vd),
              "_second": Packing(("v21.weight", "v22.weight", "b2"), kernels.pack_vd)}

    def __init__(self, config: MonetConfig):
        super().__init__()
        D, E, M = config.hidden_size, config.moe_experts, config.expert_width
        self.E, self.M = E, M
        self.u1 = nn.Linear(D, E * M)
        self.u2 = nn.Linear(D, E * M)
        self.v11 = nn.Linear(E * M, D // 2, bias=False)
        self.v12 = nn.Linear(E * M, D // 2, bias=False)
        self.v21 = nn.Linear(E * M, D // 2, bias=False)
        self.v22 = nn.Linear(E * M, D // 2, bias=False)
        self.b1 = nn.Parameter(torch.zeros(E, D // 2))
        self.b2 = nn.Parameter(torch.zeros(E, D // 2))

    def forward(self, y_TD, g1_THE, g2_THE, mask=None, pairs_cache=None) -> torch.Tensor:
        active = self._active(y_TD, g1_THE, g2_THE, pairs_cache)
        if active is not None:
            first, second = _packed(self, "_first"), _packed(self, "_second")
            return kernels.sparse_vd(y_TD, active, (self.u1.weight, self.u1.bias),
                                     (self.u2.weight, self.u2.bias), first, second, mask)
        T = y_TD.shape[0]
        a_TEM = relu2(self.u1(y_TD)).view(T, self.E, self.M)
        b_TEM = relu2(self.u2(y_TD)).view(T, self.E, self.M)
        mix = kernels.mix_vd(a_TEM, b_TEM, g1_THE, g2_THE, *(mask or (None, None)),
                             pairs_cache=pairs_cache)
        first = self.v11(mix.x11) + self.v12(mix.x12) + mix.c1 @ self.b1
        second = self.v21(mix.x21) + self.v22(mix.x22) + mix.c2 @ self.b2
        return torch.cat((first, second), dim=-1)

    def forward_dense(self, y_TD, weights_TEE) -> torch.Tensor:
        """sum_ij G[t,i,j] E_ij(y_t) for an explicit composite weight matrix G [T, E, E]: the
        naive O(E^2) computation, differentiable in G (expert attribution uses it)."""
        T = y_TD.shape[0]
        a_TEM = relu2(self.u1(y_TD)).view(T, self.E, self.M)
        b_TEM = relu2(self.u2(y_TD)).view(T, self.E, self.M)
        G = weights_TEE.to(a_TEM.dtype)
        c1_TE, c2_TE = G.sum(2), G.sum(1)
        x11 = (a_TEM * c1_TE[..., None]).reshape(T, -1)
        x12 = torch.bmm(G, b_TEM).reshape(T, -1)  # [t, i] = sum_j G_ij b_j
        x21 = torch.bmm(G.transpose(1, 2), a_TEM).reshape(T, -1)  # [t, j] = sum_i G_ij a_i
        x22 = (b_TEM * c2_TE[..., None]).reshape(T, -1)
        first = self.v11(x11) + self.v12(x12) + c1_TE @ self.b1
        second = self.v21(x21) + self.v22(x22) + c2_TE @ self.b2
        return torch.cat((first, second), dim=-1)


class HorizontalExperts(_Experts):
    """HD: E_ij = V_j relu2(U_i y + c_i) + b_j."""

    PACKED = {"_table": Packing(("v.weight", "b"), kernels.pack_hd)}

    def __init__(self, config: MonetConfig):
        super().__init__()
        D, E, M = config.hidden_size, config.moe_experts, config.expert_width
        self.E, self.M = E, M
        self.u = nn.Linear(D, E * M)
        self.v = nn.Linear(E * M, D, bias=False)
        self.b = nn.Parameter(torch.zeros(E, D))

    def forward(self, y_TD, g1_THE, g2_THE, mask=None, pairs_cache=None) -> torch.Tensor:
        active = self._active(y_TD, g1_THE, g2_THE, pairs_cache)
        if active is not None:
            table = _packed(self, "_table")
            return kernels.sparse_hd(y_TD, active, (self.u.weight, self.u.bias), table, mask)
        T = y_TD.shape[0]
        x_TEM = relu2(self.u(y_TD)).view(T, self.E, self.M)
        mix = kernels.mix_hd(x_TEM, g1_THE, g2_THE, *(mask or (None, None)),
                             pairs_cache=pairs_cache)
        return self.v(mix.x) + mix.c2 @ self.b

    def forward_dense(self, y_TD, weights_TEE) -> torch.Tensor:
        """sum_ij G[t,i,j] E_ij(y_t) for an explicit G [T, E, E] (see VerticalExperts)."""
        T = y_TD.shape[0]
        x_TEM = relu2(self.u(y_TD)).view(T, self.E, self.M)
        G = weights_TEE.to(x_TEM.dtype)
        x = torch.bmm(G.transpose(1, 2), x_TEM).reshape(T, -1)  # [t, j] = sum_i G_ij x_i
        return self.v(x) + G.sum(1) @ self.b


class DecoderLayer(nn.Module):
    """One MONET block: h = x + Attn(norm(x)); y = norm(h); out = h + Experts(y, g1, g2, mask),
    g1, g2 [T, H, E] from this layer's router or, in a routing group's later layers, from the
    group's first. The math of both models: the vLLM model (monet_runtime.vllm_model) passes
    its own attention module and swaps the experts' and router's linear layers for vLLM's."""

    def __init__(self, config: MonetConfig, layer: int, *, attention: nn.Module | None = None):
        super().__init__()
        self.layer = layer
        self.self_attn = attention if attention is not None else Attention(config, layer)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.moe = (VerticalExperts if config.vertical else HorizontalExperts)(config)
        self.router = Router(config) if config.is_routing_layer(layer) else None

    def forward(self, x, routing, mask, *attention_inputs):
        """x [B, T, D] here, [T, D] in vLLM; routing: (g1, g2, pairs cache) of the group's
        routing layer, None at a routing layer (the cache, kernels.mix_vd, lets the group's
        layers share the masked path's active pairs); mask: (table [P, W], profile per
        flattened token [B*T]) or None; attention_inputs: what self_attn takes after x."""
        h = x + self.self_attn(self.input_layernorm(x), *attention_inputs)
        y_TD = self.post_attention_layernorm(h).view(-1, h.shape[-1])  # tokens flattened
        if self.router is not None:
            routing = (*self.router(y_TD), {})
        g1, g2, pairs_cache = routing
        return h + self.moe(y_TD, g1, g2, mask, pairs_cache).view(h.shape), routing


def run_decoder_layers(layers, x, *attention_inputs, layer_mask=None, on_routing=None):
    """The layer loop of both models (this one and monet_runtime.vllm_model's).

    layer_mask(l): layer l's (table [P, W], profile per flattened token), or None for no mask;
    on_routing(l, g1, g2): called with each routing layer's g1, g2 [B*T, H, E] (float32)."""
    routing = None
    for layer in layers:
        mask = layer_mask(layer.layer) if layer_mask is not None else None
        x, routing = layer(x, routing, mask, *attention_inputs)
        if on_routing is not None and layer.router is not None:
            on_routing(layer.layer, *routing[:2])
    return x


# ---- the model ---------------------------------------------------------------------------
class MonetModel(nn.Module):
    def __init__(self, config: MonetConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, l) for l in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MonetForCausalLM(nn.Module):
    """The MONET causal LM. Parameter names follow the Hugging Face checkpoints."""

    def __init__(self, config: MonetConfig):
        super().__init__()
        self.config = config
        self.model = MonetModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        self.tokenizer = None  # set by load_model
        self.identity = ""  # set by load_model: which model a mask profile was built for

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        mask=None,
        output_router_probs: bool = False,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
    ) -> MonetOutput:
        """input_ids [B, T]; mask: None, an ExpertMask for every row, a list (one per row, None
        for unmasked) or a prepared MaskBatch; attention_mask [B, S] with 1 for real tokens
        (cached + new; left padding); position_ids [B, T] (default: from attention_mask)."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        S = past + T
        if cache is not None and S > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} positions, needs {S}")
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask must be [{B}, {S}], got {tuple(attention_mask.shape)}")
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
        masks = mask if isinstance(mask, MaskBatch) or mask is None else MaskBatch.build(
            mask, batch=B, config=self.config, device=input_ids.device)

        # Causal mask over real keys; a padding query sees itself so no row is empty (NaN).
        q_pos = torch.arange(past, S, device=input_ids.device)
        k_pos = torch.arange(S, device=input_ids.device)
        causal_TS = k_pos[None, :] <= q_pos[:, None]
        attn_BTS = (causal_TS[None] & attention_mask[:, None, :].bool()) | (
            k_pos[None, None, :] == q_pos[None, :, None])

        x = self.model.embed_tokens(input_ids)
        cos, sin = rotary(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        router_probs = {} if output_router_probs else None

        def keep_routing(layer: int, g1_THE, g2_THE) -> None:
            H, E = self.config.moe_heads, self.config.moe_experts
            router_probs[layer] = (g1_THE.view(B, T, H, E), g2_THE.view(B, T, H, E))

        x = run_decoder_layers(
            self.model.layers, x, cos, sin, attn_BTS, cache,
            layer_mask=(lambda layer: masks.tokens(layer, T)) if masks is not None else None,
            on_routing=keep_routing if output_router_probs else None)
        if cache is not None:
            cache.length = S
        hidden = self.model.norm(x)
        logits = self.lm_head(hidden).float()
        return MonetOutput(logits, router_probs, hidden if output_hidden_states else None)

    def generate(self, input_ids, max_new_tokens: int = 20, mask=None, do_sample: bool = False,
                 **kwargs) -> torch.Tensor:
        """Prompt ids [B, T] followed by up to max_new_tokens generated ids, [B, T + n].

        Rows that stop early are padded with the first eos id (or 0). kwargs: temperature,
        top_p, top_k, seed, stop_token_ids, attention_mask (left padding). See generation.py.
        """
        from monet_runtime.generation import generate_tensor

        return generate_tensor(self, input_ids, max_new_tokens=max_new_tokens, mask=mask,
                               do_sample=do_sample, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def init_weights(self, *, std: float = 0.02, seed: int | None = None) -> MonetForCausalLM:
        """Random initialisation as the release's _init_weights (used for new models)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                with torch.no_grad():
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
        return self
