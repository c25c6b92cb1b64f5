"""Password hashes for accounts in the tenants file (and the reference API server).

Stored forms, Dovecot-style with a scheme prefix:

    {SCRYPT}n=16384,r=8,p=1$<salt b64>$<hash b64>   the default (`mailedge hash-password`)
    {PLAIN}secret                                   demos and tests only

Verification is constant-time and runs scrypt in a thread, so a login never blocks
the event loop for the ~50 ms a good hash costs.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import secrets

SCRYPT_N, SCRYPT_R, SCRYPT_P = 16384, 8, 1
_B64 = r"([A-Za-z0-9+/=]+)"
_SCRYPT_RE = re.compile(r"^\{SCRYPT\}n=(\d+),r=(\d+),p=(\d+)\$" + _B64 + r"\$" + _B64 + "$")


class BadHash(ValueError):
    """A stored hash in an unknown or malformed format."""


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            dklen=32)
    return (f"{{SCRYPT}}n={SCRYPT_N},r={SCRYPT_R},p={SCRYPT_P}$"
            f"{base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}")


def check_format(stored: str) -> None:
    if stored.startswith("{PLAIN}"):
        return
    if not _SCRYPT_RE.match(stored):
        raise BadHash("password must be {SCRYPT}... (mailedge hash-password) or {PLAIN}...")


def verify_password(password: str, stored: str) -> bool:
    if stored.startswith("{PLAIN}"):
        return hmac.compare_digest(password.encode(), stored[len("{PLAIN}"):].encode())
    match = _SCRYPT_RE.match(stored)
    if not match:
        raise BadHash("unknown password hash format")
    n, r, p = (int(match.group(i)) for i in (1, 2, 3))
    salt = base64.b64decode(match.group(4))
    expected = base64.b64decode(match.group(5))
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(expected),
                            maxmem=256 * 1024 * 1024)
    return hmac.compare_digest(digest, expected)


async def verify_password_async(password: str, stored: str) -> bool:
    if stored.startswith("{PLAIN}"):
        return verify_password(password, stored)
    return await asyncio.to_thread(verify_password, password, stored)
