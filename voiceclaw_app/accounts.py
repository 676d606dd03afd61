"""Accounts: users, password hashes, login sessions and the failed-login limit.

Plain Python over the database (no Reflex, no HTTP): the CLI, the login routes and
the guards all come here. Synchronous; async callers use ``asyncio.to_thread``.

- Passwords are hashed with argon2id (``argon2-cffi``'s ``PasswordHasher``) at
  OWASP's recommended minimum cost (19 MiB, 2 passes, 1 lane): the library's default
  (64 MiB, 3 passes, 4 lanes) took 1.4-1.9 s per login on this 2-core machine under
  load, a denial-of-service lever on a small box. Hashes are rehashed on login when
  the cost changes.
- A login session is a random 32-byte cookie value; the database keeps only its
  SHA-256, so a copy of the database holds no usable cookie. Sessions last
  ``VOICECLAW_SESSION_DAYS`` (default 30); logout and ``user passwd`` end them.
- Failed logins are counted in the database (``vc_login_failure``), per user name
  and per client address, so every worker process sees the same count and a
  restart does not reset it.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, func
from sqlmodel import Session, col, select

from .db import repo
from .db.engine import get_engine
from .db.models import Conversation, LoginFailure, LoginSession, User

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,63}$")
MIN_PASSWORD = 8
#: failed logins allowed per user name / per client address within the window
MAX_FAILURES_PER_USER = 5
MAX_FAILURES_PER_ADDRESS = 20
FAILURE_WINDOW_S = 15 * 60

_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
#: verified against when the user does not exist, so both cases take the same time
_DUMMY_HASH = _hasher.hash("not a password of anyone")


class AccountError(ValueError):
    """A request about accounts that cannot be done; the message says why, in plain words."""


@dataclass(frozen=True)
class Account:
    id: int
    name: str
    is_admin: bool


@dataclass(frozen=True)
class LoginResult:
    account: Account | None
    #: shown to the person when account is None
    error: str = ""


def _session() -> Session:
    return Session(get_engine(), expire_on_commit=False)


def normalize_name(name: str) -> str:
    return (name or "").strip().lower()


def check_name(name: str) -> str:
    n = normalize_name(name)
    if not NAME_RE.match(n):
        raise AccountError("A user name is 1-64 characters: letters, digits, '.', '_', '-' or '@', starting with a letter or digit.")
    return n


def check_password(password: str) -> str:
    if len(password or "") < MIN_PASSWORD:
        raise AccountError(f"A password needs at least {MIN_PASSWORD} characters.")
    if len(password) > 1024:
        raise AccountError("That password is too long (1024 characters at most).")
    return password


def _account(u: User) -> Account:
    return Account(id=int(u.id or 0), name=u.name, is_admin=bool(u.is_admin))


# ---------------------------------------------------------------- users
def count_users() -> int:
    with _session() as s:
        return int(s.exec(select(func.count()).select_from(User)).one())


def has_users() -> bool:
    """False also when the table is missing (before the first migration)."""
    try:
        return count_users() > 0
    except Exception:
        return False


def add_user(name: str, password: str, *, admin: bool = False) -> Account:
    """Create an account. The first account is always an admin (someone must be able to
    configure the providers); the first admin claims the conversations from before
    accounts existed."""
    n = check_name(name)
    check_password(password)
    digest = _hasher.hash(password)
    with _session() as s:
        if s.exec(select(User).where(User.name == n)).first() is not None:
            raise AccountError(f"A user named {n!r} exists already.")
        first = int(s.exec(select(func.count()).select_from(User)).one()) == 0
        first_admin = s.exec(select(User).where(User.is_admin == True)).first() is None  # noqa: E712
        user = User(name=n, password_hash=digest, is_admin=bool(admin or first))
        s.add(user)
        s.commit()
        account = _account(user)
    if account.is_admin and first_admin:
        repo.claim_unowned_conversations(account.id)
    return account


def list_users() -> list[Account]:
    with _session() as s:
        return [_account(u) for u in s.exec(select(User).order_by(col(User.name))).all()]


def get_user(user_id: int) -> Account | None:
    with _session() as s:
        u = s.get(User, user_id)
        return _account(u) if u is not None else None


def find_user(name: str) -> Account | None:
    with _session() as s:
        u = s.exec(select(User).where(User.name == normalize_name(name))).first()
        return _account(u) if u is not None else None


def set_password(name: str, password: str) -> Account:
    """Change a password; every login session of that user ends and their failed-login
    count is cleared (the way out of a lockout)."""
    check_password(password)
    digest = _hasher.hash(password)
    with _session() as s:
        u = s.exec(select(User).where(User.name == normalize_name(name))).first()
        if u is None:
            raise AccountError(f"No user named {normalize_name(name)!r}.")
        u.password_hash = digest
        s.add(u)
        s.exec(delete(LoginSession).where(col(LoginSession.user_id) == u.id))
        s.exec(delete(LoginFailure).where(LoginFailure.key == f"user:{u.name}"))
        s.commit()
        return _account(u)


def remove_user(name: str) -> tuple[Account, list[str]]:
    """Delete an account with its sessions and conversations; returns the account and
    the audio ids of its conversations (the caller deletes the files). The last admin
    cannot be removed: nobody could configure the providers any more."""
    n = normalize_name(name)
    with _session() as s:
        u = s.exec(select(User).where(User.name == n)).first()
        if u is None:
            raise AccountError(f"No user named {n!r}.")
        if u.is_admin:
            admins = int(s.exec(select(func.count()).select_from(User).where(User.is_admin == True)).one())  # noqa: E712
            if admins <= 1:
                raise AccountError(f"{n!r} is the only admin: make another admin first (user add NAME --admin).")
        account = _account(u)
    audio = repo.delete_all_conversations(account.id)
    with _session() as s:
        s.exec(delete(LoginSession).where(col(LoginSession.user_id) == account.id))
        s.exec(delete(User).where(col(User.id) == account.id))
        s.commit()
    return account, audio


def conversation_count(user_id: int) -> int:
    with _session() as s:
        return int(s.exec(select(func.count()).select_from(Conversation).where(Conversation.user_id == user_id)).one())


# ---------------------------------------------------------------- login
def _failures(s: Session, key: str, since: float) -> int:
    q = select(func.count()).select_from(LoginFailure).where(LoginFailure.key == key).where(col(LoginFailure.at) >= since)
    return int(s.exec(q).one())


def _limited(s: Session, name: str, address: str | None, now: float) -> str:
    since = now - FAILURE_WINDOW_S
    minutes = FAILURE_WINDOW_S // 60
    if _failures(s, f"user:{name}", since) >= MAX_FAILURES_PER_USER:
        return f"Too many failed logins for this user. Try again in {minutes} minutes."
    if address and _failures(s, f"addr:{address}", since) >= MAX_FAILURES_PER_ADDRESS:
        return f"Too many failed logins from this address. Try again in {minutes} minutes."
    return ""


def check_login(name: str, password: str, address: str | None) -> LoginResult:
    """Verify a name and password under the failed-login limit.

    The limit is checked before the password, so a locked name does not even tell
    whether a guess was right. Unknown names cost the same time as wrong passwords."""
    n = normalize_name(name)
    now = time.time()
    with _session() as s:
        s.exec(delete(LoginFailure).where(col(LoginFailure.at) < now - FAILURE_WINDOW_S))
        s.commit()
        limited = _limited(s, n, address, now)
        if limited:
            return LoginResult(None, limited)
        u = s.exec(select(User).where(User.name == n)).first() if n else None
        ok = False
        try:
            ok = _hasher.verify(u.password_hash if u is not None else _DUMMY_HASH, password or "") and u is not None
        except (VerificationError, InvalidHashError):
            ok = False
        if not ok:
            s.add(LoginFailure(key=f"user:{n}", at=now))
            if address:
                s.add(LoginFailure(key=f"addr:{address}", at=now))
            s.commit()
            return LoginResult(None, "Wrong user name or password.")
        assert u is not None
        if _hasher.check_needs_rehash(u.password_hash):
            u.password_hash = _hasher.hash(password)
            s.add(u)
        s.exec(delete(LoginFailure).where(LoginFailure.key == f"user:{n}"))
        s.commit()
        return LoginResult(_account(u))


def session_days() -> float:
    try:
        return max(1 / 24, float(os.environ.get("VOICECLAW_SESSION_DAYS", "30")))
    except ValueError:
        return 30.0


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_session(user_id: int) -> str:
    """A new login session for the user; returns the cookie value (shown once, stored hashed)."""
    token = secrets.token_urlsafe(32)
    now = time.time()
    with _session() as s:
        s.exec(delete(LoginSession).where(col(LoginSession.expires_at) < now))
        s.add(LoginSession(id=_digest(token), user_id=user_id, created_at=now, expires_at=now + session_days() * 86400))
        s.commit()
    return token


def session_user(token: str) -> Account | None:
    """The account of a live session cookie, else None."""
    if not token or len(token) > 200:
        return None
    with _session() as s:
        row = s.get(LoginSession, _digest(token))
        if row is None or row.expires_at < time.time():
            return None
        u = s.get(User, row.user_id)
        return _account(u) if u is not None else None


def end_session(token: str) -> None:
    if not token:
        return
    with _session() as s:
        s.exec(delete(LoginSession).where(col(LoginSession.id) == _digest(token)))
        s.commit()
