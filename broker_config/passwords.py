"""Mosquitto 2 password files, read and written without the `mosquitto_passwd` tool.

A line is `username:$7$<iterations>$<base64 salt>$<base64 hash>`, where the hash is
PBKDF2-HMAC-SHA512 over the UTF-8 password with the raw salt bytes: the format `mosquitto_passwd`
writes by default since 2.0 (`-H sha512-pbkdf2`), with the same salt and hash lengths.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

PBKDF2_TAG = "7"
# mosquitto_passwd 2.0 writes 101 iterations and every connect verifies the hash, so the broker
# pays this cost per CONNECT; callers that want a slower hash can pass more.
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12
HASH_BYTES = 64


class PasswordFileError(ValueError):
    """A password file line or value mosquitto would not accept."""


def hash_password(password: str, *, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None) -> str:
    """The `$7$...` PBKDF2-SHA512 hash mosquitto 2 verifies."""
    if iterations < 1:
        raise PasswordFileError(f"PBKDF2 iterations must be positive, got {iterations}")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, HASH_BYTES)
    b64 = base64.b64encode
    return f"${PBKDF2_TAG}${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether `password` matches a `$7$` hash (constant-time comparison)."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != PBKDF2_TAG:
        raise PasswordFileError(f"not a mosquitto PBKDF2-SHA512 ($7$) hash: {encoded[:12]!r}...")
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError as exc:
        raise PasswordFileError(f"malformed $7$ hash: {exc}") from exc
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, len(expected))
    return hmac.compare_digest(digest, expected)


def read_password_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Username -> hash, in file order. A missing file reads as empty."""
    p = Path(path)
    if not p.exists():
        return {}
    entries: dict[str, str] = {}
    for number, raw in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        username, sep, hashed = line.partition(":")
        if not sep or not username:
            raise PasswordFileError(f"{p}:{number}: expected 'username:hash', got {line[:40]!r}")
        entries[username] = hashed
    return entries


def write_password_file(path: str | os.PathLike[str], entries: dict[str, str]) -> None:
    """Replace the file atomically with these entries, readable by its owner only (or with the
    mode the existing file already has, so a broker that reads it as another user keeps access)."""
    p = Path(path)
    mode = p.stat().st_mode & 0o777 if p.exists() else 0o600
    text = "".join(f"{user}:{hashed}\n" for user, hashed in entries.items())
    write_private_file(p, text, mode=mode)


def write_private_file(path: Path, text: str, *, mode: int = 0o600) -> None:
    """Write `text` to a temporary sibling created with `mode`, then rename it over `path`, so a
    reader never sees a half-written file and the content is never briefly world-readable."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), mode)  # the umask may have narrowed the requested mode
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
