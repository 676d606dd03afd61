"""The login check on the Reflex side.

Two layers, both reading the session cookie of the tab's socket.io connection
(Reflex keeps the upgrade request's headers, cookie included, in
``state.router.headers``; it never sends the cookie to the page):

- :class:`AuthGate`, an app middleware (Reflex 0.10's ``app.add_middleware``: its
  ``preprocess`` runs before every event's handler and may answer instead of it).
  Without a logged-in user, or from a foreign Origin, only Reflex's own events
  (hydrate, on_load dispatch, client storage) and :class:`LoginState`'s run; every
  other event is answered with a redirect to ``/login`` and reaches no handler.
  When the tab's user changes (log out, another person logs in in the same tab,
  which keeps its client token), every VoiceClaw state of the tab is reset first,
  so nothing of the previous user's is hydrated to the next.
- :func:`require_user` in the handlers themselves: they need the user id for the
  repository anyway, and a handler never trusts that a gate ran before it.
"""

from __future__ import annotations

import asyncio
from typing import Any, Mapping

import reflex as rx
from reflex.middleware import Middleware
from reflex.state import StateUpdate
from reflex_base.event import fix_events

from .. import accounts
from ..server.auth import AuthUser, authenticate, first_run_allowed, origin_allowed

LOGIN_ERRORS = {
    "wrong": "Wrong user name or password.",
    "limited": "Too many failed logins. Try again in 15 minutes.",
    "setup_refused": "The first account can only be created on this machine itself (or with the command line).",
    "setup_invalid": "Choose a user name (letters, digits, . _ - @) and a password of at least 8 characters.",
}


def _headers_of(state: Any) -> tuple[Mapping[str, str], str | None]:
    """The socket.io connection's request headers and TCP peer address."""
    headers = dict(state.router.headers.raw_headers or {})
    return headers, headers.get("asgi-scope-client")


async def current_user(state: Any) -> AuthUser | None:
    headers, client = _headers_of(state)
    if not origin_allowed(headers):
        return None
    return await authenticate(headers, client)


async def require_user(state: rx.State) -> AuthUser | None:
    """The logged-in user of this tab's connection; None = the handler must return
    without touching data (the page then redirects to /login)."""
    return await current_user(state)


async def require_admin(state: rx.State) -> AuthUser | None:
    user = await require_user(state)
    return user if user is not None and user.is_admin else None


class AccessState(rx.State):
    """Whose data this tab's states hold (0: nobody's)."""

    _owner: int = 0


class LoginState(rx.State):
    """The login page: the error code of a failed attempt turned into words, and
    whether this machine may create the first account here."""

    error: str = ""
    next_path: str = "/"
    #: no account exists yet and this request is plainly from this machine
    first_run: bool = False
    #: no account exists yet (the page then says how to create one)
    no_accounts: bool = False

    @rx.event
    async def on_load(self):
        params = self.router.url.query_parameters
        self.error = LOGIN_ERRORS.get(str(params.get("error", "")), "")
        nxt = str(params.get("next", "/") or "/")
        self.next_path = nxt if nxt.startswith("/") and not nxt.startswith("//") else "/"
        headers, client = _headers_of(self)
        self.no_accounts = not await asyncio.to_thread(accounts.has_users)
        self.first_run = self.no_accounts and await asyncio.to_thread(first_run_allowed, headers, client)


def _state_path(event_name: str) -> str:
    return event_name.rsplit(".", 1)[0]


class AuthGate(Middleware):
    """Refuses every VoiceClaw event of a tab without a logged-in user (see module doc)."""

    async def preprocess(self, app: Any, state: Any, event: Any) -> StateUpdate | None:
        headers, client = _headers_of(state)
        foreign = not origin_allowed(headers)
        user = None if foreign else await authenticate(headers, client)
        access = await state.get_state(AccessState)
        owner = user.id if user is not None else 0
        if access._owner != owner:
            await _reset_app_states(state)
            access._owner = owner
        if foreign:
            return StateUpdate(delta={}, events=[])
        if user is not None or self._open(event.name):
            return None
        token = state.router.session.client_token
        return StateUpdate(delta={}, events=fix_events([rx.redirect("/login")], token))

    @staticmethod
    def _open(event_name: str) -> bool:
        """Reflex's own events (hydration, on_load dispatch, client storage) and the login page's."""
        path = _state_path(event_name)
        last = path.rsplit(".", 1)[-1]
        return last.startswith("reflex___") or path == LoginState.get_full_name()


async def _reset_app_states(root: Any) -> None:
    """Every VoiceClaw state of the tab back to its defaults."""
    for cls in _app_state_classes(type(root)):
        sub = await root.get_state(cls)
        sub.reset()


def _app_state_classes(cls: Any) -> list[Any]:
    out = []
    for sub in cls.get_substates():
        if sub.__module__.startswith("voiceclaw_app.") and sub is not AccessState:
            out.append(sub)
        out.extend(_app_state_classes(sub))
    return out
