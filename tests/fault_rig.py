"""The fault suite's rig: the app's real voice session, wired as the app wires it, to
the local protocol servers of ``tests/servers``.

Everything between the session and the sockets is the app's own code: the session
(``VoiceSession``), the services module (settings from the database, the provider
factory, the runner cache, the fixed phrases), ``DbConversationStore`` over a test
database, the Reflex projection over an in-memory sink, and the vendors' clients
(deepgram-sdk's WebSocket, SSE over httpx, the openai SDK) talking to real sockets.
What the test changes, and why:

* provider timeouts and backoffs are shortened (``llm_read_timeout_s`` through the
  saved settings; the Deepgram listener's watchdog and backoffs and the speech
  clients' read/chunk/first-audio deadlines, which have no setting, through their
  ``from_settings`` keyword arguments; the LLM client's retry backoff and the
  session's pause before rebuilding a failed listener, module constants), so a
  fault costs a second, not thirty;
* the server's per-frame Silero gate is off: the listener uses its energy gate (what
  it does when Silero cannot load), so a tone can stand for speech; the gate is not
  what these tests are about;
* ``fallback_to_local`` is off: a failing cloud provider must be seen failing, not
  replaced by the embedded engines (which would also load models on 2 cores).

:class:`Page` is the tab: it records every session event and plays the reply's
audio like an audio queue that plays instantly (``first_playing`` then ``ended``
once the turn finished). :class:`Mic` is a hands-free microphone: 20 ms frames at
real time, silence between utterances.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import struct
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from tests.servers.deepgram import FakeDeepgramServer
from tests.servers.openai_chat import ChatBehavior, FakeChatServer
from tests.servers.openai_speech import FakeSpeechServer, SpeechBehavior
from voiceclaw_app.pipeline.events import AudioReady
from voiceclaw_app.pipeline.timing import now_ms
from voiceclaw_app.session import events as ev

from .session_rig import make_session
from .test_states import FakeSink

LLM_KEY = "sk-llm-fault-secret-1111"
TTS_KEY = "sk-tts-fault-secret-2222"
DG_KEY = "dg-fault-secret-3333"
KEYS = (LLM_KEY, TTS_KEY, DG_KEY)
TOKEN = "tok-faults-0001"
RATE = 16000
FRAME = 320  # samples per 20 ms

#: the Deepgram listener, with test-sized waits (production: watchdog 6 s, backoffs up to 30 s)
FAST_LISTENER = {"watchdog_s": 1.2, "start_backoff_s": (0.05, 0.1), "recover_backoff_s": (0.25, 1.0)}
#: the speech client, with test-sized deadlines (production: 10 s per read, 4 s + 80 ms/char per chunk)
FAST_SPEECH = {"read_timeout_s": 0.6, "connect_timeout_s": 1.0, "total_timeout_s": 2.0, "chunk_base_s": 0.6, "chunk_s_per_char": 0.02, "backoff_s": (0.05, 0.1)}
#: the Aura client, with test-sized waits (production: 5 s to connect, 10 s for first audio)
FAST_AURA = {"connect_timeout_s": 1.0, "first_audio_timeout_s": 1.0}
#: Aura's speed here: first audio 50 ms after a flush, audio made 20x faster than it plays
AURA_FIRST_AUDIO_S, AURA_RTF = 0.05, 0.05
#: the session's pause before a failed listener is rebuilt (production: 5 s)
RETRY_AFTER_FAILURE_MS = 250.0
#: the LLM client's backoff between retries of a refused or failed request (production: 0.25 s, 0.8 s)
LLM_BACKOFF_S = (0.05, 0.1)

#: an exception's class name, a stack, a repr or markup: not words for a person
_CLASS_NAME = re.compile(r"\b[A-Z]\w*(Error|Exception|Timeout)\b")
_RAW = re.compile(r"traceback|file \"|httpx|openai\.\w|websockets|deepgram\.\w|[{}<>\[\]]|\\n|\n|errno", re.I)


def assert_plain(message: str) -> None:
    """A sentence a person reads: no exception text, no stack, no key."""
    assert message and message.strip() == message, repr(message)
    assert message[0].isupper() and message[-1] in ".!?)", f"not a sentence: {message!r}"
    assert not _RAW.search(message) and not _CLASS_NAME.search(message), f"raw text shown: {message!r}"
    for key in KEYS:
        assert key not in message, "a key was shown"


def tone(seconds: float) -> bytes:
    """A 200 Hz tone: voiced for the energy gate and the fake recognizer."""
    n = int(seconds * RATE)
    return b"".join(struct.pack("<h", int(6000 * math.sin(2 * math.pi * 200 * i / RATE))) for i in range(n))


SILENT_FRAME = b"\x00\x00" * FRAME


class Mic:
    """A hands-free microphone: 20 ms frames at real time into the session."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self._frames: deque[bytes] = deque()
        self._idle = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="fault-mic")

    async def _run(self) -> None:
        t0 = now_ms()
        i = 0
        while True:
            frame = self._frames.popleft() if self._frames else SILENT_FRAME
            i += 1
            due = t0 + i * FRAME * 1000.0 / RATE
            delay = (due - now_ms()) / 1000.0
            if delay > 0:
                await asyncio.sleep(delay)
            await self.session.push_audio(frame, due)
            if not self._frames:
                self._idle.set()

    async def say(self, seconds: float = 0.7) -> None:
        """Speak (a tone) for ``seconds``; returns once the last voiced frame went in."""
        pcm = tone(seconds)
        self._idle.clear()
        self._frames.extend(pcm[k : k + 2 * FRAME] for k in range(0, len(pcm), 2 * FRAME))
        await self._idle.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


class Page:
    """The tab: every session event, and an audio queue that plays at once."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.events: list[ev.SessionEvent] = []
        self.at: list[float] = []  # when each event came (ms, session clock)
        self._tasks: set[asyncio.Task] = set()

    async def __call__(self, e: ev.SessionEvent) -> None:
        self.events.append(e)
        self.at.append(now_ms())
        if isinstance(e, ev.TurnFinished):
            audio = [a for a in self.of(ev.ReplyAudio) if a.turn_id == e.turn_id and a.audio_id]
            if audio:
                # not from inside the session's emit: the page reports on its own socket
                task = asyncio.get_running_loop().create_task(self._play(e.turn_id, len(audio)))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _play(self, turn_id: str, pieces: int) -> None:
        await asyncio.sleep(0.01)
        await self.session.on_playback({"event": "first_playing", "turn": turn_id, "index": 0, "server_ms": now_ms()})
        await self.session.on_playback({"event": "ended", "turn": turn_id, "played": pieces})

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def mark(self) -> int:
        return len(self.events)

    def since(self, mark: int, kind: type) -> list:
        return [e for e in self.events[mark:] if isinstance(e, kind)]

    async def wait_for(self, kind: type, mark: int, timeout: float, where=lambda e: True) -> Any:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    found = [e for e in self.since(mark, kind) if where(e)]
                    if found:
                        return found[0]
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise AssertionError(f"no {kind.__name__} within {timeout:.0f} s; the status is {self.session.status!r}") from None


@dataclass
class Turn:
    """What one turn left behind: the events, the stored rows, what was surfaced."""

    finished: ev.TurnFinished | None
    tokens: str  # every text delta the page was sent, joined
    spoken: list[str]  # the text of each chunk whose audio was sent
    surfaced: list[str]  # errors and notices the page was given
    user: dict | None  # the stored user message
    assistant: dict | None  # the stored assistant message
    events: list = field(default_factory=list)


@dataclass
class Rig:
    dg: FakeDeepgramServer
    chat: FakeChatServer
    speech: FakeSpeechServer
    session: Any
    page: Page
    sink: FakeSink
    repo: Any
    replies: list[str]
    mic: Mic | None = None
    tts: str = "openai"  # openai (/v1/audio/speech) or aura (Deepgram's speak socket)
    stt: str = "deepgram"  # deepgram (v1 /listen) or flux (v2 /listen)
    base_chat: ChatBehavior = field(default_factory=ChatBehavior)
    base_speech: SpeechBehavior = field(default_factory=SpeechBehavior)

    async def clear_faults(self) -> None:
        """The servers answer normally again (queued faults and profiles too)."""
        await self.chat.resume()
        await self.speech.resume()
        self.chat.behavior = replace(self.base_chat)
        self.chat.queue.clear()
        self.speech.behavior = replace(self.base_speech)
        self.speech.queue.clear()
        self.dg.faults.clear()
        self.dg.profile.message_delay_s = 0.0
        self.dg.script.clear()
        self.dg.speak.faults.clear()
        self.dg.flux.faults.clear()
        self.dg.speak.profile.first_audio_s, self.dg.speak.profile.rtf = AURA_FIRST_AUDIO_S, AURA_RTF

    @property
    def listen(self) -> Any:
        """Where the live listening socket's per-connection faults are queued (``then``)."""
        return self.dg.flux if self.stt == "flux" else self.dg

    def messages(self) -> list[dict]:
        conv = self.session.conversation_id
        return self.repo.list_messages(1, conv) if conv else []

    def collect(self, mark: int, finished: ev.TurnFinished | None) -> Turn:
        events = self.page.events[mark:]
        turn_id = finished.turn_id if finished is not None else None
        tokens = "".join(e.text for e in events if isinstance(e, ev.ReplyToken) and e.turn_id == turn_id)
        spoken = [e.event.text for e in events if isinstance(e, ev.PipelineEvent) and e.turn_id == turn_id and isinstance(e.event, AudioReady) and e.event.text.strip()]
        surfaced = [e.message for e in events if isinstance(e, (ev.ErrorRaised, ev.Notice))]
        if finished is not None and finished.error:
            surfaced.append(finished.error)
        user = assistant = None
        if finished is not None:
            assistant = self.repo.get_message(1, finished.message_id) if finished.message_id else None
            started = [e for e in events if isinstance(e, ev.TurnStarted) and e.turn_id == turn_id]
            if started:
                user = self.repo.get_message(1, started[0].user_message_id)
        return Turn(finished, tokens, spoken, surfaced, user, assistant, events)

    async def typed(self, text: str, timeout: float = 15.0) -> Turn:
        mark = self.page.mark()
        reply = await self.session.say(text)
        assert reply is not None
        finished = await self.page.wait_for(ev.TurnFinished, mark, timeout, lambda e: e.turn_id == reply.turn_id)
        return self.collect(mark, finished)

    async def spoken(self, words: str, *, repeat: int = 1, seconds: float = 0.7, timeout: float = 15.0) -> Turn:
        """Say ``words`` (the recognizer's script entry, ``repeat`` times: a connection
        that dies after finalizing the segment consumed one) and wait for the reply."""
        assert self.mic is not None
        mark = self.page.mark()
        self.dg.say(*([words] * repeat))
        await self.mic.say(seconds)
        finished = await self.page.wait_for(ev.TurnFinished, mark, timeout)
        return self.collect(mark, finished)

    async def settled_status(self, timeout: float = 3.0) -> str:
        """The status once the turn and its playback are over (or what it is stuck at)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self.session.status in ("thinking", "speaking"):
                    await asyncio.sleep(0.02)
        return self.session.status


def _fast(monkeypatch, cls: type, overrides: dict) -> None:
    """``cls.from_settings`` with test-sized waits (the factory calls it with none)."""
    original = cls.from_settings.__func__

    def from_settings(klass, settings, keys, **kw):
        return original(klass, settings, keys, **{**overrides, **kw})

    monkeypatch.setattr(cls, "from_settings", classmethod(from_settings))


def numbered_reply(replies: list[str]):
    """A new reply each time (the app's TTS cache must never serve a turn's audio)."""

    def reply(messages: list[dict]) -> str:
        text = f"Reply {len(replies) + 1}: sure, I can help with that. Here is a short answer, and a little more."
        replies.append(text)
        return text

    return reply


@contextlib.asynccontextmanager
async def fault_rig(tmp_path, monkeypatch, *, base_chat: ChatBehavior, base_speech: SpeechBehavior, tts: str = "openai", stt: str = "deepgram"):
    from voiceclaw_app import accounts
    from voiceclaw_app.config import VoiceSettings
    from voiceclaw_app.db import repo
    from voiceclaw_app.providers import factory, openai_llm
    from voiceclaw_app.providers.deepgram_flux import FluxListener
    from voiceclaw_app.providers.deepgram_stt import DeepgramListener
    from voiceclaw_app.providers.deepgram_tts import DeepgramTTS
    from voiceclaw_app.providers.openai_tts import OpenAITTS
    from voiceclaw_app.session import session as session_mod
    from voiceclaw_app.states import services

    replies: list[str] = []
    dg = await FakeDeepgramServer(api_key=DG_KEY).start()
    dg.speak.profile.first_audio_s, dg.speak.profile.rtf = AURA_FIRST_AUDIO_S, AURA_RTF
    chat = await FakeChatServer(replace(base_chat), reply_fn=numbered_reply(replies), api_key=LLM_KEY).start()
    speech = await FakeSpeechServer(replace(base_speech), api_key=TTS_KEY).start()
    session = rig = None
    try:
        env = {
            "VOICECLAW_DATA_DIR": str(tmp_path), "VOICECLAW_DATABASE_URL": f"sqlite:///{tmp_path / 'faults.db'}",
            "VOICECLAW_LLM_BASE_URL": chat.base_url, "VOICECLAW_LLM_MODEL": "fake-model", "VOICECLAW_LLM_API_KEY": LLM_KEY,
            "VOICECLAW_STT": "deepgram-flux" if stt == "flux" else "deepgram", "VOICECLAW_DEEPGRAM_URL": dg.url, "DEEPGRAM_API_KEY": DG_KEY,
            "VOICECLAW_TTS": "deepgram" if tts == "aura" else "openai", "VOICECLAW_TTS_BASE_URL": speech.base_url, "OPENAI_API_KEY": TTS_KEY, "VOICECLAW_TTS_VOICE": "alloy",
        }
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setattr(services, "_runner_cache", {})
        monkeypatch.setattr(services, "_audio_store", None)
        monkeypatch.setattr(factory, "_server_vad", lambda: None)
        monkeypatch.setattr(session_mod, "RETRY_AFTER_FAILURE_MS", RETRY_AFTER_FAILURE_MS)
        monkeypatch.setattr(openai_llm, "BACKOFF_S", LLM_BACKOFF_S)
        _fast(monkeypatch, DeepgramListener, FAST_LISTENER)
        _fast(monkeypatch, FluxListener, FAST_LISTENER)
        _fast(monkeypatch, OpenAITTS, FAST_SPEECH)
        _fast(monkeypatch, DeepgramTTS, FAST_AURA)
        repo.create_all()
        accounts.add_user("person-one", "person-one-password")  # user 1, whose session this is
        repo.save_settings(VoiceSettings.from_env().replace(llm_read_timeout_s=1.0, fallback_to_local=False, vad_silence_ms=300))
        # the runner (and its fixed phrases' audio) before any fault: the prefetch's
        # requests must not meet a fault meant for a turn
        await services.get_runner(await services.load_settings(1))
        loop = asyncio.get_running_loop()
        await asyncio.gather(*[t for t in list(services._BACKGROUND) if t.get_loop() is loop], return_exceptions=True)
        sink = FakeSink()
        session, _, _ = await make_session(sink, TOKEN)
        page = Page(session)
        session.subscribe(page)
        rig = Rig(dg, chat, speech, session, page, sink, repo, replies, tts=tts, stt=stt, base_chat=base_chat, base_speech=base_speech)
        yield rig
    finally:
        if rig is not None and rig.mic is not None:
            await rig.mic.stop()
        if session is not None:
            await session.close()
            if session.reply is not None and session.reply.task is not None:
                await asyncio.gather(session.reply.task, return_exceptions=True)
            await session.drain()
        for srv in (dg, chat, speech):
            await srv.stop()
