"""The voice session's turns as the page sees them: token batching into segments (the
projection), persistence (DbConversationStore), barge-in cut, delta size."""

import asyncio
import contextlib
import json

import pytest

from voiceclaw_app.pipeline.events import AudioReady, LLMToken, TurnDone, UserText
from voiceclaw_app.pipeline.timing import TurnMarks

from .session_rig import make_session


class FakeStream:
    def __init__(self):
        self.turn_id = ""
        self.streaming = False
        self.user_interim = ""
        self.seg_base = 0
        self.seg_tail: list[str] = []
        self.audio_turn = ""
        self.audio_urls: list[str] = []
        self.audio_done = True
        self.stop_seq = 0
        self.audio_stop_seq = 0
        self.cue = ""
        self._segments: list[str] = []
        self.updates: list[int] = []  # bytes of each update's streaming payload

    def reset_turn(self, turn_id):
        self.turn_id = turn_id
        self.streaming = bool(turn_id)
        self.seg_base = 0
        self.seg_tail = []
        self._segments = []
        if turn_id:
            self.audio_turn = turn_id
            self.audio_urls = []
            self.audio_done = False


class FakeChat:
    def __init__(self):
        self.conversation_id = ""
        self.messages = []
        self.session_status = "idle"
        self.session_boot = ""
        self.mic_error = ""
        self.taken_over = False
        self.notice = ""
        self.error = ""
        self.muted = False
        self.mic_on = False
        self.conversations = []
        self.last_audio_ids = []


class FakeSink:
    def __init__(self):
        self.stream = FakeStream()
        self.chat = FakeChat()

    @contextlib.asynccontextmanager
    async def states(self, token):
        yield self.stream, self.chat
        self.stream.updates.append(len(json.dumps(self.stream.seg_tail)))


class FakeRunner:
    def __init__(self, tokens, chunks, token_delay=0.002, chunk_delay=0.0):
        self.tokens = tokens
        self.chunks = chunks
        self.token_delay = token_delay
        self.chunk_delay = chunk_delay

    def prepare(self, history, conversation_id, spoken=True):
        return {"history": history}

    async def warm(self, prepared=None):
        pass

    async def run(self, prepared, user_text, *, marks=None, cancel=None, speak=True):
        marks = marks or TurnMarks()
        yield UserText(user_text)
        for t in self.tokens:
            await asyncio.sleep(self.token_delay)
            if cancel is not None and cancel.cancelled:
                return
            yield LLMToken(t)
        for i, (aid, text) in enumerate(self.chunks):
            await asyncio.sleep(self.chunk_delay)
            yield AudioReady(i, aid, f"/audio/{aid}.wav", 500.0, text)
        marks.mark("turn_done")
        yield TurnDone("".join(self.tokens), marks, len(self.chunks))


def make_people() -> None:
    """Accounts 1 and 2 (conversations belong to a user: the session tests speak as them)."""
    from voiceclaw_app import accounts

    for name in ("person-one", "person-two"):
        accounts.add_user(name, f"{name}-password")


@pytest.fixture()
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("VOICECLAW_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("VOICECLAW_DATABASE_URL", f"sqlite:///{tmp_path / 'ui.db'}")
    from voiceclaw_app.db import repo
    from voiceclaw_app.states import services

    repo.create_all()
    make_people()
    sink = FakeSink()
    holder = {}

    async def fake_get_runner(settings):
        return holder["runner"]

    monkeypatch.setattr(services, "get_runner", fake_get_runner)
    yield sink, holder, repo


async def test_typed_turn_streams_in_segments_and_is_stored(env):
    sink, holder, repo = env
    session, _, projection = await make_session(sink, "tok-123456789")
    tokens = [f" word{i}" for i in range(400)]
    holder["runner"] = FakeRunner(tokens, [("aaaaaaaaaa", "first part."), ("bbbbbbbbbb", "second part.")])
    reply = await session.say("hello there")
    await reply.task
    # batched: far fewer updates than tokens, each carrying a bounded window
    assert len(sink.stream.updates) < len(tokens) / 3
    assert max(sink.stream.updates) < 8 * 2000
    assert "".join(projection.segments) == "".join(tokens)
    from voiceclaw_app.server.auth import sign_audio_url

    # signed for their owner (user 1): only they can fetch them
    assert sink.stream.audio_urls == [sign_audio_url("aaaaaaaaaa", 1), sign_audio_url("bbbbbbbbbb", 1)]
    assert sink.stream.audio_urls[0].startswith("/audio/aaaaaaaaaa.wav?u=1&s=")
    assert [m["role"] for m in sink.chat.messages] == ["user", "assistant"]
    msgs = repo.list_messages(1, sink.chat.conversation_id)
    assert msgs[1]["content"] == "".join(tokens).strip()
    assert msgs[1]["finished"] and not msgs[1]["interrupted"]
    assert msgs[1]["audio_ids"] == ["aaaaaaaaaa", "bbbbbbbbbb"]
    assert repo.timings_for(1, sink.chat.conversation_id)[0]["turn_done"] is not None
    assert session.conversation_id == sink.chat.conversation_id


async def test_barge_in_keeps_only_played_chunks(env):
    sink, holder, repo = env
    session, _, _ = await make_session(sink, "tok-abcdefgh")
    holder["runner"] = FakeRunner(["One. ", "Two. ", "Three."], [("c1c1c1c1c1", "One."), ("c2c2c2c2c2", "Two."), ("c3c3c3c3c3", "Three.")], chunk_delay=0.05)
    reply = await session.start_reply("count", speak=True, spoken_input=True, marks=TurnMarks(speech_end=1.0, stt_final=2.0))
    while len(reply.ledger.chunks) < 2:
        await asyncio.sleep(0.01)
    await session.on_playback({"event": "first_playing", "turn": reply.turn_id, "index": 0, "server_ms": 500.0})
    assert session.replying()
    await session.on_control({"type": "barge_in"})
    with contextlib.suppress(asyncio.CancelledError):
        await reply.task
    msgs = repo.list_messages(1, sink.chat.conversation_id)
    assert msgs[-1]["content"] == "One."
    assert msgs[-1]["interrupted"]
    assert sink.chat.messages[-1]["interrupted"] == "1"
    assert reply.done and not session.replying()


async def test_a_new_turn_cancels_the_previous_one(env):
    sink, holder, repo = env
    session, _, _ = await make_session(sink, "tok-samesame", muted=True)
    holder["runner"] = FakeRunner([f" t{i}" for i in range(200)], [], token_delay=0.01)
    first = await session.say("one")
    await asyncio.sleep(0.1)
    holder["runner"] = FakeRunner([" ok"], [])
    second = await session.say("two")
    with contextlib.suppress(asyncio.CancelledError):
        await first.task
    await second.task
    assert first.interrupted and not second.interrupted
    assert first.conversation_id == second.conversation_id


async def test_a_muted_reply_is_stored_while_it_streams(env):
    """A muted (text-only) reply has no audio chunks: its text is still written at least
    every second, so a crash mid-reply leaves what was streamed in the history."""
    sink, holder, repo = env
    session, _, _ = await make_session(sink, "tok-muted-0001", muted=True)
    holder["runner"] = FakeRunner([f" w{i}" for i in range(400)], [], token_delay=0.01)
    reply = await session.say("talk for a while")
    stored = []
    for _ in range(300):
        await asyncio.sleep(0.05)
        if reply.message_id is not None:
            msg = [m for m in repo.list_messages(1, reply.conversation_id) if m["role"] == "assistant"][-1]
            stored.append(len(msg["content"]))
            if not msg["finished"] and len(set(stored)) >= 3:
                break
    assert not reply.done, "the reply ended before the test could look mid-stream"
    assert len(set(x for x in stored if x)) >= 2, f"the text was not written while streaming: {stored}"
    assert not msg["finished"] and msg["content"].split()[:2] == ["w0", "w1"]
    reply.interrupt("test")
    with contextlib.suppress(asyncio.CancelledError):
        await reply.task


async def test_connection_test_sends_the_stored_llm_key_only_to_the_saved_address(env):
    """Typing another LLM address and pressing "test" must not hand the stored gateway
    token to that address; the saved address gets it."""
    from tests.servers.openai_chat import FakeChatServer
    from voiceclaw_app.config import VoiceSettings
    from voiceclaw_app.states import services
    from voiceclaw_app.states.settings import _test_provider

    sink, holder, repo = env
    async with FakeChatServer(api_key="sk-stored-gateway-token") as saved_srv, FakeChatServer() as other_srv:
        services.key_store().set("llm_api_key", "sk-stored-gateway-token", saved_srv.base_url)
        repo.save_settings(VoiceSettings(llm_base_url=saved_srv.base_url, llm_model_voice="openclaw:voice"))
        # the form shows another address, not saved: no request carries the key there
        result = await _test_provider("llm", VoiceSettings(llm_base_url=other_srv.base_url, llm_model_voice="openclaw:voice"))
        assert result.startswith("Not tested") and "save" in result
        assert all("sk-stored" not in (r.headers.get("authorization") or "") for r in other_srv.requests)
        # the saved address: tested with the key
        result = await _test_provider("llm", VoiceSettings(llm_base_url=saved_srv.base_url, llm_model_voice="openclaw:voice"))
        assert result.startswith("OK"), result
        assert any(r.headers.get("authorization") == "Bearer sk-stored-gateway-token" for r in saved_srv.requests)
