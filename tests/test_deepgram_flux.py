"""FluxListener (``listen.v2``) through the real deepgram-sdk against tests/servers/deepgram_flux.py,
and Flux's events driving the app's TurnStarter (eager start, resume -> dropped, end of turn -> committed)."""

from __future__ import annotations

import asyncio

import pytest

from tests.servers.deepgram import FakeDeepgramServer
from tests.test_deepgram import collect_until, push_audio, silence, tone
from voiceclaw_app.config import SettingsError, VoiceSettings
from voiceclaw_app.providers.base import AuthError, EndOfTurn, InterimTranscript, ListenNotice, PreliminaryTranscript, SpeechStarted
from voiceclaw_app.providers.deepgram_flux import FluxListener, FluxOptions

KEY = "dg-test-key"


def flux(srv, **kw) -> FluxListener:
    opts = kw.pop("flux", FluxOptions(eot_threshold=0.7, eager_eot_threshold=0.5, eot_timeout_ms=5000))
    return FluxListener(api_key=KEY, url=srv.url, flux=opts, **kw)


async def test_eager_end_of_turn_then_end_of_turn():
    async with FakeDeepgramServer(api_key=KEY, script=["What is the capital of France?"]) as srv:
        lst = flux(srv)
        await lst.start()
        q = srv.flux.sessions[0].query
        assert q == {"model": "flux-general-en", "encoding": "linear16", "sample_rate": "16000", "eot_threshold": "0.7", "eot_timeout_ms": "5000", "eager_eot_threshold": "0.5"}
        t_end = await push_audio(lst, tone(1.0), 0.0)
        await push_audio(lst, silence(0.6), t_end)
        events = await collect_until(lst, (EndOfTurn,))
        kinds = [type(e) for e in events]
        assert SpeechStarted in kinds and InterimTranscript in kinds
        pre = next(e for e in events if isinstance(e, PreliminaryTranscript))
        eot = events[-1]
        assert pre.text == eot.text == "What is the capital of France?"
        assert kinds.index(PreliminaryTranscript) < kinds.index(EndOfTurn)
        assert abs(eot.speech_end_ms - t_end) < 60  # the last word's end, mapped to the frame clock
        assert srv.flux.sessions[0].events()[:1] == ["StartOfTurn"]
        await lst.aclose()


async def test_without_eager_threshold_no_eager_events():
    async with FakeDeepgramServer(api_key=KEY, script=["Hello there."]) as srv:
        lst = flux(srv, flux=FluxOptions(eager_eot_threshold=0.0))
        await lst.start()
        assert "eager_eot_threshold" not in srv.flux.sessions[0].query
        t = await push_audio(lst, tone(0.6), 0.0)
        await push_audio(lst, silence(0.5), t)
        events = await collect_until(lst, (EndOfTurn,))
        assert not any(isinstance(e, PreliminaryTranscript) for e in events)
        assert "EagerEndOfTurn" not in srv.flux.sessions[0].events()
        await lst.aclose()


async def test_turn_resumed_is_a_speech_start_that_drops_the_early_reply():
    async with FakeDeepgramServer(api_key=KEY, script=["Good morning, how are you doing?"]) as srv:
        lst = flux(srv)
        await lst.start()
        t = await push_audio(lst, tone(0.5), 0.0)
        t = await push_audio(lst, silence(0.2), t)  # eager (150 ms) but not the end of turn (260 ms)
        t = await push_audio(lst, tone(0.5), t)
        await push_audio(lst, silence(0.5), t)
        events = await collect_until(lst, (EndOfTurn,))
        sent = srv.flux.sessions[0].events()
        assert "EagerEndOfTurn" in sent and "TurnResumed" in sent
        i_pre = next(i for i, e in enumerate(events) if isinstance(e, PreliminaryTranscript))
        assert any(isinstance(e, SpeechStarted) for e in events[i_pre + 1 :])  # the resume
        assert events[-1].text == "Good morning, how are you doing?"
        await lst.aclose()


async def test_push_to_talk_release_sends_force_end_turn():
    async with FakeDeepgramServer(api_key=KEY, script=["Set a timer."]) as srv:
        lst = flux(srv, hands_free=False)
        await lst.start()
        await push_audio(lst, tone(0.6), 0.0)  # released right after speaking: no silence for the model
        await lst.finish_utterance()
        events = await collect_until(lst, (EndOfTurn,), timeout=2.0)
        assert events[-1].text == "Set a timer."
        assert srv.flux.sessions[0].force_end_turns == 1
        assert [m.get("trigger") for m in srv.flux.sessions[0].sent if m.get("event") == "EndOfTurn"] == ["manual"]
        await lst.aclose()


async def test_push_to_talk_pause_while_held_does_not_end_the_turn():
    async with FakeDeepgramServer(api_key=KEY, script=["Remind me", "to call mom."]) as srv:
        lst = flux(srv, hands_free=False)
        await lst.start()
        t = await push_audio(lst, tone(0.5), 0.0)
        t = await push_audio(lst, silence(0.5), t)  # Flux ends its turn; the button is still held
        t = await push_audio(lst, tone(0.5), t)
        await lst.finish_utterance()
        events = await collect_until(lst, (EndOfTurn,), timeout=3.0)
        assert events[-1].text == "Remind me to call mom."
        assert sum(isinstance(e, EndOfTurn) for e in events) == 1
        await lst.aclose()


async def test_bad_key_is_refused_with_a_clear_message():
    async with FakeDeepgramServer(api_key=KEY) as srv:
        lst = FluxListener(api_key="wrong", url=srv.url, start_retries=0)
        with pytest.raises(AuthError) as err:
            await lst.start()
        assert "rejected the API key" in err.value.user_message
        await lst.aclose()


async def test_drop_mid_turn_reconnects_and_the_words_are_not_lost():
    async with FakeDeepgramServer(api_key=KEY, script=["Tell me a joke please."]) as srv:
        srv.flux.then(drop_after_audio_s=0.4)
        lst = flux(srv)
        await lst.start()
        t = await push_audio(lst, tone(0.8), 0.0)
        await push_audio(lst, silence(0.6), t)
        events = await collect_until(lst, (EndOfTurn,), timeout=4.0)
        assert events[-1].text == "Tell me a joke please."
        assert len(srv.flux.sessions) == 2 and srv.flux.sessions[0].dropped
        assert lst.stats["reconnects"] == 1 and lst.stats["replayed_frames"] > 0
        await lst.aclose()


async def test_close_sends_close_stream():
    async with FakeDeepgramServer(api_key=KEY) as srv:
        lst = flux(srv)
        await lst.start()
        await lst.aclose()
        assert srv.flux.sessions[0].close_stream


async def test_service_down_reports_a_notice_and_recovers():
    async with FakeDeepgramServer(api_key=KEY, script=["Are you back?"]) as srv:
        srv.flux.then(drop_after_audio_s=0.1)
        for _ in range(3):
            srv.flux.then(reject_status=503)
        lst = flux(srv, recover_backoff_s=(0.1,), max_reconnects=1)
        await lst.start()
        t = await push_audio(lst, tone(0.4), 0.0)
        events = await collect_until(lst, (ListenNotice,), timeout=5.0)
        assert events[-1].kind == "error" and "Deepgram" in events[-1].message
        srv.flux.faults.clear()
        await asyncio.sleep(0.2)
        t = await push_audio(lst, tone(0.6), t + 300)
        await push_audio(lst, silence(0.6), t)
        events = await collect_until(lst, (EndOfTurn,), timeout=5.0)
        assert any(isinstance(e, ListenNotice) and e.kind == "info" for e in events)  # "is back"
        assert events[-1].text == "Are you back?"
        await lst.aclose()


def test_settings_validate_flux_thresholds():
    s = VoiceSettings.from_dict({"stt_provider": "deepgram-flux", "eot_threshold": "0.8", "eager_eot_threshold": "0.6", "eot_timeout_ms": "3000"})
    assert (s.eot_threshold, s.eager_eot_threshold, s.eot_timeout_ms) == (0.8, 0.6, 3000)
    with pytest.raises(SettingsError) as err:
        VoiceSettings.from_dict({"eot_threshold": "0.6", "eager_eot_threshold": "0.7"})
    assert "eager_eot_threshold" in err.value.errors
    with pytest.raises(SettingsError) as err:
        VoiceSettings.from_dict({"eot_threshold": "1.5", "eot_timeout_ms": "50"})
    assert set(err.value.errors) >= {"eot_threshold", "eot_timeout_ms"}


async def _starter_turns(srv, lst, pcm_plan, tmp_path):
    """Feed Flux's events to the app's TurnStarter, as the mic session does; returns
    (committed turns, discarded guesses, LLM requests)."""
    from tests.fakes import ToneTTS
    from tests.servers.openai_chat import ChatBehavior, FakeChatServer
    from voiceclaw_app.pipeline.audio_store import AudioStore
    from voiceclaw_app.pipeline.preemptive import TurnStarter
    from voiceclaw_app.pipeline.turn import TurnRunner
    from voiceclaw_app.providers.openai_llm import OpenAICompatLLM

    async with FakeChatServer(ChatBehavior(ttft_s=0.05, tokens_per_s=200)) as chat:
        runner = TurnRunner(llm=OpenAICompatLLM(chat.base_url), tts=ToneTTS(0.01), audio_store=AudioStore(tmp_path), settings=VoiceSettings(llm_base_url=chat.base_url, llm_model_voice="m"))

        async def prepare():
            return runner, runner.prepare([], "conv")

        starter = TurnStarter(prepare)
        committed = []

        async def consume():
            async for ev in lst.events():
                turn = await starter.handle(ev)
                if turn is not None:
                    committed.append(turn)
                    [e async for e in turn.turn.events()]
                    return

        task = asyncio.create_task(consume())
        t = 0.0
        for kind, seconds in pcm_plan:
            t = await push_audio(lst, tone(seconds) if kind == "voice" else silence(seconds), t)
        await asyncio.wait_for(task, 5.0)
        await starter.aclose()
        return committed, starter.discarded, len(chat.bodies)


async def test_flux_eager_start_is_committed_at_the_end_of_turn(tmp_path):
    async with FakeDeepgramServer(api_key=KEY, script=["What time is it?"]) as srv:
        lst = flux(srv)
        await lst.start()
        committed, discarded, requests = await _starter_turns(srv, lst, [("voice", 0.8), ("silence", 0.6)], tmp_path)
        assert len(committed) == 1 and committed[0].reused  # the reply started at EagerEndOfTurn was kept
        assert discarded == 0 and requests == 1
        await lst.aclose()


async def test_flux_turn_resumed_cancels_the_early_reply(tmp_path):
    async with FakeDeepgramServer(api_key=KEY, script=["Good morning, how are you doing?"]) as srv:
        lst = flux(srv)
        await lst.start()
        plan = [("voice", 0.5), ("silence", 0.2), ("voice", 0.5), ("silence", 0.6)]
        committed, discarded, requests = await _starter_turns(srv, lst, plan, tmp_path)
        assert len(committed) == 1 and committed[0].text == "Good morning, how are you doing?"
        assert discarded == 1  # the guess at the pause was dropped on TurnResumed
        assert requests == 2
        await lst.aclose()
