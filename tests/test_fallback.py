"""Fallback to embedded engines, driven by the fault-injecting protocol servers.

The "embedded" engines here are small real implementations (a tone TTS, an energy
end-of-turn listener), not mocks: the wrappers are exercised through the same
interfaces the real local engines implement.
"""

from __future__ import annotations

import asyncio
import math
import struct

import pytest

from tests.servers.deepgram import FakeDeepgramServer
from tests.servers.openai_speech import FakeSpeechServer, SpeechBehavior
from tests.test_deepgram import collect_until, push_audio, silence, tone
from voiceclaw_app.providers.base import TTS, AudioClip, CancelToken, EndOfTurn, Listener, ListenNotice, ServerError, SpeechStarted, queued_events
from voiceclaw_app.providers.deepgram_stt import DeepgramListener, DeepgramOptions, rms16
from voiceclaw_app.providers.fallback import FallbackListener, FallbackTTS
from voiceclaw_app.providers.openai_tts import OpenAITTS

KEY = "k"


class ToneTTS(TTS):
    """A tiny embedded-style TTS: 22,050 Hz tone, 50 ms per character."""

    name = "tone"

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def synthesize(self, text: str, *, voice: str = "", speed: float = 1.0, cancel: CancelToken | None = None) -> AudioClip:
        self.calls.append(text)
        n = int(22050 * 0.05 * len(text))
        pcm = b"".join(struct.pack("<h", int(3000 * math.sin(i / 10))) for i in range(n))
        return AudioClip.from_pcm16(pcm, 22050)


class EnergyListener(Listener):
    """A tiny embedded-style listener: speech by energy, end of turn after 300 ms of silence."""

    def __init__(self) -> None:
        self.q: asyncio.Queue = asyncio.Queue()
        self.voiced_ms = 0.0
        self.last_voiced: float | None = None
        self.pushed = 0

    async def push(self, pcm16: bytes, t_ms: float) -> None:
        self.pushed += 1
        if rms16(pcm16) > 300:
            if self.last_voiced is None:
                self.q.put_nowait(SpeechStarted(t_ms=t_ms, source="vad"))
            self.voiced_ms += len(pcm16) / 32.0
            self.last_voiced = t_ms
        elif self.last_voiced is not None and t_ms - self.last_voiced >= 300:
            self.q.put_nowait(EndOfTurn(text=f"local {int(self.voiced_ms)} ms", speech_end_ms=self.last_voiced, eot_ms=t_ms, stt_final_ms=t_ms))
            self.last_voiced, self.voiced_ms = None, 0.0

    async def events(self):
        while True:
            ev = await self.q.get()
            if ev is None:
                return
            yield ev

    async def aclose(self) -> None:
        self.q.put_nowait(None)


@pytest.mark.asyncio
async def test_tts_failure_mid_turn_hands_over_then_next_turn_retries_cloud():
    async with FakeSpeechServer(api_key=KEY, behavior=SpeechBehavior(ttfb_s=0.0, realtime_factor=50.0)) as srv:
        local = ToneTTS()
        seen: list[str] = []
        tts = FallbackTTS(OpenAITTS(base_url=srv.base_url, api_key=KEY, max_retries=1, backoff_s=(0.01,)), lambda: local, on_notice=seen.append)
        clip1 = await tts.synthesize("First chunk.", voice="alloy", speed=1.0)
        assert clip1.sample_rate == 24000 and not tts.using_fallback
        srv.then(status=500).then(status=500)  # the chunk's attempt and its one retry
        clip2 = await tts.synthesize("Second chunk.", voice="alloy", speed=1.0)
        assert clip2.sample_rate == 22050 and tts.using_fallback
        n_requests = len(srv.requests)
        clip3 = await tts.synthesize("Third chunk.", voice="alloy", speed=1.0)
        assert clip3.sample_rate == 22050 and len(srv.requests) == n_requests  # rest of the turn stays local
        assert local.calls == ["Second chunk.", "Third chunk."]
        assert tts.cache_identity("alloy", 1.0)[0] == "tone"  # local audio not cached as the cloud voice
        notices = tts.drain_notices()
        assert len(notices) == 1 and "internal error (HTTP 500)" in notices[0] and "built-in voice" in notices[0]
        assert seen == notices and tts.drain_notices() == []
        await tts.warm()  # next turn (speech started): cloud first again
        assert (await tts.synthesize("Next turn.", voice="alloy", speed=1.0)).sample_rate == 24000


@pytest.mark.asyncio
async def test_tts_fallback_off_raises_the_cloud_error():
    async with FakeSpeechServer(api_key=KEY, behavior=SpeechBehavior(ttfb_s=0.0, status=500)) as srv:
        tts = FallbackTTS(OpenAITTS(base_url=srv.base_url, api_key=KEY, max_retries=0), ToneTTS, enabled=False)
        with pytest.raises(ServerError):
            await tts.synthesize("Hello.", voice="alloy", speed=1.0)


@pytest.mark.asyncio
async def test_listener_falls_back_mid_utterance_without_losing_it():
    srv = FakeDeepgramServer(api_key=KEY, script=["never finalized"])
    srv.then(drop_after_audio_s=0.3).then(reject_status=503).then(reject_status=503).then(reject_status=503)
    async with srv:
        local = EnergyListener()
        primary = DeepgramListener(api_key=KEY, url=srv.url, options=DeepgramOptions(), max_reconnects=3)
        lst = FallbackListener(primary, lambda: local)
        await lst.start()
        t = await push_audio(lst, tone(0.6), 0.0)
        notice = await collect_until(lst, (ListenNotice,))
        assert notice[-1].kind == "fallback" and "built-in speech recognition" in notice[-1].message
        await push_audio(lst, silence(0.4), t)
        events = await collect_until(lst, (EndOfTurn,))
        assert events[-1].text == "local 600 ms"  # the whole utterance, replayed into the local listener
        assert lst.switched and lst.active is local
        await lst.aclose()


@pytest.mark.asyncio
async def test_listener_falls_back_when_the_service_is_unreachable_at_start():
    srv = await FakeDeepgramServer(api_key=KEY).start()
    url = srv.url
    await srv.stop()
    local = EnergyListener()
    lst = FallbackListener(DeepgramListener(api_key=KEY, url=url, connect_timeout_s=1.0), lambda: local)
    await lst.start()
    assert lst.active is local
    events = await collect_until(lst, (ListenNotice,))
    assert "Could not connect" in events[-1].message
    await lst.aclose()


@pytest.mark.asyncio
async def test_listener_bad_key_raises_when_fallback_on_auth_is_off():
    async with FakeDeepgramServer(api_key=KEY) as srv:
        lst = FallbackListener(DeepgramListener(api_key="bad", url=srv.url), EnergyListener, fallback_on_auth=False)
        from voiceclaw_app.providers.base import AuthError

        with pytest.raises(AuthError):
            await lst.start()


@pytest.mark.asyncio
async def test_listener_mode_is_forwarded_to_the_active_listener_and_the_fallback():
    srv = FakeDeepgramServer(api_key=KEY, script=["x"])
    srv.then(drop_after_audio_s=0.2).then(reject_status=503)
    async with srv:
        local = EnergyListener()
        primary = DeepgramListener(api_key=KEY, url=srv.url, max_reconnects=1)
        lst = FallbackListener(primary, lambda: local)
        await lst.start()
        lst.set_hands_free(False)
        assert primary.hands_free is False
        await push_audio(lst, tone(0.4), 0.0)
        await collect_until(lst, (ListenNotice,))
        assert lst.active is local and local.hands_free is False  # the mode survives the switch
        lst.set_hands_free(True)
        assert local.hands_free is True
        await lst.aclose()


@pytest.mark.asyncio
async def test_listener_returns_to_the_cloud_after_the_fallen_back_turn():
    # 503 at mic-on (3 start attempts), local for that turn, Deepgram again for the next
    srv = FakeDeepgramServer(api_key=KEY, script=["Back on the cloud."])
    srv.then(reject_status=503).then(reject_status=503).then(reject_status=503)

    def cloud() -> DeepgramListener:
        return DeepgramListener(api_key=KEY, url=srv.url, start_backoff_s=(0.01,))

    async with srv:
        local = EnergyListener()
        lst = FallbackListener(cloud(), lambda: local, primary_factory=cloud, retry_backoff_s=(0.0,))
        await lst.start()
        assert lst.active is local and lst.switched
        t = await push_audio(lst, silence(0.1) + tone(0.5), 0.0)
        assert len(srv.sessions) == 0  # never inside a turn
        t = await push_audio(lst, silence(0.4), t)
        events = await collect_until(lst, (EndOfTurn,))
        assert events[-1].text == "local 500 ms"
        t = await push_audio(lst, silence(0.2), t)  # between turns: the cloud is re-opened
        events = await collect_until(lst, (ListenNotice,))
        assert events[-1].kind == "info" and "back" in events[-1].message
        assert not lst.switched and isinstance(lst.active, DeepgramListener) and lst.restores == 1
        await push_audio(lst, tone(0.6) + silence(0.6), t)
        events = await collect_until(lst, (EndOfTurn,))
        assert events[-1].text == "Back on the cloud."
        await lst.aclose()


class _RecordingListener(Listener):
    """A listener that records frame times; its push yields like the real ones (VAD off the loop)."""

    def __init__(self, fail_after: int | None = None):
        self.q: asyncio.Queue = asyncio.Queue()
        self.end = object()
        self.frames: list[float] = []
        self.fail_after = fail_after

    async def push(self, pcm16, t_ms):
        self.frames.append(t_ms)
        await asyncio.sleep(0.003)
        if self.fail_after is not None and len(self.frames) == self.fail_after:
            self.q.put_nowait(ListenNotice("The cloud recognizer went away.", kind="error"))

    def events(self):
        return queued_events(self.q, self.end)

    async def aclose(self):
        self.q.put_nowait(self.end)


async def test_listener_switch_replays_the_utterance_before_any_live_frame():
    """Frames that arrive while the embedded listener gets the replayed utterance must
    queue behind it: the utterance reaches the fallback once and in order."""
    built: list[_RecordingListener] = []

    def make_fallback():
        built.append(_RecordingListener())
        return built[-1]

    lst = FallbackListener(_RecordingListener(fail_after=20), make_fallback)
    await lst.start()
    frame = b"\x00\x01" * 320
    for i in range(60):
        await lst.push(frame, float(i))
        await asyncio.sleep(0.001)
    for _ in range(200):
        if built and len(built[0].frames) >= 60:
            break
        await asyncio.sleep(0.01)
    assert built, "no switch to the fallback"
    got = built[0].frames
    assert got == sorted(got), "frames reached the fallback out of order"
    assert len(got) == len(set(got)) == 60, "a frame was lost or given twice"
    await lst.aclose()
