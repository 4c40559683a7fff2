"""API keys: `Authorization: Bearer <key>` (or Anthropic's `x-api-key: <key>`) checked in constant time against
every known key."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path


class AuthError(Exception):
    """The request carries no key, a malformed header or an unknown key (HTTP 401)."""


def key_id(key: str) -> str:
    """A short, stable, non-reversible name for a key, safe to log."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def read_keys_file(path: str | Path) -> list[str]:
    """One key per line; blank lines and lines starting with '#' are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read API keys file: {exc}") from exc
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ValueError(f"{path}: API keys file holds no key")
    return keys


class ApiKeys:
    """The set of accepted keys; an empty set turns authentication off."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        unique = list(dict.fromkeys(keys))
        if any(not k or any(c.isspace() for c in k) for k in unique):
            raise ValueError("API keys must be non-empty and contain no whitespace")
        self._digests = [(hashlib.sha256(k.encode()).digest(), key_id(k)) for k in unique]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def authenticate(self, authorization: str | None, api_key: str | None = None) -> str:
        """Return the key id of a valid `Bearer` header (else of the `x-api-key` header); raise AuthError otherwise.

        Every known key is compared (through fixed-length digests, with
        hmac.compare_digest) so the time taken tells nothing about which key was near.
        """
        if not authorization and not api_key:
            raise AuthError("Missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>').")
        if authorization:
            scheme, _, token = authorization.partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token or " " in token:
                raise AuthError("Malformed Authorization header: expected 'Bearer <key>'.")
        else:
            token = (api_key or "").strip()
        digest = hashlib.sha256(token.encode()).digest()
        match = None
        for known, kid in self._digests:
            if hmac.compare_digest(digest, known):
                match = kid
        if match is None:
            raise AuthError("Incorrect API key provided.")
        return match
