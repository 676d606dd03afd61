"""Persistence rules: messages, incremental replies, crash recovery, timings, settings, export."""

import json

import pytest

from voiceclaw_app.config import VoiceSettings
from voiceclaw_app.pipeline.timing import TurnMarks

#: the account the rows of these tests belong to (the first user of each fresh database)
UID = 1


@pytest.fixture()
def repo(tmp_path, monkeypatch):
    monkeypatch.setenv("VOICECLAW_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("VOICECLAW_DATABASE_URL", f"sqlite:///{tmp_path / 'test.db'}")
    from voiceclaw_app.db import repo as r

    r.create_all()
    from voiceclaw_app import accounts

    assert accounts.add_user("tester", "tester-password").id == UID
    return r


def test_turn_is_written_incrementally_and_recovered_after_a_crash(repo):
    conv = repo.create_conversation(UID)
    repo.add_user_message(UID, conv.id, "How long does it take to boil an egg?", spoken=True)
    reply = repo.start_assistant_message(UID, conv.id, spoken=True)
    repo.update_assistant_message(UID, reply.id, "About seven minutes.", ["a1b2c3d4e5"])
    # crash here: the reply is unfinished; startup recovery keeps it, marked interrupted
    assert repo.recover_unfinished() == 1
    msgs = repo.list_messages(UID, conv.id)
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    assert msgs[1]["content"] == "About seven minutes."
    assert msgs[1]["interrupted"] and msgs[1]["finished"]
    assert msgs[1]["audio_ids"] == ["a1b2c3d4e5"]
    assert repo.recover_unfinished() == 0
    assert repo.get_conversation(UID, conv.id).title.startswith("How long does it take")


def test_history_is_bounded_and_ordered(repo):
    conv = repo.create_conversation(UID)
    for i in range(6):
        repo.add_user_message(UID, conv.id, f"q{i}")
        m = repo.start_assistant_message(UID, conv.id, spoken=False)
        repo.update_assistant_message(UID, m.id, f"a{i}", finished=True)
    hist = repo.recent_history(UID, conv.id, 2)
    assert hist == [("user", "q4"), ("assistant", "a4"), ("user", "q5"), ("assistant", "a5")]
    assert repo.recent_history(UID, conv.id, 0) == []


def test_timings_relative_to_speech_end_and_late_playback(repo):
    conv = repo.create_conversation(UID)
    marks = TurnMarks(speech_end=1000.0, eot_decided=1500.0, stt_final=1600.0, llm_first_token=1700.0, first_chunk=1800.0, first_audio_ready=2000.0, turn_done=3000.0)
    tid = repo.save_timing(UID, conv.id, None, marks, spoken_input=True)
    repo.set_first_audio_playing(UID, tid, 1200.0)
    rows = repo.timings_for(UID, conv.id)
    assert rows[0]["speech_end"] == 0.0 and rows[0]["first_audio_ready"] == 1000.0
    assert rows[0]["v2v_ms"] == 1200.0
    summary = repo.latency_summary(UID)
    assert summary["voice_to_voice"]["p50"] == 1200.0


def test_settings_round_trip_and_bad_rows_fall_back(repo):
    s = VoiceSettings.from_env().replace(assistant_name="Nova", vad_silence_ms=300)
    repo.save_settings(s)
    assert repo.load_settings().assistant_name == "Nova"
    from sqlmodel import Session

    from voiceclaw_app.db.engine import get_engine
    from voiceclaw_app.db.models import SettingsRow

    with Session(get_engine()) as ses:
        row = ses.get(SettingsRow, 1)
        row.data = json.dumps({"assistant_name": "Nova", "vad_silence_ms": 5})
        ses.add(row)
        ses.commit()
    loaded = repo.load_settings()
    assert loaded.assistant_name == "Nova" and loaded.vad_silence_ms == VoiceSettings().vad_silence_ms


def test_search_export_delete(repo):
    a = repo.create_conversation(UID)
    repo.add_user_message(UID, a.id, "tell me about piper voices")
    b = repo.create_conversation(UID)
    m = repo.start_assistant_message(UID, b.id, spoken=True)
    repo.update_assistant_message(UID, m.id, "Hello **there**", ["zzzzzzzzzz"], finished=True, interrupted=True)
    assert [c["id"] for c in repo.list_conversations(UID, "piper")] == [a.id]
    name, md = repo.export_conversation(UID, b.id, "md")
    assert name.endswith(".md") and "Hello **there**" in md and "interrupted" in md
    name, js = repo.export_conversation(UID, b.id, "json")
    assert json.loads(js)["messages"][0]["interrupted"] is True
    assert repo.delete_conversation(UID, b.id) == ["zzzzzzzzzz"]
    assert repo.get_conversation(UID, b.id) is None
    repo.delete_all_conversations(UID)
    assert repo.list_conversations(UID) == []
