"""Per-request mask profiles inside a vLLM worker: LRU device slots and the rows that use them.

A request names its profile in `SamplingParams.extra_args["monet_mask"]` as a key
"name@version". The engine installs the profile's contents in every worker first (collective
RPC `monet_install_profile`, through `MonetWorkerExtension`); the worker keeps them on the host.
When the request's row joins the persistent batch, `MaskProfileRows` (a V1 logits processor,
the hook that sees every row's SamplingParams, called before each forward) pins the profile to
one of P preallocated device slots, copying its table in if it is not there (LRU eviction of
unpinned slots). The model then maps each flattened token to its row through the attention
metadata's query_start_loc and to the row's slot: profile_T [T], -1 for unmasked rows.

The model owns its MaskSlots (MonetForCausalLM.mask_slots); no module-level state. The worker
extension reaches them through the model runner (Worker.get_model()). The logits processor is
built before the model and given only the VllmConfig, so the slots also register in vLLM's
static forward context under their module path, as vLLM's attention layers register there for
their KV caches, and the logits processor looks them up in it (`find_mask_slots`).

Shapes: L layers, P slots, W = ceil(E*E/32) bitset words, R batch rows, T tokens.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any

import torch
from vllm.config import VllmConfig, get_layers_from_vllm_config
from vllm.v1.sample.logits_processor import LogitsProcessor, MoveDirectionality

from kernels import bitset_words
from monet_runtime.expert_mask import ExpertMask
from monet_runtime.vllm_keys import CAPTURE_KEY, MASK_KEY

__all__ = ["MaskSlots", "MaskProfileRows", "MonetWorkerExtension", "find_mask_slots"]


class MaskSlots:
    """Mask tables of P profiles on the device, [L, P, W] int32, and the slot of each batch row.

    The buffers never change shape or address: profiles are copied into slots in place, so a
    captured CUDA graph or a compiled forward keeps working as profiles come and go.
    """

    def __init__(self, vllm_config: VllmConfig, *, num_layers: int, num_experts: int,
                 num_slots: int, device: torch.device, prefix: str):
        L, W = num_layers, bitset_words(num_experts)
        max_rows = vllm_config.scheduler_config.max_num_seqs
        self.num_layers, self.num_experts, self.num_slots = L, num_experts, num_slots
        self.tables_LPW = torch.zeros(L, num_slots, W, dtype=torch.int32, device=device)
        pin = device.type == "cuda"
        self.row_slot_cpu = torch.full((max_rows,), -1, dtype=torch.int32, pin_memory=pin)
        self.row_slot = self.row_slot_cpu if device.type == "cpu" else (
            self.row_slot_cpu.to(device))
        self.profiles: dict[str, torch.Tensor] = {}  # key -> [L, W] int32 on the host
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # resident keys, LRU first
        self.pins = [0] * num_slots
        self.row_key: dict[int, str] = {}
        self.row_capture: dict[int, str] = {}
        self.captures: dict[str, dict[int, list]] = {}
        self.loads = 0  # slot fills, for tests and metrics
        forward_context = vllm_config.compilation_config.static_forward_context
        if prefix in forward_context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        forward_context[prefix] = self

    # ---- profile contents (host) -----------------------------------------------------------
    def install(self, key: str, data: bytes) -> None:
        mask = ExpertMask.from_bytes(data, num_layers=self.num_layers,
                                     num_experts=self.num_experts)
        table_LW = mask.to_table(num_layers=self.num_layers, num_experts=self.num_experts)
        self.profiles[key] = table_LW.to(torch.int32).contiguous()
        slot = self.slot_of.get(key)
        if slot is not None and self.pins[slot] == 0:  # stale copy: reload on next use
            del self.slot_of[key]

    def drop(self, key: str) -> None:
        self.profiles.pop(key, None)
        slot = self.slot_of.get(key)
        if slot is not None and self.pins[slot] == 0:
            del self.slot_of[key]

    # ---- slots (device) --------------------------------------------------------------------
    def _pin(self, key: str) -> int:
        if key not in self.profiles:
            raise KeyError(f"mask profile {key!r} is not installed in this worker")
        slot = self.slot_of.get(key)
        if slot is None:
            used = set(self.slot_of.values())
            free = [s for s in range(self.num_slots) if s not in used]
            if not free:  # evict the least recently used unpinned profile
                victim = next((k for k, s in self.slot_of.items() if self.pins[s] == 0), None)
                if victim is None:
                    raise RuntimeError(f"all {self.num_slots} mask slots are pinned by running "
                                       "requests")
                free = [self.slot_of.pop(victim)]
            slot = free[0]
            self.tables_LPW[:, slot].copy_(self.profiles[key], non_blocking=True)
            self.slot_of[key] = slot
            self.loads += 1
        self.slot_of.move_to_end(key)
        self.pins[slot] += 1
        return slot

    def _unpin_row(self, row: int) -> None:
        key = self.row_key.pop(row, None)
        self.row_capture.pop(row, None)
        if key is not None:
            self.pins[self.slot_of[key]] -= 1
        self.row_slot_cpu[row] = -1

    def update(self, batch_update) -> None:
        """Apply a V1 BatchUpdate: removed, then added (which may replace a row), then moved."""
        if batch_update is None:
            return
        for row in batch_update.removed:
            self._unpin_row(row)
        for row, params, _prompt, _output in batch_update.added:
            self._unpin_row(row)
            extra = (params.extra_args or {}) if params is not None else {}
            if extra.get(MASK_KEY):
                self.row_key[row] = extra[MASK_KEY]
                self.row_slot_cpu[row] = self._pin(extra[MASK_KEY])
            if extra.get(CAPTURE_KEY):
                self.row_capture[row] = str(extra[CAPTURE_KEY])
                self.captures.setdefault(self.row_capture[row], {})
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                self._swap_rows(a, b)
            else:  # a -> b, replacing whatever b held
                self._unpin_row(b)
                self._swap_rows(a, b)
        if self.row_slot is not self.row_slot_cpu:
            self.row_slot.copy_(self.row_slot_cpu, non_blocking=True)

    def _swap_rows(self, a: int, b: int) -> None:
        for table in (self.row_key, self.row_capture):
            ea, eb = table.pop(a, None), table.pop(b, None)
            if ea is not None:
                table[b] = ea
            if eb is not None:
                table[a] = eb
        sa, sb = int(self.row_slot_cpu[a]), int(self.row_slot_cpu[b])
        self.row_slot_cpu[a], self.row_slot_cpu[b] = sb, sa

    @property
    def any_masked(self) -> bool:
        return bool(self.row_key)

    def token_profiles(self, query_start_loc: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """profile_T [T] int32: the slot of each flattened token's row, -1 unmasked or padding.

        query_start_loc [R+1] is the attention metadata's (device); all on the device, no sync.
        """
        R = query_start_loc.numel() - 1
        tokens = torch.arange(num_tokens, device=query_start_loc.device)
        row_T = torch.searchsorted(query_start_loc[1:], tokens, right=True)  # R for padding
        slot_R1 = torch.cat((self.row_slot[:R], self.row_slot.new_full((1,), -1)))
        return slot_R1[row_T.clamp_max(R)]

    # ---- routing capture -------------------------------------------------------------------
    def record_routing(self, layer: int, g1_THE, g2_THE, query_start_loc) -> None:
        """Keep g1, g2 of the capture rows' tokens (host copies: capture is for inspection)."""
        qsl = query_start_loc.tolist()
        for row, key in self.row_capture.items():
            if row + 1 >= len(qsl):
                continue
            s, e = qsl[row], qsl[row + 1]
            self.captures[key].setdefault(layer, []).append(
                (g1_THE[s:e].float().cpu(), g2_THE[s:e].float().cpu()))

    def take_routing(self, key: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        parts = self.captures.pop(key, {})
        return {layer: (torch.cat([p[0] for p in chunks]), torch.cat([p[1] for p in chunks]))
                for layer, chunks in parts.items()}


def find_mask_slots(vllm_config: VllmConfig) -> MaskSlots | None:
    """The MaskSlots of the MONET model this worker loaded with vllm_config, if it has one."""
    found = get_layers_from_vllm_config(vllm_config, MaskSlots)
    if len(found) > 1:
        raise RuntimeError(f"more than one MONET model in this worker: {sorted(found)}")
    return next(iter(found.values()), None)


class MaskProfileRows(LogitsProcessor):
    """A V1 logits processor that changes no logits: it tells MaskSlots which row is which.

    vLLM calls update_state with the rows added, removed and moved in the persistent batch
    (with each request's SamplingParams) before every forward pass, in the row order that
    query_start_loc uses.
    """

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        self.vllm_config = vllm_config  # the model's too: its MaskSlots register in it

    @classmethod
    def validate_params(cls, params) -> None:
        extra = params.extra_args or {}
        key = extra.get(MASK_KEY)
        if key is not None and not (isinstance(key, str) and key):
            raise ValueError(f"extra_args[{MASK_KEY!r}] must be a non-empty string")

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return
        slots = find_mask_slots(self.vllm_config)  # looked up again: a reload replaces them
        if slots is not None:
            slots.update(batch_update)
        elif any((params.extra_args or {}).get(MASK_KEY)
                 for _, params, _, _ in batch_update.added if params is not None):
            raise RuntimeError("a request asks for a MONET mask profile, but this worker's "
                               "model has no mask slots (not MonetForCausalLM)")


class MonetWorkerExtension:
    """Methods added to vLLM's Worker (parallel_config.worker_extension_cls), for collective_rpc."""

    def _monet_mask_slots(self) -> MaskSlots:
        slots = getattr(self.get_model(), "mask_slots", None)
        if not isinstance(slots, MaskSlots):
            raise RuntimeError("this worker holds no MONET model")
        return slots

    def monet_install_profile(self, key: str, data: bytes) -> None:
        self._monet_mask_slots().install(key, data)

    def monet_drop_profile(self, key: str) -> None:
        self._monet_mask_slots().drop(key)

    def monet_take_routing(self, key: str) -> dict[int, list]:
        """{routing layer: [shape [T, H, E], g1 bytes, g2 bytes]} (float32; plain msgpack)."""
        out = self._monet_mask_slots().take_routing(key)
        return {layer: [list(g1.shape), g1.numpy().tobytes(), g2.numpy().tobytes()]
                for layer, (g1, g2) in out.items()}

    def monet_slot_state(self) -> dict[str, Any]:
        slots = self._monet_mask_slots()
        return {"resident": list(slots.slot_of), "pins": list(slots.pins),
                "installed": sorted(slots.profiles), "loads": slots.loads}

    def monet_module_types(self) -> dict[str, int]:
        """{class name: count} over the loaded model's modules: which implementations run."""
        return dict(Counter(type(m).__name__ for m in self.get_model().modules()))

    def monet_layer_names(self) -> dict[str, Any]:
        """The names vLLM knows the loaded model's layers by: {"prefixes": {module path: its
        prefix (linear layers, embeddings) or layer_name (attention)}, "forward_context": the
        static forward context's keys}. Quantization configs pick layers by these prefixes."""
        prefixes = {}
        for path, module in self.get_model().named_modules():
            name = getattr(module, "prefix", getattr(module, "layer_name", None))
            if isinstance(name, str):
                prefixes[path] = name
        return {"prefixes": prefixes,
                "forward_context": sorted(self.vllm_config.compilation_config
                                          .static_forward_context)}

