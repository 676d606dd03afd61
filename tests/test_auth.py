"""Accounts, login sessions, the failed-login limit, Origin rules, signed audio URLs,
per-user data, and keys that never follow a changed address."""

from __future__ import annotations

import time

import pytest

import voiceclaw_app.states.chat  # noqa: F401  Reflex state classes are defined at collection (a later
import voiceclaw_app.states.history  # noqa: F401  first import inside an async test's context lacks
import voiceclaw_app.states.settings  # noqa: F401  Reflex's registration context)
from voiceclaw_app.config import VoiceSettings


@pytest.fixture()
def db(tmp_path, monkeypatch):
    monkeypatch.setenv("VOICECLAW_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("VOICECLAW_DATABASE_URL", f"sqlite:///{tmp_path / 'auth.db'}")
    monkeypatch.delenv("VOICECLAW_TRUSTED_USER_HEADER", raising=False)
    monkeypatch.delenv("VOICECLAW_ALLOWED_ORIGINS", raising=False)
    from voiceclaw_app import accounts
    from voiceclaw_app.db import repo

    repo.create_all()
    return accounts, repo


# ---------------------------------------------------------------- accounts
def test_the_first_account_is_an_admin_and_claims_the_history_from_before_accounts(db):
    accounts, repo = db
    from sqlmodel import Session

    from voiceclaw_app.db.engine import get_engine
    from voiceclaw_app.db.models import Conversation

    with Session(get_engine()) as s:  # a row from before the migration: no owner
        s.add(Conversation(id="old-conversation-1", title="Before accounts"))
        s.commit()
    first = accounts.add_user("Carl", "correct horse battery")
    assert first.is_admin and first.name == "carl"  # names are case-insensitive
    assert [c["id"] for c in repo.list_conversations(first.id)] == ["old-conversation-1"]
    second = accounts.add_user("dana", "another password")
    assert not second.is_admin
    assert repo.list_conversations(second.id) == []
    with pytest.raises(accounts.AccountError, match="exists"):
        accounts.add_user("CARL", "whatever password")
    with pytest.raises(accounts.AccountError, match="8 characters"):
        accounts.add_user("eve", "short")
    with pytest.raises(accounts.AccountError, match="user name"):
        accounts.add_user("../etc", "long enough password")


def test_passwords_are_argon2_hashes_and_passwd_ends_the_sessions(db):
    accounts, _ = db
    from sqlmodel import Session, select

    from voiceclaw_app.db.engine import get_engine
    from voiceclaw_app.db.models import LoginSession, User

    a = accounts.add_user("carl", "correct horse battery")
    with Session(get_engine()) as s:
        u = s.exec(select(User)).one()
    assert u.password_hash.startswith("$argon2id$") and "correct horse" not in u.password_hash
    assert accounts.check_login("carl", "correct horse battery", "10.0.0.1").account == a
    token = accounts.create_session(a.id)
    with Session(get_engine()) as s:  # only the digest is stored
        assert token not in [r.id for r in s.exec(select(LoginSession)).all()]
    assert accounts.session_user(token) == a
    accounts.set_password("carl", "a new long password")
    assert accounts.session_user(token) is None
    assert accounts.check_login("carl", "correct horse battery", "10.0.0.1").account is None
    assert accounts.check_login("carl", "a new long password", "10.0.0.1").account == a


def test_sessions_expire_and_logout_ends_them(db, monkeypatch):
    accounts, _ = db
    a = accounts.add_user("carl", "correct horse battery")
    token = accounts.create_session(a.id)
    accounts.end_session(token)
    assert accounts.session_user(token) is None
    monkeypatch.setenv("VOICECLAW_SESSION_DAYS", "0.05")  # 72 minutes
    token = accounts.create_session(a.id)
    assert accounts.session_user(token) == a
    real = time.time
    monkeypatch.setattr(accounts.time, "time", lambda: real() + 73 * 60)
    assert accounts.session_user(token) is None
    assert accounts.session_user("") is None and accounts.session_user("x" * 500) is None


def test_failed_logins_are_limited_per_user_and_per_address(db):
    accounts, _ = db
    accounts.add_user("carl", "correct horse battery")
    accounts.add_user("dana", "another password")
    for i in range(accounts.MAX_FAILURES_PER_USER):
        r = accounts.check_login("carl", f"guess {i}", f"10.0.0.{i}")
        assert r.account is None and r.error == "Wrong user name or password."
    # locked: even the right password is refused now, and says why
    r = accounts.check_login("carl", "correct horse battery", "10.9.9.9")
    assert r.account is None and r.error.startswith("Too many failed logins for this user")
    # another user is not locked by carl's failures
    assert accounts.check_login("dana", "another password", "10.9.9.9").account is not None
    # per address: one address trying many names
    for i in range(accounts.MAX_FAILURES_PER_ADDRESS):
        accounts.check_login(f"name{i}", "nope nope nope", "10.1.1.1")
    r = accounts.check_login("dana", "another password", "10.1.1.1")
    assert r.account is None and "from this address" in r.error
    assert accounts.check_login("dana", "another password", "10.2.2.2").account is not None


def test_failed_logins_expire_after_the_window(db, monkeypatch):
    accounts, _ = db
    accounts.add_user("carl", "correct horse battery")
    for i in range(accounts.MAX_FAILURES_PER_USER):
        accounts.check_login("carl", "wrong password", "10.0.0.1")
    assert accounts.check_login("carl", "correct horse battery", "10.0.0.1").account is None
    real = time.time
    monkeypatch.setattr(accounts.time, "time", lambda: real() + accounts.FAILURE_WINDOW_S + 1)
    assert accounts.check_login("carl", "correct horse battery", "10.0.0.1").account is not None


def test_the_last_admin_cannot_be_removed_and_removal_takes_the_users_data(db):
    accounts, repo = db
    admin = accounts.add_user("carl", "correct horse battery", admin=True)
    user = accounts.add_user("dana", "another password")
    with pytest.raises(accounts.AccountError, match="only admin"):
        accounts.remove_user("carl")
    conv = repo.create_conversation(user.id)
    msg = repo.start_assistant_message(user.id, conv.id, spoken=True)
    repo.update_assistant_message(user.id, msg.id, "hi", ["aaaaaaaaaa"], finished=True)
    token = accounts.create_session(user.id)
    removed, audio = accounts.remove_user("dana")
    assert removed == user and audio == ["aaaaaaaaaa"]
    assert accounts.session_user(token) is None and accounts.find_user("dana") is None
    assert repo.get_conversation(user.id, conv.id) is None
    assert [u.name for u in accounts.list_users()] == [admin.name]


# ---------------------------------------------------------------- per-user data
def test_a_user_reaches_only_their_own_conversations_messages_and_timings(db):
    accounts, repo = db
    from voiceclaw_app.pipeline.timing import TurnMarks

    a = accounts.add_user("carl", "correct horse battery")
    b = accounts.add_user("dana", "another password")
    conv = repo.create_conversation(a.id)
    repo.add_user_message(a.id, conv.id, "my secret plans")
    reply = repo.start_assistant_message(a.id, conv.id, spoken=False)
    repo.update_assistant_message(a.id, reply.id, "noted", finished=True)
    tid = repo.save_timing(a.id, conv.id, reply.id, TurnMarks(stt_final=0.0, turn_done=10.0), spoken_input=False)
    # b sees none of it, by listing, by search or by id
    assert repo.list_conversations(b.id) == [] and repo.list_conversations(b.id, "secret") == []
    assert repo.get_conversation(b.id, conv.id) is None
    assert repo.list_messages(b.id, conv.id) == [] and repo.get_message(b.id, reply.id) is None
    assert repo.timings_for(b.id, conv.id) == [] and repo.recent_history(b.id, conv.id, 5) == []
    assert repo.latency_summary(b.id)["turn_done"]["n"] == 0 and repo.count_turns(b.id) == 0
    with pytest.raises(repo.NotFound):
        repo.export_conversation(b.id, conv.id)
    # and cannot write into it or change it
    with pytest.raises(repo.NotFound):
        repo.add_user_message(b.id, conv.id, "injected")
    with pytest.raises(repo.NotFound):
        repo.ensure_conversation(b.id, conv.id)
    repo.update_assistant_message(b.id, reply.id, "overwritten", finished=True)
    repo.set_first_audio_playing(b.id, tid, 5.0)
    assert repo.delete_conversation(b.id, conv.id) == [] and repo.delete_all_conversations(b.id) == []
    # a's data is untouched
    msgs = repo.list_messages(a.id, conv.id)
    assert [m["content"] for m in msgs] == ["my secret plans", "noted"]
    assert repo.timings_for(a.id, conv.id)[0]["first_audio_playing"] is None
    assert repo.get_message(a.id, reply.id)["content"] == "noted"


def test_voice_preferences_are_per_user_over_the_global_settings(db):
    accounts, repo = db
    a = accounts.add_user("carl", "correct horse battery")
    b = accounts.add_user("dana", "another password")
    repo.save_settings(VoiceSettings(assistant_name="Nova", tts_speed=1.0))
    repo.save_user_prefs(b.id, repo.load_settings(b.id).replace(tts_speed=1.5, input_mode="push_to_talk", assistant_name="Hacked"))
    assert repo.load_settings(b.id).tts_speed == 1.5 and repo.load_settings(b.id).input_mode == "push_to_talk"
    # only preference fields are per user: the admin's fields stay global
    assert repo.load_settings(b.id).assistant_name == "Nova"
    assert repo.load_settings(a.id).tts_speed == 1.0 and repo.load_settings().tts_speed == 1.0


# ---------------------------------------------------------------- HTTP-level rules
def test_origin_rules():
    from voiceclaw_app.server.auth import origin_allowed

    host = {"host": "127.0.0.1:3000"}
    assert origin_allowed(host)  # no Origin: not a browser
    assert origin_allowed({**host, "origin": "http://127.0.0.1:3000"})
    assert not origin_allowed({**host, "origin": "http://evil.example"})
    assert not origin_allowed({**host, "origin": "http://127.0.0.1:3001"})  # another port is another origin
    assert not origin_allowed({**host, "origin": "null"})
    assert origin_allowed({"host": "voice.example.org", "origin": "https://voice.example.org"})  # through a TLS proxy


def test_allowed_origins_are_configurable(monkeypatch):
    from voiceclaw_app.server.auth import origin_allowed

    monkeypatch.setenv("VOICECLAW_ALLOWED_ORIGINS", "https://voice.example.org, https://other.example/")
    assert origin_allowed({"host": "127.0.0.1:3000", "origin": "https://voice.example.org"})
    assert origin_allowed({"host": "127.0.0.1:3000", "origin": "https://other.example"})
    assert not origin_allowed({"host": "127.0.0.1:3000", "origin": "https://evil.example"})


def test_the_session_cookie_is_found_among_other_cookies():
    from voiceclaw_app.server.auth import SESSION_COOKIE, session_token

    assert session_token({"Cookie": f"a=1; {SESSION_COOKIE}=abc-DEF_123; b=2"}) == "abc-DEF_123"
    assert session_token({"cookie": 'bad"cookie; ' + f"{SESSION_COOKIE}=tok"}) == "tok"
    assert session_token({}) == ""


def test_audio_urls_are_signed_for_one_user(db, monkeypatch):
    from urllib.parse import parse_qs, urlsplit

    from voiceclaw_app.server.auth import audio_url_valid, sign_audio_url

    url = sign_audio_url("abcdef1234", 7)
    q = parse_qs(urlsplit(url).query)
    assert urlsplit(url).path == "/audio/abcdef1234.wav"
    assert audio_url_valid("abcdef1234", 7, q["u"][0], q["s"][0])
    assert not audio_url_valid("abcdef1234", 8, q["u"][0], q["s"][0])  # another user's cookie
    assert not audio_url_valid("abcdef1234", 8, "8", q["s"][0])  # the user edited
    assert not audio_url_valid("abcdef9999", 7, q["u"][0], q["s"][0])  # another file
    assert not audio_url_valid("abcdef1234", 7, None, None)
    monkeypatch.setenv("VOICECLAW_SECRET", "another server secret")
    assert not audio_url_valid("abcdef1234", 7, q["u"][0], q["s"][0])


async def test_trusted_header_mode_is_off_by_default_and_only_believes_trusted_proxies(db, monkeypatch):
    accounts, _ = db
    from voiceclaw_app.server.auth import authenticate

    a = accounts.add_user("carl@example.org", "correct horse battery")
    hdr = {"x-forwarded-user": "carl@example.org"}
    assert await authenticate(hdr, "127.0.0.1") is None  # off by default
    monkeypatch.setenv("VOICECLAW_TRUSTED_USER_HEADER", "X-Forwarded-User")
    monkeypatch.setenv("VOICECLAW_TRUSTED_PROXIES", "127.0.0.1, 10.0.0.0/8")
    user = await authenticate(hdr, "127.0.0.1")
    assert user is not None and user.id == a.id
    assert (await authenticate(hdr, "10.3.4.5")).id == a.id
    assert await authenticate(hdr, "192.168.1.9") is None  # not a trusted proxy: header ignored
    assert await authenticate({"x-forwarded-user": "nobody"}, "127.0.0.1") is None  # no such account


def test_first_run_and_exposure_rules(db):
    accounts, _ = db
    from voiceclaw_app.server.auth import exposure_problem, exposure_warning, first_run_allowed

    local = {"host": "127.0.0.1:3000"}
    assert first_run_allowed(local, "127.0.0.1")
    assert first_run_allowed({"host": "localhost:3000"}, "::1")
    assert not first_run_allowed(local, "192.168.1.20")  # another machine
    assert not first_run_allowed({"host": "voice.example.org"}, "127.0.0.1")  # a tunnel or DNS rebinding
    assert not first_run_allowed({**local, "x-forwarded-for": "203.0.113.9"}, "127.0.0.1")  # a proxy on this host
    assert "user add" in exposure_problem("0.0.0.0") and exposure_problem("127.0.0.1") == ""
    assert "TLS" in exposure_warning("0.0.0.0") and exposure_warning("localhost") == ""
    accounts.add_user("carl", "correct horse battery")
    assert not first_run_allowed(local, "127.0.0.1")  # only the first account
    assert exposure_problem("0.0.0.0") == ""


# ---------------------------------------------------------------- keys follow no URL
def test_keys_are_bound_to_the_address_they_were_saved_for(db):
    from voiceclaw_app.providers.factory import key_targets
    from voiceclaw_app.secrets import KeyStore

    store = KeyStore()
    store.set("llm_api_key", "sk-gateway", "http://Gateway:18789/v1/")
    keys = store.load()
    assert keys.bound_to("llm_api_key", "http://gateway:18789/v1")
    assert keys.only_for(key_targets(VoiceSettings(llm_base_url="http://gateway:18789/v1"))).llm_api_key == "sk-gateway"
    assert keys.only_for(key_targets(VoiceSettings(llm_base_url="http://attacker.example/v1"))).llm_api_key == ""


def test_keys_stored_before_binding_are_bound_to_the_saved_address_once(db):
    import json

    from voiceclaw_app.secrets import KeyStore, _fernet

    store = KeyStore()
    store.path.write_bytes(_fernet(store.root).encrypt(json.dumps({"llm_api_key": "sk-old"}).encode()))
    assert store.load().only_for({"llm_api_key": "http://gw/v1"}).llm_api_key == ""  # unbound: sent nowhere
    assert store.bind_legacy({"llm_api_key": "http://gw/v1"}) == 1
    assert store.load().only_for({"llm_api_key": "http://gw/v1"}).llm_api_key == "sk-old"
    assert store.bind_legacy({"llm_api_key": "http://elsewhere/v1"}) == 0  # once only


async def test_changing_the_llm_url_never_sends_the_stored_key_to_the_new_url(db):
    """The attack from the issue: save another llm_base_url, press "Test LLM" and start a
    turn. A catcher server records every Authorization header that reaches it."""
    from tests.servers.openai_chat import FakeChatServer
    from voiceclaw_app.pipeline.diagnostics import check_llm
    from voiceclaw_app.providers import factory
    from voiceclaw_app.providers.base import CancelToken, ChatMessage, LLMRequest
    from voiceclaw_app.states import services
    from voiceclaw_app.states.settings import _test_provider, key_status

    accounts, repo = db
    async with FakeChatServer(api_key="sk-stored-gateway-token") as gateway, FakeChatServer() as catcher:
        services.key_store().set("llm_api_key", "sk-stored-gateway-token", gateway.base_url)
        repo.save_settings(VoiceSettings(llm_base_url=gateway.base_url, llm_model_voice="m"))
        assert key_status(services.key_store().load(), repo.load_settings())["llm_api_key"] == "set"
        # the address is changed and SAVED (an admin's mistake, or a stolen session)
        changed = VoiceSettings(llm_base_url=catcher.base_url, llm_model_voice="m")
        repo.save_settings(changed)
        assert key_status(services.key_store().load(), repo.load_settings())["llm_api_key"] == "saved for another address"
        result = await _test_provider("llm", repo.load_settings())
        assert result.startswith("Not tested") and "enter the key again" in result
        # whoever builds a client for the new address gets no key: a diagnostic and a turn
        llm = factory.build_llm(repo.load_settings(), services.key_store().load())
        await check_llm(llm, "m", timeout_s=5)
        async for _ in llm.stream(LLMRequest(messages=[ChatMessage(role="user", content="hi")], model="m"), CancelToken()):
            pass
        assert catcher.requests, "the catcher saw no request: the test proves nothing"
        assert all("sk-stored" not in (r.headers.get("authorization") or "") for r in catcher.requests)
        # the key entered again for the new address goes there (and only there)
        services.key_store().set("llm_api_key", "sk-for-the-new-one", catcher.base_url)
        llm = factory.build_llm(repo.load_settings(), services.key_store().load())
        await check_llm(llm, "m", timeout_s=5)
        assert catcher.requests[-1].headers.get("authorization") == "Bearer sk-for-the-new-one"


# ---------------------------------------------------------------- the /auth routes (real HTTP through Starlette)
def _auth_app():
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.routing import Route

    from voiceclaw_app.server import auth

    return Starlette(
        routes=[
            Route("/auth/login", auth.login_route, methods=["POST"]),
            Route("/auth/logout", auth.logout_route, methods=["POST"]),
            Route("/auth/setup", auth.setup_route, methods=["POST"]),
        ],
        middleware=[Middleware(auth.OriginGuard)],
    )


def _client(host: str = "127.0.0.1", base: str = "http://127.0.0.1:3000"):
    from starlette.testclient import TestClient

    return TestClient(_auth_app(), base_url=base, client=(host, 50000), follow_redirects=False)


def test_login_route_sets_an_httponly_cookie_and_refuses_foreign_origins(db):
    accounts, _ = db
    from voiceclaw_app.server.auth import SESSION_COOKIE

    accounts.add_user("carl", "correct horse battery")
    c = _client()
    r = c.post("/auth/login", data={"username": "carl", "password": "nope nope", "next": "/history"}, headers={"Origin": "http://127.0.0.1:3000"})
    assert r.status_code == 303 and r.headers["location"] == "/login?error=wrong&next=%2Fhistory" and SESSION_COOKIE not in r.headers.get("set-cookie", "")
    r = c.post("/auth/login", data={"username": "carl", "password": "correct horse battery", "next": "//evil.example/x"}, headers={"Origin": "http://127.0.0.1:3000"})
    assert r.status_code == 303 and r.headers["location"] == "/"  # never an open redirect
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "secure" not in cookie
    # behind a TLS proxy the cookie is Secure
    r = c.post("/auth/login", data={"username": "carl", "password": "correct horse battery"}, headers={"X-Forwarded-Proto": "https"})
    assert "secure" in r.headers["set-cookie"].lower()
    # a foreign page cannot log the browser in (login CSRF) nor out
    r = c.post("/auth/login", data={"username": "carl", "password": "correct horse battery"}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "set-cookie" not in r.headers
    token = r.cookies.get(SESSION_COOKIE) or c.post("/auth/login", data={"username": "carl", "password": "correct horse battery"}).cookies[SESSION_COOKIE]
    assert accounts.session_user(token) is not None
    r = c.post("/auth/logout", headers={"Origin": "http://evil.example", "Cookie": f"{SESSION_COOKIE}={token}"})
    assert r.status_code == 403 and accounts.session_user(token) is not None
    r = c.post("/auth/logout", headers={"Cookie": f"{SESSION_COOKIE}={token}"})
    assert r.status_code == 303 and r.headers["location"] == "/login" and accounts.session_user(token) is None


def test_the_first_account_form_works_only_from_this_machine_and_only_once(db):
    accounts, _ = db
    form = {"username": "carl", "password": "correct horse battery"}
    r = _client(host="203.0.113.7").post("/auth/setup", data=form)  # another machine
    assert r.status_code == 303 and "error=setup_refused" in r.headers["location"] and not accounts.has_users()
    r = _client(base="http://voice.example.org").post("/auth/setup", data=form)  # a tunnel: public Host
    assert "error=setup_refused" in r.headers["location"] and not accounts.has_users()
    r = _client().post("/auth/setup", data=form, headers={"X-Forwarded-For": "203.0.113.7"})  # a proxy on this host
    assert "error=setup_refused" in r.headers["location"] and not accounts.has_users()
    r = _client().post("/auth/setup", data=form)
    assert r.status_code == 303 and r.headers["location"] == "/" and "httponly" in r.headers["set-cookie"].lower()
    assert [(u.name, u.is_admin) for u in accounts.list_users()] == [("carl", True)]
    r = _client().post("/auth/setup", data={"username": "mallory", "password": "correct horse battery"})
    assert "error=setup_refused" in r.headers["location"] and accounts.find_user("mallory") is None


def test_passwd_lifts_a_lockout(db):
    accounts, _ = db
    accounts.add_user("carl", "correct horse battery")
    for _ in range(accounts.MAX_FAILURES_PER_USER):
        accounts.check_login("carl", "wrong password", "10.0.0.1")
    assert accounts.check_login("carl", "correct horse battery", "10.0.0.2").account is None
    accounts.set_password("carl", "correct horse battery 2")
    assert accounts.check_login("carl", "correct horse battery 2", "10.0.0.2").account is not None


def test_the_gate_lets_only_reflex_own_events_and_the_login_page_through():
    import reflex as rx

    from voiceclaw_app.states.auth import AuthGate, LoginState
    from voiceclaw_app.states.chat import ChatState
    from voiceclaw_app.states.history import HistoryState
    from voiceclaw_app.states.settings import SettingsState

    root = rx.State.get_full_name()
    assert AuthGate._open(f"{root}.hydrate") and AuthGate._open(f"{root}.hydrate_and_load")
    assert AuthGate._open(f"{root}.reflex___state____on_load_internal_state.on_load_internal")
    assert AuthGate._open(f"{LoginState.get_full_name()}.on_load")
    for cls, handler in ((ChatState, "on_load"), (ChatState, "send_text"), (HistoryState, "delete_all"), (SettingsState, "save"), (SettingsState, "clear_key")):
        assert not AuthGate._open(f"{cls.get_full_name()}.{handler}")


async def test_the_app_refuses_to_start_beyond_loopback_with_no_account(db, monkeypatch):
    import reflex as rx

    from voiceclaw_app.voiceclaw_app import refuse_unprotected_start

    accounts, _ = db
    config = rx.config.get_config()
    monkeypatch.setattr(config, "backend_host", "0.0.0.0")
    with pytest.raises(RuntimeError, match="user add NAME --admin"):
        async with refuse_unprotected_start():
            pass
    accounts.add_user("carl", "correct horse battery")
    async with refuse_unprotected_start():  # an account exists: starts (with a TLS warning)
        pass
