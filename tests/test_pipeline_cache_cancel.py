"""TTS cache ownership, fixed phrases, mid-stream errors, history mode, cancellation
(against the real local protocol servers in tests/servers)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

import pytest

from tests.fakes import ToneTTS
from tests.servers.openai_chat import ChatBehavior, FakeChatServer
from tests.servers.openai_speech import FakeSpeechServer, SpeechBehavior
from voiceclaw_app.config import VoiceSettings
from voiceclaw_app.pipeline.audio_store import AudioStore
from voiceclaw_app.pipeline.events import AudioReady, LLMToken, StillWorking, TurnDone, TurnError
from voiceclaw_app.pipeline.phrases import PHRASES
from voiceclaw_app.pipeline.tts_scheduler import TTSCache
from voiceclaw_app.pipeline.turn import TurnRunner, build_request
from voiceclaw_app.providers.base import AudioClip, CancelToken, ChatMessage, LLMRequest, ProtocolError
from voiceclaw_app.providers.openai_llm import OpenAICompatLLM
from voiceclaw_app.providers.openai_tts import OpenAITTS

REPLY = "Sure thing, here is the plan for today. First we check the mail."


@pytest.fixture
async def server():
    srv = FakeChatServer(ChatBehavior(reply=REPLY, ttft_s=0.02, tokens_per_s=300))
    await srv.start()
    yield srv
    await srv.stop()


def make_runner(server, tmp_path, tts=None, **settings):
    s = VoiceSettings(llm_base_url=server.base_url, llm_model_voice="m", **settings)
    store = AudioStore(tmp_path / "audio")
    return TurnRunner(llm=OpenAICompatLLM(server.base_url), tts=tts if tts is not None else ToneTTS(0.02), audio_store=store, settings=s)


async def run_all(runner, text="hello", conv="conv", **kw):
    prepared = runner.prepare([], conv, spoken=True)
    return [ev async for ev in runner.run(prepared, text, **kw)]


def audio_of(events):
    return [e for e in events if isinstance(e, AudioReady)]


# ------------------------------------------------------------------ the TTS cache
async def test_repeated_chunk_comes_from_the_cache_without_a_second_request(server, tmp_path):
    async with FakeSpeechServer(SpeechBehavior(ttfb_s=1.0, realtime_factor=5.0), api_key="k") as speech:
        runner = make_runner(server, tmp_path, tts=OpenAITTS(base_url=speech.base_url, api_key="k"))
        first = await run_all(runner, conv="a")
        requests = len(speech.bodies)
        assert requests == 2 and isinstance(first[-1], TurnDone)
        started = time.monotonic()
        second = await run_all(runner, conv="b")
        assert isinstance(second[-1], TurnDone)
        assert len(speech.bodies) == requests  # no second synthesis request
    m = second[-1].marks
    assert m.first_audio_ready - m.tts_first_request < 500  # from the cache, not after the 1 s TTFB
    assert time.monotonic() - started < 3.0
    a, b = audio_of(first), audio_of(second)
    # every turn owns its audio: fresh random ids, never the cache entry, never shared
    assert not {x.audio_id for x in a} & {x.audio_id for x in b}
    assert all(not x.audio_id.startswith("c-") and runner.store.path_for(x.audio_id) for x in a + b)
    assert [x.part for x in b] == [0, 0]  # a hit is the whole chunk at once
    # deleting conversation "a" (its ids) leaves "b" and the cache intact
    runner.store.delete([x.audio_id for x in a])
    assert all(runner.store.path_for(x.audio_id) for x in b)
    assert len(list(runner.cache.dir.glob("*.wav"))) >= 2


async def test_local_engine_turn_audio_is_not_the_cache_file(server, tmp_path):
    tts = ToneTTS(0.02)
    runner = make_runner(server, tmp_path, tts=tts)
    first = audio_of(await run_all(runner, conv="a"))
    calls = len(tts.calls)
    second = audio_of(await run_all(runner, conv="b"))
    assert len(tts.calls) == calls  # served from the cache
    cache_files = {p.resolve() for p in runner.cache.dir.glob("*.wav")}
    for x in first + second:
        path = runner.store.path_for(x.audio_id)
        assert path is not None and path.resolve() not in cache_files
        assert x.url == f"/audio/{x.audio_id}.wav"
    runner.store.delete([x.audio_id for x in first])
    assert all(runner.store.path_for(x.audio_id) for x in second)
    assert {p.resolve() for p in runner.cache.dir.glob("*.wav")} == cache_files
    # retention prunes turn audio only; the cache folder is not turn audio
    assert runner.store.prune(0) == len(second)
    assert {p.resolve() for p in runner.cache.dir.glob("*.wav")} == cache_files


def test_cache_is_a_bounded_lru_that_keeps_pinned_phrases(tmp_path):
    store = AudioStore(tmp_path)
    clip = AudioClip.from_pcm16(b"\x00\x01" * 4000, 16000)
    cache = TTSCache(store, max_bytes=len(clip.wav) * 5, max_entries=100)
    cache.pin("fixed phrase")
    ident = ("tone", "v", 1.0)
    cache.put(ident, "fixed phrase", clip)
    for i in range(12):
        cache.put(ident, f"phrase {i}", clip)
        os.utime(cache.entry_path(ident, f"phrase {i}"), (1000 + i, 1000 + i))
        if i == 3:
            assert cache.get(ident, "phrase 0") is not None  # used: moves to the front
    recent = list(cache.dir.glob("r-*.wav"))
    assert 0 < len(recent) <= 5
    assert cache.lookup(ident, "fixed phrase") is not None  # pinned: never evicted
    assert cache.lookup(ident, "phrase 11") is not None and cache.lookup(ident, "phrase 1") is None
    assert not list(tmp_path.glob("r-*.wav")) and not list(tmp_path.glob("f-*.wav"))  # not served


# ------------------------------------------------------------------ fixed phrases
async def test_phrases_prefetched_and_still_working_carries_cached_audio(server, tmp_path):
    tts = ToneTTS(0.01)
    runner = make_runner(server, tmp_path, tts=tts)
    assert await runner.phrases.prefetch() == len(PHRASES)
    assert set(tts.calls) == set(PHRASES.values())
    server.then(ttft_s=2.3, keepalive_every_s=0.5)
    events = await run_all(runner)
    sw = next(e for e in events if isinstance(e, StillWorking))
    assert sw.audio_url and sw.audio_url.startswith("/audio/")
    assert runner.store.path_for(sw.audio_url[len("/audio/"):-len(".wav")]) is not None
    assert tts.calls.count(PHRASES["still_working"]) == 1  # prefetched, not synthesized again


async def test_error_phrase_is_never_synthesized_at_the_end_of_a_failed_turn(server, tmp_path):
    class SlowTTS(ToneTTS):
        async def synthesize(self, text, **kw):
            await asyncio.sleep(3.0)  # TTS down: would hold the error back
            return await super().synthesize(text, **kw)

    server.then(status=401)
    runner = make_runner(server, tmp_path, tts=SlowTTS(0.0))
    started = time.monotonic()
    events = await run_all(runner)
    assert isinstance(events[-1], TurnError) and events[-1].audio_url is None
    assert time.monotonic() - started < 1.0


# ------------------------------------------------------------------ bad input
async def test_invalid_utf8_in_a_turn_then_the_next_turn_works(server, tmp_path):
    server.then(raw_bytes_after_tokens=(3, b"\xff\xfe caf\xc3"))
    runner = make_runner(server, tmp_path)
    events = await run_all(runner)
    assert isinstance(events[-1], TurnDone) and "\ufffd" in events[-1].reply_text
    assert audio_of(events)
    events = await run_all(runner)
    assert isinstance(events[-1], TurnDone) and events[-1].reply_text == REPLY


async def test_error_object_after_text_ends_the_turn_with_an_error_keeping_the_text(server, tmp_path):
    server.then(error_object_after_tokens=5)
    events = await run_all(make_runner(server, tmp_path))
    err = events[-1]
    assert isinstance(err, TurnError) and "upstream failed" in err.message
    assert err.reply_text == " ".join(REPLY.split()[:5])
    assert len(server.bodies) == 1  # never retried after the first token


async def test_client_error_object_after_text_raises_and_gateway_event_does_not(server):
    llm = OpenAICompatLLM(server.base_url)
    req = LLMRequest(messages=[ChatMessage("user", "hi")], model="m", read_timeout_s=5)
    server.then(error_object_after_tokens=3)
    got: list[str] = []
    with pytest.raises(ProtocolError) as e:
        async for d in llm.stream(req, CancelToken()):
            got.append(d)
    assert "".join(got) == "Sure thing, here" and "mid-reply" in e.value.user_message
    server.then(error_event_after_tokens=3)
    assert "".join([d async for d in llm.stream(req, CancelToken())]) == "Sure thing, here"


# ------------------------------------------------------------------ history mode
def test_history_mode_follows_the_model():
    gw = VoiceSettings(llm_base_url="http://gw/v1", llm_model_voice="openclaw:main")
    assert gw.llm_history_mode == "auto" and gw.effective_history_mode() == "server"
    for model in ("openclaw", "openclaw/voice", "agent:voice"):
        assert gw.replace(llm_model_voice=model).effective_history_mode() == "server"
    assert gw.replace(llm_history_mode="client").effective_history_mode() == "client"
    # server saved, model switched to OpenAI: history and system prompt are sent again
    switched = gw.replace(llm_history_mode="server", llm_model_voice="gpt-4o-mini")
    assert switched.effective_history_mode() == "client"
    r = build_request(switched, [ChatMessage("user", "q"), ChatMessage("assistant", "a")], "c").complete("now")
    assert r.user is None and r.messages[0].role == "system" and len(r.messages) == 4
    assert "llm_history_mode" in switched.problems() and "gateway" in switched.problems()["llm_history_mode"]
    # choosing a gateway model on the settings page with the default mode: server
    chosen = VoiceSettings.from_dict({"llm_base_url": "http://gw/v1", "llm_model_voice": "openclaw:voice"}, base=VoiceSettings())
    r = build_request(chosen, [ChatMessage("user", "q")], "c").complete("now")
    assert r.user == "c" and [m.content for m in r.messages] == ["now"]
    # a text model that is not a gateway model gets client history on typed turns
    mixed = chosen.replace(llm_model_text="gpt-4o-mini")
    assert build_request(mixed, [], "c", spoken=False).base.user is None


# ------------------------------------------------------------------ cancellation
async def test_token_cancel_wakes_a_turn_waiting_for_its_first_token(server, tmp_path, caplog):
    server.then(ttft_s=5.0)
    runner = make_runner(server, tmp_path)
    cancel = CancelToken()
    before = set(asyncio.all_tasks())

    async def consume():
        return [ev async for ev in runner.run(runner.prepare([], "c"), "go", cancel=cancel)]

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.2)
    with caplog.at_level(logging.INFO, logger="voiceclaw.turn"):
        # from another thread, like a barge-in coming from the audio side
        await asyncio.to_thread(cancel.cancel)
        started = time.monotonic()
        events = await asyncio.wait_for(task, timeout=2.0)
    assert time.monotonic() - started < 1.5  # at once, not at the 5 s first token
    assert not any(isinstance(e, (TurnDone, TurnError, LLMToken)) for e in events)
    left = [t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task() and "RawHTTPServer" not in t.get_coro().__qualname__]
    assert left == []
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("turn "))
    data = json.loads(line[len("turn "):])
    assert data["cancelled"] is True


async def test_closed_turn_logs_a_cancelled_line_with_turn_done(server, tmp_path, caplog):
    server.then(reply="Word " * 200 + ".", tokens_per_s=200)
    runner = make_runner(server, tmp_path)
    from voiceclaw_app.pipeline.timing import TurnMarks

    marks = TurnMarks()
    with caplog.at_level(logging.INFO, logger="voiceclaw.turn"):
        gen = runner.run(runner.prepare([], "c"), "go", marks=marks)
        async for ev in gen:
            if isinstance(ev, LLMToken):
                break
        await gen.aclose()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("turn ")]
    assert len(lines) == 1 and json.loads(lines[0][5:])["cancelled"] is True
    assert marks.turn_done is not None


async def test_retry_backoff_stops_on_cancel(server, monkeypatch):
    from voiceclaw_app.providers import openai_llm

    monkeypatch.setattr(openai_llm, "BACKOFF_S", (3.0, 3.0))  # a long backoff the cancel must cut short
    server.then(status=500).then(status=500).then()
    llm = OpenAICompatLLM(server.base_url, max_retries=2)
    cancel = CancelToken()
    req = LLMRequest(messages=[ChatMessage("user", "hi")], model="m", read_timeout_s=5)

    async def later():
        await asyncio.sleep(0.1)
        cancel.cancel()

    asyncio.get_running_loop().create_task(later())
    started = time.monotonic()
    got = [d async for d in llm.stream(req, cancel)]
    assert got == [] and time.monotonic() - started < 1.5  # not the 3 s backoff
    assert len(server.bodies) == 1


async def test_cancel_token_wait_wakes_on_a_cancel_from_another_thread():
    token = CancelToken()
    waiter = asyncio.create_task(token.wait())
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await asyncio.to_thread(token.cancel)
    await asyncio.wait_for(waiter, 1.0)
    await asyncio.wait_for(token.wait(), 0.1)  # already cancelled: returns at once
    assert token._waiters == []
