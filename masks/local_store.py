"""Embedded mask store: a directory that several processes may share.

Layout under `root`:
  seq                        store-wide change sequence (text)
  heads/<name>.json          {"version", "seq", "deleted", "summary"}: the profile's state
  blobs/<name>/<version>     MaskProfile.to_bytes of each kept version
Writers take an exclusive flock on `root/.lock`, check the head (compare-and-set), then write
the blob, the head and then the sequence, each by atomic rename; readers take no lock. Watches poll
the sequence file.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from masks.schema import MaskError, MaskProfile, ProfileSummary, valid_name
from masks.store import (
    ChangeEvent,
    ChangeSet,
    PollingWatch,
    ProfileNotFound,
    StoreUnavailable,
    VersionConflict,
)

__all__ = ["LocalMaskStore"]


class LocalMaskStore:
    """MaskStore on a local directory (the default when no Redis URL is configured)."""

    def __init__(
        self,
        root: str | Path,
        *,
        keep_versions: int = 16,
        fsync: bool = True,
        poll_interval: float = 0.2,
    ):
        if keep_versions < 1:
            raise ValueError("keep_versions must be at least 1")
        self.root = Path(root).expanduser()
        self.keep_versions = keep_versions
        self.fsync = fsync
        self.poll_interval = poll_interval
        try:
            (self.root / "heads").mkdir(parents=True, exist_ok=True)
            (self.root / "blobs").mkdir(exist_ok=True)
        except OSError as e:
            raise StoreUnavailable(f"mask store directory {self.root}: {e}") from e

    def __repr__(self) -> str:
        return f"LocalMaskStore({str(self.root)!r})"

    # ---- files ---------------------------------------------------------------------------
    @contextmanager
    def _io(self, what: str) -> Iterator[None]:
        try:
            yield
        except (ProfileNotFound, VersionConflict, MaskError):
            raise
        except OSError as e:
            raise StoreUnavailable(f"mask store {self.root}: {what}: {e}") from e

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _write(self, path: Path, data: bytes) -> None:
        """Atomic replace: a temporary file in the same directory, then rename."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _head_path(self, name: str) -> Path:
        if not valid_name(name):
            raise ProfileNotFound(name)
        return self.root / "heads" / f"{name}.json"

    def _blob_path(self, name: str, version: int) -> Path:
        return self.root / "blobs" / name / f"{version:010d}"

    def _head(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._head_path(name).read_bytes())
        except FileNotFoundError:
            return None

    def _seq(self) -> int:
        try:
            return int((self.root / "seq").read_text() or 0)
        except FileNotFoundError:
            return 0

    def _write_head(self, name: str, head: dict[str, Any]) -> None:
        """Write a head under the next sequence number, then publish that number. In this
        order a reader that sees seq N also sees every head up to N (a reader that looks
        in between sees the head early, with a seq above the one it read: a harmless
        duplicate next time, never a lost change)."""
        seq = self._seq() + 1
        self._write(self._head_path(name), json.dumps({**head, "seq": seq}).encode())
        self._write(self.root / "seq", str(seq).encode())

    @staticmethod
    def _live(head: dict[str, Any] | None) -> int:
        return 0 if head is None or head["deleted"] else head["version"]

    # ---- MaskStore -----------------------------------------------------------------------
    def get(self, name: str, version: int | None = None) -> MaskProfile:
        with self._io(f"reading '{name}'"):
            for _ in range(3):  # a concurrent write may trim the blob between two reads
                head = self._head(name)
                if not self._live(head) or (version is not None and version > head["version"]):
                    raise ProfileNotFound(name, version)
                v = head["version"] if version is None else version
                try:
                    data = self._blob_path(name, v).read_bytes()
                except FileNotFoundError:
                    if version is not None:
                        raise ProfileNotFound(name, version) from None
                    continue
                return MaskProfile.from_bytes(data).with_version(v)
            raise ProfileNotFound(name, version)

    def put(self, profile: MaskProfile, *, expected_version: int | None = None) -> MaskProfile:
        data = profile.to_bytes()  # outside the lock: the slow part for large masks
        summary = profile.summary().model_dump(mode="json")
        with self._io(f"writing '{profile.name}'"), self._locked():
            head = self._head(profile.name)
            live = self._live(head)
            if expected_version is not None and expected_version != live:
                raise VersionConflict(profile.name, expected_version, live)
            version = (head["version"] if head else 0) + 1
            self._write(self._blob_path(profile.name, version), data)
            summary["version"] = version
            self._write_head(profile.name,
                             {"version": version, "deleted": False, "summary": summary})
            for old in self._kept(profile.name)[: -self.keep_versions]:
                self._blob_path(profile.name, old).unlink(missing_ok=True)
        return profile.with_version(version)

    def delete(self, name: str, *, expected_version: int | None = None) -> int:
        with self._io(f"deleting '{name}'"), self._locked():
            head = self._head(name)
            live = self._live(head)
            if not live:
                raise ProfileNotFound(name)
            if expected_version is not None and expected_version != live:
                raise VersionConflict(name, expected_version, live)
            # The head stays as a tombstone: versions continue from it, watchers see the delete.
            self._write_head(name, {"version": live, "deleted": True, "summary": None})
            for old in self._kept(name):
                self._blob_path(name, old).unlink(missing_ok=True)
        return live

    def _kept(self, name: str) -> list[int]:
        folder = self.root / "blobs" / name
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())

    def versions(self, name: str) -> list[int]:
        with self._io(f"listing versions of '{name}'"):
            return self._kept(name) if self._live(self._head(name)) else []

    def _heads(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for path in sorted((self.root / "heads").glob("*.json")):
            try:
                yield path.stem, json.loads(path.read_bytes())
            except FileNotFoundError:
                continue

    def list(self) -> list[ProfileSummary]:
        with self._io("listing"):
            return [ProfileSummary.model_validate(head["summary"])
                    for _, head in self._heads() if not head["deleted"]]

    def current_seq(self) -> int:
        with self._io("reading the change sequence"):
            return self._seq()

    def changes(self, since: int = 0) -> ChangeSet:
        with self._io("reading changes"):
            seq = self._seq()  # first: a head written meanwhile shows up again next time
            events = [ChangeEvent(h["seq"], name, h["version"], h["deleted"])
                      for name, h in self._heads() if h["seq"] > since]
        return ChangeSet(seq, sorted(events, key=lambda e: e.seq))

    def watch(self, since: int | None = None) -> PollingWatch:
        return PollingWatch(self, since=since, poll_interval=self.poll_interval)

    def ping(self) -> None:
        with self._io("checking the directory"):
            if not os.access(self.root, os.W_OK):
                raise StoreUnavailable(f"mask store {self.root} is not writable")

    def close(self) -> None:
        pass
