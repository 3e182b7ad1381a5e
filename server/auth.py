"""API keys with two scopes: `generate` (generation, inspection, reading masks) and `admin`
(mask writes and builds; implies generate). Keys arrive as `Authorization: Bearer <key>` (what
the openai client sends). With no keys configured every caller is the local "anonymous" admin:
the server then binds to localhost only.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from server.errors import ApiError

__all__ = ["ADMIN", "GENERATE", "KeyRing", "Principal"]

GENERATE, ADMIN = "generate", "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    name: str  # who, for logs and the audit trail
    scopes: frozenset[str]


def _entry(entry: str) -> tuple[str, str]:
    """ "alice:secret" -> ("alice", "secret"); a bare key is named by a hash prefix."""
    name, sep, key = entry.partition(":")
    if sep and name and key:
        return name, key
    return f"key-{hashlib.sha256(entry.encode()).hexdigest()[:8]}", entry


class KeyRing:
    def __init__(self, api_keys: list[str], admin_keys: list[str]):
        self._keys: list[tuple[bytes, Principal]] = []
        for entries, scopes in ((api_keys, {GENERATE}), (admin_keys, {GENERATE, ADMIN})):
            for entry in entries:
                name, key = _entry(entry)
                self._keys.append((key.encode(), Principal(name, frozenset(scopes))))

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, key: str | None) -> Principal | None:
        if not self.enabled:
            return Principal("anonymous", frozenset({GENERATE, ADMIN}))
        if not key:
            return None
        found = None
        given = key.encode()
        for stored, principal in self._keys:  # compare with every key: constant time
            if hmac.compare_digest(stored, given) and found is None:
                found = principal
        return found

    def require(self, key: str | None, scope: str) -> Principal:
        principal = self.identify(key)
        if principal is None:
            raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           param="Authorization", headers={"WWW-Authenticate": "Bearer"})
        if scope not in principal.scopes:
            raise ApiError(403, f"this API key lacks the '{scope}' scope", param="Authorization")
        return principal
