"""Background jobs (mask profile builds) with progress, one at a time in a worker thread.

The worker thread runs at a lower CPU priority (nice +BUILD_NICENESS, Linux: per thread), and
so do the OpenMP threads it starts: a build takes the cores the engine leaves idle and gives
them back at once, rather than sharing them equally with decode steps.

Jobs live in this replica's memory (the most recent `keep`): GET /jobs/{id} must reach the
replica that accepted the build. The model work is behind the ProfileBuilder protocol, which
the composition root (monet_cli) implements with the runtime and masks.builders.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from masks import MaskProfile

from server.logs import log_event

__all__ = ["AtlasBuilder", "Job", "JobManager", "ProfileBuilder", "Progress"]

Progress = Callable[[float, str], None]  # (share done in [0, 1], message)
BUILD_NICENESS = 10  # CFS weight 110 against the engine's 1024: about 10% of a shared core


def _lower_priority() -> None:
    """The calling thread's niceness +BUILD_NICENESS (threads it starts inherit it)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid)
                       + BUILD_NICENESS)
    except (AttributeError, OSError) as e:  # not Linux, or not permitted: run as is
        log_event("monet.server", "build jobs run at normal priority", level=logging.WARNING,
                  error=repr(e))


class ProfileBuilder(Protocol):
    def build(self, spec: Any, *, name: str, created_by: str, parts: list[MaskProfile],
              corpus: Path | None, progress: Progress) -> MaskProfile:
        """A profile (not yet stored) from a server.schemas.masks.BuildRequest; ValueError
        for a corpus or a selection that cannot make one."""
        ...


@runtime_checkable
class AtlasBuilder(Protocol):
    def build_atlas(self, spec: Any, *, corpus: Path | None, progress: Progress) -> Any:
        """The model's masks.atlas.Atlas (not yet stored) from a
        server.schemas.atlas.AtlasBuildRequest; ValueError for a corpus it cannot read."""
        ...


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class Job:
    id: str
    kind: str
    profile: str
    created_by: str
    status: str = "queued"
    progress: float = 0.0
    message: str = ""
    created_at: datetime = field(default_factory=_now)
    finished_at: datetime | None = None
    result: Any = None
    error: str | None = None

    def update(self, progress: float, message: str = "") -> None:
        self.progress = min(1.0, max(self.progress, float(progress)))
        self.message = message or self.message


class JobManager:
    def __init__(self, *, keep: int = 100):
        self.keep = keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="monet-build",
                                        initializer=_lower_priority)
        self._ids = itertools.count(1)

    def submit(self, *, kind: str, profile: str, created_by: str,
               run: Callable[[Job], Any]) -> Job:
        job = Job(f"job-{next(self._ids)}-{uuid.uuid4().hex[:8]}", kind, profile, created_by)
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > self.keep:
                self._jobs.popitem(last=False)
        self._pool.submit(self._run, job, run)
        return job

    def _run(self, job: Job, run: Callable[[Job], Any]) -> None:
        job.status = "running"
        try:
            job.result = run(job)
            job.status, job.progress = "succeeded", 1.0
        except Exception as e:  # noqa: BLE001 - reported through GET /jobs/{id}
            job.status, job.error = "failed", f"{type(e).__name__}: {e}"
            log_event("monet.server", "build failed", level=logging.WARNING, job=job.id,
                      profile=job.profile, error=job.error)
        finally:
            job.finished_at = _now()

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
