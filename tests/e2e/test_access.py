"""A stranger reaching the port gets a login page and nothing else: the login form,
both sockets and audio, tried with no session, with a foreign Origin, and as a
second account."""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import pytest

from .conftest import ADMIN, OTHER, login, screenshot

pytestmark = pytest.mark.e2e


def test_login_form_wrong_password_then_right_one(app_server, launch_anonymous):
    base, _, _ = app_server
    page = launch_anonymous().new_page()
    page.goto(base + "/")
    page.wait_for_url("**/login**", timeout=30000)  # a logged-out browser is sent to /login
    login(page, base, type(ADMIN)(ADMIN.name, "not-the-password"))
    page.wait_for_selector("#login-error", timeout=15000)
    assert "Wrong user name or password" in page.text_content("#login-error")
    screenshot(page, "login-error")
    login(page, base, ADMIN)
    page.wait_for_selector("#voice-status", timeout=30000)
    assert page.url.rstrip("/") == base
    cookie = next(c for c in page.context.cookies() if c["name"] == "voiceclaw_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    assert page.evaluate("document.cookie").find("voiceclaw_session") == -1  # page scripts cannot read it
    page.click("#logout-button")
    page.wait_for_url("**/login**", timeout=15000)
    page.goto(base + "/history")
    page.wait_for_url("**/login**", timeout=30000)


def test_a_logged_out_browser_sees_only_login_and_cannot_fetch_audio(app_server, launch_browser, launch_anonymous):
    base, _, _ = app_server
    admin = launch_browser().new_page()
    admin.goto(base + "/settings")
    admin.wait_for_function("document.querySelector('#tts_parallel') && document.querySelector('#tts_parallel').value !== ''", timeout=30000)
    admin.click("#preview-voice")
    admin.wait_for_selector("#preview-audio", timeout=60000)
    src = admin.get_attribute("#preview-audio", "src")
    assert src and src.startswith("/audio/") and "&s=" in src
    assert admin.request.get(base + src).status == 200  # the owner can
    stranger = launch_anonymous().new_page()
    assert stranger.request.get(base + src).status == 401
    bare = src.split("?", 1)[0]
    assert stranger.request.get(base + bare).status == 401
    for path in ("/", "/settings", "/history"):
        stranger.goto(base + path)
        stranger.wait_for_url("**/login**", timeout=30000)
        stranger.wait_for_selector("#login-username")
    other = launch_browser(user=OTHER).new_page()
    assert other.request.get(base + src).status == 404  # another account: not found
    assert other.request.get(base + bare).status == 404


def test_two_accounts_do_not_see_each_others_conversations(app_server, launch_browser):
    base, _, _ = app_server
    secret = f"pineapple-{uuid.uuid4().hex[:6]}"
    admin = launch_browser().new_page()
    admin.goto(base + "/")
    admin.wait_for_selector("#text-input", timeout=60000)
    admin.wait_for_function("window.__voiceclawMicMounted === true", timeout=30000)  # hydrated (the voice socket opens with the first typed message)
    admin.fill("#text-input", f"Remember the word {secret}")
    admin.click("#send-button")
    admin.wait_for_selector('#transcript [data-role="user"]', timeout=30000)
    admin.goto(base + "/history")
    admin.wait_for_function(f"document.querySelector('#conversation-list') && document.querySelector('#conversation-list').innerText.includes('{secret}')", timeout=30000)
    other = launch_browser(user=OTHER).new_page()
    for path in ("/history", "/"):
        other.goto(base + path)
        other.wait_for_selector("#voice-status" if path == "/" else "#history-search, #conversation-list", state="attached", timeout=60000)
        other.wait_for_timeout(1500)
        assert secret not in other.content()
    # a plain user sees only their own voice preferences, no keys or provider fields
    other.goto(base + "/settings")
    other.wait_for_selector("#tts_speed", timeout=30000)
    assert other.query_selector("#llm_base_url") is None and other.query_selector("#llm_api_key") is None
    screenshot(other, "settings-plain-user")


# ---------------------------------------------------------------- raw sockets
async def _sio_frames(base: str, headers: dict[str, str]) -> tuple[bool, list]:
    """Connect a bare socket.io client to /_event, send data events by name, collect frames."""
    import socketio

    from voiceclaw_app.states.chat import ChatState
    from voiceclaw_app.states.history import HistoryState
    from voiceclaw_app.states.settings import SettingsState

    frames: list = []
    sio = socketio.AsyncClient(reconnection=False)

    @sio.on("*", namespace="/_event")
    async def anything(event, data=None):
        frames.append((event, data))

    try:
        await sio.connect(f"{base}?token={uuid.uuid4()}", socketio_path="/_event", transports=["websocket"], headers=headers, wait_timeout=10, namespaces=["/_event"])
    except socketio.exceptions.ConnectionError:
        return False, frames
    router = {"pathname": "/", "query": {}, "asPath": "/"}
    for name, payload in [
        (f"{ChatState.get_full_name()}.on_load", {}),
        (f"{HistoryState.get_full_name()}.on_load", {}),
        (f"{HistoryState.get_full_name()}.delete_all", {}),
        (f"{SettingsState.get_full_name()}.on_load", {}),
        (f"{SettingsState.get_full_name()}.clear_key", {"name": "llm_api_key"}),
        (f"{ChatState.get_full_name()}.send_text", {"form": {"text": "hello"}}),
    ]:
        await sio.emit("event", {"name": name, "payload": payload, "router_data": router}, namespace="/_event")
    await asyncio.sleep(4)
    await sio.disconnect()
    return True, frames


def _app_deltas(frames: list) -> list[dict]:
    out = []
    for event, data in frames:
        if event == "event" and isinstance(data, dict):
            for state, delta in (data.get("delta") or {}).items():
                if "voiceclaw_app" in state:
                    out.append(delta)
    return out


def test_a_raw_socketio_client_without_a_session_or_from_a_foreign_origin_gets_nothing(app_server, session_cookies):
    base, _, _ = app_server
    # no session: every event is answered with a redirect to /login and nothing else
    connected, frames = asyncio.run(_sio_frames(base, {"Origin": base}))
    assert connected and frames, "no answer at all: the probe proves nothing"
    assert _app_deltas(frames) == []
    redirects = [e for _, d in frames if isinstance(d, dict) for e in d.get("events", [])]
    assert redirects and all(e["name"] == "_redirect" and e["payload"]["path"] == "/login" for e in redirects)
    assert "pineapple" not in json.dumps(frames)
    # a valid session, but from another site's page (cross-site WebSocket hijacking, on loopback)
    cookie = {"Cookie": f"voiceclaw_session={session_cookies(ADMIN)}"}
    connected, frames = asyncio.run(_sio_frames(base, {"Origin": "http://evil.example", **cookie}))
    assert not connected and frames == []
    # the control: the same probe with the session from the app's own origin does get data
    connected, frames = asyncio.run(_sio_frames(base, {"Origin": base, **cookie}))
    assert connected and _app_deltas(frames), "a logged-in client got no state: the refusals above prove nothing"


def test_the_mic_socket_refuses_no_session_and_foreign_origins(app_server, session_cookies):
    import websockets

    base, _, _ = app_server
    url = base.replace("http://", "ws://") + "/ws/voice"
    hello = json.dumps({"type": "hello", "client_token": uuid.uuid4().hex, "sample_rate": 16000})

    async def attempt(headers: dict[str, str]):
        try:
            async with websockets.connect(url, additional_headers=headers, open_timeout=10) as ws:
                msgs = []
                try:
                    # a refusal comes at once, before any hello (the server may close
                    # while a hello is still being sent): listen first
                    try:
                        msgs.append(json.loads(await asyncio.wait_for(ws.recv(), 2.0)))
                    except asyncio.TimeoutError:
                        await ws.send(hello)
                    async for m in ws:
                        msgs.append(json.loads(m))
                        if msgs[-1].get("type") == "ready":
                            break
                except websockets.ConnectionClosed:
                    pass
                return msgs, ws.close_code
        except websockets.InvalidStatus as exc:
            return "refused", exc.response.status_code

    msgs, code = asyncio.run(attempt({"Origin": base}))
    assert code == 4003 and msgs and msgs[0]["code"] == "login" and all(m["type"] != "ready" for m in msgs)
    cookie = {"Cookie": f"voiceclaw_session={session_cookies(ADMIN)}"}
    assert asyncio.run(attempt({"Origin": "http://evil.example", **cookie})) == ("refused", 403)
    msgs, _ = asyncio.run(attempt({"Origin": base, **cookie}))
    assert msgs and msgs[-1]["type"] == "ready"


def test_the_next_user_of_the_same_tab_sees_nothing_of_the_previous_one(app_server, launch_anonymous):
    """A tab keeps its client token (and so its Reflex state) across a log out: the
    gate resets the tab's states when the user changes, before anything is sent."""
    base, _, _ = app_server
    secret = f"mango-{uuid.uuid4().hex[:6]}"
    page = launch_anonymous().new_page()
    login(page, base, ADMIN)
    page.wait_for_selector("#text-input", timeout=60000)
    page.wait_for_function("window.__voiceclawMicMounted === true", timeout=30000)  # hydrated (the voice socket opens with the first typed message)
    page.fill("#text-input", f"Keep {secret} between us")
    page.click("#send-button")
    page.wait_for_selector('#transcript [data-role="user"]', timeout=30000)
    token = page.evaluate("window.sessionStorage.getItem('token')")
    page.click("#logout-button")
    page.wait_for_url("**/login**", timeout=15000)
    login(page, base, OTHER)
    page.wait_for_selector("#voice-status", timeout=60000)
    page.wait_for_timeout(2000)
    assert page.evaluate("window.sessionStorage.getItem('token')") == token  # the same tab, the same state token
    assert secret not in page.content()
    assert page.query_selector('#transcript [data-role="user"]') is None


def test_two_accounts_speak_at_overlapping_times_and_each_hears_only_their_own_reply(app_server, launch_browser, tmp_path):
    """Two people, two accounts, two browsers with their own (fake) microphones, tapping
    the voice button within a second of each other: each transcript shows only its own
    spoken question, each page plays a reply, and neither reply lands on the other page."""
    import time

    from .conftest import build_mic_wav
    from .test_browser import _played, _poll, wait_ready

    base, _, _ = app_server
    wavs = []
    for name, fixture in (("a", "q_capital"), ("b", "q_dinner")):
        wav = tmp_path / f"mic-{name}.wav"
        build_mic_wav([(fixture, 30.0)], wav, lead_silence_s=1.0)
        wavs.append(wav)
    pages = [launch_browser(wavs[0]).new_page(), launch_browser(wavs[1], user=OTHER).new_page()]
    for page in pages:
        page.goto(base + "/")
        wait_ready(page)
        page.click("#new-conversation")
    for page in pages:  # both start talking at once
        page.click("#voice-button")
    own = ({"capital", "france"}, {"cook", "dinner", "tonight"})
    try:
        for page, mine, theirs in zip(pages, own, reversed(own)):
            user = _poll(lambda: page.query_selector('#transcript [data-role="user"]'), 90)
            assert user, "the spoken question never reached this person's transcript"
            words = set(re.findall(r"[a-z]+", (page.text_content('#transcript [data-role="user"]') or "").lower()))
            assert words & mine and not words & (theirs - mine), words
            assert _poll(lambda: _played(page) >= 1, 90), "this person heard no reply"
        time.sleep(1.0)
        for page, theirs in zip(pages, reversed(own)):
            shown = (page.text_content("#transcript") or "").lower()
            assert not any(w in shown for w in theirs - {"tonight"}), "the other person's words reached this page"
            assert len(page.query_selector_all('#transcript [data-role="user"]')) == 1
    finally:
        for page in pages:
            page.click("#stop-button")
