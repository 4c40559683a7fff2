"""Reasoning sealed for stateless clients: AES-256-GCM from `cryptography`, under one server key.

With `store: false` and `include: ["reasoning.encrypted_content"]` a reasoning item leaves with its
text sealed, and the client sends it back with the next turn; the tag makes any change (or another
server's key) fail to open, so a client can carry the chain of thought but never forge or read it.
The key comes from MINERVA_REASONING_KEY (any secret text, stretched with HKDF) so that replicas and
restarts share it; without it a random key lives as long as the process.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_ENV = "MINERVA_REASONING_KEY"
CONTEXT = b"minerva responses reasoning v1"  # bound into every seal: blobs made for other uses never open
NONCE_BYTES = 12


class SealError(ValueError):
    """A sealed blob that was changed, truncated, or made under another key."""


class ReasoningSeal:
    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    @classmethod
    def from_environment(cls) -> "ReasoningSeal":
        secret = os.environ.get(KEY_ENV)
        if not secret:
            return cls(AESGCM.generate_key(bit_length=256))
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=CONTEXT).derive(secret.encode())
        return cls(key)

    def seal(self, text: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        return base64.b64encode(nonce + self._aead.encrypt(nonce, text.encode(), CONTEXT)).decode("ascii")

    def open(self, blob: str) -> str:
        try:
            raw = base64.b64decode(blob, validate=True)
            return self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], CONTEXT).decode()
        except (InvalidTag, ValueError, binascii.Error) as exc:
            raise SealError("encrypted_content was not sealed by this server or was changed") from exc
