"""Salted password hashes (scrypt, from the standard library). Only the hash is ever stored.

Format: ``scrypt$<n>$<r>$<p>$<salt, base64>$<key, base64>``; the parameters travel with the hash
so they can be raised later without invalidating stored passwords.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os

# 2**14 * 8 * 128 bytes = 16 MiB and ~50 ms per hash: OWASP's minimum for scrypt.
N, R, P, KEY_BYTES, SALT_BYTES = 2**14, 8, 1, 32, 16


def hash_password(password: str, *, n: int | None = None, r: int = R, p: int = P) -> str:
    if not password:
        raise ValueError("empty password")
    n = n or N
    salt = os.urandom(SALT_BYTES)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=KEY_BYTES, maxmem=2 * 128 * r * n + 2**20)
    b64 = base64.b64encode
    return f"scrypt${n}${r}${p}${b64(salt).decode()}${b64(key).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches ``stored``; False for a wrong password or a malformed hash."""
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        n_, r_, p_ = int(n), int(r), int(p)
        expected = base64.b64decode(key)
        got = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=n_, r=r_, p=p_, dklen=len(expected),
                             maxmem=2 * 128 * r_ * n_ + 2**20)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


@functools.cache
def dummy_hash() -> str:
    """Verified against when the user does not exist, so a login attempt takes as long either way."""
    return hash_password("not-a-password")
