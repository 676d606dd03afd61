"""History page state: conversations, messages with timestamps, latency waterfalls."""

from __future__ import annotations

import asyncio
import json
import time

import reflex as rx

from ..db import repo
from ..server.auth import sign_audio_url
from . import services
from .auth import require_user

STAGES = [
    ("transcript", "speech_end", "stt_final"),
    ("first token", "stt_final", "llm_first_token"),
    ("first chunk", "llm_first_token", "first_chunk"),
    ("first audio ready", "first_chunk", "first_audio_ready"),
    ("first audio playing", "first_audio_ready", "first_audio_playing"),
]


def waterfall_rows(timings: list[dict]) -> list[dict[str, str]]:
    """Flat rows (a header per turn, then a bar per stage) with left/width in %."""
    rows: list[dict[str, str]] = []
    for n, t in enumerate(timings, 1):
        marks = {k: t.get(k) for k in ("speech_end", "stt_final", "llm_first_token", "first_chunk", "first_audio_ready", "first_audio_playing", "turn_done")}
        known = [v for k, v in marks.items() if v is not None and k != "turn_done"]
        span = max(known + [1.0])
        v2v = t.get("v2v_ms")
        head = f"Turn {n}" + (f" · voice-to-voice {v2v:.0f} ms" if v2v is not None else "") + (f" · first audio ready {t['first_audio_ready']:.0f} ms" if t.get("first_audio_ready") is not None else "")
        rows.append({"kind": "head", "label": head, "left": "0%", "width": "0%", "ms": "", "turn": str(n)})
        for label, a, b in STAGES:
            va = marks.get(a)
            vb = marks.get(b)
            if a == "speech_end" and va is None:
                va = 0.0
            if va is None or vb is None:
                continue
            left = max(0.0, va) / span * 100
            width = max(0.0, vb - va) / span * 100
            rows.append({"kind": "bar", "label": label, "left": f"{left:.1f}%", "width": f"{max(width, 0.3):.1f}%", "ms": f"{vb:.0f} ms (+{vb - va:.0f})", "turn": str(n)})
    return rows


class HistoryState(rx.State):
    search: str = ""
    conversations: list[dict[str, str]] = []
    selected: str = ""
    selected_title: str = ""
    messages: list[dict[str, str]] = []
    waterfall: list[dict[str, str]] = []
    summary: list[dict[str, str]] = []
    replay_urls: list[str] = []
    replay_turn: str = ""
    replay_stop_seq: int = 0
    replaying: bool = False
    confirm_all: bool = False

    async def _refresh(self, user_id: int) -> None:
        convs = await asyncio.to_thread(repo.list_conversations, user_id, self.search, 200)
        self.conversations = [
            {"id": c["id"], "title": c["title"], "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(c["updated_at"]))} for c in convs
        ]
        summ = await asyncio.to_thread(repo.latency_summary, user_id, 50)
        self.summary = [
            {"name": k.replace("_", " "), "p50": "-" if v["p50"] is None else f"{v['p50']:.0f} ms", "p95": "-" if v["p95"] is None else f"{v['p95']:.0f} ms", "n": str(v["n"])}
            for k, v in summ.items()
        ]

    @rx.event
    async def on_load(self):
        user = await require_user(self)
        if user is None:
            return
        self.replay_urls = []  # a reloaded page plays nothing by itself
        self.replaying = False
        await self._refresh(user.id)
        if self.selected:
            await self._load_conversation(user.id, self.selected)

    @rx.event
    async def set_search(self, value: str):
        user = await require_user(self)
        if user is None:
            return
        self.search = str(value or "")
        await self._refresh(user.id)

    async def _load_conversation(self, user_id: int, conversation_id: str) -> None:
        conv = await asyncio.to_thread(repo.get_conversation, user_id, conversation_id)
        if conv is None:  # gone, or another user's: the same "not found"
            self.selected = ""
            self.messages = []
            self.waterfall = []
            return
        msgs = await asyncio.to_thread(repo.list_messages, user_id, conversation_id)
        timings = await asyncio.to_thread(repo.timings_for, user_id, conversation_id)
        store = services.audio_store()
        self.selected = conversation_id
        self.selected_title = conv.title
        self.messages = [
            {
                "id": str(m["id"]),
                "role": m["role"],
                "content": m["content"],
                "time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["created_at"])),
                "interrupted": "1" if m["interrupted"] else "",
                "audio": "1" if any(store.path_for(a) for a in m["audio_ids"]) else "",
            }
            for m in msgs
        ]
        self.waterfall = waterfall_rows(timings)

    @rx.event
    async def select(self, conversation_id: str):
        user = await require_user(self)
        if user is None or not isinstance(conversation_id, str):
            return
        await self._load_conversation(user.id, conversation_id)

    @rx.event
    async def delete_selected(self):
        user = await require_user(self)
        if user is None or not self.selected:
            return
        audio = await asyncio.to_thread(repo.delete_conversation, user.id, self.selected)
        await asyncio.to_thread(services.audio_store().delete, audio)
        self.selected = ""
        self.messages = []
        self.waterfall = []
        await self._refresh(user.id)

    @rx.event
    async def ask_delete_all(self):
        if await require_user(self) is None:
            return
        self.confirm_all = True

    @rx.event
    async def cancel_delete_all(self):
        if await require_user(self) is None:
            return
        self.confirm_all = False

    @rx.event
    async def delete_all(self):
        """Delete all of *this user's* conversations (no one else's)."""
        user = await require_user(self)
        if user is None:
            return
        audio = await asyncio.to_thread(repo.delete_all_conversations, user.id)
        await asyncio.to_thread(services.audio_store().delete, audio)
        self.confirm_all = False
        self.selected = ""
        self.messages = []
        self.waterfall = []
        await self._refresh(user.id)

    @rx.event
    async def export(self, fmt: str):
        user = await require_user(self)
        if user is None or not self.selected:
            return
        try:
            name, body = await asyncio.to_thread(repo.export_conversation, user.id, self.selected, fmt)
        except repo.NotFound:
            return
        return rx.download(data=body, filename=name)

    @rx.event
    async def replay(self, message_id: str):
        user = await require_user(self)
        if user is None:
            return
        msgs = await asyncio.to_thread(repo.list_messages, user.id, self.selected)
        store = services.audio_store()
        for m in msgs:
            if str(m["id"]) == message_id:
                self.replay_urls = [sign_audio_url(a, user.id) for a in m["audio_ids"] if store.path_for(a) is not None]
                self.replay_turn = f"replay-{message_id}-{time.time():.3f}"
                self.replaying = bool(self.replay_urls)
                return

    @rx.event
    async def stop_replay(self):
        if await require_user(self) is None:
            return
        self.replay_stop_seq += 1
        self.replaying = False
        self.replay_urls = []

    @rx.event
    async def on_audio_event(self, payload: str):
        """Replays report playback like the dashboard's queue; only the end matters here."""
        if await require_user(self) is None:
            return
        try:
            data = json.loads(payload)
        except ValueError:
            return
        if isinstance(data, dict) and data.get("event") in ("ended", "stopped") and data.get("turn") == self.replay_turn:
            self.replaying = False
            self.replay_urls = []  # played: a reopened page does not play it again
