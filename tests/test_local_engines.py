"""The embedded engines for real: Whisper base, Gemma 3 270M, Piper joe, small inputs.

Each model loads once per test session (module fixtures); the session's private
data dir (tests/conftest.py) receives the assembled model files.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from voiceclaw_app.bench.local import word_error_rate
from voiceclaw_app.providers.base import CancelToken, ChatMessage, LLMRequest
from voiceclaw_app.providers.local_llm import DialoguePrompt, LocalLlamaLLM, fit_chat_messages, fold_system
from voiceclaw_app.providers.local_stt import LocalWhisperSTT, pcm16_to_float, resample
from voiceclaw_app.providers.local_tts import LocalPiperTTS

pytestmark = pytest.mark.slow

FIX = Path(__file__).parent / "fixtures"
SYSTEM = "You are Atlas, a personal AI assistant. Keep responses conversational and concise for voice."

ROUND_TRIP = [
    "The quick brown fox jumps over the lazy dog.",
    "Please set a timer for the oven.",
    "What is the weather going to be like tomorrow morning?",
    "I would like to book a table for dinner tonight.",
    "The library closes early on Sundays.",
    "Can you remind me to call my sister this evening?",
    "Turn off the lights in the kitchen, please.",
    "My favorite color is green, and I love the ocean.",
    "We need to buy milk, bread, and some fresh apples.",
    "How far is the nearest train station from here?",
]


def fixture_pcm(name: str) -> tuple[bytes, str]:
    with wave.open(str(FIX / f"{name}.wav"), "rb") as w:
        pcm = w.readframes(w.getnframes())
    return pcm, json.loads((FIX / f"{name}.json").read_text())["text"]


@pytest.fixture(scope="module")
def stt() -> LocalWhisperSTT:
    engine = LocalWhisperSTT()
    engine._warm_sync()
    return engine


@pytest.fixture(scope="module")
def llm() -> LocalLlamaLLM:
    engine = LocalLlamaLLM(system_prompt=SYSTEM)
    engine._warm_sync()
    return engine


@pytest.fixture(scope="module")
def tts() -> LocalPiperTTS:
    engine = LocalPiperTTS()
    engine._warm_sync()
    return engine


def wav_info(data: bytes) -> tuple[int, int, int, int]:
    with wave.open(io.BytesIO(data), "rb") as w:
        return w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()


# ---------------------------------------------------------------- STT
@pytest.mark.asyncio
@pytest.mark.parametrize("name", ["q_weather", "q_time"])
async def test_stt_transcribes_a_fixture(stt, name):
    pcm, text = fixture_pcm(name)
    result = await stt.transcribe(pcm, sample_rate=16000, language="en")
    assert result.is_final
    assert word_error_rate(text, result.text) <= 0.2, result.text


@pytest.mark.asyncio
async def test_stt_runs_off_the_event_loop(stt):
    pcm, _ = fixture_pcm("q_book")
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    t0 = time.monotonic()
    await stt.transcribe(pcm)
    elapsed = time.monotonic() - t0
    task.cancel()
    # the loop kept ticking while Whisper ran (at least a third of the possible ticks)
    assert ticks >= (elapsed / 0.01) / 3


@pytest.mark.asyncio
async def test_stt_silence_gives_an_empty_transcript(stt):
    rng = np.random.default_rng(0)
    dither = rng.integers(-20, 21, 16000 * 3, dtype=np.int16).astype("<i2").tobytes()
    assert (await stt.transcribe(dither)).text == ""
    assert (await stt.transcribe(bytes(32000))).text == ""
    assert (await stt.transcribe(b"")).text == ""
    assert (await stt.transcribe(b"\x01")).text == ""  # half a sample


@pytest.mark.asyncio
@pytest.mark.parametrize("rate", [44100, 22050])
async def test_stt_resamples_other_rates(stt, rate):
    pcm, text = fixture_pcm("q_joke")
    audio = resample(pcm16_to_float(pcm), 16000, rate)
    other = (audio * 32767).astype("<i2").tobytes()
    result = await stt.transcribe(other, sample_rate=rate)
    assert word_error_rate(text, result.text) <= 0.2, result.text


def test_stt_nan_and_clipped_buffers(stt):
    pcm, text = fixture_pcm("q_weather")
    audio = pcm16_to_float(pcm)
    nan_only = np.full(16000, np.nan, dtype=np.float32)
    assert stt.transcribe_array(nan_only).text == ""
    sprinkled = audio.copy()
    sprinkled[::40] = np.nan
    sprinkled[5::40] = np.inf
    # one word in three may go (the 10 s window reads a NaN-riddled "weather" as "woman")
    assert word_error_rate(text, stt.transcribe_array(sprinkled).text) <= 0.5
    clipped = np.clip(audio * 25.0, -1.0, 1.0)
    assert word_error_rate(text, stt.transcribe_array(clipped).text) <= 0.5


def test_stt_long_audio_takes_the_full_path(stt):
    names = ["q_weather", "q_joke", "q_capital", "q_morning", "q_book", "q_dinner", "q_time", "q_music"]
    parts = [fixture_pcm(n) for n in names]
    gap = np.zeros(16000 * 6 // 10, dtype=np.float32)
    audio = np.concatenate([np.concatenate([pcm16_to_float(p), gap]) for p, _ in parts])  # ~27 s: past the short-window path
    assert audio.size > 26 * 16000
    text = stt.transcribe_array(audio).text
    assert word_error_rate(" ".join(t for _, t in parts), text) <= 0.3, text


def test_stt_cancel_before_decoding(stt):
    pcm, _ = fixture_pcm("q_joke")
    token = CancelToken()
    token.cancel()
    assert stt.transcribe_sync(pcm, cancel=token).text == ""


# ---------------------------------------------------------------- LLM
def test_dialogue_prompt_keeps_a_stable_prefix():
    hist = [ChatMessage("user", "Hello there."), ChatMessage("assistant", "Hi!\nHow can I help?")]
    p = DialoguePrompt("Atlas", SYSTEM)
    pre = p.for_prefill(hist)
    full = p.for_reply(hist + [ChatMessage("user", "What time is it?")])
    assert full.startswith(pre)
    assert full.endswith("User: What time is it?\nAtlas:")
    assert "Hi! How can I help?" in full  # a newline inside a turn would fake a turn boundary
    assert p.for_reply([]).startswith(DialoguePrompt("Atlas", SYSTEM).header())


def test_speaker_label_is_the_requests_assistant_name(llm):
    msgs = [ChatMessage("system", SYSTEM), ChatMessage("user", "Hi.")]
    renamed = llm.dialogue_for(LLMRequest(messages=msgs, assistant_name="Nova")).for_reply(msgs)
    assert renamed.endswith("User: Hi.\nNova:") and "Atlas:" not in renamed
    # a prompt that says "You are helpful" names nobody "helpful"
    kind = [ChatMessage("system", "You are helpful and kind."), ChatMessage("user", "Hi.")]
    for name in ("", "Nova"):
        prompt = llm.dialogue_for(LLMRequest(messages=kind, assistant_name=name)).for_reply(kind)
        assert "helpful:" not in prompt.lower()
        assert prompt.endswith(f"User: Hi.\n{name or llm.assistant_name}:")
    assert llm.dialogue_for(LLMRequest(messages=kind)).stops()[-2] == f"\n{llm.assistant_name}:"


@pytest.mark.asyncio
async def test_llm_speaks_as_the_renamed_assistant(llm):
    msgs = [ChatMessage("system", "You are helpful and kind."), ChatMessage("user", "Hi, what is your name?")]
    reply = await collect(llm, LLMRequest(messages=msgs, max_tokens=40, temperature=0.0, assistant_name="Nova"))
    assert reply.strip() and "Nova:" not in reply and "helpful:" not in reply.lower()
    # the next prefill (which only has the messages) keeps the renamed prefix
    hist = msgs + [ChatMessage("assistant", reply)]
    await asyncio.to_thread(llm.prefill_sync, hist)
    prompt = llm._llm.detokenize(llm._llm._input_ids[: llm._llm.n_tokens].tolist()).decode("utf-8", "ignore")
    assert "Nova: I'm Nova" in prompt and prompt.rstrip().endswith("User:")


@pytest.mark.asyncio
async def test_warm_evaluates_the_startup_header_only_once(llm, tts):
    await llm.warm()  # the fixture's warm-up already ran
    # the saved prompt differs from the start-up one: warm() must not evaluate the old header again
    await asyncio.to_thread(llm.prefill_sync, [ChatMessage("system", "You are a cheerful guide. Answer briefly."), ChatMessage("user", "Hi.")])
    before = llm._llm.n_tokens
    ids = list(llm._llm._input_ids[:before])
    evaluated = []
    real_eval = llm._llm.eval
    llm._llm.eval = lambda tokens: (evaluated.append(len(tokens)), real_eval(tokens))[1]
    try:
        for _ in range(3):
            await llm.warm()
    finally:
        llm._llm.eval = real_eval
    assert evaluated == [] and llm._llm.n_tokens == before and list(llm._llm._input_ids[:before]) == ids
    calls = []
    real = tts.synthesize_sync
    tts.synthesize_sync = lambda *a, **k: (calls.append(a), real(*a, **k))[1]
    try:
        await tts.warm()
        await tts.warm()
    finally:
        del tts.synthesize_sync
    assert calls == []  # "Ready." was synthesized once, at load


def _words(msgs: list[dict]) -> int:
    return sum(len(m["content"].split()) + 2 for m in msgs)


def test_chat_history_is_trimmed_oldest_first_to_fit():
    system = {"role": "system", "content": "You are Nova."}
    history = []
    for i in range(40):
        history += [{"role": "user", "content": f"question {i} " + "word " * 20}, {"role": "assistant", "content": f"answer {i} " + "word " * 20}]
    new = {"role": "user", "content": "What now?"}
    msgs = [system] + history + [new]
    fitted = fit_chat_messages(msgs, _words, 300)
    assert _words(fitted) <= 300
    assert fitted[0] == system and fitted[-1] == new
    assert fitted[1]["role"] == "user"  # alternation kept: history starts with a user line
    kept = fitted[1:-1]
    assert kept == history[-len(kept):] and len(kept) >= 6  # the newest exchanges, in order
    assert fit_chat_messages(msgs, _words, 10_000) == msgs  # fits: unchanged
    assert fit_chat_messages(msgs, _words, 5) == [system, new]  # never drops the system or new line


def test_chat_system_prompt_folds_into_the_first_user_message():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    folded = fold_system(msgs)
    assert [m["role"] for m in folded] == ["user", "assistant", "user"]
    assert folded[0]["content"] == "Be brief.\n\nHi" and msgs[1]["content"] == "Hi"


def test_chat_template_path_folds_and_trims_with_the_models_tokenizer(llm):
    """The chat path on the real tokenizer, with a template that refuses the system role."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}<start_of_turn>model\n"
    )
    saved = llm._formatter, llm.n_ctx
    llm._formatter, llm.n_ctx = Jinja2ChatFormatter(template=template, eos_token="<eos>", bos_token="<bos>"), 512
    try:
        msgs = [ChatMessage("system", "You are Nova.")]
        for i in range(60):
            msgs += [ChatMessage("user", f"Tell me about topic number {i}, please."), ChatMessage("assistant", f"Topic {i} is an interesting subject with a long history.")]
        msgs.append(ChatMessage("user", "And what about the last one?"))
        fitted = llm.chat_messages(LLMRequest(messages=msgs), max_tokens=80)
        assert all(m["role"] != "system" for m in fitted)
        assert fitted[0]["role"] == "user" and fitted[0]["content"].startswith("You are Nova.")
        assert fitted[-1]["content"] == "And what about the last one?"
        assert llm._chat_tokens(fitted) <= 512 - 80 - 16 and len(fitted) > 3
    finally:
        llm._formatter, llm.n_ctx = saved


async def collect(llm: LLMRequest, req, cancel=None) -> str:
    out = []
    async for t in llm.stream(req, cancel or CancelToken()):
        out.append(t)
    return "".join(out)


@pytest.mark.asyncio
async def test_llm_gives_a_short_reply_and_stops_at_the_next_user_line(llm):
    msgs = [ChatMessage("system", SYSTEM), ChatMessage("user", "What is the capital of France?")]
    reply = await collect(llm, LLMRequest(messages=msgs, max_tokens=120))
    assert reply.strip(), "empty reply"
    assert "User:" not in reply and "\n\n" not in reply and "Atlas:" not in reply
    words = reply.split()
    assert 1 <= len(words) <= 60  # stopped by a stop sequence, well before 120 tokens
    assert sum(c.isalpha() for c in reply) >= 0.6 * len(reply.replace(" ", ""))


@pytest.mark.asyncio
async def test_llm_prefill_makes_the_turn_evaluate_only_the_new_line(llm):
    hist = [ChatMessage("system", SYSTEM), ChatMessage("user", "Hello."), ChatMessage("assistant", "Hi there, how can I help?")]
    first = await asyncio.to_thread(llm.prefill_sync, hist)
    again = await asyncio.to_thread(llm.prefill_sync, hist)
    assert first > 5 and again == 0
    reply = await collect(llm, LLMRequest(messages=hist + [ChatMessage("user", "Tell me a fun fact.")], max_tokens=40))
    assert reply.strip()


@pytest.mark.asyncio
async def test_llm_cancel_stops_the_generation_thread(llm):
    msgs = [ChatMessage("system", SYSTEM), ChatMessage("user", "Tell me a very long story about a dragon and a knight.")]
    cancel = CancelToken()
    got = []
    t0 = time.monotonic()
    async for t in llm.stream(LLMRequest(messages=msgs, max_tokens=400, temperature=0.9), cancel):
        got.append(t)
        cancel.cancel()
    assert len(got) == 1
    # the worker thread notices at its next token and releases the model lock
    def generating() -> bool:
        return llm._lock.locked() or any(t.name == "llama-generate" for t in threading.enumerate())

    deadline = time.monotonic() + 2.0
    while generating() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert not generating()
    assert time.monotonic() - t0 < 3.0


@pytest.mark.asyncio
async def test_llm_abandoned_stream_releases_the_model(llm):
    msgs = [ChatMessage("system", SYSTEM), ChatMessage("user", "Count slowly from one to fifty.")]
    agen = llm.stream(LLMRequest(messages=msgs, max_tokens=300), CancelToken())
    await agen.__anext__()
    await agen.aclose()  # the consumer walks away without a cancel token
    deadline = time.monotonic() + 2.0
    while llm._lock.locked() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert not llm._lock.locked()


# ---------------------------------------------------------------- TTS
@pytest.mark.asyncio
async def test_tts_gives_a_22050_hz_wav(tts):
    clip = await tts.synthesize("Hello, this is the local voice.", voice="", speed=1.0, cancel=CancelToken())
    rate, channels, width, frames = wav_info(clip.wav)
    assert (rate, channels, width) == (22050, 1, 2)
    assert clip.sample_rate == 22050
    assert 800 <= clip.duration_ms <= 5000
    samples = np.frombuffer(clip.wav[44:], dtype="<i2")
    assert np.abs(samples).max() > 3000  # audible, not silence


@pytest.mark.asyncio
async def test_tts_speed_maps_to_length_scale(tts):
    text = "Speaking faster makes this sentence shorter."
    slow = await tts.synthesize(text, voice="", speed=1.0, cancel=CancelToken())
    fast = await tts.synthesize(text, voice="", speed=2.0, cancel=CancelToken())
    assert fast.duration_ms < 0.75 * slow.duration_ms


def test_tts_empty_and_symbol_text(tts):
    assert tts.synthesize_sync("").duration_ms == 0.0
    clip = tts.synthesize_sync("...")
    assert wav_info(clip.wav)[0] == 22050


# ---------------------------------------------------------------- round trip
@pytest.mark.asyncio
async def test_round_trip_piper_to_whisper_word_error_rate(tts, stt):
    errors = words = 0
    worst = []
    for sentence in ROUND_TRIP:
        clip = await tts.synthesize(sentence, voice="", speed=1.0, cancel=CancelToken())
        with wave.open(io.BytesIO(clip.wav), "rb") as w:
            pcm = w.readframes(w.getnframes())
        heard = (await stt.transcribe(pcm, sample_rate=clip.sample_rate)).text
        n = len(sentence.split())
        wer = word_error_rate(sentence, heard)
        errors += wer * n
        words += n
        worst.append((wer, sentence, heard))
    total = errors / words
    assert total <= 0.15, sorted(worst, reverse=True)[:3]


def test_word_error_rate_function():
    assert word_error_rate("the cat sat", "the cat sat") == 0.0
    assert word_error_rate("the cat sat", "the dog sat") == pytest.approx(1 / 3)
    assert word_error_rate("the cat sat", "the cat") == pytest.approx(1 / 3)
    assert word_error_rate("The cat, sat!", "the cat sat") == 0.0
    assert word_error_rate("a b", "a x y b") == 1.0


# ---------------------------------------------------------------- CLI and bench
def test_cli_speak_then_transcribe(tmp_path, capsys, tts, stt):
    from voiceclaw_app import cli

    out = tmp_path / "hello.wav"
    assert cli.main(["speak", "Good evening, the kitchen lights are off.", "-o", str(out)]) == 0
    assert wav_info(out.read_bytes())[0] == 22050
    capsys.readouterr()
    assert cli.main(["transcribe", str(out)]) == 0
    printed = capsys.readouterr().out.strip()
    # Piper samples noise (each process speaks the sentence a little differently), so
    # one sentence may lose a word or two ("the kitchen lighter off"); accuracy is the
    # 10-sentence round-trip test's job, this one checks the two commands end to end
    assert word_error_rate("Good evening, the kitchen lights are off.", printed) <= 0.3, printed


def test_cli_transcribe_unreadable_file(tmp_path, capsys):
    from voiceclaw_app import cli

    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF nonsense")
    assert cli.main(["transcribe", str(bad)]) == 2
    assert "Cannot read" in capsys.readouterr().err


@pytest.mark.asyncio
async def test_bench_local_prints_the_contract_shape():
    """Two paced runs: the JSON shape and an honest origin (speech end), not a timing gate."""
    from voiceclaw_app.bench.local import run_local
    from voiceclaw_app.providers import engines

    engines.reset_for_tests()
    result = await run_local(runs=2)
    assert result["scenario"] == "local" and result["runs"] == 2
    assert result["errors"] == 0
    ttfa = result["time_to_first_audio_ms"]
    assert set(ttfa) == {"p50", "p95"}
    # first audio can never precede the end-of-turn decision, itself never before the
    # pause that is judged (smart_turn, the default) or the silence wait
    from voiceclaw_app.providers.local_listener import SMART_TURN_PAUSE_MS

    floor = SMART_TURN_PAUSE_MS if result["turn_detection"] == "smart_turn" else result["vad_silence_ms"] - 50
    assert ttfa["p50"] >= result["stages_ms"]["endpointing"]["p50"] >= floor
    for name in ("endpointing", "stt", "llm_first_token", "tts_first"):
        assert set(result["stages_ms"][name]) == {"p50", "p95"}


def test_bench_local_flags_work_through_the_bench_entry_point(monkeypatch, capsys):
    import voiceclaw_app.bench.__main__ as bench_main
    import voiceclaw_app.bench.local as bench_local

    got = {}

    async def fake_run_local(**kw):
        got.update(kw)
        return {"scenario": "local", "runs": 0, "time_to_first_audio_ms": {"p50": None, "p95": None}, "stages_ms": {}, "errors": 0}

    monkeypatch.setattr(bench_local, "run_local", fake_run_local)
    assert bench_main.main(["local", "--silence-ms", "200", "--no-speculative", "--no-prefill", "--json", "--runs", "2"]) == 0
    assert got == {"runs": 2, "silence_ms": 200, "speculative": False, "prefill": False, "verbose": False}
    assert json.loads(capsys.readouterr().out)["scenario"] == "local"
    with pytest.raises(SystemExit):
        bench_main.main(["pipeline", "--no-prefill"])


class _EmptyThenWords:
    """Stands in for llama.cpp's completion API: the first samplings stop at once
    (a stop sequence as the first token), the next one answers."""

    def __init__(self, empty: int):
        self.empty = empty
        self.calls = 0

    def tokenize(self, data: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return list(range(len(data.split())))

    def create_completion(self, prompt, **kw):
        self.calls += 1
        if self.calls <= self.empty:
            return iter([{"choices": [{"text": ""}]}])
        return iter([{"choices": [{"text": " The Moon"}]}, {"choices": [{"text": " is far."}]}])


@pytest.mark.parametrize(("empty", "expected"), [(1, "The Moon is far."), (2, "The Moon is far."), (5, "")])
def test_an_empty_base_model_reply_is_sampled_again(empty, expected):
    engine = LocalLlamaLLM(system_prompt="Be brief.")
    fake = _EmptyThenWords(empty)
    engine._llm = fake  # loaded: no model file needed for the retry logic
    out = "".join(engine.generate_sync(LLMRequest(messages=[ChatMessage(role="user", content="Tell me about the Moon.")]), CancelToken()))
    assert out == expected
    assert fake.calls == min(empty + 1, 3)
