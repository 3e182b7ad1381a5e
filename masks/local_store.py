"""Embedded mask store: one SQLite database (WAL mode) that several processes may share.

Tables in `root/masks.sqlite3`:
  heads(name, version, seq, deleted, summary)  each profile's state; a tombstone after delete
  blobs(name, version, data)                   MaskProfile.to_bytes of each kept version
  changes(seq, token, name)                    the change log: one row per write (the last
                                               LOG_KEEP), a random token each
  artifacts(name, digest, data)                named blobs beside the profiles (not logged)
Each write is one IMMEDIATE transaction (compare-and-set, blob, head, change row, trims), each
read one statement or one read transaction, so nobody sees half a write; a busy timeout lets
processes wait for each other's writes. Watches poll `changes()`. The path is checked at every
use: a database deleted or replaced under an open connection (the directory wiped) is
reopened, created empty if need be, and its other tokens tell watchers to reset.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from masks.schema import MaskProfile, ProfileSummary, valid_name
from masks.store import (
    Artifact,
    ArtifactCorrupt,
    ArtifactNotFound,
    ChangeEvent,
    ChangeSet,
    PollingWatch,
    ProfileCorrupt,
    ProfileNotFound,
    StoreUnavailable,
    VersionConflict,
    Written,
    check_artifact,
    digest_of,
)

__all__ = ["LocalMaskStore"]

DATABASE = "masks.sqlite3"
LOG_KEEP = 10_000  # change rows kept: a watcher further behind resets (drops its cache)
_log = logging.getLogger("monet.masks")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS heads (name TEXT PRIMARY KEY, version INTEGER NOT NULL,
    seq INTEGER NOT NULL, deleted INTEGER NOT NULL, summary TEXT);
CREATE INDEX IF NOT EXISTS heads_seq ON heads (seq);
CREATE TABLE IF NOT EXISTS blobs (name TEXT NOT NULL, version INTEGER NOT NULL,
    data BLOB NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY, token TEXT NOT NULL,
    name TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS artifacts (name TEXT PRIMARY KEY, digest TEXT NOT NULL,
    data BLOB NOT NULL);
"""


class LocalMaskStore:
    """MaskStore on a local SQLite database (the default when no Redis URL is configured)."""

    def __init__(
        self,
        root: str | Path,
        *,
        keep_versions: int = 16,
        fsync: bool = True,
        poll_interval: float = 0.2,
        busy_timeout: float = 10.0,
    ):
        if keep_versions < 1:
            raise ValueError("keep_versions must be at least 1")
        self.root = Path(root).expanduser()
        self.path = self.root / DATABASE
        self.keep_versions = keep_versions
        self.fsync = fsync
        self.poll_interval = poll_interval
        self.busy_timeout = busy_timeout
        self._lock = threading.Lock()  # one connection, used by one thread at a time
        self._conn: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None
        with self._io("opening"), self._lock:
            self._db()

    def __repr__(self) -> str:
        return f"LocalMaskStore({str(self.root)!r})"

    # ---- the database --------------------------------------------------------------------
    @contextlib.contextmanager
    def _io(self, what: str) -> Iterator[None]:
        try:
            yield
        except (sqlite3.Error, OSError) as e:
            raise StoreUnavailable(f"mask store {self.path}: {what}: {e}") from e

    def _file(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def _db(self) -> sqlite3.Connection:
        """The connection to the database now at `path` (call with the lock held)."""
        if self._conn is not None and self._identity is not None \
                and self._file() == self._identity:
            return self._conn
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self.root.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        self._conn, self._identity = conn, self._file()
        return conn

    @contextlib.contextmanager
    def _transaction(self, mode: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
        """One transaction on the current database (call with the lock held)."""
        db = self._db()
        db.execute(f"BEGIN {mode}")
        try:
            yield db
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @staticmethod
    def _live(db: sqlite3.Connection, name: str) -> tuple[int, int]:
        """(highest version ever, live version or 0) of `name`."""
        row = db.execute("SELECT version, deleted FROM heads WHERE name = ?", (name,)).fetchone()
        if row is None:
            return 0, 0
        try:
            version = int(row[0])
        except (TypeError, ValueError) as e:
            raise ProfileCorrupt(name, None, f"head: {e}") from None
        return version, 0 if row[1] else version

    @staticmethod
    def _log_change(db: sqlite3.Connection, name: str) -> int:
        seq = db.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0] + 1
        db.execute("INSERT INTO changes (seq, token, name) VALUES (?, ?, ?)",
                   (seq, secrets.token_hex(8), name))
        db.execute("DELETE FROM changes WHERE seq <= ?", (seq - LOG_KEEP,))
        return seq

    # ---- MaskStore -----------------------------------------------------------------------
    def get(self, name: str, version: int | None = None) -> MaskProfile:
        if not valid_name(name):
            raise ProfileNotFound(name, version)
        with self._io(f"reading '{name}'"), self._lock:
            row = self._db().execute(
                "SELECT h.version, h.deleted, b.version, b.data FROM heads h LEFT JOIN blobs b"
                " ON b.name = h.name AND b.version = coalesce(?, h.version) WHERE h.name = ?",
                (version, name)).fetchone()
        if row is not None and not isinstance(row[0], int):
            raise ProfileCorrupt(name, version, f"head version {row[0]!r}")
        if row is None or row[1] or row[3] is None:
            raise ProfileNotFound(name, version)
        try:
            return MaskProfile.from_bytes(row[3]).with_version(int(row[2]))
        except Exception as e:  # any damage to the record: this profile fails, loudly
            raise ProfileCorrupt(name, version, e) from None

    def put(self, profile: MaskProfile, *, expected_version: int | None = None) -> MaskProfile:
        return self.write(profile, expected_version=expected_version).profile

    def write(self, profile: MaskProfile, *, expected_version: int | None = None) -> Written:
        data = profile.to_bytes()  # outside the lock: the slow part for large masks
        summary = profile.summary().model_dump(mode="json")
        name = profile.name
        with self._io(f"writing '{name}'"), self._lock, self._transaction() as db:
            current, live = self._live(db, name)
            if expected_version is not None and expected_version != live:
                raise VersionConflict(name, expected_version, live)
            version = current + 1
            seq = self._log_change(db, name)
            db.execute("INSERT OR REPLACE INTO blobs (name, version, data) VALUES (?, ?, ?)",
                       (name, version, data))
            db.execute("INSERT OR REPLACE INTO heads (name, version, seq, deleted, summary)"
                       " VALUES (?, ?, ?, 0, ?)",
                       (name, version, seq, json.dumps({**summary, "version": version})))
            db.execute("DELETE FROM blobs WHERE name = ? AND version <= ?",
                       (name, version - self.keep_versions))
        return Written(profile.with_version(version), live)

    def delete(self, name: str, *, expected_version: int | None = None) -> int:
        if not valid_name(name):
            raise ProfileNotFound(name)
        with self._io(f"deleting '{name}'"), self._lock, self._transaction() as db:
            _, live = self._live(db, name)
            if not live:
                raise ProfileNotFound(name)
            if expected_version is not None and expected_version != live:
                raise VersionConflict(name, expected_version, live)
            # The head stays as a tombstone: versions continue from it, watchers see the delete.
            seq = self._log_change(db, name)
            db.execute("UPDATE heads SET seq = ?, deleted = 1, summary = NULL WHERE name = ?",
                       (seq, name))
            db.execute("DELETE FROM blobs WHERE name = ?", (name,))
        return live

    def versions(self, name: str) -> list[int]:
        with self._io(f"listing versions of '{name}'"), self._lock:
            rows = self._db().execute(
                "SELECT b.version FROM blobs b JOIN heads h ON h.name = b.name"
                " WHERE b.name = ? AND h.deleted = 0 ORDER BY b.version", (name,)).fetchall()
        return [int(v) for (v,) in rows]

    def list(self) -> list[ProfileSummary]:
        with self._io("listing"), self._lock:
            rows = self._db().execute(
                "SELECT name, summary FROM heads WHERE deleted = 0 ORDER BY name").fetchall()
        out = []
        for name, summary in rows:
            try:
                out.append(ProfileSummary.model_validate_json(summary))
            except Exception as e:  # noqa: BLE001 (one bad row must not hide the others)
                _log.warning("%s", ProfileCorrupt(name, None, f"summary: {e}"))
        return out

    def current_seq(self) -> int:
        with self._io("reading the change sequence"), self._lock:
            return self._db().execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]

    def head(self) -> tuple[int, str]:
        with self._io("reading the head"), self._lock:
            row = self._db().execute(
                "SELECT seq, token FROM changes ORDER BY seq DESC LIMIT 1").fetchone()
        return (int(row[0]), row[1]) if row else (0, "")

    def changes(self, since: int = 0) -> ChangeSet:
        with self._io("reading changes"), self._lock, self._transaction("DEFERRED") as db:
            last = db.execute("SELECT seq, token FROM changes ORDER BY seq DESC LIMIT 1")
            seq, token = last.fetchone() or (0, "")
            at = db.execute("SELECT token FROM changes WHERE seq = ?", (since,)).fetchone()
            rows = db.execute("SELECT name, version, seq, deleted FROM heads WHERE seq > ?",
                              (since,)).fetchall()
        events = [_event(row, seq) for row in rows]
        since_token = "" if since == 0 else (at[0] if at else None)
        return ChangeSet(seq, sorted(events, key=lambda e: e.seq), token, since_token)

    def watch(self, since: int | None = None) -> PollingWatch:
        return PollingWatch(self, since=since, poll_interval=self.poll_interval)

    # ---- artifacts -------------------------------------------------------------------------
    def put_artifact(self, name: str, data: bytes) -> str:
        check_artifact(name, data)
        digest = digest_of(data)
        with self._io(f"writing artifact '{name}'"), self._lock, self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO artifacts (name, digest, data) VALUES (?, ?, ?)",
                       (name, digest, bytes(data)))
        return digest

    def get_artifact(self, name: str) -> Artifact:
        check_artifact(name)
        with self._io(f"reading artifact '{name}'"), self._lock:
            row = self._db().execute("SELECT digest, data FROM artifacts WHERE name = ?",
                                     (name,)).fetchone()
        if row is None:
            raise ArtifactNotFound(name)
        digest, data = row
        if not isinstance(data, bytes) or digest_of(data) != digest:
            raise ArtifactCorrupt(name, "its bytes do not match their digest")
        return Artifact(name, data, digest)

    def artifact_digest(self, name: str) -> str:
        check_artifact(name)
        with self._io(f"reading artifact '{name}'"), self._lock:
            row = self._db().execute("SELECT digest FROM artifacts WHERE name = ?",
                                     (name,)).fetchone()
        if row is None:
            raise ArtifactNotFound(name)
        return str(row[0])

    def delete_artifact(self, name: str) -> bool:
        check_artifact(name)
        with self._io(f"deleting artifact '{name}'"), self._lock, self._transaction() as db:
            return db.execute("DELETE FROM artifacts WHERE name = ?", (name,)).rowcount > 0

    def ping(self) -> None:
        with self._io("checking the database"), self._lock:
            self._db().execute("SELECT 1 FROM changes LIMIT 1").fetchall()
            if not os.access(self.root, os.W_OK):
                raise StoreUnavailable(f"mask store {self.root} is not writable")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _event(row: tuple, seq: int) -> ChangeEvent:
    """A head row as a change event; a damaged one as a delete of its name at `seq`, so
    caches drop it and the next read reports it corrupt."""
    name, version, at, deleted = row
    try:
        return ChangeEvent(int(at), name, int(version), bool(int(deleted)))
    except (TypeError, ValueError) as e:
        _log.warning("%s", ProfileCorrupt(name, None, f"head: {e}"))
        return ChangeEvent(seq, name, 0, True)
