"""GET /jobs/{id}: progress of a background build."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from server.deps import GenerateKey, JobsDep
from server.errors import ERROR_RESPONSES, ApiError
from server.jobs import Job
from server.schemas.masks import JobOut

__all__ = ["job_out", "router"]

router = APIRouter(prefix="/jobs", tags=["masks"])


def job_out(job: Job) -> JobOut:
    return JobOut(id=job.id, kind=job.kind, profile=job.profile, status=job.status,
                  progress=job.progress, message=job.message, created_at=job.created_at,
                  finished_at=job.finished_at, created_by=job.created_by, result=job.result,
                  error=job.error)


@router.get("/{job_id}", response_model=JobOut, responses=ERROR_RESPONSES)
async def get_job(job_id: Annotated[str, Path(max_length=64)], _: GenerateKey,
                  jobs: JobsDep) -> JobOut:
    job = jobs.get(job_id)
    if job is None:
        raise ApiError(404, f"job_id: no job {job_id!r} on this replica", param="job_id")
    return job_out(job)
