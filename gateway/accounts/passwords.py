"""Password hashing: argon2id through argon2-cffi, with RFC 9106's second recommended parameters
(t=3 passes, m=64 MiB, p=4 lanes, 16-byte salt, 32-byte tag).

A hash made with other parameters is re-made at the next successful login. Verifying a login
for an unknown account still runs one argon2 verification (against a dummy hash), so the answer
takes as long as for a known account: its timing does not tell which emails have accounts.
"""

from __future__ import annotations

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from gateway.errors import Invalid

TIME_COST = 3
MEMORY_KIB = 64 * 1024
PARALLELISM = 4
MIN_LENGTH = 12
MAX_LENGTH = 1024

_hasher = PasswordHasher(
    time_cost=TIME_COST,
    memory_cost=MEMORY_KIB,
    parallelism=PARALLELISM,
    hash_len=32,
    salt_len=16,
    type=Type.ID,
)
# Immutable after import; made once because each hash costs ~50 ms of CPU.
_DUMMY_HASH = _hasher.hash("not a password anyone has: the timing guard for unknown accounts")


def check_policy(password: str) -> None:
    if len(password) < MIN_LENGTH:
        raise Invalid("weak_password", f"a password has at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise Invalid("password_too_long", f"a password has at most {MAX_LENGTH} characters")


def hash_password(password: str) -> str:
    check_policy(password)
    return _hasher.hash(password)


def verify(stored_hash: str | None, password: str) -> bool:
    """Whether `password` matches; a missing hash (unknown account, SSO-only user) is checked
    against the dummy hash so it costs the same time, and never matches."""
    if len(password) > MAX_LENGTH:
        return False
    try:
        return _hasher.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def rehashed(stored_hash: str, password: str) -> str | None:
    """A new hash with today's parameters when `stored_hash` (just verified) has others."""
    return _hasher.hash(password) if _hasher.check_needs_rehash(stored_hash) else None
