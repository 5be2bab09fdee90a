"""Secrets in the state store are sealed: encrypted and authenticated (Fernet: AES-128-CBC + HMAC-SHA256).

The key comes from STATE_STORE_SECRET (any string; its SHA-256 is the key material). A value sealed under one
secret does not open under another (`open_sealed` answers None): replicas that should share /setup's Label Studio
access must share the secret. gunicorn.conf.py sets a random one per server start when none is given, so the
workers of one server share it and nothing readable outlives the server.
"""
from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken


class Sealer:
    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("an empty secret seals nothing")
        self._fernet = Fernet(base64.urlsafe_b64encode(hashlib.sha256(secret.encode()).digest()))

    def seal(self, data: bytes) -> bytes:
        return self._fernet.encrypt(data)

    def open(self, sealed: bytes) -> bytes | None:
        """The plain bytes, or None when `sealed` was not sealed with this secret or was altered."""
        try:
            return self._fernet.decrypt(sealed)
        except (InvalidToken, TypeError, ValueError):
            return None
