"""Silero end-of-turn detector on the spoken fixtures and on hostile input."""

from __future__ import annotations


import numpy as np
import pytest

from voiceclaw_app.providers.silero_vad import (
    EndOfTurn,
    MaxLengthCut,
    OnsetDiscarded,
    SileroTurnDetector,
    SpeechStart,
)

from tests.audio_fixtures import RATE, fixture, speech_only


def silence(ms: int, amplitude: int = 30, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return rng.integers(-amplitude, amplitude + 1, RATE * ms // 1000, dtype=np.int16).astype("<i2").tobytes()


def feed(det: SileroTurnDetector, pcm: bytes, frame_bytes: int = 640, t0: float = 0.0) -> list:
    """Push ``pcm`` in frames; each frame's time is the end of its audio."""
    events = []
    sent = 0
    for i in range(0, len(pcm), frame_bytes):
        frame = pcm[i : i + frame_bytes]
        sent += len(frame)
        events.extend(det.push(frame, t0 + 1000.0 * (sent // 2) / RATE))
    return events


def kinds(events: list) -> list[str]:
    return [type(e).__name__ for e in events]


@pytest.fixture()
def det():
    d = SileroTurnDetector(silence_ms=500, min_speech_ms=200, max_utterance_s=30)
    yield d
    d.close()


@pytest.mark.parametrize("name", ["q_weather", "q_joke", "q_book"])
def test_fixture_gives_start_pause_and_end_of_turn(det, name):
    pcm, meta = fixture(name)
    events = feed(det, pcm + silence(600))
    assert kinds(events) == ["VoiceOnset", "SpeechStart", "ShortPause", "EndOfTurn"]
    onset, start, pause, eot = events
    # the onset (barge-in) comes a few windows into the voice, before it counts as speech
    assert onset.start_ms == start.start_ms and onset.t_ms < start.t_ms
    assert onset.t_ms - onset.start_ms <= 64 + 32
    known_end = 1000.0 * (meta["last_voiced_sample"] + 1) / RATE
    known_start = 1000.0 * meta["first_voiced_sample"] / RATE
    assert known_start - 100 <= start.start_ms <= known_start + 100
    # speech_end is the last voiced window, within silero's ~32-100 ms hangover
    assert known_end - 40 <= eot.speech_end_ms <= known_end + 200
    assert eot.t_ms - eot.speech_end_ms >= 500 - 1
    assert pause.t_ms < eot.t_ms
    # the speculative transcript is reusable only if the audio is identical
    assert pause.pcm == eot.pcm
    # the utterance holds the whole speech
    assert len(eot.pcm) // 2 >= meta["last_voiced_sample"] - meta["first_voiced_sample"]


def test_longer_silence_setting_decides_later():
    pcm, _ = fixture("q_joke")
    audio = pcm + silence(1500)
    decided = {}
    for ms in (200, 800):
        d = SileroTurnDetector(silence_ms=ms)
        eots = [e for e in feed(d, audio) if isinstance(e, EndOfTurn)]
        d.close()
        assert len(eots) == 1
        decided[ms] = eots[0].t_ms
    assert 500 <= decided[800] - decided[200] <= 700


def test_short_silence_setting_still_fires_without_short_pause():
    d = SileroTurnDetector(silence_ms=200)
    events = feed(d, fixture("q_joke")[0] + silence(400))
    d.close()
    assert "EndOfTurn" in kinds(events)


def test_silence_only_gives_nothing(det):
    assert feed(det, silence(3000)) == []
    assert feed(det, bytes(RATE * 2 * 2)) == []  # digital zeros


def test_clicks_and_a_cough_are_ignored(det):
    click = np.zeros(RATE // 2, dtype=np.int16)
    click[:80] = 30000  # a 5 ms pop
    click[80:160] = -30000
    burst = speech_only("q_joke")[: 2 * RATE * 120 // 1000]  # 120 ms of voice < min_speech_ms
    audio = silence(300) + click.tobytes() * 3 + burst + silence(900)
    events = feed(det, audio)
    assert not [e for e in events if isinstance(e, (SpeechStart, EndOfTurn))]
    # the burst paused playback (onset) and is then dropped: resume
    assert kinds(events) == ["VoiceOnset", "OnsetDiscarded"]
    onset, dropped = events
    assert onset.start_ms == dropped.start_ms and dropped.t_ms > onset.t_ms


def test_push_to_talk_mode_joins_pauses_until_the_release():
    d = SileroTurnDetector(silence_ms=500, end_on_silence=False)
    a, b = speech_only("q_joke"), speech_only("q_time")
    events = feed(d, silence(300) + a + silence(1500) + b + silence(900))
    assert "EndOfTurn" not in kinds(events) and kinds(events).count("SpeechStart") == 1
    out = d.flush(99_999.0)
    d.close()
    assert kinds(out) == ["EndOfTurn"] and len(out[0].pcm) // 2 > (len(a) + len(b)) // 2


def test_flush_of_a_too_short_burst_discards_the_onset(det):
    burst = speech_only("q_joke")[: 2 * RATE * 120 // 1000]
    events = feed(det, silence(300) + burst)
    assert kinds(events) == ["VoiceOnset"]
    out = det.flush(5000.0)
    assert len(out) == 1 and isinstance(out[0], OnsetDiscarded) and out[0].t_ms == 5000.0
    assert det.flush() == []


def test_min_speech_setting_admits_the_same_burst_when_lowered():
    burst = speech_only("q_joke")[: 2 * RATE * 500 // 1000]
    d = SileroTurnDetector(silence_ms=500, min_speech_ms=0)
    events = feed(d, silence(300) + burst + silence(900))
    d.close()
    assert "SpeechStart" in kinds(events)


def test_odd_frame_sizes_give_the_same_turn(det):
    pcm, _ = fixture("q_weather")
    audio = pcm + silence(700)
    ref = [e for e in feed(det, audio) if isinstance(e, EndOfTurn)][0]
    other = SileroTurnDetector(silence_ms=500)
    rng = np.random.default_rng(3)
    events, pos = [], 0
    while pos < len(audio):
        n = int(rng.integers(1, 1500))  # odd byte counts and sub-sample splits included
        frame = audio[pos : pos + n]
        pos += len(frame)
        events.extend(other.push(frame, 1000.0 * (pos // 2) / RATE))
    other.close()
    eots = [e for e in events if isinstance(e, EndOfTurn)]
    assert len(eots) == 1
    assert eots[0].pcm == ref.pcm
    assert abs(eots[0].speech_end_ms - ref.speech_end_ms) < 1.0


def test_resumed_speech_cancels_the_pause_and_joins_one_turn(det):
    a, b = speech_only("q_joke"), speech_only("q_time")
    events = feed(det, silence(300) + a + silence(300) + b + silence(700))
    k = kinds(events)
    assert k.count("EndOfTurn") == 1
    assert "SpeechResumed" in k
    assert k.index("ShortPause") < k.index("SpeechResumed") < k.index("EndOfTurn")
    eot = events[-1]
    assert len(eot.pcm) // 2 > (len(a) + len(b)) // 2


def test_two_minute_monologue_is_cut_once_with_a_notice():
    d = SileroTurnDetector(silence_ms=500, max_utterance_s=30)
    speech = b"".join(speech_only(n) + silence(100, seed=i) for i, n in enumerate(["q_weather", "q_book", "q_time", "q_dinner"]))
    monologue = (speech * 40)[: 2 * RATE * 120]  # two minutes, no pause long enough to end a turn
    events = feed(d, silence(200) + monologue)
    cuts = [e for e in events if isinstance(e, MaxLengthCut)]
    eots = [e for e in events if isinstance(e, EndOfTurn)]
    assert len(cuts) == 1 and "30 seconds" in cuts[0].message
    assert len(eots) == 1 and eots[0].cut
    assert 29_000 <= eots[0].duration_ms <= 31_000
    # after the speaker pauses, the next utterance is a normal turn again
    later = feed(d, silence(800) + fixture("q_joke")[0] + silence(700), t0=200_000)
    d.close()
    assert [e for e in later if isinstance(e, EndOfTurn) and not e.cut]


def test_nan_and_clipped_float_frames(det):
    speech = np.frombuffer(fixture("q_joke")[0], dtype="<i2").astype(np.float32) / 32768.0
    nan_frames = np.full(RATE, np.nan, dtype=np.float32)
    assert det.push(nan_frames, 1000.0) == []
    inf_frames = np.full(RATE // 2, np.inf, dtype=np.float32)
    assert not [e for e in det.push(inf_frames, 1500.0) if isinstance(e, SpeechStart)]
    det.reset()
    clipped = np.clip(speech * 30.0, -1.0, 1.0)  # heavy clipping: still speech
    clipped[::97] = np.nan  # sprinkled NaN
    events = []
    t = 0.0
    for i in range(0, clipped.size, 480):
        chunk = clipped[i : i + 480]
        t += 1000.0 * chunk.size / RATE
        events.extend(det.push(chunk, t))
    events.extend(det.push(np.zeros(RATE, dtype=np.float32), t + 1000.0))
    assert "EndOfTurn" in kinds(events)


def test_flush_ends_a_push_to_talk_turn(det):
    pcm = speech_only("q_joke")
    events = feed(det, silence(300) + pcm)
    assert "SpeechStart" in kinds(events)
    out = det.flush(99_999.0)
    assert len(out) == 1 and isinstance(out[0], EndOfTurn) and out[0].t_ms == 99_999.0
    assert det.flush() == []  # nothing left



def test_silero_gate_answers_silence_without_the_model_and_still_hears_speech():
    """The Deepgram listener's per-frame gate: quiet windows (a room through noise
    suppression) never reach the VAD helper, speech does, and the verdicts agree with
    the model's own (the fixture's voice is heard, the silence around it is not)."""
    from voiceclaw_app.providers.silero_vad import SileroGate

    gate = SileroGate()
    try:
        pcm = silence(1000) + speech_only("q_time") + silence(1000)
        verdicts: list[bool] = []
        for i in range(0, len(pcm) - 639, 640):  # 20 ms frames, as the page sends them
            frame = pcm[i : i + 640]
            v = gate.quick(frame)
            verdicts.append(gate(frame) if v is None else v)
        first_second = verdicts[:50]
        assert not any(first_second), "silence was taken for voice"
        assert sum(verdicts[50:-50]) > 0.6 * len(verdicts[50:-50]), "the speech was not heard"
        assert not any(verdicts[-30:]), "the trailing silence was taken for voice"
        # the two seconds of silence never went to the helper; the speech did
        assert gate.skipped_windows >= 55 and gate.model_windows > 0
        assert gate.model_windows < gate.skipped_windows + len(speech_only("q_time")) // 1024 + 2
    finally:
        gate.close()


def test_pause_begins_early_with_the_pcm_the_pause_and_the_end_of_turn_carry():
    """smart_turn's early transcription: PauseBegins one window into the pause, with
    byte-identical PCM to the ShortPause and EndOfTurn that follow (so its transcript is
    reused); a breath shorter than the short pause gives PauseAborted, not SpeechResumed."""
    d = SileroTurnDetector(silence_ms=2000, min_speech_ms=200, short_pause_ms=96, early_pause_ms=32)
    try:
        events = feed(d, silence(300) + speech_only("q_joke") + silence(2100))
        k = kinds(events)
        assert k[:2] == ["VoiceOnset", "SpeechStart"] and k[-3:] == ["PauseBegins", "ShortPause", "EndOfTurn"]
        assert "ShortPause" not in k[:-2]  # dips between words at most begin a pause (below)
        begins, pause, eot = events[-3:]
        assert begins.pcm == pause.pcm == eot.pcm
        assert begins.speech_end_ms == pause.speech_end_ms == eot.speech_end_ms
        assert 20 <= begins.t_ms - begins.speech_end_ms <= 64 < pause.t_ms - pause.speech_end_ms
    finally:
        d.close()
    # gaps between words: a gap of a silent window or two gives PauseBegins, then
    # PauseAborted when the voice comes back (the transcription is dropped, no turn
    # restarts); a pause's events come in order: PauseBegins, [ShortPause, SpeechResumed]
    # or PauseAborted
    a, b = speech_only("q_joke"), speech_only("q_time")
    aborted = 0
    for gap_ms in (96, 128, 160):
        d = SileroTurnDetector(silence_ms=2000, min_speech_ms=200, short_pause_ms=96, early_pause_ms=32)
        try:
            k = kinds(feed(d, silence(300) + a + bytes(2 * RATE * gap_ms // 1000) + b + silence(2100)))
        finally:
            d.close()
        assert k.count("EndOfTurn") == 1 and k[-3:] == ["PauseBegins", "ShortPause", "EndOfTurn"]
        opened = False  # a PauseBegins whose pause has not ended
        for kind in k:
            if kind == "PauseBegins":
                assert not opened
                opened = True
            elif kind == "ShortPause":
                assert opened
            elif kind in ("PauseAborted", "SpeechResumed"):
                assert opened
                opened = False
        aborted += k.count("PauseAborted")
        if "PauseAborted" in k:
            assert "SpeechResumed" not in k[: k.index("PauseAborted")]
    assert aborted >= 1


def test_a_gate_asks_the_vad_helper_nothing_until_it_scores_a_window(monkeypatch):
    """A listener is built on the event loop: its gate must not wait there for the helper
    (a round trip queued behind every session's windows); the context comes with the
    first window scored, off the loop."""
    from voiceclaw_app.providers import silero_vad

    proc = silero_vad.vad_process()
    real = proc.call
    ops: list[bytes] = []
    monkeypatch.setattr(proc, "call", lambda op, ctx, payload, size: (ops.append(op), real(op, ctx, payload, size))[1])
    gate = silero_vad.SileroGate()
    assert ops == []
    voice = speech_only("q_joke")[: 2 * RATE]  # a second of speech: windows above the floor
    assert gate(voice) in (True, False)
    assert ops[0] == b"N" and b"P" in ops and gate.model_windows > 0
    gate.close()
    assert ops[-1] == b"D"
