"""Secrets at rest: what the head-end must read back (meter passwords and keys, PasswordDigest
passwords) is kept encrypted in the store, with a key the operator holds.

`SecretBox` seals with Fernet (cryptography: AES-128-CBC with HMAC-SHA256, a random IV per
token). Its key is the environment variable `CIMHES_SECRET_KEY` when set (a Fernet key: 32
url-safe base64 bytes), else the key file, made on first use with mode 0600. `Sealed` is the
column type of every such secret: the database only ever holds tokens, and a store opened with
another key says so (`WrongSecretKey`) instead of handing out garbage.

`private_database_file` makes a SQLite file (and so its -wal/-shm files, which SQLite creates
with the database's permissions) readable by its owner only before the engine first opens it.
"""
from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import String
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.types import TypeDecorator

KEY_ENVIRONMENT_VARIABLE = "CIMHES_SECRET_KEY"


class WrongSecretKey(ValueError):
    """Sealed values in the store that this key cannot open."""


class SecretBox:
    """Encrypts the secrets the head-end must be able to read back (Fernet), with one key."""

    def __init__(self, key: bytes, origin: str = "a key given in code"):
        self._fernet = Fernet(key)
        self.origin = origin  # where the key came from, for error messages (never the key)

    @classmethod
    def from_file(cls, path: Path) -> SecretBox:
        """The key of $CIMHES_SECRET_KEY when set, else of the file `path` (made, 0600, if
        missing)."""
        from_environment = os.environ.get(KEY_ENVIRONMENT_VARIABLE)
        if from_environment:
            try:
                return cls(from_environment.strip().encode("ascii"),
                           f"${KEY_ENVIRONMENT_VARIABLE}")
            except ValueError:
                raise ValueError(f"${KEY_ENVIRONMENT_VARIABLE} is not a Fernet key (32 url-safe "
                                 "base64-encoded bytes)") from None
        path = Path(path)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(Fernet.generate_key())
        try:
            return cls(path.read_bytes().strip(), f"key file {path}")
        except ValueError:
            raise ValueError(f"key file {path} does not hold a Fernet key") from None

    @classmethod
    def ephemeral(cls) -> SecretBox:
        """A box with a fresh random key, for a store whose secrets need not outlive it."""
        return cls(Fernet.generate_key(), "a random key of this process")

    def seal(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode()).decode("ascii")

    def open(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode("ascii")).decode()
        except (InvalidToken, UnicodeError):
            raise WrongSecretKey(
                f"a secret in the store was sealed with another key than {self.origin}: give "
                "the key it was sealed with, or load the inventory again into a new database"
            ) from None


class Sealed(TypeDecorator):
    """A secret string column: sealed on the way in, opened on the way out, with the box
    `attach_secret_box` gave the engine (an unattached engine refuses to store secrets)."""

    impl = String(512)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else _box(dialect).seal(value)

    def process_result_value(self, value, dialect):
        return None if value is None else _box(dialect).open(value)


def attach_secret_box(engine: Engine, box: SecretBox) -> None:
    """Seal this engine's `Sealed` columns with `box` (kept on the engine's dialect, the one
    object a column type sees)."""
    engine.dialect.cimhes_secret_box = box


def _box(dialect) -> SecretBox:
    box = getattr(dialect, "cimhes_secret_box", None)
    if box is None:
        raise RuntimeError("this engine has no secret box: call attach_secret_box first")
    return box


def private_database_file(url: str) -> None:
    """Create a SQLite database file with mode 0600 if it does not exist yet; other URLs and
    in-memory databases are left alone."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or \
            parsed.database == ":memory:" or parsed.database.startswith("file:"):
        return
    path = Path(parsed.database)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
