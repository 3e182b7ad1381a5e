"""/masks: create or replace (If-Match for safe updates), read, list, delete, build, report."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Response
from fastapi.responses import JSONResponse
from masks.schema import NAME_PATTERN

from server.bodies import BodyInThread
from server.deps import AdminKey, GenerateKey, ProfilesDep
from server.errors import ERROR_RESPONSES
from server.profiles import parse_precondition
from server.schemas.masks import BuildRequest, DeleteResult, JobOut, ProfileWrite, WriteResult
from server.routers.jobs import job_out

__all__ = ["router"]

router = APIRouter(prefix="/masks", tags=["masks"], route_class=BodyInThread)

Name = Annotated[str, Path(pattern=NAME_PATTERN, description="Profile name.")]
Version = Annotated[int | None, Query(ge=1, le=2**40, description="A kept version "
                                      "(default: the latest).")]
IfMatch = Annotated[str | None, Header(description="The version the write expects "
                                       "(409 otherwise); '*': any existing version.")]
IfNoneMatch = Annotated[str | None, Header(description="'*': create only, never replace.")]


@router.get("", responses=ERROR_RESPONSES)
async def list_profiles(_: GenerateKey, admin: ProfilesDep) -> list[dict[str, Any]]:
    """Every stored profile, without its experts."""
    return [s.model_dump(mode="json") for s in await admin.list()]


@router.put("/{name}", response_model=WriteResult, responses={**ERROR_RESPONSES, 201: {
    "model": WriteResult, "description": "Created."}})
async def put_profile(name: Name, body: ProfileWrite, who: AdminKey, admin: ProfilesDep,
                      if_match: IfMatch = None, if_none_match: IfNoneMatch = None) -> Response:
    """Create or replace a profile for this server's model. Requests that start after this
    returns use the new version, on every replica sharing the store within a second."""
    expected = parse_precondition(if_match, if_none_match)
    profile = await asyncio.to_thread(admin.profile, name, body, who)
    result = await admin.put(profile, expected=expected, who=who)
    return JSONResponse(result.model_dump(), status_code=201 if result.previous_version == 0
                        else 200, headers={"ETag": f'"{result.version}"'})


@router.get("/{name}", responses=ERROR_RESPONSES)
async def get_profile(name: Name, _: GenerateKey, admin: ProfilesDep, version: Version = None,
                      compact: Annotated[bool | None, Query()] = None) -> Response:
    """The profile with its experts (compact form for large masks unless compact=false)."""
    profile = await admin.get(name, version)
    text = await asyncio.to_thread(profile.to_json, compact=compact)
    return Response(text, media_type="application/json",
                    headers={"ETag": f'"{profile.version}"'})


@router.delete("/{name}", response_model=DeleteResult, responses=ERROR_RESPONSES)
async def delete_profile(name: Name, who: AdminKey, admin: ProfilesDep,
                         if_match: IfMatch = None) -> DeleteResult:
    return await admin.delete(name, expected=parse_precondition(if_match, None), who=who)


@router.post("/{name}/build", status_code=202, response_model=JobOut, responses=ERROR_RESPONSES)
async def build_profile(name: Name, body: BuildRequest, who: AdminKey, admin: ProfilesDep,
                        if_match: IfMatch = None, if_none_match: IfNoneMatch = None) -> Response:
    """Build the profile from a corpus in the background; follow it at GET /jobs/{id}."""
    job = await admin.submit_build(name, body, expected=parse_precondition(if_match, if_none_match),
                                   who=who)
    return JSONResponse(job_out(job).model_dump(mode="json"), status_code=202,
                        headers={"Location": f"/jobs/{job.id}"})


@router.get("/{name}/report", responses=ERROR_RESPONSES)
async def profile_report(name: Name, _: GenerateKey, admin: ProfilesDep,
                         version: Version = None) -> dict[str, Any]:
    """How much the profile removes per layer, how it was built and how it was evaluated."""
    p = await admin.get(name, version)
    share = p.removed_share()
    return {"name": p.name, "version": p.version, "kind": p.kind, "description": p.description,
            "model_id": p.model_id, "num_layers": p.num_layers, "num_experts": p.num_experts,
            "size": p.size, "removed_share": share,
            "removed_share_mean": sum(share) / len(share) if share else 0.0,
            "provenance": p.provenance.model_dump(mode="json"),
            "evaluation": p.evaluation.model_dump(mode="json") if p.evaluation else None}
