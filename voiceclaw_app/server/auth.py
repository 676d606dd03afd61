"""Who is asking, and from where: the login cookie, the trusted proxy header, Origin
checks, signed audio URLs, and the ``/auth/*`` routes that set the cookie.

No Reflex import: the Reflex side (``states/auth.py``) and the sockets call
:func:`authenticate` with the request's headers. Reflex event handlers cannot set an
HttpOnly cookie, so logging in and out are plain Starlette routes (form posts): the
cookie is ``HttpOnly``, ``SameSite=Lax``, ``Secure`` when the request came over
https (directly or by ``X-Forwarded-Proto``), and holds a random session id.

Origins: a request's ``Origin`` is allowed when it is the app's own (scheme://Host
of the request, which a TLS proxy or tunnel passes through) or is listed in
``VOICECLAW_ALLOWED_ORIGINS``. A request without ``Origin`` (not a browser) is
allowed: browsers always send it on WebSocket upgrades and cross-site posts, which
is what cross-site hijacking needs.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import quote, urlsplit

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from .. import accounts
from ..secrets import derived_key

log = logging.getLogger("voiceclaw.auth")

SESSION_COOKIE = "voiceclaw_session"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")
PROXY_HEADERS = ("x-forwarded-for", "x-forwarded-host", "x-real-ip", "forwarded", "cf-connecting-ip", "true-client-ip")
FIRST_ACCOUNT_HINT = "python -m voiceclaw_app.cli user add NAME --admin --password-stdin"


@dataclass(frozen=True)
class AuthUser:
    id: int
    name: str
    is_admin: bool


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in headers.items()}


def _user(a: accounts.Account | None) -> AuthUser | None:
    return AuthUser(id=a.id, name=a.name, is_admin=a.is_admin) if a is not None else None


# ---------------------------------------------------------------- cookie
def session_token(headers: Mapping[str, str]) -> str:
    """The session cookie's value in a request's ``Cookie`` header ("" if none).

    Split by hand: ``http.cookies`` drops every cookie after one it cannot parse, and
    another app on the same host may set such a cookie."""
    raw = _lower(headers).get("cookie", "")
    for part in raw.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name == SESSION_COOKIE:
            return value.strip().strip('"')
    return ""


def create_login_session(user_id: int) -> str:
    """A new login session's cookie value (the login route; tests and benchmarks)."""
    return accounts.create_session(user_id)


def request_is_https(headers: Mapping[str, str], scheme: str | None = None) -> bool:
    h = _lower(headers)
    proto = h.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return proto == "https" or (scheme or "").lower() in ("https", "wss")


def set_session_cookie(response: Response, token: str, *, secure: bool) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(accounts.session_days() * 86400),
        path="/",
        httponly=True,
        secure=secure,
        samesite="lax",
    )


# ---------------------------------------------------------------- trusted proxy header
def trusted_user_header() -> str:
    """``VOICECLAW_TRUSTED_USER_HEADER`` (off when empty): the header an authenticating
    proxy sets to the logged-in user's name (e.g. ``Tailscale-User-Login``)."""
    return os.environ.get("VOICECLAW_TRUSTED_USER_HEADER", "").strip().lower()


def trusted_proxies() -> list[ipaddress._BaseNetwork]:
    """``VOICECLAW_TRUSTED_PROXIES``: addresses/networks the header is believed from
    (default loopback only: the proxy runs on this host)."""
    raw = os.environ.get("VOICECLAW_TRUSTED_PROXIES", "127.0.0.1,::1")
    nets = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            nets.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            log.warning("VOICECLAW_TRUSTED_PROXIES: %r is not an address or network; ignored", part)
    return nets


def _from_trusted_proxy(client_host: str | None) -> bool:
    if not client_host:
        return False
    try:
        addr = ipaddress.ip_address(client_host)
    except ValueError:
        return False
    return any(addr in net for net in trusted_proxies())


def _authenticate_sync(headers: Mapping[str, str], client_host: str | None) -> AuthUser | None:
    h = _lower(headers)
    header = trusted_user_header()
    if header and _from_trusted_proxy(client_host):
        name = h.get(header, "").strip()
        if name:
            return _user(accounts.find_user(name))
    token = session_token(h)
    if not token:
        return None
    return _user(accounts.session_user(token))


async def authenticate(headers: Mapping[str, str], client_host: str | None) -> AuthUser | None:
    """The logged-in user of an HTTP request or WebSocket upgrade (session cookie, or the
    trusted-header mode when enabled and the request comes from a trusted proxy); None
    when there is none. DB work in a thread."""
    h = _lower(headers)
    if not trusted_user_header() and not session_token(h):
        return None  # no cookie: nothing to look up
    try:
        return await asyncio.to_thread(_authenticate_sync, h, client_host)
    except Exception:
        log.exception("could not check the login session")
        return None


# ---------------------------------------------------------------- origins
def allowed_origins() -> list[str]:
    """``VOICECLAW_ALLOWED_ORIGINS`` (comma-separated ``scheme://host[:port]``), normalized."""
    raw = os.environ.get("VOICECLAW_ALLOWED_ORIGINS", "")
    return [o.strip().rstrip("/").lower() for o in raw.split(",") if o.strip()]


def origin_allowed(headers: Mapping[str, str]) -> bool:
    """The request's Origin is the app's own origin (its Host, or VOICECLAW_ALLOWED_ORIGINS)."""
    h = _lower(headers)
    origin = h.get("origin")
    if origin is None:
        return True  # not a browser: it holds no one's cookie but its own
    origin = origin.strip().rstrip("/").lower()
    if origin in allowed_origins():
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False  # "null" (sandboxed frames, file://) and anything odd
    host = h.get("host", "").strip().lower()
    return bool(host) and parts.netloc == host


# ---------------------------------------------------------------- audio URLs
def _audio_mac(audio_id: str, user_id: int) -> str:
    return hmac.new(derived_key("audio-url"), f"{audio_id}:{user_id}".encode(), hashlib.sha256).hexdigest()[:32]


def sign_audio_url(audio_id: str, user_id: int) -> str:
    """The URL under which the page may fetch a reply's audio: `/audio/<id>.wav?...` with an
    HMAC over (audio id, user id) under the server secret; the route also checks the cookie's
    user is that user. Works on every worker (shared secret), costs no DB write."""
    return f"/audio/{quote(audio_id, safe='')}.wav?u={int(user_id)}&s={_audio_mac(audio_id, user_id)}"


def sign_stored_url(url: str, user_id: int) -> str:
    """:func:`sign_audio_url` for an audio store URL (``/audio/<id>.wav``, as pipeline
    events carry them); any other URL comes back as it is."""
    m = re.fullmatch(r"/audio/([A-Za-z0-9_-]{1,80})\.wav", url or "")
    return sign_audio_url(m.group(1), user_id) if m else url


def audio_url_valid(audio_id: str, user_id: int, query_user: str | None, signature: str | None) -> bool:
    """The URL's signature is right and was made for this (logged-in) user."""
    if query_user is None or signature is None or query_user != str(user_id):
        return False
    return hmac.compare_digest(signature, _audio_mac(audio_id, user_id))


# ---------------------------------------------------------------- first run / exposure
def is_loopback_host(host: str) -> bool:
    h = (host or "").strip().lower()
    if h in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(h.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(host_header: str) -> str:
    h = (host_header or "").strip().lower()
    if h.startswith("["):
        return h[: h.find("]") + 1] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def first_run_allowed(headers: Mapping[str, str], client_host: str | None) -> bool:
    """The web form may create the first (admin) account only when there is none yet,
    and the request is plainly from this machine: a loopback peer, a loopback Host
    (a DNS-rebinding page has its own name there) and no proxy headers (a tunnel or
    proxy on this host connects from loopback too, but adds them)."""
    h = _lower(headers)
    if not client_host or not is_loopback_host(client_host):
        return False
    if not is_loopback_host(_host_name(h.get("host", ""))):
        return False
    if any(p in h for p in PROXY_HEADERS):
        return False
    return not accounts.has_users()


def exposure_problem(host: str) -> str:
    """Why serving on ``host`` must not start (non-loopback with no accounts), else ""."""
    if is_loopback_host(host) or accounts.has_users():
        return ""
    return (
        f"VoiceClaw will not listen on {host} with no accounts: anyone reaching the port could use it. "
        f"Create the first account with `{FIRST_ACCOUNT_HINT}` (type the password, then Ctrl-D), "
        "or listen on 127.0.0.1 (the default)."
    )


def exposure_warning(host: str) -> str:
    if is_loopback_host(host):
        return ""
    return (
        f"Listening on {host} without TLS: passwords and the session cookie cross the network in clear. "
        "Prefer 127.0.0.1 behind a TLS reverse proxy or tunnel (README: Accounts and access)."
    )


# ---------------------------------------------------------------- routes
def _client(request: Request) -> str | None:
    return request.client.host if request.client else None


def _next_path(value: str | None) -> str:
    """Only a local path: never an open redirect to another site."""
    v = (value or "").strip()
    if not v.startswith("/") or v.startswith("//") or "\\" in v or v.startswith("/login"):
        return "/"
    return v


def _login_error(code: str, next_path: str = "/") -> RedirectResponse:
    target = f"/login?error={code}"
    if next_path != "/":
        target += f"&next={quote(next_path, safe='')}"
    return RedirectResponse(target, status_code=303)


async def _form(request: Request) -> dict[str, str]:
    try:
        form = await request.form()
    except Exception:
        return {}
    return {k: str(v) for k, v in form.items() if isinstance(v, str)}


async def login_route(request: Request) -> Response:
    """``POST /auth/login`` (form: username, password, next): sets the cookie and goes to
    ``next``; a failure goes back to ``/login?error=...`` (a code the page turns into words)."""
    if not origin_allowed(request.headers):
        return Response("cross-site request refused", status_code=403)
    form = await _form(request)
    next_path = _next_path(form.get("next"))
    result = await asyncio.to_thread(accounts.check_login, form.get("username", ""), form.get("password", ""), _client(request))
    if result.account is None:
        code = "limited" if result.error.startswith("Too many") else "wrong"
        log.info("failed login for %r from %s (%s)", accounts.normalize_name(form.get("username", ""))[:64], _client(request), code)
        return _login_error(code, next_path)
    token = await asyncio.to_thread(accounts.create_session, result.account.id)
    response = RedirectResponse(next_path, status_code=303)
    set_session_cookie(response, token, secure=request_is_https(request.headers, request.url.scheme))
    return response


async def logout_route(request: Request) -> Response:
    """``POST /auth/logout``: ends the session (in the database, so on every worker)."""
    if not origin_allowed(request.headers):
        return Response("cross-site request refused", status_code=403)
    token = session_token(request.headers)
    if token:
        await asyncio.to_thread(accounts.end_session, token)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax", secure=request_is_https(request.headers, request.url.scheme))
    return response


async def setup_route(request: Request) -> Response:
    """``POST /auth/setup`` (form: username, password): the first admin account, only
    under :func:`first_run_allowed`; then logged in."""
    if not origin_allowed(request.headers):
        return Response("cross-site request refused", status_code=403)
    allowed = await asyncio.to_thread(first_run_allowed, request.headers, _client(request))
    if not allowed:
        return _login_error("setup_refused")
    form = await _form(request)
    try:
        account = await asyncio.to_thread(accounts.add_user, form.get("username", ""), form.get("password", ""), admin=True)
    except accounts.AccountError:
        return _login_error("setup_invalid")
    token = await asyncio.to_thread(accounts.create_session, account.id)
    response = RedirectResponse("/", status_code=303)
    set_session_cookie(response, token, secure=request_is_https(request.headers, request.url.scheme))
    return response


class OriginGuard:
    """ASGI middleware in front of everything the app serves (Reflex's ``/_event``
    socket included): a browser request from a foreign Origin is refused before any
    handler runs, for WebSocket upgrades and for every state-changing method."""

    SAFE_METHODS = ("GET", "HEAD", "OPTIONS")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        kind = scope.get("type")
        if kind in ("http", "websocket"):
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
            guarded = kind == "websocket" or scope.get("method", "GET") not in self.SAFE_METHODS or scope.get("path", "").startswith("/_event")
            if guarded and not origin_allowed(headers):
                log.warning("refused %s %s from origin %r", kind, scope.get("path"), headers.get("origin"))
                if kind == "websocket":
                    await send({"type": "websocket.close", "code": 4003})
                    return
                await Response("cross-site request refused", status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)
