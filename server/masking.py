"""Mask resolution for a request, failing closed.

`mask_profile` (a name, "name@version", or a list meaning their union) -> profiles from the
replica's ProfileCache (or the store) -> model identity checked -> the union of their masks,
plus the server-wide default profile, which a request cannot opt out of. Unions, and the
MaskSpec key that engines cache by, are keyed by the profiles' content digests, never by
name@version alone (a store that lost its data reuses versions). Unknown profile 404;
built for another model 409; store unreachable and the profile not cached within the staleness
bound 503 with Retry-After. A request that asks for a mask never runs without it.
"""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict
from dataclasses import dataclass

from masks import (
    ChangeEvent,
    MaskError,
    MaskProfile,
    ModelMismatch,
    ProfileCache,
    ProfileCorrupt,
    ProfileNotFound,
    StoreUnavailable,
)

from server.engine import MaskSpec
from server.errors import ApiError
from server.metrics import Metrics
from server.store import track_misses

__all__ = ["AppliedProfile", "MaskResolver", "ProfileRef", "ResolvedMask", "parse_refs"]

RETRY_AFTER = "2"
_REF = re.compile(r"^([a-z0-9][a-z0-9._-]{0,63})(?:@([1-9][0-9]{0,9}))?$")
MAX_PROFILES = 16


@dataclass(frozen=True, slots=True)
class ProfileRef:
    name: str
    version: int | None = None  # None: the latest

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


def parse_refs(value: str | list[str] | None, *, param: str = "mask_profile") -> list[ProfileRef]:
    """ "a", "a@3" or ["a", "b@1"] -> refs (duplicates dropped); 422 naming `param`."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    if len(items) > MAX_PROFILES:
        raise ApiError(422, f"{param}: at most {MAX_PROFILES} profiles", param=param)
    refs: list[ProfileRef] = []
    for n, item in enumerate(items):
        match = _REF.fullmatch(item) if isinstance(item, str) else None
        if match is None:
            where = param if isinstance(value, str) else f"{param}[{n}]"
            raise ApiError(422, f"{where}: {item!r} is not a profile name or name@version "
                                "(lowercase letters, digits, '.', '_', '-')", param=where)
        ref = ProfileRef(match[1], int(match[2]) if match[2] else None)
        if ref not in refs:
            refs.append(ref)
    return refs


@dataclass(frozen=True, slots=True)
class AppliedProfile:
    name: str
    version: int
    default: bool = False  # the server-wide default profile
    digest: str = ""  # MaskProfile.digest: the contents

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True, slots=True)
class ResolvedMask:
    profiles: tuple[AppliedProfile, ...] = ()
    spec: MaskSpec | None = None

    @property
    def header(self) -> str:
        """For X-Monet-Mask-Profiles: "no-python@3,toxic@1"."""
        return ",".join(map(str, self.profiles))

    @property
    def label(self) -> str:
        """For metrics: the profile names, without versions (bounded cardinality)."""
        return "+".join(p.name for p in self.profiles) or "none"


class MaskResolver:
    def __init__(self, cache: ProfileCache, *, model_identity: str, num_layers: int,
                 num_experts: int, default: list[ProfileRef], metrics: Metrics,
                 unions: int = 32):
        self.cache = cache
        self.model_identity = model_identity
        self.num_layers, self.num_experts = num_layers, num_experts
        self.default = default
        self.metrics = metrics
        self._unions: OrderedDict[str, object] = OrderedDict()
        self._unions_size = unions

    async def lookup(self, ref: ProfileRef, *, param: str, default: bool = False) -> MaskProfile:
        what = f"server default mask profile '{ref}'" if default else f"mask profile '{ref}'"
        try:
            with track_misses() as miss:
                profile = await asyncio.to_thread(self.cache.get, ref.name, ref.version)
            (self.metrics.cache_misses if miss[0] else self.metrics.cache_hits).inc()
            profile.mask_for(self.model_identity)
            if (profile.num_layers, profile.num_experts) != (self.num_layers, self.num_experts):
                raise ModelMismatch(profile.name, profile.model_id, self.model_identity)
        except ProfileNotFound:
            if default:
                raise ApiError(503, f"{what} is not in the store; refusing to serve without it",
                               headers={"Retry-After": RETRY_AFTER}) from None
            raise ApiError(404, f"{param}: {what} not found", param=param) from None
        except StoreUnavailable as e:
            raise ApiError(503, f"{what}: mask store unavailable and the profile is not cached "
                                f"within its staleness bound ({e})", param=param,
                           headers={"Retry-After": RETRY_AFTER}) from None
        except ModelMismatch as e:
            if default:
                raise ApiError(503, f"{what}: {e}") from None
            raise ApiError(409, f"{param}: {e}", param=param) from None
        except (MaskError, ProfileCorrupt) as e:
            raise ApiError(503, f"{what} cannot be read: {e}", param=param,
                           headers={"Retry-After": RETRY_AFTER}) from None
        if ref.version is None:
            self.metrics.profile_version.labels(profile.name).set(profile.version)
        return profile

    async def resolve(self, requested: list[ProfileRef], *,
                      param: str = "mask_profile") -> ResolvedMask:
        """The union of the requested profiles and the default; raises ApiError."""
        wanted = [(ref, False) for ref in requested] + [(ref, True) for ref in self.default]
        if not wanted:
            return ResolvedMask()
        results = await asyncio.gather(
            *(self.lookup(ref, param=param, default=d) for ref, d in wanted),
            return_exceptions=True)
        for result in results:  # the first failure in request order, deterministically
            if isinstance(result, BaseException):
                raise result
        profiles: list[MaskProfile] = list(results)  # type: ignore[arg-type]
        applied = tuple(AppliedProfile(p.name, p.version, d, p.digest)
                        for p, (_, d) in zip(profiles, wanted))
        key = "+".join(sorted({f"{a}#{a.digest}" for a in applied}))
        mask = self._unions.get(key)
        if mask is None:
            mask = profiles[0].experts
            for p in profiles[1:]:
                mask = mask | p.experts
            self._unions[key] = mask
            while len(self._unions) > self._unions_size:
                self._unions.popitem(last=False)
        else:
            self._unions.move_to_end(key)
        return ResolvedMask(applied, MaskSpec(key, mask))

    def invalidate(self, name: str, version: int, *, deleted: bool = False) -> None:
        """After a write through this replica: later requests see it at once."""
        self.cache.apply([ChangeEvent(0, name, version, deleted)])
        if not deleted:
            self.metrics.profile_version.labels(name).set(version)
            return
        try:
            self.metrics.profile_version.remove(name)
        except KeyError:
            pass
