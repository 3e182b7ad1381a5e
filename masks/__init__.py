"""Mask profiles: named, versioned sets of composite experts to remove, with their evidence.

    from masks import MaskProfile, open_store, AsyncMaskStore, ProfileNotFound
    store = open_store("redis://localhost:6379/0")     # or a directory: the local store
    profile = store.get("no-python")                    # StoreUnavailable if unreachable
    mask = profile.mask_for(model.identity)             # ModelMismatch if built for another

Builders (masks.builders), evaluation (masks.evaluate), the expert atlas's build
(masks.atlas_build) and the CLI (masks.cli.masks_app) import torch and route text through the
runtime; this package root does not load them. The atlas itself (masks.atlas) is numpy only:

    atlas = Atlas.from_bytes(store.get_artifact(atlas_name(model.identity)).data)
    atlas.expert(layer, i, j)                           # contexts, label means, top tokens
"""

import importlib

# Loaded on first use (PEP 562): `import masks.cli` must not pull torch in through the runtime.
_EXPORTS = {
    "EvaluationReport": "masks.schema",
    "LabelLoss": "masks.schema",
    "MaskError": "masks.schema",
    "MaskProfile": "masks.schema",
    "ModelMismatch": "masks.schema",
    "ProfileKind": "masks.schema",
    "ProfileSummary": "masks.schema",
    "Provenance": "masks.schema",
    "SweepPoint": "masks.schema",
    "check_model": "masks.schema",
    "MUST_NOT_EXIST": "masks.store",
    "RESET": "masks.store",
    "AsyncMaskStore": "masks.store",
    "ChangeEvent": "masks.store",
    "ChangeSet": "masks.store",
    "MaskStore": "masks.store",
    "ProfileCorrupt": "masks.store",
    "ProfileNotFound": "masks.store",
    "StoreError": "masks.store",
    "StoreUnavailable": "masks.store",
    "VersionConflict": "masks.store",
    "Watch": "masks.store",
    "Written": "masks.store",
    "open_store": "masks.store",
    "ProfileCache": "masks.cache",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'masks' has no attribute {name!r}")


__all__ = [
    "MUST_NOT_EXIST",
    "RESET",
    "AsyncMaskStore",
    "ChangeEvent",
    "ChangeSet",
    "EvaluationReport",
    "LabelLoss",
    "MaskError",
    "MaskProfile",
    "MaskStore",
    "ModelMismatch",
    "ProfileCache",
    "ProfileCorrupt",
    "ProfileKind",
    "ProfileNotFound",
    "ProfileSummary",
    "Provenance",
    "StoreError",
    "StoreUnavailable",
    "SweepPoint",
    "VersionConflict",
    "Watch",
    "Written",
    "check_model",
    "open_store",
]
