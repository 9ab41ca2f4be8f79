"""Users, roles and the audit trail: who may do what through the head-end, and who did what.

Roles are a fixed, documented table (:class:`Role`), kept in the store so grants are rows; a user
holds any number of them. Passwords are kept as argon2id hashes (argon2-cffi). WS-Security's
PasswordDigest needs the password itself on the server (the digest is SHA-1 over nonce, time and
password), so a user created with ``digest=True`` also gets that password encrypted at rest
(Fernet, key in the head-end's secret key file); a user without it can use PasswordText or HTTP
Basic only.

The audit table is append-only: the store only ever inserts into it, and database triggers (made by
its migration) refuse UPDATE and DELETE on SQLite and PostgreSQL, so even a hand-written statement
cannot rewrite history.

Every method of :class:`UserStore` blocks on the database: the reactor reaches it through the
store's thread (``StoreRunner.call``). Password hashing and verification are CPU work (tens of
milliseconds each, by design) and run on worker threads (:class:`Authenticator`).
"""
from __future__ import annotations

import base64
import csv
import enum
import functools
import hashlib
import hmac
import logging
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TextIO

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import (
    Boolean,
    ForeignKey,
    String,
    select,
)
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker
from twisted.internet.defer import Deferred, DeferredSemaphore, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from cimhes.engine import redaction
from cimhes.engine.sealed import SecretBox, WrongSecretKey
from cimhes.engine.store import Base, EpochMillis, Store, StoreRunner

log = logging.getLogger(__name__)


class Role(str, enum.Enum):
    """The roles a user can hold, each with what it allows. The one table of them."""

    meaning: str

    def __new__(cls, name: str, meaning: str) -> Role:
        member = str.__new__(cls, name)
        member._value_ = name
        member.meaning = meaning
        return member

    READINGS_READER = ("readings-reader",
                       "read meter readings: GetMeterReadings, on-demand reads, device pages, "
                       "SLA reports")
    EVENTS_READER = "events-reader", "read end-device events (GetEndDeviceEvents, device events)"
    SWITCH_OPERATOR = ("switch-operator",
                       "execute connect and disconnect controls (EndDeviceControls)")
    LOAD_LIMIT_OPERATOR = ("load-limit-operator",
                           "execute load-limit controls (set or clear a limiter threshold)")
    CONFIGURATION_OPERATOR = ("configuration-operator",
                              "execute clock synchronisation and TOU calendar activation "
                              "controls (EndDeviceControls)")
    ADMINISTRATOR = ("administrator",
                     "administer users and their roles, read and export the audit trail")


# ------------------------------------------------------------------------------ tables


class UserRecord(Base):
    __tablename__ = "app_user"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    # Fernet token of the password, only for users allowed to use WS-Security PasswordDigest.
    digest_secret: Mapped[str | None] = mapped_column(String(512))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(EpochMillis())


class RoleRecord(Base):
    __tablename__ = "app_role"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    meaning: Mapped[str] = mapped_column(String(255))


class UserRoleRecord(Base):
    __tablename__ = "app_user_role"
    user_id: Mapped[int] = mapped_column(ForeignKey("app_user.id"), primary_key=True)
    role: Mapped[str] = mapped_column(ForeignKey("app_role.name"), primary_key=True)


class AuditRecord(Base):
    """One audited event. Append-only (see the triggers below)."""

    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(EpochMillis(), index=True)
    actor: Mapped[str | None] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))
    source: Mapped[str | None] = mapped_column(String(128))
    correlation_id: Mapped[str | None] = mapped_column(String(128))
    subject: Mapped[str | None] = mapped_column(String(128))
    detail: Mapped[str | None] = mapped_column(String(1024))


# The audit table's append-only triggers (SQLite and PostgreSQL) are made by its migration,
# engine/migrations/versions/users_0001_users_roles_audit.py.


# ------------------------------------------------------------------------------ values


@dataclass(frozen=True)
class AuditEntry:
    """What one audit row says. ``outcome``: success, failure (e.g. wrong password, a device
    that failed) or refused (not allowed, rate-limited)."""

    at: datetime
    actor: str | None
    action: str
    outcome: str
    source: str | None = None
    correlation_id: str | None = None
    subject: str | None = None
    detail: str | None = None


AUDIT_COLUMNS = ("at", "actor", "action", "outcome", "source", "correlation_id", "subject",
                 "detail")


@dataclass(frozen=True)
class UserInfo:
    name: str
    roles: frozenset[Role]
    disabled: bool
    digest: bool


@dataclass(frozen=True)
class Credentials:
    """What verifying a user's password needs (never leaves the engine)."""

    name: str
    password_hash: str
    digest_secret: str | None
    disabled: bool
    roles: frozenset[Role]

    def __repr__(self) -> str:  # keep the hash and secret out of logs and tracebacks
        return f"Credentials(name={self.name!r}, disabled={self.disabled}, roles=...)"


@dataclass(frozen=True)
class Principal:
    """An authenticated user and the roles it holds."""

    name: str
    roles: frozenset[Role]

    def may(self, role: Role) -> bool:
        return role in self.roles


class UserError(ValueError):
    """A user administration request that cannot be done (unknown user or role, duplicate)."""


_HASHER = PasswordHasher()  # argon2id, argon2-cffi's RFC 9106 low-memory profile
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024


def _check_password(password: str) -> None:
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise UserError(f"a password has {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} "
                        "characters")


def _now() -> datetime:
    return datetime.now(timezone.utc)


class UserStore:
    """Blocking unit-of-work methods on users, roles and the audit trail."""

    def __init__(self, store: Store, secrets_box: SecretBox):
        self._session = sessionmaker(store.engine, expire_on_commit=False)
        self._box = secrets_box
        with self._session.begin() as session:  # the role table is data: keep it as documented
            known = {r.name: r for r in session.scalars(select(RoleRecord))}
            for role in Role:
                row = known.get(role.value) or RoleRecord(name=role.value)
                row.meaning = role.meaning
                session.add(row)

    # -- administration (each change audited in the same transaction)

    def add_user(self, name: str, password: str, roles: Iterable[Role | str] = (), *,
                 digest: bool = False, actor: str, source: str | None = None,
                 replace: bool = False) -> UserInfo:
        """Create a user (or, with ``replace``, reset its password and roles)."""
        if not name or len(name) > 64 or not name.isprintable() or ":" in name:
            raise UserError(f"a user name has 1 to 64 printable characters and no ':' "
                            f"(HTTP Basic), not {name!r}")
        _check_password(password)
        roles = frozenset(_role(r) for r in roles)
        password_hash = _HASHER.hash(password)
        with self._session.begin() as session:
            row = session.scalar(select(UserRecord).where(UserRecord.name == name))
            if row is not None and not replace:
                raise UserError(f"user {name!r} exists")
            if row is None:
                row = UserRecord(name=name, created_at=_now(), disabled=False)
                session.add(row)
            row.password_hash = password_hash
            row.digest_secret = self._box.seal(password) if digest else None
            row.disabled = False
            session.flush()
            for grant in session.scalars(select(UserRoleRecord).where(
                    UserRoleRecord.user_id == row.id)):
                session.delete(grant)
            session.flush()
            for role in roles:
                session.add(UserRoleRecord(user_id=row.id, role=role.value))
            session.add(_audit_row(AuditEntry(
                at=_now(), actor=actor, action="user.add", outcome="success", source=source,
                subject=name, detail=f"roles={','.join(sorted(r.value for r in roles))} "
                                     f"digest={'yes' if digest else 'no'}")))
        return UserInfo(name, roles, False, digest)

    def set_disabled(self, name: str, disabled: bool, *, actor: str,
                     source: str | None = None) -> None:
        with self._session.begin() as session:
            row = self._user(session, name)
            row.disabled = disabled
            session.add(_audit_row(AuditEntry(
                at=_now(), actor=actor, action="user.disable" if disabled else "user.enable",
                outcome="success", source=source, subject=name)))

    def grant(self, name: str, role: Role | str, *, actor: str, source: str | None = None,
              revoke: bool = False) -> None:
        role = _role(role)
        with self._session.begin() as session:
            row = self._user(session, name)
            existing = session.get(UserRoleRecord, (row.id, role.value))
            if revoke and existing is not None:
                session.delete(existing)
            elif not revoke and existing is None:
                session.add(UserRoleRecord(user_id=row.id, role=role.value))
            session.add(_audit_row(AuditEntry(
                at=_now(), actor=actor, action="user.revoke" if revoke else "user.grant",
                outcome="success", source=source, subject=name, detail=f"role={role.value}")))

    def users(self) -> list[UserInfo]:
        with self._session() as session:
            grants: dict[int, set[Role]] = {}
            for grant in session.scalars(select(UserRoleRecord)):
                grants.setdefault(grant.user_id, set()).add(Role(grant.role))
            return [UserInfo(u.name, frozenset(grants.get(u.id, ())), u.disabled,
                             u.digest_secret is not None)
                    for u in session.scalars(select(UserRecord).order_by(UserRecord.name))]

    # -- authentication

    def credentials(self, name: str) -> Credentials | None:
        with self._session() as session:
            row = session.scalar(select(UserRecord).where(UserRecord.name == name))
            if row is None:
                return None
            roles = frozenset(Role(r) for r in session.scalars(
                select(UserRoleRecord.role).where(UserRoleRecord.user_id == row.id)))
            return Credentials(row.name, row.password_hash, row.digest_secret, row.disabled,
                               roles)

    def broker_principal(self, name: str) -> Principal:
        """The cimhes user an AMQP request comes from (queue/authorisation.py), by name.

        How an AMQP user maps to cimhes: the broker has already authenticated the connection
        (its own user and password), and RabbitMQ refuses a message whose ``user_id`` property
        is not the connection's user; so the request's ``user_id`` *is* the caller. It names the
        cimhes user of the same name, whose roles apply as over SOAP; its cimhes password plays
        no part. An AMQP user with no cimhes user of that name, or a disabled one, is refused
        (AuthenticationFailed saying which). A request without ``user_id`` names nobody and is
        refused by the door (RabbitMQ checks the property only when it is set). The Header's
        User.UserID is never taken as the caller: anyone can write it."""
        found = self.credentials(name)
        if found is None:
            raise AuthenticationFailed(f"AMQP user {name!r} is not a cimhes user")
        if found.disabled:
            raise AuthenticationFailed(f"cimhes user {name!r} is disabled")
        return Principal(found.name, found.roles)

    def open_secret(self, token: str) -> str | None:
        try:
            return self._box.open(token)
        except WrongSecretKey:
            log.error("a user's digest secret does not open with this secret key")
            return None

    # -- audit

    def append_audit(self, entries: Iterable[AuditEntry]) -> None:
        with self._session.begin() as session:
            session.add_all(_audit_row(e) for e in entries)

    def audit_entries(self, since: datetime | None = None,
                      until: datetime | None = None) -> list[AuditEntry]:
        query = select(AuditRecord).order_by(AuditRecord.id)
        if since is not None:
            query = query.where(AuditRecord.at >= since)
        if until is not None:
            query = query.where(AuditRecord.at < until)
        with self._session() as session:
            return [AuditEntry(**{c: getattr(r, c) for c in AUDIT_COLUMNS})
                    for r in session.scalars(query)]

    def export_audit_csv(self, out: TextIO, since: datetime | None = None,
                         until: datetime | None = None) -> int:
        """Write the audit trail as CSV (header row, times in ISO 8601 UTC); returns rows."""
        writer = csv.writer(out)
        writer.writerow(AUDIT_COLUMNS)
        entries = self.audit_entries(since, until)
        for entry in entries:
            writer.writerow([entry.at.isoformat(timespec="milliseconds"),
                             *(_csv_cell(getattr(entry, c)) for c in AUDIT_COLUMNS[1:])])
        return len(entries)

    @staticmethod
    def _user(session, name: str) -> UserRecord:
        row = session.scalar(select(UserRecord).where(UserRecord.name == name))
        if row is None:
            raise UserError(f"no user named {name!r}")
        return row


def _csv_cell(value) -> str:
    text = "" if value is None else str(value)
    # A cell a spreadsheet would run as a formula is quoted as text (CSV injection).
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _role(value: Role | str) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise UserError(f"no role named {value!r}; roles: "
                        f"{', '.join(r.value for r in Role)}") from None


def _audit_row(entry: AuditEntry) -> AuditRecord:
    detail = entry.detail if entry.detail is None else entry.detail[:1024]
    return AuditRecord(**{**entry.__dict__, "detail": detail})


class AuditTrail:
    """Appends audit entries on the store's thread; the request does not wait for the write,
    but a failed write is logged."""

    def __init__(self, runner: StoreRunner, users: UserStore,
                 now: Callable[[], datetime] | None = None):
        self._runner = runner
        self._users = users
        self.now = now or (lambda: datetime.now(timezone.utc))
        # Group commit: entries recorded before the store thread has started the write queued
        # for the first of them go into that same write, so a burst of 200 requests costs a few
        # transactions, not 200, and no entry is written later than it would be alone.
        self._open: list[tuple[AuditEntry, Deferred]] | None = None
        self._lock = threading.Lock()

    def record(self, action: str, outcome: str, *, actor: str | None, source: str | None = None,
               correlation_id: str | None = None, subject: str | None = None,
               detail: str | None = None) -> Deferred:
        """Deferred firing (with None) once the entry is written, or its write failed and was
        logged; entries are written in the order they were recorded."""
        entry = AuditEntry(at=self.now(), actor=actor, action=action, outcome=outcome,
                           source=source, correlation_id=correlation_id, subject=subject,
                           detail=detail)
        written = Deferred()
        with self._lock:
            first = self._open is None
            if first:
                self._open = []
            self._open.append((entry, written))
        if first:
            self._runner.call(self._write_open).addCallback(self._fire)
        return written

    def _write_open(self) -> tuple[list, Failure | None]:  # on the store's thread
        with self._lock:
            batch, self._open = self._open, None
        try:
            self._users.append_audit([entry for entry, _ in batch])
        except Exception:  # noqa: BLE001 (logged on the reactor; the requests go on)
            return batch, Failure()
        return batch, None

    @staticmethod
    def _fire(written: tuple[list, Failure | None]) -> None:
        batch, failure = written
        if failure is not None:
            log.error("writing the audit trail failed: %s", redaction.log_line(failure))
        for _, done in batch:
            done.callback(None)


# ------------------------------------------------------------------------------ verification


class AuthenticationFailed(Exception):
    """Why a login was refused (for the audit trail; the caller is told less)."""


# OASIS Web Services Security UsernameToken Profile 1.0: how fresh a digest's Created must be.
DIGEST_FRESHNESS = timedelta(minutes=5)
NONCE_CACHE_SIZE = 100_000
VERIFIED_CACHE_SIZE = 1024
HASHING_CONCURRENCY = 2


class Authenticator:
    """Checks a user's password (PasswordText, HTTP Basic) or PasswordDigest.

    The user's row is read for every request, so disabling a user or changing its roles takes
    effect at once; requests of one user arriving while its row is being read share that read
    (a burst of 200 calls is one query, not 200). The argon2 verification (~50 ms of CPU,
    64 MiB) runs on a worker thread, at most ``HASHING_CONCURRENCY`` at once; a password already
    verified against the same stored hash is remembered (as an HMAC under a key of this process,
    never the password) so a client that sends the same credentials on every call costs one
    verification, not one per call, and concurrent requests with the same credentials wait for
    the one verification in progress instead of each starting its own.
    Digest nonces are remembered for the freshness window so a captured token cannot be replayed.
    """

    def __init__(self, runner: StoreRunner, users: UserStore,
                 now: Callable[[], datetime] = _now):
        self._runner = runner
        self._users = users
        self._now = now
        self._hashing = DeferredSemaphore(HASHING_CONCURRENCY)
        self._key = secrets.token_bytes(32)
        self._verified: OrderedDict[tuple[str, str, bytes], None] = OrderedDict()
        self._nonces: OrderedDict[bytes, datetime] = OrderedDict()
        # Reads and verifications in flight, by user name / by mark: later requests join them.
        self._reading: dict[str, list[Deferred]] = {}
        self._verifying: dict[tuple[str, str, bytes], list[Deferred]] = {}

    def _credentials(self, name: str) -> Deferred:
        """Deferred[Credentials | None]: the user's row, read once for every request that asks
        while the read is in flight (each such request arrived after the read was queued)."""
        return self._joined(self._reading, name,
                            lambda: self._runner.call(self._users.credentials, name))

    def _verify_once(self, mark, password_hash: str, password: str) -> Deferred:
        return self._joined(self._verifying, mark, lambda: self._hashing.run(
            deferToThread, _verify, password_hash, password))

    @staticmethod
    def _joined(in_flight: dict, key, start) -> Deferred:
        mine = Deferred()
        waiting = in_flight.get(key)
        if waiting is not None:
            waiting.append(mine)
            return mine
        in_flight[key] = waiting = [mine]

        def fan_out(result):
            del in_flight[key]
            for each in waiting:
                if isinstance(result, Failure):
                    each.errback(result)
                else:
                    each.callback(result)

        start().addBoth(fan_out)
        return mine

    @inlineCallbacks
    def password(self, name: str, password: str):
        """Deferred[Principal]; fails with AuthenticationFailed."""
        found = yield self._credentials(name)
        if found is None:
            # Verify against a throw-away hash all the same: an unknown name costs what a
            # known one does, so timing does not tell which names exist.
            yield self._hashing.run(deferToThread, _verify, _dummy_hash(), password)
            raise AuthenticationFailed("unknown user")
        if found.disabled:
            raise AuthenticationFailed("user disabled")
        mark = (found.name, found.password_hash,
                hmac.digest(self._key, password.encode(), "sha256"))
        if mark not in self._verified:
            ok = yield self._verify_once(mark, found.password_hash, password)
            if not ok:
                raise AuthenticationFailed("wrong password")
            self._verified[mark] = None
            if len(self._verified) > VERIFIED_CACHE_SIZE:
                self._verified.popitem(last=False)
        return Principal(found.name, found.roles)

    @inlineCallbacks
    def digest(self, name: str, digest: str, nonce: str, created: str):
        """Deferred[Principal] for a UsernameToken with PasswordDigest:
        Base64(SHA-1(nonce + created + password)), nonce being the decoded Nonce bytes."""
        try:
            nonce_bytes = base64.b64decode(nonce, validate=True)
            created_at = datetime.fromisoformat(created.replace("Z", "+00:00"))
        except ValueError:
            raise AuthenticationFailed("malformed Nonce or Created") from None
        if created_at.tzinfo is None:
            raise AuthenticationFailed("Created has no time zone")
        now = self._now()
        if abs(now - created_at) > DIGEST_FRESHNESS:
            raise AuthenticationFailed(f"Created {created} is more than "
                                       f"{DIGEST_FRESHNESS} from the head-end's clock")
        self._forget_stale_nonces(now)
        if nonce_bytes in self._nonces:
            raise AuthenticationFailed("nonce already used (replay)")
        found = yield self._credentials(name)
        if found is None:
            raise AuthenticationFailed("unknown user")
        if found.disabled:
            raise AuthenticationFailed("user disabled")
        if found.digest_secret is None:
            raise AuthenticationFailed("user has no PasswordDigest secret (added without --digest)")
        password = self._users.open_secret(found.digest_secret)
        if password is None:
            raise AuthenticationFailed("digest secret unreadable with this key file")
        expected = base64.b64encode(hashlib.sha1(
            nonce_bytes + created.encode() + password.encode()).digest()).decode()
        if not hmac.compare_digest(expected, digest.strip()):
            raise AuthenticationFailed("wrong password digest")
        self._nonces[nonce_bytes] = created_at
        if len(self._nonces) > NONCE_CACHE_SIZE:
            self._nonces.popitem(last=False)
        return Principal(found.name, found.roles)

    def _forget_stale_nonces(self, now: datetime) -> None:
        while self._nonces:
            nonce, created_at = next(iter(self._nonces.items()))
            if now - created_at <= DIGEST_FRESHNESS * 2:
                break
            del self._nonces[nonce]


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _HASHER.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


@functools.cache
def _dummy_hash() -> str:
    return _HASHER.hash(secrets.token_urlsafe(16))
