"""The fault matrix (issue 9, "Fault suite"): one cell per (stage, fault), each a
turn of the real voice session against the real protocol servers (``fault_rig.py``).

Stages: STT (a spoken turn into Deepgram's live socket, v1; ``stt-flux``: Flux, v2),
LLM and TTS (a typed turn answered aloud through the OpenAI-compatible chat and
speech servers; ``tts-aura``: Deepgram Aura's speak socket, the streamed-text path).
Faults: the server does not answer (``timeout``; for STT also on every socket,
``silent``), answers 5xx (``5xx``), is down (``refused``: connections refused; for
STT the session's socket is refused with 503), drops the connection mid-stream
(``drop``), goes silent mid-stream (``stall``), or trickles (``trickle``). After each
fault turn:

1. the user message is stored (or, when nothing was heard, nothing is stored);
2. every word streamed to the page, and every chunk whose audio was sent, is in the
   stored assistant message (never stored empty after text was produced);
3. a reply cut short carries an error (stored, and shown); a reply whose speech
   stopped is said to be text only from there (a notice); what the page is told is
   plain words: no exception, no stack, no key;
4. the status leaves "thinking"/"speaking" ("error" is the status of a turn that
   failed before saying anything: it clears with the next action);
5. once the fault is cleared, the next turn on the same session works.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from tests.servers.openai_chat import ChatBehavior
from tests.servers.openai_speech import SpeechBehavior
from voiceclaw_app.pipeline.timing import now_ms
from voiceclaw_app.session import events as ev

from .fault_rig import Mic, Rig, Turn, assert_plain, fault_rig

#: fast servers, so a cell's time goes to its fault
BASE_CHAT = ChatBehavior(ttft_s=0.05, tokens_per_s=100.0)
BASE_SPEECH = SpeechBehavior(ttfb_s=0.05, realtime_factor=20.0)

LLM_FAULTS = {
    "timeout": {"stall_before_headers": True},
    "5xx": {"status": 503},
    "refused": {},  # the server is down: connections are refused
    "drop": {"drop_after_tokens": 11},  # after the first chunk went to the TTS
    "stall": {"stall_after_tokens": 11},
    "trickle": {"tokens_per_s": 8.0},
}
TTS_FAULTS = {
    "timeout": {"stall_before_headers": True},
    "5xx": {"status": 503},
    "refused": {},
    "drop": {"drop_after_bytes": 20000},  # after the chunk's first piece was handed over
    "stall": {"stall_after_bytes": 20000},
    "trickle": {"trickle_bytes_per_s": 4000.0},  # a twelfth of real time
}
#: ``timeout``: one socket goes deaf (the watchdog's reconnect heals it); ``silent``: every
#: socket does (a service that accepts connections and never answers)
STT_FAULTS = ("timeout", "silent", "5xx", "drop", "trickle", "refused")
#: Aura takes the reply's text over one warm socket (the streamed path): the fault
#: reaches that open socket through the speak service's profile
AURA_FAULTS = {"timeout": {"first_audio_s": 30.0}}

#: Flux (v2 /listen) shares the v1 listener's reconnect and failure handling: the two
#: faults its server injects
FLUX_FAULTS = ("drop", "refused")

CELLS = (
    [("stt", f) for f in STT_FAULTS] + [("stt-flux", f) for f in FLUX_FAULTS]
    + [("llm", f) for f in LLM_FAULTS]
    + [("tts", f) for f in TTS_FAULTS] + [("tts-aura", f) for f in AURA_FAULTS]
)


@pytest.fixture()
async def rig(request, tmp_path, monkeypatch):
    stage = request.node.callspec.params.get("stage")
    tts = "aura" if stage == "tts-aura" else "openai"
    stt = "flux" if stage == "stt-flux" else "deepgram"
    async with fault_rig(tmp_path, monkeypatch, base_chat=BASE_CHAT, base_speech=BASE_SPEECH, tts=tts, stt=stt) as r:
        yield r


# ---------------------------------------------------------------- the checks
async def check_status(rig: Rig) -> None:
    status = await rig.settled_status()
    assert status in ("listening", "idle", "error"), f"status stuck at {status!r}"
    assert rig.sink.chat.session_status == status


def check_words_kept(turn: Turn) -> None:
    a = turn.assistant
    assert a is not None and a["finished"], "the assistant message was not finished"
    if turn.tokens.strip():
        assert a["content"], "a reply that produced text was stored empty"
    if not a["interrupted"]:
        assert a["content"] == turn.tokens.strip(), "the stored reply differs from what the page was sent"
    for chunk in turn.spoken:
        assert chunk.strip() in a["content"], f"spoken words missing from the stored reply: {chunk!r}"


def check_surfaced_plainly(turn: Turn) -> None:
    for message in turn.surfaced:
        assert_plain(message)


async def check_next_turn_works(rig: Rig, stage: str, fault: str) -> None:
    await rig.clear_faults()
    if stage.startswith("stt"):
        if fault in ("5xx", "silent", "refused"):
            # a failed listener is rebuilt (refused) or recovers on voice (5xx, silent)
            # after a pause (test-sized): the person speaks again after reading the error
            await asyncio.sleep(0.35)
        turn = await rig.spoken("And what about tomorrow?")
        expected_user = "And what about tomorrow?"
    else:
        expected_user = "One more question, please."
        turn = await rig.typed(expected_user)
    f = turn.finished
    assert f is not None and not f.error and not f.interrupted, f
    assert turn.user is not None and turn.user["content"] == expected_user
    check_words_kept(turn)
    assert turn.assistant["content"] in rig.replies, "the next reply is not a whole reply"
    assert not turn.assistant["error"]
    if not rig.session.muted:
        assert turn.spoken and f.audio_ids, "the next reply was not spoken"
    check_surfaced_plainly(turn)
    status = await rig.settled_status()
    assert status in ("listening", "idle"), f"after a good turn the status is {status!r}"
    started = [e for e in turn.events if isinstance(e, ev.TurnStarted)]
    assert len(started) == 1, f"one utterance gave {len(started)} turns"


# ---------------------------------------------------------------- the cells
async def inject(rig: Rig, stage: str, fault: str) -> None:
    if stage in ("llm", "tts") and fault == "refused":
        await (rig.chat if stage == "llm" else rig.speech).refuse()
    elif stage == "llm":
        rig.chat.behavior = replace(rig.base_chat, **LLM_FAULTS[fault])
    elif stage == "tts":
        rig.speech.behavior = replace(rig.base_speech, **TTS_FAULTS[fault])
    elif stage == "tts-aura":
        for name, value in AURA_FAULTS[fault].items():
            setattr(rig.dg.speak.profile, name, value)
    elif fault == "timeout":
        rig.listen.then(mute_after_audio_s=0.5)  # hears, never answers: the watchdog reconnects
    elif fault == "silent":
        for _ in range(8):  # the session's socket, its reconnects, its recoveries
            rig.listen.then(mute_after_audio_s=0.0)
    elif fault == "5xx":
        rig.listen.then(drop_after_is_final=True)  # the words are final, then the socket dies...
        for _ in range(3):
            rig.listen.then(reject_status=503)  # ...and every reconnect is refused
    elif fault == "drop":
        rig.listen.then(drop_after_audio_s=0.7)  # mid-utterance (0.3 s of pre-roll, then 0.4 s of voice)
    elif fault == "trickle":
        rig.dg.profile.message_delay_s = 0.3
    elif fault == "refused":
        for _ in range(3):  # every attempt of the session's start
            rig.listen.then(reject_status=503)


async def run_stt_cell(rig: Rig, fault: str) -> None:
    mark = rig.page.mark()
    rig.mic = Mic(rig.session)
    rig.mic.start()  # the page's mic: the session opens the Deepgram socket on its first frame
    if fault == "silent":
        rig.dg.say("What is the weather like today?", "What is the weather like today?")
        await rig.mic.say()
        notice = await rig.page.wait_for(ev.Notice, mark, 10.0)
        assert_plain(notice.message)
        assert rig.sink.chat.notice == notice.message, "the page was not shown the failure"
        assert not rig.page.since(mark, ev.TurnStarted) and rig.messages() == [], "a turn came out of nothing"
        await check_status(rig)
        return
    if fault == "refused":
        error = await rig.page.wait_for(ev.ErrorRaised, mark, 10.0)
        assert_plain(error.message)
        assert "503" in error.message
        assert rig.sink.chat.error == error.message, "the page was not shown the failure"
        assert not rig.page.since(mark, ev.TurnStarted) and rig.messages() == [], "a turn came out of nothing"
        await check_status(rig)
        return
    words = "What is the weather like today?"
    # a muted connection finalizes the segment it never reports: its script entry is spent
    turn = await rig.spoken(words, repeat=2 if fault == "timeout" else 1)
    assert turn.user is not None and turn.user["content"] == words, "the user's words were not stored"
    check_words_kept(turn)
    assert not turn.finished.error and turn.assistant["content"] in rig.replies
    check_surfaced_plainly(turn)
    if fault == "5xx":
        failed = [n for n in turn.surfaced if "503" in n]
        assert failed, f"the page was not told listening failed: {turn.surfaced}"
    await check_status(rig)
    turns = rig.page.since(mark, ev.TurnStarted)
    assert len(turns) == 1, f"one utterance gave {len(turns)} turns: {[t.user_text for t in turns]}"


async def run_llm_cell(rig: Rig, fault: str) -> None:
    if fault == "trickle":
        await run_trickle_muted(rig)
        return
    turn = await rig.typed("What is the weather like today?")
    assert turn.user is not None and turn.user["content"] == "What is the weather like today?"
    check_words_kept(turn)
    a, f = turn.assistant, turn.finished
    assert f.error and a["error"] == f.error, "the failed reply carries no error"
    assert rig.sink.chat.error == f.error, "the page was not shown the error"
    check_surfaced_plainly(turn)
    if fault in ("drop", "stall"):
        assert turn.tokens.strip() and turn.tokens.strip() not in rig.replies, "expected a reply cut mid-stream"
        assert turn.spoken, "expected the first chunk spoken before the fault"
    else:
        assert not turn.tokens and a["content"] == ""
    await check_status(rig)


async def run_trickle_muted(rig: Rig) -> None:
    """A slow text-only reply: it completes, and it is in the database while it streams
    (written at least every ~1 s), so a crash mid-reply keeps what was shown."""
    await rig.session.on_control({"type": "context", "muted": True})
    mark = rig.page.mark()
    reply = await rig.session.say("Tell me slowly.")
    samples: list[tuple[float, str]] = []
    async with asyncio.timeout(10.0):  # the reply must end (a stuck one fails here)
        while not reply.done:
            await asyncio.sleep(0.1)
            if reply.message_id:
                row = await asyncio.to_thread(rig.repo.get_message, 1, reply.message_id)
                if row is not None and not row["finished"]:
                    samples.append((now_ms(), row["content"]))
    finished = await rig.page.wait_for(ev.TurnFinished, mark, 5.0)
    turn = rig.collect(mark, finished)
    tokens = [(t, e.text) for e, t in zip(rig.page.events[mark:], rig.page.at[mark:]) if isinstance(e, ev.ReplyToken)]
    assert tokens and tokens[-1][0] - tokens[0][0] > 1800, "the trickle was not slow"
    late = [(t, content) for t, content in samples if t - tokens[0][0] > 1500 and t < tokens[-1][0]]
    assert late, "no sample of the stored reply while it streamed"
    for t, content in late:
        shown = "".join(text for at, text in tokens if at < t - 1500)
        assert shown and content.startswith(shown), f"{t - tokens[0][0]:.0f} ms in, the database lags more than 1.5 s: {content!r}"
    assert not finished.error and turn.assistant["content"] in rig.replies
    check_words_kept(turn)
    await check_status(rig)


async def run_tts_cell(rig: Rig, fault: str) -> None:
    turn = await rig.typed("What is the weather like today?")
    assert turn.user is not None and turn.user["content"] == "What is the weather like today?"
    check_words_kept(turn)
    # the text is whole (the LLM was fine), the speech stopped: the page is told so
    assert turn.assistant["content"] in rig.replies and not turn.finished.error
    said = [n for n in turn.surfaced if "text only" in n]
    assert said, f"the page was not told the speech stopped: {turn.surfaced}"
    assert rig.sink.chat.notice == said[-1]
    check_surfaced_plainly(turn)
    if fault in ("drop", "stall"):
        assert turn.spoken, "expected some audio before the fault"
    await check_status(rig)


@pytest.mark.parametrize(("stage", "fault"), CELLS, ids=[f"{s}-{f}" for s, f in CELLS])
async def test_fault_cell(rig, stage, fault):
    await inject(rig, stage, fault)
    if stage.startswith("stt"):
        await run_stt_cell(rig, fault)
    elif stage == "llm":
        await run_llm_cell(rig, fault)
    else:
        await run_tts_cell(rig, fault)
    await check_next_turn_works(rig, stage, fault)
