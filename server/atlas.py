"""The expert atlas as the server reads it: loaded from the mask store once per stored version.

Every request asks the store for the atlas's digest (one small round trip, like the profiles'
head check), so a rebuilt atlas is served from the next request on every replica; the atlas
itself is read and parsed only when the digest changed. Fails closed: no atlas for this model
is 404, the store away 503, a damaged atlas 503 naming it. numpy only (masks.atlas).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import numpy as np
from masks.atlas import Atlas, AtlasCorrupt, atlas_name
from masks.store import ArtifactCorrupt, ArtifactNotFound, StoreUnavailable

from server.engine import RoutedExpert
from server.errors import ApiError
from server.masking import RETRY_AFTER
from server.store import InstrumentedStore

__all__ = ["AtlasReader", "atlas_errors", "text_weights"]


@contextlib.contextmanager
def atlas_errors(name: str) -> Iterator[None]:
    try:
        yield
    except ArtifactNotFound:
        raise ApiError(404, f"no expert atlas is built for this model ({name}): run `monet "
                       "atlas build CORPUS` or POST /experts/build") from None
    except StoreUnavailable as e:
        raise ApiError(503, f"mask store unavailable: {e}",
                       headers={"Retry-After": RETRY_AFTER}) from None
    except (ArtifactCorrupt, AtlasCorrupt) as e:
        raise ApiError(503, f"expert atlas {name} is damaged in the store: {e}",
                       headers={"Retry-After": RETRY_AFTER}) from None


class AtlasReader:
    def __init__(self, store: InstrumentedStore, model_identity: str):
        self.store, self.model_identity = store, model_identity
        self.name = atlas_name(model_identity)
        self._loaded: tuple[str, Atlas] | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> Atlas:
        with atlas_errors(self.name):
            digest = await asyncio.to_thread(self.store.artifact_digest, self.name)
            loaded = self._loaded
            if loaded is not None and loaded[0] == digest:
                return loaded[1]
            async with self._lock:  # one load at a time; the others then find it loaded
                loaded = self._loaded
                if loaded is None or loaded[0] != digest:
                    artifact = await asyncio.to_thread(self.store.get_artifact, self.name)
                    atlas = await asyncio.to_thread(Atlas.from_bytes, artifact.data)
                    if atlas.model_id != self.model_identity:
                        raise AtlasCorrupt(f"it was built for {atlas.model_id}")
                    self._loaded = loaded = (artifact.digest, atlas)
                return loaded[1]

    def forget(self) -> None:
        """Drop the loaded copy (after this replica stored a new one)."""
        self._loaded = None


def text_weights(atlas: Atlas, routing: list[list[RoutedExpert]]) -> np.ndarray:
    """A text's mean weight per composite expert, float64 [R, X], from the engine's per-token
    top experts (every expert with weight when top_k reaches the H * k^2 nonzero ones)."""
    rows = {layer: r for r, layer in enumerate(atlas.routing_layers)}
    out = np.zeros((len(atlas.routing_layers), atlas.num_experts ** 2))
    E = atlas.num_experts
    for experts in routing:
        for e in experts:
            if e.layer in rows:
                out[rows[e.layer], e.i * E + e.j] += e.weight
    return out / max(len(routing), 1)
