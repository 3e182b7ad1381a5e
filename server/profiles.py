"""Mask profile management behind /masks: writes with compare-and-set, the audit trail, and
builds as background jobs. Every write through this replica invalidates its profile cache
before it returns, so a request that starts after the write sees it. A write's status and audit
line come from the write itself (the version it replaced), never from a separate read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

from masks import (
    MaskError,
    MaskProfile,
    ModelMismatch,
    ProfileCorrupt,
    ProfileNotFound,
    ProfileSummary,
    Provenance,
    StoreError,
    StoreUnavailable,
    VersionConflict,
)
from masks.schema import ExpertMask
from pydantic import ValidationError

from server.auth import Principal
from server.engine import Engine
from server.errors import ApiError
from server.jobs import Job, JobManager, ProfileBuilder
from server.logs import audit
from server.masking import RETRY_AFTER, MaskResolver, parse_refs
from server.schemas.masks import (
    BuildRequest,
    DeleteResult,
    LayerExperts,
    ProfileWrite,
    WriteResult,
)
from server.store import InstrumentedStore

__all__ = ["ProfileAdmin", "parse_precondition", "store_errors"]


@contextlib.contextmanager
def store_errors(param: str = "name") -> Iterator[None]:
    """Store failures as HTTP errors: 404, 409 (version conflict), 422, 503."""
    try:
        yield
    except ProfileNotFound as e:
        raise ApiError(404, str(e), param=param) from None
    except VersionConflict as e:
        raise ApiError(409, str(e), param="If-Match", type="version_conflict") from None
    except StoreUnavailable as e:
        raise ApiError(503, f"mask store unavailable: {e}",
                       headers={"Retry-After": RETRY_AFTER}) from None
    except ProfileCorrupt as e:
        raise ApiError(503, str(e), param=param, headers={"Retry-After": RETRY_AFTER}) from None
    except ModelMismatch as e:
        raise ApiError(409, str(e), param="model_id") from None
    except MaskError as e:
        raise ApiError(422, str(e), param=param) from None


def parse_precondition(if_match: str | None, if_none_match: str | None) -> int | str | None:
    """If-Match: 3, "3" or W/"3" -> 3; If-Match: * -> "*" (must exist);
    If-None-Match: * -> 0 (must not exist); neither -> None (unconditional)."""
    if if_none_match is not None:
        if if_none_match.strip() != "*":
            raise ApiError(400, "If-None-Match: only '*' (create, do not replace) is supported",
                           param="If-None-Match")
        return 0
    if if_match is None:
        return None
    value = if_match.strip().removeprefix("W/").strip('"')
    if value == "*":
        return "*"
    if not (value.isascii() and value.isdigit()) or len(value) > 12:  # not '²' or '٣'
        raise ApiError(400, f"If-Match: {if_match!r} is not a profile version", param="If-Match")
    return int(value)




def _mask(layers: list[LayerExperts], num_experts: int, form: str) -> ExpertMask:
    """The mask of validated layers, straight from their pair lists (no copy through dicts:
    a mask of millions of pairs); the lists are then emptied in chunks, here in the worker
    thread, since freeing millions of lists at once would hold the GIL for the event loop."""
    seen = set()
    for n, entry in enumerate(layers):
        if entry.layer in seen:
            raise ApiError(422, f"{form}[{n}]: layer {entry.layer} is listed twice", param=form)
        seen.add(entry.layer)
    try:
        return ExpertMask({l.layer: l.experts for l in layers}, num_experts=num_experts)
    except MaskError as e:
        raise ApiError(422, f"{form}: {e}", param=form) from None
    finally:
        for entry in layers:
            while isinstance(entry.experts, list) and entry.experts:
                del entry.experts[-(1 << 16):]


class ProfileAdmin:
    def __init__(self, store: InstrumentedStore, resolver: MaskResolver, engine: Engine,
                 jobs: JobManager, builder: ProfileBuilder | None, corpus_dir: Path | None):
        self.store, self.resolver, self.engine = store, resolver, engine
        self.jobs, self.builder, self.corpus_dir = jobs, builder, corpus_dir

    # ---- reading ---------------------------------------------------------------------------
    async def list(self) -> list[ProfileSummary]:
        with store_errors():
            return await asyncio.to_thread(self.store.list)

    async def get(self, name: str, version: int | None = None) -> MaskProfile:
        with store_errors():
            return await asyncio.to_thread(self.store.get, name, version)

    # ---- writing ---------------------------------------------------------------------------
    def profile(self, name: str, body: ProfileWrite, who: Principal) -> MaskProfile:
        if body.model_id is not None and body.model_id != self.engine.model_identity:
            raise ApiError(409, f"model_id: the profile was built for model {body.model_id}, "
                                f"this server runs {self.engine.model_identity}", param="model_id")
        form = "layers" if body.layers is not None else "experts"
        source = body.layers if body.layers is not None else getattr(body.experts, "layers", None)
        experts = (_mask(source, self.engine.num_experts, form) if source is not None
                   else body.experts.model_dump())
        try:
            provenance = Provenance.model_validate(
                body.provenance or {"builder": "monet-serve api", "criterion": "manual",
                                    "created_by": who.name})
        except ValidationError as e:
            raise ApiError(422, f"provenance: {e.errors()[0]['msg']}", param="provenance") from None
        try:
            return MaskProfile(
                name=name, description=body.description, kind=body.kind,
                model_id=self.engine.model_identity, num_layers=self.engine.num_layers,
                num_experts=self.engine.num_experts, experts=experts, provenance=provenance,
                evaluation=body.evaluation)
        except ValidationError as e:
            err = e.errors()[0]
            field = str(err["loc"][0]) if err.get("loc") else form
            param = form if field == "experts" else field
            raise ApiError(422, f"{param}: {err['msg']}", param=param) from None

    async def put(self, profile: MaskProfile, *, expected: int | str | None,
                  who: Principal) -> WriteResult:
        return await asyncio.to_thread(self.put_sync, profile, expected=expected, who=who)

    def put_sync(self, profile: MaskProfile, *, expected: int | str | None,
                 who: Principal) -> WriteResult:
        with store_errors():
            if expected == "*":
                try:
                    expected = self.store.get(profile.name).version
                except ProfileNotFound:
                    raise ApiError(409, f"If-Match: mask profile '{profile.name}' does not "
                                        "exist", param="If-Match", type="version_conflict") from None
            written = self.store.write(profile, expected_version=expected)
        stored, previous = written.profile, written.previous_version
        self.resolver.invalidate(stored.name, stored.version)
        audit("put", profile=stored.name, version=stored.version, previous_version=previous,
              who=who.name, kind=stored.kind, size=stored.size, digest=stored.digest,
              **self._experts_changed(previous, stored))
        return WriteResult(name=stored.name, version=stored.version, previous_version=previous,
                           size=stored.size, model_id=stored.model_id, digest=stored.digest)

    def _experts_changed(self, previous: int, new: MaskProfile) -> dict[str, int]:
        """Against the version the write replaced (kept in the store: versions are
        immutable); nothing when it cannot be read any more."""
        if previous == 0:
            return {"added": new.size, "removed": 0}
        try:
            old = self.store.get(new.name, previous)
        except StoreError:
            return {}
        return {"added": len(new.experts - old.experts), "removed": len(old.experts - new.experts)}

    async def delete(self, name: str, *, expected: int | str | None,
                     who: Principal) -> DeleteResult:
        if expected == 0:
            raise ApiError(400, "If-None-Match makes no sense for DELETE", param="If-None-Match")

        def run() -> int:  # If-Match: * is "must exist", which delete checks in its write
            with store_errors():
                return self.store.delete(name, expected_version=None if expected == "*"
                                         else expected)

        version = await asyncio.to_thread(run)
        self.resolver.invalidate(name, version, deleted=True)
        audit("delete", profile=name, version=version, who=who.name)
        return DeleteResult(name=name, deleted_version=version)

    # ---- building --------------------------------------------------------------------------
    def _corpus(self, spec: BuildRequest) -> Path | None:
        return self.corpus_path(spec.corpus)

    def corpus_path(self, corpus: str | None) -> Path | None:
        """A corpus file named relative to MONET_CORPUS_DIR (404 outside it or absent)."""
        if corpus is None:
            return None
        if self.corpus_dir is None:
            raise ApiError(422, "corpus: this server has no MONET_CORPUS_DIR; send 'records'",
                           param="corpus")
        root = self.corpus_dir.resolve()
        path = (root / corpus).resolve()
        if not path.is_relative_to(root) or not path.exists():
            raise ApiError(404, f"corpus: no corpus {corpus!r} under the corpus directory",
                           param="corpus")
        return path

    async def submit_build(self, name: str, spec: BuildRequest, *, expected: int | str | None,
                           who: Principal) -> Job:
        if self.builder is None:
            raise ApiError(503, "this server cannot build profiles (no builder configured)")
        parts = []
        for ref in parse_refs(spec.parts or [], param="parts"):
            parts.append(await self.resolver.lookup(ref, param="parts"))
        corpus = self._corpus(spec)
        builder = self.builder

        def run(job: Job) -> WriteResult:
            job.update(0.0, "routing the corpus" if spec.kind != "composite" else "combining")
            profile = builder.build(spec, name=name, created_by=who.name, parts=parts,
                                    corpus=corpus, progress=job.update)
            job.update(0.99, "storing")
            return self.put_sync(profile, expected=expected, who=who)

        return self.jobs.submit(kind=spec.kind, profile=name, created_by=who.name, run=run)
