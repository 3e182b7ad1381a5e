"""Expert masks: sets of composite experts (layer, i, j) removed from a MONET model.

A removed (i, j) gets routing weight g_ij = 0 for every head, nothing renormalised. Each layer's
set is kept as a sorted array of keys i << 32 | j, so union and intersection are array merges
and a 24-layer mask with millions of experts stays small. Forms:
  JSON    {"layers": [{"layer": l, "experts": [[i, j], ...]}, ...]}
  binary  MONETMSK, then per layer a zlib-compressed E x E bitset (needs E)
  table   int32 [L, ceil(E*E/32)] bitsets, the form the mixing kernels consume
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch only for the kernel form: the server reads masks without it
    import torch

__all__ = ["MAX_EXPERTS", "ExpertMask", "MaskError"]

_MAGIC = b"MONETMSK"
_VERSION = 1
_HEADER = struct.Struct("<8sHII")  # magic, version, num_experts, number of layers
_LAYER = struct.Struct("<II")  # layer, compressed byte count


MAX_EXPERTS = 4096  # E bound of the binary form when the model's E is not given (2 MiB/layer)


class MaskError(ValueError):
    """A mask that is malformed or does not fit the model."""


def _inflate(payload: bytes, expected: int, layer: int) -> bytes:
    """zlib-decompress one layer's bitset, which must be exactly `expected` bytes; stops
    after expected + 1 bytes whatever the payload claims."""
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(payload, expected + 1)
    except zlib.error as e:
        raise MaskError(f"binary mask layer {layer} is corrupt: {e}") from None
    if len(raw) > expected or inflater.unconsumed_tail:
        raise MaskError(f"binary mask layer {layer}: bitset larger than the {expected} bytes "
                        "of an E x E layer")
    if len(raw) < expected or not inflater.eof or inflater.unused_data:
        raise MaskError(f"binary mask layer {layer}: bitset of {len(raw)} bytes is not the "
                        f"{expected} bytes of an E x E layer (truncated or trailing data)")
    return raw


def _as_pairs(experts: Any, chunk: int = 1 << 16) -> np.ndarray:
    """int64 [N, 2] from an array or a list of pairs; a long list converts in chunks, so that
    other threads get the GIL in between (one np.asarray of millions of lists holds it for
    seconds)."""
    if not isinstance(experts, list) or len(experts) <= chunk:
        return np.asarray(experts, dtype=np.int64)
    parts = [np.asarray(experts[n : n + chunk], dtype=np.int64).reshape(-1, 2)
             for n in range(0, len(experts), chunk)]
    return np.concatenate(parts)


def _keys(pairs: np.ndarray) -> np.ndarray:
    return np.unique((pairs[:, 0].astype(np.int64) << 32) | pairs[:, 1].astype(np.int64))


class ExpertMask:
    """An immutable set of composite experts (layer, i, j) to remove."""

    __slots__ = ("_layers", "num_experts", "_table_cache")

    def __init__(
        self,
        layers: Mapping[int, Any] | None = None,
        *,
        num_experts: int | None = None,
    ):
        """layers: {layer: [[i, j], ...] or an int array [N, 2]}. num_experts (E) when known."""
        self._layers: dict[int, np.ndarray] = {}
        self.num_experts = num_experts
        self._table_cache: dict[tuple, torch.Tensor] = {}  # to_table's, by (L, E)
        for layer, experts in (layers or {}).items():
            if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0:
                raise MaskError(f"layer must be a non-negative integer, got {layer!r}")
            pairs = _as_pairs(experts)
            if pairs.size == 0:
                continue
            if pairs.ndim != 2 or pairs.shape[1] != 2:
                raise MaskError(f"layer {layer}: experts must be a list of [i, j] pairs")
            if (pairs < 0).any() or (pairs >= 2**31).any():
                raise MaskError(f"layer {layer}: expert indices must be in [0, 2^31)")
            if num_experts is not None and (pairs >= num_experts).any():
                bad = pairs[(pairs >= num_experts).any(axis=1)][0].tolist()
                raise MaskError(f"layer {layer}: expert {bad} out of range for E={num_experts}")
            keys = _keys(pairs)
            if int(layer) in self._layers:
                keys = np.union1d(self._layers[int(layer)], keys)
            self._layers[int(layer)] = keys

    @classmethod
    def _from_keys(cls, layers: dict[int, np.ndarray], num_experts: int | None) -> ExpertMask:
        mask = cls(num_experts=num_experts)
        mask._layers = {l: k for l, k in sorted(layers.items()) if k.size}
        return mask

    # ---- set algebra -------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        """Layers with at least one removed expert, ascending."""
        return sorted(self._layers)

    def experts(self, layer: int) -> np.ndarray:
        """Removed experts of one layer as an int64 array [N, 2] of (i, j), sorted."""
        keys = self._layers.get(layer, np.empty(0, dtype=np.int64))
        return np.stack([keys >> 32, keys & 0xFFFFFFFF], axis=1)

    def __len__(self) -> int:
        return sum(k.size for k in self._layers.values())

    size = property(__len__, doc="Number of removed composite experts over all layers.")

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        for layer in self.layers:
            for i, j in self.experts(layer).tolist():
                yield layer, i, j

    def __contains__(self, item: object) -> bool:
        layer, i, j = item  # type: ignore[misc]
        keys = self._layers.get(layer)
        if keys is None:
            return False
        key = (int(i) << 32) | int(j)
        pos = np.searchsorted(keys, key)
        return bool(pos < keys.size and keys[pos] == key)

    def _combine(self, other: ExpertMask, op) -> ExpertMask:
        if not isinstance(other, ExpertMask):
            return NotImplemented
        if None not in (self.num_experts, other.num_experts) and (
            self.num_experts != other.num_experts
        ):
            raise MaskError(f"masks for E={self.num_experts} and E={other.num_experts} differ")
        num_experts = self.num_experts if self.num_experts is not None else other.num_experts
        empty = np.empty(0, dtype=np.int64)
        layers = {
            l: op(self._layers.get(l, empty), other._layers.get(l, empty))
            for l in set(self._layers) | set(other._layers)
        }
        return ExpertMask._from_keys(layers, num_experts)

    def __or__(self, other: ExpertMask) -> ExpertMask:
        return self._combine(other, np.union1d)

    def __and__(self, other: ExpertMask) -> ExpertMask:
        return self._combine(other, lambda a, b: np.intersect1d(a, b, assume_unique=True))

    def __sub__(self, other: ExpertMask) -> ExpertMask:
        return self._combine(other, lambda a, b: np.setdiff1d(a, b, assume_unique=True))

    union = __or__
    intersection = __and__
    difference = __sub__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExpertMask):
            return NotImplemented
        return self._layers.keys() == other._layers.keys() and all(
            np.array_equal(k, other._layers[l]) for l, k in self._layers.items()
        )

    def __hash__(self) -> int:
        return hash(tuple((l, k.tobytes()) for l, k in sorted(self._layers.items())))

    def __bool__(self) -> bool:
        return bool(self._layers)

    def __repr__(self) -> str:
        per_layer = ", ".join(f"{l}: {k.size}" for l, k in sorted(self._layers.items()))
        return f"ExpertMask({len(self)} experts; {{{per_layer}}})"

    # ---- validation --------------------------------------------------------------------
    def validate(self, *, num_layers: int, num_experts: int) -> ExpertMask:
        """Check the mask against a model's shape; returns it with num_experts set."""
        if self.num_experts is not None and self.num_experts != num_experts:
            raise MaskError(f"mask is for E={self.num_experts}, model has E={num_experts}")
        for layer, keys in self._layers.items():
            if layer >= num_layers:
                raise MaskError(f"mask names layer {layer}, model has {num_layers} layers")
            top = max(int((keys >> 32).max()), int((keys & 0xFFFFFFFF).max()))
            if top >= num_experts:
                raise MaskError(
                    f"layer {layer}: expert index {top} out of range for E={num_experts}"
                )
        if self.num_experts == num_experts:
            return self
        return ExpertMask._from_keys(dict(self._layers), num_experts)

    # ---- JSON form ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [
                {"layer": l, "experts": self.experts(l).tolist()} for l in self.layers
            ]
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict())
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, num_experts: int | None = None) -> ExpertMask:
        if not isinstance(data, Mapping) or not isinstance(data.get("layers"), list):
            raise MaskError('mask JSON must be {"layers": [{"layer": l, "experts": [[i, j]]}]}')
        layers: dict[int, Any] = {}
        for n, entry in enumerate(data["layers"]):
            if not isinstance(entry, Mapping) or "layer" not in entry or "experts" not in entry:
                raise MaskError(f"layers[{n}] must have 'layer' and 'experts'")
            layer = entry["layer"]
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise MaskError(f"layers[{n}].layer must be an integer, got {layer!r}")
            experts = entry["experts"]
            if not isinstance(experts, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(
                    isinstance(v, int) and not isinstance(v, bool) for v in p
                ) for p in experts
            ):
                raise MaskError(f"layers[{n}].experts must be a list of [i, j] integer pairs")
            if layer in layers:
                raise MaskError(f"layers[{n}]: layer {layer} is listed twice")
            layers[layer] = np.asarray(experts, dtype=np.int64).reshape(-1, 2)
        try:
            return cls(layers, num_experts=num_experts)
        except MaskError as e:
            raise MaskError(f"{e}") from None

    @classmethod
    def from_json(
        cls, source: str | Path | Mapping[str, Any], *, num_experts: int | None = None
    ) -> ExpertMask:
        """From a dict, a JSON string or a path to a JSON file."""
        if isinstance(source, Mapping):
            return cls.from_dict(source, num_experts=num_experts)
        text = str(source)
        if not text.lstrip().startswith("{"):
            text = Path(source).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MaskError(f"mask is not valid JSON: {e}") from None
        return cls.from_dict(data, num_experts=num_experts)

    # ---- compact binary form -----------------------------------------------------------
    def to_bytes(self, num_experts: int | None = None) -> bytes:
        """Compact form: per layer a zlib-compressed E x E bitset. Needs E."""
        E = num_experts or self.num_experts
        if E is None:
            raise MaskError("the binary form needs num_experts (E)")
        out = [_HEADER.pack(_MAGIC, _VERSION, E, len(self._layers))]
        for layer in self.layers:
            bits = np.zeros(E * E, dtype=bool)
            pairs = self.experts(layer)
            if pairs.max() >= E:
                raise MaskError(f"layer {layer}: expert index out of range for E={E}")
            bits[pairs[:, 0] * E + pairs[:, 1]] = True
            payload = zlib.compress(np.packbits(bits, bitorder="little").tobytes(), 1)
            out.append(_LAYER.pack(layer, len(payload)))
            out.append(payload)
        return b"".join(out)

    @classmethod
    def from_bytes(cls, data: bytes, *, num_layers: int | None = None,
                   num_experts: int | None = None) -> ExpertMask:
        """Read the compact form, never inflating more than the model's shape allows: each
        layer's bitset must be exactly ceil(E*E/8) bytes (E: `num_experts`, else the header's,
        at most MAX_EXPERTS), each layer below `num_layers` and listed once. A zlib bomb stops
        at the first byte past its bitset."""
        if len(data) < _HEADER.size:
            raise MaskError("binary mask is truncated")
        magic, version, E, count = _HEADER.unpack_from(data, 0)
        if magic != _MAGIC or version != _VERSION:
            raise MaskError("not a MONET binary mask (bad magic or version)")
        if num_experts is not None and E != num_experts:
            raise MaskError(f"binary mask is for E={E}, model has E={num_experts}")
        if not 0 < E <= MAX_EXPERTS:
            raise MaskError(f"binary mask: E={E} is outside [1, {MAX_EXPERTS}]")
        if num_layers is not None and count > num_layers:
            raise MaskError(f"binary mask has {count} layers, model has {num_layers}")
        offset, layers = _HEADER.size, {}
        for _ in range(count):
            if offset + _LAYER.size > len(data):
                raise MaskError("binary mask is truncated")
            layer, size = _LAYER.unpack_from(data, offset)
            offset += _LAYER.size
            if layer in layers:
                raise MaskError(f"binary mask lists layer {layer} twice")
            if num_layers is not None and layer >= num_layers:
                raise MaskError(f"binary mask names layer {layer}, model has {num_layers} layers")
            raw = _inflate(data[offset : offset + size], (E * E + 7) // 8, layer)
            offset += size
            bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
            n = np.flatnonzero(bits[: E * E]).astype(np.int64)
            layers[layer] = ((n // E) << 32) | (n % E)
        if offset != len(data):
            raise MaskError("binary mask has trailing bytes")
        return cls._from_keys(layers, E)

    # ---- kernel form -------------------------------------------------------------------
    def to_table(self, *, num_layers: int, num_experts: int) -> torch.Tensor:
        """Bitsets int32 [num_layers, ceil(E*E/32)]: bit n % 32 of word n // 32, n = i*E + j.

        Cached: masks are immutable.
        """
        import torch

        key = (num_layers, num_experts)
        table = self._table_cache.get(key)
        if table is None:
            self.validate(num_layers=num_layers, num_experts=num_experts)
            E = num_experts
            words = (E * E + 31) // 32
            bits = np.zeros((num_layers, words * 32), dtype=bool)
            for layer in self.layers:
                pairs = self.experts(layer)
                bits[layer, pairs[:, 0] * E + pairs[:, 1]] = True
            packed = np.packbits(bits, axis=1, bitorder="little")  # [L, 4 * words] uint8
            table = torch.from_numpy(packed.view("<i4").copy())
            self._table_cache[key] = table
        return table
